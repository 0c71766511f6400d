"""Phantom families: the held-out family is another kind of chest X-ray, served through the same data path.

Invariants every family keeps (exact masks, visible findings, zones, anatomy) are in tests/test_phantoms.py.
"""

import numpy as np
import pytest
from scipy import ndimage

from configs import compose, instantiate
from datamodules.phantoms import Finding, family, render_phantom
from datamodules.synthetic import SyntheticCXRDataModule, SyntheticCXRDataset, main
from datamodules.zones import SIDES


def phantoms(name, findings=(), seeds=range(16)):
    return [render_phantom(np.random.default_rng(s), tuple(findings), 64, name) for s in seeds]


def test_heldout_patients_and_films_differ_from_the_standard_ones():
    standard, heldout = phantoms("standard"), phantoms("heldout")
    lung_area = {k: np.mean([p.lung_mask.mean() for p in v]) for k, v in (("s", standard), ("h", heldout))}
    assert lung_area["h"] < 0.85 * lung_area["s"], "narrower lungs, bigger hearts, lower domes"
    contrast = {k: np.mean([_lung_contrast(p) for p in v]) for k, v in (("s", standard), ("h", heldout))}
    assert contrast["h"] < 0.8 * contrast["s"], "flatter films"


def _lung_contrast(ph):
    """Grey levels between the body's soft tissue and the lungs."""
    body = ph.image[~ph.lung_mask]
    return body[body > 0.3].mean() - ph.image[ph.lung_mask].mean()


def test_heldout_nodules_are_several_and_small():
    counts, areas = [], []
    for ph in phantoms("heldout", [Finding("nodule", "left", "middle")]):
        labels, n = ndimage.label(ph.mask)
        counts.append(n)
        areas += [float((labels == k).sum()) for k in range(1, n + 1)]
    standard = [ph.mask.sum() for ph in phantoms("standard", [Finding("nodule", "left", "middle")])]
    assert np.mean(np.array(counts) >= 2) > 0.5, counts  # overlapping ones may merge
    assert np.median(areas) < 0.5 * np.median(standard)


def test_heldout_consolidation_stops_at_a_sharp_fissure():
    """Above the lobe the lung is untouched: the mask's top edge is a line, not a fading wobble."""
    for ph in phantoms("heldout", [Finding("consolidation", "right", "lower")], range(6)):
        gain = ph.image - ph.healthy
        top = np.argmax(ph.mask, axis=0)[ph.mask.any(0)]  # first lesion row per column
        assert np.ptp(top) <= 12 and gain[ph.mask].mean() > 0.1


def test_heldout_effusion_is_subpulmonic_with_a_flat_top():
    for seed, ph in enumerate(phantoms("heldout", [Finding("effusion", "right", "lower")], range(6))):
        lung = ph.lungs[SIDES.index("right")]
        top = np.argmax(ph.mask, axis=0)[ph.mask.any(0)]
        assert ph.mask.any() and np.ptp(top) <= 0.25 * np.ptp(np.nonzero(lung.any(1))[0]), seed


def test_unknown_family_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown phantom family 'other'; valid: heldout, standard"):
        family("other")
    with pytest.raises(ValueError, match="valid: heldout, standard"):
        SyntheticCXRDataModule(family="other").setup()


def test_the_family_is_a_data_setting_of_every_run():
    cfg = compose("train", ["data.family=heldout", "data.num_train=4", "data.num_val=4", "data.num_test=4"])
    dm = instantiate(cfg.data)
    dm.setup()
    batch = next(iter(dm.test_dataloader()))
    heldout = SyntheticCXRDataset("test", 4, dm.bank, seed=cfg.data.seed, family_name="heldout")
    standard = SyntheticCXRDataset("test", 4, dm.bank, seed=cfg.data.seed)
    np.testing.assert_array_equal(batch["image"][0].numpy(), heldout[0]["image"].numpy())
    assert not np.allclose(batch["image"][0].numpy(), standard[0]["image"].numpy())


def test_the_layout_writer_records_the_family(tmp_path):
    main(["--out", str(tmp_path), "--limit", "3", "--num", "8", "--image-size", "64", "--family", "heldout"])
    assert "family: heldout" in (tmp_path / "README.md.txt").read_text()
