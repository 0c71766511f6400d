"""CovidRadiographyDataModule on a tiny copy of the Kaggle layout: counts, labels, prompts, splits, masks, bad files."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from configs import CONFIG_DIR, instantiate
from datamodules.covid_radiography import CovidRadiographyDataModule
from datamodules.prompts import PromptBank
from datamodules.scan import UnreadableFilesError
from tests.fixtures_real_data import COVID_COUNTS, encode, make_covid_tree, write

SMALL = dict(image_size=16, batch_size=4, num_workers=0, val_fraction=0.25, test_fraction=0.25)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    base = tmp_path_factory.mktemp("kaggle")
    return make_covid_tree(base, truncated_file=True)


def _dm(root, **kwargs) -> CovidRadiographyDataModule:
    dm = CovidRadiographyDataModule(str(root), **{**SMALL, **kwargs})
    dm.setup()
    return dm


def _splits(dm) -> dict[str, set[str]]:
    return {s: set(d.ids) for s, d in dm.datasets.items()}


def test_counts_labels_prompts_and_batch(tree, caplog):
    with caplog.at_level(logging.WARNING):
        dm = _dm(tree.parent, lung_masks=True)  # the folder that contains the dataset works too
    assert dm.root == tree and "COVID-3.png" in caplog.text  # the truncated PNG, skipped and named
    ids = set().union(*_splits(dm).values())
    per_class = pd.Series([i.split("/")[0] for i in ids]).value_counts().to_dict()
    assert per_class == {**COVID_COUNTS, "COVID": COVID_COUNTS["COVID"] - 1}
    assert not any("._" in i for i in ids) and "Viral Pneumonia/images/Viral Pneumonia-2.png" in ids
    bank = PromptBank.load("covid_radiography")
    train = dm.dataset("train")
    for i in range(len(train)):
        cls = train.ids[i].split("/")[0]
        expected = np.array([cls == f for f in dm.finding_names], np.float32)
        np.testing.assert_array_equal(train.labels[i], expected)
        sample = train[i]
        assert sample["prompt"] in (bank.normal if cls == "Normal" else bank.findings[cls])
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 16, 16) and batch["image"].dtype == torch.float32
    assert -1 <= batch["image"].min() < batch["image"].max() <= 1
    assert batch["label"].shape == (4, 3) and batch["mask"].shape == (4, 1, 16, 16) and not batch["mask"].any()
    assert batch["lung_mask"].shape == (4, 1, 16, 16) and set(batch["lung_mask"].unique().tolist()) == {0.0, 1.0}
    assert len(batch["prompt"]) == 4 and len(batch["id"]) == 4 and "has_mask" not in batch
    assert dm.normal_prompt == bank.target and bank.target in bank.normal


def test_stratified_seeded_split_and_class_selection(tree):
    dm = _dm(tree)
    splits = _splits(dm)
    assert not (splits["train"] & splits["val"]) and not (splits["train"] & splits["test"])
    for cls, n in COVID_COUNTS.items():  # every class in every split: stratified
        counts = {s: sum(i.startswith(f"{cls}/") for i in ids) for s, ids in splits.items()}
        assert counts["test"] == round(0.25 * n) or cls == "COVID"  # COVID lost its truncated file
        assert counts["val"] >= 1
    assert _splits(_dm(tree)) == splits  # same seed, same split
    assert _splits(_dm(tree, seed=1)) != splits
    two = _dm(tree, classes=["COVID", "Normal"])
    for split, ids in _splits(two).items():  # a class's split does not depend on the other classes selected
        assert ids == {i for i in splits[split] if i.split("/")[0] in ("COVID", "Normal")}
    labels = np.concatenate([d.labels for d in two.datasets.values()])
    assert labels[:, 1:].sum() == 0 and labels[:, 0].sum() == COVID_COUNTS["COVID"] - 1
    with pytest.raises(ValueError, match="unknown classes"):
        CovidRadiographyDataModule(str(tree), classes=["Viral_Pneumonia"])


def test_split_file_is_written_and_reread(tree, tmp_path, caplog):
    split_file = tmp_path / "splits" / "covid.csv"
    first = _dm(tree, split_file=str(split_file))
    saved = pd.read_csv(split_file)
    assert list(saved.columns) == ["path", "class", "split"] and len(saved) == sum(COVID_COUNTS.values())
    other_seed = _dm(tree, split_file=str(split_file), seed=7)  # the file wins over the seed
    assert _splits(other_seed) == _splits(first)
    saved.loc[saved["path"] == "Normal/images/Normal-1.png", "split"] = "test"
    saved[saved["path"] != "Normal/images/Normal-2.png"].to_csv(split_file, index=False)  # as if added later
    with caplog.at_level(logging.WARNING):
        reread = _splits(_dm(tree, split_file=str(split_file)))
    assert "Normal/images/Normal-1.png" in reread["test"]
    assert "Normal/images/Normal-2.png" not in set().union(*reread.values()) and "left out" in caplog.text


def test_lesion_masks_metadata_and_balanced_sampling(tmp_path):
    root = make_covid_tree(tmp_path)
    lesion = np.zeros((30, 30), np.uint8)
    lesion[10:20, 5:15] = 255
    for i in (1, 2):
        write(root / "COVID" / "lesion_masks" / f"COVID-{i}.png", encode(lesion))
    dm = _dm(root, val_fraction=0.0, test_fraction=0.0, balanced_sampling=True)
    train = dm.dataset("train")
    by_id = {train.ids[i]: train[i] for i in range(len(train))}
    assert by_id["COVID/images/COVID-1.png"]["has_mask"] and by_id["COVID/images/COVID-1.png"]["mask"].sum() > 0
    assert not by_id["COVID/images/COVID-3.png"]["has_mask"] and not by_id["Normal/images/Normal-1.png"]["has_mask"]
    meta = dm.metadata  # sheet says NORMAL-1, the file is Normal-1.png
    assert meta.loc["Normal/images/Normal-1.png", "URL"] == "https://example.org/Normal/1"
    assert meta["URL"].notna().all()
    weights = pd.Series(dm.train_weights(), index=dm.split_classes["train"]).groupby(level=0).sum()
    np.testing.assert_allclose(weights.to_numpy(), 1.0)  # each class carries the same total weight
    assert len(dm.train_dataloader().sampler) == len(train)


def test_sheets_are_optional(tmp_path):
    assert list(_dm(make_covid_tree(tmp_path, sheets=False)).metadata.columns) == ["class"]


def test_bad_file_error_stops_before_training(tree):
    dm = CovidRadiographyDataModule(str(tree), **SMALL, on_bad_file="error")
    with pytest.raises(UnreadableFilesError, match="COVID-3.png"):
        dm.setup("fit")
    assert _dm(tree, scan="none").dataset("train")  # unscanned: the Dataset replaces it if it is ever read


def test_missing_or_wrong_root_shows_the_layout(tmp_path):
    for root, error in ((None, ValueError), (tmp_path / "nowhere", FileNotFoundError), (tmp_path, FileNotFoundError)):
        with pytest.raises(error, match="Viral Pneumonia/images/Viral Pneumonia-1.png"):
            CovidRadiographyDataModule(root)
    (tmp_path / "COVID" / "images").mkdir(parents=True)
    (tmp_path / "Viral_Pneumonia" / "images").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no \['Lung_Opacity/images', 'Normal/images', 'Viral Pneumonia"):
        CovidRadiographyDataModule(str(tmp_path))


def test_config_builds_the_datamodule_and_prompts(tree):
    cfg = OmegaConf.load(CONFIG_DIR / "data" / "covid_radiography.yaml")
    assert "image_size" in cfg and cfg.root is None and not cfg.augmentations
    cfg.root, cfg.image_size, cfg.target_prompt = str(tree), 16, "normal chest radiograph"
    dm = instantiate(cfg)
    assert isinstance(dm, CovidRadiographyDataModule) and dm.normal_prompt == "normal chest radiograph"
    assert not dm.has_random_augmentation and dm.image_size == 16
    bank = PromptBank.load("covid_radiography")
    assert all(len(bank.findings[c]) >= 3 for c in dm.finding_names) and len(bank.normal) >= 3
    assert dm.sample_prompts() == ["normal chest radiograph", *(bank.findings[c][0] for c in dm.finding_names)]
    affine = [{"name": "Affine", "scale": [0.95, 1.05], "p": 0.5}]
    assert CovidRadiographyDataModule(str(tree), augmentations=affine).has_random_augmentation


def test_reads_the_synthetic_phantoms_layout(tmp_path):
    from datamodules.synthetic import SyntheticCXRDataModule

    counts = SyntheticCXRDataModule(image_size=32, num_train=12, seed=0).write_covid_layout(tmp_path, limit=12)
    classes = [c for c, n in counts.items() if n]  # at the phantoms' own size: a resize could drop a tiny lesion
    dm = _dm(tmp_path, classes=classes, val_fraction=0.0, test_fraction=0.0, image_size=32)
    batch = next(iter(dm.train_dataloader()))
    assert len(dm.dataset("train")) == sum(counts.values()) and batch["has_mask"].all()
    abnormal = batch["label"].sum(1) > 0
    assert (batch["mask"].flatten(1).amax(1) > 0)[abnormal].all()  # lesion masks served for abnormal phantoms
    assert set(dm.metadata["URL"].str[:10]) == {"synthetic:"}
