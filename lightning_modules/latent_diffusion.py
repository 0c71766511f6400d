"""Stage 2: a text-conditioned denoiser trained on the frozen VAE's latents, with classifier-free guidance dropout.

image -> latent (frozen VAE, cached) -> noised latent (DDPM ``add_noise``) [+ inpainting condition] -> UNet(prompt
embeddings) -> loss.
"""

from __future__ import annotations

import contextlib
import functools
import zlib
from collections.abc import Callable, Iterator

import lightning as L
import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel, compute_snr

from lightning_modules import inpainting as inpaint
from lightning_modules.checkpoints import frozen_fingerprint
from lightning_modules.compiled_unet import compile_unet
from lightning_modules.components import FROZEN_PREFIXES, build_components, vae_scale_factor
from lightning_modules.optim import adamw_with_warmup, grad_scaled
from lightning_modules.pipeline import LatentDiffusionPipeline
from lightning_modules.prompt_encoder import NULL_PROMPT
from lightning_modules.vae import posterior


def drop_prompts(prompts: list[str], p_uncond: float, generator: torch.Generator | None = None) -> list[str]:
    """Replace each prompt by the null prompt with probability ``p_uncond``: what teaches the unconditional model."""
    drop = torch.rand(len(prompts), generator=generator) < p_uncond
    return [NULL_PROMPT if d else p for p, d in zip(prompts, drop.tolist())]


