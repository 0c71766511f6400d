"""Stage 1: a KL-regularised ``diffusers.AutoencoderKL`` for 1-channel radiographs, exported in diffusers format."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch.func import functional_call
from torchmetrics.functional.image import structural_similarity_index_measure

from lightning_modules.discriminator import PatchDiscriminator, hinge_d_loss
from lightning_modules.optim import adamw_with_warmup, grad_scaled

#: images are in [-1, 1]
DATA_RANGE = 2.0


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean SSIM (11 px Gaussian window) of images in [-1, 1]: the structural loss term and the round trip score."""
    return structural_similarity_index_measure(a, b, data_range=DATA_RANGE)


class AutoencoderModule(L.LightningModule):
    """Latent diffusion's autoencoder objective (Rombach et al. 2022, after VQGAN, Esser et al. 2021):

        L = |x - x̂| + |x - x̂|² + w_struct (1 - SSIM(x, x̂)) + w_kl KL + λ · [step >= disc_start] · L_G

    with ``L_G = -mean D(x̂)`` from a PatchGAN discriminator ``D`` trained with the hinge loss, and VQGAN's adaptive
    ``λ = w_disc · ‖∇L_rec‖ / ‖∇L_G‖`` at the decoder's last layer, so the adversarial term never outweighs the
    reconstruction. The KL is weighted per pixel as LDM weighs it. The structural term keeps thin, low-contrast edges
    (ribs, clavicles) that L1 averages away; LDM's LPIPS term needs ImageNet weights a 1-channel phantom has no use for.

    One optimizer holds both networks: the generator's adversarial term sees ``D`` with detached parameters, and ``D``
    is trained on detached reconstructions, so one backward pass gives each network only its own gradients (and
    Lightning's automatic optimization, clipping, DDP and resume work as for every other stage). Before
    ``disc_start`` the discriminator's loss is multiplied by 0 (its parameters stay in the graph for DDP).
    """

    def __init__(
        self,
        network: dict,
        kl_weight: float = 1e-6,
        structural_weight: float = 0.0,
        discriminator: dict | None = None,
        disc_start: int = 0,
        disc_weight: float = 0.0,
        optimizer: dict | None = None,
        scaling_images: int = 2048,
        total_steps: int | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.vae = AutoencoderKL(**network)
        self.discriminator = (
            PatchDiscriminator(in_channels=network.get("in_channels", 3), **(discriminator or {}))
            if disc_weight > 0
            else None
        )

    def forward(self, images: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(images).latent_dist
        latents = posterior.sample() if sample else posterior.mode()  # (B, C, H/f, W/f)
        return self.vae.decode(latents).sample, posterior.kl()  # (B, 1, H, W), (B,)

    def adaptive_weight(self, rec_loss: torch.Tensor, g_loss: torch.Tensor) -> torch.Tensor:
        """VQGAN's λ: the ratio of the two losses' gradient norms at the decoder's last layer, times ``disc_weight``."""
        last_layer = self.vae.decoder.conv_out.weight
        rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach() * self.hparams.disc_weight

    def _common_step(self, batch: dict, stage: str) -> torch.Tensor:
        images = batch["image"]
        reconstructions, kl = self(images, sample=stage == "train")
        structure = ssim(reconstructions, images)
        rec_loss = (
            F.l1_loss(reconstructions, images)
            + F.mse_loss(reconstructions, images)
            + self.hparams.structural_weight * (1.0 - structure)
        )
        kl_loss = kl.mean() / images[0].numel()
        loss = rec_loss + self.hparams.kl_weight * kl_loss
        logs = {
            f"{stage}/loss": loss,
            f"{stage}/rec_loss": rec_loss,
            f"{stage}/kl": kl_loss,
            f"{stage}/ssim": structure,
        }
        if stage == "train" and self.discriminator is not None:
            loss = loss + self._adversarial_terms(images, reconstructions, rec_loss, logs)
        on_step = stage == "train"
        self.log_dict(
            logs, on_step=on_step, on_epoch=not on_step, prog_bar=on_step, sync_dist=not on_step, batch_size=len(images)
        )
        return loss

    def _adversarial_terms(self, images, reconstructions, rec_loss, logs: dict) -> torch.Tensor:
        """λ·L_G for the autoencoder plus the discriminator's hinge loss, both 0 before ``disc_start``."""
        logits_real = self.discriminator(images)
        logits_fake = self.discriminator(reconstructions.detach())
        d_loss = hinge_d_loss(logits_real, logits_fake)
        logs.update(
            {"train/d_loss": d_loss, "train/logits_real": logits_real.mean(), "train/logits_fake": logits_fake.mean()}
        )
        if self.global_step < self.hparams.disc_start:  # no generator pass or gradient norms yet: D stays in the graph
            logs["train/d_weight"] = torch.zeros((), device=images.device)
            return 0.0 * d_loss
        frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        g_loss = -functional_call(self.discriminator, frozen, (reconstructions,)).mean()  # (B, 1, h, w) logits
        weight = self.adaptive_weight(rec_loss, g_loss)
        logs.update({"train/g_loss": g_loss, "train/d_weight": weight})
        return weight * g_loss + d_loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._common_step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._common_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        """The round trip that bounds every counterfactual: per-image SSIM and mean absolute error, averaged."""
        images = batch["image"]
        reconstructions = self.reconstruct(images)
        self.log_dict(
            {
                "test/round_trip_ssim": ssim(reconstructions, images),
                "test/round_trip_mae": (reconstructions - images).abs().mean() / DATA_RANGE,  # grey levels in [0, 1]
            },
            sync_dist=True,
            batch_size=len(images),
        )

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self(images, sample=False)[0].clamp(-1, 1)

    def configure_optimizers(self):
        groups = [{"params": list(self.vae.parameters())}]
        if self.discriminator is not None:
            groups.append({"params": list(self.discriminator.parameters())})
        return adamw_with_warmup(
            groups,
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
