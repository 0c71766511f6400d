"""Stage 1: a KL-regularised ``diffusers.AutoencoderKL`` for 1-channel radiographs, exported in diffusers format."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from lightning_modules.optim import adamw_with_warmup, grad_scaled


class AutoencoderModule(L.LightningModule):
    """Reconstruction (L1 + MSE) plus ``kl_weight`` x KL, the KL weighted per pixel as LDM weighs it."""

    def __init__(
        self,
        network: dict,
        kl_weight: float = 1e-6,
        optimizer: dict | None = None,
        scaling_images: int = 2048,
        total_steps: int | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.vae = AutoencoderKL(**network)

    def forward(self, images: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(images).latent_dist
        latents = posterior.sample() if sample else posterior.mode()  # (B, C, H/f, W/f)
        return self.vae.decode(latents).sample, posterior.kl()  # (B, 1, H, W), (B,)

    def _common_step(self, batch: dict, stage: str) -> torch.Tensor:
        images = batch["image"]
        reconstructions, kl = self(images, sample=stage == "train")
        rec_loss = F.l1_loss(reconstructions, images) + F.mse_loss(reconstructions, images)
        kl_loss = kl.mean() / images[0].numel()
        loss = rec_loss + self.hparams.kl_weight * kl_loss
        on_step = stage == "train"
        self.log_dict(
            {f"{stage}/loss": loss, f"{stage}/rec_loss": rec_loss, f"{stage}/kl": kl_loss},
            on_step=on_step,
            on_epoch=not on_step,
            prog_bar=on_step,
            sync_dist=not on_step,
            batch_size=images.shape[0],
        )
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._common_step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._common_step(batch, "val")

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self(images, sample=False)[0].clamp(-1, 1)

    def configure_optimizers(self):
        return adamw_with_warmup(
            self.vae.parameters(),
            total_steps=self.hparams.total_steps,
            grad_scaled=grad_scaled(self),
            **(self.hparams.optimizer or {"lr": 1e-3}),
        )

    @torch.no_grad()
    def latent_scaling_factor(self, loader) -> float:
        """``1 / std(z)`` over posterior samples of ``scaling_images`` training images, as LDM sets ``scale_factor``."""
        count, total, total_sq, images = 0, 0.0, 0.0, 0
        for batch in loader:
            if images >= self.hparams.scaling_images:
                break
            images += len(batch["image"])
            z = self.vae.encode(batch["image"].to(self.device)).latent_dist.sample().double()
            count, total, total_sq = count + z.numel(), total + z.sum().item(), total_sq + z.square().sum().item()
        variance = total_sq / count - (total / count) ** 2
        return float(variance**-0.5)

    def export(self, directory: str | Path, scaling_factor: float) -> Path:
        """Write a diffusers ``AutoencoderKL`` directory (safetensors) that stage 2 loads like any pretrained VAE."""
        self.vae.register_to_config(scaling_factor=scaling_factor)
        self.vae.save_pretrained(directory, safe_serialization=True)
        return Path(directory)
