"""AdamW with diffusers' warm-up schedules, stepped per optimizer step: shared by every stage."""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler


def adamw_with_warmup(params, lr: float, weight_decay: float = 0.0, warmup_steps: int = 0,
                      schedule: str = "constant_with_warmup", total_steps: int | None = None,
                      betas: tuple[float, float] = (0.9, 0.999)) -> dict:
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas))
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
