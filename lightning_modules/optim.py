"""AdamW with diffusers' warm-up schedules, stepped per optimizer step: shared by every stage."""

from __future__ import annotations

import lightning as L
import torch
from diffusers.optimization import get_scheduler

#: devices with torch's fused AdamW kernel: one kernel over all parameters instead of a Python loop over each
FUSED_DEVICES = ("cpu", "cuda")


def grad_scaled(module: L.LightningModule) -> bool:
    """Whether the module's trainer scales its loss (16-mixed): Lightning then cannot clip the gradients of an
    optimizer that unscales them itself, as the fused one does."""
    trainer = module._trainer
    return trainer is not None and trainer.precision == "16-mixed"


def adamw_with_warmup(
    params,
    lr: float,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    schedule: str = "constant_with_warmup",
    total_steps: int | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    grad_scaled: bool = False,
) -> dict:
    params = list(params)  # tensors, or parameter groups (dicts with "params")
    tensors = [p for group in params for p in group["params"]] if params and isinstance(params[0], dict) else params
    fused = not grad_scaled and all(p.device.type in FUSED_DEVICES and p.dtype == torch.float32 for p in tensors)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), fused=fused or None)
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
