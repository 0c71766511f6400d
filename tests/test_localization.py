"""Localization and counterfactual scores against small cases checked by hand."""

import pytest
import torch

from lightning_modules.counterfactual_scores import CounterfactualScores
from lightning_modules.localization import OVERALL, LocalizationScores, best_dice

FINDINGS = ("nodule", "effusion")


def as_image(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 1, -1)  # (1, 1, 1, N): one image of N pixels


def test_pooled_auprc_auroc_and_best_dice_by_hand():
    # ranked: 0.9 (+), 0.8 (-), 0.3 (+), 0.1 (-)
    # AP = (1/1 + 2/3) / 2; AUROC = 3 of 4 (positive, negative) pairs ordered; Dice: >= 0.3 gives P 2/3, R 1 -> 0.8
    scores = LocalizationScores(["m"], FINDINGS)
    scores.update("m", as_image([0.9, 0.8, 0.3, 0.1]), as_image([1, 0, 1, 0]), torch.tensor([[1.0, 0.0]]))
    result = scores.compute()["m"][OVERALL]
    assert result["auprc"] == pytest.approx(5 / 6)
    assert result["auroc"] == pytest.approx(0.75)
    assert result["dice"] == pytest.approx(0.8)
    assert result["threshold"] == pytest.approx(0.3)
    assert result["images"] == 1


def test_pixels_are_pooled_over_images_not_averaged_per_image():
    # each image alone is ranked perfectly, but image 2's lesion scores below image 1's background
    scores = LocalizationScores(["m"], FINDINGS)
    maps = torch.cat([as_image([0.9, 0.5]), as_image([0.4, 0.1])])
    scores.update("m", maps, torch.cat([as_image([1, 0]), as_image([1, 0])]), torch.tensor([[1.0, 0], [1, 0]]))
    result = scores.compute()["m"][OVERALL]
    assert result["auroc"] == pytest.approx(3 / 4)  # pairs (0.9>0.5, 0.9>0.1, 0.4<0.5, 0.4>0.1)
    assert result["auprc"] == pytest.approx((1 + 2 / 3) / 2)


def test_per_finding_type_ignores_the_other_findings_pixels():
    # pixels: nodule, effusion, background, background; the map ranks the effusion first
    maps = as_image([0.5, 0.9, 0.1, 0.2])
    finding_masks = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool).view(1, 2, 1, 4)
    scores = LocalizationScores(["m"], FINDINGS)
    scores.update("m", maps, as_image([1, 1, 0, 0]), torch.tensor([[1.0, 1.0]]), finding_masks)
    result = scores.compute()["m"]
    assert result[OVERALL]["auprc"] == pytest.approx(1.0)
    # were the effusion pixel a negative of the nodule, the nodule's AP would be 1/2
    assert result["nodule"]["auprc"] == pytest.approx(1.0)
    assert result["effusion"]["auprc"] == pytest.approx(1.0)

    scores = LocalizationScores(["m"], FINDINGS)  # a map that ranks the nodule below background
    scores.update(
        "m", as_image([0.15, 0.9, 0.1, 0.2]), as_image([1, 1, 0, 0]), torch.tensor([[1.0, 1.0]]), finding_masks
    )
    assert scores.compute()["m"]["nodule"]["auprc"] == pytest.approx(1 / 2)  # ranked: 0.2 (-), 0.15 (+), 0.1 (-)


def test_without_per_finding_masks_only_single_finding_images_count_per_type():
    scores = LocalizationScores(["m"], FINDINGS)
    maps = torch.cat([as_image([0.9, 0.1]), as_image([0.8, 0.2])])
    masks = torch.cat([as_image([1, 0]), as_image([1, 0])])
    scores.update("m", maps, masks, torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    result = scores.compute()["m"]
    assert result[OVERALL]["images"] == 2
    assert result["nodule"]["images"] == 1
    assert "effusion" not in result  # its only image also has a nodule: its pixels cannot be told apart


def test_binned_thresholds_approximate_the_exact_scores():
    generator = torch.Generator().manual_seed(0)
    masks = (torch.rand(4, 1, 16, 16, generator=generator) < 0.2).float()
    maps = (0.6 * masks + 0.7 * torch.rand(4, 1, 16, 16, generator=generator)).clamp(0, 1)
    labels = torch.ones(4, 1)
    exact, binned = LocalizationScores(["m"], ("x",)), LocalizationScores(["m"], ("x",), thresholds=200)
    for scores in (exact, binned):
        scores.update("m", maps, masks, labels)
    e, b = exact.compute()["m"][OVERALL], binned.compute()["m"][OVERALL]
    for key in ("auprc", "auroc", "dice"):
        assert b[key] == pytest.approx(e[key], abs=0.02)
    assert 0.5 < e["auroc"] < 1.0


def test_a_constant_map_scores_as_chance():
    scores = LocalizationScores(["m"], FINDINGS)
    scores.update("m", as_image([0.0, 0.0, 0.0, 0.0]), as_image([1, 0, 0, 0]), torch.tensor([[1.0, 0.0]]))
    result = scores.compute()["m"][OVERALL]
    assert result["auprc"] == pytest.approx(0.25) and result["auroc"] == pytest.approx(0.5)
    assert result["dice"] == pytest.approx(0.4)  # everything called lesion: P 1/4, R 1


def test_best_dice_skips_the_curve_end_without_threshold():
    precision, recall = torch.tensor([0.5, 1.0, 1.0]), torch.tensor([1.0, 0.5, 0.0])
    assert best_dice(precision, recall, torch.tensor([0.1, 0.7])) == (pytest.approx(2 / 3), pytest.approx(0.1))


def test_counterfactual_scores_by_hand():
    images = torch.zeros(3, 1, 2, 2)
    counterfactuals = torch.stack([torch.full((1, 2, 2), v) for v in (0.1, 0.4, 0.2)])
    healthy = torch.full((3, 1, 2, 2), 0.3)
    scores = CounterfactualScores()
    scores.update(
        images,
        counterfactuals,
        abnormal=torch.tensor([False, True, True]),
        p_abnormal=torch.tensor([0.9, 0.2, 0.7]),
        healthy01=healthy,
    )
    result = scores.compute()
    assert result["minimality"] == pytest.approx(0.1)  # the healthy input changed by 0.1
    assert result["validity"] == pytest.approx(0.5)  # one of two abnormal inputs flipped below 0.5
    assert result["twin_distance"] == pytest.approx(0.1)  # |0.4 - 0.3|, |0.2 - 0.3|


def test_counterfactual_scores_leave_out_what_they_did_not_see():
    scores = CounterfactualScores()
    scores.update(torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2), abnormal=torch.tensor([True]))
    assert scores.compute() == {}
