"""Ours, refined: a second, mask-restricted pass (RadEdit / DiffEdit style). The first counterfactual's map says where
the finding is; the second pass redraws only there toward the healthy prompt (the pipeline's masked latent blending)
and lays the result over the input, so healthy tissue is the input itself and the autoencoder's round-trip error
outside the edit never reaches the map."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from lightning_modules.attribution import attribution_map, normalize_per_image, signed_map
from lightning_modules.methods import Method, MethodOutput, Models, build, register
from lightning_modules.settings import COUNTERFACTUAL_METHODS, InductionSettings, SamplingSettings


@dataclass(frozen=True)
class EditMask:
    """Where the second pass may change the image: the first map (``kind``, smoothed by ``sigma`` pixels, scaled to
    [0, 1] per image) at or above ``fraction``, grown by ``dilate`` pixels so the lesion's rim is inside."""

    kind: str = "positive"
    sigma: float = 2.0
    fraction: float = 0.3
    dilate: int = 2

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction!r}")
        if isinstance(self.dilate, bool) or not isinstance(self.dilate, int) or self.dilate < 0:
            raise ValueError(f"dilate must be an integer number of pixels >= 0, got {self.dilate!r}")
        attribution_map(torch.zeros(1, 1, 1, 1), self.kind)  # an unknown kind fails now, not at the first batch

    def scores(self, images: torch.Tensor, counterfactuals: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) images and first-pass counterfactuals in [-1, 1] -> their map, scaled to [0, 1] per image."""
        return normalize_per_image(attribution_map(signed_map(images, counterfactuals), self.kind, self.sigma))

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) first-map ``scores`` -> binary edit masks; each holds at least its map's maximum."""
        mask = (scores >= self.fraction).to(scores.dtype)
        return F.max_pool2d(mask, 2 * self.dilate + 1, stride=1, padding=self.dilate) if self.dilate else mask


@register
class Refined(Method):
    """Block ``refined``: ``first`` (sdedit or inversion, with its own block's settings), the ``EditMask`` keys
    (kind, sigma, fraction, dilate), ``weigh_by_first`` and any key of the second pass's ``InductionSettings``
    (strength, feather, num_inference_steps, guidance_scale, ...; null steps and guidance are the checkpoint's).

    ``weigh_by_first``: the map is the second pass's change times the first map's scores, so a pixel ranks high only
    where both passes put the finding; inside the mask, its dilated rim (which the second pass may also redraw)
    ranks below the lesion's core."""

    name = "refined"
    config_key = "refined"
    counterfactual = True
    ours = True

    def __init__(
        self,
        first: Method,
        mask: EditMask,
        second: InductionSettings,
        weigh_by_first: bool,
        target_prompt: str | None = None,
    ):
        self.first, self.mask, self.second, self.target_prompt = first, mask, second, target_prompt
        self.weigh_by_first = weigh_by_first

    @classmethod
    def from_config(cls, cfg: DictConfig, defaults: SamplingSettings, **overrides: Any) -> Refined:
        block = cls.settings_block(cfg, overrides)
        first = block.pop("first", None)
        if first not in COUNTERFACTUAL_METHODS:
            raise ValueError(f"first must be one of {', '.join(COUNTERFACTUAL_METHODS)}, got {first!r}")
        weigh_by_first = block.pop("weigh_by_first")  # a bool: the config's types are checked when it is composed
        mask = EditMask(**{f.name: block.pop(f.name) for f in dataclasses.fields(EditMask) if f.name in block})
        second = InductionSettings.build(defaults, **{"paste": True, **block})
        return cls(build(first, cfg, defaults), mask, second, weigh_by_first, cfg.target_prompt)

    def __call__(
        self, images: torch.Tensor, models: Models, generator: torch.Generator, prompts: list[str] | None = None
    ) -> MethodOutput:
        pipeline = models.pipeline
        # 1. the first pass's counterfactual, its map and the edit mask from it
        first = self.first(images, models, generator).counterfactual.cpu()
        scores = self.mask.scores(images, first)  # (B, 1, H, W) in [0, 1]
        # 2. the second pass: the healthy prompt drawn inside the mask only, over the input's own pixels outside it
        healthy = self.target_prompt or pipeline.normal_prompt
        output = pipeline.induce(images, self.mask(scores), healthy, self.second, generator)
        return MethodOutput(counterfactual=output.images.cpu(), weight=scores if self.weigh_by_first else None)
