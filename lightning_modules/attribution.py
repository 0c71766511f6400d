"""Attribution maps: where the healthy counterfactual differs from the input (method.md §1)."""

from __future__ import annotations

import torch
from torchvision.transforms.functional import gaussian_blur

KINDS = ("signed", "absolute", "positive")


def signed_map(images: torch.Tensor, counterfactuals: torch.Tensor) -> torch.Tensor:
    """M = x_a - x_n: positive where the input is denser (brighter) than its healthy counterpart."""
    return images - counterfactuals


def attribution_map(
    signed: torch.Tensor, kind: str = "absolute", sigma: float = 0.0, normalize: bool = False
) -> torch.Tensor:
    """(B, 1, H, W) signed map -> the map for display or scoring: |M| or M+, smoothed, optionally scaled to [0, 1].

    ``positive`` suits findings that add density (opacities, effusions); ``absolute`` also catches removed density.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown map kind '{kind}'; valid: {', '.join(KINDS)}")
    maps = {"signed": signed, "absolute": signed.abs(), "positive": signed.clamp(min=0)}[kind]
    if sigma > 0:
        kernel = 2 * int(round(3 * sigma)) + 1
        maps = gaussian_blur(maps, [kernel, kernel], [sigma, sigma])
    return normalize_per_image(maps) if normalize else maps


def normalize_per_image(maps: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) -> each map min-max scaled to [0, 1]: maps of any method and unit become comparable scores."""
    flat = maps.flatten(1)
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    return (maps - low.view(-1, 1, 1, 1)) / (high - low).clamp(min=1e-8).view(-1, 1, 1, 1)
