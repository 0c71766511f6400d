"""Procedural PA chest radiographs with exact lesion masks and their true healthy twins (pure numpy).

The project's offline default dataset. Every random number of a phantom is drawn from one Generator before
anything is rendered, and the density map is filmed twice, with and without the findings' densities, with the same
detector noise: the pixels that differ are exactly the lesion mask, and the healthy render is the true
counterfactual an explanation method should recover.

Coordinates: image x (right) and y (down) in [-1, 1]; patient coordinates are the same after undoing the
acquisition's shift, scale and rotation. ``d`` is the distance from the midline towards one lung. Sides are the
*patient's*: the right lung is on the image's left (radiological convention), the heart bulges to the image's right.
Density is brightness before the film curve: soft tissue, bone and fluid add, air subtracts.

Read top to bottom: anatomy -> findings -> acquisition -> ``render_phantom``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from datamodules.zones import LEVELS, SIDES, level_masks

FINDINGS = ("nodule", "ground_glass", "consolidation", "effusion")
FLOOR = 0.02  # density every lesion pixel gains at least, so masked pixels always change visibly


def _ramp(margin: np.ndarray, width: float) -> np.ndarray:
    """Smoothstep from 0 (margin <= -width/2) to 1 (margin >= width/2): soft edges that are exactly 0 outside."""
    t = np.clip(0.5 + margin / width, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _draw_waves(rng: np.random.Generator, n: int, cycles: tuple[float, float]) -> np.ndarray:
    """Random plane waves (n, 3: kx, ky, phase); ``cycles`` per image width. Cheap, resolution-free smooth noise."""
    angle = rng.uniform(0.0, 2 * np.pi, n)
    k = np.pi * rng.uniform(*cycles, n)
    return np.stack([k * np.cos(angle), k * np.sin(angle), rng.uniform(0.0, 2 * np.pi, n)], 1).astype(np.float32)


def _waves(waves: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sum of the plane waves at (x, y), roughly unit variance."""
    total = sum(np.cos(kx * x + ky * y + phase) for kx, ky, phase in waves)
    return (total * np.sqrt(2.0 / len(waves))).astype(np.float32)


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre image coordinates X, Y, each (size, size) in (-1, 1)."""
    c = ((np.arange(size) + 0.5) / size * 2 - 1).astype(np.float32)
    x, y = np.meshgrid(c, c)
    x.flags.writeable = y.flags.writeable = False
    return x, y


# ----------------------------------------------------------------------------------------------------- anatomy


@dataclass(frozen=True)
class Anatomy:
    """One patient's chest, in patient coordinates; indices 0/1 of pairs are the right/left side."""

    apex_y: float  # lung apices
    apex_d: float  # apices' distance from the midline
    lateral_d: float  # widest extent of the lungs (lateral costophrenic angles)
    mediastinum_d: float  # medial border of the upper lungs
    dome_y: tuple[float, float]  # hemidiaphragm domes; the right one rides higher on the liver
    angle_y: tuple[float, float]  # costophrenic angles, the lowest points of the lungs
    dome_d: float
    heart: tuple[float, float, float, float, float]  # centre x, centre y, half-axes a, b, tilt
    knob: tuple[float, float, float]  # aortic knob: x, y, radius
    hilum: tuple[float, float]  # hila: distance from midline, y
    wall: float  # chest-wall soft tissue lateral to the lungs
    tissue: float  # soft-tissue density
    air: float  # how much the aerated lung darkens
    spine_w: float
    ribs: tuple[float, float, float, float]  # spacing, phase, upward tilt medially, lateral droop
    clavicle: tuple[float, float]  # y of the medial ends, upward slope laterally
    breast: float  # 0 when absent
    gastric_bubble: float
    vessels: float  # angular frequency of the vascular markings around each hilum
    vessel_phase: tuple[float, float]
    texture: np.ndarray  # waves: parenchymal density variation
    wiggle: np.ndarray  # waves: vessels bending


