"""The synthetic DataModule: batch contract, seeded order-free samples, reports that match the findings,
the COVID-19 Radiography Database layout, and the prompt banks every dataset shares."""

import re

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from configs import CONFIG_DIR, instantiate
from datamodules.phantoms import FINDINGS
from datamodules.prompts import SEPARATOR, PromptBank, compose_report, placeholders
from datamodules.synthetic import COVID_CLASSES, SyntheticCXRDataModule, covid_class, main

KEYS = {"image", "healthy", "prompt", "label", "mask", "lung_mask", "has_mask", "id"}


@pytest.fixture(scope="module")
def dm():
    module = SyntheticCXRDataModule(num_train=48, num_val=24, num_test=24, batch_size=16, eval_batch_size=24)
    module.setup("fit")
    return module


@pytest.fixture(scope="module")
def bank():
    return PromptBank.load("synthetic")


def test_config_builds_the_datamodule():
    cfg = OmegaConf.load(CONFIG_DIR / "data" / "synthetic.yaml")
    cfg.num_train, cfg.num_val, cfg.num_test = 8, 4, 4
    module = instantiate(cfg)
    assert isinstance(module, SyntheticCXRDataModule) and module.image_size == 64
    assert len(module.dataset("train")) == 8 and len(module.dataset("test")) == 4
    assert module.finding_names == FINDINGS == ("nodule", "ground_glass", "consolidation", "effusion")
    assert module.normal_prompt == PromptBank.load("synthetic").target == "no acute cardiopulmonary abnormality"


def test_batch_contract_through_a_dataloader(dm):
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == KEYS
    for key in ("image", "healthy", "mask", "lung_mask"):
        assert batch[key].shape == (16, 1, 64, 64) and batch[key].dtype == torch.float32, key
    assert batch["label"].shape == (16, 4) and batch["label"].dtype == torch.float32
    assert batch["has_mask"].dtype == torch.bool and batch["has_mask"].all()
    assert len(batch["prompt"]) == len(batch["id"]) == 16 and all(isinstance(p, str) and p for p in batch["prompt"])
    for key in ("image", "healthy"):
        assert -1 <= batch[key].min() and batch[key].max() <= 1 and batch[key].std() > 0.2
    for key in ("mask", "lung_mask", "label"):
        assert set(batch[key].unique().tolist()) <= {0.0, 1.0}
    assert all(re.fullmatch(r"train-\d{6}", i) for i in batch["id"])


def test_masks_healthy_twins_and_labels_agree(dm):
    batch = next(iter(DataLoader(dm.dataset("val"), batch_size=24)))
    healthy = batch["label"].sum(1) == 0
    assert 0 < healthy.sum() < 24
    changed = (batch["image"] != batch["healthy"]).float()
    assert torch.equal(changed, batch["mask"])
    assert torch.equal(batch["image"][healthy], batch["healthy"][healthy])
    assert batch["mask"][healthy].sum() == 0 and (batch["mask"][~healthy].flatten(1).sum(1) > 0).all()
    assert (batch["mask"] <= batch["lung_mask"]).all()
    assert all(p in dm.bank.normal for p, h in zip(batch["prompt"], healthy, strict=False) if h)


def test_seeded_determinism():
    def make(seed: int):
        return SyntheticCXRDataModule(num_train=4, num_val=4, num_test=4, seed=seed).dataset("train")

    a, b, c = make(0), make(0), make(1)
    for i in range(4):
        assert a[i]["image"].numpy().tobytes() == b[i]["image"].numpy().tobytes() and a[i]["prompt"] == b[i]["prompt"]
    assert any(a[i]["image"].numpy().tobytes() != c[i]["image"].numpy().tobytes() for i in range(4))


def test_splits_are_disjoint(dm):
    train, val, test = (dm.dataset(s) for s in ("train", "val", "test"))
    for i in range(4):
        images = [ds[i]["image"].numpy().tobytes() for ds in (train, val, test)]
        assert len(set(images)) == 3
    assert test[3]["id"] == "test-000003"
    with pytest.raises(IndexError):
        test[24]


