"""Two gloo processes, each feeding its own shard, report the metrics of the whole set: those of one process."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_modules.fid import DomainFeatures
from lightning_modules.generation_metrics import GenerationMetrics
from tests.helpers import CLASSES, PooledPixels, smooth_images

N = 20
#: shards of unequal size, and "effusion" only on rank 1: a rank with no image of a class still joins the reduction
SHARDS = (range(0, 12), range(12, N))


def _data():
    real = smooth_images(N, 0)
    counterfactual = (real + 0.1 * torch.randn(real.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    generated = smooth_images(N, 2, shift=0.3)
    groups = [["Normal"]] * 7 + [["nodule"]] * 8 + [["nodule", "effusion"]] * 2 + [["effusion"]] * 3
    return real, generated, counterfactual, groups


def _measure(indices: range) -> dict:
    real, generated, counterfactual, groups = _data()
    metrics = GenerationMetrics(CLASSES, 64, {"fid_domain": DomainFeatures(PooledPixels())})
    for start in range(indices.start, indices.stop, 5):  # batches of 5 within the shard
        batch = slice(start, min(start + 5, indices.stop))
        metrics.update(real[batch], groups[batch], generated=generated[batch], counterfactual=counterfactual[batch])
    return metrics.compute()


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # as DataLoader workers do after a fork
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.save(_measure(SHARDS[rank]), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ddp
def test_two_gloo_processes_give_the_single_process_values(tmp_path):
    out = str(tmp_path / "results")
    # fork: the children inherit the imported modules (spawning re-imports torch and torchmetrics, ~10 s each)
    mp.start_processes(_worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method="fork")
    single = _measure(range(N))
    assert single["effusion"]["n"] == 5 and single["Normal"]["counterfactual"]["fid_domain"] is not None
    for rank in range(2):
        shared = torch.load(f"{out}.{rank}", weights_only=True)
        assert shared.keys() == single.keys()
        for group, values in single.items():
            assert shared[group]["n"] == values["n"]
            for pair in ("generated", "counterfactual"):
                assert shared[group][pair] == pytest.approx(values[pair], rel=1e-5, abs=1e-6), (group, pair)
    # and not trivially: one shard alone gives other numbers
    assert _measure(SHARDS[0])["overall"]["generated"] != pytest.approx(single["overall"]["generated"], rel=1e-3)
