"""Attribution maps, the baselines and the overlays, on hand-made maps and a tiny random model (2 to 4 steps)."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionDiffEditPipeline
from PIL import Image

from lightning_modules.attribution import attribution_map, normalize_per_image, signed_map
from lightning_modules.baselines import diffedit_latent_map, diffedit_map, mean_healthy_image, reconstruct
from lightning_modules.latent_diffusion import NULL_PROMPT
from lightning_modules.overlays import blend_heat, save_array, save_gray_png, save_overlay
from lightning_modules.pipeline import CounterfactualPipeline

ABNORMAL = ["small nodule in the left lower zone", "right pleural effusion"]


@pytest.fixture(scope="module")
def pipeline(tiny_ldm):
    return CounterfactualPipeline.from_module(tiny_ldm)


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1


# ---- maps --------------------------------------------------------------------------------------------------------
def test_map_kinds_by_hand():
    images, counterfactuals = torch.tensor([0.5, 0.0, -1.0]), torch.tensor([0.0, 0.25, -0.5])
    signed = signed_map(images.view(1, 1, 1, 3), counterfactuals.view(1, 1, 1, 3))
    assert signed.flatten().tolist() == [0.5, -0.25, -0.5]
    assert attribution_map(signed, "absolute").flatten().tolist() == [0.5, 0.25, 0.5]
    assert attribution_map(signed, "positive").flatten().tolist() == [0.5, 0.0, 0.0]
    assert attribution_map(signed, "signed").flatten().tolist() == [0.5, -0.25, -0.5]
    with pytest.raises(ValueError, match="unknown map kind"):
        attribution_map(signed, "squared")


def test_smoothing_spreads_a_point_and_keeps_a_constant():
    point = torch.zeros(1, 1, 15, 15)
    point[..., 7, 7] = 1.0
    smooth = attribution_map(point, "absolute", sigma=1.5)
    assert smooth[..., 7, 7] < 0.2 and smooth[..., 7, 9] > 0.02
    assert smooth.sum().item() == pytest.approx(1.0, abs=1e-4)  # mass kept away from the borders
    flat = torch.full((1, 1, 9, 9), 0.3)
    torch.testing.assert_close(attribution_map(flat, "absolute", sigma=2.0), flat)


def test_per_image_normalisation():
    maps = torch.stack([torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 0.5]])])[:, None]  # (2, 1, 1, 2)
    assert normalize_per_image(maps).flatten().tolist() == [0.0, 1.0, 0.0, 1.0]
    assert normalize_per_image(torch.zeros(1, 1, 2, 2)).abs().max() == 0  # a flat map stays 0, no NaN


# ---- both methods and the baselines on the tiny model ------------------------------------------------------------
@pytest.mark.parametrize("method", ["sdedit", "inversion"])
def test_both_methods_give_non_negative_maps_of_their_difference(pipeline, images, method):
    out = pipeline(images, method=method, num_inference_steps=3, strength=0.6, inversion_depth=0.6, seed=0)
    positive = attribution_map(out.attribution, "positive")
    assert positive.shape == images.shape and positive.min() >= 0
    torch.testing.assert_close(positive, (images - out.images).clamp(min=0))
    again = pipeline(images, method=method, num_inference_steps=3, strength=0.6, inversion_depth=0.6, seed=0)
    assert torch.equal(out.images, again.images)


def test_reconstruction_is_the_unguided_null_prompt_pipeline(pipeline, images):
    ours = reconstruct(pipeline, images, "inversion", num_inference_steps=3, inversion_depth=0.5, guidance_scale=7.0)
    plain = pipeline(images, method="inversion", target_prompt=[NULL_PROMPT] * 2, num_inference_steps=3,
                     inversion_depth=0.5, guidance_scale=1.0)
    torch.testing.assert_close(ours.images, plain.images)
    guided = pipeline(images, method="inversion", num_inference_steps=3, inversion_depth=0.5, guidance_scale=7.0)
    assert not torch.allclose(ours.images, guided.images)


def test_diffedit_latent_map_matches_diffusers_generate_mask(pipeline, images):
    """Peer equivalence: DiffEdit's thresholded mask of our continuous map is diffusers' mask."""
    settings = dict(strength=0.5, guidance_scale=3.0, num_inference_steps=4)
    ours = diffedit_latent_map(pipeline, images, ABNORMAL, num_maps=3, generator=torch.Generator().manual_seed(5),
                               **settings)
    peer = StableDiffusionDiffEditPipeline(
        vae=pipeline.vae, text_encoder=None, tokenizer=None, unet=pipeline.unet, scheduler=pipeline.scheduler,
        inverse_scheduler=pipeline.inverse_scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    encode = pipeline.prompt_encoder
    theirs = peer.generate_mask(
        image=(images + 1) / 2, source_prompt_embeds=encode(ABNORMAL), target_prompt_embeds=encode(
            [pipeline.normal_prompt] * 2), source_negative_prompt_embeds=encode([NULL_PROMPT] * 2),
        target_negative_prompt_embeds=encode([NULL_PROMPT] * 2), num_maps_per_mask=3,
        mask_encode_strength=settings["strength"], guidance_scale=settings["guidance_scale"],
        num_inference_steps=settings["num_inference_steps"], generator=torch.Generator().manual_seed(5),
        mask_thresholding_ratio=3.0, output_type="np")  # (B, h, w) in {0, 1}
    clamp = ours.mean() * 3.0
    mask = (ours[:, 0].clamp(0, clamp) / clamp > 0.5).int().numpy()
    assert 0 < theirs.mean() < 1
    np.testing.assert_array_equal(mask, theirs)


def test_diffedit_map_is_zero_when_both_prompts_agree(pipeline, images):
    same = diffedit_map(pipeline, images, [pipeline.normal_prompt] * 2, num_maps=2, num_inference_steps=4,
                        guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    different = diffedit_map(pipeline, images, ABNORMAL, num_maps=2, num_inference_steps=4, guidance_scale=3.0,
                             generator=torch.Generator().manual_seed(0))
    assert same.shape == different.shape == images.shape
    assert same.abs().max() == 0 and different.min() >= 0 and different.max() > 0
    with pytest.raises(ValueError, match="guidance_scale 0"):
        diffedit_map(pipeline, images, ABNORMAL, guidance_scale=0.0)


def test_mean_healthy_image_averages_only_healthy_samples():
    labels = [1, 0, 0, 1, 0]
    dataset = [{"image": torch.full((1, 2, 2), float(i)), "label": torch.tensor([float(v)])}
               for i, v in enumerate(labels)]
    torch.testing.assert_close(mean_healthy_image(dataset), torch.full((1, 2, 2), (1 + 2 + 4) / 3))
    torch.testing.assert_close(mean_healthy_image(dataset, num_images=2), torch.full((1, 2, 2), 1.5))
    with pytest.raises(ValueError, match="no healthy image"):
        mean_healthy_image(dataset[:1])


# ---- files -------------------------------------------------------------------------------------------------------
def test_blend_leaves_zero_attribution_untouched_and_colours_the_rest():
    image = np.full((4, 4), 0.5, np.float32)
    heat = np.zeros((4, 4), np.float32)
    heat[0, 0] = 1.0
    rgb = blend_heat(image, heat, vmax=0.5)
    np.testing.assert_allclose(rgb[1:, 1:], 0.5)
    assert not np.allclose(rgb[0, 0], 0.5)


def test_overlay_panel_array_and_png_files(tmp_path):
    image = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    heat = np.zeros_like(image)
    heat[20:30, 20:30] = 0.3
    with_cf = Image.open(save_overlay(tmp_path / "a.png", image, heat, 1 - image, title="x" * 500, vmax=0.25))
    without_cf = Image.open(save_overlay(tmp_path / "b.png", image, heat, None, label="score"))
    assert with_cf.mode == "RGB" and with_cf.height == without_cf.height > 256
    assert with_cf.width > without_cf.width + 256  # one more tile
    np.testing.assert_array_equal(np.load(save_array(tmp_path / "m.npy", heat)), heat)
    grey = np.asarray(Image.open(save_gray_png(tmp_path / "g.png", image)))
    assert grey.dtype == np.uint8 and grey[0, 0] == 0 and grey[-1, -1] == 255