# Each sampled quantity's range; a family of phantoms (FAMILIES) may redraw any of them. The draw order is fixed by
# ``sample_anatomy``, so a family that changes only ranges consumes the same random numbers.
ANATOMY_RANGES = {
    "apex_y": (-0.8, -0.66),
    "lateral_d": (0.7, 0.82),
    "right_dome": (0.22, 0.36),
    "dome_step": (0.02, 0.08),  # the left dome sits this much lower
    "angle_drop": (0.14, 0.24),  # costophrenic angles below the domes
    "heart_w": (0.3, 0.38),
    "mediastinum_d": (0.11, 0.15),
    "apex_d": (0.27, 0.35),
    "dome_d": (0.36, 0.46),
    "heart_x": (0.1, 0.16),
    "heart_rise": (0.1, 0.16),  # heart centre above the left dome
    "heart_aspect": (0.65, 0.8),
    "heart_tilt": (0.3, 0.55),
    "knob_dx": (-0.03, 0.0),
    "knob_y": (0.34, 0.42),  # below the apices
    "knob_r": (0.05, 0.065),
    "hilum_dx": (0.03, 0.07),
    "hilum_y": (-0.2, -0.08),
    "wall": (0.08, 0.16),
    "tissue": (0.48, 0.56),
    "air": (0.3, 0.38),
    "spine_w": (0.055, 0.07),
    "rib_spacing": (0.13, 0.16),
    "rib_tilt": (0.35, 0.55),
    "rib_droop": (0.75, 1.0),
    "clavicle_y": (0.06, 0.14),  # below the apices
    "clavicle_slope": (0.15, 0.3),
    "breast": (0.04, 0.07),
    "p_breast": 0.4,
    "gastric_bubble": (0.06, 0.14),
    "p_gastric_bubble": 0.7,
    "vessels": (14.0, 20.0),
}


def sample_anatomy(rng: np.random.Generator, r: dict = ANATOMY_RANGES) -> Anatomy:
    """A random healthy adult chest; ranges wide enough that a model has to learn anatomy, not one picture."""

    def u(key: str) -> float:
        return rng.uniform(*r[key])

    apex_y, lateral_d = u("apex_y"), u("lateral_d")
    right_dome = u("right_dome")
    dome_y = (right_dome, right_dome + u("dome_step"))
    drop = u("angle_drop")
    heart_w = u("heart_w")
    mediastinum_d = u("mediastinum_d")
    return Anatomy(
        apex_y=apex_y,
        apex_d=u("apex_d"),
        lateral_d=lateral_d,
        mediastinum_d=mediastinum_d,
        dome_y=dome_y,
        angle_y=(dome_y[0] + drop, dome_y[1] + drop),
        dome_d=u("dome_d"),
        heart=(u("heart_x"), dome_y[1] - u("heart_rise"), heart_w, heart_w * u("heart_aspect"), u("heart_tilt")),
        knob=(mediastinum_d + u("knob_dx"), apex_y + u("knob_y"), u("knob_r")),
        hilum=(mediastinum_d + u("hilum_dx"), u("hilum_y")),
        wall=u("wall"),
        tissue=u("tissue"),
        air=u("air"),
        spine_w=u("spine_w"),
        ribs=(u("rib_spacing"), rng.uniform(0.0, 1.0), u("rib_tilt"), u("rib_droop")),
        clavicle=(apex_y + u("clavicle_y"), u("clavicle_slope")),
        breast=u("breast") if rng.random() < r["p_breast"] else 0.0,
        gastric_bubble=u("gastric_bubble") if rng.random() < r["p_gastric_bubble"] else 0.0,
        vessels=u("vessels"),
        vessel_phase=(rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi)),
        texture=_draw_waves(rng, 4, (1.5, 4.0)),
        wiggle=_draw_waves(rng, 4, (2.0, 5.0)),
    )


def _hemidiaphragm(a: Anatomy, d: np.ndarray, dome: float | np.ndarray, angle: float | np.ndarray) -> np.ndarray:
    """Height y of a hemidiaphragm: flat medially where the heart rests, curving down to the costophrenic angle."""
    curvature = (angle - dome) / (a.lateral_d - a.dome_d) ** 2
    return dome + np.where(d < a.dome_d, np.float32(0.3), np.float32(1.0)) * curvature * (d - a.dome_d) ** 2


