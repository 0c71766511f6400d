"""LatentDiffusionPipeline: sdedit equals diffusers' img2img, DDIM inversion inverts, settings objects drive every
call, the checkpoint's sampling defaults apply, and a compiled UNet gives the eager outputs."""

import copy

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

from lightning_modules.pipeline import LatentDiffusionPipeline
from lightning_modules.prompt_encoder import NULL_PROMPT
from lightning_modules.settings import (
    InductionSettings,
    InversionSettings,
    SamplingSettings,
    SDEditSettings,
    counterfactual_settings,
)
from lightning_modules.vae import decode, encode
from tests.helpers import NORMAL_PROMPT, pipeline_of


@pytest.fixture
def images():
    return torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_from_parts_takes_the_checkpoint_sampling_defaults(tiny_ldm, tiny_pipeline):
    sampling = tiny_ldm.hparams.sampling  # smoke's model.sampling, as a checkpoint stores it
    assert tiny_pipeline.sampling == SamplingSettings(sampling["num_inference_steps"], sampling["guidance_scale"])
    assert tiny_pipeline.normal_prompt == NORMAL_PROMPT
    assert isinstance(tiny_pipeline.scheduler, DDIMScheduler)
    for key, value in sampling["scheduler"].items():  # DDIM options as Stable Diffusion sets them
        assert tiny_pipeline.scheduler.config[key] == value
    assert tiny_pipeline.scheduler.config.num_train_timesteps == tiny_ldm.noise_scheduler.config.num_train_timesteps
    bare = LatentDiffusionPipeline.from_parts(
        tiny_ldm.vae, tiny_ldm.unet, tiny_ldm.noise_scheduler, tiny_ldm.prompt_encoder
    )
    assert bare.sampling == SamplingSettings()  # no checkpoint defaults: the class defaults


