"""The phantoms as a MIMIC-CXR-JPG tree with free-text reports (datamodules/mimic_phantoms.py), read back."""

from __future__ import annotations

import numpy as np
import pandas as pd

from datamodules.chexpert import FINDINGS as CHEXPERT_FINDINGS
from datamodules.mimic_cxr import MimicCXRDataModule, clean, report_sections
from datamodules.mimic_phantoms import CHEXPERT_COLUMN, NEGATED, NORMAL_IMPRESSION, free_text_report, main
from datamodules.phantoms import FINDINGS, Finding
from datamodules.synthetic import SyntheticCXRDataModule
from datamodules.zones import LEVELS

#: words that name a finding in a sentence (present or negated)
TERMS = {
    "nodule": ("nodul",),
    "ground_glass": ("ground-glass", "haz"),
    "consolidation": ("consolidation", "pneumonia"),
    "effusion": ("effusion",),
}


def check_report(text: str, findings) -> None:
    """Each finding named with its side, in FINDINGS and IMPRESSION; no negation names a finding that is there."""
    sections = {k: clean(v) for k, v in report_sections(text).items()}
    sentences = [s.strip().lower() for s in sections["findings"].split(".") if s.strip()]
    negations = [s for s in sentences if s.startswith(("no ", "there is no "))]
    for f in findings:
        named = [s for s in sentences if s not in negations and any(t in s for t in TERMS[f.kind])]
        assert any(f.side in s for s in named), (f, text)
        assert f.side in sections["impression"].lower()
        assert not any(t in s for s in negations for t in TERMS[f.kind]), (f, text)
        assert NEGATED[f.kind] not in " ".join(negations)
    assert (sections["impression"] == NORMAL_IMPRESSION) == (not findings)
    assert any("pneumothorax" in s for s in negations) and "___" not in sections["findings"]


def test_reports_name_each_finding_at_its_side_and_negate_only_absent_ones():
    rng = np.random.default_rng(0)
    for _ in range(300):
        findings = tuple(
            Finding(k, str(rng.choice(["left", "right"])), "lower" if k == "effusion" else str(rng.choice(LEVELS)))
            for k in rng.choice(FINDINGS, size=rng.integers(0, 3))  # two of a kind too
        )
        check_report(free_text_report(findings, rng), findings)


def test_wording_varies_for_the_same_findings():
    findings = (Finding("nodule", "left", "lower"),)
    reports = {
        clean(report_sections(free_text_report(findings, np.random.default_rng(s)))["findings"]) for s in range(50)
    }
    assert len(reports) > 25


def test_the_tree_reads_through_data_mimic_cxr_as_the_same_phantoms(tmp_path):
    assert main(["--out", str(tmp_path), "--image-size", "32", "--num-train", "8", "--num-val", "2", "--num-test", "3"])
    dm = MimicCXRDataModule(str(tmp_path), image_size=32, max_prompt_tokens=None, num_workers=0)
    dm.setup()
    assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [8, 2, 3]
    phantoms = SyntheticCXRDataModule(image_size=32, num_train=8, num_val=2, num_test=3)
    phantoms.setup()
    origin = dict(pd.read_csv(tmp_path / "phantoms.csv").itertuples(index=False))
    for split in ("train", "val", "test"):
        ds = dm.dataset(split)
        for i in range(len(ds)):
            sample = ds[i]
            phantom_split, index = origin[sample["id"].rsplit("/", 1)[1].removesuffix(".jpg")].split("-")
            ph = phantoms.dataset(split).phantom(int(index))
            assert phantom_split == split
            check_report((tmp_path / f"{sample['id'].rsplit('/', 1)[0]}.txt").read_text(), ph.findings)
            assert np.abs(sample["image"][0].numpy() * 0.5 + 0.5 - ph.image).mean() < 0.01  # JPEG quality 95
            columns = {CHEXPERT_COLUMN[f.kind] for f in ph.findings}
            assert {n for n, v in zip(CHEXPERT_FINDINGS, sample["label"].tolist(), strict=True) if v} == columns
            assert sample["prompt"].startswith(NORMAL_IMPRESSION) == (not ph.findings)  # the impression comes first
