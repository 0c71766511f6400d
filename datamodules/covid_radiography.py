"""COVID-19 Radiography Database (Kaggle) as distributed: the class folder is the label.

Labels are one-hot over the three abnormal classes (``finding_names``); Normal is all zeros. There is no official
split, so one is drawn per class from the seed (a class's split does not depend on which other classes are selected)
and, with ``split_file``, written once and re-read ever after: images added to the folders later stay out of it.
The lung masks in ``masks/`` are served as ``lung_mask`` on request; a ``lesion_masks/`` folder beside ``masks/``
(the layout the synthetic phantoms are written in) is served as ``mask``, with ``has_mask`` True where an image has
a lesion mask file.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from datamodules.files import FileDataModule
from datamodules.images import IMAGE_SUFFIXES, XRayDataset, build_transform
from datamodules.prompts import PromptBank

log = logging.getLogger(__name__)

FOLDER = "COVID-19_Radiography_Dataset"
CLASSES = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")
SPLITS = ("train", "val", "test")
LAYOUT = f"""\
{FOLDER}/           <- data.root (this folder or the one containing it)
  COVID/images/COVID-1.png ...            COVID/masks/COVID-1.png ...
  Lung_Opacity/images/Lung_Opacity-1.png  Lung_Opacity/masks/...
  Normal/images/Normal-1.png              Normal/masks/...
  Viral Pneumonia/images/Viral Pneumonia-1.png   (the folder name has a space)
  COVID.metadata.xlsx  Lung_Opacity.metadata.xlsx  Normal.metadata.xlsx  Viral Pneumonia.metadata.xlsx  (optional)
  <class>/lesion_masks/<image name>       (optional lesion masks, e.g. synthetic phantoms)"""


def _image_files(folder: Path) -> list[str]:
    """The image file names in ``folder``, sorted (hidden files, e.g. macOS ``._x.png``, left out)."""
    if not folder.is_dir():
        return []
    return [
        n
        for n in sorted(os.listdir(folder))
        if not n.startswith(".") and Path(n).suffix.lower() in IMAGE_SUFFIXES and (folder / n).is_file()
    ]


def _by_stem(names: Sequence[str]) -> dict[str, str]:
    """Lower-cased stem -> file name, to pair an image with its mask whatever the case or extension of either."""
    return {Path(n).stem.lower(): n for n in reversed(names)}  # the first name wins


def stratified_split(classes: Sequence[str], val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    """A split name per entry of ``classes`` (one class name per image, images in a fixed order), per-class seeded."""
    classes = np.asarray(classes, dtype=object)
    split = np.full(len(classes), "train", dtype=object)
    for name in sorted(set(classes)):
        members = np.flatnonzero(classes == name)
        order = members[np.random.default_rng([seed, zlib.crc32(name.encode())]).permutation(len(members))]
        n_test, n_val = round(test_fraction * len(members)), round(val_fraction * len(members))
        split[order[:n_test]] = "test"
        split[order[n_test : n_test + n_val]] = "val"
    return split.tolist()


def _paths(column: pd.Series) -> list[str | None]:
    """Optional relative paths of a table column (pandas stores the missing ones as NaN)."""
    return [p if isinstance(p, str) else None for p in column]


class ClassPrompt:
    """A phrasing of the sample's class from the bank (a picklable callable: DataLoader workers may not fork)."""

    def __init__(self, bank: PromptBank, classes: Sequence[str]):
        self.bank, self.classes = bank, list(classes)

    def __call__(self, index: int, rng: np.random.Generator) -> str:
        cls = self.classes[index]
        return self.bank.normal_phrase(rng) if cls == "Normal" else self.bank.phrase(cls, rng)


