"""CheXpert (``CheXpert-v1.0-small`` or full-resolution ``CheXpert-v1.0``) from its ``train.csv`` / ``valid.csv``.

Labels: the 13 findings (``finding_names``; "No Finding" is not one). CSV values are 1 positive, 0 negative, -1
uncertain, blank not mentioned (= negative). The uncertainty policy decides the rest:
    ignore  uncertain -> 0 with ``label_mask`` 0, so a loss can skip it; never mentioned in the prompt
    zeros   uncertain -> 0 (negative)
    ones    uncertain -> 1 (positive), mentioned in the prompt with hedging ("possible pleural effusion")
``label_mask`` (B, 13) is always served (all ones except for ignored entries).

"No Finding" rule: labels and prompts come from the 13 finding columns only, so a "No Finding" row gets the zero
label and a normal phrasing. If a row has No Finding = 1 *and* a positive finding, the finding wins. The official
labeler sets No Finding = 1 beside Support Devices = 1 (devices are not a pathology); that study gets the device
label and the prompt "<device phrase>; <normal phrase>". A positive pathology beside No Finding = 1 is a label
conflict: the pathology wins and ``setup`` logs how many rows had one. A study whose only findings are uncertain
under ``ignore`` gets no normal phrasing (it is not known to be normal): its prompt is empty (the unconditional
prompt), or the device phrase alone.

Splits are by patient (``patientNNNNN`` in the path): ``valid.csv`` is the test split (or the val split, with
``valid_csv_as: val``) and ``holdout_fraction`` of train.csv's patients, drawn from the seed over all of train.csv
(so view filters do not move patients), form the other one.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import yaml

from datamodules.files import FileDataModule
from datamodules.images import XRayDataset, build_transform
from datamodules.prompts import PROMPT_DIR, PromptBank, compose_report, placeholders

log = logging.getLogger(__name__)

FINDINGS = (
    "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation",
    "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices",
)  # fmt: skip
HEADER = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", *FINDINGS)
NON_PATHOLOGY = ("Support Devices",)
UNCERTAIN_POLICIES = ("ignore", "zeros", "ones")
VIEWS = ("AP", "PA", "LL", "RL")
FOLDERS = ("CheXpert-v1.0-small", "CheXpert-v1.0")
SPLIT_DIRS = ("train", "valid", "test")
LAYOUT = f"""\
CheXpert-v1.0-small/      <- data.root (or CheXpert-v1.0/, or the folder that contains either)
  train.csv  valid.csv
  train/patient00001/study1/view1_frontal.jpg
  valid/patient64541/study1/view1_frontal.jpg