def test_order_independent_across_workers_and_shuffling(dm):
    ds = dm.dataset("train")
    direct = {ds.sample_id(i): ds[i]["image"] for i in range(len(ds))}
    loader = DataLoader(ds, batch_size=8, shuffle=True, num_workers=2, generator=torch.Generator().manual_seed(3))
    seen = 0
    for batch in loader:
        for sample_id, image in zip(batch["id"], batch["image"], strict=False):
            assert torch.equal(image, direct[sample_id])
            seen += 1
    assert seen == len(ds)


def test_prompts_name_each_finding_and_its_place(dm, bank):
    ds = SyntheticCXRDataModule(num_train=300).dataset("train")
    for i in range(300):
        findings, prompt = ds.findings(i), ds.prompt(i)
        if not findings:
            assert prompt in bank.normal
            continue
        parts = prompt.split(SEPARATOR)
        assert len(parts) == len(findings), prompt
        for f, part in zip(findings, parts, strict=False):
            assert part in {p.format(side=f.side, zone=f.zone) for p in bank.findings[f.kind]}, (f, part)
            assert re.search(rf"\b{f.side}\b", part) and (f.kind == "effusion" or re.search(rf"\b{f.zone}\b", part))


def test_bank_phrasings_locate_every_finding(bank):
    assert bank.target in bank.normal and len(bank.normal) >= 3
    assert set(bank.findings) == set(FINDINGS)
    for kind, phrasings in bank.findings.items():
        assert 3 <= len(phrasings) <= 6
        needs = {"side"} if kind == "effusion" else {"side", "zone"}
        assert all(placeholders(p) == needs for p in phrasings), kind
    assert not any(w in p for p in bank.normal for w in ("effusion", "nodule", "consolidation", "ground-glass"))


def test_index_helpers_match_the_rendered_sample(dm):
    ds = dm.dataset("val")
    for i in range(8):
        prompt, ph = ds.sample(i)
        item = ds[i]
        assert ph.findings == ds.findings(i) and prompt == ds.prompt(i) == item["prompt"]
        assert item["label"].tolist() == [float(any(f.kind == k for f in ph.findings)) for k in FINDINGS]
        union = np.zeros_like(ph.mask)
        for kind in FINDINGS:
            union |= ph.finding_mask(kind)
        assert (union == ph.mask).all() and (ph.mask == item["mask"][0].numpy().astype(bool)).all()


def test_prevalence_as_configured():
    ds = SyntheticCXRDataModule(num_train=600, p_healthy=0.3, p_second=0.5).dataset("train")
    findings = [ds.findings(i) for i in range(600)]
    assert 0.24 < np.mean([not f for f in findings]) < 0.36
    assert 0.42 < np.mean([len(f) == 2 for f in findings if f]) < 0.58
    sides = [x.side for f in findings for x in f]
    assert 0.4 < sides.count("left") / len(sides) < 0.6


def test_prompt_helpers(dm):
    assert dm.prompt_for("nodule", "left", "lower") == "small nodule in the left lower zone"
    assert dm.prompt_for("nodule", "left", "lower", choice=1) != dm.prompt_for("nodule", "left", "lower")
    grid = dm.sample_prompts()
    assert grid[0] == dm.normal_prompt and len(grid) == 1 + len(FINDINGS)
    everything = dm.prompts()
    assert dm.normal_prompt in everything and len(everything) == len(set(everything))
    assert {dm.dataset("test").prompt(i) for i in range(24)} <= set(everything)


def test_prompt_bank_is_generic(tmp_path):
    path = tmp_path / "bank.yaml"
    path.write_text(
        "target: normal study\nnormal: [normal study, clear lungs]\n"
        "findings:\n  Edema: [pulmonary edema, '{side} basal edema']\n  Mass: ['{zone} zone mass']\n"
    )
    bank = PromptBank.load(path)
    rng = np.random.default_rng(0)
    assert {bank.phrase("Edema", rng) for _ in range(20)} == {"pulmonary edema"}  # no location: unlocated phrasings
    assert bank.phrase(("Edema", "left", None), choice=1) == "left basal edema"
    with pytest.raises(ValueError):
        bank.phrase("Mass")
    with pytest.raises(KeyError):
        bank.phrase("Pneumothorax")
    assert bank.report([], None) == "normal study" and bank.report([], rng) in bank.normal
    expected = compose_report(["pulmonary edema", "upper zone mass"])
    assert bank.report(["Edema", ("Mass", None, "upper")], rng) == expected
    with pytest.raises(FileNotFoundError, match="synthetic"):
        PromptBank.load("no_such_bank")


