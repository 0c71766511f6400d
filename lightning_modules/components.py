"""The stage-2 model's parts, built in one place from a checkpoint's hyper-parameters.

Training (``LatentDiffusionModule``) and sampling (``LatentDiffusionPipeline.from_checkpoint``) both call
``build_components``, so a checkpoint always rebuilds the network it was trained with, and sampling never needs the
training module (optimizer, EMA, caches).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from lightning_modules.inpainting import in_channels
from lightning_modules.prompt_encoder import PromptEncoder
from lightning_modules.vae import load_vae

#: state-dict prefixes of the frozen parts: rebuilt from their paths, never stored in our checkpoints
FROZEN_PREFIXES = ("vae.", "prompt_encoder.")


class Components(NamedTuple):
    vae: AutoencoderKL
    prompt_encoder: PromptEncoder
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler


def vae_scale_factor(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def build_components(
    vae: dict,
    unet: dict,
    prompt_encoder: dict,
    noise_scheduler: dict,
    image_size: int = 64,
    inpainting: dict | None = None,
    **_: Any,
) -> Components:
    """Frozen VAE and prompt encoder from disk, a fresh UNet sized to them (with the inpainting condition's input
    channels when ``inpainting`` is enabled), the training noise scheduler.

    Takes a checkpoint's ``hyper_parameters`` as keyword arguments; the keys that configure training only are ignored.
    """
    frozen_vae = load_vae(**vae)
    encoder = PromptEncoder(**prompt_encoder)
    network = UNet2DConditionModel(
        sample_size=image_size // vae_scale_factor(frozen_vae),
        in_channels=in_channels(frozen_vae.config.latent_channels, bool(inpainting and inpainting.get("enabled"))),
        out_channels=frozen_vae.config.latent_channels,
        cross_attention_dim=encoder.hidden_size,
        **unet,
    )
    return Components(frozen_vae, encoder, network, DDPMScheduler(**noise_scheduler))
