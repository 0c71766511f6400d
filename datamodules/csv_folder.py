"""Any folder of chest radiographs (PNG, JPEG or DICOM) described by one CSV: ``data=csv``.

The CSV has a path column (relative to ``root``, or absolute), and optionally a report or prompt per image, finding
label columns (1 present, 0 absent, -1 uncertain, blank unknown), a patient column (the split then keeps each
patient's images together) and a split column (``train`` / ``val`` / ``test``, used as given). Without a prompt
column the prompt names the positive findings; without positive findings it is the normal prompt.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from datamodules.chexpert import UNCERTAIN_POLICIES
from datamodules.files import FileDataModule
from datamodules.images import XRayDataset, build_transform

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
#: column names whose meaning is clear: a warning when one is present but not configured
CONVENTIONAL = {
    "prompt": ("report", "prompt", "text", "findings", "impression"),
    "patient": ("patient", "patient_id", "subject_id"),
    "split": ("split",),
}
LAYOUT = """\
<root>/                   <- data.root
  labels.csv              <- data.csv (or an absolute path)
  any/folders/image.png   (PNG, JPEG or DICOM; paths in the CSV relative to root, or absolute)
labels.csv: path[,report][,<finding>...][,patient][,split], e.g.
  path,report,effusion,nodule,patient
  p1/a.png,small left pleural effusion,1,0,p1"""


class LabelPrompt:
    """The positive findings' names (uncertain ones under ``ones`` as "possible ..."), or the normal prompt."""

    def __init__(self, names: Sequence[str], labels: np.ndarray, hedged: np.ndarray, normal: str):
        self.names = [n.replace("_", " ").lower() for n in names]
        self.labels, self.hedged, self.normal = labels, hedged, normal

    def __call__(self, index: int, rng: np.random.Generator) -> str:
        found = [
            f"possible {self.names[k]}" if self.hedged[index, k] else self.names[k]
            for k in np.flatnonzero(self.labels[index])
        ]
        return ", ".join(found) if found else self.normal


class TextPrompt:
    """The CSV's own report or prompt; an empty cell falls back to the labels' prompt."""

    def __init__(self, texts: Sequence[str], fallback: LabelPrompt):
        self.texts, self.fallback = list(texts), fallback

    def __call__(self, index: int, rng: np.random.Generator) -> str:
        return self.texts[index] or self.fallback(index, rng)


