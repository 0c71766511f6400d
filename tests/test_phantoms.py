"""The phantom generator and the lung zones: exact masks, visible findings, plausible anatomy, seeded draws.

The invariants every family must keep are parametrized over ``FAMILIES``; the rest describe the standard phantoms.
"""

import numpy as np
import pytest

from datamodules.phantoms import FAMILIES, FINDINGS, FLOOR, Finding, render_phantom, sample_findings
from datamodules.zones import LEVELS, SIDES, ZONES, level_masks, split_lungs, zone_mask, zone_masks

EVERY_FINDING = [Finding(k, s, z) for k in FINDINGS for s in SIDES for z in (("lower",) if k == "effusion" else LEVELS)]


every_family = pytest.mark.parametrize("family", sorted(FAMILIES))


def phantom(seed, findings=(), size=64, family="standard"):
    return render_phantom(np.random.default_rng(seed), tuple(findings), size, family)


@every_family
@pytest.mark.parametrize("size", [64, 128, 256])
def test_shapes_dtypes_ranges(size, family):
    ph = phantom(0, [Finding("nodule", "left", "middle"), Finding("effusion", "right", "lower")], size, family)
    for img in (ph.image, ph.healthy):
        assert img.shape == (size, size) and img.dtype == np.float32
        assert 0.0 <= img.min() and img.max() <= 1.0 and img.std() > 0.1
    assert ph.lungs.shape == (2, size, size) and ph.lungs.dtype == bool
    assert ph.lesions.shape == (2, size, size) and ph.lesions.dtype == bool


@every_family
@pytest.mark.parametrize("finding", EVERY_FINDING, ids=lambda f: "-".join(f))
def test_mask_is_exactly_the_changed_pixels(finding, family):
    for seed in range(3):
        ph = phantom(seed, [finding], family=family)
        changed = ph.image != ph.healthy
        assert changed.any()
        np.testing.assert_array_equal(changed, ph.mask)
        assert not (ph.lesions[0] & ~ph.lungs[SIDES.index(finding.side)]).any(), "lesion outside its lung"


def test_mask_exact_for_two_findings_at_256():
    ph = phantom(7, [Finding("consolidation", "left", "lower"), Finding("ground_glass", "left", "middle")], 256)
    np.testing.assert_array_equal(ph.image != ph.healthy, ph.mask)
    np.testing.assert_array_equal(ph.mask, ph.lesions[0] | ph.lesions[1])
    assert ph.finding_mask("nodule").sum() == 0 and (ph.finding_mask("consolidation") == ph.lesions[0]).all()


@every_family
def test_healthy_phantom_is_its_own_twin(family):
    ph = phantom(3, family=family)
    assert ph.findings == () and ph.lesions.shape[0] == 0 and not ph.mask.any()
    assert ph.image.tobytes() == ph.healthy.tobytes()


@every_family
def test_findings_do_not_change_the_patient(family):
    """Anatomy and acquisition are drawn before the findings: asking for a finding keeps the same patient."""
    a, b = phantom(11, family=family), phantom(11, [Finding("nodule", "right", "upper")], family=family)
    np.testing.assert_array_equal(a.lungs, b.lungs)
    assert np.abs(a.healthy - b.healthy)[~b.mask].mean() < 0.03  # only the detector noise differs


@every_family
@pytest.mark.parametrize(
    "kind,least", [("nodule", 0.1), ("ground_glass", 0.04), ("consolidation", 0.1), ("effusion", 0.1)]
)
def test_findings_clearly_visible_at_64(kind, least, family):
    gains = []
    for seed, f in enumerate(f for f in EVERY_FINDING if f.kind == kind):
        ph = phantom(100 + seed, [f], family=family)
        gains.append((ph.image - ph.healthy)[ph.mask].mean())
        assert (ph.image - ph.healthy)[ph.mask].min() > 0, "findings are hyperdense everywhere in their mask"
    assert np.mean(gains) > least


