"""CheXpertDataModule on tiny copies of both official layouts: prefixes, policies, No Finding, views, patient splits."""

from __future__ import annotations

import logging

import pandas as pd
import pytest
from omegaconf import OmegaConf

from configs import CONFIG_DIR, instantiate
from datamodules.chexpert import FINDINGS, HEADER, CheXpertDataModule, load_hedges, relative_path
from datamodules.prompts import PromptBank
from datamodules.scan import UnreadableFilesError
from tests.fixtures_real_data import CHEXPERT_TRAIN, CHEXPERT_VALID, make_chexpert_tree

SMALL = dict(image_size=16, batch_size=4, num_workers=0, holdout_fraction=0.2)
BANK, HEDGES = PromptBank.load("chexpert"), load_hedges("chexpert")
K = {f: i for i, f in enumerate(FINDINGS)}


@pytest.fixture(scope="module", params=["CheXpert-v1.0-small", "CheXpert-v1.0"])
def tree(request, tmp_path_factory):
    return make_chexpert_tree(tmp_path_factory.mktemp("chexpert"), request.param)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_chexpert_tree(tmp_path_factory.mktemp("small"), truncated_file=True)


def _dm(root, **kwargs) -> CheXpertDataModule:
    dm = CheXpertDataModule(str(root), **{**SMALL, **kwargs})
    dm.setup()
    return dm


def _sample(dm, patient: int, study: int = 1, split: str = "train") -> dict:
    ds = dm.dataset(split)
    folder = "train" if split in ("train", "val") else "valid"
    return ds[ds.ids.index(f"{folder}/patient{patient:05d}/study{study}/view1_frontal.jpg")]


def test_both_prefixes_counts_and_batch(tree):
    assert relative_path(f"{tree.name}/train/patient00001/study1/view1_frontal.jpg") == (
        "train/patient00001/study1/view1_frontal.jpg"
    )
    dm = _dm(tree.parent)  # the folder containing CheXpert-v1.0[-small] works too
    assert dm.root == tree
    frontal = sum(e[3] == "Frontal" for e in CHEXPERT_TRAIN)
    assert len(dm.dataset("train")) + len(dm.dataset("val")) == frontal
    assert dm.dataset("test").ids == [
        "valid/patient64541/study1/view1_frontal.jpg",
        "valid/patient64542/study1/view1_frontal.jpg",
    ]
    assert all(("lateral" not in i) and (tree / i).is_file() for d in dm.datasets.values() for i in d.ids)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 16, 16) and -1 <= batch["image"].min() < batch["image"].max() <= 1
    assert batch["label"].shape == batch["label_mask"].shape == (4, 13) and batch["mask"].shape == (4, 1, 16, 16)
    assert len(batch["prompt"]) == 4 and dm.normal_prompt == BANK.target


def test_uncertainty_policies_labels_masks_and_prompts(tree):
    cardio, effusion = K["Cardiomegaly"], K["Pleural Effusion"]
    cardio_phrases, effusion_phrases = BANK.findings["Cardiomegaly"], BANK.findings["Pleural Effusion"]
    for policy in ("ignore", "zeros", "ones"):  # patient 2: Cardiomegaly 1, Pleural Effusion -1, Edema 0, rest blank
        sample = _sample(_dm(tree, uncertain=policy, holdout_fraction=0.0), 2)
        assert sample["label"][cardio] == 1 and sample["label"][effusion] == (policy == "ones")
        assert sample["label_mask"][effusion] == (policy != "ignore") and sample["label_mask"].sum() >= 12
        parts = sample["prompt"].split("; ")
        assert parts[0] in cardio_phrases and len(parts) == (2 if policy == "ones" else 1)
        if policy == "ones":  # hedged wording of the uncertain finding
            assert any(h.format(p) == parts[1] for h in HEDGES for p in effusion_phrases)


def test_no_finding_rules(tree, caplog):
    with caplog.at_level(logging.WARNING):
        dm = _dm(tree, holdout_fraction=0.0)
    assert "1 rows have No Finding = 1 and a positive pathology" in caplog.text  # patient 4
    normal = _sample(dm, 1)
    assert normal["label"].sum() == 0 and normal["prompt"] in BANK.normal
    devices = _sample(dm, 3)  # No Finding = 1 and Support Devices = 1: devices labelled, normal lungs said
    device_phrase, normal_phrase = devices["prompt"].split("; ")
    assert devices["label"].nonzero().flatten().tolist() == [K["Support Devices"]]
    assert device_phrase in BANK.findings["Support Devices"] and normal_phrase in BANK.normal
    conflict = _sample(dm, 4)  # No Finding = 1 and Cardiomegaly = 1: the finding wins
    assert conflict["label"][K["Cardiomegaly"]] == 1 and conflict["prompt"] in BANK.findings["Cardiomegaly"]
    unsure = _sample(dm, 5)  # only Atelectasis = -1 under ignore: not known normal, so the empty prompt
    assert unsure["prompt"] == "" and unsure["label"].sum() == 0 and unsure["label_mask"][K["Atelectasis"]] == 0
    several = _sample(dm, 5, study=2)
    assert len(several["prompt"].split("; ")) == 3 and several["label"].sum() == 3


