"""Generation quality as in VALD-MD's tables: FID, SSIM and MS-SSIM per class and overall (method.md §4).

Two comparisons, both against the real images: ``generated`` (text -> image from each real image's own prompt) and
``counterfactual`` (the healthy counterfactual of each real image). SSIM and MS-SSIM are paired: the counterfactual
with its own input, the generated image with the real image whose prompt it was given.

Every number is a torchmetrics state (sums and counts), so under DDP each rank updates with its own shard and
``compute()`` reduces the states over all ranks: the value is the one of the whole set.

FID is labelled by its feature extractor and never mixed up:

* ``fid``: torchmetrics' Inception-v3 FID with torch-fidelity's weights file (found locally, never downloaded);
* ``fid_domain``: the same Fréchet distance on the penultimate features of our finding classifier, which works
  offline; its values are not comparable with Inception FIDs in papers.

``prompt_fidelity`` asks the same classifier whether generated images show what their prompt names; it is a plain
function of all the scores at once (one process), not a DDP state.
"""

from __future__ import annotations

import warnings
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.functional.image import (multiscale_structural_similarity_index_measure,
                                           structural_similarity_index_measure)
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3

from datamodules.base import to_unit_range
from lightning_modules.classifier import ABNORMAL

PAIRS = ("generated", "counterfactual")
OVERALL = "overall"
NORMAL = "Normal"
#: torch-fidelity's Inception-v3 (the TF FID network, converted), as torchmetrics' FID loads it
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
#: Wang et al.'s MS-SSIM exponents, finest scale first
WANG_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


# ---- FID feature extractors ---------------------------------------------------------------------------------------
def inception_weights_dir() -> Path:
    """Where ``torch.hub`` (and so torch-fidelity) looks for the weights: ``$TORCH_HOME/hub/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_inception_weights(path: str | None = None) -> Path:
    """The Inception weights file: ``path`` if given, else torch.hub's checkpoints dir; a clear error if absent."""
    candidate = Path(path) if path else inception_weights_dir() / INCEPTION_WEIGHTS
    if not candidate.is_file():
        raise FileNotFoundError(
            f"Inception FID needs torch-fidelity's weights file and nothing is downloaded: no file at {candidate}. "
            f"Put {INCEPTION_WEIGHTS} (from https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
            f"{INCEPTION_WEIGHTS}) in {inception_weights_dir()} (or set TORCH_HOME), or pass its path "
            "(fid.inception_weights=...); or use fid_domain, which needs no download")
    return candidate


class InceptionFeatures(nn.Module):
    """(B, 1, H, W) grey images in [-1, 1] -> (B, 2048) Inception-v3 pool features, as torchmetrics' FID takes them.

    The file is opened with ``weights_only=True`` first, so torch-fidelity's own (unrestricted) load only ever
    sees a plain state dict.
    """

    description = "Inception-v3 pool3 (2048-d), torchmetrics/torch-fidelity weights"
    num_features = 2048

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        path = find_inception_weights(weights_path)
        torch.load(path, map_location="cpu", weights_only=True)
        self.inception = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(self.num_features)],
                                            feature_extractor_weights_path=str(path))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        rgb = to_unit_range(images).expand(-1, 3, -1, -1)  # (B, 3, H, W) in [0, 1]
        return self.inception((rgb * 255).byte())  # uint8, resized to 299 inside, as torchmetrics' normalize=True


class DomainFeatures(nn.Module):
    """(B, 1, H, W) images in [-1, 1] -> (B, F) penultimate features of a classifier with a ``features`` method.

    The offline FID (``fid_domain``): a network trained on these images knows which differences matter, but its
    numbers are on its own scale, not Inception's.
    """

    def __init__(self, classifier: nn.Module, description: str = "finding classifier penultimate features"):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.description = description

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images)


