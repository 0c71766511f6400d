"""Tests run what users run, shrunk: the real configs with ``experiment=smoke``, tiny networks, a few steps, on CPU."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from configs import compose  # noqa: E402

SMOKE = ["experiment=smoke"]


@pytest.fixture(autouse=True)
def _torch_threads():
    """Two cores on CI: keep every test on one thread pool size so timings and results are stable."""
    torch.set_num_threads(2)
    torch.manual_seed(0)


def smoke_config(name: str, tmp_path, *overrides: str):
    """The real config ``name`` shrunk by ``experiment=smoke``, logging under ``tmp_path``."""
    return compose(name, [*SMOKE, f"log_dir={tmp_path}", *overrides])


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> str:
    """An (untrained) smoke-sized 1-channel VAE exported in diffusers format, as stage 1 exports it."""
    cfg = compose("train_autoencoder", SMOKE)
    vae = AutoencoderKL(**OmegaConf.to_container(cfg.model.autoencoder.network))
    vae.register_to_config(scaling_factor=1.0)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path, safe_serialization=True)
    return str(path)


@pytest.fixture(scope="session")
def tiny_ldm(tiny_vae_dir):
    """A smoke-sized LatentDiffusionModule (random UNet) on the tiny VAE and the offline MiniLM."""
    from lightning_modules.latent_diffusion import LatentDiffusionModule

    cfg = compose("train", [*SMOKE, f"model.vae.path={tiny_vae_dir}"])
    model = OmegaConf.to_container(cfg.model)
    torch.manual_seed(0)
    return LatentDiffusionModule(
        vae=model["vae"], unet=model["unet"], prompt_encoder=model["prompt_encoder"],
        noise_scheduler=model["noise_scheduler"], p_uncond=model["p_uncond"], ema=model["ema"],
        optimizer=model["optimizer"], cache_latents=True, image_size=cfg.data.image_size,
        sampling={**model["sampling"], "normal_prompt": "no acute cardiopulmonary abnormality"},
    ).eval()
