"""What several test files share: smoke configs, the tiny stage-2 model, synthetic images and metric stand-ins.

Imported by ``conftest.py`` (which turns the model builders into fixtures) and by the test files themselves with
``from tests.helpers import ...``; never import one test file from another.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from configs import compose

SMOKE = ["experiment=smoke"]
NORMAL_PROMPT = "no acute cardiopulmonary abnormality"
#: the groups of the generation metrics tests: the normal class and two findings
CLASSES = ("Normal", "nodule", "effusion")


def smoke_config(name: str, tmp_path, *overrides: str):
    """The real config ``name`` shrunk by ``experiment=smoke``, logging under ``tmp_path``."""
    return compose(name, [*SMOKE, f"log_dir={tmp_path}", *overrides])


# ---- the tiny stage-2 model -------------------------------------------------------------------------------------
def tiny_ldm_arguments(vae_dir: str) -> dict[str, Any]:
    """``LatentDiffusionModule`` arguments of ``train.yaml`` with ``experiment=smoke`` on the VAE at ``vae_dir``."""
    cfg = compose("train", [*SMOKE, f"model.vae.path={vae_dir}"])
    model = OmegaConf.to_container(cfg.model)
    return dict(
        vae=model["vae"],
        unet=model["unet"],
        prompt_encoder=model["prompt_encoder"],
        noise_scheduler=model["noise_scheduler"],
        p_uncond=model["p_uncond"],
        ema=model["ema"],
        optimizer=model["optimizer"],
        cache_latents=True,
        image_size=cfg.data.image_size,
        sampling={**model["sampling"], "normal_prompt": NORMAL_PROMPT},
    )


def build_tiny_ldm(vae_dir: str, **overrides: Any):
    """A fresh smoke-sized ``LatentDiffusionModule`` in eval mode; its random UNet is the same for every call."""
    from lightning_modules.latent_diffusion import LatentDiffusionModule

    torch.manual_seed(0)
    return LatentDiffusionModule(**{**tiny_ldm_arguments(vae_dir), **overrides}).eval()


def pipeline_of(module, compile: bool = False):
    """The sampling pipeline on a module's parts (the raw UNet weights, as they are), as a checkpoint would give it."""
    from lightning_modules.pipeline import LatentDiffusionPipeline

    return LatentDiffusionPipeline.from_parts(
        module.vae, module.unet, module.noise_scheduler, module.prompt_encoder, module.hparams.sampling, compile
    )


def ldm_batch(n: int = 4, size: int = 64, seed: int = 0) -> dict:
    """A training batch of random images with a finding prompt and the normal prompt alternating."""
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(n, 1, size, size, generator=g) * 2 - 1,
        "prompt": ["nodule in the left lower zone", NORMAL_PROMPT] * (n // 2),
        "id": [f"train-{i}" for i in range(n)],
    }


def model_fingerprint(module) -> dict[str, Any]:
    """Everything a test could change in a shared ``LatentDiffusionModule`` (weights, EMA, modes, caches,
    hyper-parameters, attention processors, gradients), cheap to compare; the prompt cache may grow."""
    state = {name: (float(t.double().sum()), float(t.double().abs().sum())) for name, t in module.state_dict().items()}
    ema = module.ema
    return {
        "state": state,
        "ema": None
        if ema is None
        else (
            [float(p.double().sum()) for p in ema.shadow_params],
            ema.optimization_step,
            getattr(ema, "temp_stored_params", None) is None,
        ),
        "modes": [m.training for m in module.modules()],
        "requires_grad": [p.requires_grad for p in module.parameters()],
        "grads": [p.grad is None for p in module.parameters()],
        "hparams": OmegaConf.to_container(OmegaConf.create(dict(module.hparams))),
        "latent_cache": len(module._latent_cache),
        "attention": sorted({type(p).__name__ for p in module.unet.attn_processors.values()}),
        "patched": sorted(k for m in module.modules() for k in vars(m) if k in ("forward", "encode", "decode")),
        "compiled": "training_unet" in vars(module),
    }


# ---- images and metric stand-ins --------------------------------------------------------------------------------
def smooth_images(n: int, seed: int, shift: float = 0.0, size: int = 64) -> torch.Tensor:
    """(n, 1, size, size) images in [-1, 1] with some spatial structure (for SSIM), seeded."""
    g = torch.Generator().manual_seed(seed)
    smooth = F.avg_pool2d(torch.rand(n, 1, size, size, generator=g), 5, stride=1, padding=2)
    return (smooth * 2 - 1 + shift).clamp(-1, 1)


class PooledPixels(torch.nn.Module):
    """A parameter-free "classifier" whose features are 3x3 average-pooled pixels: (B, 1, H, W) -> (B, 9)."""

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images, 3).flatten(1)


def classifier_checkpoint(path: Path, finding_names: Sequence[str]) -> Path:
    """An (untrained) FindingClassifier of the CPU model config, saved as a Lightning checkpoint holds it."""
    from lightning_modules.classifier import FindingClassifier

    network = OmegaConf.to_container(compose("train").model.classifier.network)
    classifier = FindingClassifier(finding_names=tuple(finding_names), network=network)
    torch.save({"hyper_parameters": dict(classifier.hparams), "state_dict": classifier.state_dict()}, path)
    return path
