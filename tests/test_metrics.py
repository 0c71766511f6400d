"""FID, SSIM and MS-SSIM against independent computations; MS-SSIM at small sizes; FID extractors found offline;
per-image seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import linalg, ndimage
from torchmetrics.image import MultiScaleStructuralSimilarityIndexMeasure

from datamodules.base import spread_indices
from lightning_modules.fid import INCEPTION_WEIGHTS, DomainFeatures, build_extractors, find_inception_weights
from lightning_modules.generation_metrics import GenerationMetrics, flatten, image_groups, ms_ssim_setting
from lightning_modules.seeding import image_generators
from tests.helpers import CLASSES, PooledPixels, classifier_checkpoint, smooth_images


def scipy_frechet(x: np.ndarray, y: np.ndarray) -> float:
    """||mu_x - mu_y||^2 + Tr(S_x + S_y - 2 sqrtm(S_x S_y)), the Gaussians fitted with numpy, sqrtm by scipy."""
    mu_x, mu_y = x.mean(0), y.mean(0)
    s_x, s_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = linalg.sqrtm(s_x @ s_y).real
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(s_x + s_y - 2 * root))


def wang_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. 2004 on one (H, W) pair in [0, 1]: 11-px Gaussian window (sigma 1.5), K1 0.01, K2 0.03, mean map.

    ``mode="mirror"`` is torch's reflect padding (edge pixel not repeated).
    """

    def blur(a: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(a, sigma=1.5, truncate=3.5, mode="mirror")  # radius 5: 11 px

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    ssim_map = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(ssim_map.mean())


@pytest.fixture(scope="module")
def data():
    real = smooth_images(24, 0)
    counterfactual = (real + 0.15 * torch.randn(real.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    generated = smooth_images(24, 2, shift=0.2)
    groups = [["Normal"]] * 10 + [["nodule"]] * 8 + [["nodule", "effusion"]] * 5 + [["effusion"]]
    return real, generated, counterfactual, groups


@pytest.fixture(scope="module")
def results(data):
    real, generated, counterfactual, groups = data
    metrics = GenerationMetrics(CLASSES, 64, {"fid_domain": DomainFeatures(PooledPixels())})
    for batch in (slice(0, 10), slice(10, 24)):  # two updates: the states accumulate
        metrics.update(real[batch], groups[batch], generated=generated[batch], counterfactual=counterfactual[batch])
    return metrics.compute()


def test_fid_equals_the_frechet_distance_computed_by_scipy(data, results):
    real, generated, counterfactual, groups = data

    def features(x: torch.Tensor) -> np.ndarray:
        return PooledPixels().features(x).double().numpy()

    for group, index in [("overall", slice(None)), ("Normal", slice(0, 10)), ("nodule", slice(10, 23))]:
        for pair, fake in [("generated", generated), ("counterfactual", counterfactual)]:
            expected = scipy_frechet(features(real[index]), features(fake[index]))
            assert results[group][pair]["fid_domain"] == pytest.approx(expected, rel=1e-4)
    assert results["overall"]["generated"]["fid_domain"] > 10 * results["overall"]["counterfactual"]["fid_domain"]


def test_ssim_equals_the_wang_reference(data, results):
    real, _, counterfactual, _ = data

    def unit(x: torch.Tensor) -> np.ndarray:
        return ((x[:, 0] + 1) / 2).double().numpy()

    expected = np.mean([wang_ssim(a, b) for a, b in zip(unit(counterfactual), unit(real), strict=True)])
    assert results["overall"]["counterfactual"]["ssim"] == pytest.approx(expected, abs=1e-4)
    normal = np.mean([wang_ssim(a, b) for a, b in zip(unit(counterfactual[:10]), unit(real[:10]), strict=True)])
    assert results["Normal"]["counterfactual"]["ssim"] == pytest.approx(normal, abs=1e-4)
    assert results["overall"]["counterfactual"]["ssim"] > results["overall"]["generated"]["ssim"]


def test_groups_count_each_finding_and_leave_out_what_cannot_be_computed(results):
    assert [results[g]["n"] for g in ("overall", *CLASSES)] == [24, 10, 13, 6]
    effusion = GenerationMetrics(CLASSES, 64, {"fid_domain": DomainFeatures(PooledPixels())})
    real = smooth_images(3, 5)
    effusion.update(real, [["Normal"], ["Normal"], ["effusion"]], counterfactual=real)
    one = effusion.compute()
    assert one["effusion"]["counterfactual"]["fid_domain"] is None and one["nodule"]["n"] == 0  # FID needs 2
    assert one["effusion"]["counterfactual"]["ssim"] == pytest.approx(1.0)
    assert one["nodule"]["counterfactual"]["ssim"] is None
    assert set(flatten(one)) == {"counterfactual/ssim", "counterfactual/ms_ssim", "counterfactual/fid_domain"}
    effusion.reset()
    assert effusion.compute()["overall"]["n"] == 0


def test_evaluated_images_are_spread_over_the_split_not_taken_from_its_start():
    assert spread_indices(10, 4) == [0, 3, 6, 9]
    assert spread_indices(5, None) == spread_indices(5, 9) == [0, 1, 2, 3, 4]
    assert spread_indices(7, 1) == [0] and spread_indices(0, 3) == []


def test_image_groups_are_normal_or_every_finding_present():
    labels = torch.tensor([[0, 0, 0], [1, 0, 1], [0, 1, 0]], dtype=torch.float32)
    assert image_groups(labels, ("a", "b", "c")) == [["Normal"], ["a", "c"], ["b"]]


@pytest.mark.parametrize(
    "size, scales, kernel",
    [(64, 3, 11), (128, 4, 11), (175, 4, 11), (176, 5, 11), (256, 5, 11), (32, 2, 11), (16, 2, 7)],
)
def test_ms_ssim_adapts_scales_and_window_to_the_image_size(size, scales, kernel):
    setting = ms_ssim_setting(size)
    assert (setting.scales, setting.kernel_size) == (scales, kernel)
    assert int(3.5 * setting.sigma + 0.5) * 2 + 1 == kernel  # the Gaussian torchmetrics builds has that size
    assert sum(setting.betas) == pytest.approx(1.0)
    x = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(0))
    metric = MultiScaleStructuralSimilarityIndexMeasure(
        data_range=1.0, kernel_size=setting.kernel_size, sigma=setting.sigma, betas=setting.betas
    )
    assert metric(x, x).item() == pytest.approx(1.0, abs=1e-5)
    if scales < 5:  # where we adapted, torchmetrics' default refuses the size
        with pytest.raises(ValueError):
            MultiScaleStructuralSimilarityIndexMeasure(data_range=1.0)(x, x)


def test_inception_weights_are_looked_up_locally_and_their_absence_says_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"{INCEPTION_WEIGHTS}.*{tmp_path / 'hub' / 'checkpoints'}"):
        find_inception_weights()
    with pytest.raises(FileNotFoundError):
        build_extractors(inception=True)
    extractors, skipped = build_extractors(inception="auto", classifier_checkpoint=str(tmp_path / "none.ckpt"))
    assert extractors == {} and set(skipped) == {"fid", "fid_domain"}
    weights = tmp_path / "hub" / "checkpoints" / INCEPTION_WEIGHTS
    weights.parent.mkdir(parents=True)
    weights.touch()
    assert find_inception_weights() == weights


class FakeInception(torch.nn.Module):
    """Stands in for torch-fidelity's network (real weights cannot be downloaded here): checks what it is fed."""

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str):
        super().__init__()
        assert Path(feature_extractor_weights_path).name == INCEPTION_WEIGHTS

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dtype == torch.uint8 and images.shape[1] == 3  # RGB bytes, as torchmetrics feeds Inception
        return F.adaptive_avg_pool2d(images.float(), 2).flatten(1)[:, :8]  # (B, 8): 2048-d FIDs take a minute


