"""compile_unet: the attention processor it installs leaves every eager call of the UNet as it was."""

import copy

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from lightning_modules.compiled_unet import CompileFriendlyAttnProcessor


def test_the_compile_friendly_processor_is_sdpa_when_eager(tiny_ldm):
    unet = copy.deepcopy(tiny_ldm.unet)  # switching processors changes the module: a copy, not the shared one
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, unet.config.in_channels, 8, 8, generator=generator)
    context = torch.randn(2, 5, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        unet.set_attn_processor(AttnProcessor2_0())
        default = unet(latents, 10, encoder_hidden_states=context).sample
        unet.set_attn_processor(CompileFriendlyAttnProcessor())
        ours = unet(latents, 10, encoder_hidden_states=context).sample
        unet.set_attn_processor(AttnProcessor2_0())
    assert torch.equal(ours, default)


def test_it_switches_to_the_plain_form_only_while_torch_compile_traces(monkeypatch):
    processor = CompileFriendlyAttnProcessor()
    calls = []
    monkeypatch.setattr(processor, "traced", lambda *args, **kwargs: calls.append("traced"))
    monkeypatch.setattr(processor, "eager", lambda *args, **kwargs: calls.append("eager"))
    processor(None, torch.zeros(1))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    processor(None, torch.zeros(1))
    assert calls == ["eager", "traced"]


def test_compile_unet_wraps_the_same_module_and_weights(tiny_ldm):
    from lightning_modules.compiled_unet import compile_unet

    unet = copy.deepcopy(tiny_ldm.unet)
    compiled = compile_unet(unet)  # nothing is compiled before the first call
    assert compiled._orig_mod is unet and list(compiled.parameters()) == list(unet.parameters())
    assert {type(p) for p in unet.attn_processors.values()} == {CompileFriendlyAttnProcessor}
