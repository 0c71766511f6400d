"""Tiny copies of the official COVID-19 Radiography and CheXpert layouts, quirks included (docs/datasets.md).

Images are a few dozen pixels so a whole tree is written in well under a second.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from datamodules.chexpert import HEADER

COVID_COUNTS = {"COVID": 6, "Lung_Opacity": 5, "Normal": 8, "Viral Pneumonia": 4}


def gray(h: int = 30, w: int = 30, seed: int = 0) -> np.ndarray:
    """A uint8 test pattern: a vertical gradient plus noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(20, 230, h)[:, None] + rng.integers(0, 20, (h, w))
    return ramp.clip(0, 255).astype(np.uint8)


def encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def make_covid_tree(base: Path, *, truncated_file: bool = False, sheets: bool = True) -> Path:
    """``base/COVID-19_Radiography_Dataset`` with the official folders; returns the dataset folder.

    Quirks: the space in ``Viral Pneumonia``; images stored as 8-bit grey, RGB, RGBA and 16-bit grey; lung masks at
    another resolution than the images; a macOS ``._`` file; sheet names in another case than the files (NORMAL-1);
    optionally one truncated PNG (``COVID/images/COVID-3.png``).
    """
    root = base / "COVID-19_Radiography_Dataset"
    for cls, count in COVID_COUNTS.items():
        for i in range(1, count + 1):
            name = f"{cls}-{i}.png"
            pixels = gray(seed=i)
            kind = i % 4
            if kind == 1:
                data = encode(np.repeat(pixels[..., None], 3, axis=2))  # grey stored as RGB
            elif kind == 2:
                rgba = np.concatenate([np.repeat(pixels[..., None], 3, 2), np.full((30, 30, 1), 7, np.uint8)], 2)
                data = encode(rgba)  # grey stored as RGBA with an almost transparent alpha
            elif kind == 3:
                data = encode(pixels.astype(np.uint16) * 257)  # 16-bit grey
            else:
                data = encode(pixels)
            if truncated_file and cls == "COVID" and i == 3:
                data = truncated(data)
            write(root / cls / "images" / name, data)
            lung = np.zeros((24, 24), np.uint8)
            lung[4:20, 3:10] = lung[4:20, 14:21] = 255
            write(root / cls / "masks" / name, encode(lung))
        if sheets:
            sheet = pd.DataFrame(
                {
                    "FILE NAME": [f"{cls.upper()}-{i}" for i in range(1, count + 1)],
                    "FORMAT": "PNG",
                    "SIZE": "30*30",
                    "URL": [f"https://example.org/{cls}/{i}" for i in range(1, count + 1)],
                }
            )
            sheet.to_excel(root / f"{cls}.metadata.xlsx", index=False)
    write(root / "COVID" / "images" / "._COVID-1.png", b"\x00\x05\x16\x07 AppleDouble")
    write(root / "README.md.txt", b"COVID-19 Radiography Database")
    return root


def _row(path: str, view: str, ap_pa: str, labels: dict[str, float]) -> dict:
    row = {c: "" for c in HEADER}
    row.update({"Path": path, "Sex": "Female", "Age": 60, "Frontal/Lateral": view, "AP/PA": ap_pa})
    row.update({k: v for k, v in labels.items()})
    return row


# (patient, study, view file, Frontal/Lateral, AP/PA, labels): blanks are "", -1 is uncertain
CHEXPERT_TRAIN = [
    (1, 1, "view1_frontal", "Frontal", "AP", {"No Finding": 1.0}),
    (1, 1, "view2_lateral", "Lateral", "LL", {"No Finding": 1.0}),
    (2, 1, "view1_frontal", "Frontal", "PA", {"Cardiomegaly": 1.0, "Pleural Effusion": -1.0, "Edema": 0.0}),
    (3, 1, "view1_frontal", "Frontal", "AP", {"No Finding": 1.0, "Support Devices": 1.0}),
    (4, 1, "view1_frontal", "Frontal", "AP", {"No Finding": 1.0, "Cardiomegaly": 1.0}),  # label conflict
    (5, 1, "view1_frontal", "Frontal", "PA", {"Atelectasis": -1.0}),  # only an uncertain finding
    (5, 2, "view1_frontal", "Frontal", "AP", {"Lung Opacity": 1.0, "Pneumonia": 1.0, "Support Devices": 1.0}),
    (6, 1, "view1_frontal", "Frontal", "", {"No Finding": 1.0}),  # frontal with an empty AP/PA
    *[(p, 1, "view1_frontal", "Frontal", "PA" if p % 2 else "AP", {"No Finding": 1.0}) for p in range(7, 21)],
    *[(p, 1, "view2_lateral", "Lateral", "LL", {"Edema": 1.0}) for p in range(7, 11)],
]
CHEXPERT_VALID = [
    (64541, 1, "view1_frontal", "Frontal", "AP", {"No Finding": 0.0, "Edema": 1.0, "Cardiomegaly": 0.0}),
    (64542, 1, "view1_frontal", "Frontal", "PA", {"No Finding": 1.0, "Edema": 0.0}),
    (64542, 1, "view2_lateral", "Lateral", "LL", {"No Finding": 1.0, "Edema": 0.0}),
]


