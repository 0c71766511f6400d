"""Every script's ``input=<file or folder>``: one image file, or every image under a folder, as one Dataset.

Attribution, induction and any later script read user images through ``ImageFolder``, so they all accept the same
inputs, decode them the same way (``read_gray`` + ``build_transform``, as the DataModules do) and name them the same
way. Ids are unique, compared case-insensitively (``a.png`` and ``a.jpg``; ``COVID-1.png`` and ``COVID-1.PNG``), so
no output file written under an id overwrites another. Broken files never stop a run: a file whose header or end is
broken is left out at construction and listed in ``skipped``; one that only fails to decode is served as an error
sample, which ``collate_readable`` moves to the batch's ``skipped`` list.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.base import to_model_range
from datamodules.images import IMAGE_SUFFIXES, UnreadableImageError, build_transform, read_gray
from datamodules.scan import scan_files

_EXPECTED = f"an image file ({', '.join(IMAGE_SUFFIXES)}) or a folder holding some"


def image_paths(path: Path) -> list[Path]:
    """``path`` itself if it is a file, else every image file under it (recursive, sorted, suffix case-insensitive)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ValueError(f"input: no such file or folder: {path} (expected {_EXPECTED})")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"input: no image file under {path} (expected {_EXPECTED})")
    return files


def unique_ids(files: Sequence[Path], root: Path) -> tuple[list[str], list[str]]:
    """Ids (path under ``root`` without suffix, posix) unique case-insensitively, and a note per renamed group.

    Files whose ids clash keep their suffix as written (``a.png`` -> ``a_png``, ``COVID-1.PNG`` -> ``COVID-1_PNG``);
    an id still taken after that gets a counter (``_2``, ``_3``, ...).
    """
    names = [p.relative_to(root).with_suffix("").as_posix() for p in files]
    groups: dict[str, list[int]] = defaultdict(list)
    for i, name in enumerate(names):
        groups[name.casefold()].append(i)
    ids = list(names)
    taken = {key for key, members in groups.items() if len(members) == 1}
    notes = []
    for members in groups.values():
        if len(members) == 1:
            continue
        for i in members:
            candidate = f"{names[i]}_{files[i].suffix.lstrip('.')}"
            unique, count = candidate, 1
            while unique.casefold() in taken:
                count += 1
                unique = f"{candidate}_{count}"
            taken.add(unique.casefold())
            ids[i] = unique
        listed = ", ".join(f"{files[i].relative_to(root).as_posix()} -> {ids[i]}" for i in members)
        notes.append(f"files sharing the id '{names[members[0]]}' (case-insensitive) keep their suffix: {listed}")
    return ids, notes


class ImageFolder(Dataset):
    """One image file, or every image under a folder, as ``{"image": (1, S, S) in [-1, 1], "id", "path"}``.

    ``path``: an image file or a folder (searched recursively for ``IMAGE_SUFFIXES``, any case). ``image_size`` and
    ``resize`` (``stretch`` or ``letterbox``) go to ``build_transform``. Every file's header is checked here: the
    broken ones are left out and listed in ``skipped`` as (path, reason); ``notes`` says which ids were renamed to
    stay unique. A file that passes the check but fails to decode yields ``{"id", "path", "error", "image_size"}``
    with no image; use ``collate_readable`` as the DataLoader's ``collate_fn`` to gather those per batch.
    Raises ``ValueError`` for a missing path, a folder without image files, or no readable file at all.

    Images are not clipped (attribution's outputs stay byte-identical): resampling can overshoot 1 by one float32
    ulp; ``image.clamp(-1, 1)`` reproduces the clipped variant bit for bit.
    """

    def __init__(self, path: str | Path, image_size: int, resize: str = "stretch"):
        self.transform = build_transform(image_size, resize)  # a bad resize fails before any file is touched
        self.image_size = int(image_size)
        self.resize = resize
        path = Path(path)
        self.root = path.parent if path.is_file() else path
        files = image_paths(path)
        bad = scan_files(files, "header")
        #: files left out at construction: (path, reason)
        self.skipped: list[tuple[str, str]] = [(b.path, b.reason) for b in bad]
        broken = {b.path for b in bad}
        self.files: list[Path] = [p for p in files if str(p) not in broken]
        if not self.files:
            reasons = "; ".join(f"{p}: {r}" for p, r in self.skipped)
            raise ValueError(f"input: no readable image under {path}: {reasons}")
        ids, notes = unique_ids(self.files, self.root)
        self.ids: list[str] = ids
        #: human-readable remarks, e.g. ids renamed to stay unique
        self.notes: list[str] = notes

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        path, sample_id = self.files[index], self.ids[index]
        try:
            gray = self.transform(image=read_gray(path))["image"]  # (S, S) in [0, 1]
        except UnreadableImageError as err:
            return {"id": sample_id, "path": str(path), "error": err.reason, "image_size": self.image_size}
        image = to_model_range(torch.from_numpy(np.ascontiguousarray(gray, np.float32))[None])
        return {"image": image, "id": sample_id, "path": str(path)}


def collate_readable(samples: Sequence[dict]) -> dict:
    """Stack the readable samples of ``ImageFolder``; list the unreadable ones as ``skipped`` [(path, reason)].

    Returns ``{"image": (B, 1, S, S), "id": [...], "path": [...], "skipped": [...]}``; ``B`` may be 0.
    """
    readable = [s for s in samples if "image" in s]
    skipped = [(s["path"], s["error"]) for s in samples if "image" not in s]
    if readable:
        image = torch.stack([s["image"] for s in readable])
    else:
        size = samples[0]["image_size"] if samples else 0
        image = torch.empty(0, 1, size, size)
    return {
        "image": image,
        "id": [s["id"] for s in readable],
        "path": [s["path"] for s in readable],
        "skipped": skipped,
    }
