"""`data=mimic_cxr` (datamodules/mimic_cxr.py) on a miniature MIMIC-CXR-JPG tree with free-text reports."""

from __future__ import annotations

import logging

import pytest
import torch

from datamodules.chexpert import FINDINGS
from datamodules.mimic_cxr import MimicCXRDataModule, clean, report_sections
from tests.fixtures_real_data import make_mimic_tree

EFFUSION = FINDINGS.index("Pleural Effusion")


@pytest.fixture
def tree(tmp_path):
    return make_mimic_tree(tmp_path)


def _dm(tree, **kwargs) -> MimicCXRDataModule:
    root, reports = tree
    return MimicCXRDataModule(str(root), reports_root=str(reports), image_size=16, num_workers=0, **kwargs)


def test_sections_are_parsed_and_placeholders_cleaned():
    text = "FINAL REPORT\n EXAMINATION: Chest.\n FINDINGS: Small ___ effusion.\n\n IMPRESSION:  Effusion,   left."
    sections = report_sections(text)
    assert clean(sections["findings"]) == "Small effusion." and clean(sections["impression"]) == "Effusion, left."
    assert "examination" in sections and "final report" not in sections


def test_frontal_images_the_official_split_and_report_prompts(tree, caplog):
    with caplog.at_level(logging.WARNING):
        dm = _dm(tree)
    assert "1 of 4 studies have no report" in caplog.text
    assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [2, 1, 1]  # the lateral view left out
    train = dm.dataset("train")
    by_id = {train.ids[i]: train[i] for i in range(len(train))}
    first = by_id["files/p10/p10000032/s50000001/a1.jpg"]
    assert first["prompt"] == "Left effusion. Small left effusion."  # IMPRESSION then FINDINGS, no ___
    assert first["image"].shape == (1, 16, 16) and first["label"][EFFUSION] == 1
    assert by_id["files/p10/p10000032/s50000002/b1.jpg"]["prompt"] == "No acute process."
    val = dm.dataset("val")[0]  # uncertain effusion, ignored: 0 and masked out
    assert val["label"][EFFUSION] == 0 and val["label_mask"][EFFUSION] == 0 and val["prompt"] == "Possible effusion."
    test = dm.dataset("test")[0]  # no report, no positive label: the normal prompt
    assert test["prompt"] == "no acute cardiopulmonary process" and torch.all(test["label_mask"] == 0)


def test_impression_only_and_every_view(tree):
    dm = _dm(tree, sections=["impression"], views=None)
    assert len(dm.dataset("train")) == 3
    assert dm.dataset("train")[0]["prompt"] == "Left effusion."


def test_long_reports_are_cut_at_a_word_to_the_token_limit_and_counted(tree, caplog):
    from transformers import AutoTokenizer

    from lightning_modules.prompt_encoder import resolve_model_path

    whole = _dm(tree, max_prompt_tokens=None).table.drop_duplicates("study_id")["report"].tolist()
    with caplog.at_level(logging.WARNING):
        dm = _dm(tree, max_prompt_tokens=5)  # [CLS] and [SEP] included: 3 of text
    cut = dm.table.drop_duplicates("study_id")["report"].tolist()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(dm.tokenizer))
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    long = [count(text) > 3 for text in whole]
    assert dm.truncated == sum(long) > 0 and f"{sum(long)} of 4 report prompts cut to 5 tokens" in caplog.text
    for before, after, was_long in zip(whole, cut, long, strict=True):
        assert count(after) <= 3 and (after == before) != was_long
        assert before.startswith(after) and before[len(after) : len(after) + 1] in (" ", ".", "")  # a whole word


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda root: (root / "mimic-cxr-2.0.0-chexpert.csv").unlink(), "no mimic-cxr-2.0.0-chexpert.csv"),
        (
            lambda root: (root / "mimic-cxr-2.0.0-metadata.csv").write_text("dicom_id,study_id\na1,1\n"),
            "missing column\\(s\\) \\['subject_id', 'ViewPosition'\\]",
        ),
    ],
)
def test_a_wrong_tree_is_one_line_with_the_layout(tree, change, message):
    change(tree[0])
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        _dm(tree)


def test_a_token_limit_with_no_room_for_text_is_refused(tree):
    with pytest.raises(ValueError, match="max_prompt_tokens=2 leaves no room"):
        _dm(tree, max_prompt_tokens=2)


def test_a_missing_root_and_bad_sections(tree, tmp_path):
    with pytest.raises(ValueError, match="data.root is not set"):
        MimicCXRDataModule(None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MimicCXRDataModule(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="sections must be a non-empty subset"):
        _dm(tree, sections=["history"])