class CSVDataModule(FileDataModule):
    """Images and labels from one CSV; train / val / test as its split column says, else drawn from ``seed``."""

    def __init__(
        self,
        root: str | None,
        csv: str = "labels.csv",
        path_column: str = "path",
        prompt_column: str | None = None,
        label_columns: Sequence[str] | None = None,
        patient_column: str | None = None,
        split_column: str | None = None,
        val_fraction: float = 0.05,
        test_fraction: float = 0.1,
        seed: int = 0,
        uncertain: str = "ignore",
        image_size: int = 256,
        resize: str = "stretch",
        augmentations: Sequence[Mapping] | None = None,
        on_bad_file: str = "skip",
        intensity: str = "auto",
        scan: str = "header",
        normal_prompt: str = "no acute cardiopulmonary abnormality",
        batch_size: int = 32,
        num_workers: int = 0,
        eval_batch_size: int | None = None,
    ):
        super().__init__(
            image_size, resize, augmentations, on_bad_file, intensity, scan, batch_size, num_workers, eval_batch_size
        )
        if not root:
            raise ValueError(
                f"data.root is not set (make train ... DATA=csv DATA_ROOT=/path). Expected layout:\n{LAYOUT}"
            )
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset root {self.root} does not exist. Expected layout:\n{LAYOUT}")
        if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
            raise ValueError(f"need 0 <= val_fraction, test_fraction, sum < 1; got {val_fraction}, {test_fraction}")
        if uncertain not in UNCERTAIN_POLICIES:
            raise ValueError(f"uncertain must be one of {UNCERTAIN_POLICIES}, got {uncertain!r}")
        self.csv_path = Path(csv) if Path(csv).is_absolute() else self.root / csv
        self.columns = {"path": path_column, "prompt": prompt_column, "patient": patient_column, "split": split_column}
        self.val_fraction, self.test_fraction, self.seed, self.uncertain = val_fraction, test_fraction, seed, uncertain
        self.normal_prompt = normal_prompt
        self.table = self._read(label_columns)

    # -- the CSV -----------------------------------------------------------------------------------------------------
    def _read(self, label_columns: Sequence[str] | None) -> pd.DataFrame:
        if not self.csv_path.is_file():
            raise FileNotFoundError(f"no CSV at {self.csv_path} (data.csv). Expected layout:\n{LAYOUT}")
        try:
            table = pd.read_csv(self.csv_path, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, UnicodeDecodeError) as err:
            raise ValueError(f"{self.csv_path} is not a readable CSV: {str(err).strip().splitlines()[-1]}") from err
        named = {k: v for k, v in self.columns.items() if v}
        missing = [f"{v} (data.{k}_column)" for k, v in named.items() if v not in table.columns]
        if missing:
            raise ValueError(f"{self.csv_path}: no column {', '.join(missing)}; its columns: {list(table.columns)}")
        others = set(named.values())
        for key, names in CONVENTIONAL.items():  # a column the user likely meant, left unused: say so
            unused = [c for c in table.columns if c.lower() in names and c not in others]
            if not self.columns[key] and unused:
                log.warning(
                    "%s: column %r is not used; set data.%s_column=%s to use it",
                    self.csv_path,
                    unused[0],
                    key,
                    unused[0],
                )
        if label_columns is None:  # every column of label values besides the named ones
            label_columns = [c for c in table.columns if c not in others and _is_label_column(table[c])]
        unknown = [c for c in label_columns if c not in table.columns]
        if unknown:
            raise ValueError(f"{self.csv_path}: no label column(s) {unknown}; its columns: {list(table.columns)}")
        bad = [c for c in label_columns if not _is_label_column(table[c])]
        if bad:
            raise ValueError(f"{self.csv_path}: label column(s) {bad} hold values other than 1, 0, -1 or blank")
        self.finding_names = tuple(label_columns)
        if table.empty:
            raise ValueError(f"{self.csv_path} lists no images")
        table = table.rename(columns={self.columns["path"]: "_path"})
        duplicated = table["_path"].duplicated()
        if duplicated.any():
            raise ValueError(
                f"{self.csv_path}: {int(duplicated.sum())} image path(s) listed twice, e.g. "
                f"{table['_path'][duplicated].iloc[0]!r}: each image needs one row (its id)"
            )
        table["split"] = self._splits(table)
        return table

    def _splits(self, table: pd.DataFrame) -> pd.Series:
        if self.columns["split"]:
            split = table[self.columns["split"]].str.strip().str.lower()
            wrong = sorted(set(split) - set(SPLITS))
            if wrong:
                raise ValueError(f"{self.csv_path}: split column {self.columns['split']!r} holds {wrong}, not {SPLITS}")
            return split
        groups = table["_path"]
        if self.columns["patient"]:  # a row without a patient is its own group, not one big "" patient
            patients = table[self.columns["patient"]].str.strip()
            groups = patients.where(patients != "", "path:" + table["_path"])
        unique = np.array(sorted(set(groups)))  # sorted: the split does not depend on the CSV's row order
        order = np.random.default_rng(self.seed).permutation(len(unique))
        n_val, n_test = round(self.val_fraction * len(unique)), round(self.test_fraction * len(unique))
        assigned = {g: "val" for g in unique[order[:n_val]]}
        assigned.update({g: "test" for g in unique[order[n_val : n_val + n_test]]})
        return groups.map(lambda g: assigned.get(g, "train"))

    # -- scan and datasets -------------------------------------------------------------------------------------------
    def _file(self, path: str) -> Path:
        return Path(path) if Path(path).is_absolute() else self.root / path

    def scan_targets(self) -> tuple[list[str], str]:
        return [str(self._file(p)) for p in self.table["_path"]], f"CSV dataset ({self.csv_path})"

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        bad = {b.path for b in self.scan()}
        table = self.table[[str(self._file(p)) not in bad for p in self.table["_path"]]]
        for split in SPLITS:
            part = table[table["split"] == split]
            labels, mask, hedged = label_arrays(part[list(self.finding_names)], self.uncertain)
            prompt = LabelPrompt(self.finding_names, labels > 0, hedged, self.normal_prompt)
            if self.columns["prompt"]:
                prompt = TextPrompt(part[self.columns["prompt"]].str.strip().tolist(), prompt)
            self.datasets[split] = XRayDataset(
                self.root,
                part["_path"].tolist(),  # ids: as the CSV gives them (root / an absolute path is that path)
                labels,
                prompt,
                build_transform(self.image_size, self.resize, self.augmentations if split == "train" else None),
                label_mask=mask,
                on_bad_file=self.on_bad_file,
                intensity=self.intensity,
                seed=self.seed,
            )

        if stage in (None, "fit"):
            check_fit_splits(self.datasets, f"CSV dataset {self.csv_path} (split_column, val_fraction)")

    def sample_prompts(self) -> list[str]:
        return [self.normal_prompt, *(n.replace("_", " ").lower() for n in self.finding_names)]


def check_fit_splits(datasets: Mapping, what: str) -> None:
    """Training needs images in train and val: without val no checkpoint is ever written (it saves on validation)."""
    empty = [split for split in ("train", "val") if not len(datasets[split])]
    if empty:
        raise ValueError(f"{what}: no readable images in the {' and '.join(empty)} split, which training needs")


def label_arrays(columns: pd.DataFrame, uncertain: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label columns of 1 / 0 / -1 (uncertain) / blank (unknown) -> (labels, label_mask, hedged) under the
    ``uncertain`` policy: ignore (0, masked out of the loss), zeros (0) or ones (1, hedged in the prompt)."""
    values = columns.apply(pd.to_numeric, errors="coerce").to_numpy(np.float32).reshape(len(columns), columns.shape[1])
    doubtful, unknown = values == -1, np.isnan(values)
    labels = np.where(doubtful, float(uncertain == "ones"), np.nan_to_num(values)).astype(np.float32)
    mask = (~unknown & ~(doubtful & (uncertain == "ignore"))).astype(np.float32)
    return labels, mask, doubtful & (uncertain == "ones")


def _is_label_column(column: pd.Series) -> bool:
    values = column.str.strip()
    return bool(len(values)) and values.isin(["1", "0", "-1", "1.0", "0.0", "-1.0", ""]).all() and (values != "").any()
