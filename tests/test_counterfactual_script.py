"""experiments/counterfactual_attribution.py end to end on a smoke checkpoint trained here, as a user runs it."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from experiments import counterfactual_attribution, train, train_autoencoder, train_classifier
from lightning_modules.pipeline import LatentDiffusionPipeline
from lightning_modules.runs import attribution
from tests.fixtures_real_data import encode, gray, write

ALL = ["sdedit", "inversion", "refined", "mean_healthy", "reconstruction", "diffedit", "saliency"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """Smoke-sized VAE, latent diffusion model and classifier, trained for two steps each (no validation)."""
    logs = tmp_path_factory.mktemp("logs")
    short = [
        "experiment=smoke",
        f"log_dir={logs}",
        "trainer.max_steps=2",
        "trainer.limit_val_batches=0",
        "data.num_train=16",
    ]
    vae = train_autoencoder.main(short)
    train.main([*short, f"model.vae.path={vae}"])
    return {
        "checkpoint": str(logs / "ldm" / "checkpoints" / "last.ckpt"),
        "classifier_checkpoint": str(train_classifier.main(short)),
    }


#: every method and baseline at 2 steps (DiffEdit: 2 draws) in batches of 2: the scripts' tests run in seconds
FEW_STEPS = [
    "batch_size=2",
    "sdedit.num_inference_steps=2",
    "sdedit.strength=0.5",
    "inversion.num_inference_steps=2",
    "baselines.diffedit.num_inference_steps=2",
    "baselines.diffedit.strength=0.5",
    "baselines.diffedit.num_maps=2",
    "baselines.mean_healthy.num_images=4",
]


def run(checkpoints: dict, out: Path, *overrides: str) -> dict:
    """The script at 2 inference steps, 2 DiffEdit draws, on a 4-image synthetic test split (2 healthy) by default."""
    return counterfactual_attribution.main(
        [
            "experiment=smoke",
            f"checkpoint={checkpoints['checkpoint']}",
            f"classifier_checkpoint={checkpoints['classifier_checkpoint']}",
            f"output_dir={out}",
            "progress=false",
            "data.num_train=24",
            "data.num_val=6",
            "data.num_test=4",
            *FEW_STEPS,
            *overrides,
        ]
    )


def test_split_with_masks_writes_metrics_for_every_method(checkpoints, tmp_path):
    out = tmp_path
    run(checkpoints, out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["methods"]) == ALL
    for method, values in metrics["methods"].items():
        assert 0 <= values["auprc"] <= 1 and 0 <= values["auroc"] <= 1 and 0 <= values["dice"] <= 1, method
    for method in ("sdedit", "inversion", "refined", "mean_healthy", "reconstruction"):
        assert {"validity", "minimality", "twin_distance"} <= set(metrics["methods"][method]), method
    assert "validity" not in metrics["methods"]["diffedit"]
    assert metrics["images"] == 4 and metrics["scored"] == metrics["abnormal"] == 2
    assert set(metrics["per_finding"]["inversion"]) <= {"nodule", "ground_glass", "consolidation", "effusion"}
    assert 0 < metrics["reconstruction_latent_error"] < 2  # a 2-step round trip of a smoke model: far from exact
    table = (out / "metrics.md").read_text()
    assert "| inversion |" in table and "| saliency |" in table and "relative latent error" in table

    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["id"] for r in rows] == [f"test-{i:06d}" for i in range(4)]
    assert sum(bool(r["inversion_auprc"]) for r in rows) == metrics["scored"]
    for method in ALL:
        assert len(list((out / "maps" / method).glob("*.npy"))) == 4
    assert len(list((out / "counterfactuals" / "sdedit").glob("*.png"))) == 4
    assert len(list((out / "overlays" / "inversion").glob("*.png"))) == 4
    assert not (out / "overlays" / "diffedit").exists()  # overlays.methods: only ours by default
    heat = np.load(out / "maps" / "inversion" / "test-000000.npy")
    assert heat.shape == (64, 64) and heat.min() >= 0


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Two films (a 16-bit RGBA PNG, an 8-bit JPEG in a subfolder), a truncated JPEG and a text file named .png."""
    folder = tmp_path_factory.mktemp("films")
    (folder / "sub").mkdir()
    ramp = np.linspace(0, 1, 80 * 96).reshape(80, 96)
    bgra = np.stack([ramp, ramp, ramp, np.ones_like(ramp)], -1)
    cv2.imwrite(str(folder / "rgba16.png"), (bgra * 65535).astype(np.uint16))  # Pillow cannot write 16-bit RGBA
    assert Image.open(folder / "rgba16.png").mode == "RGBA"
    Image.fromarray((ramp * 255).astype(np.uint8)).save(folder / "sub" / "grey.jpg")
    good = (folder / "sub" / "grey.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "notes.png").write_text("not an image")
    return folder


def undecodable_png(seed: int) -> bytes:
    """A PNG whose signature and end pass the header scan but whose pixel data is scrambled: it fails to decode."""
    data = encode(gray(64, 64, seed=seed))
    start = data.index(b"IDAT") + 4
    length = int.from_bytes(data[start - 8 : start - 4], "big")
    mid = start + length // 4
    return data[:mid] + bytes(b ^ 0x5A for b in data[mid : mid + length // 2]) + data[mid + length // 2 :]


@pytest.fixture(scope="module")
def folder_runs(checkpoints, folder, tmp_path_factory) -> list[tuple[Path, dict]]:
    """The folder through our methods and DiffEdit (the stochastic ones), then with the same seed a copy of it whose
    last batch (batch_size=2) holds two files that pass the header scan but fail to decode."""
    copy = tmp_path_factory.mktemp("films_copy") / "films"
    shutil.copytree(folder, copy)
    for k in (1, 2):
        write(copy / f"z_bad{k}.png", undecodable_png(k))
    outs = [tmp_path_factory.mktemp(f"folder{k}") for k in range(2)]
    return [
        (out, run(checkpoints, out, f"input={path}", "methods=[sdedit,inversion,diffedit]"))
        for out, path in zip(outs, (folder, copy), strict=True)
    ]


def test_folder_with_a_corrupt_file_and_a_16_bit_rgba_png(folder_runs):
    out, result = folder_runs[0]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert sorted(r["id"] for r in rows) == ["rgba16", "sub/grey"]
    assert {"sdedit_p_abnormal", "inversion_change", "diffedit_map_max"} <= set(rows[0])
    skipped = {Path(r["path"]).name: r["reason"] for r in csv.DictReader(open(out / "skipped.csv"))}
    assert set(skipped) == {"truncated.jpg", "notes.png"} and all(skipped.values())
    assert (out / "overlays" / "sdedit" / "sub" / "grey.png").is_file()
    assert np.load(out / "maps" / "diffedit" / "rgba16.npy").shape == (64, 64)
    assert not (out / "metrics.json").exists()  # no labels, nothing to score
    assert len(result["skipped"]) == 2


def test_same_seed_same_bytes_and_an_unreadable_batch_changes_no_other(folder_runs):
    """A batch's seed is its number in the run: a batch of two files that fail to decode changes nothing else."""
    (first, _), (second, result) = folder_runs
    saved = ("config.yaml", "run.json")  # the run's settings and inputs: the folders differ
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file() and p.name not in saved)
    assert len(files) == 2 + 2 * 3 + 2 * 2 + 2 * 2  # CSVs, maps, counterfactuals, overlays
    assert sorted(p.relative_to(second) for p in second.rglob("*") if p.name not in saved and p.is_file()) == files
    outputs = [f for f in files if f.suffix != ".csv"]
    assert [f for f in outputs if (first / f).read_bytes() != (second / f).read_bytes()] == []
    rows = [list(csv.DictReader(open(out / "results.csv"))) for out in (first, second)]
    assert [{k: v for k, v in r.items() if k != "path"} for r in rows[0]] == [
        {k: v for k, v in r.items() if k != "path"} for r in rows[1]
    ]
    skipped = [Path(r["path"]).name for r in csv.DictReader(open(second / "skipped.csv"))]
    assert sorted(skipped[:2]) == ["notes.png", "truncated.jpg"]  # the header scan's, then the decoder's
    assert skipped[2:] == ["z_bad1.png", "z_bad2.png"] and len(result["skipped"]) == 4


@pytest.fixture
def fake_checkpoint(tmp_path) -> Path:
    """Only the hyper-parameters the run reads before it loads a model: the image size, the sampling defaults."""
    path = tmp_path / "fake.ckpt"
    torch.save(
        {
            "state_dict": {},
            "hyper_parameters": {
                "unet": {},
                "image_size": 64,
                "sampling": {"num_inference_steps": 5, "guidance_scale": 3.0},
            },
        },
        path,
    )
    return path


@pytest.mark.parametrize(
    "override, message",
    [
        ("input=/no/such/folder", "input: no such file or folder: /no/such/folder"),
        ("map.kind=signed", "bad configuration:\n  map.kind must be one of"),
        ("map.refined_sigma=-1.0", "bad configuration:\n  map.sigma, map.refined_sigma: pixels >= 0"),
        ("methods=[sdedit,gradcam]", "methods: unknown 'gradcam'"),
        ("tune.split=test", "never tuned on the test split"),
        ("sdedit.num_inference_steps=5", "sdedit: strength 0.1 of 5 steps runs no denoising step"),
        ("sdedit.num_inference_steps=null", "sdedit: strength 0.1 of 5 steps"),  # the checkpoint's 5 steps
        ("baselines.diffedit.num_maps=0", "baselines.diffedit: num_maps must be an integer >= 1"),
        ("baselines.reconstruction.method=mean_healthy", "baselines.reconstruction: method must be one of"),
        ("tune.inversion.inversion_depth=[0.5,1.5]", "inversion: inversion_depth must be in"),  # every grid point
    ],
)
def test_bad_requests_fail_before_any_model_is_loaded(fake_checkpoint, monkeypatch, override, message):
    monkeypatch.setattr(LatentDiffusionPipeline, "from_checkpoint", lambda *a, **k: pytest.fail("a model was loaded"))
    overrides = [f"checkpoint={fake_checkpoint}", override] + (["tune.enabled=true"] if "tune" in override else [])
    with pytest.raises(SystemExit, match=message) as exit_info:
        counterfactual_attribution.main(overrides)
    assert str(exit_info.value).startswith("attribution: ")


def test_a_good_request_reaches_the_model(fake_checkpoint, monkeypatch, tmp_path):
    """The counterpart of the above: the same fake checkpoint, no bad value, and the run goes on to load the model."""

    class Loaded(Exception):
        pass

    def load(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(LatentDiffusionPipeline, "from_checkpoint", load)
    with pytest.raises(Loaded):
        counterfactual_attribution.main(
            [
                f"checkpoint={fake_checkpoint}",
                f"output_dir={tmp_path / 'out'}",
                "sdedit.num_inference_steps=10",
                "num_images=1",
                "data.num_test=2",
                "data.num_train=4",
            ]
        )


def test_refined_maps_take_their_own_smoothing_and_no_other_method_does(checkpoints, tmp_path):
    """map.refined_sigma changes refined's maps only; at 0 px refined's map is exactly zero wherever its second pass
    kept the input (outside the edit mask), which smoothing would blur."""
    for sigma in ("0.0", "3.0"):
        run(checkpoints, tmp_path / sigma, "methods=[inversion,refined]", f"map.refined_sigma={sigma}")
    maps = {
        (sigma, method): np.stack([np.load(f) for f in sorted((tmp_path / sigma / "maps" / method).glob("*.npy"))])
        for sigma in ("0.0", "3.0")
        for method in ("inversion", "refined")
    }
    assert np.array_equal(maps["0.0", "inversion"], maps["3.0", "inversion"])
    assert not np.allclose(maps["0.0", "refined"], maps["3.0", "refined"])
    assert (maps["0.0", "refined"] == 0).mean() > (maps["3.0", "refined"] == 0).mean()


def test_tuning_searches_the_validation_split(checkpoints, tmp_path):
    report = run(
        checkpoints,
        tmp_path,
        "tune.enabled=true",
        "methods=[inversion]",
        "tune.num_images=4",
        "tune.inversion.inversion_depth=[0.5,1.0]",
        "tune.inversion.guidance_scale=[3.0]",
        "tune.map.kind=[positive]",
        "tune.map.sigma=[0.0,1.0]",
    )
    assert report["split"] == "val" and report["images"] == 4  # the first 4 val phantoms are all abnormal
    assert len(report["trials"]) == 4  # 2 depths x 1 guidance x 1 kind x 2 sigmas
    best = report["best"]["inversion"]
    assert best["auprc"] == max(t["auprc"] for t in report["trials"])
    assert json.loads((tmp_path / "tune.json").read_text())["best"]["inversion"] == best
    report["best"]["refined"] = {**best, "method": "refined"}  # the overrides name each method's own map smoothing
    inversion, refined = attribution.best_settings(report)
    assert inversion.endswith(f"map.sigma={best['map.sigma']}") and "refined_sigma" not in inversion
    assert refined.endswith(f"map.refined_sigma={best['map.sigma']}")
