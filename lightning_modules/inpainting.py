"""The inpainting condition: Stable Diffusion inpainting's extra UNet inputs, the region mask and the latent outside it.

A UNet that sees them draws a region knowing its surroundings, where latent blending alone (a plain UNet) only pastes
noise-level context around a region the model draws blind, which pulls a finding drawn into a normal chest back to
normal. The UNet input is ``[z_t; m; (1 - m) z_0]`` (B, 2C + 1, h, w) with ``m`` 1 where the latent is to be drawn;
for text -> image, counterfactuals over the whole image and inversion, ``m`` is 1 everywhere and ``z_0`` unknown
(``unknown``), so one network serves every task. Trained (``random_masks``) on random boxes for a share
``p_region`` of the images, the rest whole-image, as SD-inpainting is trained on random masks and fully masked images.
"""

from __future__ import annotations

import torch


def in_channels(latent_channels: int, inpainting: bool) -> int:
    """The UNet's input channels: the latent, plus the mask and the masked latent with the inpainting condition."""
    return 2 * latent_channels + 1 if inpainting else latent_channels


def condition(masks: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """(B, 1, h, w) masks (1: to draw) and (B, C, h, w) clean latents -> (B, C + 1, h, w) ``[m; (1 - m) z_0]``."""
    return torch.cat([masks, (1 - masks) * latents], dim=1)


def unknown(latents: torch.Tensor) -> torch.Tensor:
    """The condition of a whole-image task: every cell to draw, nothing known. (B, C, h, w) -> (B, C + 1, h, w)."""
    batch, channels, height, width = latents.shape
    ones = torch.ones(batch, 1, height, width, device=latents.device, dtype=latents.dtype)
    return torch.cat([ones, torch.zeros_like(latents)], dim=1)


def random_masks(
    batch: int,
    size: tuple[int, int],
    p_region: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(B, 1, h, w) training masks: with probability ``p_region`` one random box whose sides are uniform between an
    eighth and a half of the latent grid's (anywhere in it), else the whole grid. Boxes know nothing of lungs or
    lesions, so what the model learns holds for any region a user draws."""
    height, width = size
    draw = {"generator": generator, "device": generator.device if generator is not None else "cpu"}
    region = (torch.rand(batch, **draw) < p_region).tolist()
    low_h, low_w = max(1, height // 8), max(1, width // 8)
    sides_h = torch.randint(low_h, max(low_h, height // 2) + 1, (batch,), **draw)
    sides_w = torch.randint(low_w, max(low_w, width // 2) + 1, (batch,), **draw)
    tops = (torch.rand(batch, **draw) * (height - sides_h + 1)).long().tolist()
    lefts = (torch.rand(batch, **draw) * (width - sides_w + 1)).long().tolist()
    sides_h, sides_w = sides_h.tolist(), sides_w.tolist()
    masks = torch.ones(batch, 1, height, width)
    for i in (i for i in range(batch) if region[i]):
        masks[i].zero_()
        masks[i, :, tops[i] : tops[i] + sides_h[i], lefts[i] : lefts[i] + sides_w[i]] = 1.0
    return masks.to(device)
