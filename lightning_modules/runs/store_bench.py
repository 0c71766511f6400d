"""The latent store's two claims, measured in `make bench`: stage 2 gets its latents faster from the store than from
image files at 256 px, and a rank's own memory does not grow with the dataset, as the in-memory cache's does."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader

from datamodules.covid_radiography import CovidRadiographyDataModule
from datamodules.synthetic import SyntheticCXRDataModule
from lightning_modules.latent_store import SPLITS, LatentStore, encode
from lightning_modules.runs.timing import Line, release_free_heap, stopwatch
from lightning_modules.vae import load_vae, posterior

#: CheXpert's image count: where the per-image memory growth is projected to
CHEXPERT_IMAGES = 224_316


def anonymous_bytes() -> int:
    """Resident memory of this process that is not file-backed (``RssAnon``): what a rank cannot give back. Pages
    of a memory-mapped store count under ``RssFile``: shared with the page cache, dropped under memory pressure."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise OSError("no RssAnon in /proc/self/status")


def store_lines(bench) -> tuple[list[Line], dict]:
    """Latents of ``cfg.store.images`` PNG files at 256 px: decoded, resized and encoded as an uncached training step
    does, against read from their store; and the memory growth per image of the cache and of the store."""
    cfg, size = bench.cfg.store, 256
    with tempfile.TemporaryDirectory() as tmp:
        phantoms = SyntheticCXRDataModule(image_size=size, num_train=cfg.images, num_val=0, num_test=0)
        phantoms.write_covid_layout(Path(tmp) / "covid", "train")
        data = CovidRadiographyDataModule(
            str(Path(tmp) / "covid"), image_size=size, val_fraction=0.25, test_fraction=0.0, num_workers=0
        )
        data.setup("fit")
        vae = load_vae(bench.vae_dir)
        store = LatentStore(encode(Path(tmp) / "store", vae, data, {"accelerator": "cpu", "devices": 1}))
        images = ConcatDataset([data.dataset(s) for s in SPLITS])
        ids = [images[i]["id"] for i in range(len(images))]
        batches = [ids[i : i + cfg.batch_size] for i in range(0, len(ids), cfg.batch_size)]

        @torch.no_grad()
        def from_files() -> None:
            for batch in DataLoader(images, batch_size=cfg.batch_size):
                posterior(vae, batch["image"].to(bench.device))

        def from_store() -> None:
            for batch in batches:
                [t.to(bench.device) for t in store.get(batch)]

        calls = {"latents_from_files": stopwatch(from_files, bench.device)}
        calls["latents_from_store"] = stopwatch(from_store, bench.device)
        measured = bench.measure(calls)
        shape = (vae.config.latent_channels, size // 8, size // 8)  # the GPU model's 8x VAE: what a GPU run stores
        memory = memory_growth(Path(tmp) / "grow", shape, list(cfg.memory_counts))
    what = {
        "latents_from_files": f"{size} px PNG files decoded, resized and encoded by the VAE (an uncached step)",
        "latents_from_store": f"the same latents read from the memory-mapped latent store ({size} px)",
    }
    return [Line.of(name, what[name], m, len(ids)) for name, m in measured.items()], memory


def memory_growth(folder: Path, shape: tuple[int, ...], counts: list[int]) -> dict:
    """Anonymous memory added per image by the in-memory cache and by a store read end to end, from the difference
    between ``counts[0]`` and ``counts[1]`` images (fixed costs cancel), and projected to CheXpert."""
    growth = {"store": [], "cache": []}  # the store first: the cache's freed heap would blur its small growth
    for count in counts:
        path = folder / str(count)
        write_store(path, shape, count)
        release_free_heap()
        before = anonymous_bytes()
        store = LatentStore(path)
        for start in range(0, count, 256):
            store.get([f"img-{i:07d}" for i in range(start, min(start + 256, count))])
        growth["store"].append(anonymous_bytes() - before)
        del store
    for count in counts:
        release_free_heap()
        before = anonymous_bytes()
        cache = {f"img-{i:07d}": (torch.zeros(shape), torch.zeros(shape)) for i in range(count)}
        growth["cache"].append(anonymous_bytes() - before)
        del cache
    per_image = {k: (v[1] - v[0]) / (counts[1] - counts[0]) for k, v in growth.items()}
    return {
        "latent_shape": list(shape),
        "counts": counts,
        "anonymous_bytes": growth,
        "bytes_per_image": per_image,
        "projected_chexpert_bytes": {k: v * CHEXPERT_IMAGES for k, v in per_image.items()},
        "method": "RssAnon growth (/proc/self/status): resident memory that is not file-backed",
    }


def write_store(path: Path, shape: tuple[int, ...], count: int) -> None:
    """A complete one-shard store of ``count`` zero latents (what is measured is reading it, not its values)."""
    import json

    path.mkdir(parents=True)
    for key in ("mean", "std"):
        np.lib.format.open_memmap(path / f"{key}-000.npy", "w+", np.float32, (count, *shape)).flush()
    (path / "ids-000.json").write_text(json.dumps([f"img-{i:07d}" for i in range(count)]))
    shards = [{"mean": "mean-000.npy", "std": "std-000.npy", "ids": "ids-000.json"}]
    (path / "meta.json").write_text(json.dumps({"shape": list(shape), "shards": shards}))