def test_view_filters(tree):
    rows = pd.DataFrame([{"view": e[3], "ap_pa": e[4]} for e in CHEXPERT_TRAIN])
    everything = _dm(tree, frontal_only=False, holdout_fraction=0.0)
    assert len(everything.dataset("train")) == len(rows) and len(everything.dataset("test")) == len(CHEXPERT_VALID)
    pa = _dm(tree, ap_pa=["PA"], holdout_fraction=0.0)
    assert len(pa.dataset("train")) == (rows["ap_pa"] == "PA").sum()
    ap_or_pa = _dm(tree, ap_pa=["AP", "PA"], holdout_fraction=0.0)
    assert len(ap_or_pa.dataset("train")) == rows["ap_pa"].isin(["AP", "PA"]).sum()  # the empty AP/PA row is out
    with pytest.raises(ValueError, match="ap_pa"):
        CheXpertDataModule(str(tree), ap_pa=["LATERAL"])
    with pytest.raises(ValueError, match="uncertain"):
        CheXpertDataModule(str(tree), uncertain="maybe")


def test_patient_level_splits_never_leak(tree):
    def patients(dm, split):
        return {i.split("/")[1] for i in dm.dataset(split).ids}

    for seed in range(4):
        dm = _dm(tree, frontal_only=False, seed=seed, holdout_fraction=0.3)
        train, val, test = (patients(dm, s) for s in ("train", "val", "test"))
        assert val and not (train & val) and not (train & test) and not (val & test)
        assert test == {"patient64541", "patient64542"}  # the official valid.csv
    again = _dm(tree, frontal_only=False, seed=3, holdout_fraction=0.3)
    assert again.dataset("val").ids == dm.dataset("val").ids
    frontal = _dm(tree, seed=3, holdout_fraction=0.3)  # view filters do not move patients between splits
    assert patients(frontal, "val") <= patients(dm, "val")
    swapped = _dm(tree, valid_csv_as="val", holdout_fraction=0.3)
    assert patients(swapped, "val") == {"patient64541", "patient64542"} and patients(swapped, "test")


def test_bad_files_skip_or_stop_before_training(small, caplog):
    with caplog.at_level(logging.WARNING):
        dm = _dm(small)
    assert "patient00002" in caplog.text and "leaving out 1" in caplog.text
    assert not any("patient00002" in i for d in dm.datasets.values() for i in d.ids)
    with pytest.raises(UnreadableFilesError, match="patient00002/study1/view1_frontal.jpg"):
        CheXpertDataModule(str(small), on_bad_file="error").setup("fit")
    unscanned = _dm(small, scan="none", holdout_fraction=0.0).dataset("train")
    with caplog.at_level(logging.WARNING):
        sample = unscanned[1]  # patient 2's file fails when read: the next sample is served instead
    assert unscanned.ids[1].startswith("train/patient00002") and sample["id"] == unscanned.ids[2]
    assert "unreadable image" in caplog.text


def test_wrong_root_or_header_fails_at_once_with_the_layout(tmp_path):
    for root in (None, tmp_path / "nowhere", tmp_path):
        with pytest.raises((ValueError, FileNotFoundError), match="train/patient00001/study1/view1_frontal.jpg"):
            CheXpertDataModule(root)
    root = make_chexpert_tree(tmp_path)
    csv = pd.read_csv(root / "train.csv").rename(columns={"Pleural Effusion": "Effusion"})
    csv.to_csv(root / "train.csv", index=False)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['Pleural Effusion'\]"):
        _dm(root)
    csv = csv.rename(columns={"Effusion": "Pleural Effusion"})[list(HEADER)]
    csv.loc[0, "Edema"] = 2.0
    csv.to_csv(root / "train.csv", index=False)
    with pytest.raises(ValueError, match="row 2 'Edema'"):
        _dm(root)


def test_config_builds_the_datamodule(tree):
    cfg = OmegaConf.load(CONFIG_DIR / "data" / "chexpert.yaml")
    assert "image_size" in cfg and cfg.root is None and cfg.uncertain == "ignore" and cfg.frontal_only
    cfg.root, cfg.image_size = str(tree), 16
    dm = instantiate(cfg)
    assert isinstance(dm, CheXpertDataModule) and dm.dataset("test")
    assert dm.sample_prompts() == [BANK.target, *(BANK.findings[f][0] for f in FINDINGS)]


def test_prompt_bank_phrases_every_finding_and_hedges(tmp_path):
    assert set(BANK.findings) == set(FINDINGS) and BANK.target in BANK.normal
    assert all(len(BANK.findings[f]) >= 3 for f in FINDINGS) and len(HEDGES) >= 3
    bad = tmp_path / "bank.yaml"
    bad.write_text("target: clear\nnormal: [clear]\nfindings: {Cardiomegaly: [big heart]}\nhedges: ['possible']\n")
    with pytest.raises(ValueError, match="hedges"):
        load_hedges(str(bad))
