"""Baseline: the finding classifier's saliency (Grad-CAM by default) for its "abnormal" output."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from lightning_modules.classifier import SALIENCY_METHODS
from lightning_modules.methods import Method, MethodOutput, Models, register
from lightning_modules.settings import SamplingSettings


@register
class Saliency(Method):
    """Block ``baselines.saliency``: ``method``, one of ``classifier.SALIENCY_METHODS`` (gradcam, gradient_x_input).
    Skipped when the run has no classifier checkpoint."""

    name = "saliency"
    config_key = "baselines.saliency"
    needs_classifier = True

    def __init__(self, method: str = "gradcam"):
        if method not in SALIENCY_METHODS:
            raise ValueError(f"unknown saliency method {method!r}; valid: {', '.join(SALIENCY_METHODS)}")
        self.method = method

    @classmethod
    def from_config(cls, cfg: DictConfig, defaults: SamplingSettings, **overrides: Any) -> Saliency:
        return cls(**cls.settings_block(cfg, overrides, keys=("method",)))

    def __call__(
        self, images: torch.Tensor, models: Models, generator: torch.Generator, prompts: list[str] | None = None
    ) -> MethodOutput:
        classifier = models.classifier
        scores = classifier.saliency(images.to(next(classifier.parameters()).device), method=self.method)
        return MethodOutput(map=scores.detach().cpu())
