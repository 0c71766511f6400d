"""Baseline: one of our methods with guidance 0 (the null prompt): the input as the model would redraw it unprompted.

Its residual is the AnoDDPM-style anomaly map; against ours it isolates what the healthy prompt adds. The relative
latent error of the round trip, ||z_rec - z_0|| / ||z_0||, says how faithful that redrawing is.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from lightning_modules.methods import Method, MethodOutput, Models, register
from lightning_modules.pipeline import CounterfactualOutput, LatentDiffusionPipeline
from lightning_modules.settings import (
    COUNTERFACTUAL_METHODS,
    CounterfactualSettings,
    SamplingSettings,
    counterfactual_settings,
)


def reconstruct(
    pipeline: LatentDiffusionPipeline,
    images: torch.Tensor,
    settings: CounterfactualSettings,
    generator: torch.Generator | None = None,
) -> CounterfactualOutput:
    """The pipeline with ``settings`` but no guidance, which replaces every prompt by the null prompt."""
    return pipeline(images, dataclasses.replace(settings, guidance_scale=0.0), generator=generator)


def latent_error(pipeline: LatentDiffusionPipeline, images: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """(B,) ||latents - z_0|| / ||z_0||, z_0 the images' posterior mean (which inversion starts from)."""
    reference = pipeline.encode_image(images)
    return (latents - reference).flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1)


@register
class Reconstruction(Method):
    """Block ``baselines.reconstruction``: ``method`` (sdedit or inversion) run with that method's block at
    guidance 0."""

    name = "reconstruction"
    config_key = "baselines.reconstruction"
    counterfactual = True

    def __init__(self, settings: CounterfactualSettings):
        self.settings = settings  # the guidance scale is ignored: always 0

    @classmethod
    def from_config(cls, cfg: DictConfig, defaults: SamplingSettings, **overrides: Any) -> Reconstruction:
        method = cls.settings_block(cfg, overrides, keys=("method",))["method"]
        if method not in COUNTERFACTUAL_METHODS:
            raise ValueError(f"method must be one of {list(COUNTERFACTUAL_METHODS)}, got {method!r}")
        return cls(counterfactual_settings(method, defaults, **OmegaConf.to_container(cfg[method], resolve=True)))

    def __call__(
        self, images: torch.Tensor, models: Models, generator: torch.Generator, prompts: list[str] | None = None
    ) -> MethodOutput:
        output = reconstruct(models.pipeline, images, self.settings, generator)
        return MethodOutput(
            counterfactual=output.images, latent_error=latent_error(models.pipeline, images, output.latents).cpu()
        )