@every_family
def test_ground_glass_fainter_than_consolidation(family):
    def gain(kind):
        phs = [phantom(s, [Finding(kind, "right", "middle")], family=family) for s in range(6)]
        return np.mean([(ph.image - ph.healthy)[ph.mask].mean() for ph in phs])

    assert gain("ground_glass") < 0.7 * gain("consolidation")


def test_nodules_are_several_pixels_across():
    for size in (64, 256):
        areas = [phantom(s, [Finding("nodule", "left", "upper")], size).mask.sum() for s in range(8)]
        diameters = 2 * np.sqrt(np.array(areas) / np.pi)
        assert diameters.min() >= 3.5 * size / 64 and diameters.max() <= 9 * size / 64


@every_family
def test_findings_lie_in_their_zone(family):
    for seed, f in enumerate(EVERY_FINDING):
        ph = phantom(200 + seed, [f], family=family)
        zone = zone_mask(ph.lung_mask, f"{f.side}-{f.zone}")
        inside = (ph.mask & zone).sum() / ph.mask.sum()
        assert inside > (0.45 if f.kind == "ground_glass" else 0.6), (f, inside)


@every_family
def test_effusion_fills_the_costophrenic_angle(family):
    for seed in range(6):
        side = SIDES[seed % 2]
        ph = phantom(300 + seed, [Finding("effusion", side, "lower")], family=family)
        lung = ph.lungs[SIDES.index(side)]
        bottom = np.nonzero(lung.any(1))[0][-1]
        assert ph.mask[bottom].any(), "the lowest lung row (the angle) is blunted"
        rows = np.nonzero(ph.mask.any(1))[0]
        assert rows[0] > np.nonzero(lung.any(1))[0].mean(), "fluid stays at the base"


@every_family
def test_anatomy_radiological_convention(family):
    """Patient's left lung on the image right, smaller (the heart bulges into it); lungs darker than the body."""
    for seed in range(8):
        ph = phantom(seed, size=64, family=family)
        right, left = ph.lungs
        assert np.nonzero(right)[1].mean() < 32 < np.nonzero(left)[1].mean()
        assert left.sum() < right.sum() * 1.05
        assert ph.image[ph.lung_mask].mean() < ph.image[~ph.lung_mask][ph.image[~ph.lung_mask] > 0.3].mean() - 0.15
        rows = np.nonzero(left.any(1))[0]
        heart_rows = rows[int(0.6 * len(rows)) : int(0.85 * len(rows))]
        mid = (np.nonzero(right.any(0))[0][0] + np.nonzero(left.any(0))[0][-1]) / 2
        reach_left = np.mean([np.nonzero(left[r])[0][0] - mid for r in heart_rows])
        reach_right = np.mean([mid - np.nonzero(right[r])[0][-1] for r in heart_rows if right[r].any()])
        assert reach_left > reach_right + 2, "the heart pushes the left lung's border to the image right"


@every_family
def test_healthy_phantoms_vary(family):
    phs = [phantom(s, family=family) for s in range(6)]
    for a, b in zip(phs, phs[1:], strict=False):
        assert np.abs(a.image - b.image).mean() > 0.02
        iou = (a.lung_mask & b.lung_mask).sum() / (a.lung_mask | b.lung_mask).sum()
        assert iou < 0.97


@every_family
def test_seeded_and_reproducible(family):
    f = [Finding("ground_glass", "left", "upper")]
    a, b, c = phantom(5, f, family=family), phantom(5, f, family=family), phantom(6, f, family=family)
    assert a.image.tobytes() == b.image.tobytes() and a.mask.tobytes() == b.mask.tobytes()
    assert a.image.tobytes() != c.image.tobytes()


