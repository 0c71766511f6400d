"""The "heldout" phantom family: other patients, other films and other lesion shapes than the standard phantoms.

Nothing in the project is tuned on it. ``make demo-heldout`` trains and scores the demo on it with the same defaults,
so the gap between the two families shows how far the defaults carry to chest X-rays they were not chosen on.

What differs from ``datamodules.phantoms``: bigger hearts, lower and flatter domes, narrower lungs, thicker soft
tissue, tighter ribs and no breast shadows; over-penetrated, lower-contrast, more rotated films; and the
findings drawn differently: several small nodules instead of one, ground glass in patches, consolidation filling a
lobe up to a sharp fissure, effusion collecting under the lung (subpulmonic) with a flat top.
"""

from __future__ import annotations

import numpy as np

from datamodules.phantoms import (
    ACQUISITION_RANGES,
    ANATOMY_RANGES,
    FAMILIES,
    Family,
    Finding,
    Scene,
    _draw_waves,
    _erode,
    _pick,
    _ramp,
    _waves,
)

ANATOMY = {
    **ANATOMY_RANGES,
    "lateral_d": (0.62, 0.72),
    "right_dome": (0.32, 0.44),
    "dome_step": (0.0, 0.04),
    "angle_drop": (0.1, 0.16),
    "heart_w": (0.38, 0.46),
    "heart_x": (0.14, 0.2),
    "heart_aspect": (0.55, 0.7),
    "mediastinum_d": (0.13, 0.18),
    "wall": (0.14, 0.24),
    "tissue": (0.56, 0.64),
    "rib_spacing": (0.11, 0.13),
    "p_breast": 0.0,
    "p_gastric_bubble": 0.3,
}

ACQUISITION = {
    **ACQUISITION_RANGES,
    "shift": (-0.09, 0.09),
    "scale": (0.82, 0.98),
    "rotation_deg": (-8.0, 8.0),
    "exposure": (-0.14, -0.04),  # over-penetrated: darker overall
    "contrast": (3.6, 4.8),  # flatter film curve
    "gamma": (0.7, 1.1),
    "noise": (0.03, 0.045),
}


def _nodules(rng: np.random.Generator, f: Finding, s: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Two to four small sharp nodules scattered over the zone's lung (metastasis-like)."""
    zone, lung = s.zones[f"{f.side}-{f.zone}"], s.lung(f.side)
    density, mask = np.zeros_like(s.X), np.zeros_like(lung)
    for _ in range(rng.integers(2, 5)):
        radius = rng.uniform(0.06, 0.085) * s.scale
        reach = int(np.ceil(radius / s.pixel))
        apart = zone & _erode(~mask, reach + 2)  # centres clear of the nodules drawn so far
        cx, cy = _pick(rng, s, apart & _erode(zone, reach), apart if apart.any() else zone)
        r = np.hypot(s.X - cx, s.Y - cy) / radius
        density = np.maximum(density, rng.uniform(0.22, 0.32) * np.sqrt(np.clip(1 - r * r, 0, 1)))
        mask |= (r < 1) & lung
    return density, mask


def _patchy_ground_glass(rng: np.random.Generator, f: Finding, s: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Several faint round patches in and around the zone, vessels visible through them."""
    zone, lung = s.zones[f"{f.side}-{f.zone}"], s.lung(f.side)
    p = np.zeros_like(s.X)
    for _ in range(rng.integers(3, 7)):
        cx, cy = _pick(rng, s, _erode(zone, 1), zone)
        radius = rng.uniform(0.07, 0.13)
        p = np.maximum(p, np.exp(-((np.hypot(s.X - cx, s.Y - cy) / radius) ** 2)))
    mask = (p > 0.3) & lung
    haze = _ramp(p - 0.45, 0.4) * (0.75 + 0.25 * _waves(_draw_waves(rng, 6, (10.0, 18.0)), s.X, s.Y))
    return rng.uniform(0.4, 0.55) * haze * s.chest.air, mask


def _lobar_consolidation(rng: np.random.Generator, f: Finding, s: Scene) -> tuple[np.ndarray, np.ndarray]:
    """A lobe filled with fluid, bounded by a sharp, slightly oblique fissure; vessels hidden."""
    zone, lung = s.zones[f"{f.side}-{f.zone}"], s.lung(f.side)
    top, bottom = s.rows(zone)
    height, tilt = bottom - top, rng.uniform(-0.25, 0.25) * s.X  # (H, W): the fissure's obliquity
    if f.zone == "upper":  # the lobe lies above its fissure
        p = _ramp(bottom - rng.uniform(0.0, 0.3) * height + tilt - s.Y, 0.02)
    else:  # below it; a middle lobe fades out towards the lower zone
        p = _ramp(s.Y - top - rng.uniform(0.0, 0.3) * height - tilt, 0.02)
        if f.zone == "middle":
            p = p * _ramp(bottom - s.Y, 0.06)
    mask = (p > 0.25) & lung
    fill = rng.uniform(0.8, 0.95)
    return fill * s.chest.air * p - 0.9 * p * s.chest.markings, mask


def _subpulmonic_effusion(rng: np.random.Generator, f: Finding, s: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Fluid under the lung: a flat-topped layer that lifts the apparent dome, its peak shifted laterally."""
    lung = s.lung(f.side)
    top, bottom = s.rows(lung)
    depth = rng.uniform(0.14, 0.26) * (bottom - top)
    lateral = s.lateral(f.side)
    level = bottom - depth * (0.8 + 0.2 * np.exp(-(((lateral - 0.7) / 0.25) ** 2)))  # (H, W): nearly flat top
    mask = (s.Y > level) & lung
    return rng.uniform(0.85, 0.95) * s.chest.air * _ramp(s.Y - level, 0.03) - 0.9 * s.chest.markings, mask


FAMILIES["heldout"] = Family(
    anatomy=ANATOMY,
    acquisition=ACQUISITION,
    draw={
        "nodule": _nodules,
        "ground_glass": _patchy_ground_glass,
        "consolidation": _lobar_consolidation,
        "effusion": _subpulmonic_effusion,
    },
)