def build_extractors(inception: bool | str = "auto", inception_weights: str | None = None,
                     classifier_checkpoint: str | None = None) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The FID extractors to use, by metric name, and why each other one was left out.

    ``inception``: ``True`` requires the weights (a clear error names where they go), ``"auto"`` uses them when
    present, ``False`` never. ``fid_domain`` is used when ``classifier_checkpoint`` is an existing file.
    """
    if inception not in (True, False, "auto"):
        raise ValueError(f"fid inception must be true, false or auto, got {inception!r}")
    extractors, skipped = {}, {}
    if inception is True or (inception == "auto" and inception_weights):
        extractors["fid"] = InceptionFeatures(inception_weights)
    elif inception == "auto":
        try:
            extractors["fid"] = InceptionFeatures()
        except FileNotFoundError as err:
            skipped["fid"] = str(err)
    else:
        skipped["fid"] = "Inception FID switched off (fid.inception=false)"
    if classifier_checkpoint and Path(classifier_checkpoint).is_file():
        from lightning_modules.classifier import FindingClassifier

        extractors["fid_domain"] = DomainFeatures(FindingClassifier.from_checkpoint(classifier_checkpoint),
                                                  f"finding classifier {classifier_checkpoint}, penultimate layer")
    else:
        skipped["fid_domain"] = (f"no classifier checkpoint at {classifier_checkpoint} "
                                 "(train one with `make train-classifier`)")
    return extractors, skipped


class _Features(nn.Identity):
    """Features are extracted once per image and shared by every group's FID: the FID's own "network" is identity."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features


@torch.no_grad()
def _num_features(extractor: nn.Module, image_size: int) -> int:
    """F of an extractor: its ``num_features``, else the width of its output on one blank image."""
    device = next(extractor.parameters(), torch.empty(0)).device
    return getattr(extractor, "num_features", None) or \
        extractor(torch.zeros(1, 1, image_size, image_size, device=device)).shape[-1]


def _fid(num_features: int) -> FrechetInceptionDistance:
    fid = FrechetInceptionDistance(feature=_Features(num_features))
    fid.orig_dtype = torch.float32  # set by update(); a DDP rank whose shard had no image of a class still computes
    return fid


# ---- MS-SSIM at small sizes ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MSSSIMSetting:
    scales: int
    kernel_size: int
    sigma: float
    betas: tuple[float, ...]


def _fits(image_size: int, scales: int, kernel_size: int) -> bool:
    """torchmetrics' own size check, and the window must fit the coarsest scale."""
    return (image_size >= 2 ** scales and image_size // max(1, scales - 1) ** 2 > kernel_size - 1
            and image_size >> (scales - 1) >= kernel_size)


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
                return MSSSIMSetting(scales, kernel_size, 1.5 * kernel_size / 11,
                                     tuple(b / sum(kept) for b in kept))
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
        dims = {name: _num_features(extractor, image_size) for name, extractor in self.extractors.items()}
        # images per group: of the real ones (the table's n) and of each pair (whether its metrics can be computed)
        self.counts = nn.ModuleDict({group: nn.ModuleDict({role: SumMetric() for role in ("real", *self.pairs)})
                                     for group in self.groups})
        self.metrics = nn.ModuleDict({
            group: nn.ModuleDict({
                pair: nn.ModuleDict({
                    "ssim": MeanMetric(),  # of the per-image values: each image's SSIM is computed once
                    "ms_ssim": MeanMetric(),
                    **{name: _fid(dim) for name, dim in dims.items()},
                }) for pair in self.pairs
            }) for group in self.groups
        })

    def settings(self) -> dict:
        """What the numbers depend on, for the table and metrics.json."""
        return {"ms_ssim": asdict(self.ms_ssim),
                "fid_extractors": {name: e.description for name, e in self.extractors.items()}}

    @torch.no_grad()
    def update(self, real: torch.Tensor, groups: Sequence[Sequence[str]], **candidates: torch.Tensor) -> None:
        unknown = sorted(set(candidates) - set(self.pairs))
        if unknown:
            raise ValueError(f"unknown pairs {unknown}; valid: {', '.join(self.pairs)}")
        images = {"real": real, **candidates}
        features = {name: {role: extractor(x) for role, x in images.items()}  # (B, F) per image set
                    for name, extractor in self.extractors.items()}
        similarity = {pair: self.similarity(candidate, real) for pair, candidate in candidates.items()}
        for group in self.groups:
            index = [i for i, g in enumerate(groups) if group == OVERALL or group in g]
            if not index:
                continue
            self.counts[group]["real"].update(len(index))
            for pair in candidates:
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
        return {"ssim": structural_similarity_index_measure(x, y, data_range=1.0, reduction="none"),
                "ms_ssim": multiscale_structural_similarity_index_measure(
                    x, y, data_range=1.0, kernel_size=ms.kernel_size, sigma=ms.sigma, betas=ms.betas,
                    reduction="none")}

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
    return {f"{pair}/{name}": value for pair, values in results[group].items() if pair != "n"
            for name, value in values.items() if value is not None}


