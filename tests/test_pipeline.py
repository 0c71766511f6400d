import copy

import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline

from lightning_modules.latent_diffusion import NULL_PROMPT
from lightning_modules.pipeline import CounterfactualPipeline
from lightning_modules.vae import decode, encode


@pytest.fixture(scope="module")
def pipeline(tiny_ldm):
    return CounterfactualPipeline.from_module(tiny_ldm)


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_sdedit_equals_diffusers_img2img_on_the_same_components(pipeline, images):
    """Peer equivalence: our sdedit is StableDiffusionImg2ImgPipeline on the same VAE, UNet, DDIM and embeddings."""
    prompt = pipeline.normal_prompt
    settings = dict(strength=0.6, num_inference_steps=4, guidance_scale=3.0)
    ours = pipeline(images, method="sdedit", target_prompt=prompt, generator=torch.Generator().manual_seed(7),
                    **settings)

    peer = StableDiffusionImg2ImgPipeline(
        vae=pipeline.vae, text_encoder=None, tokenizer=None, unet=pipeline.unet, scheduler=pipeline.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    peer.set_progress_bar_config(disable=True)
    theirs = peer(
        image=images, prompt_embeds=pipeline.prompt_encoder([prompt] * 2),
        negative_prompt_embeds=pipeline.prompt_encoder([NULL_PROMPT] * 2),
        generator=torch.Generator().manual_seed(7), output_type="pt", **settings,
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
    pipeline = CounterfactualPipeline(tiny_ldm.vae, unet, CounterfactualPipeline.from_module(tiny_ldm).scheduler,
                                      tiny_ldm.prompt_encoder)
    errors = [_inversion_error(pipeline, images, steps) for steps in (25, 50)]
    assert errors[1] < bound, errors
    if output_scale:
        assert errors[1] < 0.75 * errors[0], errors


@pytest.mark.parametrize("method", ["sdedit", "inversion"])
def test_methods_are_deterministic_and_shaped(pipeline, images, method):
    runs = [pipeline(images, method=method, num_inference_steps=3, seed=3) for _ in range(2)]
    assert torch.equal(runs[0].images, runs[1].images)
    out = runs[0]
    assert out.images.shape == images.shape and out.images.abs().max() <= 1
    assert out.latents.shape[0] == 2
    torch.testing.assert_close(out.attribution, images - out.images)


def test_sdedit_depends_on_the_seed(pipeline, images):
    a = pipeline(images, method="sdedit", num_inference_steps=3, seed=1).images
    b = pipeline(images, method="sdedit", num_inference_steps=3, seed=2).images
    assert not torch.equal(a, b)


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "magic"}, "unknown method"),
    ({"strength": 0.0}, "strength"),
    ({"inversion_depth": 1.5}, "inversion_depth"),
    ({"num_inference_steps": 0}, "at least 1"),
    ({"method": "sdedit", "strength": 0.1, "num_inference_steps": 5}, "strength 0.1 of 5 steps runs no denoising"),
    ({"inversion_depth": 0.2, "num_inference_steps": 4}, "at least 5"),
])
def test_bad_arguments_are_refused(pipeline, images, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipeline(images, **kwargs)


def test_generate_and_guidance_batches_conditional_and_null_in_one_call(pipeline, monkeypatch):
    calls = []
    forward = pipeline.unet.forward
    monkeypatch.setattr(pipeline.unet, "forward", lambda x, *a, **k: calls.append(x.shape[0]) or forward(x, *a, **k))
    out = pipeline.generate(["nodule", "effusion"], 64, 64, guidance_scale=3.0, num_inference_steps=2,
                            generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 1, 64, 64)
    assert calls == [4, 4]  # one UNet call per step on [null; prompt]


def test_vae_encode_decode_shapes(tiny_ldm, images):
    latents = encode(tiny_ldm.vae, images)
    assert latents.shape == (2, 4, 16, 16)
    assert decode(tiny_ldm.vae, latents).shape == images.shape


def test_a_compiled_pipeline_gives_the_eager_counterfactuals(tiny_ldm, pipeline, images):
    """compile=True (attribution/evaluate/induction `compile`, make bench): the same weights, the same outputs."""
    compiled = CounterfactualPipeline.from_module(tiny_ldm, compile=True)
    assert isinstance(compiled.unet, torch._dynamo.eval_frame.OptimizedModule) and compiled.device == pipeline.device
    settings = dict(method="sdedit", strength=0.6, num_inference_steps=4, guidance_scale=3.0, seed=7)
    torch.testing.assert_close(compiled(images, **settings).images, pipeline(images, **settings).images,
                               atol=1e-5, rtol=1e-4)