def _lung_margin(a: Anatomy, d: np.ndarray, y: np.ndarray, side: int) -> np.ndarray:
    """Signed distance-like margin of one lung (positive inside), before the heart is carved out.

    Rounded apex, convex lateral wall meeting the hemidiaphragm dome at a sharp costophrenic angle.
    """
    t = np.clip((y - a.apex_y) / (a.angle_y[side] - a.apex_y), 0.0, 1.0)
    wall = np.sqrt(t * (2.0 - t))  # quarter ellipse: 0 at the apex, vertical at the base
    lateral = a.apex_d + (a.lateral_d - a.apex_d) * wall - d
    medial = d - np.maximum(a.mediastinum_d, a.apex_d - (a.apex_d - a.mediastinum_d) * np.minimum(1.6 * wall, 1.0))
    base = _hemidiaphragm(a, d, a.dome_y[side], a.angle_y[side]) - y
    return np.minimum(np.minimum(lateral, medial), np.minimum(y - a.apex_y, base))


def _ellipse_margin(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float, tilt: float) -> np.ndarray:
    c, s = float(np.cos(tilt)), float(np.sin(tilt))
    u, v = (c * (x - cx) + s * (y - cy)) / a, (c * (y - cy) - s * (x - cx)) / b
    return (1.0 - np.sqrt(u * u + v * v)) * min(a, b)


