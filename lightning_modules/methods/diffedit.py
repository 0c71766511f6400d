"""Baseline: DiffEdit's mask (Couairon et al. 2022), |eps(abnormal prompt) - eps(healthy prompt)| averaged over noise
draws at a mid strength, as diffusers' ``StableDiffusionDiffEditPipeline.generate_mask`` computes it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from lightning_modules.methods import Method, MethodOutput, Models, register
from lightning_modules.pipeline import LatentDiffusionPipeline
from lightning_modules.settings import SamplingSettings, check_integer


@dataclass(frozen=True)
class DiffEditSettings(SamplingSettings):
    """``generate_mask``'s settings, with its defaults: the latent is noised to the first timestep of ``strength``
    (as img2img) ``num_maps`` times."""

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    strength: float = 0.5
    num_maps: int = 10
    fraction_name: ClassVar[str] = "strength"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.guidance_scale == 0.0:
            raise ValueError("diffedit needs the prompts: guidance_scale 0 would replace both by the null prompt")
        check_integer("num_maps", self.num_maps, 1)


@torch.no_grad()
def diffedit_latent_map(
    pipeline: LatentDiffusionPipeline,
    images: torch.Tensor,
    abnormal_prompts: list[str],
    settings: DiffEditSettings,
    healthy_prompt: str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, 1, H, W) images in [-1, 1] -> (B, 1, h, w) DiffEdit guidance maps on the latent grid, before DiffEdit's
    clamp and threshold (the map stays continuous, so it can be ranked).

    Mirrors ``generate_mask``: ``num_maps`` posterior samples of each latent, each noised to the first timestep of
    ``strength`` (as img2img), one guided noise prediction under the source (abnormal) and one under the target
    (healthy) prompt, |difference| averaged over draws and latent channels.
    """
    batch, num_maps, guidance_scale = images.shape[0], settings.num_maps, settings.guidance_scale
    healthy_prompt = healthy_prompt or pipeline.normal_prompt
    # 1. encode prompts, one copy per draw
    source = pipeline.encode_prompt([p for p in abnormal_prompts for _ in range(num_maps)], guidance_scale)
    target = pipeline.encode_prompt([healthy_prompt] * batch * num_maps, guidance_scale)
    # 2. encode the image (one posterior sample per draw) and noise it at the strength's first timestep
    latents = pipeline.encode_image(images.repeat_interleave(num_maps, 0), generator, sample=True)  # (B*n, C, h, w)
    timestep = pipeline.timesteps(settings.num_inference_steps, settings.strength)[0]
    latents = pipeline.q_sample(latents, timestep, generator)
    # 3. predict the noise under both prompts
    noise_source = pipeline.predict_noise(latents, timestep, source, guidance_scale)
    noise_target = pipeline.predict_noise(latents, timestep, target, guidance_scale)
    # 4. |difference|, averaged over draws and channels
    difference = (noise_target - noise_source).abs().reshape(batch, num_maps, *latents.shape[1:])
    return difference.mean((1, 2))[:, None]  # (B, 1, h, w)


def diffedit_map(
    pipeline: LatentDiffusionPipeline,
    images: torch.Tensor,
    abnormal_prompts: list[str],
    settings: DiffEditSettings,
    healthy_prompt: str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``diffedit_latent_map`` upsampled bilinearly to the image grid: (B, 1, H, W)."""
    latent_map = diffedit_latent_map(pipeline, images, abnormal_prompts, settings, healthy_prompt, generator)
    return F.interpolate(latent_map, size=images.shape[-2:], mode="bilinear", align_corners=False)


@register
class DiffEdit(Method):
    """Block ``baselines.diffedit``: ``DiffEditSettings`` (null or absent: diffusers' defaults) and the
    ``abnormal_prompt``, the source prompt of an image the data gives no report for. The target is the healthy
    prompt (``target_prompt``)."""

    name = "diffedit"
    config_key = "baselines.diffedit"

    def __init__(self, settings: DiffEditSettings, abnormal_prompt: str, target_prompt: str | None = None):
        if not isinstance(abnormal_prompt, str) or not abnormal_prompt.strip():
            raise ValueError(f"abnormal_prompt must be a non-empty prompt, got {abnormal_prompt!r}")
        self.settings, self.abnormal_prompt, self.target_prompt = settings, abnormal_prompt, target_prompt

    @classmethod
    def from_config(cls, cfg: DictConfig, defaults: SamplingSettings, **overrides: Any) -> DiffEdit:
        block = cls.settings_block(cfg, overrides)
        abnormal_prompt = block.pop("abnormal_prompt", None)
        return cls(DiffEditSettings.build(None, **block), abnormal_prompt, cfg.target_prompt)

    def __call__(
        self, images: torch.Tensor, models: Models, generator: torch.Generator, prompts: list[str] | None = None
    ) -> MethodOutput:
        pipeline = models.pipeline
        sources = prompts or [self.abnormal_prompt] * images.shape[0]
        scores = diffedit_map(
            pipeline, images.to(pipeline.device), sources, self.settings, self.target_prompt, generator
        )
        return MethodOutput(map=scores.cpu())  # non-negative already