def test_sdedit_equals_diffusers_img2img_on_the_same_components(tiny_pipeline, images):
    """Peer equivalence: our sdedit is StableDiffusionImg2ImgPipeline on the same VAE, UNet, DDIM and embeddings."""
    pipeline = tiny_pipeline
    prompt = pipeline.normal_prompt
    settings = SDEditSettings(strength=0.6, num_inference_steps=4, guidance_scale=3.0)
    ours = pipeline(images, settings, target_prompt=prompt, generator=torch.Generator().manual_seed(7))

    peer = StableDiffusionImg2ImgPipeline(
        vae=pipeline.vae,
        text_encoder=None,
        tokenizer=None,
        unet=pipeline.unet,
        scheduler=DDIMScheduler.from_config(pipeline.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    peer.set_progress_bar_config(disable=True)
    theirs = peer(
        image=images,
        prompt_embeds=pipeline.prompt_encoder([prompt] * 2),
        negative_prompt_embeds=pipeline.prompt_encoder([NULL_PROMPT] * 2),
        generator=torch.Generator().manual_seed(7),
        output_type="pt",
        **settings.asdict(),
    ).images  # (B, 1, H, W) in [0, 1]
    torch.testing.assert_close((ours.images + 1) / 2, theirs, atol=1e-5, rtol=1e-4)


def _inversion_error(pipeline, images, steps: int) -> float:
    """Relative error of z_0 after DDIM inversion to half depth and DDIM decoding, both unguided and null-prompted."""
    z0 = pipeline.encode_image(images)
    zt = pipeline.invert(z0, num_inference_steps=steps, depth=0.5)
    assert not torch.allclose(zt, z0, atol=0.1)  # the inversion went somewhere
    embeddings = pipeline.encode_prompt([NULL_PROMPT] * len(images), guidance_scale=0.0)
    z0_hat = pipeline.denoise(zt, pipeline.timesteps(steps, 0.5), embeddings, guidance_scale=0.0)
    return ((z0_hat - z0).norm() / z0.norm()).item()


@pytest.mark.parametrize("output_scale, bound", [(0.0, 1e-5), (0.1, 0.02)])
def test_inversion_without_guidance_reconstructs_the_latent(tiny_ldm, images, output_scale, bound):
    """Inverse and forward DDIM steps pair up exactly (a zero denoiser is inverted to float precision), and for a
    smooth denoiser the error is small and shrinks as O(1/steps). The trained demo model's error is in the README."""
    unet = copy.deepcopy(tiny_ldm.unet)
    with torch.no_grad():
        unet.conv_out.weight.mul_(output_scale)
        unet.conv_out.bias.mul_(output_scale)
    pipeline = LatentDiffusionPipeline.from_parts(
        tiny_ldm.vae, unet, tiny_ldm.noise_scheduler, tiny_ldm.prompt_encoder, tiny_ldm.hparams.sampling
    )
    errors = [_inversion_error(pipeline, images, steps) for steps in (25, 50)]
    assert errors[1] < bound, errors
    if output_scale:
        assert errors[1] < 0.75 * errors[0], errors


@pytest.mark.parametrize("method", ["sdedit", "inversion"])
def test_methods_are_deterministic_and_shaped(tiny_pipeline, images, method):
    settings = counterfactual_settings(method, tiny_pipeline.sampling, num_inference_steps=3)
    runs = [tiny_pipeline(images, settings, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(runs[0].images, runs[1].images)
    out = runs[0]
    assert out.images.shape == images.shape and out.images.abs().max() <= 1
    assert out.latents.shape == (2, 4, 16, 16)
    torch.testing.assert_close(out.attribution, images - out.images)


def test_sdedit_depends_on_the_seed_and_inversion_does_not(tiny_pipeline, images):
    def run(settings, seed: int) -> torch.Tensor:
        return tiny_pipeline(images, settings, generator=torch.Generator().manual_seed(seed)).images

    sdedit, inversion = SDEditSettings(num_inference_steps=3), InversionSettings(num_inference_steps=3)
    assert not torch.equal(run(sdedit, 1), run(sdedit, 2))
    assert torch.equal(run(inversion, 1), run(inversion, 2))  # deterministic DDIM both ways


def test_per_image_generators_give_each_image_its_own_noise(tiny_pipeline, images):
    """A list of generators (one per image): an image's counterfactual does not depend on the batch it is in."""
    settings = SDEditSettings(num_inference_steps=3)
    both = tiny_pipeline(images, settings, generator=[torch.Generator().manual_seed(s) for s in (5, 6)]).images
    second = tiny_pipeline(images[1:], settings, generator=[torch.Generator().manual_seed(6)]).images
    torch.testing.assert_close(both[1:], second, atol=1e-5, rtol=1e-4)


def test_the_target_prompt_matters(tiny_pipeline, images):
    settings = SDEditSettings(num_inference_steps=3)

    def run(prompt: str | None) -> torch.Tensor:
        return tiny_pipeline(images, settings, prompt, torch.Generator().manual_seed(0)).images

    assert torch.equal(run(None), run(NORMAL_PROMPT))  # None: the checkpoint's normal prompt
    assert not torch.equal(run(None), run("large effusion in the right lower zone"))


@pytest.mark.parametrize(
    "settings, shape, error, message",
    [
        (SamplingSettings(), (2, 1, 64, 64), TypeError, "SDEditSettings or InversionSettings, got SamplingSettings"),
        (InductionSettings(), (2, 1, 64, 64), TypeError, "got InductionSettings"),
        ({"strength": 0.5}, (2, 1, 64, 64), TypeError, "got dict"),
        (SDEditSettings(), (2, 3, 64, 64), ValueError, r"\(B, 1, H, W\)"),
        (SDEditSettings(), (1, 64, 64), ValueError, r"\(B, 1, H, W\)"),
    ],
    ids=["sampling-settings", "induction-settings", "dict", "three-channels", "no-channel-axis"],
)
def test_wrong_settings_or_images_are_refused(tiny_pipeline, settings, shape, error, message):
    """Values are checked when settings are built (test_settings.py); the pipeline checks what it is given."""
    with pytest.raises(error, match=message):
        tiny_pipeline(torch.zeros(shape), settings)


def _counting_pipeline(tiny_ldm, monkeypatch) -> tuple[LatentDiffusionPipeline, list[int]]:
    """A pipeline on a copy of the UNet that records the batch size of each UNet call."""
    unet = copy.deepcopy(tiny_ldm.unet)
    calls = []
    forward = unet.forward
    monkeypatch.setattr(unet, "forward", lambda x, *a, **k: calls.append(x.shape[0]) or forward(x, *a, **k))
    return LatentDiffusionPipeline.from_parts(
        tiny_ldm.vae, unet, tiny_ldm.noise_scheduler, tiny_ldm.prompt_encoder, tiny_ldm.hparams.sampling
    ), calls


@pytest.mark.parametrize(
    "settings, expected_calls",
    [
        (SamplingSettings(num_inference_steps=3, guidance_scale=3.0), [4, 4, 4]),  # [null; prompt] in one call a step
        (SamplingSettings(num_inference_steps=2, guidance_scale=1.0), [2, 2]),  # the conditional model alone
        (SamplingSettings(num_inference_steps=2, guidance_scale=0.0), [2, 2]),  # the unconditional model alone
        (None, [4, 4]),  # the checkpoint's defaults: smoke's 2 steps, guided
    ],
)
def test_generate_runs_the_settings_and_batches_guidance_in_one_call(tiny_ldm, monkeypatch, settings, expected_calls):
    pipeline, calls = _counting_pipeline(tiny_ldm, monkeypatch)
    out = pipeline.generate(["nodule", "effusion"], 64, 64, settings, torch.Generator().manual_seed(0))
    assert out.shape == (2, 1, 64, 64) and out.abs().max() <= 1
    assert calls == expected_calls


def test_generate_is_seeded(tiny_pipeline):
    def run(seed: int) -> torch.Tensor:
        return tiny_pipeline.generate(["nodule"], 64, 64, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))


@pytest.mark.parametrize("method, expected_calls", [("sdedit", [4, 4]), ("inversion", [2, 2, 4, 4])])
def test_counterfactual_steps_follow_the_fraction_of_the_schedule(
    tiny_ldm, images, monkeypatch, method, expected_calls
):
    """4 steps at fraction 0.5 run 2 guided steps; inversion first runs its 2 unguided null-prompt steps."""
    pipeline, calls = _counting_pipeline(tiny_ldm, monkeypatch)
    settings = counterfactual_settings(
        method, num_inference_steps=4, guidance_scale=3.0, strength=0.5, inversion_depth=0.5
    )
    pipeline(images, settings, generator=torch.Generator().manual_seed(0))
    assert calls == expected_calls


def test_vae_encode_decode_shapes(tiny_ldm, images):
    latents = encode(tiny_ldm.vae, images)
    assert latents.shape == (2, 4, 16, 16)
    assert decode(tiny_ldm.vae, latents).shape == images.shape


@pytest.mark.slow
def test_a_compiled_pipeline_gives_the_eager_counterfactuals(make_tiny_ldm, tiny_pipeline, images):
    """compile=True (attribution/evaluate/induction `compile`, make bench): the same weights, the same outputs."""
    module = make_tiny_ldm()  # compiling switches the UNet's attention processor: a module of this test's own
    compiled = pipeline_of(module, compile=True)
    assert isinstance(compiled.unet, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled.device == tiny_pipeline.device
    for ours, shared in zip(module.unet.parameters(), tiny_pipeline.unet.parameters(), strict=True):
        assert torch.equal(ours, shared)
    settings = SDEditSettings(strength=0.6, num_inference_steps=4, guidance_scale=3.0)

    def run(pipeline: LatentDiffusionPipeline) -> torch.Tensor:
        return pipeline(images, settings, generator=torch.Generator().manual_seed(7)).images

    torch.testing.assert_close(run(compiled), run(tiny_pipeline), atol=1e-5, rtol=1e-4)