class LatentDiffusionModule(L.LightningModule):
    """Frozen VAE + frozen prompt encoder + trainable ``UNet2DConditionModel`` (with diffusers' EMA of its weights).

    Checkpoints hold the UNet, its EMA and the optimizer; the frozen parts are rebuilt from ``vae.path`` and
    ``prompt_encoder.name_or_path`` (kept in the hyper-parameters), so they are never duplicated per checkpoint.
    """

    def __init__(
        self,
        vae: dict,
        unet: dict,
        prompt_encoder: dict,
        noise_scheduler: dict,
        inpainting: dict | None = None,
        p_uncond: float = 0.15,
        snr_gamma: float | None = None,
        ema: dict | None = None,
        optimizer: dict | None = None,
        cache_latents: bool = True,
        image_size: int = 64,
        total_steps: int | None = None,
        sampling: dict | None = None,
        compile: bool = False,
    ):
        super().__init__()
        p_region = (inpainting or {}).get("p_region", 0.0)
        if not 0.0 <= p_region <= 1.0:
            raise ValueError(f"model.inpainting.p_region must be in [0, 1], got {p_region!r}")
        if snr_gamma is not None and not snr_gamma > 0:
            raise ValueError(f"model.snr_gamma must be a positive number or null (off), got {snr_gamma!r}")
        self.save_hyperparameters()
        self.vae, self.prompt_encoder, self.unet, self.noise_scheduler = build_components(
            vae, unet, prompt_encoder, noise_scheduler, image_size, inpainting
        )
        self.ema = EMAModel(self.unet.parameters(), **ema) if ema else None
        self.strict_loading = False  # frozen weights are not in our checkpoints
        self._latent_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        #: a LatentStore (lightning_modules/latent_store.py): latents read from disk instead of encoded or cached
        self.latent_store = None

    @functools.cached_property
    def training_unet(self) -> Callable:
        """The UNet as the training step calls it: ``torch.compile``d when ``compile`` is on. A cached attribute, not
        a submodule: checkpoints, the EMA, validation and sampling all use the one eager UNet and its weights."""
        return compile_unet(self.unet) if self.hparams.compile else self.unet

    @property
    def inpainting(self) -> bool:
        """The UNet takes the inpainting condition (lightning_modules/inpainting.py) besides the noised latent."""
        return self.unet.config.in_channels != self.vae.config.latent_channels

    @property
    def vae_scale_factor(self) -> int:
        return vae_scale_factor(self.vae)

    def train(self, mode: bool = True) -> LatentDiffusionModule:
        super().train(mode)
        self.vae.eval()
        return self

    # ---- image -> latent ------------------------------------------------------------------------------------
    @torch.no_grad()
    def latents(self, batch: dict, sample: bool) -> torch.Tensor:
        """(B, 1, H, W) images -> (B, C, h, w) scaled latents; the posterior of each image id is encoded once. With
        the latent store, by id alone (training batches then carry no image)."""
        ids = batch["id"]
        images = batch.get("image")
        if self.latent_store is not None:
            mean, std = (t.to(self.device) for t in self.latent_store.get(ids))
        elif not self.hparams.cache_latents:
            dist = posterior(self.vae, images)
            mean, std = dist.mean, dist.std
        else:
            for i, key in enumerate(ids):
                if key not in self._latent_cache:  # one image at a time: its latent is then the same bits whichever
                    dist = posterior(self.vae, images[i : i + 1])  # batch it first came in (a resumed run's)
                    self._latent_cache[key] = (dist.mean[0], dist.std[0])
            mean = torch.stack([self._latent_cache[key][0] for key in ids])
            std = torch.stack([self._latent_cache[key][1] for key in ids])
        latents = mean + std * torch.randn_like(mean) if sample else mean
        return latents * self.vae.config.scaling_factor

    # ---- noised latent -> UNet -> loss ----------------------------------------------------------------------
    def _common_step(self, batch: dict, stage: str) -> torch.Tensor:
        training = stage == "train"
        generator = None if training else torch.Generator(self.device).manual_seed(self._val_seed(batch))
        latents = self.latents(batch, sample=training)  # (B, C, h, w)
        prompts = drop_prompts(batch["prompt"], self.hparams.p_uncond) if training else batch["prompt"]
        embeddings = self.prompt_encoder(prompts)  # (B, L, D)

        noise = torch.randn(latents.shape, generator=generator, device=self.device)
        timesteps = torch.randint(
            0,
            self.noise_scheduler.config.num_train_timesteps,
            (latents.shape[0],),
            generator=generator,
            device=self.device,
        )
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)  # q_sample
        if self.inpainting:  # (B, 2C + 1, h, w): a random box to draw, or the whole image
            masks = inpaint.random_masks(
                latents.shape[0], latents.shape[-2:], self.hparams.inpainting["p_region"], generator, self.device
            )
            noisy_latents = torch.cat([noisy_latents, inpaint.condition(masks, latents)], dim=1)
        unet = self.training_unet if training else self.unet
        prediction = unet(noisy_latents, timesteps, encoder_hidden_states=embeddings).sample
        target = self.target(latents, noise, timesteps)
        if training and self.hparams.snr_gamma is not None:  # validation keeps the plain MSE: comparable curves
            per_image = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))  # (B,)
            loss = (per_image * self.min_snr_weights(timesteps)).mean()
        else:
            loss = F.mse_loss(prediction, target)
        self.log(
            f"{stage}/loss",
            loss,
            on_step=training,
            on_epoch=not training,
            prog_bar=True,
            sync_dist=not training,
            batch_size=latents.shape[0],
        )
        return loss

    def min_snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(B,) Min-SNR-gamma weights (Hang et al. 2023), as diffusers' train_text_to_image computes them: min(SNR,
        gamma) / SNR for epsilon targets (/ (SNR + 1) for v), so the many nearly noise-free steps stop dominating."""
        snr = compute_snr(self.noise_scheduler, timesteps)
        clipped = snr.clamp(max=self.hparams.snr_gamma)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            return clipped / (snr + 1)
        return clipped / snr

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        return noise

    @staticmethod
    def _val_seed(batch: dict) -> int:
        """Validation noise depends on the batch's ids only, so the curve is comparable across epochs and ranks."""
        return zlib.crc32("\n".join(batch["id"]).encode())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._common_step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        with self.ema_weights():
            return self._common_step(batch, "val")

    # ---- optimisation and EMA -------------------------------------------------------------------------------
    def configure_optimizers(self):
        return adamw_with_warmup(
            self.unet.parameters(),
            total_steps=self.hparams.total_steps,
            grad_scaled=grad_scaled(self),
            **(self.hparams.optimizer or {"lr": 1e-4}),
        )

    def on_fit_start(self) -> None:
        if self.ema is not None:
            self.ema.to(self.device)

    def on_before_zero_grad(self, optimizer) -> None:
        """Runs once per optimizer step (not per accumulated micro-batch): the EMA's step."""
        if self.ema is not None and self.trainer.training:
            self.ema.step(self.unet.parameters())

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Temporarily swap the EMA weights into the UNet (for validation, samples and export)."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.unet.parameters())
        self.ema.copy_to(self.unet.parameters())
        try:
            yield
        finally:
            self.ema.restore(self.unet.parameters())

    @contextlib.contextmanager
    def sampling_pipeline(self, compile: bool = False) -> Iterator[LatentDiffusionPipeline]:
        """A pipeline on this module's parts with the EMA weights, in eval mode; the training state (mode, weights)
        comes back however the block ends. What every callback that samples during training uses."""
        was_training = self.training
        self.eval()
        try:
            with self.ema_weights():
                yield LatentDiffusionPipeline.from_parts(
                    self.vae, self.unet, self.noise_scheduler, self.prompt_encoder, self.hparams.sampling, compile
                )
        finally:
            self.train(was_training)

    # ---- checkpoints ----------------------------------------------------------------------------------------
    @functools.cached_property
    def frozen_hashes(self) -> dict[str, str]:
        """Hashes of the frozen VAE and prompt encoder (they never change, so once per run)."""
        return frozen_fingerprint(vae=self.vae, prompt_encoder=self.prompt_encoder)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(FROZEN_PREFIXES)]:
            del state[key]
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()
        checkpoint["frozen"] = self.frozen_hashes  # sampling checks it: the parts are stored by path only

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])
            self.ema.to(self.device)
