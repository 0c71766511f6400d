"""The frozen autoencoder's two directions, for our 1-channel VAE and for pretrained RGB ones alike."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL


def load_vae(path: str, subfolder: str | None = None) -> AutoencoderKL:
    """Any diffusers ``AutoencoderKL`` directory: ours from stage 1, or e.g. a Stable Diffusion VAE on disk."""
    try:
        vae = AutoencoderKL.from_pretrained(path, subfolder=subfolder, low_cpu_mem_usage=False)
    except OSError as err:
        raise FileNotFoundError(
            f"no diffusers AutoencoderKL at '{path}'{f' (subfolder {subfolder})' if subfolder else ''}: "
            "train one with `make train-autoencoder` or point model.vae.path at a pretrained VAE directory"
        ) from err
    return vae.eval().requires_grad_(False)


def posterior(vae: AutoencoderKL, images: torch.Tensor):
    """(B, 1, H, W) images in [-1, 1] -> the unscaled posterior over (B, C, H/f, W/f) latents."""
    if vae.config.in_channels == 3 and images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)  # grey -> RGB for a pretrained VAE
    return vae.encode(images).latent_dist


def encode(
    vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False
) -> torch.Tensor:
    """Images -> scaled latents: the posterior mean, or a sample drawn with ``generator`` as img2img draws it."""
    dist = posterior(vae, images)
    latents = dist.sample(generator) if sample else dist.mode()
    return latents * vae.config.scaling_factor


def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> (B, 1, H, W) images in [-1, 1]."""
    images = vae.decode(latents / vae.config.scaling_factor).sample
    if images.shape[1] == 3:
        images = images.mean(dim=1, keepdim=True)  # RGB -> grey
    return images.clamp(-1.0, 1.0)