def make_chexpert_tree(base: Path, folder: str = "CheXpert-v1.0-small", *, truncated_file: bool = False) -> Path:
    """``base/<folder>`` with train.csv, valid.csv (exact header, Path prefixed by ``folder``) and the JPEGs.

    With ``truncated_file`` the image of patient 2 is cut in half.
    """
    root = base / folder
    for split, entries in (("train", CHEXPERT_TRAIN), ("valid", CHEXPERT_VALID)):
        rows = []
        for patient, study, view_file, view, ap_pa, labels in entries:
            rel = f"{split}/patient{patient:05d}/study{study}/{view_file}.jpg"
            data = encode(gray(36, 30, seed=patient), "JPEG")
            write(root / rel, truncated(data) if truncated_file and patient == 2 else data)
            rows.append(_row(f"{folder}/{rel}", view, ap_pa, labels))
        pd.DataFrame(rows, columns=list(HEADER)).to_csv(root / f"{split}.csv", index=False)
    return root


#: (path, report, effusion, nodule, patient, split) rows of the CSV tree: a report left empty, an uncertain label, a
#: blank (unknown) label, a patient with two images
CSV_ROWS = (
    ("p1/a.png", "small left pleural effusion", "1", "0", "p1", "train"),
    ("p1/b.png", "", "0", "1", "p1", "train"),
    ("p2/a.png", "no acute cardiopulmonary abnormality", "0", "0", "p2", "train"),
    ("p3/a.png", "possible nodule", "0", "-1", "p3", "val"),
    ("p4/a.png", "effusion", "1", "", "p4", "test"),
    ("p5/a.png", "", "0", "0", "p5", "test"),
)


def make_csv_tree(base: Path) -> Path:
    """``base/csv_dataset`` with the PNGs of ``CSV_ROWS`` and ``labels.csv`` (columns path, report, effusion, nodule,
    patient, split)."""
    root = base / "csv_dataset"
    for i, row in enumerate(CSV_ROWS):
        write(root / row[0], encode(gray(24, 20, seed=i)))
    columns = ["path", "report", "effusion", "nodule", "patient", "split"]
    pd.DataFrame(CSV_ROWS, columns=columns).to_csv(root / "labels.csv", index=False)
    return root


#: (subject, study, dicom_id, view, split, report, Pleural Effusion label) of the MIMIC tree; study 53 has no report
MIMIC_ROWS = (
    (
        "10000032",
        "50000001",
        "a1",
        "PA",
        "train",
        "FINDINGS: Small left ___ effusion.\nIMPRESSION: Left effusion.",
        "1",
    ),
    ("10000032", "50000001", "a2", "LATERAL", "train", None, "1"),  # the same study: its report is a1's
    ("10000032", "50000002", "b1", "AP", "train", "INDICATION: ___ cough.\nIMPRESSION: No acute process.", "0"),
    ("11000001", "51000001", "c1", "PA", "validate", "FINDINGS: Possible effusion.\nIMPRESSION: ___", "-1"),
    ("12000001", "53000001", "d1", "AP", "test", None, ""),
)


def make_mimic_tree(base: Path) -> tuple[Path, Path]:
    """``base/mimic-cxr-jpg`` (files/, metadata, split (gzipped), chexpert CSVs) and ``base/mimic-cxr-reports``."""
    root, reports = base / "mimic-cxr-jpg", base / "mimic-cxr-reports"
    from datamodules.chexpert import FINDINGS

    metadata, split, labels = [], [], {}
    for i, (subject, study, dicom, view, part, report, effusion) in enumerate(MIMIC_ROWS):
        folder = f"files/p{subject[:2]}/p{subject}/s{study}"
        write(root / folder / f"{dicom}.jpg", encode(gray(24, 20, seed=i), "JPEG"))
        if report is not None:
            write(reports / f"{folder}.txt", f"                                 FINAL REPORT\n {report}\n".encode())
        metadata.append({"dicom_id": dicom, "subject_id": subject, "study_id": study, "ViewPosition": view})
        split.append({"dicom_id": dicom, "study_id": study, "subject_id": subject, "split": part})
        labels[(subject, study)] = {"subject_id": subject, "study_id": study, "No Finding": ""}
        labels[(subject, study)].update({f: ("" if f != "Pleural Effusion" else effusion) for f in FINDINGS})
    pd.DataFrame(metadata).to_csv(root / "mimic-cxr-2.0.0-metadata.csv", index=False)
    pd.DataFrame(split).to_csv(root / "mimic-cxr-2.0.0-split.csv.gz", index=False)
    pd.DataFrame(list(labels.values())).to_csv(root / "mimic-cxr-2.0.0-chexpert.csv", index=False)
    return root, reports