with the CSV header
  {",".join(HEADER)}"""
_PATIENT = re.compile(r"(patient\d+)")


def relative_path(csv_path: str) -> str:
    """``CheXpert-v1.0-small/train/...`` or ``CheXpert-v1.0/train/...`` -> ``train/...`` (relative to the root)."""
    parts = PurePosixPath(csv_path.strip().replace("\\", "/")).parts
    return "/".join(parts[1:] if parts and parts[0] not in SPLIT_DIRS else parts)


def read_csv(path: Path) -> pd.DataFrame:
    """One of the official CSVs, checked: every header column, label values in {1, 0, -1, blank}, patient ids."""
    df = pd.read_csv(path, dtype={"Path": str, "Frontal/Lateral": str, "AP/PA": str})
    missing = [c for c in HEADER if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}. Expected layout:\n{LAYOUT}")
    values = df[["No Finding", *FINDINGS]].apply(pd.to_numeric, errors="coerce")
    invalid = ~(values.isin([1.0, 0.0, -1.0]) | df[["No Finding", *FINDINGS]].isna())
    if invalid.any().any():
        row, column = np.argwhere(invalid.to_numpy())[0]
        raise ValueError(
            f"{path}: {int(invalid.to_numpy().sum())} label(s) not 1, 0, -1 or blank, e.g. row {row + 2} "
            f"{invalid.columns[column]!r} = {df.iloc[row][invalid.columns[column]]!r}"
        )
    df[["No Finding", *FINDINGS]] = values
    df["path"] = df["Path"].map(relative_path)
    df["patient"] = df["path"].str.extract(_PATIENT, expand=False)
    if df["patient"].isna().any():
        bad = df.loc[df["patient"].isna(), "Path"].head(3).tolist()
        raise ValueError(f"{path}: no patientNNNNN in Path, e.g. {bad}")
    return df


def holdout_patients(patients: Sequence[str], fraction: float, seed: int) -> set[str]:
    """A seeded ``fraction`` of the distinct patients (sorted first, so row order does not matter)."""
    unique = np.array(sorted(set(patients)))
    order = np.random.default_rng(seed).permutation(len(unique))
    return set(unique[order[: round(fraction * len(unique))]].tolist())


def load_hedges(bank: str | os.PathLike) -> tuple[str, ...]:
    """The bank's ``hedges``: templates with one ``{}`` that wrap an uncertain finding's phrase (U-Ones prompts)."""
    path = Path(bank) if Path(bank).suffix in (".yaml", ".yml") else PROMPT_DIR / f"{bank}.yaml"
    hedges = tuple((yaml.safe_load(path.read_text()) or {}).get("hedges") or ())
    if not hedges or any(placeholders(h) or h.count("{}") != 1 for h in hedges):
        raise ValueError(f"{path}: 'hedges' must list templates with exactly one '{{}}', e.g. 'possible {{}}'")
    return hedges


class FindingsPrompt:
    """The study's positive findings in bank phrasings (see the module docstring for the rules); picklable."""

    def __init__(
        self, bank: PromptBank, hedges: Sequence[str], positive: np.ndarray, hedged: np.ndarray, unknown: np.ndarray
    ):
        self.bank, self.hedges = bank, list(hedges)
        self.positive, self.hedged, self.unknown = positive, hedged, unknown
        self.pathology = np.array([f not in NON_PATHOLOGY for f in FINDINGS])

    def __call__(self, index: int, rng: np.random.Generator) -> str:
        parts = []
        for k in np.flatnonzero(self.positive[index]):
            phrase = self.bank.phrase(FINDINGS[k], rng)
            if self.hedged[index, k]:
                phrase = self.hedges[int(rng.integers(len(self.hedges)))].format(phrase)
            parts.append(phrase)
        if not (self.positive[index] & self.pathology).any() and not self.unknown[index]:
            parts.append(self.bank.normal_phrase(rng))
        return compose_report(parts)


