"""Ours, SDEdit: noise the image latent to ``strength`` of the schedule and denoise toward the healthy prompt."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from lightning_modules.methods import Method, MethodOutput, Models, register
from lightning_modules.settings import CounterfactualSettings, SamplingSettings, counterfactual_settings


@register
class SDEdit(Method):
    """The pipeline's healthy counterfactual with ``SDEditSettings`` (block ``sdedit``: strength, guidance_scale,
    num_inference_steps; null or absent steps and guidance are the checkpoint's). ``Inversion`` differs only in its
    settings class, which picks the pipeline's other path."""

    name = "sdedit"
    config_key = "sdedit"
    counterfactual = True
    ours = True

    def __init__(self, settings: CounterfactualSettings, target_prompt: str | None = None):
        """``target_prompt``: the healthy prompt; None = the one stored with the checkpoint."""
        self.settings, self.target_prompt = settings, target_prompt

    @classmethod
    def from_config(cls, cfg: DictConfig, defaults: SamplingSettings, **overrides: Any) -> SDEdit:
        settings = counterfactual_settings(cls.name, defaults, **cls.settings_block(cfg, overrides))
        return cls(settings, cfg.target_prompt)

    def __call__(
        self, images: torch.Tensor, models: Models, generator: torch.Generator, prompts: list[str] | None = None
    ) -> MethodOutput:
        output = models.pipeline(images, self.settings, self.target_prompt, generator)
        return MethodOutput(counterfactual=output.images)