def test_sample_findings_prevalence():
    draws = [sample_findings(np.random.default_rng([9, i]), 0.4, 0.25) for i in range(1000)]
    healthy = np.mean([len(d) == 0 for d in draws])
    abnormal = [d for d in draws if d]
    assert 0.35 < healthy < 0.45
    assert 0.19 < np.mean([len(d) == 2 for d in abnormal]) < 0.31
    assert all(len(set(d)) == len(d) for d in abnormal)
    assert all(f.zone == "lower" for d in abnormal for f in d if f.kind == "effusion")
    kinds = [f.kind for d in abnormal for f in d]
    assert all(kinds.count(k) > 0.15 * len(kinds) for k in FINDINGS)
    assert sample_findings(np.random.default_rng(0), p_healthy=1.0) == ()


def test_a_rng_draws_new_patients_with_the_findings_asked_for_at_every_size():
    """One generator rendering in a loop (as the datamodule's workers do): each call a new patient, each with exactly
    the findings asked for, in their own lung, at 64 and 256 px."""
    rng = np.random.default_rng(0)
    findings = (Finding("consolidation", "right", "lower"), Finding("nodule", "left", "upper"))
    for size in (64, 256):
        phs = [render_phantom(rng, findings, size) for _ in range(3)]
        for ph in phs:
            assert ph.findings == findings and ph.lesions.shape == (2, size, size)
            for k, finding in enumerate(findings):
                lesion = ph.lesions[k]
                assert lesion.any() and not (lesion & ~ph.lungs[SIDES.index(finding.side)]).any()
            np.testing.assert_array_equal(ph.image != ph.healthy, ph.mask)
        assert all(a.image.tobytes() != b.image.tobytes() for a, b in zip(phs, phs[1:], strict=False))


def test_floor_keeps_lesions_visible():
    ph = phantom(1, [Finding("ground_glass", "right", "upper")])
    assert FLOOR > 0 and (ph.image - ph.healthy)[ph.mask].min() > 1e-3


# ------------------------------------------------------------------------------------------------------- zones


def test_zone_masks_partition_each_lung():
    for seed in range(10):
        ph = phantom(seed, size=64 if seed % 2 else 128)
        zones = zone_masks(ph.lung_mask)
        assert set(zones) == set(ZONES)
        total = sum(z.astype(int) for z in zones.values())
        assert total.max() == 1 and ((total == 1) == ph.lung_mask).all()
        for k, side in enumerate(SIDES):
            np.testing.assert_array_equal(sum(zones[f"{side}-{lv}"] for lv in LEVELS).astype(bool), ph.lungs[k])
            rows = [np.nonzero(zones[f"{side}-{lv}"].any(1))[0] for lv in LEVELS]
            assert rows[0].max() < rows[1].min() and rows[1].max() < rows[2].min()
            assert max(map(len, rows)) - min(map(len, rows)) <= 1, "thirds of the vertical extent"


def test_split_lungs_recovers_each_lung():
    for seed in range(12):
        ph = phantom(50 + seed)
        right, left = split_lungs(ph.lung_mask)
        np.testing.assert_array_equal(right, ph.lungs[0])
        np.testing.assert_array_equal(left, ph.lungs[1])


def test_zones_on_a_real_style_mask():
    """0/255 uint8, lungs as two blocks: patient's left on the image right, thirds by rows."""
    mask = np.zeros((30, 40), np.uint8)
    mask[3:27, 4:16] = 255  # patient's right lung (image left), 24 rows
    mask[6:24, 24:36] = 255  # patient's left lung, 18 rows
    assert zone_mask(mask, "right-upper")[3:11, 4:16].all() and zone_mask(mask, "right-upper").sum() == 8 * 12
    assert zone_mask(mask, "left-lower").sum() == 6 * 12 and zone_mask(mask, "left-lower")[18:24, 24:36].all()
    assert not zone_mask(mask, "left-middle")[:, :20].any()
    with pytest.raises(ValueError):
        zone_mask(mask, "left-basal")
    assert all(not m.any() for m in level_masks(np.zeros((5, 5), bool)).values())
