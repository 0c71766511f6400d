"""Named lung zones from any lung mask: each lung's vertical extent split into thirds.

Radiologists localise findings by zone ("left lower zone"); the zero-shot induction script and the per-zone scores
need the same regions on phantoms and on real data (the COVID-19 Radiography Database ships lung masks), so this
works on a plain 2-D mask with both lungs in it. Sides are the *patient's*: on a PA radiograph the patient's left
lung is on the image's right.
"""

from __future__ import annotations

import numpy as np

SIDES = ("right", "left")
LEVELS = ("upper", "middle", "lower")
ZONES = tuple(f"{side}-{level}" for side in SIDES for level in LEVELS)


def binarize(mask: np.ndarray) -> np.ndarray:
    """Bool lung mask from {0,1}, {0,255} or soft masks: at least half the mask's maximum."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D lung mask, got shape {mask.shape}")
    peak = mask.max() if mask.size else 0
    return mask >= 0.5 * peak if peak > 0 else np.zeros(mask.shape, bool)


def split_column(lung_mask: np.ndarray) -> int:
    """Column of the mediastinal gap: the emptiest column in the middle 40% of the lungs' width.

    Ties (a run of empty columns) resolve to the run's middle, so the split sits in the mediastinum.
    """
    columns = binarize(lung_mask).sum(0)  # (W,)
    occupied = np.nonzero(columns)[0]
    if occupied.size == 0:
        return lung_mask.shape[1] // 2
    lo, hi = occupied[0], occupied[-1]
    band = np.arange(lo + int(0.3 * (hi - lo)), lo + int(np.ceil(0.7 * (hi - lo))) + 1)
    emptiest = band[columns[band] == columns[band].min()]
    return int(emptiest[len(emptiest) // 2])


def split_lungs(lung_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(right lung, left lung) as bool masks; the patient's right lung is left of the split on the image."""
    mask = binarize(lung_mask)
    image_left = np.arange(mask.shape[1]) < split_column(mask)  # (W,)
    return mask & image_left, mask & ~image_left


def level_masks(lung: np.ndarray) -> dict[str, np.ndarray]:
    """Upper/middle/lower thirds of one lung's rows; together they partition the lung exactly."""
    rows = np.nonzero(lung.any(1))[0]
    if rows.size == 0:
        return {level: np.zeros_like(lung) for level in LEVELS}
    top, height = rows[0], rows[-1] - rows[0] + 1
    third = ((np.arange(lung.shape[0]) - top) * 3 // height).clip(0, 2)  # (H,) 0, 1, 2 by row
    return {level: lung & (third == k)[:, None] for k, level in enumerate(LEVELS)}


def zone_masks(lung_mask: np.ndarray) -> dict[str, np.ndarray]:
    """All six zones, keyed 'right-upper' ... 'left-lower'."""
    lungs = dict(zip(SIDES, split_lungs(lung_mask)))
    return {f"{side}-{level}": m for side in SIDES for level, m in level_masks(lungs[side]).items()}


def zone_mask(lung_mask: np.ndarray, zone: str) -> np.ndarray:
    """Bool mask of one named zone, e.g. 'left-lower' (patient's left = image right)."""
    if zone not in ZONES:
        raise ValueError(f"unknown zone '{zone}'; valid: {', '.join(ZONES)}")
    side, level = zone.split("-")
    lung = split_lungs(lung_mask)[SIDES.index(side)]
    return level_masks(lung)[level]
