"""What every script shares at its edges: the config from the command line, one error path, and results written as
JSON + Markdown."""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from configs import ConfigError, compose

log = logging.getLogger("vald")


def load_config(name: str, argv: list[str] | None = None) -> DictConfig:
    """``python experiments/<script>.py [group=choice] [key=value ...]``; a bad key exits with the valid ones."""
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        print(
            f"usage: {Path(sys.argv[0]).name} [data=NAME] [model=NAME] [trainer=NAME] [experiment=NAME] "
            f"[key=value ...]\n\nresolved defaults:\n{OmegaConf.to_yaml(compose(name))}"
        )
        raise SystemExit(0)
    try:
        cfg = compose(name, argv)
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None
    for key in ("output_dir", "log_dir"):
        if cfg.get(key):
            check_writable(cfg[key], key)
    return cfg


def check_writable(folder: str | Path, key: str) -> None:
    """Create ``folder`` and prove a file can be written there now, so a read-only or full disk, or a file in the
    way, is one line before any work rather than a lost result after it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".vald-write-test-{os.getpid()}"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as err:
        raise SystemExit(f"config error: {key}={folder} cannot be written: {one_line(err)}") from None


#: errors a user causes and can fix from the message: shown without a traceback (Lightning's own word for a setting
#: this machine or run cannot take included)
USER_ERRORS = (ValueError, LookupError, OSError, MisconfigurationException)
#: what to do when the system refuses a file operation
OS_ADVICE = {
    errno.ENOSPC: "free some space or choose another output folder",
    errno.EROFS: "the disk is read-only: choose a writable output folder",
    errno.EACCES: "you lack permission: choose a folder you can write to",
    errno.ENOTDIR: "a path component is a file, not a folder: choose another path",
    errno.EISDIR: "a folder stands where a file is expected: choose another path",
    errno.EEXIST: "a file stands where a folder is expected: choose another path",
    errno.ENOENT: "check the path",
}


def one_line(err: BaseException) -> str:
    """An exception as one line: the message with its line breaks folded; OS errors with the file and a remedy."""
    if isinstance(err, OSError) and err.strerror:
        where = f" {err.filename}" if err.filename else ""
        advice = OS_ADVICE.get(err.errno or -1)
        return f"{err.strerror}:{where}" + (f" ({advice})" if advice else "")
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, USER_ERRORS) else f"{type(err).__name__}: {text}"


def run(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """The one error path of every entry point. An error a user can cause (a bad value, a missing or unreadable
    file, a full or read-only disk, a setting the machine cannot take) ends in one line on stderr and exit code 1;
    anything else in one line that says it is unexpected. ``VALD_DEBUG=1`` shows the full traceback instead."""
    name = Path(sys.argv[0]).stem or "vald"
    try:
        main(argv)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as err:
        if os.environ.get("VALD_DEBUG", "") not in ("", "0"):
            raise
        expected = isinstance(err, USER_ERRORS)
        hint = "" if expected else " (unexpected: VALD_DEBUG=1 shows the traceback; please report it)"
        print(f"{name}: error: {one_line(err)}{hint}", file=sys.stderr)
        raise SystemExit(1) from None


def checkpoint_sampling(path: str | Path):
    """A stage-2 checkpoint's default ``SamplingSettings`` (steps, guidance), read without loading its weights: the
    defaults of every settings block whose value is null. Raises ValueError (a user error) for a missing, unreadable or
    wrong kind of file, so scripts can build and check their settings before any model loads."""
    from lightning_modules.checkpoints import read_hparams
    from lightning_modules.settings import SamplingSettings

    hparams = read_hparams(path, "stage-2 latent diffusion")  # a CheckpointError (ValueError) names what is wrong
    return SamplingSettings.from_hparams(hparams.get("sampling"))


def write_results(out_dir: str | Path, name: str, result: dict, table: str) -> Path:
    """``<name>.json`` (everything measured) and ``<name>.md`` (the table, also printed) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(table)
    print(table)
    return out


def write_csv(path: str | Path, rows: list[dict], columns: list[str] | None = None) -> None:
    """One row per dict; the columns are every key in first-seen order unless given."""
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
