"""Stage 1's objective: each network gets only its own gradients, the adversarial term waits for ``disc_start``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lightning_modules.autoencoder import AutoencoderModule, ssim
from lightning_modules.discriminator import PatchDiscriminator, hinge_d_loss

NETWORK = dict(
    in_channels=1,
    out_channels=1,
    latent_channels=4,
    block_out_channels=[8, 8],
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    layers_per_block=1,
    norm_num_groups=4,
)


def _at_step(module: AutoencoderModule, step: int) -> AutoencoderModule:
    """The trainer state ``_common_step`` reads (the step; logging off), without a Trainer."""
    module._trainer = SimpleNamespace(global_step=step)
    module.log_dict = lambda *args, **kwargs: None
    return module


def _module(**kwargs) -> AutoencoderModule:
    torch.manual_seed(0)
    defaults = dict(structural_weight=1.0, discriminator={"channels": 8, "num_layers": 2, "norm_num_groups": 4})
    return AutoencoderModule(NETWORK, **{**defaults, **kwargs})


def _batch() -> dict:
    return {"image": torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1}


def _grads(module: torch.nn.Module) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in module.parameters()]


def test_discriminator_learns_only_from_its_own_loss():
    module = _module(disc_weight=0.5, disc_start=0)
    batch = _batch()
    torch.manual_seed(2)  # the posterior sample
    _at_step(module, 10)._common_step(batch, "train").backward()
    together = _grads(module.discriminator)

    reference = _module(disc_weight=0.5, disc_start=0)
    torch.manual_seed(2)
    reconstructions, _ = reference(batch["image"])
    d_loss = hinge_d_loss(reference.discriminator(batch["image"]), reference.discriminator(reconstructions.detach()))
    d_loss.backward()
    for got, want in zip(together, _grads(reference.discriminator), strict=True):
        torch.testing.assert_close(got, want)
    assert any(g.abs().sum() > 0 for g in together)


def test_adversarial_term_moves_the_decoder_after_disc_start_only():
    batch = _batch()
    decoder_grads = {}
    for name, kwargs in {
        "none": dict(disc_weight=0.0),
        "before": dict(disc_start=100),
        "after": dict(disc_start=0),
    }.items():
        module = _module(**{"disc_weight": 0.5, **kwargs})
        torch.manual_seed(2)
        _at_step(module, 10)._common_step(batch, "train").backward()
        decoder_grads[name] = module.vae.decoder.conv_out.weight.grad.clone()
        if name == "before":
            assert all(g.abs().sum() == 0 for g in _grads(module.discriminator))
    torch.testing.assert_close(decoder_grads["before"], decoder_grads["none"])  # no adversarial gradient yet
    assert not torch.allclose(decoder_grads["after"], decoder_grads["none"])


def test_adaptive_weight_balances_gradient_norms():
    module = _module(disc_weight=0.5)
    images = _batch()["image"]
    reconstructions, _ = module(images)
    rec_loss = (reconstructions - images).abs().mean()
    g_loss = -module.discriminator(reconstructions).mean()
    weight = module.adaptive_weight(rec_loss, g_loss)
    last = module.vae.decoder.conv_out.weight
    rec_norm = torch.autograd.grad(rec_loss, last, retain_graph=True)[0].norm()
    g_norm = torch.autograd.grad(weight * g_loss, last)[0].norm()
    torch.testing.assert_close(g_norm, 0.5 * rec_norm, rtol=1e-3, atol=1e-6)  # λ·L_G pulls half as hard as L_rec
    assert not weight.requires_grad


@pytest.mark.parametrize("size", [32, 64])
def test_patch_discriminator_gives_one_logit_per_patch(size):
    logits = PatchDiscriminator(in_channels=1, channels=8, num_layers=2, norm_num_groups=4)(
        torch.zeros(3, 1, size, size)
    )
    assert logits.shape[:2] == (3, 1) and logits.shape[-1] > 1  # a map of patch logits, not one per image


def test_ssim_is_one_for_identical_images_and_lower_for_noise():
    images = _batch()["image"]
    assert ssim(images, images).item() == pytest.approx(1.0)
    assert ssim(images, images + 0.2 * torch.randn_like(images)).item() < 0.9
