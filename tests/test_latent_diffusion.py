"""Stage 2's training module: what trains and what stays frozen, the latent cache, validation noise, the sampling
context, checkpoints (UNet and EMA only) and their loading by LatentDiffusionPipeline.from_checkpoint."""

import contextlib

import pytest
import torch
from diffusers import DDPMScheduler

import lightning_modules.latent_diffusion as latent_diffusion
from lightning_modules.latent_diffusion import NULL_PROMPT, LatentDiffusionModule, drop_prompts
from lightning_modules.pipeline import LatentDiffusionPipeline
from lightning_modules.settings import SamplingSettings
from tests.helpers import NORMAL_PROMPT, ldm_batch, pipeline_of

#: self.log outside a Trainer only warns
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")


def test_prompt_dropout_rate_matches_p_uncond():
    prompts = ["effusion"] * 20000
    dropped = drop_prompts(prompts, 0.15, torch.Generator().manual_seed(0))
    rate = sum(p == NULL_PROMPT for p in dropped) / len(prompts)
    assert abs(rate - 0.15) < 0.01
    assert all(p in ("effusion", NULL_PROMPT) for p in dropped)
    assert drop_prompts(prompts[:100], 0.0) == prompts[:100]
    assert set(drop_prompts(prompts[:100], 1.0)) == {NULL_PROMPT}


