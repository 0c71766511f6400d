"""FID feature extractors, labelled so that two FIDs are never mixed up (docs/method.md):

* ``fid``: torchmetrics' Inception-v3 FID with torch-fidelity's weights file (found locally, never downloaded);
* ``fid_domain``: the same Fréchet distance on the penultimate features of our finding classifier, which works
  offline; its values are not comparable with Inception FIDs in papers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3

from datamodules.base import to_unit_range

#: torch-fidelity's Inception-v3 (the TF FID network, converted), as torchmetrics' FID loads it
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


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
            "(fid.inception_weights=...); or use fid_domain, which needs no download"
        )
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
        self.inception = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=[str(self.num_features)], feature_extractor_weights_path=str(path)
        )

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


def build_extractors(
    inception: bool | str = "auto", inception_weights: str | None = None, classifier_checkpoint: str | None = None
) -> tuple[dict[str, nn.Module], dict[str, str]]:
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

        extractors["fid_domain"] = DomainFeatures(
            FindingClassifier.from_checkpoint(classifier_checkpoint),
            f"finding classifier {classifier_checkpoint}, penultimate layer",
        )
    else:
        skipped["fid_domain"] = (
            f"no classifier checkpoint at {classifier_checkpoint} (train one with `make train-classifier`)"
        )
    return extractors, skipped


class _Features(nn.Identity):
    """Features are extracted once per image and shared by every group's FID: the FID's own "network" is identity."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features


@torch.no_grad()
def num_features(extractor: nn.Module, image_size: int) -> int:
    """F of an extractor: its ``num_features``, else the width of its output on one blank image."""
    device = next(extractor.parameters(), torch.empty(0)).device
    return (
        getattr(extractor, "num_features", None)
        or extractor(torch.zeros(1, 1, image_size, image_size, device=device)).shape[-1]
    )


def fid_metric(num_features: int) -> FrechetInceptionDistance:
    fid = FrechetInceptionDistance(feature=_Features(num_features))
    fid.orig_dtype = torch.float32  # set by update(); a DDP rank whose shard had no image of a class still computes
    return fid