class CheXpertDataModule(FileDataModule):
    """Frontal CheXpert studies by default; ``scan`` (header check by default) runs in ``setup`` before fit."""

    finding_names = FINDINGS

    def __init__(
        self,
        root: str | None,
        image_size: int = 256,
        uncertain: str = "ignore",
        frontal_only: bool = True,
        ap_pa: Sequence[str] | None = None,
        valid_csv_as: str = "test",
        holdout_fraction: float = 0.05,
        seed: int = 0,
        resize: str = "letterbox",
        augmentations: Sequence[Mapping] | None = None,
        on_bad_file: str = "skip",
        intensity: str = "auto",
        scan: str = "header",
        prompt_bank: str = "chexpert",
        target_prompt: str | None = None,
        random_prompt: bool = False,
        batch_size: int = 32,
        num_workers: int = 0,
        eval_batch_size: int | None = None,
    ):
        super().__init__(
            image_size, resize, augmentations, on_bad_file, intensity, scan, batch_size, num_workers, eval_batch_size
        )
        if uncertain not in UNCERTAIN_POLICIES:
            raise ValueError(f"uncertain must be one of {UNCERTAIN_POLICIES}, got {uncertain!r}")
        if ap_pa is not None and not set(ap_pa) <= set(VIEWS):
            raise ValueError(f"ap_pa must be a list of {VIEWS} or null, got {list(ap_pa)}")
        if valid_csv_as not in ("test", "val"):
            raise ValueError(f"valid_csv_as must be 'test' or 'val', got {valid_csv_as!r}")
        if not 0 <= holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
        self.root = self.resolve_root(root)
        self.uncertain, self.frontal_only, self.ap_pa = uncertain, frontal_only, list(ap_pa) if ap_pa else None
        self.valid_csv_as, self.holdout_fraction, self.seed = valid_csv_as, holdout_fraction, seed
        self.random_prompt = random_prompt
        self.bank, self.hedges = PromptBank.load(prompt_bank), load_hedges(prompt_bank)
        unphrased = [f for f in FINDINGS if f not in self.bank.findings]
        if unphrased:
            raise ValueError(f"prompt bank {prompt_bank!r} has no phrasings for {unphrased}")
        self.normal_prompt = target_prompt or self.bank.target
        self._table: pd.DataFrame | None = None

    @staticmethod
    def resolve_root(root: str | os.PathLike | None) -> Path:
        """The folder holding train.csv and valid.csv: ``root`` or its ``CheXpert-v1.0[-small]`` child."""
        if not root:
            raise ValueError(f"data.root is not set (make train ... DATA_ROOT=/path). Expected layout:\n{LAYOUT}")
        path = Path(root).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"dataset root {path} does not exist. Expected layout:\n{LAYOUT}")
        for candidate in (path, *(path / f for f in FOLDERS)):
            if (candidate / "train.csv").is_file() and (candidate / "valid.csv").is_file():
                return candidate
        found = sorted(os.listdir(path))[:20]
        raise FileNotFoundError(f"{path} holds no train.csv and valid.csv (found {found}). Expected layout:\n{LAYOUT}")

    @property
    def table(self) -> pd.DataFrame:
        """Selected rows of both CSVs (before the scan) with ``path`` (relative to the root), ``patient``, ``split``."""
        if self._table is None:
            train, valid = read_csv(self.root / "train.csv"), read_csv(self.root / "valid.csv")
            shared = set(train["patient"]) & set(valid["patient"])
            if shared:
                log.warning("%d patients of valid.csv are also in train.csv: their train rows are dropped", len(shared))
                train = train[~train["patient"].isin(shared)]
            carved = "val" if self.valid_csv_as == "test" else "test"
            held = holdout_patients(train["patient"], self.holdout_fraction, self.seed)
            train["split"] = np.where(train["patient"].isin(held), carved, "train")
            valid["split"] = self.valid_csv_as
            table = pd.concat([train, valid], ignore_index=True)
            if self.frontal_only:
                table = table[table["Frontal/Lateral"] == "Frontal"]
            if self.ap_pa:
                table = table[table["AP/PA"].isin(self.ap_pa)]
            if not (table["split"] == "train").any():
                raise ValueError(f"no training images left with frontal_only={self.frontal_only}, ap_pa={self.ap_pa}")
            self._table = table.reset_index(drop=True)
        return self._table

    def scan_targets(self) -> tuple[list[str], str]:
        return [str(self.root / p) for p in self.table["path"]], f"CheXpert ({self.root})"

    def _labels(self, table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """positive (N, K) bool after the policy, hedged (N, K) bool, label_mask (N, K) float."""
        raw = table[list(FINDINGS)].to_numpy(np.float32)
        uncertain = raw == -1
        positive = (raw == 1) | (uncertain if self.uncertain == "ones" else False)
        hedged = uncertain if self.uncertain == "ones" else np.zeros_like(uncertain)
        label_mask = (~uncertain if self.uncertain == "ignore" else np.ones_like(uncertain)).astype(np.float32)
        return positive, hedged, label_mask

    def sample_prompts(self) -> list[str]:
        """The normal prompt, then each finding in its first phrasing (the training sample grids)."""
        return [self.normal_prompt, *(self.bank.phrase(f, choice=0) for f in FINDINGS)]

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        bad = {b.path for b in self.scan()}
        table = self.table[[str(self.root / p) not in bad for p in self.table["path"]]]
        positive, hedged, label_mask = self._labels(table)
        pathology = positive[:, [f not in NON_PATHOLOGY for f in FINDINGS]].any(axis=1)
        conflicts = int(((table["No Finding"] == 1).to_numpy() & pathology).sum())
        if conflicts:
            log.warning("%d rows have No Finding = 1 and a positive pathology: the pathology wins", conflicts)
        unknown = (label_mask == 0).any(axis=1)
        for split in ("train", "val", "test"):
            rows = (table["split"] == split).to_numpy()
            train = split == "train"
            self.datasets[split] = XRayDataset(
                self.root,
                table.loc[rows, "path"].tolist(),
                positive[rows].astype(np.float32),
                FindingsPrompt(self.bank, self.hedges, positive[rows], hedged[rows], unknown[rows]),
                build_transform(self.image_size, self.resize, self.augmentations if train else None, seed=self.seed),
                label_mask=label_mask[rows],
                on_bad_file=self.on_bad_file,
                intensity=self.intensity,
                seed=self.seed,
                random_prompt=self.random_prompt and train,
            )