def test_write_covid_layout(tmp_path):
    module = SyntheticCXRDataModule(num_train=40, num_val=4, num_test=4)
    counts = module.write_covid_layout(tmp_path, split="train", limit=30)
    assert sum(counts.values()) == 30 and set(counts) == set(COVID_CLASSES)
    assert {p.name for p in tmp_path.iterdir() if p.is_dir()} == {"COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"}
    assert (tmp_path / "README.md.txt").is_file() and (tmp_path / "Viral Pneumonia" / "images").is_dir()
    ds = module.dataset("train")
    expected = {cls: [] for cls in COVID_CLASSES}
    for i in range(30):
        cls = covid_class(ds.findings(i))
        expected[cls].append(i)
    for cls in COVID_CLASSES:
        names = {f"{cls}-{k}.png" for k in range(1, counts[cls] + 1)}
        assert counts[cls] == len(expected[cls])
        for sub in ("images", "masks", "lesion_masks"):
            assert {p.name for p in (tmp_path / cls / sub).iterdir()} == names, (cls, sub)
        for k, i in enumerate(expected[cls], start=1):
            image, lung, lesion = (
                np.array(Image.open(tmp_path / cls / sub / f"{cls}-{k}.png"))
                for sub in ("images", "masks", "lesion_masks")
            )
            ph = ds.phantom(i)
            assert image.dtype == np.uint8 and image.shape == (64, 64)
            assert np.abs(image.astype(float) / 255 - ph.image).max() <= 0.5 / 255 + 1e-6
            assert ((lung == 255) == ph.lung_mask).all() and ((lesion == 255) == ph.mask).all()
            assert lesion.any() == (cls != "Normal")
    assert counts["Normal"] > 0 and counts["Lung_Opacity"] > 0


def test_cli_and_contact_sheet(tmp_path, capsys):
    counts = main(
        [
            "--out",
            str(tmp_path / "covid"),
            "--split",
            "val",
            "--limit",
            "5",
            "--image-size",
            "64",
            "--num",
            "8",
            "--contact-sheet",
            str(tmp_path / "sheet.png"),
        ]
    )
    assert sum(counts.values()) == 5 and '"Normal"' in capsys.readouterr().out
    assert len(list((tmp_path / "covid").glob("*/images/*.png"))) == 5
    sheet = Image.open(tmp_path / "sheet.png")
    assert sheet.mode == "RGB" and sheet.width > 4 * 192


def test_larger_images():
    item = SyntheticCXRDataModule(image_size=128, num_train=2).dataset("train")[1]
    assert item["image"].shape == item["mask"].shape == (1, 128, 128)


def test_the_sample_cache_serves_what_drawing_gives_and_a_consumer_cannot_corrupt_it(monkeypatch):
    fresh = SyntheticCXRDataModule(num_train=8, num_val=4, num_test=4)
    cached = SyntheticCXRDataModule(num_train=8, num_val=4, num_test=4, cache=True)
    fresh.setup("fit")
    cached.setup("fit")
    train = cached.dataset("train")
    for i in range(8):
        train[i]["image"].add_(1.0)  # a consumer writing into its sample in place
    monkeypatch.setattr(train, "_render", lambda i: pytest.fail(f"sample {i} drawn again"))
    for i in range(8):
        expected, served = fresh.dataset("train")[i], train[i]
        assert served.keys() == expected.keys() == KEYS
        for key in KEYS:
            value = expected[key]
            assert torch.equal(served[key], value) if torch.is_tensor(value) else served[key] == value, key
