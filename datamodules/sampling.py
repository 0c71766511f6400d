"""The training order as a function of (seed, epoch) alone, served by a loader Lightning resumes mid-epoch.

Lightning's default shuffled loader draws each epoch's order from the global RNG when the epoch's iterator is made,
and an interrupted epoch starts again from its first batch: a resumed run trains on other batches than the run it
continues. Here epoch ``e``'s order comes from a generator seeded by (seed, e),
each DDP rank takes its shard of it, and the loader's checkpointed state (epoch, batches trained) makes a resumed run
begin at the first batch the interrupted one had not trained on. Items are ``(epoch, index)`` keys, so a dataset that
draws at random (augmentations, prompt phrasing) seeds the draw by (seed, epoch, index): the same in every worker,
rank and resumed run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

SampleKey = tuple[int, int]


def sample_key(key: int | SampleKey) -> SampleKey:
    """``(epoch, index)`` of a dataset key; a plain index (evaluation, scripts) counts as epoch 0."""
    return (int(key[0]), int(key[1])) if isinstance(key, tuple) else (0, int(key))


def key_rng(seed: int, key: int | SampleKey) -> np.random.Generator:
    """The random stream of one sample in one epoch (augmentation, prompt phrasing)."""
    return np.random.default_rng([seed, *sample_key(key)])


def run_seed() -> int:
    """The run's seed as ``seed_everything`` published it (Lightning's own samplers read the same variable)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class EpochSampler(DistributedSampler):
    """Shuffled (or, with ``weights``, drawn with replacement) order of an epoch, sharded over ``num_replicas`` ranks.

    A ``DistributedSampler`` so that Lightning leaves it in place under DDP instead of wrapping it in its own.
    """

    def __init__(
        self,
        dataset: Dataset,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        weights: Sequence[float] | np.ndarray | None = None,
    ):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.weights = None if weights is None else torch.as_tensor(np.asarray(weights), dtype=torch.float64)
        self._resume: tuple[int, int] | None = None

    def order(self) -> list[int]:
        """Every rank's indices of this epoch, before sharding."""
        # (seed, epoch) through SeedSequence, not seed + epoch: seed s+1 must not replay seed s's orders one epoch late
        generator = torch.Generator().manual_seed(
            int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
        )
        n = len(self.dataset)
        if self.weights is None:
            return torch.randperm(n, generator=generator).tolist()
        return torch.multinomial(self.weights, n, replacement=True, generator=generator).tolist()

    def __iter__(self) -> Iterator[SampleKey]:
        indices = self.order()
        repeats = math.ceil(self.total_size / max(len(indices), 1))
        indices = (indices * repeats)[: self.total_size]  # every rank the same count, as DistributedSampler pads
        shard = indices[self.rank : self.total_size : self.num_replicas]
        epoch, done = self._resume or (self.epoch, 0)
        skip = done if epoch == self.epoch else 0  # Lightning moves to the next epoch when the saved one had ended
        self._resume = None
        return iter([(self.epoch, i) for i in shard[skip:]])

    def resume(self, epoch: int, done: int) -> None:
        """Epoch ``epoch``, when next iterated, leaves out its first ``done`` samples (already trained on)."""
        self.set_epoch(epoch)
        self._resume = (epoch, done)


class ResumableLoader(DataLoader):
    """A training loader with Lightning's stateful-loader protocol: ``state_dict`` goes into every checkpoint and
    comes back through ``load_state_dict`` before a resumed run makes its first iterator.

    ``batches_done()`` is the number of batches of the current epoch the model has trained on: the loader itself
    cannot count them, since workers and Lightning's prefetch run ahead of training.
    """

    def __init__(self, dataset: Dataset, *, sampler: EpochSampler, batches_done: Callable[[], int], **kwargs):
        super().__init__(dataset, sampler=sampler, **kwargs)
        self.batches_done = batches_done

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": int(self.batches_done())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.resume(state["epoch"], state["batches"] * self.batch_size)
