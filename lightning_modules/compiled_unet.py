"""``torch.compile`` for the diffusers UNet, with the attention formulation inductor compiles best."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0


class CompileFriendlyAttnProcessor:
    """PyTorch's fused attention (SDPA, diffusers' default) when the UNet runs eagerly; the plain matmul, softmax,
    matmul while ``torch.compile`` traces it. Inductor fuses the latter into its own kernels but can only call the
    fused kernel as a black box, and compiled the plain form is the faster on the CPU (`make bench
    ARGS="unet_variants=[compile,compile_math_attention]"`). Eager calls are unchanged, bit for bit."""

    def __init__(self):
        self.eager, self.traced = AttnProcessor2_0(), AttnProcessor()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        processor = self.traced if torch.compiler.is_compiling() else self.eager
        return processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def compile_unet(unet: UNet2DConditionModel) -> Callable:
    """The UNet compiled: the same module and weights, its attention switched to ``CompileFriendlyAttnProcessor``."""
    unet.set_attn_processor(CompileFriendlyAttnProcessor())
    return torch.compile(unet)
