"""Ours, inversion: DDIM-invert the image latent to ``inversion_depth`` of the schedule with the null prompt
(abduction), then guided DDIM decoding toward the healthy prompt (action and prediction)."""

from __future__ import annotations

from lightning_modules.methods import register
from lightning_modules.methods.sdedit import SDEdit


@register
class Inversion(SDEdit):
    """``SDEdit``'s pipeline call with ``InversionSettings`` (block ``inversion``: inversion_depth, guidance_scale,
    num_inference_steps): the settings' type selects the pipeline's inversion path."""

    name = "inversion"
    config_key = "inversion"
