"""Generation quality as in VALD-MD's tables: FID, SSIM and MS-SSIM per class and overall (docs/method.md).

Two comparisons, both against the real images: ``generated`` (text -> image from each real image's own prompt) and
``counterfactual`` (the healthy counterfactual of each real image). SSIM and MS-SSIM are paired: the counterfactual
with its own input, the generated image with the real image whose prompt it was given.

Every number is a torchmetrics state (sums and counts), so under DDP each rank updates with its own shard and
``compute()`` reduces the states over all ranks: the value is the one of the whole set. FID extractors: ``fid.py``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    structural_similarity_index_measure,
)

from datamodules.base import to_unit_range
from lightning_modules.fid import fid_metric, num_features
from lightning_modules.seeding import image_generators
from lightning_modules.settings import CounterfactualSettings, SamplingSettings

PAIRS = ("generated", "counterfactual")
OVERALL = "overall"
NORMAL = "Normal"
#: Wang et al.'s MS-SSIM exponents, finest scale first
WANG_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


# ---- MS-SSIM at small sizes ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MSSSIMSetting:
    scales: int
    kernel_size: int
    sigma: float
    betas: tuple[float, ...]


def _fits(image_size: int, scales: int, kernel_size: int) -> bool:
    """torchmetrics' own size check, and the window must fit the coarsest scale."""
    return (
        image_size >= 2**scales
        and image_size // max(1, scales - 1) ** 2 > kernel_size - 1
        and image_size >> (scales - 1) >= kernel_size
    )


def ms_ssim_setting(image_size: int) -> MSSSIMSetting:
    """The standard 11-px window (sigma 1.5) over as many of Wang et al.'s 5 scales as fit (>= 176 px for all 5),
    then a smaller window at 2 scales; the kept exponents are renormalised to sum to 1 as the 5 do.

    64 px gives 3 scales with the 11-px window (the dropped 8 and 4 px scales carry no structure anyway).
    """
    for kernel_size in (11, 9, 7, 5, 3):
        for scales in range(len(WANG_BETAS), 1, -1):
            if _fits(image_size, scales, kernel_size):
                kept = WANG_BETAS[:scales]
                # sigma scaled with the window: torchmetrics sizes its Gaussian from sigma, int(3.5 sigma + 0.5) * 2 + 1
                return MSSSIMSetting(scales, kernel_size, 1.5 * kernel_size / 11, tuple(b / sum(kept) for b in kept))
    raise ValueError(f"images of {image_size} px are too small for MS-SSIM (2 scales of a 3-px window need 6 px)")


# ---- the metrics --------------------------------------------------------------------------------------------------
def image_groups(labels: torch.Tensor, finding_names: Sequence[str]) -> list[list[str]]:
    """(B, K) finding labels -> the classes of each image: ``Normal`` with no finding, else every finding it has."""
    present = labels >= 0.5
    return [[name for name, p in zip(finding_names, row) if p] or [NORMAL] for row in present.tolist()]


