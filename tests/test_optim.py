"""The shared AdamW: torch's fused kernel where it exists, the per-parameter loop where Lightning needs it."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch

from lightning_modules.optim import adamw_with_warmup, grad_scaled


def _fused(params, **kwargs) -> bool:
    return bool(adamw_with_warmup(params, lr=1e-3, **kwargs)["optimizer"].defaults["fused"])


def test_adamw_is_fused_on_float32_cpu_weights_unless_the_loss_is_scaled():
    weights = [torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.randn(3))]
    assert _fused(weights)
    assert not _fused(weights, grad_scaled=True)  # Lightning cannot clip what a fused optimizer unscales itself
    assert not _fused([torch.nn.Parameter(torch.randn(3, dtype=torch.float64))])


def test_fused_and_looped_adamw_take_the_same_step():
    torch.manual_seed(0)
    start = torch.randn(4, 4)
    a, b = [torch.nn.Parameter(start.clone())], [torch.nn.Parameter(start.clone())]
    for params, scaled in ((a, False), (b, True)):
        optimizer = adamw_with_warmup(params, lr=1e-2, weight_decay=0.01, grad_scaled=scaled)["optimizer"]
        assert bool(optimizer.defaults["fused"]) is not scaled
        for _ in range(3):
            params[0].grad = torch.full_like(params[0], 0.5)
            optimizer.step()
    torch.testing.assert_close(a[0], b[0])
    assert (a[0] - start).abs().min() > 1e-3  # both really stepped


@pytest.mark.parametrize("precision, scaled", [("16-mixed", True), ("bf16-mixed", False), ("32-true", False)])
def test_grad_scaled_follows_the_trainer_precision(precision, scaled):
    module = L.LightningModule()
    assert not grad_scaled(module)  # no trainer yet
    module._trainer = SimpleNamespace(precision=precision)
    assert grad_scaled(module) is scaled