def _posterior_ribs(a: Anatomy, d: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Curved bright bands: each posterior rib rises from the spine, arches and droops towards the chest wall."""
    spacing, phase, tilt, droop = a.ribs
    course = y + tilt * d - droop * d * d
    cycle = course / spacing - 0.6 * course * course + phase  # lower ribs lie further apart
    bands = _ramp(np.cos(2 * np.pi * cycle) - 0.45, 0.35)
    anterior = _ramp(np.cos(2 * np.pi * ((y - 0.6 * (a.lateral_d - d)) / (1.4 * spacing) + phase)) - 0.6, 0.3)
    return bands + 0.4 * anterior * _ramp(d - 0.3, 0.2)


def _clavicles(a: Anatomy, d: np.ndarray, y: np.ndarray) -> np.ndarray:
    y0, slope = a.clavicle
    course = y0 - slope * (d - 0.08) + 0.5 * (d - 0.4) ** 2  # S-shaped: dips, then rises to the acromion
    return _ramp(0.035 - np.abs(y - course), 0.03) * _ramp(d - 0.05, 0.04) * _ramp(0.8 - d, 0.1)


def _vascular_markings(a: Anatomy, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Vessels fanning out of each hilum, tapering and fading towards the periphery."""
    hilum_d, hilum_y = a.hilum
    dx, dy = np.abs(x) - hilum_d, y - hilum_y
    r = np.sqrt(dx * dx + dy * dy)
    theta = np.arctan2(dy, dx) + np.where(x < 0, *np.float32(a.vessel_phase)) + 0.07 * _waves(a.wiggle, x, y)
    trunks = (0.5 + 0.5 * np.cos(a.vessels * theta)) ** (2 + 10 * r)
    branches = (0.5 + 0.5 * np.cos(1.7 * a.vessels * theta + 3 * r)) ** (4 + 16 * r)
    emerge = 1.0 - np.exp(-((r / 0.08) ** 2))  # the fan's centre hides in the hilar shadow
    return 0.09 * (trunks + 0.5 * branches) * np.exp(-r / 0.35) * emerge


@dataclass
class Chest:
    """A rendered healthy chest: the density map and the parts findings interact with (all (H, W) or (2, H, W))."""

    density: np.ndarray
    lung: np.ndarray  # (2, H, W) lung coverage of each pixel in [0, 1], right then left
    air: np.ndarray  # darkening by aerated lung: what fluid in the airspaces takes away
    markings: np.ndarray  # vascular markings: what airspace fluid hides

    @property
    def lungs(self) -> np.ndarray:
        """(2, H, W) bool: every pixel with any lung in it, so a lesion can change all of them."""
        return self.lung > 0


def render_chest(a: Anatomy, x: np.ndarray, y: np.ndarray, pixel: float) -> Chest:
    """Density of the healthy chest at patient coordinates (x, y); ``pixel`` is the pixel size there (edge width)."""
    d = np.abs(x)
    side = (x >= 0).astype(np.intp)  # 0 right (image left), 1 left
    knob = a.knob[2] - np.hypot(x - a.knob[0], y - a.knob[1])
    base = np.minimum(a.mediastinum_d + 2.0 * np.clip(y - a.heart[1], 0.0, None) - x, x + a.mediastinum_d)
    mediastinum = np.maximum(a.mediastinum_d - d, base)  # a band, widening under the heart down to the left dome
    cardiac = np.maximum(np.maximum(_ellipse_margin(x, y, *a.heart), knob), mediastinum)  # one silhouette
    margins = np.stack([_lung_margin(a, -x, y, 0), _lung_margin(a, x, y, 1)])  # (2, H, W)
    margins = np.minimum(margins, -cardiac)
    lung = _ramp(margins, pixel)
    aerated = lung.sum(0)
    depth = np.clip(margins.max(0) / 0.2, 0.0, 1.0)  # thicker lung, darker film, towards the centre of each lung
    air = a.air * aerated * (0.6 + 0.4 * depth) * (1.0 + 0.06 * _waves(a.texture, x, y))
    markings = aerated * _vascular_markings(a, x, y)

    body_w = a.lateral_d + a.wall - 0.12 * (y - 0.1) ** 2 + 0.8 * np.clip(a.apex_y + 0.3 - y, 0.0, None)
    shoulders = y + 1.05 - 0.6 * np.clip(d - 0.22, 0.0, None) ** 2  # below the shoulder line; the neck leaves the film
    body = _ramp(np.minimum(body_w - d, shoulders), 0.04)
    thickness = 0.75 + 0.25 * np.clip(1.0 - (d / body_w) ** 2, 0.0, 1.0)

    dome, angle = np.asarray(a.dome_y, np.float32)[side], np.asarray(a.angle_y, np.float32)[side]
    below_dome = y - _hemidiaphragm(a, np.minimum(d, a.lateral_d), dome, angle)
    abdomen = _ramp(below_dome, 2 * pixel) * _ramp(a.lateral_d + 0.03 - d, 0.1)  # liver and spleen, not the flanks
    bubble = _ramp(_ellipse_margin(x, y, a.dome_d - 0.05, a.dome_y[1] + 0.1, 0.11, 0.06, 0.0), 0.06)

    heart = _ramp(cardiac, 2 * pixel)
    spine = _ramp(a.spine_w - d, 0.02) * (0.85 + 0.15 * np.cos(2 * np.pi * y / 0.11) ** 2)
    trachea = _ramp(0.035 - np.abs(x - 0.01), 0.02) * _ramp(a.hilum[1] - 0.08 - y, 0.06)
    hila = np.exp(-(((d - a.hilum[0]) / 0.06) ** 2 + ((y - a.hilum[1]) / 0.1) ** 2))
    fold = a.angle_y[0] + 0.05 + 0.5 * (d - 0.45) ** 2  # inframammary fold: the breast shadow's sharp lower border
    breast = a.breast * _ramp(fold - y, 0.03) * _ramp(y - a.angle_y[0] + 0.45, 0.5) * _ramp(d - 0.2, 0.3)
    ribs = _posterior_ribs(a, d, y) * _ramp(d - a.spine_w - 0.02, 0.04) * _ramp(a.lateral_d + 0.05 - d, 0.05)
    ribs = ribs * _ramp(y - a.apex_y + 0.12, 0.05) * _ramp(max(a.dome_y) + 0.1 - y, 0.2) * (1 - 0.6 * heart)

    bones = 0.065 * ribs + 0.16 * _clavicles(a, d, y) + 0.12 * spine
    soft = a.tissue * thickness + 0.1 * np.maximum(heart, abdomen) + 0.08 * hila + breast
    gas = 0.12 * trachea + a.gastric_bubble * bubble * (1 - aerated)
    density = 0.03 + body * (soft + bones - gas) - air + markings
    return Chest(*(v.astype(np.float32) for v in (density, lung, air, markings)))


# ---------------------------------------------------------------------------------------------------- findings


class Finding(NamedTuple):
    kind: str  # one of FINDINGS
    side: str  # patient's 'right' (image left) or 'left'
    zone: str  # 'upper', 'middle' or 'lower' third of that lung


def _draw_finding(rng: np.random.Generator) -> Finding:
    kind = FINDINGS[rng.integers(len(FINDINGS))]
    side = SIDES[rng.integers(2)]
    zone = "lower" if kind == "effusion" else LEVELS[rng.integers(3)]  # fluid collects at the base
    return Finding(kind, side, zone)


def sample_findings(rng: np.random.Generator, p_healthy: float = 0.4, p_second: float = 0.25) -> tuple[Finding, ...]:
    """Healthy (no findings) with ``p_healthy``; else one finding, plus a second distinct one with ``p_second``.

    Drawn first, so the findings (and the report) of a sample are known without rendering it.
    """
    if rng.random() < p_healthy:
        return ()
    first = _draw_finding(rng)
    if rng.random() >= p_second:
        return (first,)
    second = _draw_finding(rng)
    while second == first:
        second = _draw_finding(rng)
    return first, second


@dataclass
class Scene:
    """What a finding is drawn against: image coordinates, pixel size, lungs and their zones."""

    X: np.ndarray
    Y: np.ndarray
    pixel: float  # pixel size in image coordinates
    scale: float  # patient size on the detector
    chest: Chest
    zones: dict[str, np.ndarray]  # 'right-upper' ... -> bool (H, W)

    def lung(self, side: str) -> np.ndarray:
        return self.chest.lungs[SIDES.index(side)]

    def rows(self, mask: np.ndarray) -> tuple[float, float]:
        """Top and bottom edge of a mask, in image y."""
        rows = np.nonzero(mask.any(1))[0]
        return -1 + rows[0] * self.pixel, -1 + (rows[-1] + 1) * self.pixel

    def lateral(self, side: str) -> np.ndarray:
        """0 at the medial edge of a lung's columns, 1 at its lateral edge: where fluid climbs, where opacity starts."""
        cols = np.nonzero(self.lung(side).any(0))[0]
        x0, x1 = -1 + cols[0] * self.pixel, -1 + (cols[-1] + 1) * self.pixel
        t = (self.X - x0) / (x1 - x0)
        return np.clip(t if side == "left" else 1 - t, 0, 1)


def _erode(mask: np.ndarray, r: int) -> np.ndarray:
    """Pixels whose whole (2r+1)^2 neighbourhood is in ``mask`` (summed-area table, O(HW))."""
    if r <= 0:
        return mask
    k = 2 * r + 1
    s = np.pad(mask.astype(np.int32), ((r + 1, r), (r + 1, r))).cumsum(0).cumsum(1)
    return (s[k:, k:] - s[:-k, k:] - s[k:, :-k] + s[:-k, :-k]) == k * k


def _pick(rng: np.random.Generator, scene: Scene, candidates: np.ndarray, fallback: np.ndarray) -> tuple[float, float]:
    """A random pixel centre (x, y) of ``candidates``, or of ``fallback`` when none is left."""
    idx = np.flatnonzero(candidates if candidates.any() else fallback)
    row, col = divmod(int(idx[rng.integers(idx.size)]), candidates.shape[1])
    return float(scene.X[row, col]), float(scene.Y[row, col])


def _nodule(rng: np.random.Generator, f: Finding, s: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Focal round, slightly lobulated opacity, dense centre (projected sphere), sharp margin."""
    radius = rng.uniform(0.075, 0.11) * s.scale
    zone = s.zones[f"{f.side}-{f.zone}"]
    cx, cy = _pick(rng, s, _erode(zone, int(np.ceil(radius / s.pixel))), zone)
    lobes, phase, contrast = rng.integers(2, 5), rng.uniform(0, 2 * np.pi), rng.uniform(0.18, 0.28)
    dx, dy = s.X - cx, s.Y - cy
    r = np.sqrt(dx * dx + dy * dy) / (radius * (1 + 0.08 * np.cos(lobes * np.arctan2(dy, dx) + phase)))
    mask = (r < 1) & s.lung(f.side)
    return contrast * (0.35 + 0.65 * np.sqrt(np.clip(1 - r * r, 0, 1))), mask


def _ground_glass(rng: np.random.Generator, f: Finding, s: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Large hazy patch that only partly fills the airspaces: faint, mottled, vessels still visible through it."""
    zone, lung = s.zones[f"{f.side}-{f.zone}"], s.lung(f.side)
    cx, cy = _pick(rng, s, _erode(zone, 2), zone)
    top, bottom = s.rows(zone)
    lateral = s.lateral(f.side)
    width = float(np.ptp(s.X[lung]))
    ry, rx = rng.uniform(0.6, 0.85) * (bottom - top), rng.uniform(0.35, 0.55) * width
    outline, mottle = _draw_waves(rng, 4, (2.0, 5.0)), _draw_waves(rng, 6, (8.0, 16.0))
    fill = rng.uniform(0.45, 0.6)
    p = np.exp(-(((s.X - cx) / rx) ** 2 + ((s.Y - cy) / ry) ** 2)) * (1 + 0.3 * _waves(outline, s.X, s.Y))
    mask = (p > 0.3) & lung
    haze = _ramp(p - 0.5, 0.4) * (0.8 + 0.2 * _waves(mottle, s.X, s.Y)) * (0.9 + 0.1 * lateral)
    return fill * haze * s.chest.air, mask


def _consolidation(rng: np.random.Generator, f: Finding, s: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Airspaces of a zone filled with fluid: dense and confluent, vessels hidden, ill-defined edges, lung-bounded."""
    zone, lung = s.zones[f"{f.side}-{f.zone}"], s.lung(f.side)
    top, bottom = s.rows(zone)
    edges, texture = _draw_waves(rng, 3, (2.0, 5.0)), _draw_waves(rng, 6, (6.0, 12.0))
    coverage, fill = rng.uniform(0.55, 1.0), rng.uniform(0.75, 0.9)
    wobble = 0.25 * (bottom - top) * _waves(edges, s.X, s.Y)  # (H, W)
    upper = -9.0 if f.zone == "upper" else top + wobble
    lower = 9.0 if f.zone == "lower" else bottom - wobble
    p = _ramp(s.Y - upper, 0.08) * _ramp(lower - s.Y, 0.08) * _ramp(s.lateral(f.side) - 1 + coverage + wobble, 0.2)
    mask = (p > 0.25) & lung
    opacity = fill * s.chest.air * np.minimum(1.4 * p, 1) * (0.9 + 0.1 * _waves(texture, s.X, s.Y))
    return opacity - 0.8 * p * s.chest.markings, mask


def _effusion(rng: np.random.Generator, f: Finding, s: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Pleural fluid at the base: fills the costophrenic angle, meniscus climbing the lateral chest wall."""
    lung = s.lung(f.side)
    top, bottom = s.rows(lung)
    depth, fill = rng.uniform(0.24, 0.42) * (bottom - top), rng.uniform(0.85, 0.95)
    level = bottom - depth * (0.45 + 0.55 * s.lateral(f.side) ** 2)  # (H, W) meniscus, higher laterally
    mask = (s.Y > level) & lung
    return fill * s.chest.air * (0.7 + 0.3 * _ramp(s.Y - level - 0.03, 0.06)) - 0.9 * s.chest.markings, mask


DRAW = {"nodule": _nodule, "ground_glass": _ground_glass, "consolidation": _consolidation, "effusion": _effusion}
Draw = Callable[[np.random.Generator, Finding, Scene], tuple[np.ndarray, np.ndarray]]


def render_findings(
    rng: np.random.Generator, findings: tuple[Finding, ...], scene: Scene, draw: dict[str, Draw] = DRAW
) -> tuple[np.ndarray, np.ndarray]:
    """Added density (H, W), zero outside the lesions and at least FLOOR inside, and one mask per finding (n, H, W)."""
    delta = np.zeros_like(scene.X)
    masks = np.zeros((len(findings), *scene.X.shape), bool)
    for i, finding in enumerate(findings):
        lesion, masks[i] = draw[finding.kind](rng, finding, scene)
        delta += np.where(masks[i], np.maximum(lesion, 0) + FLOOR, 0).astype(np.float32)
    return delta, masks


# ------------------------------------------------------------------------------------------------- acquisition


@dataclass(frozen=True)
class Acquisition:
    """How the film was taken: positioning and exposure, identical for a phantom and its healthy twin."""

    shift: tuple[float, float]
    scale: float
    rotation: float  # radians
    exposure: float  # density offset: over- / under-exposed
    contrast: float  # slope of the film curve
    gamma: float
    noise: float  # detector noise std, in density

    def to_patient(self, X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image -> patient coordinates: undo shift, scale and rotation."""
        u, v = (X - self.shift[0]) / self.scale, (Y - self.shift[1]) / self.scale
        c, s = float(np.cos(self.rotation)), float(np.sin(self.rotation))
        return c * u + s * v, c * v - s * u


ACQUISITION_RANGES = {
    "shift": (-0.06, 0.06),
    "scale": (0.9, 1.06),
    "rotation_deg": (-4.0, 4.0),
    "exposure": (-0.06, 0.06),
    "contrast": (4.5, 6.5),
    "gamma": (0.8, 1.25),
    "noise": (0.008, 0.022),
}


def sample_acquisition(rng: np.random.Generator, r: dict = ACQUISITION_RANGES) -> Acquisition:
    def u(key: str) -> float:
        return rng.uniform(*r[key])

    return Acquisition(
        shift=(u("shift"), u("shift")),
        scale=u("scale"),
        rotation=np.deg2rad(u("rotation_deg")),
        exposure=u("exposure"),
        contrast=u("contrast"),
        gamma=u("gamma"),
        noise=u("noise"),
    )


def film(density: np.ndarray, acq: Acquisition) -> np.ndarray:
    """Sigmoid characteristic curve then gamma: strictly increasing, so every density change shows in (0, 1)."""
    return (0.5 + 0.5 * np.tanh(0.5 * acq.contrast * (density - 0.5 + acq.exposure))) ** acq.gamma


# ---------------------------------------------------------------------------------------------------- phantoms


@dataclass
class Phantom:
    """A rendered phantom; all images (H, W) float32 in (0, 1), masks bool."""

    image: np.ndarray  # with the findings
    healthy: np.ndarray  # the same patient and film without them: the true counterfactual
    lungs: np.ndarray  # (2, H, W): right lung (image left), left lung
    lesions: np.ndarray  # (n, H, W): one mask per finding
    findings: tuple[Finding, ...]

    @property
    def lung_mask(self) -> np.ndarray:
        return self.lungs.any(0)

    @property
    def mask(self) -> np.ndarray:
        """All lesions: exactly the pixels where ``image`` and ``healthy`` differ."""
        return self.lesions.any(0)

    def finding_mask(self, kind: str) -> np.ndarray:
        """Union of the lesions of one kind (per-finding-type scores)."""
        keep = [f.kind == kind for f in self.findings]
        return self.lesions[keep].any(0) if any(keep) else np.zeros(self.image.shape, bool)


@dataclass(frozen=True)
class Family:
    """A kind of phantom: the ranges its patients and films are drawn from and how each finding is drawn.

    A model trained and tuned on one family and scored on another shows whether its defaults generalise (real users
    have no lesion masks to tune on).
    """

    anatomy: dict = field(default_factory=lambda: ANATOMY_RANGES)
    acquisition: dict = field(default_factory=lambda: ACQUISITION_RANGES)
    draw: dict[str, Draw] = field(default_factory=lambda: DRAW)


FAMILIES: dict[str, Family] = {"standard": Family()}  # datamodules.phantoms_heldout registers "heldout"


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown phantom family '{name}'; valid: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def render_phantom(
    rng: np.random.Generator, findings: tuple[Finding, ...] = (), size: int = 64, family_name: str = "standard"
) -> Phantom:
    """Draw a patient, an acquisition and the findings' shapes from ``rng``; film it with and without the findings."""
    kind = family(family_name)
    anatomy, acq = sample_anatomy(rng, kind.anatomy), sample_acquisition(rng, kind.acquisition)
    X, Y = _grid(size)
    pixel = 2.0 / size
    chest = render_chest(anatomy, *acq.to_patient(X, Y), pixel / acq.scale)
    zones = {f"{side}-{level}": m for side, lung in zip(SIDES, chest.lungs) for level, m in level_masks(lung).items()}
    scene = Scene(X, Y, pixel, acq.scale, chest, zones)
    delta, lesions = render_findings(rng, tuple(findings), scene, kind.draw)
    noisy = chest.density + acq.noise * rng.standard_normal((size, size), dtype=np.float32)
    healthy = film(noisy, acq).astype(np.float32)
    image = film(noisy + delta, acq).astype(np.float32) if len(findings) else healthy.copy()
    return Phantom(image, healthy, chest.lungs, lesions, tuple(findings))


from datamodules import phantoms_heldout  # noqa: E402,F401  (registers the "heldout" family)