class CovidRadiographyDataModule(FileDataModule):
    """Train / val / test from the class folders; ``scan`` runs in ``setup`` so bad files stop or drop before fit.

    ``classes`` selects classes (e.g. ``[COVID, Normal]``); ``balanced_sampling`` draws every class equally often
    in training (with replacement, one epoch = the train split's size).
    """

    finding_names = ("COVID", "Lung_Opacity", "Viral Pneumonia")

    def __init__(
        self,
        root: str | None,
        image_size: int = 256,
        classes: Sequence[str] | None = None,
        val_fraction: float = 0.05,
        test_fraction: float = 0.1,
        seed: int = 0,
        split_file: str | None = None,
        balanced_sampling: bool = False,
        lung_masks: bool = False,
        resize: str = "stretch",
        augmentations: Sequence[Mapping] | None = None,
        on_bad_file: str = "skip",
        intensity: str = "auto",
        scan: str = "header",
        prompt_bank: str = "covid_radiography",
        target_prompt: str | None = None,
        random_prompt: bool = False,
        batch_size: int = 32,
        num_workers: int = 0,
        eval_batch_size: int | None = None,
    ):
        super().__init__(
            image_size, resize, augmentations, on_bad_file, intensity, scan, batch_size, num_workers, eval_batch_size
        )
        self.classes = tuple(classes) if classes else CLASSES
        unknown = sorted(set(self.classes) - set(CLASSES))
        if unknown:
            raise ValueError(f"unknown classes {unknown}; the dataset's classes are {list(CLASSES)}")
        if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
            raise ValueError(f"need 0 <= val_fraction, test_fraction, sum < 1; got {val_fraction}, {test_fraction}")
        self.root = self.resolve_root(root, self.classes)
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        self.split_file = Path(split_file) if split_file else None
        self.balanced_sampling, self.lung_masks = balanced_sampling, lung_masks
        self.random_prompt = random_prompt
        self.bank = PromptBank.load(prompt_bank)
        unphrased = [c for c in self.finding_names if c not in self.bank.findings]
        if unphrased:
            raise ValueError(f"prompt bank {prompt_bank!r} has no phrasings for {unphrased}")
        self.normal_prompt = target_prompt or self.bank.target
        #: class name of every sample, per split (for balanced sampling and per-class reports)
        self.split_classes: dict[str, list[str]] = {}
        self._table: pd.DataFrame | None = None

    @staticmethod
    def resolve_root(root: str | os.PathLike | None, classes: Sequence[str] = CLASSES) -> Path:
        """The dataset folder: ``root`` itself or its ``COVID-19_Radiography_Dataset`` child (as Kaggle unzips)."""
        if not root:
            raise ValueError(f"data.root is not set (make train ... DATA_ROOT=/path). Expected layout:\n{LAYOUT}")
        path = Path(root).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"dataset root {path} does not exist. Expected layout:\n{LAYOUT}")
        for candidate in (path, path / FOLDER):
            if all((candidate / c / "images").is_dir() for c in classes):
                return candidate
        missing = [f"{c}/images" for c in classes if not (path / c / "images").is_dir()]
        found = sorted(os.listdir(path))[:20]
        raise FileNotFoundError(
            f"{path} is not the COVID-19 Radiography Database: no {missing} (found {found}). Expected layout:\n{LAYOUT}"
        )

    # -- index and split -------------------------------------------------------------------------------------------
    def _listing(self) -> pd.DataFrame:
        rows = []
        for cls in CLASSES:
            images = _image_files(self.root / cls / "images")
            lungs = _by_stem(_image_files(self.root / cls / "masks"))
            lesions = _by_stem(_image_files(self.root / cls / "lesion_masks"))
            has_lesion_folder = (self.root / cls / "lesion_masks").is_dir()
            stems = [Path(n).stem.lower() for n in images]
            counts = Counter(stems)
            clashes = [n for n, stem in zip(images, stems, strict=True) if counts[stem] > 1]
            if clashes:  # distinct files: each stays a sample, its id (the path) keeps the case and extension
                log.warning("%s/images: names differ only in case or extension, each kept: %s", cls, ", ".join(clashes))
            for name, stem in zip(images, stems, strict=True):
                rows.append(
                    {
                        "path": f"{cls}/images/{name}",
                        "class": cls,
                        "lung_mask": f"{cls}/masks/{lungs[stem]}" if stem in lungs else None,
                        "lesion_mask": f"{cls}/lesion_masks/{lesions[stem]}" if stem in lesions else None,
                        "has_lesion_folder": has_lesion_folder,
                    }
                )
        return pd.DataFrame(rows, columns=["path", "class", "lung_mask", "lesion_mask", "has_lesion_folder"])

    def _assign_splits(self, listing: pd.DataFrame) -> pd.DataFrame:
        if self.split_file is not None and self.split_file.is_file():
            saved = pd.read_csv(self.split_file, dtype=str, keep_default_na=False)
            if not {"path", "class", "split"} <= set(saved.columns) or not set(saved["split"]) <= set(SPLITS):
                raise ValueError(f"split file {self.split_file}: expected columns path,class,split; splits {SPLITS}")
            on_disk = set(listing["path"])
            gone, new = saved[~saved["path"].isin(on_disk)], listing[~listing["path"].isin(set(saved["path"]))]
            if len(gone):
                log.warning(
                    "split file %s: %d listed images are not on disk, e.g. %s",
                    self.split_file,
                    len(gone),
                    list(gone["path"][:3]),
                )
            if len(new):
                log.warning(
                    "split file %s: %d images on disk are not in it and are left out (delete the file to "
                    "re-split), e.g. %s",
                    self.split_file,
                    len(new),
                    list(new["path"][:3]),
                )
            return listing.merge(saved[["path", "split"]], on="path", how="inner")
        split = stratified_split(listing["class"], self.val_fraction, self.test_fraction, self.seed)
        listing = listing.assign(split=split)
        if self.split_file is not None:
            self.split_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.split_file.with_name(f".{self.split_file.name}.{os.getpid()}")  # DDP ranks write the same file
            listing[["path", "class", "split"]].to_csv(tmp, index=False)
            os.replace(tmp, self.split_file)
            log.info("wrote the split to %s", self.split_file)
        return listing

    @property
    def table(self) -> pd.DataFrame:
        """Selected images (before the scan): path, class, lung_mask, lesion_mask, split."""
        if self._table is None:
            listing = self._assign_splits(self._listing())
            selected = listing[listing["class"].isin(self.classes)].reset_index(drop=True)
            if selected.empty:
                raise FileNotFoundError(f"no images of {list(self.classes)} in {self.root}. Expected layout:\n{LAYOUT}")
            self._table = selected
        return self._table

    @cached_property
    def metadata(self) -> pd.DataFrame:
        """The optional ``<class>.metadata.xlsx`` sheets joined to the images by case-insensitive file name.

        Indexed by image id, with the sheet's columns (FILE NAME, FORMAT, SIZE, URL); absent sheets leave NaN.
        """
        frames = []
        files = {n.lower(): n for n in os.listdir(self.root)}
        for cls in self.classes:
            name = files.get(f"{cls}.metadata.xlsx".lower())
            if name is None:
                continue
            try:
                sheet = pd.read_excel(self.root / name, dtype=str)
            except Exception as err:  # noqa: BLE001 - the sheets are optional extras: a broken one must not stop a run
                log.warning("cannot read %s (%s): metadata left out", self.root / name, err)
                continue
            sheet.columns = [str(c).strip().upper() for c in sheet.columns]
            if "FILE NAME" not in sheet.columns:
                log.warning("%s has no 'FILE NAME' column: metadata left out", self.root / name)
                continue
            stems = sheet["FILE NAME"].astype(str).str.strip()
            stems = stems.where(~stems.str.lower().str.endswith(IMAGE_SUFFIXES), stems.str.rsplit(".", n=1).str[0])
            frames.append(sheet.assign(_class=cls, _key=stems.str.lower()))
        images = self.table[["path", "class"]].assign(_key=self.table["path"].map(lambda p: Path(p).stem.lower()))
        if not frames:
            return images.set_index("path")[["class"]]
        sheets = pd.concat(frames, ignore_index=True).drop_duplicates(["_class", "_key"])
        joined = images.merge(sheets, left_on=["class", "_key"], right_on=["_class", "_key"], how="left")
        return joined.drop(columns=["_key", "_class"]).set_index("path")

    # -- scan and datasets -----------------------------------------------------------------------------------------
    def scan_targets(self) -> tuple[list[str], str]:
        """Every selected image and every mask it serves."""
        columns = ["path"] + (["lung_mask"] if self.lung_masks else []) + ["lesion_mask"]
        files = [str(self.root / p) for c in columns for p in _paths(self.table[c]) if p is not None]
        return files, f"COVID-19 Radiography ({self.root})"

    def sample_prompts(self) -> list[str]:
        """The normal prompt, then each abnormal class in its first phrasing (the training sample grids)."""
        return [self.normal_prompt, *(self.bank.phrase(c, choice=0) for c in self.finding_names)]

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        bad = {b.path for b in self.scan()}
        table = self.table
        files = zip(table["path"], _paths(table["lung_mask"]), _paths(table["lesion_mask"]))
        table = table[[not any(p is not None and str(self.root / p) in bad for p in row) for row in files]]
        serve_lesions = bool(table["has_lesion_folder"].any())
        for split in SPLITS:
            part = table[table["split"] == split]
            labels = np.stack([part["class"] == f for f in self.finding_names], axis=1).astype(np.float32)
            self.split_classes[split] = part["class"].tolist()
            train = split == "train"
            self.datasets[split] = XRayDataset(
                self.root,
                part["path"].tolist(),
                labels,
                ClassPrompt(self.bank, part["class"].tolist()),
                build_transform(self.image_size, self.resize, self.augmentations if train else None, seed=self.seed),
                lung_masks=_paths(part["lung_mask"]) if self.lung_masks else None,
                lesion_masks=_paths(part["lesion_mask"]) if serve_lesions else None,
                on_bad_file=self.on_bad_file,
                intensity=self.intensity,
                seed=self.seed,
                random_prompt=self.random_prompt and train,
            )
        missing = int(table["lung_mask"].isna().sum())
        if self.lung_masks and missing:
            log.warning("%d images have no lung mask in masks/: their lung_mask is all zeros", missing)

    def train_weights(self) -> np.ndarray | None:
        """With ``balanced_sampling``, every class carries the same total weight."""
        if not self.balanced_sampling:
            return None
        self.dataset("train")
        classes = pd.Series(self.split_classes["train"])
        return 1.0 / classes.map(classes.value_counts()).to_numpy(dtype=np.float64)