def test_inception_fid_takes_a_local_weights_file_checked_as_plain_tensors(tmp_path, monkeypatch):
    import lightning_modules.fid as fid_module

    monkeypatch.setattr(fid_module, "NoTrainInceptionV3", FakeInception)
    monkeypatch.setattr(fid_module.InceptionFeatures, "num_features", 8)
    weights = tmp_path / INCEPTION_WEIGHTS
    torch.save({"conv.weight": torch.zeros(2)}, weights)
    extractors, skipped = build_extractors(inception="auto", inception_weights=str(weights))
    assert set(extractors) == {"fid"} and "fid_domain" in skipped
    metrics = GenerationMetrics(CLASSES, 64, extractors)
    real = smooth_images(3, 6)
    metrics.update(real, [["Normal"]] * 3, counterfactual=real, generated=smooth_images(3, 7, shift=0.5))
    values = metrics.compute()["overall"]
    assert values["counterfactual"]["fid"] == pytest.approx(0.0, abs=1e-3) and values["generated"]["fid"] > 1.0

    torch.save({"conv.weight": FakeInception}, weights)  # pickled code, not a state dict: refused before loading
    with pytest.raises(Exception, match="Weights only load failed"):
        build_extractors(inception=True, inception_weights=str(weights))


def test_fid_domain_uses_the_finding_classifier_checkpoint(tmp_path):
    path = classifier_checkpoint(tmp_path / "classifier.ckpt", CLASSES[1:])
    extractors, skipped = build_extractors(inception=False, classifier_checkpoint=str(path))
    assert set(extractors) == {"fid_domain"} and set(skipped) == {"fid"}

    metrics = GenerationMetrics(CLASSES, 64, extractors)
    real = smooth_images(6, 3)
    metrics.update(real, [["Normal"]] * 6, generated=smooth_images(6, 4, shift=0.5), counterfactual=real)
    values = metrics.compute()["overall"]
    assert values["counterfactual"]["fid_domain"] == pytest.approx(0.0, abs=1e-3)
    assert values["generated"]["fid_domain"] > 1e-3


def test_each_image_has_its_own_generator_seeded_by_its_id_and_the_seed():
    def draw(ids: list[str], seed: int) -> list[torch.Tensor]:
        return [torch.randn(3, generator=g) for g in image_generators(ids, seed)]

    a, b = draw(["x", "y"], 0), draw(["y", "x"], 0)
    assert torch.equal(a[0], b[1]) and torch.equal(a[1], b[0])  # the order (batch, rank) does not matter
    assert not torch.equal(a[0], a[1]) and not torch.equal(draw(["x"], 1)[0], a[0])
