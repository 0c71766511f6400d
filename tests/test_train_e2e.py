"""Both stages end to end with the smoke config, as `make train-autoencoder` / `make train` run them.

Every test that trains is marked slow; the stage-1 export is shared (module scope) and only read: each stage-2 run
logs under its own ``tmp_path``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from experiments import train, train_autoencoder

ROOT = Path(__file__).resolve().parents[1]


def _events(run_dir: Path) -> EventAccumulator:
    files = sorted(run_dir.glob("version_*/events.out.tfevents.*"))
    assert files, f"no TensorBoard events under {run_dir}"
    accumulator = EventAccumulator(str(files[-1].parent), size_guidance={"images": 0, "scalars": 0})
    return accumulator.Reload()


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> Path:
    """The log dir of one smoke stage-1 run (its VAE export under autoencoder/vae); tests read it, never write it."""
    log_dir = tmp_path_factory.mktemp("logs")
    export = train_autoencoder.main(["experiment=smoke", f"log_dir={log_dir}"])
    assert (export / "config.json").is_file() and (export / "diffusion_pytorch_model.safetensors").is_file()
    return log_dir


@pytest.mark.slow
def test_stage1_trains_logs_and_exports_a_diffusers_vae(stage1):
    from lightning_modules.vae import load_vae

    vae = load_vae(str(stage1 / "autoencoder" / "vae"))
    assert vae.config.in_channels == 1 and vae.config.scaling_factor > 0
    events = _events(stage1 / "autoencoder")
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "train/ssim", "train/d_loss", "train/d_weight", "train/logits_fake"} <= set(scalars)
    d_weight = [e.value for e in events.Scalars("train/d_weight")]
    assert d_weight[0] == 0 and d_weight[-1] > 0  # the adversarial term joins at disc_start (step 2 of 4)
    assert "autoencoder/input_over_reconstruction" in events.Tags()["images"]
    round_trip = json.loads((stage1 / "autoencoder" / "round_trip.json").read_text())
    assert 0 < round_trip["test/round_trip_mae"] < 1 and -1 < round_trip["test/round_trip_ssim"] < 1
    assert (next((stage1 / "autoencoder").glob("version_*")) / "config.yaml").is_file()


@pytest.mark.slow
def test_sample_grids_every_n_steps_and_the_final_model_once(stage1, tmp_path):
    train.main(
        [
            "experiment=smoke",
            f"log_dir={tmp_path}",
            f"model.vae.path={stage1 / 'autoencoder' / 'vae'}",
            "callbacks.samples.every_n_steps=2",
            "callbacks.samples.samples_per_prompt=1",
        ]
    )
    assert [image.step for image in _events(tmp_path / "ldm").Images("samples/prompt_rows")] == [2, 4]


@pytest.mark.slow
def test_stage2_trains_logs_samples_and_resumes(stage1, tmp_path):
    vae = f"model.vae.path={stage1 / 'autoencoder' / 'vae'}"
    trainer = train.main(["experiment=smoke", f"log_dir={tmp_path}", vae])
    assert trainer.global_step == 4
    run = tmp_path / "ldm"
    assert {"last.ckpt", "best.ckpt"} <= {p.name for p in (run / "checkpoints").iterdir()}
    events = _events(run)
    assert {"train/loss", "val/loss"} <= set(events.Tags()["scalars"])
    assert [image.step for image in events.Images("samples/prompt_rows")] == [4]  # the final model
    config = (next(run.glob("version_0")) / "config.yaml").read_text()
    assert "experiment: smoke" in config and "block_out_channels" in config
    environment = json.loads((run / "version_0" / "environment.json").read_text())
    assert environment["cpu_capability"] and environment["num_threads"] == torch.get_num_threads()

    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any(k.startswith(("vae.", "prompt_encoder.")) for k in checkpoint["state_dict"])
    assert checkpoint["ema"]["optimization_step"] == 4

    with pytest.raises(ValueError, match="already holds best.ckpt, last.ckpt from an earlier run"):
        train.main(["experiment=smoke", f"log_dir={tmp_path}", vae])  # nothing overwritten
    resumed = train.main(["experiment=smoke", f"log_dir={tmp_path}", vae, "ckpt_path=last", "trainer.max_steps=6"])
    assert resumed.global_step == 6
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["ema"]["optimization_step"] == 6 and checkpoint["global_step"] == 6


@pytest.mark.slow
def test_stage2_refuses_a_vae_it_was_not_trained_with(stage1, tmp_path, caplog):
    """Checkpoints name their VAE by path; the fingerprint they record catches a VAE replaced at that path."""
    from lightning_modules.checkpoints import CheckpointError
    from lightning_modules.pipeline import LatentDiffusionPipeline

    train.main(["experiment=smoke", f"log_dir={tmp_path}", f"model.vae.path={stage1 / 'autoencoder' / 'vae'}"])
    path = tmp_path / "ldm" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    assert set(checkpoint["frozen"]) == {"vae", "prompt_encoder"}
    LatentDiffusionPipeline.from_checkpoint(path)  # the parts it was trained with: fine
    checkpoint["frozen"]["vae"] = "0" * 16  # as if stage 1 had been retrained into the same folder since
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="trained with another vae .* allow_frozen_mismatch=true"):
        LatentDiffusionPipeline.from_checkpoint(path)
    LatentDiffusionPipeline.from_checkpoint(path, allow_frozen_mismatch=True)
    assert "going on: allow_frozen_mismatch=true" in caplog.text


@pytest.mark.slow
@pytest.mark.ddp
def test_stage2_under_ddp_with_two_cpu_processes(stage1, tmp_path):
    """`make train EXPERIMENT=smoke GPUS=2 ACCELERATOR=cpu`: two gloo processes train to completion."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        str(ROOT / "experiments" / "train.py"),
        "experiment=smoke",
        f"log_dir={tmp_path}",
        f"model.vae.path={stage1 / 'autoencoder' / 'vae'}",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distributed_backend=gloo" in result.stderr + result.stdout
    assert "All distributed processes registered. Starting with 2 processes" in result.stderr + result.stdout
    checkpoint = torch.load(tmp_path / "ldm" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 4


def test_bad_override_exits_with_the_valid_keys(capsys):
    with pytest.raises(SystemExit, match="valid keys at 'trainer'.*max_steps"):
        train.main(["experiment=smoke", "trainer.max_stepz=3"])


@pytest.mark.slow
def test_phantoms_written_in_the_covid_layout_train_through_the_covid_datamodule(stage1, tmp_path):
    """The real-data path end to end: phantoms on disk as the COVID-19 Radiography Database, smoke config."""
    from datamodules.synthetic import SyntheticCXRDataModule

    root = tmp_path / "COVID-19_Radiography_Dataset"
    counts = SyntheticCXRDataModule(image_size=64).write_covid_layout(root, split="train", limit=48)
    assert sum(counts.values()) == 48 and (root / "Viral Pneumonia" / "images").is_dir()
    trainer = train.main(
        [
            "experiment=smoke",
            "data=covid_radiography",
            f"data.root={root}",
            "data.image_size=64",
            f"log_dir={tmp_path / 'logs'}",
            f"model.vae.path={stage1 / 'autoencoder' / 'vae'}",
        ]
    )
    assert trainer.global_step == 4
    assert (tmp_path / "logs" / "ldm" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_same_seed_same_weights(tmp_path):
    """Reproducible: two runs with one seed export byte-identical VAEs; another seed does not."""
    from safetensors.torch import load_file

    def weights(name: str, seed: int) -> dict:
        export = train_autoencoder.main(["experiment=smoke", f"log_dir={tmp_path / name}", f"seed={seed}"])
        return load_file(export / "diffusion_pytorch_model.safetensors")

    first, second, other = weights("a", 0), weights("b", 0), weights("c", 1)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def _losses(run_dir: Path) -> dict[int, float]:
    """step -> train/loss over every version of a run (a resumed version re-logs the steps after its checkpoint)."""
    losses = {}
    for version in sorted(run_dir.glob("version_*"), key=lambda p: int(p.name.split("_")[1])):
        events = EventAccumulator(str(version), size_guidance={"scalars": 0}).Reload()
        losses.update({e.step: e.value for e in events.Scalars("train/loss")})
    return losses


def _kill_after_checkpoint(command: list[str], checkpoint: Path, step: int) -> None:
    """Start ``command``; SIGKILL it as soon as ``checkpoint`` holds global step >= ``step`` (mid-training)."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = None
    while process.poll() is None:
        stamp = checkpoint.stat().st_mtime_ns if checkpoint.exists() else None
        if stamp is not None and stamp != seen:
            seen = stamp
            if torch.load(checkpoint, weights_only=True, mmap=True)["global_step"] >= step:
                process.kill()  # SIGKILL: no handler, no last checkpoint written on the way out
                break
        time.sleep(0.02)
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{stderr[-2000:]}"


@pytest.mark.slow
def test_a_run_killed_and_resumed_ends_bit_identical_to_the_uninterrupted_run(stage1, tmp_path):
    """SIGKILL twice (in the first epoch, then past an epoch boundary) and resume: the same UNet, EMA and loss curve.
    20 images in batches of 8 make 3 batches an epoch, the last one short; checkpoints every 2 steps."""
    command = [
        sys.executable,
        "experiments/train.py",
        "experiment=smoke",
        f"model.vae.path={stage1 / 'autoencoder' / 'vae'}",
        "data.num_train=20",
        "data.num_val=8",
        "trainer.max_steps=12",
        "trainer.val_check_interval=2",
        "callbacks.samples.every_n_steps=100",
    ]
    subprocess.run([*command, f"log_dir={tmp_path / 'whole'}"], cwd=ROOT, check=True, capture_output=True)
    last = tmp_path / "killed" / "ldm" / "checkpoints" / "last.ckpt"
    killed = [*command, f"log_dir={tmp_path / 'killed'}"]
    _kill_after_checkpoint(killed, last, step=2)
    _kill_after_checkpoint([*killed, "ckpt_path=last"], last, step=6)
    subprocess.run([*killed, "ckpt_path=last"], cwd=ROOT, check=True, capture_output=True)

    whole = torch.load(tmp_path / "whole" / "ldm" / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(last, weights_only=True)
    assert whole["global_step"] == resumed["global_step"] == 12
    assert whole["state_dict"].keys() == resumed["state_dict"].keys()
    for key, weight in whole["state_dict"].items():
        assert torch.equal(weight, resumed["state_dict"][key]), key
    for a, b in zip(whole["ema"]["shadow_params"], resumed["ema"]["shadow_params"], strict=True):
        assert torch.equal(a, b)
    assert _losses(tmp_path / "whole" / "ldm") == _losses(tmp_path / "killed" / "ldm")


@pytest.mark.slow
def test_stage2_encodes_its_latent_store_once_and_trains_from_it(stage1, tmp_path, caplog):
    common = [
        "experiment=smoke",
        f"log_dir={tmp_path}",
        f"model.vae.path={stage1 / 'autoencoder' / 'vae'}",
        "latent_store.enabled=true",
        "data.num_train=16",
        "data.num_val=4",
    ]
    with caplog.at_level("WARNING"):
        first = train.main(common)
    assert "encoding the train and val splits into the latent store" in caplog.text
    store = first.lightning_module.latent_store
    assert len(store) == 20 and first.lightning_module._latent_cache == {}  # read from disk, nothing cached
    assert "image" not in next(iter(first.datamodule.train_dataloader()))  # no image decoded for training
    caplog.clear()
    with caplog.at_level("WARNING"):
        second = train.main([*common, "run_name=again"])
    assert "encoding" not in caplog.text and second.lightning_module.latent_store.path == store.path
