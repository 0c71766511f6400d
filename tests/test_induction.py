"""Zero-shot induction: the latent blend (equal to diffusers' inpainting), regions, locality scores, the script."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionInpaintPipeline
from PIL import Image

from datamodules.synthetic import SyntheticCXRDataModule
from datamodules.zones import split_lungs
from experiments import zero_shot_induction
from lightning_modules.pipeline import LatentDiffusionPipeline
from lightning_modules.prompt_encoder import NULL_PROMPT
from lightning_modules.regions import (
    RegionError,
    RegionSpec,
    feather_mask,
    inside_fraction,
    latent_mask,
    parse_box,
    ssim_outside,
)
from lightning_modules.runs import induction
from lightning_modules.runs.cli import load_config
from lightning_modules.settings import InductionSettings

PROMPT = "small nodule in the left lower zone"


@pytest.fixture
def pipeline(tiny_pipeline):
    return tiny_pipeline


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.fixture(scope="module")
def regions():
    """A box on the 4x latent grid: pixel and latent masks are both exactly 0/1."""
    masks = torch.zeros(2, 1, 64, 64)
    masks[..., 32:48, 36:56] = 1
    return masks


# ----------------------------------------------------------------------------------------------- blending step


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_induce_equals_diffusers_inpainting_with_a_plain_unet(pipeline, images, regions, strength):
    """Peer equivalence: latent blending is StableDiffusionInpaintPipeline's path for 4-channel UNets, same noise,
    same next-timestep re-noising, on the same VAE, UNet, DDIM and embeddings."""
    settings = dict(strength=strength, num_inference_steps=3, guidance_scale=3.0)
    ours = pipeline.induce(images, regions, PROMPT, InductionSettings(**settings, paste=False), seeded(7))
    peer = StableDiffusionInpaintPipeline(
        vae=pipeline.vae,
        text_encoder=None,
        tokenizer=None,
        unet=pipeline.unet,
        scheduler=pipeline.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    peer.set_progress_bar_config(disable=True)
    theirs = peer(
        image=(images + 1) / 2,
        mask_image=regions,
        prompt_embeds=pipeline.prompt_encoder([PROMPT] * 2),
        negative_prompt_embeds=pipeline.prompt_encoder([NULL_PROMPT] * 2),
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(7),
        output_type="pt",
        **settings,
    ).images  # (B, 1, H, W) in [0, 1]
    torch.testing.assert_close((ours.images + 1) / 2, theirs, atol=1e-5, rtol=1e-4)


def test_blending_keeps_the_original_latent_outside_and_changes_the_inside(pipeline, images, regions):
    settings = InductionSettings(strength=0.8, guidance_scale=3.0, num_inference_steps=3, paste=False)
    out = pipeline.induce(images, regions, PROMPT, settings, seeded(5))
    original = pipeline.encode_image(images, seeded(5), sample=True)  # the same first draw
    inside = latent_mask(regions, original.shape[-2:]).bool().expand_as(original)
    assert torch.equal(out.latents[~inside], original[~inside])
    assert (out.latents[inside] - original[inside]).abs().mean() > 0.1
    # in pixels: away from the region the result is the original's VAE round trip, up to what the decoder (with
    # global attention in its middle block) mixes in from the changed latents; inside it is not
    torch.testing.assert_close(out.round_trip, pipeline.decode(original))
    assert torch.equal(out.images, out.decoded)
    edit = out.images - out.round_trip
    far = torch.ones_like(regions, dtype=torch.bool)
    far[..., 24:56, 28:64] = False
    assert edit[far].abs().mean() < 0.25 * edit[regions.bool()].abs().mean()


def test_paste_returns_the_original_pixels_outside_the_feathered_region(pipeline, images, regions):
    out = pipeline.induce(images, regions, PROMPT, InductionSettings(num_inference_steps=2, feather=1.5), seeded(5))
    outside = feather_mask(regions, 1.5) == 0
    assert torch.equal(out.images[outside], images[outside])
    assert out.difference[regions.bool()].abs().mean() > 0.05
    torch.testing.assert_close(out.difference, out.images - images)


def test_resampling_redraws_the_region_only_and_one_pass_is_plain_blending(pipeline, images, regions):
    """RePaint: more passes per step change the inside, never the known latent outside, and are seeded
    (resample=1, the default, is the plain blend the diffusers-equality test above checks)."""
    base = dict(strength=1.0, guidance_scale=3.0, num_inference_steps=3, paste=False)
    plain = pipeline.induce(images, regions, PROMPT, InductionSettings(**base), seeded(5))
    twice = pipeline.induce(images, regions, PROMPT, InductionSettings(**base, resample=3), seeded(5))
    again = pipeline.induce(images, regions, PROMPT, InductionSettings(**base, resample=3), seeded(5))
    assert torch.equal(twice.latents, again.latents)
    inside = latent_mask(regions, plain.latents.shape[-2:]).bool().expand_as(plain.latents)
    assert torch.equal(twice.latents[~inside], plain.latents[~inside])
    assert (twice.latents[inside] - plain.latents[inside]).abs().mean() > 0.05


def test_background_reconstruction_brings_the_edit_inside_and_leaves_far_cells_alone(pipeline, images, regions):
    """Blended Latent Diffusion's background reconstruction: fitting the region's latent cells (grown by one) moves
    the decoded edit into the region; cells beyond the grown region stay the blend's (the original's)."""
    base = dict(strength=1.0, guidance_scale=3.0, num_inference_steps=2, paste=False)
    plain = pipeline.induce(images, regions, PROMPT, InductionSettings(**base), seeded(5))
    fitted = pipeline.induce(
        images, regions, PROMPT, InductionSettings(**base, background_steps=30, background_grow=1), seeded(5)
    )
    region = latent_mask(regions, plain.latents.shape[-2:])
    grown = F.max_pool2d(region, 3, stride=1, padding=1)
    outside = ~grown.bool().expand_as(plain.latents)
    ring = (grown - region).bool().expand_as(plain.latents)  # background_grow's cells
    assert torch.equal(fitted.latents[outside], plain.latents[outside])
    assert (fitted.latents[ring] - plain.latents[ring]).abs().max() > 0.01
    torch.testing.assert_close(fitted.round_trip, plain.round_trip)
    share = [inside_fraction(out.decoded - out.round_trip, regions.bool()) for out in (plain, fitted)]
    assert (share[1] > share[0] + 0.05).all(), share


def test_renoise_is_the_forward_process_between_two_timesteps(pipeline):
    """q(x_t | x_s) = N(sqrt(a_t / a_s) x_s, 1 - a_t / a_s): checked on its empirical mean and variance."""
    x = torch.full((4096, 4, 1, 1), 2.0)
    out = pipeline.renoise(x, torch.tensor(100), torch.tensor(600), seeded(0))
    ratio = pipeline.scheduler.alphas_cumprod[600] / pipeline.scheduler.alphas_cumprod[100]
    torch.testing.assert_close(out.mean(), 2.0 * ratio.sqrt(), atol=0.03, rtol=0)
    torch.testing.assert_close(out.var(), 1 - ratio, atol=0.03, rtol=0)


def test_latent_mask_is_binary_at_half_coverage_and_never_empty():
    masks = torch.zeros(2, 1, 16, 16)
    masks[0, 0, 0:4, 0:6] = 1  # latent cell (0, 0) covered, (0, 1) half covered
    masks[0, 0, 8:9, 8:12] = 1  # cell (2, 2) a quarter covered
    masks[1, 0, 5, 9] = 1  # a single pixel, in cell (1, 2)
    cells = latent_mask(masks, (4, 4))
    assert cells[0, 0, 0, :2].tolist() == [1, 1] and cells[0].sum() == 2
    assert cells[1, 0, 1, 2] == 1 and cells[1].sum() == 1


@pytest.mark.parametrize(
    "masks, prompt, message",
    [
        (torch.zeros(2, 1, 64, 64), PROMPT, "at least one pixel"),
        (torch.ones(2, 1, 32, 32), PROMPT, "region_masks must be"),
        (torch.ones(1, 1, 64, 64) * 2, PROMPT, "in \\[0, 1\\]"),
        (torch.ones(1, 1, 64, 64), "  ", "prompt is empty"),
    ],
)
def test_induce_rejects_bad_regions_and_prompts(pipeline, images, masks, prompt, message):
    with pytest.raises(ValueError, match=message):
        pipeline.induce(images, masks, prompt, InductionSettings(num_inference_steps=2))


def test_induce_takes_its_settings_as_one_object(pipeline, images, regions):
    with pytest.raises(TypeError, match="InductionSettings"):
        pipeline.induce(images, regions, PROMPT, {"num_inference_steps": 2})


# ------------------------------------------------------------------------------------------------- regions


def test_parse_box_accepts_text_and_lists_and_rejects_outside_or_empty_boxes():
    assert parse_box("4, 8,20,30", 64) == (4, 8, 20, 30)
    assert parse_box([0, 0, 64, 64], 64) == (0, 0, 64, 64)
    for bad in ("10,10,70,20", "-1,0,5,5", "10,10,10,20", "20,10,10,30", "1,2,3", "a,b,c,d"):
        with pytest.raises(RegionError):
            parse_box(bad, 64)


def test_region_spec_precedence_and_errors(tmp_path):
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "empty.png")
    full = np.zeros((32, 32), np.uint8)
    full[8:16, 4:12] = 255
    Image.fromarray(full).save(tmp_path / "mask.png")

    with pytest.raises(RegionError, match="unknown zone 'left-bottom'"):
        RegionSpec.parse(64, zone="left-bottom")
    with pytest.raises(RegionError, match="no region"):
        RegionSpec.parse(64)
    with pytest.raises(RegionError, match="empty"):
        RegionSpec.parse(64, mask_path=str(tmp_path / "empty.png"))
    with pytest.raises(RegionError, match="cannot read"):
        RegionSpec.parse(64, mask_path=str(tmp_path / "missing.png"))
    with pytest.raises(RegionError, match="needs a lung mask"):
        RegionSpec.parse(64, zone="left-lower").mask(64)

    mask = RegionSpec.parse(64, zone="left-lower", mask_path=str(tmp_path / "mask.png")).mask(64)
    assert mask.sum() == 16 * 16 and mask[16:32, 8:24].all()  # resized 2x, and the mask wins over the zone
    box = RegionSpec.parse(64, zone="left-lower", box="1,2,5,10")
    assert box.mask(64).sum() == 4 * 8 and box.location == ("left", "lower")


def test_zone_regions_come_from_the_lung_mask():
    dataset = SyntheticCXRDataModule(num_train=1, num_val=1, num_test=1).dataset("val")
    lungs = dataset.phantom(0).lung_mask
    region = RegionSpec.parse(64, zone="left-lower").mask(64, lungs)
    left = split_lungs(lungs)[1]
    assert region.any() and not (region & ~left).any()  # in the patient's left lung (the image's right) only
    assert np.nonzero(region)[0].min() > np.nonzero(left)[0].mean()  # its lower part


# ------------------------------------------------------------------------------------------------- metrics


def test_inside_fraction_is_the_share_of_absolute_change_in_the_region():
    regions = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    regions[..., :4, :] = True
    difference = torch.zeros(2, 1, 8, 8)
    difference[0, 0, 0, 0], difference[0, 0, 7, 7] = 3.0, -1.0  # 3 of 4 inside
    torch.testing.assert_close(inside_fraction(difference, regions), torch.tensor([0.75, 1.0]))


def test_ssim_outside_ignores_the_region_and_sees_leaks():
    originals = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    regions = torch.zeros(1, 1, 64, 64, dtype=torch.bool)
    regions[..., 20:40, 20:40] = True
    changed_inside = torch.where(regions, originals + 1.0, originals)
    assert ssim_outside(changed_inside, originals, regions).item() == pytest.approx(1.0, abs=1e-5)
    leaked = changed_inside + 0.3 * torch.randn(originals.shape, generator=torch.Generator().manual_seed(1))
    assert ssim_outside(leaked, originals, regions).item() < 0.9


# --------------------------------------------------------------------------------------------------- script


def write_checkpoint(path, sampling) -> str:
    """A file the script reads as a checkpoint: only its hyper-parameters (the model comes from a monkeypatch)."""
    torch.save({"state_dict": {}, "hyper_parameters": {"unet": {}, "sampling": dict(sampling)}}, path)
    return str(path)


@pytest.fixture
def no_model(monkeypatch, tmp_path):
    """A checkpoint with sampling defaults, and a loader that fails the test if anything tries to load a model."""

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(LatentDiffusionPipeline, "from_checkpoint", load)
    checkpoint = write_checkpoint(tmp_path / "model.ckpt", {"num_inference_steps": 7, "guidance_scale": 2.0})
    return [f"checkpoint={checkpoint}", f"output_dir={tmp_path / 'out'}"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["box=40,40,80,60"], "outside the 64x64 image"),
        (["zone=left-bottom"], "unknown zone"),
        (["prompt=' '"], "prompt is empty"),
        (["finding=fracture"], "unknown finding 'fracture'"),
        (["induction.strength=1.5"], "strength must be in \\(0, 1\\]"),
        (["induction.strength=0.01"], "runs no denoising step"),
        (["induction.feather=-1"], "feather must be"),
        (["seeds=[]"], "at least one seed"),
        (["checkpoint=/nonexistent/last.ckpt"], "checkpoint: no file at /nonexistent/last.ckpt"),
        (["input=/nonexistent/film.png", "box=1,1,9,9"], "no such file or folder"),
        (["input=/nonexistent/film.png"], "needs lung masks"),
    ],
)
def test_script_rejects_bad_arguments_before_loading_a_model(no_model, overrides, message):
    with pytest.raises(SystemExit, match=f"^induction: .*{message}"):
        zero_shot_induction.main([*no_model, *overrides])


def test_script_rejects_an_empty_mask_or_a_file_that_is_no_checkpoint(no_model, tmp_path):
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(SystemExit, match="empty"):
        zero_shot_induction.main([*no_model, f"mask_path={tmp_path / 'empty.png'}"])
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="text.ckpt is not a readable PyTorch checkpoint"):
        zero_shot_induction.main([*no_model, f"checkpoint={tmp_path / 'text.ckpt'}"])


def test_null_steps_and_guidance_are_the_checkpoints(no_model):
    cfg = load_config(
        "induction",
        [
            *no_model,
            "induction.num_inference_steps=null",
            "induction.guidance_scale=null",
            "induction.strength=0.5",
            "num_images=1",
        ],
    )
    assert induction.prepare(cfg).settings == InductionSettings(num_inference_steps=7, guidance_scale=2.0, strength=0.5)


@pytest.fixture
def tiny_model(tiny_ldm, tiny_pipeline, monkeypatch, tmp_path):
    """The script's checkpoint loader serves the tiny model's pipeline; the checkpoint file holds its defaults."""
    monkeypatch.setattr(LatentDiffusionPipeline, "from_checkpoint", lambda *args, **kwargs: tiny_pipeline)
    return write_checkpoint(tmp_path / "model.ckpt", tiny_ldm.hparams.sampling)


def test_script_writes_images_panels_and_metrics(tiny_model, pipeline, tmp_path):
    metrics = zero_shot_induction.main(
        [
            f"checkpoint={tiny_model}",
            f"output_dir={tmp_path / 'out'}",
            "classifier_checkpoint=null",
            "num_images=2",
            "batch_size=1",
            "seeds=[0,1]",
            "induction.num_inference_steps=2",
            "finding=effusion",
            "zone=right-lower",
            "induction.feather=1.0",
        ]
    )
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["prompt"] == "right pleural effusion" and len(saved["per_sample"]) == 4
    assert 0.0 < saved["inside_fraction"] <= 1.0 and 0.0 < saved["ssim_outside"] <= 1.0
    assert saved["classifier_prob_before"] is None and metrics["inside_fraction"] == saved["inside_fraction"]
    assert saved["settings"] == {
        "num_inference_steps": 2,
        "guidance_scale": 10.0,
        "strength": 1.0,
        "feather": 1.0,
        "paste": True,
        "resample": 1,
        "background_steps": 0,
        "background_grow": 2,
    }
    ids = list(dict.fromkeys(r["id"] for r in saved["per_sample"]))
    assert len(ids) == 2
    for name in ids:
        assert (tmp_path / "out" / "panels" / f"{name}.png").is_file()
        for seed in (0, 1):
            assert (tmp_path / "out" / "induced" / f"{name}_seed{seed}.png").is_file()
            difference = np.load(tmp_path / "out" / "difference" / f"{name}_seed{seed}.npy")
            assert difference.shape == (64, 64) and np.abs(difference).max() > 0

    # each (seed, batch) draws from torch.Generator("cpu").manual_seed(seed): the second image, seed 1, again
    cfg = load_config(
        "induction",
        [
            f"checkpoint={tiny_model}",
            "num_images=2",
            "finding=effusion",
            "zone=right-lower",
            "induction.num_inference_steps=2",
            "induction.feather=1.0",
        ],
    )
    request = induction.prepare(cfg)
    again = pipeline.induce(
        request.inputs.images[1:2],
        request.inputs.regions[1:2].float(),
        request.prompt,
        request.settings,
        torch.Generator("cpu").manual_seed(1),
    ).images
    expected = ((again[0, 0] + 1) / 2 - (request.inputs.images[1, 0] + 1) / 2).numpy()
    saved_difference = np.load(tmp_path / "out" / "difference" / f"{request.inputs.ids[1]}_seed1.npy")
    np.testing.assert_allclose(saved_difference, expected, atol=1e-6)


def test_script_reads_a_folder_of_images_named_by_their_paths(tiny_model, tmp_path):
    films = tmp_path / "films"
    (films / "ward").mkdir(parents=True)
    picture = (np.random.default_rng(0).random((80, 80)) * 255).astype(np.uint8)
    Image.fromarray(picture).save(films / "a.png")
    Image.fromarray(picture[::-1]).save(films / "ward" / "a.png")
    (films / "broken.png").write_bytes(b"not a png")
    metrics = zero_shot_induction.main(
        [
            f"checkpoint={tiny_model}",
            f"output_dir={tmp_path / 'out'}",
            "classifier_checkpoint=null",
            f"input={films}",
            "box=8,8,40,40",
            "seeds=[3]",
            "induction.num_inference_steps=2",
        ]
    )
    assert [r["id"] for r in metrics["per_sample"]] == ["a", "ward/a"]  # the broken file skipped
    for name in ("a", "ward/a"):
        assert (tmp_path / "out" / "induced" / f"{name}_seed3.png").is_file()
        assert (tmp_path / "out" / "panels" / f"{name}.png").is_file()
