"""The synthetic phantoms written as a MIMIC-CXR-JPG tree with free-text reports: free-text training, tested.

Each split of ``data=synthetic`` (same seed, so the same phantoms as the template-prompt model sees) becomes one
frontal study per phantom: ``files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg`` (8-bit, JPEG quality 95 as MIMIC-CXR-JPG),
the report ``files/pXX/pXXXXXXXX/sXXXXXXXX.txt``, and the official metadata, split and CheXpert-labeller CSVs (.gz).
The report is written from the phantom's findings in a radiologist's free text, not the template bank's wording:
each finding in a sentence with its place in words ("left lung base", "right mid lung"), findings absent negated
("No pleural effusion or pneumothorax."), the heart described, ``___`` placeholders, then an IMPRESSION; a normal
study's impression is MIMIC-CXR's "No acute cardiopulmonary process.". ``phantoms.csv`` maps each image to the
phantom it shows (``data=synthetic`` scores it against its lesion mask).

    python -m datamodules.mimic_phantoms --out data/phantoms_mimic --image-size 64
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from datamodules.chexpert import FINDINGS as CHEXPERT_FINDINGS
from datamodules.mimic_cxr import CSVS, study_folder
from datamodules.phantoms import Finding
from datamodules.synthetic import SPLITS, SyntheticCXRDataModule

#: the official split names of each of our splits
OFFICIAL_SPLIT = {"train": "train", "val": "validate", "test": "test"}
#: the CheXpert-labeller column a finding is reported under
CHEXPERT_COLUMN = {
    "nodule": "Lung Lesion",
    "ground_glass": "Lung Opacity",
    "consolidation": "Consolidation",
    "effusion": "Pleural Effusion",
}
#: first digits of the subject ids per split: the official tree's p10..p19 folders
SUBJECT_BASE = {"train": 10_000_000, "val": 18_000_000, "test": 19_000_000}

PLACES = {
    "upper": ("{side} upper zone", "{side} upper lung", "{side} apex"),
    "middle": ("{side} mid lung", "{side} mid zone", "{side} perihilar region"),
    "lower": ("{side} lower zone", "{side} lung base", "{side} lower lung"),
}
SENTENCES = {
    "nodule": (
        "There is a {size} nodular opacity in the {place}.",
        "A {size} well-circumscribed nodule projects over the {place}.",
        "Rounded density in the {place}, likely a pulmonary nodule.",
        "{Place} nodule measuring approximately {mm} mm.",
    ),
    "ground_glass": (
        "Hazy ground-glass opacity in the {place}.",
        "There is faint ground-glass opacification of the {place}, vessels still seen through it.",
        "Ill-defined hazy opacity at the {place}, possibly early infection.",
        "Subtle increased haziness is noted in the {place}.",
    ),
    "consolidation": (
        "Dense consolidation in the {place}, concerning for pneumonia.",
        "There is focal airspace consolidation involving the {place}.",
        "Confluent opacity in the {place} compatible with pneumonia.",
        "New {place} airspace opacity, consistent with consolidation.",
    ),
    "effusion": (
        "There is a small {side} pleural effusion.",
        "Blunting of the {side} costophrenic angle reflects a small effusion.",
        "Small {side} pleural effusion is present.",
        "A {side}-sided pleural effusion layers at the base.",
    ),
}
IMPRESSIONS = {
    "nodule": ("{Place} nodule; CT recommended.", "Pulmonary nodule, {place}."),
    "ground_glass": ("{Place} ground-glass opacity.", "Hazy {place} opacity, possibly infection."),
    "consolidation": ("{Place} pneumonia.", "Consolidation in the {place}."),
    "effusion": ("Small {side} pleural effusion.", "{Side} effusion."),
}
#: what a finding's negation calls it ("No pleural effusion.")
NEGATED = {
    "nodule": "suspicious pulmonary nodule",
    "ground_glass": "ground-glass opacity",
    "consolidation": "focal consolidation",
    "effusion": "pleural effusion",
}
CLEAR = ("The lungs are clear.", "Lungs are well expanded and clear.", "No focal airspace disease.")
HEART = (
    "Heart size is normal.",
    "The cardiomediastinal silhouette is within normal limits.",
    "Cardiac and mediastinal contours are normal.",
    "",
)
NORMAL_IMPRESSION = "No acute cardiopulmonary process."
HEADER = (
    "                                 FINAL REPORT\n"
    " EXAMINATION:  CHEST (PA AND LAT)\n\n"
    " INDICATION:  ___ year old {who} with {why}.\n\n"
    " COMPARISON:  {comparison}\n\n"
)
WHO = ("woman", "man", "F", "M")
WHY = ("cough", "fever and cough", "shortness of breath", "chest pain", "hypoxia", "? pneumonia")
COMPARISON = ("None.", "Chest radiograph ___.", "___.")


def _pick(options: Sequence[str], rng: np.random.Generator) -> str:
    return options[int(rng.integers(len(options)))]


def _negations(absent: list[str], rng: np.random.Generator) -> list[str]:
    """Some of the absent findings negated, in one list sentence or one sentence each, pneumothorax always."""
    named = [NEGATED[k] for k in absent if rng.random() < 0.7] + ["pneumothorax"]
    if rng.random() < 0.5:
        listed = named[0] if len(named) == 1 else f"{', '.join(named[:-1])} or {named[-1]}"
        return [f"{_pick(('No', 'There is no'), rng)} {listed}."]
    return [f"No {name}." for name in named]


def free_text_report(findings: Sequence[Finding], rng: np.random.Generator) -> str:
    """A MIMIC-CXR-style report of a phantom's findings, its wording, order and negations drawn from ``rng``."""
    sentences, impressions = [], []
    for f in findings:
        place = _pick(PLACES[f.zone], rng).format(side=f.side)
        fill = {"place": place, "Place": place[0].upper() + place[1:], "side": f.side, "Side": f.side.capitalize()}
        fill |= {"size": _pick(("small", "tiny", "subcentimeter"), rng), "mm": int(rng.integers(6, 15))}
        sentences.append(_pick(SENTENCES[f.kind], rng).format(**fill))
        impressions.append(_pick(IMPRESSIONS[f.kind], rng).format(**fill))
    present = {f.kind for f in findings}
    body = (sentences or [_pick(CLEAR, rng)]) + _negations([k for k in SENTENCES if k not in present], rng)
    body.append(_pick(HEART, rng))
    header = HEADER.format(who=_pick(WHO, rng), why=_pick(WHY, rng), comparison=_pick(COMPARISON, rng))
    findings_text = " ".join(s for s in body if s)
    return f"{header} FINDINGS:  {findings_text}\n\n IMPRESSION:  {' '.join(impressions) or NORMAL_IMPRESSION}\n"