class GenerationMetrics(nn.Module):
    """FID (one per extractor), SSIM and MS-SSIM of each pair, per class and overall.

    ``update(real, groups, generated=..., counterfactual=...)`` with images (B, 1, H, W) in [-1, 1];
    ``compute()`` -> ``{group: {"n": int, pair: {metric: float | None}}}`` (None: too few images for the metric,
    or a pair never given). Each FID's compute takes the eigenvalues of an F x F matrix (torchmetrics): for
    Inception's F = 2048 that is about a minute on a CPU, per class and pair.
    """

    def __init__(self, classes: Sequence[str], image_size: int, extractors: Mapping[str, nn.Module] | None = None):
        super().__init__()
        self.groups, self.pairs = (OVERALL, *classes), PAIRS
        self.extractors = nn.ModuleDict(extractors or {})
        self.ms_ssim = ms_ssim_setting(image_size)
        dims = {name: num_features(extractor, image_size) for name, extractor in self.extractors.items()}
        # images per group: of the real ones (the table's n) and of each pair (whether its metrics can be computed)
        self.counts = nn.ModuleDict(
            {group: nn.ModuleDict({role: SumMetric() for role in ("real", *self.pairs)}) for group in self.groups}
        )
        self.metrics = nn.ModuleDict(
            {
                group: nn.ModuleDict(
                    {
                        pair: nn.ModuleDict(
                            {
                                "ssim": MeanMetric(),  # of the per-image values: each image's SSIM is computed once
                                "ms_ssim": MeanMetric(),
                                **{name: fid_metric(dim) for name, dim in dims.items()},
                            }
                        )
                        for pair in self.pairs
                    }
                )
                for group in self.groups
            }
        )

    def settings(self) -> dict:
        """What the numbers depend on, for the table and metrics.json."""
        return {
            "ms_ssim": asdict(self.ms_ssim),
            "fid_extractors": {name: e.description for name, e in self.extractors.items()},
        }

    @torch.no_grad()
    def update(self, real: torch.Tensor, groups: Sequence[Sequence[str]], **candidates: torch.Tensor) -> None:
        self.add(self.measure(real, **candidates), groups)

    @torch.no_grad()
    def measure(self, real: torch.Tensor, **candidates: torch.Tensor) -> dict:
        """What a batch adds, per image: ``features`` {extractor: {role: (B, F)}} and ``similarity`` {pair: {metric:
        (B,)}}. A run spread over processes keeps these per unit and ``add``s them in order (runs/evaluation.py)."""
        unknown = sorted(set(candidates) - set(self.pairs))
        if unknown:
            raise ValueError(f"unknown pairs {unknown}; valid: {', '.join(self.pairs)}")
        images = {"real": real, **candidates}
        return {
            "features": {
                name: {role: extractor(x) for role, x in images.items()}  # (B, F) per image set
                for name, extractor in self.extractors.items()
            },
            "similarity": {pair: self.similarity(candidate, real) for pair, candidate in candidates.items()},
        }

    def add(self, measured: dict, groups: Sequence[Sequence[str]]) -> None:
        """A batch's ``measure`` into every group its images belong to (``groups``: each image's classes)."""
        features, similarity = measured["features"], measured["similarity"]
        for group in self.groups:
            index = [i for i, g in enumerate(groups) if group == OVERALL or group in g]
            if not index:
                continue
            self.counts[group]["real"].update(len(index))
            for pair in similarity:
                self.counts[group][pair].update(len(index))
                metrics = self.metrics[group][pair]
                for name, values in similarity[pair].items():
                    metrics[name].update(values[index])
                for name in self.extractors:
                    metrics[name].update(features[name]["real"][index], real=True)
                    metrics[name].update(features[name][pair][index], real=False)

    def similarity(self, candidate: torch.Tensor, real: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B,) SSIM and MS-SSIM of each pair, in [0, 1] image units (torchmetrics' functional forms)."""
        x, y = to_unit_range(candidate), to_unit_range(real)
        ms = self.ms_ssim
        return {
            "ssim": structural_similarity_index_measure(x, y, data_range=1.0, reduction="none"),
            "ms_ssim": multiscale_structural_similarity_index_measure(
                x, y, data_range=1.0, kernel_size=ms.kernel_size, sigma=ms.sigma, betas=ms.betas, reduction="none"
            ),
        }

    def compute(self) -> dict[str, dict]:
        """Every rank calls this (the states are reduced across ranks); all get the same numbers."""
        results = {}
        with warnings.catch_warnings():  # a rank whose shard had no image of a class still joins the reduction
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
            for group in self.groups:
                results[group] = {"n": int(self.counts[group]["real"].compute())}
                for pair in self.pairs:
                    n = int(self.counts[group][pair].compute())
                    results[group][pair] = {
                        name: float(metric.compute()) if n >= (2 if name.startswith("fid") else 1) else None
                        for name, metric in self.metrics[group][pair].items()
                    }
        return results

    def reset(self) -> None:
        for group in self.groups:
            for count in self.counts[group].values():
                count.reset()
            for pair in self.pairs:
                for metric in self.metrics[group][pair].values():
                    metric.reset()


def flatten(results: Mapping[str, dict], group: str = OVERALL) -> dict[str, float]:
    """``{"generated/ssim": 0.8, ...}`` of one group, leaving out what could not be computed (for loggers)."""
    return {
        f"{pair}/{name}": value
        for pair, values in results[group].items()
        if pair != "n"
        for name, value in values.items()
        if value is not None
    }


@torch.no_grad()
def evaluation_images(
    pipeline,
    batch: Mapping,
    generation: SamplingSettings,
    counterfactual: CounterfactualSettings,
    seed: int = 0,
    target_prompt: str | None = None,
) -> dict[str, torch.Tensor]:
    """A batch -> ``{"generated": ..., "counterfactual": ...}`` (B, 1, H, W) in [-1, 1], each image from its own seed.

    Generated images are prompted with each real image's own prompt; counterfactuals target ``target_prompt``
    (the pipeline's normal prompt by default).
    """
    images, ids = batch["image"], list(batch["id"])
    generated = pipeline.generate(
        list(batch["prompt"]), images.shape[-2], images.shape[-1], generation, image_generators(ids, seed)
    )
    counterfactuals = pipeline(images, counterfactual, target_prompt, image_generators(ids, seed)).images
    return {"generated": generated, "counterfactual": counterfactuals}
