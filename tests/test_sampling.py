"""The training order: a function of (seed, epoch), sharded over ranks, resumable mid-epoch (sampling.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.sampling import EpochSampler, ResumableLoader, key_rng, sample_key
from datamodules.synthetic import SyntheticCXRDataModule


class Keys(torch.utils.data.Dataset):
    """Serves each key as it is given."""

    def __len__(self) -> int:
        return 20

    def __getitem__(self, key):
        return sample_key(key)[1]


def _indices(sampler: EpochSampler) -> list[int]:
    return [index for _, index in sampler]


def test_an_epochs_order_depends_on_seed_and_epoch_only():
    data = range(50)
    first, again = EpochSampler(data, seed=3), EpochSampler(data, seed=3)
    torch.manual_seed(0)  # the global generator plays no part
    orders = []
    for epoch in range(3):
        first.set_epoch(epoch)
        again.set_epoch(epoch)
        torch.rand(7)
        orders.append(_indices(first))
        assert orders[-1] == _indices(again) and sorted(orders[-1]) == list(range(50))
    assert orders[0] != orders[1] != orders[2]
    assert _indices(EpochSampler(data, seed=4)) != orders[0]
    next_seed = EpochSampler(data, seed=2)  # seed + epoch would make seed 2's epoch 1 seed 3's epoch 0
    next_seed.set_epoch(1)
    assert _indices(next_seed) != orders[0]
    assert {epoch for epoch, _ in first} == {2}  # keys carry the epoch


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_share_an_epoch_without_overlap_and_pad_like_distributed_sampler(world):
    data = range(10)
    shards = [_indices(EpochSampler(data, seed=0, num_replicas=world, rank=r)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # every rank steps the same number of batches
    together = [i for s in shards for i in s]
    assert sorted(set(together)) == list(range(10)) and len(together) == -(-10 // world) * world
    single = _indices(EpochSampler(data, seed=0))
    assert shards[0] == single[0::world][: len(shards[0])]


def test_resume_skips_what_was_trained_on_in_that_epoch_only():
    sampler = EpochSampler(range(20), seed=1)
    sampler.set_epoch(2)
    whole = _indices(sampler)
    sampler.resume(epoch=2, done=8)
    assert _indices(sampler) == whole[8:]
    assert _indices(sampler) == whole  # once: the next pass of the epoch is whole again
    sampler.resume(epoch=2, done=20)
    sampler.set_epoch(3)  # the saved epoch had ended and Lightning moved on: nothing of epoch 3 is skipped
    assert len(_indices(sampler)) == 20


def test_weights_draw_with_replacement_in_proportion():
    weights = np.r_[np.full(90, 1 / 90), np.full(10, 1 / 10)]  # two classes, equal total weight
    sampler = EpochSampler(range(100), seed=0, weights=weights)
    drawn = [i for epoch in range(20) for i in (sampler.set_epoch(epoch), _indices(sampler))[1]]
    assert 0.4 < np.mean(np.array(drawn) >= 90) < 0.6


def test_the_loader_state_is_the_epoch_and_the_batches_trained():
    done = {"batches": 0}
    sampler = EpochSampler(Keys(), seed=0)
    loader = ResumableLoader(Keys(), sampler=sampler, batches_done=lambda: done["batches"], batch_size=8)
    sampler.set_epoch(1)
    whole = [batch for batch in loader]
    done["batches"] = 2
    assert loader.state_dict() == {"epoch": 1, "batches": 2}
    fresh = ResumableLoader(Keys(), sampler=EpochSampler(Keys(), seed=0), batches_done=lambda: 0, batch_size=8)
    fresh.load_state_dict(loader.state_dict())
    assert [b.tolist() for b in fresh] == [b.tolist() for b in whole[2:]] and len(whole) == 3


def test_keys_and_their_random_streams():
    assert sample_key(5) == (0, 5) and sample_key((3, 5)) == (3, 5)
    assert key_rng(0, (1, 5)).random() == key_rng(0, (1, 5)).random() != key_rng(0, (2, 5)).random()


def test_datamodule_serves_keys_and_plain_indices_alike():
    dm = SyntheticCXRDataModule(num_train=12, num_val=4, num_test=4, batch_size=4)
    train = dm.dataset("train")
    assert torch.equal(train[(7, 3)]["image"], train[3]["image"])
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableLoader) and loader.state_dict() == {"epoch": 0, "batches": 0}
    assert sorted(i for batch in loader for i in batch["id"]) == sorted(train.sample_id(i) for i in range(12))
