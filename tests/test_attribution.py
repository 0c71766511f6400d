"""Attribution maps, the method registry, our methods and the baselines, the overlays: on hand-made maps and a tiny
random model (2 to 4 steps)."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionDiffEditPipeline
from matplotlib import colormaps
from PIL import Image

from configs import compose
from lightning_modules.attribution import attribution_map, normalize_per_image, signed_map
from lightning_modules.methods import METHODS, Method, MethodOutput, Models, build, register
from lightning_modules.methods.diffedit import DiffEditSettings, diffedit_latent_map, diffedit_map
from lightning_modules.methods.mean_healthy import mean_healthy_image
from lightning_modules.methods.reconstruction import reconstruct
from lightning_modules.methods.refined import EditMask
from lightning_modules.overlays import (
    blend_heat,
    diverging,
    grey,
    save_array,
    save_gray_png,
    save_overlay,
    save_panel,
    tint,
)
from lightning_modules.prompt_encoder import NULL_PROMPT
from lightning_modules.runs.attribution import attribute
from lightning_modules.settings import InversionSettings, SamplingSettings, SDEditSettings

ABNORMAL = ["small nodule in the left lower zone", "right pleural effusion"]
#: what a checkpoint stores as its sampling defaults (the tests' stand-in)
CHECKPOINT_DEFAULTS = SamplingSettings(num_inference_steps=4, guidance_scale=2.0)


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1


def seeded(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def attribution_config(*overrides: str):
    return compose("attribution", list(overrides))


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


# ---- the registry: methods built from their config blocks, validated once ----------------------------------------
def test_the_registry_holds_ours_and_every_baseline_with_what_they_need():
    assert set(METHODS) == {"sdedit", "inversion", "refined", "mean_healthy", "reconstruction", "diffedit", "saliency"}
    assert {n for n, m in METHODS.items() if m.counterfactual} == {
        "sdedit",
        "inversion",
        "refined",
        "mean_healthy",
        "reconstruction",
    }
    assert [n for n, m in METHODS.items() if m.needs_classifier] == ["saliency"]
    assert [n for n, m in METHODS.items() if m.needs_train_split] == ["mean_healthy"]
    cfg = attribution_config()
    for name, cls in METHODS.items():  # every method's block exists in configs/attribution.yaml and builds
        assert isinstance(build(name, cfg, CHECKPOINT_DEFAULTS), cls)


def test_a_new_method_is_one_registered_class():
    class Flat(Method):
        name = "flat_test_method"
        config_key = "map"

        @classmethod
        def from_config(cls, cfg, defaults, **overrides):
            return cls()

        def __call__(self, images, models, generator, prompts=None):
            return MethodOutput(map=torch.ones_like(images))

    try:
        assert register(Flat) is Flat and METHODS["flat_test_method"] is Flat
        assert isinstance(build("flat_test_method", attribution_config(), CHECKPOINT_DEFAULTS), Flat)
        with pytest.raises(ValueError, match="two attribution methods are named 'flat_test_method'"):
            register(Flat)
    finally:
        METHODS.pop("flat_test_method", None)


def test_our_settings_come_from_the_block_over_the_checkpoint_defaults():
    cfg = attribution_config("sdedit.num_inference_steps=null", "sdedit.guidance_scale=null", "sdedit.strength=0.5")
    sdedit = build("sdedit", cfg, CHECKPOINT_DEFAULTS)
    assert sdedit.settings == SDEditSettings(num_inference_steps=4, guidance_scale=2.0, strength=0.5)
    inversion = build("inversion", cfg, CHECKPOINT_DEFAULTS, guidance_scale=9.0)  # an override (tuning) wins
    assert inversion.settings == InversionSettings(num_inference_steps=50, guidance_scale=9.0, inversion_depth=0.5)
    reconstruction = build(
        "reconstruction", attribution_config("baselines.reconstruction.method=sdedit"), CHECKPOINT_DEFAULTS
    )
    assert reconstruction.settings == SDEditSettings(num_inference_steps=50, guidance_scale=20.0, strength=0.1)
    diffedit = build("diffedit", attribution_config("baselines.diffedit.num_maps=null"), CHECKPOINT_DEFAULTS)
    assert diffedit.settings.num_maps == 10 and diffedit.settings.strength == 0.2  # null: diffusers' default
    assert diffedit.abnormal_prompt == "focal opacity in the lung"


@pytest.mark.parametrize(
    "override, message",
    [
        ("sdedit.num_inference_steps=5", "sdedit: strength 0.1 of 5 steps runs no denoising step"),
        ("inversion.inversion_depth=1.5", "inversion: inversion_depth must be in \\(0, 1\\]"),
        ("sdedit.guidance_scale=-1", "sdedit.guidance_scale must be a number >= 0"),
        ("baselines.reconstruction.method=diffedit", "baselines.reconstruction: method must be one of"),
        ("baselines.diffedit.guidance_scale=0", "baselines.diffedit: diffedit needs the prompts"),
        ("baselines.diffedit.num_maps=0", "baselines.diffedit: num_maps must be an integer >= 1"),
        ("baselines.diffedit.abnormal_prompt=' '", "baselines.diffedit: abnormal_prompt must be a non-empty prompt"),
        ("baselines.mean_healthy.num_images=0", "baselines.mean_healthy.num_images must be an integer >= 1"),
        ("baselines.saliency.method=lime", "baselines.saliency: unknown saliency method 'lime'"),
    ],
)
def test_a_bad_setting_fails_when_the_method_is_built_naming_its_block(override, message):
    name = next(n for n, m in METHODS.items() if override.startswith(m.config_key + "."))
    with pytest.raises(ValueError, match=message):
        build(name, attribution_config(override), CHECKPOINT_DEFAULTS)


def test_unknown_names_list_the_known_ones():
    cfg = attribution_config()
    with pytest.raises(ValueError, match="methods: unknown 'gradcam'; choose from \\['diffedit'"):
        build("gradcam", cfg, CHECKPOINT_DEFAULTS)
    with pytest.raises(ValueError, match="sdedit: unknown SDEditSettings setting\\(s\\) \\['steps'\\]"):
        build("sdedit", cfg, CHECKPOINT_DEFAULTS, steps=3)  # a tuning grid's key
    with pytest.raises(ValueError, match="baselines.saliency: unknown setting\\(s\\) \\['sigma'\\]; valid: method"):
        build("saliency", cfg, CHECKPOINT_DEFAULTS, sigma=1.0)


# ---- both methods and the baselines on the tiny model ------------------------------------------------------------
@pytest.mark.parametrize(
    "settings",
    [
        SDEditSettings(num_inference_steps=3, strength=0.6),
        InversionSettings(num_inference_steps=3, inversion_depth=0.6),
    ],
)
def test_both_methods_give_non_negative_maps_of_their_difference(tiny_pipeline, images, settings):
    out = tiny_pipeline(images, settings, generator=seeded(0))
    positive = attribution_map(out.attribution, "positive")
    assert positive.shape == images.shape and positive.min() >= 0
    torch.testing.assert_close(positive, (images - out.images).clamp(min=0))
    again = tiny_pipeline(images, settings, generator=seeded(0))
    assert torch.equal(out.images, again.images)


@pytest.mark.parametrize("name", ["sdedit", "inversion"])
def test_our_registered_methods_are_the_pipeline_with_their_settings(tiny_pipeline, images, name):
    cfg = attribution_config(f"{name}.num_inference_steps=3", "sdedit.strength=0.5", "target_prompt=clear lungs")
    method = build(name, cfg, CHECKPOINT_DEFAULTS)
    output = method(images, Models(tiny_pipeline), seeded(3))
    expected = tiny_pipeline(images, method.settings, "clear lungs", seeded(3)).images
    assert method.counterfactual and output.map is None and output.latent_error is None
    torch.testing.assert_close(output.counterfactual, expected, rtol=0, atol=0)
    other = tiny_pipeline(images, method.settings, None, seeded(3)).images  # the checkpoint's healthy prompt
    assert not torch.allclose(output.counterfactual, other)


def test_reconstruction_is_the_unguided_null_prompt_pipeline(tiny_pipeline, images):
    settings = InversionSettings(num_inference_steps=3, inversion_depth=0.5, guidance_scale=7.0)
    ours = reconstruct(tiny_pipeline, images, settings)
    plain = tiny_pipeline(
        images, InversionSettings(num_inference_steps=3, inversion_depth=0.5, guidance_scale=1.0), [NULL_PROMPT] * 2
    )
    torch.testing.assert_close(ours.images, plain.images)
    guided = tiny_pipeline(images, settings)
    assert not torch.allclose(ours.images, guided.images)


def test_reconstruction_method_reports_the_round_trip_latent_error(tiny_pipeline, images):
    cfg = attribution_config("inversion.num_inference_steps=3", "inversion.inversion_depth=0.5")
    method = build("reconstruction", cfg, CHECKPOINT_DEFAULTS)
    output = method(images, Models(tiny_pipeline), seeded(0))
    rebuilt = reconstruct(tiny_pipeline, images, method.settings)
    torch.testing.assert_close(output.counterfactual, rebuilt.images)
    z0 = tiny_pipeline.encode_image(images)
    expected = (rebuilt.latents - z0).flatten(1).norm(dim=1) / z0.flatten(1).norm(dim=1)
    assert output.latent_error.shape == (2,) and (output.latent_error > 0).all()
    torch.testing.assert_close(output.latent_error, expected)


def test_diffedit_latent_map_matches_diffusers_generate_mask(tiny_pipeline, images):
    """Peer equivalence: DiffEdit's thresholded mask of our continuous map is diffusers' mask."""
    pipeline = tiny_pipeline
    settings = DiffEditSettings(strength=0.5, guidance_scale=3.0, num_inference_steps=4, num_maps=3)
    ours = diffedit_latent_map(pipeline, images, ABNORMAL, settings, generator=seeded(5))
    peer = StableDiffusionDiffEditPipeline(
        vae=pipeline.vae,
        text_encoder=None,
        tokenizer=None,
        unet=pipeline.unet,
        scheduler=pipeline.scheduler,
        inverse_scheduler=pipeline.inverse_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    encode = pipeline.prompt_encoder
    theirs = peer.generate_mask(
        image=(images + 1) / 2,
        source_prompt_embeds=encode(ABNORMAL),
        target_prompt_embeds=encode([pipeline.normal_prompt] * 2),
        source_negative_prompt_embeds=encode([NULL_PROMPT] * 2),
        target_negative_prompt_embeds=encode([NULL_PROMPT] * 2),
        num_maps_per_mask=settings.num_maps,
        mask_encode_strength=settings.strength,
        guidance_scale=settings.guidance_scale,
        num_inference_steps=settings.num_inference_steps,
        generator=seeded(5),
        mask_thresholding_ratio=3.0,
        output_type="np",
    )  # (B, h, w) in {0, 1}
    clamp = ours.mean() * 3.0
    mask = (ours[:, 0].clamp(0, clamp) / clamp > 0.5).int().numpy()
    assert 0 < theirs.mean() < 1
    np.testing.assert_array_equal(mask, theirs)


def test_diffedit_map_is_zero_when_both_prompts_agree(tiny_pipeline, images):
    settings = DiffEditSettings(num_maps=2, num_inference_steps=4, guidance_scale=3.0)
    same = diffedit_map(tiny_pipeline, images, [tiny_pipeline.normal_prompt] * 2, settings, generator=seeded(0))
    different = diffedit_map(tiny_pipeline, images, ABNORMAL, settings, generator=seeded(0))
    assert same.shape == different.shape == images.shape
    assert same.abs().max() == 0 and different.min() >= 0 and different.max() > 0
    with pytest.raises(ValueError, match="guidance_scale 0"):
        DiffEditSettings(guidance_scale=0.0)


def test_diffedit_method_uses_the_reports_else_its_abnormal_prompt(tiny_pipeline, images):
    cfg = attribution_config(
        "baselines.diffedit.num_inference_steps=4",
        "baselines.diffedit.strength=0.5",
        "baselines.diffedit.num_maps=2",
        "baselines.diffedit.abnormal_prompt=right pleural effusion",
    )
    method, models = build("diffedit", cfg, CHECKPOINT_DEFAULTS), Models(tiny_pipeline)
    assert not method.counterfactual
    from_reports = method(images, models, seeded(0), ABNORMAL).map
    fallback = method(images, models, seeded(0)).map
    assert from_reports.shape == images.shape and from_reports.min() >= 0
    torch.testing.assert_close(
        from_reports, diffedit_map(tiny_pipeline, images, ABNORMAL, method.settings, generator=seeded(0))
    )
    torch.testing.assert_close(
        fallback,
        diffedit_map(tiny_pipeline, images, ["right pleural effusion"] * 2, method.settings, generator=seeded(0)),
    )
    assert not torch.allclose(from_reports, fallback)


def test_mean_healthy_image_averages_only_healthy_samples():
    labels = [1, 0, 0, 1, 0]
    dataset = [
        {"image": torch.full((1, 2, 2), float(i)), "label": torch.tensor([float(v)])} for i, v in enumerate(labels)
    ]
    torch.testing.assert_close(mean_healthy_image(dataset), torch.full((1, 2, 2), (1 + 2 + 4) / 3))
    torch.testing.assert_close(mean_healthy_image(dataset, num_images=2), torch.full((1, 2, 2), 1.5))
    with pytest.raises(ValueError, match="no healthy image"):
        mean_healthy_image(dataset[:1])


def test_mean_healthy_method_gives_every_input_the_mean_of_the_train_split():
    dataset = [{"image": torch.full((1, 2, 2), float(i)), "label": torch.tensor([float(i % 2)])} for i in range(6)]
    method = build("mean_healthy", attribution_config("baselines.mean_healthy.num_images=2"), CHECKPOINT_DEFAULTS)
    models = Models(pipeline=None, train_split=dataset)
    with pytest.raises(RuntimeError, match="prepare"):
        method(torch.zeros(3, 1, 2, 2), models, seeded(0))
    method.prepare(models)
    output = method(torch.zeros(3, 1, 2, 2), models, seeded(0))
    torch.testing.assert_close(output.counterfactual, torch.full((3, 1, 2, 2), 1.0))  # images 0 and 2


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


def test_induction_style_panel_stacks_one_strip_per_row_on_a_signed_scale(tmp_path):
    image = np.full((64, 64), 0.5, np.float32)
    signed = np.zeros_like(image)
    signed[:8], signed[-8:] = 0.2, -0.2
    rgb = diverging(signed, vmax=0.2)
    assert rgb[0, 0, 0] > rgb[0, 0, 2] and rgb[-1, -1, 2] > rgb[-1, -1, 0]  # positive red, negative blue
    np.testing.assert_allclose(rgb[32, 32], colormaps["RdBu_r"](0.5)[:3])  # zero is the colour map's middle
    region = np.zeros_like(image)
    region[10:20, 10:20] = 1.0
    tinted = tint(image, region)
    assert tinted[15, 15, 0] > tinted[15, 15, 1] and np.allclose(tinted[0, 0], 0.5)  # red only inside the region
    tiles = [("original", grey(image)), ("region", tinted), ("difference", rgb)]
    one = Image.open(save_panel(tmp_path / "one.png", [("seed 0", tiles)], 0.2, "grey levels", "RdBu_r", vmin=-0.2))
    two = Image.open(save_panel(tmp_path / "two.png", [("seed 0", tiles), ("seed 1", tiles)], 0.2, "x", "RdBu_r"))
    assert two.size == (one.width, 2 * one.height) and one.height > 256


# ---- refined: a second pass inside the first pass's edit mask ---------------------------------------------------
def test_edit_mask_keeps_the_maps_high_part_grown_by_dilate():
    images = torch.zeros(1, 1, 16, 16)
    first = images.clone()
    first[0, 0, 8, 8], first[0, 0, 2, 2] = -1.0, -0.2  # the input is denser than its counterfactual at two pixels
    edit = EditMask(kind="positive", sigma=0.0, fraction=0.5, dilate=1)
    scores = edit.scores(images, first)
    assert scores.max() == 1 and scores[0, 0, 2, 2] == pytest.approx(0.2)  # scaled to [0, 1] per image
    mask = edit(scores)
    assert mask[0, 0, 7:10, 7:10].eq(1).all() and mask.sum() == 9  # the strong pixel and its 3x3 neighbourhood only
    assert EditMask(sigma=0.0, fraction=0.1, dilate=0)(scores).sum() == 2


def test_a_counterfactual_methods_weight_multiplies_its_map():
    class LeftHalf(Method):  # a counterfactual method that weighs its map: only the left half counts
        name = config_key = "left_half"
        counterfactual = True

        @classmethod
        def from_config(cls, cfg, defaults, **overrides):
            return cls()

        def __call__(self, images, models, generator, prompts=None):
            weight = torch.zeros_like(images)
            weight[..., :2] = 0.5
            return MethodOutput(counterfactual=torch.full_like(images, -1.0), weight=weight)

    output = attribute(LeftHalf(), torch.ones(1, 1, 4, 4), None, seed=0, kind="positive", sigma=0.0)
    assert output.map[..., :2].eq(0.5).all() and output.map[..., 2:].eq(0).all()  # x - x_cf is 1 everywhere


@pytest.mark.parametrize(
    "override, message",
    [
        ("refined.first=diffedit", "refined: first must be one of sdedit, inversion"),
        ("refined.fraction=0", r"refined: fraction must be in \(0, 1\]"),
        ("refined.dilate=-1", "refined: dilate must be an integer"),
        ("refined.kind=blurry", "refined: unknown map kind"),
        ("refined.strength=0", "refined: strength must be in"),
        ("refined.weigh_by_first=maybe", "refined.weigh_by_first must be true or false"),
    ],
)
def test_refined_settings_fail_when_built(override, message):
    with pytest.raises(ValueError, match=message):
        build("refined", attribution_config(override), CHECKPOINT_DEFAULTS)


def test_refined_changes_only_inside_the_first_passs_mask(tiny_pipeline, images):
    cfg_overrides = (
        "refined.first=sdedit",
        "sdedit.strength=0.5",
        "refined.fraction=0.6",
        "refined.feather=0",
        "target_prompt=clear lungs",
    )
    method = build("refined", attribution_config(*cfg_overrides), CHECKPOINT_DEFAULTS)
    output = method(images, Models(tiny_pipeline), seeded(0))
    first = tiny_pipeline(images, method.first.settings, "clear lungs", seeded(0)).images
    scores = method.mask.scores(images, first)
    mask = method.mask(scores)
    assert 0 < mask.mean() < 1
    outside = mask == 0
    torch.testing.assert_close(output.counterfactual[outside], images[outside])  # the input's own pixels
    assert not torch.allclose(output.counterfactual[~outside], images[~outside])
    torch.testing.assert_close(output.weight, scores)  # the map's weight: the first map, which made the mask
    again = method(images, Models(tiny_pipeline), seeded(0))
    torch.testing.assert_close(again.counterfactual, output.counterfactual)
    plain_cfg = attribution_config(*cfg_overrides, "refined.weigh_by_first=false")
    unweighted = build("refined", plain_cfg, CHECKPOINT_DEFAULTS)
    plain = unweighted(images, Models(tiny_pipeline), seeded(0))
    assert plain.weight is None
    torch.testing.assert_close(plain.counterfactual, output.counterfactual)  # the weight changes the map only
