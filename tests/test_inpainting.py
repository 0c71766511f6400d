"""The inpainting condition: training masks, the UNet input it builds, and a pipeline that passes it on every call."""

from __future__ import annotations

import pytest
import torch

from lightning_modules import inpainting as inpaint
from lightning_modules.regions import latent_mask
from lightning_modules.settings import InductionSettings, InversionSettings, SamplingSettings, SDEditSettings
from tests.helpers import ldm_batch, pipeline_of

INPAINTING = {"enabled": True, "p_region": 0.5}
FEW = {"num_inference_steps": 3, "guidance_scale": 3.0}


def test_in_channels_add_the_mask_and_the_masked_latent():
    assert inpaint.in_channels(4, False) == 4
    assert inpaint.in_channels(4, True) == 9  # Stable Diffusion inpainting's 4 + 1 + 4


def test_random_masks_are_boxes_or_the_whole_grid_and_seeded():
    size = (16, 16)
    masks = inpaint.random_masks(400, size, 0.5, torch.Generator().manual_seed(0))
    assert masks.shape == (400, 1, 16, 16) and set(masks.unique().tolist()) <= {0.0, 1.0}
    whole = masks.flatten(1).all(1)
    assert 0.4 < whole.float().mean() < 0.6  # p_region 0.5
    for mask in masks[~whole]:
        rows, cols = mask[0].any(1).nonzero().flatten(), mask[0].any(0).nonzero().flatten()
        height, width = len(rows), len(cols)
        assert 2 <= height <= 8 and 2 <= width <= 8  # an eighth to a half of the grid's side
        assert mask.sum() == height * width  # one filled box
        assert rows.max() - rows.min() + 1 == height and cols.max() - cols.min() + 1 == width
    again = inpaint.random_masks(400, size, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(masks, again)
    assert inpaint.random_masks(8, size, 0.0).all()
    assert not inpaint.random_masks(8, size, 1.0).flatten(1).all(1).any()


def test_condition_hides_the_region_and_unknown_hides_everything():
    latents = torch.randn(2, 4, 8, 8)
    masks = torch.zeros(2, 1, 8, 8)
    masks[:, :, 2:5, 3:6] = 1
    cond = inpaint.condition(masks, latents)  # (B, C + 1, h, w)
    assert cond.shape == (2, 5, 8, 8)
    assert torch.equal(cond[:, :1], masks)
    assert torch.equal(cond[:, 1:][masks.expand(-1, 4, -1, -1).bool()], torch.zeros(2 * 4 * 9))
    assert torch.equal(cond[:, 1:, 0, 0], latents[:, :, 0, 0])
    assert torch.equal(inpaint.unknown(latents), torch.cat([torch.ones(2, 1, 8, 8), torch.zeros(2, 4, 8, 8)], 1))


@pytest.fixture
def inpainting_ldm(make_tiny_ldm):
    return make_tiny_ldm(inpainting=INPAINTING)


def test_an_inpainting_module_trains_on_the_condition(inpainting_ldm):
    module = inpainting_ldm.train()
    assert module.inpainting and module.unet.config.in_channels == 2 * module.vae.config.latent_channels + 1
    loss = module._common_step(ldm_batch(), "train")
    loss.backward()
    assert torch.isfinite(loss) and module.unet.conv_in.weight.grad[:, 4:].abs().sum() > 0  # the condition is used


def test_a_bad_share_of_regions_is_refused(make_tiny_ldm):
    with pytest.raises(ValueError, match="p_region must be in"):
        make_tiny_ldm(inpainting={"enabled": True, "p_region": 1.5})


def _spy(unet, inputs: list):
    forward = unet.forward

    def record(sample, *args, **kwargs):
        inputs.append(sample.detach().clone())
        return forward(sample, *args, **kwargs)

    unet.forward = record


def test_the_pipeline_gives_the_region_when_inducing_and_the_whole_image_otherwise(inpainting_ldm):
    pipeline = pipeline_of(inpainting_ldm)
    assert pipeline.inpainting
    images = ldm_batch(2)["image"]
    region = torch.zeros(2, 1, 64, 64)
    region[:, :, 32:56, 8:32] = 1
    inputs: list[torch.Tensor] = []
    _spy(pipeline.unet, inputs)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731

    pipeline.induce(images, region, "nodule in the left lower zone", InductionSettings(**FEW), g())
    mask = latent_mask(region, (16, 16))
    for sample in inputs:  # (2B under guidance, 2C + 1, h, w): the latent, the region, the latent outside it
        assert sample.shape[1] == 9
        assert torch.equal(sample[:, 4:5], torch.cat([mask, mask]))
        assert (sample[:, 5:][torch.cat([mask, mask]).expand(-1, 4, -1, -1).bool()] == 0).all()
        assert sample[:, 5:].abs().sum() > 0  # the original is known outside the region

    for call in (
        lambda: pipeline(images, SDEditSettings(strength=0.5, **FEW), generator=g()),
        lambda: pipeline(images, InversionSettings(inversion_depth=0.5, **FEW)),
        lambda: pipeline.generate(["nodule"], 64, 64, SamplingSettings(**FEW), g()),
    ):
        inputs.clear()
        call()
        assert inputs and all(torch.equal(s[:, 4:], inpaint.unknown(s[:, :4])) for s in inputs)
