"""The system a GPU user trains (`model=gpu`: 256 px, 8x VAE, the (128, 256, 512) cross-attention UNet), built and
run end to end on the CPU in float32 at batch 1: the same code a GPU runs, only the trainer settings differ."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import counterfactual_attribution, train, train_autoencoder, zero_shot_induction
from tests.test_train_e2e import _events

#: model=gpu at full size; only the run is short (2 steps, batch 1, 2-step samplers) and compilation off
GPU = [
    "model=gpu",
    "model.compile=false",
    "data.image_size=256",
    "data.batch_size=1",
    "data.eval_batch_size=1",
    "data.num_train=2",
    "data.num_val=1",
    "data.num_test=2",
    "trainer.max_steps=2",
    "trainer.limit_val_batches=0",
    "trainer.enable_progress_bar=false",
]


@pytest.mark.slow
def test_the_gpu_model_trains_samples_attributes_and_induces_on_the_cpu(tmp_path):
    vae = train_autoencoder.main([*GPU, f"log_dir={tmp_path}"])
    config = json.loads((vae / "config.json").read_text())
    assert config["block_out_channels"] == [64, 128, 256, 256]  # 8x downsampling: 32x32 latents at 256 px

    trainer = train.main(
        [
            *GPU,
            f"log_dir={tmp_path}",
            f"model.vae.path={vae}",
            "model.sampling.num_inference_steps=2",
            "callbacks.samples.samples_per_prompt=1",
        ]
    )
    assert trainer.global_step == 2
    unet = trainer.lightning_module.unet
    assert tuple(unet.config.block_out_channels) == (128, 256, 512) and unet.config.sample_size == 32
    assert [image.step for image in _events(tmp_path / "ldm").Images("samples/prompt_rows")] == [2]
    checkpoint = tmp_path / "ldm" / "checkpoints" / "last.ckpt"

    attribution = counterfactual_attribution.main(
        [
            f"checkpoint={checkpoint}",
            "classifier_checkpoint=null",
            f"output_dir={tmp_path / 'attribution'}",
            "progress=false",
            *(o for o in GPU if o.startswith("data.")),
            "num_images=2",
            "batch_size=1",
            "methods=[sdedit,inversion]",
            "sdedit.num_inference_steps=2",
            "sdedit.strength=0.5",
            "inversion.num_inference_steps=2",
        ]
    )
    assert {"sdedit", "inversion"} <= set(attribution["methods"])
    maps = sorted((tmp_path / "attribution" / "maps").rglob("*.npy"))
    assert len(maps) == 4 and all(np.load(m).shape[-2:] == (256, 256) for m in maps)  # 2 images x 2 methods

    induced = zero_shot_induction.main(
        [
            f"checkpoint={checkpoint}",
            "classifier_checkpoint=null",
            f"output_dir={tmp_path / 'induction'}",
            *(o for o in GPU if o.startswith("data.")),
            "num_images=1",
            "batch_size=1",
            "seeds=[0]",
            "induction.num_inference_steps=2",
            "finding=effusion",
            "zone=right-lower",
        ]
    )
    assert 0 < induced["inside_fraction"] <= 1
