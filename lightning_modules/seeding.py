"""Random streams that depend on what is drawn, never on when or where: per image (sampling, evaluation) and per
training step (noise, timesteps, prompt dropout, posterior samples, dropout), so that a resumed run or another
batch layout draws exactly what the uninterrupted run drew."""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence

import lightning as L
import numpy as np
import torch


def image_generators(ids: Sequence[str], seed: int) -> list[torch.Generator]:
    """One generator per image, seeded by its id: the same noise whatever the batch, the order or the DDP rank."""
    return [torch.Generator("cpu").manual_seed(seed + zlib.crc32(i.encode())) for i in ids]


class StepSeeds(L.Callback):
    """Reseed torch, numpy and ``random`` before every training batch from (seed, rank, global step, batch index).

    Every draw a step makes from the global generators (in any module, including dropout) then depends on the run's
    seed and the step alone: a run resumed from a checkpoint of step ``k`` draws at step ``k + 1`` what the
    uninterrupted run drew, while a continuing global stream would restart from the seed at resume.
    """

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        state = np.random.SeedSequence([self.seed, trainer.global_rank, trainer.global_step, batch_idx])
        seed = int(state.generate_state(1)[0])
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