# ---- prompt fidelity ----------------------------------------------------------------------------------------------
def _mean(values: torch.Tensor) -> float | None:
    return float(values.mean()) if values.numel() else None


def prompt_fidelity(probabilities: Mapping[str, torch.Tensor], labels: torch.Tensor, finding_names: Sequence[str],
                    label_mask: torch.Tensor | None = None) -> dict[str, dict]:
    """Whether images show what their prompt names, as the independent finding classifier sees it.

    ``probabilities``: per image set (``generated``, ``real``) the classifier's (N, K + 1) outputs, columns in
    ``finding_names`` order then "abnormal"; image i of every set belongs to prompt i, whose findings are ``labels``
    (N, K). Row f compares p(f) on the images whose prompt names f with p(f) on the normal ones (no finding and,
    with a ``label_mask``, none unknown); row ``Normal`` compares p(abnormal) on the normal ones with it on those
    naming any finding. ``auroc``: how well that output separates the two sets (torchmetrics' binary AUROC, the
    finding side positive), so on the real images it is the ceiling the classifier itself reaches. An image with
    several findings counts for each; None where a set is empty.
    """
    present = labels >= 0.5  # (N, K)
    known = torch.ones_like(present) if label_mask is None else label_mask >= 0.5
    normal, abnormal = ~present.any(1) & known.all(1), present.any(1)  # (N,)
    # row -> (output column, images on the finding side, images on the normal side)
    rows = {name: (k, present[:, k], normal) for k, name in enumerate(finding_names)}
    rows[NORMAL] = (len(finding_names), abnormal, normal)
    fidelity = {}
    for row, (column, finding, healthy) in rows.items():
        prompted, reference = (healthy, finding) if row == NORMAL else (finding, healthy)
        fidelity[row] = {"score": ABNORMAL if row == NORMAL else row,
                         "reference": "any finding" if row == NORMAL else NORMAL,
                         "n": int(prompted.sum()), "n_reference": int(reference.sum())}
        both, separable = finding | healthy, bool(finding.any() and healthy.any())
        for images, p in probabilities.items():
            score = p[:, column].float()  # (N,)
            fidelity[row][images] = {
                "p_prompted": _mean(score[prompted]), "p_reference": _mean(score[reference]),
                "auroc": float(binary_auroc(score[both], finding[both].long())) if separable else None}
    return fidelity


# ---- the images measured ------------------------------------------------------------------------------------------
def spread_indices(length: int, count: int | None) -> list[int]:
    """``count`` indices evenly spread over ``range(length)`` (all of them for None): datasets stored class by class
    (COVID-19 Radiography) then give every class its share, where the first ``count`` would give one class."""
    count = length if count is None else min(count, length)
    return [round(i * (length - 1) / (count - 1)) for i in range(count)] if count > 1 else list(range(count))


def image_generators(ids: Sequence[str], seed: int) -> list[torch.Generator]:
    """One generator per image, seeded by its id: the same noise whatever the batch, the order or the DDP rank."""
    return [torch.Generator("cpu").manual_seed(seed + zlib.crc32(i.encode())) for i in ids]


@torch.no_grad()
def evaluation_images(pipeline, batch: Mapping, generation: Mapping, counterfactual: Mapping,
                      seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch -> ``{"generated": ..., "counterfactual": ...}`` (B, 1, H, W) in [-1, 1], each from its own seed.

    ``generation``: ``num_inference_steps``, ``guidance_scale`` (prompts: each real image's own);
    ``counterfactual``: the ``CounterfactualPipeline`` settings (method, steps, guidance, strength / depth).
    """
    images, ids = batch["image"], list(batch["id"])
    generated = pipeline.generate(list(batch["prompt"]), images.shape[-2], images.shape[-1],
                                  generation["guidance_scale"], generation["num_inference_steps"],
                                  image_generators(ids, seed))
    counterfactuals = pipeline(images, generator=image_generators(ids, seed), **counterfactual).images
    return {"generated": generated, "counterfactual": counterfactuals}
