import pytest
import torch
from diffusers import DDPMScheduler

from lightning_modules.latent_diffusion import NULL_PROMPT, LatentDiffusionModule, drop_prompts


def _batch(n=4, size=64):
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(n, 1, size, size, generator=g) * 2 - 1,
            "prompt": ["nodule in the left lower zone", "no acute cardiopulmonary abnormality"] * (n // 2),
            "id": [f"train-{i}" for i in range(n)]}


def test_prompt_dropout_rate_matches_p_uncond():
    prompts = ["effusion"] * 20000
    dropped = drop_prompts(prompts, 0.15, torch.Generator().manual_seed(0))
    rate = sum(p == NULL_PROMPT for p in dropped) / len(prompts)
    assert abs(rate - 0.15) < 0.01
    assert all(p in ("effusion", NULL_PROMPT) for p in dropped)
    assert drop_prompts(prompts[:100], 0.0) == prompts[:100]
    assert set(drop_prompts(prompts[:100], 1.0)) == {NULL_PROMPT}


def test_frozen_parts_get_no_gradient_and_the_unet_does(tiny_ldm):
    tiny_ldm.train()
    tiny_ldm.unet.zero_grad()
    loss = tiny_ldm._common_step(_batch(), "train_check")
    loss.backward()
    assert all(p.grad is None for p in tiny_ldm.vae.parameters())
    assert all(p.grad is None for p in tiny_ldm.prompt_encoder.parameters())
    assert all(not p.requires_grad for p in [*tiny_ldm.vae.parameters(), *tiny_ldm.prompt_encoder.parameters()])
    grads = [p.grad for p in tiny_ldm.unet.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert not tiny_ldm.vae.training and not tiny_ldm.prompt_encoder.model.training
    tiny_ldm.unet.zero_grad()
    tiny_ldm.eval()


def test_latent_cache_encodes_once_and_equals_direct_encoding(tiny_ldm, monkeypatch):
    tiny_ldm._latent_cache.clear()
    batch = _batch()
    direct = tiny_ldm.latents(batch, sample=False)
    calls = []
    encode = tiny_ldm.vae.encode
    monkeypatch.setattr(tiny_ldm.vae, "encode", lambda x: calls.append(len(x)) or encode(x))
    again = tiny_ldm.latents(batch, sample=False)
    assert calls == [] and torch.equal(direct, again)
    mixed = {**batch, "id": ["train-0", "new-1", "train-2", "new-3"]}
    tiny_ldm.latents(mixed, sample=True)
    assert calls == [2]
    tiny_ldm.hparams.cache_latents = False
    try:
        torch.testing.assert_close(tiny_ldm.latents(batch, sample=False), direct)
    finally:
        tiny_ldm.hparams.cache_latents = True


def test_v_prediction_target():
    scheduler = DDPMScheduler(prediction_type="v_prediction")
    module = LatentDiffusionModule.__new__(LatentDiffusionModule)
    torch.nn.Module.__init__(module)
    module.noise_scheduler = scheduler
    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    torch.testing.assert_close(module.target(latents, noise, t), scheduler.get_velocity(latents, noise, t))


def test_validation_loss_is_reproducible(tiny_ldm):
    batch = _batch()
    with torch.no_grad():
        assert tiny_ldm._common_step(batch, "val_check") == tiny_ldm._common_step(batch, "val_check")


def test_checkpoint_holds_unet_and_ema_but_not_frozen_parts(tiny_ldm, tmp_path):
    checkpoint = {"state_dict": tiny_ldm.state_dict()}
    tiny_ldm.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and all(k.startswith("unet.") for k in checkpoint["state_dict"])
    assert len(checkpoint["ema"]["shadow_params"]) == len(list(tiny_ldm.unet.parameters()))

    path = tmp_path / "model.ckpt"
    with torch.no_grad():
        tiny_ldm.ema.shadow_params[0].add_(1.0)  # EMA differs from the live weights
    torch.save({**checkpoint, "hyper_parameters": dict(tiny_ldm.hparams)}, path)
    restored = LatentDiffusionModule.from_checkpoint(str(path))
    for a, b in zip(restored.unet.parameters(), tiny_ldm.unet.parameters()):
        assert torch.equal(a, b)
    torch.testing.assert_close(restored.ema.shadow_params[0], tiny_ldm.ema.shadow_params[0])
    with torch.no_grad():
        tiny_ldm.ema.shadow_params[0].sub_(1.0)


def test_from_checkpoint_refuses_a_mismatched_model(tiny_ldm, tmp_path):
    path = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {"unet.not_a_weight": torch.zeros(1)}, "hyper_parameters": dict(tiny_ldm.hparams)},
               path)
    with pytest.raises(RuntimeError, match="does not match"):
        LatentDiffusionModule.from_checkpoint(str(path))


def test_compiled_training_step_matches_eager_and_keeps_one_set_of_weights(tiny_ldm):
    """model.compile: training runs the compiled UNet (the same weights: the same loss and gradients), while state
    dicts, validation and sampling keep the eager UNet."""
    compiled = LatentDiffusionModule(**{**tiny_ldm.hparams, "compile": True})
    compiled.unet.load_state_dict(tiny_ldm.unet.state_dict())
    assert list(compiled.state_dict()) == list(tiny_ldm.state_dict())
    assert tiny_ldm.training_unet is tiny_ldm.unet and compiled.training_unet is not compiled.unet

    losses, grads = [], []
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    for module in (tiny_ldm, compiled):
        module.train()
        module.unet.zero_grad()
        torch.manual_seed(0)  # the same prompt dropout, noise and timesteps
        loss = module._common_step(_batch(), "train")
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in module.unet.parameters()])
        module.unet.zero_grad()
        module.eval()
    assert torch._dynamo.utils.counters["frames"]["ok"] > frames  # the compiled step really ran compiled
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-6)
    for eager, comp in zip(*grads):
        torch.testing.assert_close(comp, eager, rtol=1e-3, atol=1e-5)
    assert list(compiled.state_dict()) == list(tiny_ldm.state_dict())  # still no second copy of the weights
