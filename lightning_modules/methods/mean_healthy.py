"""Baseline: the mean healthy training image as every input's counterfactual, the crudest "what should be here"."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from lightning_modules.methods import Method, MethodOutput, Models, register
from lightning_modules.settings import SamplingSettings, check_integer


def mean_healthy_image(dataset: Dataset, num_images: int = 512) -> torch.Tensor:
    """(1, H, W) mean of the first ``num_images`` samples of ``dataset`` without findings (label all zero)."""
    total, count = None, 0
    for i in range(len(dataset)):
        sample = dataset[i]
        if sample["label"].any():
            continue
        total = sample["image"].clone() if total is None else total + sample["image"]
        count += 1
        if count == num_images:
            break
    if total is None:
        raise ValueError("no healthy image (label all zero) in the dataset: cannot build the mean healthy image")
    return total / count


@register
class MeanHealthy(Method):
    """Block ``baselines.mean_healthy``: ``num_images`` healthy images of the data's train split averaged."""

    name = "mean_healthy"
    config_key = "baselines.mean_healthy"
    counterfactual = True
    needs_train_split = True

    def __init__(self, num_images: int = 512):
        check_integer("num_images", num_images, 1)
        self.num_images = num_images
        self.image: torch.Tensor | None = None  # (1, 1, H, W) in [-1, 1], set by ``prepare``

    @classmethod
    def from_config(cls, cfg: DictConfig, defaults: SamplingSettings, **overrides: Any) -> MeanHealthy:
        return cls(**cls.settings_block(cfg, overrides, keys=("num_images",)))

    def prepare(self, models: Models) -> None:
        self.image = mean_healthy_image(models.train_split, self.num_images)[None]

    def __call__(
        self, images: torch.Tensor, models: Models, generator: torch.Generator, prompts: list[str] | None = None
    ) -> MethodOutput:
        if self.image is None:
            raise RuntimeError("MeanHealthy.prepare(models) must run before the first batch")
        return MethodOutput(counterfactual=self.image.expand_as(images))
