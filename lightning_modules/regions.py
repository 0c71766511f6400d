"""Regions of an image for zero-shot induction (docs/method.md): where to induce, and how local the result is.

A region is given one of three ways (the most specific wins), checked against the image size *before* any model
is loaded:

* ``mask_path``: a mask image (0/1, 0/255 or soft), resized to the input;
* ``box``: ``x0,y0,x1,y1`` in pixels of the model's square input, ``x1``/``y1`` exclusive;
* ``zone``: a named lung zone (``datamodules.zones.ZONES``, e.g. ``left-lower``), cut from each image's lung mask.

The pipeline blends latents with the region brought to latent resolution (``latent_mask``), optionally feathered
(``feather_mask``), and the scores say whether the change stayed there: ``inside_fraction`` (share of the absolute
change inside the region) and ``ssim_outside`` (SSIM against the original, over the pixels outside the region).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional.image import structural_similarity_index_measure
from torchvision.transforms.functional import gaussian_blur

from datamodules.images import UnreadableImageError, read_mask
from datamodules.zones import ZONES, zone_mask


class RegionError(ValueError):
    """A region that names no pixels of the image: outside it, empty, or an unknown zone."""


def parse_box(box: str | list | tuple, size: int) -> tuple[int, int, int, int]:
    """``"x0,y0,x1,y1"`` (or a sequence) -> integer pixel box inside a ``size`` x ``size`` image, non-empty."""
    parts = box.split(",") if isinstance(box, str) else list(box)
    try:
        x0, y0, x1, y1 = (int(str(p).strip()) for p in parts)
    except ValueError:
        raise RegionError(f"box must be four integers 'x0,y0,x1,y1' in pixels, got {box!r}") from None
    if not (0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size):
        raise RegionError(
            f"box {x0},{y0},{x1},{y1} is empty or outside the {size}x{size} image "
            f"(need 0 <= x0 < x1 <= {size} and 0 <= y0 < y1 <= {size})"
        )
    return x0, y0, x1, y1


def box_mask(box: tuple[int, int, int, int], size: int) -> np.ndarray:
    x0, y0, x1, y1 = box
    mask = np.zeros((size, size), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def read_region_mask(path: str | Path, size: int) -> np.ndarray:
    """A mask image -> bool (size, size); a missing, unreadable or empty mask is a ``RegionError``."""
    try:
        mask = read_mask(path, (size, size)).astype(bool)
    except UnreadableImageError as err:
        raise RegionError(f"mask_path: cannot read {err.path} ({err.reason})") from None
    if not mask.any():
        raise RegionError(f"mask_path: {path} is empty at {size}x{size} (no pixel at least half its maximum)")
    return mask


@dataclass(frozen=True)
class RegionSpec:
    """Where to induce: ``mask_path`` if given, else ``box``, else ``zone``; ``zone`` also names the place in a prompt.

    ``parse`` validates everything that can be checked without a model or the images' lung masks.
    """

    zone: str | None = None
    box: tuple[int, int, int, int] | None = None
    mask_path: str | None = None

    @classmethod
    def parse(
        cls, size: int, zone: str | None = None, box: str | list | tuple | None = None, mask_path: str | None = None
    ) -> RegionSpec:
        if not (zone or box or mask_path):
            raise RegionError(f"no region: give zone=<{'|'.join(ZONES)}>, box=x0,y0,x1,y1 or mask_path=<image>")
        if zone and zone not in ZONES:
            raise RegionError(f"unknown zone '{zone}'; valid: {', '.join(ZONES)}")
        if mask_path:
            read_region_mask(mask_path, size)
        return cls(zone or None, parse_box(box, size) if box else None, mask_path or None)

    @property
    def needs_lung_mask(self) -> bool:
        return self.box is None and self.mask_path is None

    @property
    def location(self) -> tuple[str, str] | None:
        """(side, level) named in a prompt, e.g. ('left', 'lower'); None without a zone."""
        return tuple(self.zone.split("-")) if self.zone else None  # type: ignore[return-value]

    def mask(self, size: int, lung_mask: np.ndarray | None = None) -> np.ndarray:
        """Bool (size, size) region of one image; a zone needs that image's lung mask."""
        if self.mask_path is not None:
            return read_region_mask(self.mask_path, size)
        if self.box is not None:
            return box_mask(self.box, size)
        if lung_mask is None:
            raise RegionError(f"zone '{self.zone}' needs a lung mask; this input has none (use box= or mask_path=)")
        region = zone_mask(np.asarray(lung_mask), self.zone)
        if not region.any():
            raise RegionError(f"zone '{self.zone}' is empty in this image's lung mask")
        return region


# ------------------------------------------------------------------------------------------ masks for blending


def feather_mask(masks: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, 1, H, W) hard region -> soft edges by a Gaussian of ``sigma`` pixels, so blends leave no seam."""
    if sigma <= 0:
        return masks
    kernel = 2 * int(round(3 * sigma)) + 1
    return gaussian_blur(masks, [kernel, kernel], [sigma, sigma])


def latent_mask(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, H, W) pixel masks in [0, 1] -> (B, 1, h, w) binary masks at latent resolution.

    A latent cell is inside when the region covers at least half its pixels (area average), and every region keeps
    its best-covered cell, however small. Binary like diffusers' inpainting mask, but without the bias of its
    nearest-pixel resize (which samples one corner pixel per cell); and not soft, because blending two noisy latents
    with a weight in (0, 1) shrinks their noise and the model then draws a washed-out finding.
    """
    coverage = F.interpolate(masks, size=size, mode="area")
    best = coverage.amax(dim=(2, 3), keepdim=True)
    return ((coverage >= 0.5) | ((coverage >= best) & (best > 0))).to(masks.dtype)


# --------------------------------------------------------------------------------------------------- metrics


def inside_fraction(difference: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """(B,) share of the absolute change sum(|d|) that falls inside each (B, 1, H, W) bool region (1 if none)."""
    change = difference.abs().flatten(1)
    total = change.sum(1)
    inside = (change * regions.flatten(1).float()).sum(1)
    return torch.where(total > 0, inside / total.clamp(min=1e-12), torch.ones_like(total))


def ssim_outside(images: torch.Tensor, originals: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """(B,) SSIM of images in [-1, 1] against the originals outside each (B, 1, H, W) bool region.

    The inside is masked out (set to the original's pixels) before the per-pixel SSIM map (torchmetrics, Gaussian
    window 11, sigma 1.5) is averaged over the outside: windows straddling the border would otherwise count the
    region's own, wanted, change; only what leaked out of the region may lower the score.
    """
    regions = regions.bool()
    masked = torch.where(regions, originals, images)
    _, full = structural_similarity_index_measure(
        masked, originals, data_range=2.0, reduction="none", return_full_image=True
    )  # (B, 1, H, W)
    outside = (~regions).flatten(1).float()
    return (full.flatten(1) * outside).sum(1) / outside.sum(1).clamp(min=1.0)
