"""`data=csv` (datamodules/csv_folder.py): any folder of images with one CSV: splits, labels, prompts, bad inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from datamodules.csv_folder import CSVDataModule
from datamodules.scan import UnreadableFilesError
from tests.fixtures_real_data import encode, gray, make_csv_tree, write
from tests.test_dicom import write_dicom

GIVEN = dict(image_size=16, split_column="split", prompt_column="report", num_workers=0)


@pytest.fixture
def tree(tmp_path):
    return make_csv_tree(tmp_path)


def _by_id(dm: CSVDataModule, split: str) -> dict:
    ds = dm.dataset(split)
    return {ds.ids[i]: ds[i] for i in range(len(ds))}


def test_splits_labels_and_prompts_as_the_csv_gives_them(tree):
    dm = CSVDataModule(str(tree), **GIVEN)
    assert dm.finding_names == ("effusion", "nodule")  # the label columns, found by their values
    assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [3, 1, 2]
    train, val, test = (_by_id(dm, s) for s in ("train", "val", "test"))
    assert train["p1/a.png"]["prompt"] == "small left pleural effusion"
    assert train["p1/b.png"]["prompt"] == "nodule"  # an empty report: the positive findings' names
    assert torch.equal(train["p1/a.png"]["label"], torch.tensor([1.0, 0.0]))
    uncertain = val["p3/a.png"]  # nodule -1 under `ignore`: 0, masked out of the loss
    assert torch.equal(uncertain["label"], torch.tensor([0.0, 0.0]))
    assert torch.equal(uncertain["label_mask"], torch.tensor([1.0, 0.0]))
    assert torch.equal(test["p4/a.png"]["label_mask"], torch.tensor([1.0, 0.0]))  # blank: unknown
    assert test["p5/a.png"]["prompt"] == dm.normal_prompt and test["p5/a.png"]["image"].shape == (1, 16, 16)


def test_uncertain_ones_are_positive_and_hedged(tree):
    dm = CSVDataModule(str(tree), image_size=16, split_column="split", uncertain="ones")
    sample = _by_id(dm, "val")["p3/a.png"]
    assert torch.equal(sample["label"], torch.tensor([0.0, 1.0])) and sample["prompt"] == "possible nodule"


def test_a_drawn_split_keeps_patients_together_and_ignores_row_order(tree):
    rows = pd.read_csv(tree / "labels.csv", dtype=str, keep_default_na=False)
    rows = pd.concat(
        [rows] + [rows.assign(path=rows["path"] + f".{k}.png", patient=rows["patient"] + f"-{k}") for k in range(6)]
    )
    for path in rows["path"]:
        write(tree / path, encode(gray(8, 8)))
    rows.to_csv(tree / "labels.csv", index=False)
    kwargs = dict(image_size=8, patient_column="patient", val_fraction=0.2, test_fraction=0.2)
    first = CSVDataModule(str(tree), **kwargs).table
    rows.sample(frac=1.0, random_state=1).to_csv(tree / "labels.csv", index=False)
    shuffled = CSVDataModule(str(tree), **kwargs).table
    assert first.set_index("_path")["split"].sort_index().equals(shuffled.set_index("_path")["split"].sort_index())
    assert (first.groupby("patient")["split"].nunique() == 1).all()
    assert set(first["split"]) == {"train", "val", "test"}


def test_absolute_paths_and_dicom_rows(tmp_path):
    root = tmp_path / "root"
    write_dicom(tmp_path / "elsewhere.dcm")
    write(root / "a.png", encode(gray(10, 10)))
    rows = {"path": ["a.png", str(tmp_path / "elsewhere.dcm")], "effusion": ["1", "0"], "split": ["train", "val"]}
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    dm = CSVDataModule(str(root), image_size=8, split_column="split")
    assert set(_by_id(dm, "train")) == {"a.png"}
    image = _by_id(dm, "val")[str(tmp_path / "elsewhere.dcm")]["image"]
    assert image.shape == (1, 8, 8) and float(image.max()) > 0.9  # 4095 of 12 bits: white, not 1/16 grey


@pytest.mark.parametrize(
    ("edit", "overrides", "message"),
    [
        (None, {"path_column": "file"}, "no column file \\(data.path_column\\)"),
        (None, {"label_columns": ["effusion", "report"]}, "label column\\(s\\) \\['report'\\] hold values"),
        (None, {"label_columns": ["edema"]}, "no label column\\(s\\) \\['edema'\\]"),
        (lambda t: t.assign(split="training"), {"split_column": "split"}, "holds \\['training'\\]"),
        (lambda t: pd.concat([t, t.head(1)]), {}, "listed twice, e.g. 'p1/a.png'"),
        (lambda t: t.head(0), {}, "lists no images"),
    ],
)
def test_a_bad_csv_is_one_clear_line(tree, edit, overrides, message):
    if edit is not None:
        edit(pd.read_csv(tree / "labels.csv", dtype=str, keep_default_na=False)).to_csv(
            tree / "labels.csv", index=False
        )
    with pytest.raises(ValueError, match=message):
        CSVDataModule(str(tree), image_size=16, **overrides)


def test_missing_root_csv_and_unparsable_csv(tree, tmp_path):
    with pytest.raises(ValueError, match="data.root is not set"):
        CSVDataModule(None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CSVDataModule(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no CSV at .*other.csv"):
        CSVDataModule(str(tree), csv="other.csv")
    (tree / "labels.csv").write_text("path,effusion\np1/a.png,1\np2/a.png,0,extra,more\n")  # a malformed row
    with pytest.raises(ValueError, match="is not a readable CSV: .*Expected 2 fields in line 3, saw 4"):
        CSVDataModule(str(tree))


def test_training_needs_train_and_val_images(tree):
    table = pd.read_csv(tree / "labels.csv", dtype=str, keep_default_na=False)
    table[table["split"] != "val"].to_csv(tree / "labels.csv", index=False)
    dm = CSVDataModule(str(tree), **GIVEN)
    assert len(dm.dataset("test")) == 2  # scoring a test split alone is fine
    with pytest.raises(ValueError, match="no readable images in the val split, which training needs"):
        CSVDataModule(str(tree), **GIVEN).setup("fit")


def test_blank_patients_are_their_own_groups_and_unused_conventional_columns_are_named(tree, caplog):
    table = pd.read_csv(tree / "labels.csv", dtype=str, keep_default_na=False).assign(patient="")
    table.to_csv(tree / "labels.csv", index=False)
    with caplog.at_level("WARNING"):
        dm = CSVDataModule(str(tree), image_size=8, patient_column="patient", val_fraction=0.34, test_fraction=0.34)
    assert dm.table["split"].nunique() == 3  # not one "" patient in one split
    assert "column 'split' is not used; set data.split_column=split" in caplog.text
    assert "column 'report' is not used; set data.prompt_column=report" in caplog.text


def test_unreadable_images_are_listed_or_refused(tree):
    write(tree / "p2" / "a.png", encode(gray(24, 20))[:30])  # truncated
    (tree / "p5" / "a.png").unlink()  # missing
    dm = CSVDataModule(str(tree), **GIVEN)
    dm.setup("fit")
    assert sorted(b.path.split("csv_dataset/")[1] for b in dm.bad_files) == ["p2/a.png", "p5/a.png"]
    assert "p2/a.png" not in dm.dataset("train").ids and len(dm.dataset("test")) == 1
    with pytest.raises(UnreadableFilesError, match="p2/a.png"):
        CSVDataModule(str(tree), **GIVEN, on_bad_file="error").setup("fit")
    assert np.isfinite(dm.dataset("train")[0]["image"].numpy()).all()