def chexpert_labels(findings: Sequence[Finding]) -> dict[str, str]:
    """The labeller's row: 1.0 where a finding is, 0.0 for the ones the report may negate, "No Finding" if none."""
    row = {name: "" for name in CHEXPERT_FINDINGS}
    for kind, column in CHEXPERT_COLUMN.items():
        row[column] = "1.0" if any(f.kind == kind for f in findings) else "0.0"
    return {"No Finding": "" if findings else "1.0", **row}


def dicom_id(sample_id: str) -> str:
    """A MIMIC-looking image id (five groups of eight hex digits), fixed by the phantom's id."""
    digest = hashlib.sha1(sample_id.encode()).hexdigest()
    return "-".join(digest[k : k + 8] for k in range(0, 40, 8))


def write_mimic_layout(dm: SyntheticCXRDataModule, root: str | Path, report_seed: int = 1) -> dict[str, int]:
    """Every split of ``dm`` under ``root`` as MIMIC-CXR-JPG with its reports; returns the studies per split."""
    root = Path(root)
    dm.setup()
    metadata, split_rows, labels, origin = [], [], [], []
    for split in SPLITS:
        ds = dm.dataset(split)
        for i in range(len(ds)):
            ph = ds.phantom(i)
            subject, study = str(SUBJECT_BASE[split] + i), str(50_000_000 + SPLITS.index(split) * 1_000_000 + i)
            folder, image_id = study_folder(subject, study), dicom_id(ds.sample_id(i))
            (root / folder).mkdir(parents=True, exist_ok=True)
            pixels = np.round(np.clip(ph.image, 0, 1) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / folder / f"{image_id}.jpg", quality=95)
            rng = np.random.default_rng([dm.seed, SPLITS.index(split), i, report_seed])
            (root / f"{folder}.txt").write_text(free_text_report(ph.findings, rng))
            ids = {"subject_id": subject, "study_id": study}
            metadata.append({"dicom_id": image_id, **ids, "ViewPosition": "PA", "Rows": ds.image_size,
                             "Columns": ds.image_size})  # fmt: skip
            split_rows.append({"dicom_id": image_id, **ids, "split": OFFICIAL_SPLIT[split]})
            labels.append({**ids, **chexpert_labels(ph.findings)})
            origin.append({"dicom_id": image_id, "phantom": ds.sample_id(i)})
    for kind, rows in (("metadata", metadata), ("split", split_rows), ("labels", labels)):
        pd.DataFrame(rows).to_csv(root / f"{CSVS[kind]}.gz", index=False)
    pd.DataFrame(origin).to_csv(root / "phantoms.csv", index=False)
    counts = {split: sum(r["split"] == OFFICIAL_SPLIT[split] for r in split_rows) for split in SPLITS}
    (root / "README.md.txt").write_text(
        "Synthetic chest X-ray phantoms written by VALD (datamodules/mimic_phantoms.py) in the layout of\n"
        "MIMIC-CXR-JPG, with generated free-text reports beside the images. Nothing here comes from a patient.\n\n"
        f"seed: {dm.seed}, image size: {dm.image_size}, studies per split: {json.dumps(counts)}\n"
        "phantoms.csv names the data=synthetic phantom (split-index) each image shows.\n"
    )
    return counts


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    from configs import compose

    data = compose("train", ["data=synthetic"]).data  # the phantoms `make train` / `make demo` train on
    parser = argparse.ArgumentParser(description="Write the phantoms as a MIMIC-CXR-JPG tree with free-text reports.")
    parser.add_argument("--out", required=True, help="dataset root to write (images and reports)")
    parser.add_argument("--image-size", type=int, default=data.image_size)
    for split in SPLITS:
        parser.add_argument(f"--num-{split}", type=int, default=data[f"num_{split}"], help=f"{split} phantoms")
    parser.add_argument("--seed", type=int, default=data.seed, help="the phantoms' seed (data.seed)")
    args = parser.parse_args(argv)
    dm = SyntheticCXRDataModule(
        image_size=args.image_size, num_train=args.num_train, num_val=args.num_val, num_test=args.num_test,
        seed=args.seed, p_healthy=data.p_healthy, p_second=data.p_second,
    )  # fmt: skip
    counts = write_mimic_layout(dm, args.out)
    print(json.dumps(counts))
    return counts


if __name__ == "__main__":
    main()
