"""The phantoms as a MIMIC-CXR-JPG tree with free-text reports (datamodules/mimic_phantoms.py), read back."""

from __future__ import annotations

import numpy as np
import pandas as pd

from datamodules.chexpert import FINDINGS as CHEXPERT_FINDINGS
from datamodules.mimic_cxr import MimicCXRDataModule, clean, report_sections
from datamodules.mimic_phantoms import CHEXPERT_COLUMN, NEGATED, NORMAL_IMPRESSION, free_text_report, main
from datamodules.phantoms import FINDINGS, Finding
from datamodules.synthetic import SyntheticCXRDataModule


def test_reports_name_each_finding_at_its_side_and_negate_only_absent_ones():
    rng = np.random.default_rng(0)
    for _ in range(200):
        findings = tuple(
            Finding(k, rng.choice(["left", "right"]), "lower" if k == "effusion" else rng.choice(["upper", "lower"]))
            for k in rng.permutation(FINDINGS)[: rng.integers(0, 3)]
        )
        sections = {k: clean(v) for k, v in report_sections(free_text_report(findings, rng)).items()}
        text = sections["findings"]
        for f in findings:
            assert f.side in text.lower()
            assert f"No {NEGATED[f.kind]}" not in text and f", {NEGATED[f.kind]}" not in text
        assert (sections["impression"] == NORMAL_IMPRESSION) == (not findings)
        assert "pneumothorax" in text and "___" not in text


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
    train = dm.dataset("train")
    for i in range(len(train)):
        sample = train[i]
        split, index = origin[sample["id"].rsplit("/", 1)[1].removesuffix(".jpg")].split("-")
        ph = phantoms.dataset(split).phantom(int(index))
        assert split == "train"
        assert np.abs(sample["image"][0].numpy() * 0.5 + 0.5 - ph.image).mean() < 0.01  # JPEG quality 95
        columns = {CHEXPERT_COLUMN[f.kind] for f in ph.findings}
        assert {n for n, v in zip(CHEXPERT_FINDINGS, sample["label"].tolist(), strict=True) if v} == columns
        assert sample["prompt"].startswith(NORMAL_IMPRESSION) == (not ph.findings)  # the impression comes first
