"""What every DataModule of image files on disk shares: the image options, checked once, and the pre-training scan."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from datamodules.base import CXRDataModule
from datamodules.images import BAD_FILE_POLICIES, build_transform, check_intensity
from datamodules.scan import SCAN_MODES, BadFile, enforce, scan_files


class FileDataModule(CXRDataModule):
    """Subclasses say which files to check (``scan_targets``); ``scan`` checks them once, per ``scan`` and
    ``on_bad_file``, so bad files stop or drop in ``setup``, before fit."""

    def __init__(
        self,
        image_size: int,
        resize: str,
        augmentations: Sequence[Mapping] | None,
        on_bad_file: str,
        intensity: str,
        scan: str,
        batch_size: int,
        num_workers: int,
        eval_batch_size: int | None,
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers, eval_batch_size=eval_batch_size)
        if on_bad_file not in BAD_FILE_POLICIES or scan not in SCAN_MODES:
            raise ValueError(f"on_bad_file must be in {BAD_FILE_POLICIES} and scan in {SCAN_MODES}")
        self.image_size, self.resize, self.augmentations = int(image_size), resize, list(augmentations or [])
        self.has_random_augmentation = bool(self.augmentations)
        self.on_bad_file, self.scan_mode, self.intensity = on_bad_file, scan, check_intensity(intensity)
        build_transform(image_size, resize, self.augmentations)  # a bad resize/augmentation fails now, not in setup
        self.bad_files: list[BadFile] | None = None

    def scan_targets(self) -> tuple[list[str], str]:
        """The files to check and what they are (named in the report)."""
        raise NotImplementedError

    def scan(self) -> list[BadFile]:
        """Check every file of ``scan_targets`` per ``scan``; apply ``on_bad_file``; return the report."""
        if self.bad_files is None:
            files, what = self.scan_targets()
            bad = scan_files(files, self.scan_mode)
            enforce(bad, self.on_bad_file, what)
            self.bad_files = bad
        return self.bad_files
