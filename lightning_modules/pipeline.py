"""Sampling from a trained latent diffusion model: text-to-image, healthy counterfactuals and zero-shot induction.

Reads like a diffusers pipeline and is built, like one, from models and a scheduler only: check inputs, encode prompt,
encode image, prepare latents, denoise with guidance, decode. Two ways to reach the counterfactual (docs/method.md):

* ``sdedit``: noise the image latent to the step set by ``strength`` and denoise toward the healthy prompt; this is
  exactly what diffusers' ``StableDiffusionImg2ImgPipeline`` does (tests check the outputs are equal);
* ``inversion``: deterministic DDIM inversion with the null prompt to ``inversion_depth`` of the schedule
  (abduction), then guided DDIM decoding toward the healthy prompt (action and prediction).

``induce`` is the reverse edit (zero-shot localized disease induction): a finding drawn into a region of a normal
image by latent blending, as diffusers' ``StableDiffusionInpaintPipeline`` does for plain 4-channel UNets; a UNet
trained with the inpainting condition (``lightning_modules.inpainting``) also sees the region and what surrounds it.
Every call takes its settings as one typed object (``lightning_modules.settings``), validated when it is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMInverseScheduler, DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from lightning_modules import inpainting as inpaint
from lightning_modules.attribution import signed_map
from lightning_modules.checkpoints import check_frozen, frozen_fingerprint, read_checkpoint
from lightning_modules.compiled_unet import compile_unet
from lightning_modules.components import build_components, vae_scale_factor
from lightning_modules.prompt_encoder import NULL_PROMPT
from lightning_modules.regions import feather_mask, latent_mask
from lightning_modules.settings import (
    CounterfactualSettings,
    InductionSettings,
    InversionSettings,
    SamplingSettings,
    SDEditSettings,
)
from lightning_modules.vae import decode, encode

DEFAULT_NORMAL_PROMPT = "no acute cardiopulmonary abnormality"
BACKGROUND_LR = 0.05  # Adam step on the scaled latents (unit variance) for background reconstruction


@dataclass
class CounterfactualOutput:
    images: torch.Tensor  # (B, 1, H, W) counterfactuals in [-1, 1]
    latents: torch.Tensor  # (B, C, h, w) their latents
    attribution: torch.Tensor  # (B, 1, H, W) signed map x_a - x_n


@dataclass
class InductionOutput:
    images: torch.Tensor  # (B, 1, H, W) normal images with the finding induced, in [-1, 1]
    latents: torch.Tensor  # (B, C, h, w) their latents: the original's outside the region (grown by
    #   background_grow cells when background_steps > 0)
    difference: torch.Tensor  # (B, 1, H, W) signed map x_induced - x_normal
    decoded: torch.Tensor  # (B, 1, H, W) the blended latents decoded, before any paste
    round_trip: torch.Tensor  # (B, 1, H, W) the original latent decoded: decoded - round_trip is the edit alone


class LatentDiffusionPipeline:
    def __init__(
        self,
        vae,
        unet,
        scheduler: DDIMScheduler,
        prompt_encoder,
        normal_prompt: str = DEFAULT_NORMAL_PROMPT,
        sampling: SamplingSettings | None = None,
        compile: bool = False,
    ):
        """``sampling``: the model's default steps and guidance (stored with its checkpoint). ``compile``: run the
        UNet ``torch.compile``d (the same weights): faster once compiled, which costs every new input shape a
        compilation first (`make bench` measures both)."""
        #: the UNet takes the inpainting condition besides the latent (more input channels than the latent has)
        self.inpainting = unet.config.in_channels != vae.config.latent_channels
        self.unet = compile_unet(unet) if compile else unet
        self.vae, self.scheduler, self.prompt_encoder = vae, scheduler, prompt_encoder
        self.inverse_scheduler = DDIMInverseScheduler.from_config(scheduler.config)
        self.normal_prompt = normal_prompt
        self.sampling = sampling or SamplingSettings()

    @classmethod
    def from_parts(
        cls,
        vae,
        unet,
        noise_scheduler: DDPMScheduler,
        prompt_encoder,
        sampling: Mapping[str, Any] | None = None,
        compile: bool = False,
    ) -> LatentDiffusionPipeline:
        """The training parts plus a checkpoint's ``sampling`` hyper-parameters (DDIM scheduler options, default steps
        and guidance, the normal prompt)."""
        sampling = sampling or {}
        scheduler = DDIMScheduler.from_config(noise_scheduler.config, **sampling.get("scheduler", {}))
        return cls(
            vae,
            unet,
            scheduler,
            prompt_encoder,
            sampling.get("normal_prompt", DEFAULT_NORMAL_PROMPT),
            SamplingSettings.from_hparams(sampling),
            compile,
        )

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        use_ema: bool = True,
        compile: bool = False,
        allow_frozen_mismatch: bool = False,
    ) -> LatentDiffusionPipeline:
        """A stage-2 checkpoint -> its pipeline, without the training module: the frozen parts are rebuilt from the
        paths in its hyper-parameters (and must match the fingerprint it recorded, unless ``allow_frozen_mismatch``),
        the UNet gets the checkpoint's EMA weights (``use_ema``) or its raw ones."""
        checkpoint = read_checkpoint(path, "stage-2 latent diffusion")
        hparams = checkpoint["hyper_parameters"]
        vae, prompt_encoder, unet, noise_scheduler = build_components(**hparams)
        current = frozen_fingerprint(vae=vae, prompt_encoder=prompt_encoder)
        check_frozen(path, checkpoint.get("frozen"), current, allow_frozen_mismatch)
        prefix = "unet."
        state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        missing, unexpected = unet.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {path} does not match its UNet: missing {missing}, unexpected {unexpected}")
        if use_ema and "ema" in checkpoint:  # diffusers' EMAModel: shadow parameters in unet.parameters() order
            with torch.no_grad():
                for param, shadow in zip(unet.parameters(), checkpoint["ema"]["shadow_params"], strict=True):
                    param.copy_(shadow)
        return cls.from_parts(
            vae.to(device),
            unet.to(device).eval(),
            noise_scheduler,
            prompt_encoder.to(device).eval(),
            hparams.get("sampling"),
            compile,
        )

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # 1. check inputs (the settings were validated when they were built) ------------------------------------
    @staticmethod
    def check_inputs(images: torch.Tensor, settings: CounterfactualSettings) -> None:
        if not isinstance(settings, (SDEditSettings, InversionSettings)):
            raise TypeError(f"settings must be SDEditSettings or InversionSettings, got {type(settings).__name__}")
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"images must be (B, 1, H, W), got {tuple(images.shape)}")

    # 2. encode prompt -----------------------------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str], guidance_scale: float) -> torch.Tensor:
        """(B,) prompts -> (2B, L, D) [null; prompt] embeddings under guidance, else (B, L, D).

        ``guidance_scale`` 1 is the conditional model alone and 0 the unconditional one: one UNet call, not two.
        """
        if guidance_scale == 0.0:
            prompts = [NULL_PROMPT] * len(prompts)
        conditional = self.prompt_encoder(prompts).to(self.device)
        if not self.do_guidance(guidance_scale):
            return conditional
        return torch.cat([self.prompt_encoder([NULL_PROMPT] * len(prompts)).to(self.device), conditional])

    @staticmethod
    def do_guidance(guidance_scale: float) -> bool:
        return guidance_scale not in (0.0, 1.0)

    # 3. encode image ------------------------------------------------------------------------------------------
    def encode_image(
        self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False
    ) -> torch.Tensor:
        return encode(self.vae, images.to(self.device), generator, sample)  # (B, C, h, w)

    # 4. prepare latents ---------------------------------------------------------------------------------------
    def timesteps(self, num_inference_steps: int, fraction: float) -> torch.Tensor:
        """The last ``int(num_inference_steps * fraction)`` DDIM timesteps, as img2img's ``get_timesteps``."""
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        start = num_inference_steps - min(int(num_inference_steps * fraction), num_inference_steps)
        return self.scheduler.timesteps[start * self.scheduler.order :]

    def q_sample(
        self, latents: torch.Tensor, timestep: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        noise = randn_tensor(latents.shape, generator=generator, device=self.device, dtype=latents.dtype)
        return self.scheduler.add_noise(latents, noise, timestep.repeat(latents.shape[0]))

    @torch.no_grad()
    def invert(
        self, latents: torch.Tensor, num_inference_steps: int, depth: float, prompt: str = NULL_PROMPT
    ) -> torch.Tensor:
        """Deterministic DDIM forward (abduction): z_0 -> z_t at ``depth`` of the schedule, under ``prompt``."""
        self.inverse_scheduler.set_timesteps(num_inference_steps, device=self.device)
        steps = min(int(num_inference_steps * depth), num_inference_steps)
        embeddings = self.prompt_encoder([prompt] * latents.shape[0]).to(self.device)
        for t in self.inverse_scheduler.timesteps[:steps]:
            noise_pred = self.unet(self.unet_input(latents, None), t, encoder_hidden_states=embeddings).sample
            latents = self.inverse_scheduler.step(noise_pred, t, latents).prev_sample
        return latents

    # 5. denoise with guidance ---------------------------------------------------------------------------------
    def unet_input(self, latents: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        """(B, C, h, w) -> what the UNet takes: the latents, with an inpainting UNet followed by ``condition``
        (B, C + 1, h, w), by default the whole-image one (``inpainting.unknown``)."""
        if not self.inpainting:
            return latents
        return torch.cat([latents, inpaint.unknown(latents) if condition is None else condition], dim=1)

    def predict_noise(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        embeddings: torch.Tensor,
        guidance_scale: float,
        condition: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not self.do_guidance(guidance_scale):
            model_input = self.unet_input(self.scheduler.scale_model_input(latents, t), condition)
            return self.unet(model_input, t, encoder_hidden_states=embeddings).sample
        if condition is not None:
            condition = torch.cat([condition] * 2)
        model_input = self.unet_input(self.scheduler.scale_model_input(torch.cat([latents] * 2), t), condition)
        noise_uncond, noise_cond = self.unet(model_input, t, encoder_hidden_states=embeddings).sample.chunk(2)
        return noise_uncond + guidance_scale * (noise_cond - noise_uncond)  # (B, C, h, w)

    @torch.no_grad()
    def denoise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        embeddings: torch.Tensor,
        guidance_scale: float,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        for t in timesteps:
            noise_pred = self.predict_noise(latents, t, embeddings, guidance_scale)
            latents = self.scheduler.step(noise_pred, t, latents, generator=generator).prev_sample
        return latents

    # 6. decode ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode(self.vae, latents)  # (B, 1, H, W) in [-1, 1]

    @torch.no_grad()
    def __call__(
        self,
        images: torch.Tensor,
        settings: CounterfactualSettings,
        target_prompt: str | list[str] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> CounterfactualOutput:
        """Abnormal images (B, 1, H, W) in [-1, 1] -> their healthy counterfactuals and attribution maps."""
        self.check_inputs(images, settings)
        steps, guidance = settings.num_inference_steps, settings.guidance_scale
        images = images.to(self.device)
        prompts = self._prompts(target_prompt or self.normal_prompt, images.shape[0])
        embeddings = self.encode_prompt(prompts, guidance)

        if isinstance(settings, SDEditSettings):
            latents = self.encode_image(images, generator, sample=True)  # as img2img: a posterior sample
            timesteps = self.timesteps(steps, settings.strength)
            latents = self.q_sample(latents, timesteps[:1], generator)
        else:
            latents = self.invert(self.encode_image(images), steps, settings.inversion_depth)
            timesteps = self.timesteps(steps, settings.inversion_depth)

        latents = self.denoise(latents, timesteps, embeddings, guidance, generator)
        counterfactuals = self.decode(latents)
        return CounterfactualOutput(counterfactuals, latents, signed_map(images, counterfactuals))

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        height: int,
        width: int,
        settings: SamplingSettings | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Text -> images (B, 1, H, W) in [-1, 1], with the model's default settings unless given."""
        settings = settings or self.sampling
        embeddings = self.encode_prompt(prompts, settings.guidance_scale)
        factor = vae_scale_factor(self.vae)
        shape = (len(prompts), self.vae.config.latent_channels, height // factor, width // factor)
        latents = randn_tensor(shape, generator=generator, device=self.device) * self.scheduler.init_noise_sigma
        timesteps = self.timesteps(settings.num_inference_steps, 1.0)
        return self.decode(self.denoise(latents, timesteps, embeddings, settings.guidance_scale, generator))

    @staticmethod
    def check_induction_inputs(
        images: torch.Tensor, region_masks: torch.Tensor, prompt: str | list[str], settings: InductionSettings
    ) -> None:
        if not isinstance(settings, InductionSettings):
            raise TypeError(f"settings must be InductionSettings, got {type(settings).__name__}")
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"images must be (B, 1, H, W), got {tuple(images.shape)}")
        if (
            region_masks.ndim != 4
            or region_masks.shape[1] != 1
            or region_masks.shape[-2:] != images.shape[-2:]
            or region_masks.shape[0] not in (1, images.shape[0])
        ):
            raise ValueError(
                f"region_masks must be (B or 1, 1, H, W) like the images {tuple(images.shape)}, "
                f"got {tuple(region_masks.shape)}"
            )
        if region_masks.min() < 0 or region_masks.max() > 1 or not region_masks.flatten(1).any(1).all():
            raise ValueError("region_masks must be in [0, 1] and name at least one pixel of every image")
        if any(not p.strip() for p in ([prompt] if isinstance(prompt, str) else prompt)):
            raise ValueError("the finding prompt is empty: zero-shot induction needs the finding to draw")

    @torch.no_grad()
    def induce(
        self,
        images: torch.Tensor,
        region_masks: torch.Tensor,
        prompt: str | list[str],
        settings: InductionSettings,
        generator: torch.Generator | None = None,
    ) -> InductionOutput:
        """Zero-shot localized disease induction (method.md §3): normal images (B, 1, H, W) in [-1, 1], regions
        (B or 1, 1, H, W) in [0, 1] and a finding prompt -> the finding drawn inside the regions only.

        The region is imposed by latent blending, exactly as diffusers' ``StableDiffusionInpaintPipeline`` does for
        4-channel UNets (tests check the outputs are equal); a UNet trained with the inpainting condition is also given
        the region and the original latent outside it at every call, so it draws knowing the context. After every
        step the latent outside the region is replaced by the original latent re-noised, with the starting noise, to
        the *next* timestep (after the last step, the original latent itself). The region reaches latent resolution
        as a binary mask (``latent_mask``). ``feather`` (pixels) softens the region's edge; ``paste`` then lays the
        decoded result over the original pixels through that mask, so outside the region the image is the original
        rather than its VAE round trip (whose error outside the region can exceed the edit inside it). ``resample``
        > 1 repeats every step but the last after re-noising it (RePaint, Lugmayr et al. 2022), so the region and its
        known surroundings are harmonised instead of only pasted together.
        """
        self.check_induction_inputs(images, region_masks, prompt, settings)
        guidance_scale, paste = settings.guidance_scale, settings.paste
        images = images.to(self.device)
        batch_size = images.shape[0]
        masks = feather_mask(
            region_masks.to(self.device, images.dtype).expand(batch_size, -1, -1, -1), settings.feather
        )
        embeddings = self.encode_prompt(self._prompts(prompt, batch_size), guidance_scale)

        original = self.encode_image(images, generator, sample=True)  # (B, C, h, w), a posterior sample as inpainting
        mask = latent_mask(masks, original.shape[-2:])  # (B, 1, h, w)
        condition = inpaint.condition(mask, original) if self.inpainting else None  # (B, C + 1, h, w)
        timesteps = self.timesteps(settings.num_inference_steps, settings.strength)
        noise = randn_tensor(original.shape, generator=generator, device=self.device, dtype=original.dtype)
        if (
            settings.strength == 1.0
        ):  # as diffusers: pure noise, not the image noised to the first (not quite last) timestep
            latents = noise * self.scheduler.init_noise_sigma
        else:
            latents = self.scheduler.add_noise(original, noise, timesteps[:1].repeat(batch_size))

        for i, t in enumerate(timesteps):
            last = i == len(timesteps) - 1
            for u in range(1 if last else settings.resample):
                if u > 0:  # RePaint: back from the next timestep to t, so the region is re-drawn with its context
                    latents = self.renoise(latents, timesteps[i + 1], t, generator)
                noise_pred = self.predict_noise(latents, t, embeddings, guidance_scale, condition)
                latents = self.scheduler.step(noise_pred, t, latents, generator=generator).prev_sample
                known = (
                    original
                    if last
                    else self.scheduler.add_noise(original, noise, timesteps[i + 1 : i + 2].repeat(batch_size))
                )
                latents = mask * latents + (1 - mask) * known

        round_trip = self.decode(original)
        if settings.background_steps:
            latents = self.reconstruct_background(latents, round_trip, masks, mask, settings)
        decoded = self.decode(latents)
        induced = masks * decoded + (1 - masks) * images if paste else decoded
        return InductionOutput(induced, latents, signed_map(induced, images), decoded, round_trip)

    def reconstruct_background(
        self,
        latents: torch.Tensor,
        round_trip: torch.Tensor,
        masks: torch.Tensor,
        mask: torch.Tensor,
        settings: InductionSettings,
    ) -> torch.Tensor:
        """Blended Latent Diffusion's background reconstruction (Avrahami et al. 2023), fitted on latents instead of
        the decoder's weights. The decoder spreads a changed latent cell over its neighbours, so half of a blended
        edit's decoded change lands outside the region (``edit_inside_fraction``). Here the latent cells of the
        region, grown by ``background_grow`` cells (``mask``: (B, 1, h, w)), take ``background_steps`` Adam steps on
        the L1 distance between their decoding and the goal: the blended result's decoding inside the pixel region
        (``masks``: (B, 1, H, W)), the original's ``round_trip`` outside. Every other cell stays the original's."""
        grow = settings.background_grow
        free = F.max_pool2d(mask, 2 * grow + 1, stride=1, padding=grow)  # (B, 1, h, w): the region grown
        goal = masks * self.decode(latents) + (1 - masks) * round_trip  # (B, 1, H, W)
        fitted = latents.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([fitted], lr=BACKGROUND_LR)
        with torch.enable_grad():
            for _ in range(settings.background_steps):
                decoded = decode(self.vae, free * fitted + (1 - free) * latents)  # not self.decode: no_grad
                loss = (decoded - goal).abs().sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return (free * fitted + (1 - free) * latents).detach()

    def renoise(
        self, latents: torch.Tensor, t_from: torch.Tensor, t_to: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """q(x_to | x_from) for t_to > t_from: the forward process over the gap between two DDIM timesteps
        (RePaint's jump; ``RePaintScheduler.undo_step`` takes one DDPM step at a time)."""
        alphas = self.scheduler.alphas_cumprod
        ratio = alphas[int(t_to)] / alphas[int(t_from)]
        fresh = randn_tensor(latents.shape, generator=generator, device=self.device, dtype=latents.dtype)
        return ratio.sqrt().to(latents.dtype) * latents + (1 - ratio).sqrt().to(latents.dtype) * fresh

    @staticmethod
    def _prompts(prompt: str | list[str], batch_size: int) -> list[str]:
        prompts = [prompt] * batch_size if isinstance(prompt, str) else list(prompt)
        if len(prompts) != batch_size:
            raise ValueError(f"{len(prompts)} prompts for {batch_size} images")
        return prompts
