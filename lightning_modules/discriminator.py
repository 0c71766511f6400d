"""The PatchGAN discriminator of stage 1's adversarial term (Isola et al. 2017, as VQGAN and LDM's autoencoders use).

None of the project's libraries ships one (diffusers keeps its VQGAN discriminator in an example script), so this is
the pix2pix ``NLayerDiscriminator`` in a few lines, with GroupNorm where pix2pix has BatchNorm: no running statistics
to synchronise across DDP ranks, and a pass over reconstructions for the generator's loss leaves no trace in it.
"""

from __future__ import annotations

import torch
from torch import nn


class PatchDiscriminator(nn.Sequential):
    """(B, C, H, W) images -> (B, 1, H', W') logits, one per overlapping patch (70x70 pixels at ``num_layers=3``)."""

    def __init__(self, in_channels: int = 1, channels: int = 64, num_layers: int = 3, norm_num_groups: int = 8):
        widths = [channels * min(2**i, 8) for i in range(num_layers + 1)]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for i in range(1, num_layers + 1):
            stride = 2 if i < num_layers else 1  # the last block keeps the resolution, as pix2pix's does
            layers += [
                nn.Conv2d(widths[i - 1], widths[i], 4, stride=stride, padding=1, bias=False),
                nn.GroupNorm(min(norm_num_groups, widths[i]), widths[i]),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1))
        super().__init__(*layers)
        self.apply(_init_weights)


def _init_weights(module: nn.Module) -> None:
    """pix2pix's N(0, 0.02) initialisation: the discriminator starts near chance rather than confidently wrong."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.GroupNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss (VQGAN's default): real logits pushed above 1, fake ones below -1."""
    return 0.5 * (torch.relu(1.0 - logits_real).mean() + torch.relu(1.0 + logits_fake).mean())