def test_the_training_step_trains_the_unet_only(make_tiny_ldm, monkeypatch):
    """The real training branch (prompt dropout, sampled latents, the training UNet): the UNet gets gradients, the
    frozen VAE and prompt encoder none, and they stay in eval mode while the module trains."""
    module = make_tiny_ldm().train()
    dropouts = []
    monkeypatch.setattr(latent_diffusion, "drop_prompts", lambda *args: dropouts.append(args) or drop_prompts(*args))
    loss = module.training_step(ldm_batch(), 0)
    loss.backward()
    assert len(dropouts) == 1 and dropouts[0][1] == module.hparams.p_uncond  # the training branch ran
    assert module.unet.training and not module.vae.training and not module.prompt_encoder.model.training
    assert all(
        not p.requires_grad and p.grad is None for p in [*module.vae.parameters(), *module.prompt_encoder.parameters()]
    )
    grads = [p.grad for p in module.unet.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_the_training_step_draws_new_noise_and_validation_does_not(make_tiny_ldm):
    module = make_tiny_ldm()
    batch = ldm_batch()
    with torch.no_grad():
        train = [module.train().training_step(batch, 0) for _ in range(2)]
        val = [module.eval().validation_step(batch, 0) for _ in range(2)]
        other_ids = module.validation_step({**batch, "id": [f"val-{i}" for i in range(4)]}, 0)
    assert train[0] != train[1]
    assert val[0] == val[1]  # the curve is comparable across epochs: the noise depends on the batch's ids
    assert other_ids != val[0]


def test_latent_cache_encodes_once_and_equals_direct_encoding(make_tiny_ldm, monkeypatch):
    module = make_tiny_ldm()
    batch = ldm_batch()
    direct = module.latents(batch, sample=False)
    calls = []
    encode = module.vae.encode
    monkeypatch.setattr(module.vae, "encode", lambda x: calls.append(len(x)) or encode(x))
    again = module.latents(batch, sample=False)
    assert calls == [] and torch.equal(direct, again)
    mixed = {**batch, "id": ["train-0", "new-1", "train-2", "new-3"]}
    module.latents(mixed, sample=True)
    assert calls == [1, 1]  # one image at a time: a latent never depends on its batch-mates (exact resume)
    uncached = make_tiny_ldm(cache_latents=False)
    torch.testing.assert_close(uncached.latents(batch, sample=False), direct)
    assert uncached._latent_cache == {}


def test_v_prediction_target():
    scheduler = DDPMScheduler(prediction_type="v_prediction")
    module = LatentDiffusionModule.__new__(LatentDiffusionModule)
    torch.nn.Module.__init__(module)
    module.noise_scheduler = scheduler
    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    torch.testing.assert_close(module.target(latents, noise, t), scheduler.get_velocity(latents, noise, t))


def _seeded_step(module, batch, stage: str) -> torch.Tensor:
    torch.manual_seed(0)  # the same prompt dropout, latent sample, noise and timesteps for every module
    with torch.no_grad():
        return module.train().training_step(batch, 0) if stage == "train" else module.eval().validation_step(batch, 0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_are_min_snr_gamma_over_snr(make_tiny_ldm, prediction_type):
    module = make_tiny_ldm(snr_gamma=5.0)
    module.noise_scheduler.register_to_config(prediction_type=prediction_type)
    t = torch.tensor([0, 50, 200, 500, 999])
    alphas = module.noise_scheduler.alphas_cumprod[t]
    snr = alphas / (1 - alphas)  # signal-to-noise ratio of q(z_t | z_0)
    expected = torch.minimum(snr, torch.tensor(5.0)) / (snr + 1 if prediction_type == "v_prediction" else snr)
    weights = module.min_snr_weights(t)
    torch.testing.assert_close(weights, expected.float())
    if prediction_type == "epsilon":  # nearly clean steps count less; noisy ones (SNR < gamma) as before
        assert weights[0] < 0.01 and weights[-1] == 1.0


def test_snr_gamma_weights_the_training_loss_only(make_tiny_ldm):
    batch = ldm_batch()
    plain, capped, uncapped = make_tiny_ldm(), make_tiny_ldm(snr_gamma=1e-3), make_tiny_ldm(snr_gamma=1e9)
    # a gamma above every step's SNR weighs every image 1: the plain MSE (averaged per image first)
    torch.testing.assert_close(_seeded_step(uncapped, batch, "train"), _seeded_step(plain, batch, "train"))
    assert _seeded_step(capped, batch, "train") < 0.1 * _seeded_step(plain, batch, "train")
    assert _seeded_step(capped, batch, "val") == _seeded_step(plain, batch, "val")  # comparable validation curves


@pytest.mark.parametrize("gamma", [0.0, -1.0])
def test_snr_gamma_must_be_positive(make_tiny_ldm, gamma):
    with pytest.raises(ValueError, match="model.snr_gamma must be a positive number or null"):
        make_tiny_ldm(snr_gamma=gamma)


# ---- the sampling context -----------------------------------------------------------------------------------------
def _shift_ema(module, by: float = 0.5) -> None:
    """Make the EMA differ from the live weights, as after training."""
    with torch.no_grad():
        for shadow in module.ema.shadow_params:
            shadow.add_(by)


@pytest.mark.parametrize("raises", [False, True])
def test_sampling_pipeline_uses_the_ema_in_eval_mode_and_restores_the_training_state(make_tiny_ldm, raises):
    module = make_tiny_ldm().train()
    _shift_ema(module)
    raw = [p.detach().clone() for p in module.unet.parameters()]
    with pytest.raises(RuntimeError, match="sampling failed") if raises else contextlib.nullcontext():
        with module.sampling_pipeline() as pipeline:
            assert not module.training and not module.unet.training
            assert pipeline.unet is module.unet and pipeline.vae is module.vae
            for param, shadow in zip(module.unet.parameters(), module.ema.shadow_params, strict=True):
                assert torch.equal(param, shadow)
            assert pipeline.sampling == SamplingSettings(num_inference_steps=2, guidance_scale=10.0)  # smoke's
            assert pipeline.normal_prompt == NORMAL_PROMPT
            if raises:
                raise RuntimeError("sampling failed")
    assert module.training and module.unet.training and not module.vae.training
    for param, before in zip(module.unet.parameters(), raw, strict=True):
        assert torch.equal(param, before)
    with module.eval().sampling_pipeline():
        pass
    assert not module.training  # the mode it had, not train mode


# ---- checkpoints --------------------------------------------------------------------------------------------------
def _save_checkpoint(module, path):
    """What Lightning writes: the state dict, trimmed by on_save_checkpoint, with the hyper-parameters."""
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return checkpoint


def test_checkpoint_holds_unet_and_ema_but_not_frozen_parts(make_tiny_ldm, tmp_path):
    module = make_tiny_ldm()
    checkpoint = _save_checkpoint(module, tmp_path / "model.ckpt")
    assert checkpoint["state_dict"] and all(k.startswith("unet.") for k in checkpoint["state_dict"])
    assert len(checkpoint["state_dict"]) == len(module.unet.state_dict())
    assert len(checkpoint["ema"]["shadow_params"]) == len(list(module.unet.parameters()))


@pytest.mark.parametrize("use_ema", [True, False])
def test_pipeline_from_checkpoint_loads_the_unet_without_the_training_module(
    make_tiny_ldm, tmp_path, monkeypatch, use_ema
):
    module = make_tiny_ldm()
    _shift_ema(module, 0.01)
    path = tmp_path / "model.ckpt"
    _save_checkpoint(module, path)

    def no_training_module(*args, **kwargs):
        raise AssertionError("from_checkpoint built the training module")

    monkeypatch.setattr(LatentDiffusionModule, "__init__", no_training_module)
    pipeline = LatentDiffusionPipeline.from_checkpoint(str(path), use_ema=use_ema)
    expected = module.ema.shadow_params if use_ema else list(module.unet.parameters())
    for loaded, weights in zip(pipeline.unet.parameters(), expected, strict=True):
        assert torch.equal(loaded, weights)
    # the frozen parts rebuilt from their paths are the ones trained on
    for name in ("vae", "prompt_encoder"):
        for loaded, trained in zip(
            getattr(pipeline, name).state_dict().values(), getattr(module, name).state_dict().values(), strict=True
        ):
            assert torch.equal(loaded, trained)
    assert pipeline.sampling == SamplingSettings.from_hparams(module.hparams.sampling)
    assert pipeline.normal_prompt == NORMAL_PROMPT and not pipeline.unet.training

    # and it samples what the module's own pipeline samples with those weights
    if not use_ema:

        def generate(p: LatentDiffusionPipeline) -> torch.Tensor:
            return p.generate(["nodule"], 64, 64, generator=torch.Generator().manual_seed(0))

        torch.testing.assert_close(generate(pipeline), generate(pipeline_of(module)))


@pytest.mark.parametrize(
    "change, error, message",
    [
        (
            lambda c: c["state_dict"].update({"unet.not_a_weight": torch.zeros(1)}),
            RuntimeError,
            "unexpected.*not_a_weight",
        ),
        (lambda c: c["state_dict"].pop(next(iter(c["state_dict"]))), RuntimeError, "does not match.*missing"),
        (lambda c: c["ema"]["shadow_params"].pop(), ValueError, "shorter"),
        (lambda c: c["hyper_parameters"]["unet"].update(block_out_channels=[32, 64]), RuntimeError, "size mismatch"),
    ],
    ids=["unexpected-weight", "missing-weight", "short-ema", "other-network"],
)
def test_pipeline_from_checkpoint_refuses_a_mismatching_checkpoint(tiny_ldm, tmp_path, change, error, message):
    checkpoint = {"state_dict": dict(tiny_ldm.state_dict()), "hyper_parameters": dict(tiny_ldm.hparams)}
    checkpoint["hyper_parameters"]["unet"] = dict(checkpoint["hyper_parameters"]["unet"])
    tiny_ldm.on_save_checkpoint(checkpoint)  # trims the copy of the state dict: tiny_ldm is not changed
    checkpoint["ema"] = {**checkpoint["ema"], "shadow_params": list(checkpoint["ema"]["shadow_params"])}
    change(checkpoint)
    path = tmp_path / "bad.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(error, match=message):
        LatentDiffusionPipeline.from_checkpoint(str(path))


# ---- model.compile ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_compiled_training_step_matches_eager_and_keeps_one_set_of_weights(make_tiny_ldm):
    """model.compile: training runs the compiled UNet (the same weights: the same loss and gradients), while state
    dicts, validation and sampling keep the eager UNet."""
    eager, compiled = make_tiny_ldm(), make_tiny_ldm(compile=True)
    compiled.unet.load_state_dict(eager.unet.state_dict())
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert eager.training_unet is eager.unet and compiled.training_unet is not compiled.unet

    losses, grads = [], []
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    for module in (eager, compiled):
        module.train()
        torch.manual_seed(0)  # the same prompt dropout, noise and timesteps
        loss = module.training_step(ldm_batch(), 0)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in module.unet.parameters()])
    assert torch._dynamo.utils.counters["frames"]["ok"] > frames  # the compiled step really ran compiled
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-6)
    for eager_grad, compiled_grad in zip(*grads, strict=True):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-3, atol=1e-5)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # still no second copy of the weights
