"""The validate step real DataModules run in ``setup``: find every unreadable file before training, not hours in.

Modes trade cost for certainty. ``header`` opens each file's header and checks its last kilobyte for the format's end
marker: it finds missing, empty, non-image, unsupported and truncated files at about one small read per file
(minutes for CheXpert's 224k images on a network drive). ``full`` also decodes every pixel: it finds files corrupt in
the middle too, at the cost of a decode per file (hours for full-resolution CheXpert). ``none`` trusts the files; the
Dataset still replaces a file that fails later (``on_bad_file=skip``) or stops with its path (``error``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from datamodules.images import BAD_FILE_POLICIES, UnreadableImageError, check_header, read_gray

log = logging.getLogger(__name__)

SCAN_MODES = ("header", "full", "none")
_LISTED = 20
_CHUNK = 512


@dataclass(frozen=True)
class BadFile:
    path: str
    reason: str


class UnreadableFilesError(RuntimeError):
    """Raised under ``on_bad_file=error``; ``bad`` holds every offending file."""

    def __init__(self, message: str, bad: list[BadFile]):
        super().__init__(message)
        self.bad = bad


def _check(path: Path, mode: str) -> BadFile | None:
    try:
        check_header(path)
        if mode == "full":
            read_gray(path)
    except UnreadableImageError as err:
        return BadFile(err.path, err.reason)
    return None


def scan_files(paths: Sequence[str | Path], mode: str = "header", workers: int | None = None) -> list[BadFile]:
    """Check ``paths`` (in threads: the work is file I/O and GIL-free decoding); return the bad ones, in order."""
    if mode not in SCAN_MODES:
        raise ValueError(f"scan must be one of {SCAN_MODES}, got {mode!r}")
    if mode == "none" or not paths:
        return []
    start = time.perf_counter()
    log.info("scanning %d files (%s) for unreadable images", len(paths), mode)
    chunks = [paths[i : i + _CHUNK] for i in range(0, len(paths), _CHUNK)]  # not 200k futures at once
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        results = pool.map(lambda chunk: [_check(Path(p), mode) for p in chunk], chunks)
        bad = [b for chunk in results for b in chunk if b is not None]
    log.info("scanned %d files (%s) in %.1f s: %d unreadable", len(paths), mode, time.perf_counter() - start, len(bad))
    return bad


def _listing(bad: Sequence[BadFile], limit: int = _LISTED) -> str:
    lines = [f"  {b.path}: {b.reason}" for b in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more")
    return "\n".join(lines)


def enforce(bad: list[BadFile], on_bad_file: str, dataset: str) -> None:
    """Apply the policy to a scan report: ``error`` raises one error listing the files, ``skip`` warns."""
    if on_bad_file not in BAD_FILE_POLICIES:
        raise ValueError(f"on_bad_file must be one of {BAD_FILE_POLICIES}, got {on_bad_file!r}")
    if not bad:
        return
    if on_bad_file == "error":
        raise UnreadableFilesError(
            f"{len(bad)} unreadable file(s) in {dataset}:\n{_listing(bad)}\n"
            "Replace or delete them, or set data.on_bad_file=skip to leave them out of every split.",
            bad,
        )
    log.warning("%s: leaving out %d unreadable file(s) (on_bad_file=skip):\n%s", dataset, len(bad), _listing(bad, 5))
