"""Attribution on 1 and on 2 processes, measured in `make bench`: the command a user runs
(``experiments/counterfactual_attribution.py``, ``devices=1`` then ``devices=2``: Lightning's predict over gloo on the
CPU) on the same folder of images with the benchmark's random-weight model, each run alone, start-up included."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
from PIL import Image
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[2]


def random_checkpoint(bench, folder: Path) -> Path:
    """The benchmark's random-weight stage 2 (its random VAE on disk) after one training step, as a checkpoint."""
    module = bench.module(caches=True)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(bench.images(2, bench.cfg.seed), batch_size=2))
    path = folder / "ldm.ckpt"
    trainer.save_checkpoint(path)
    return path


def write_images(folder: Path, count: int, size: int, seed: int) -> Path:
    """``count`` random 8-bit grey PNGs of ``size`` px."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    return folder


def attribution_scaling(bench, folder: Path, settings: dict) -> dict:
    """images/s of one attribution run per process count, the speedup of 2 over 1 and its efficiency (speedup / 2).
    Each process gets its share of the cores (``units.set_threads``); outputs are checked: every image once."""
    cfg = bench.cfg.scaling
    checkpoint = random_checkpoint(bench, folder)
    images = write_images(folder / "images", cfg.images, bench.cfg.data.image_size, bench.cfg.seed)
    methods = list(cfg.methods)
    blocks = [f"{m}.{k}={v}" for m in methods for k, v in settings[m].asdict().items() if v is not None]
    runs = {}
    for processes in (1, 2):
        out = folder / f"out{processes}"
        command = [
            sys.executable,
            "experiments/counterfactual_attribution.py",
            f"checkpoint={checkpoint}",
            "classifier_checkpoint=null",
            f"input={images}",
            f"output_dir={out}",
            f"methods=[{','.join(methods)}]",
            *blocks,
            f"batch_size={cfg.batch_size}",
            "num_images=null",
            "progress=false",
            f"devices={processes}",
        ]
        start = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode:
            raise RuntimeError(f"attribution on {processes} processes failed: {done.stderr[-2000:]}")
        with open(out / "results.csv") as fh:
            ids = [row["id"] for row in csv.DictReader(fh)]
        if sorted(ids) != sorted(p.stem for p in images.iterdir()):
            raise RuntimeError(f"{processes} processes: results.csv does not list every image exactly once")
        runs[processes] = {"seconds": seconds, "images_per_second": cfg.images / seconds}
    speedup = runs[2]["images_per_second"] / runs[1]["images_per_second"]
    return {
        "images": cfg.images,
        "batch_size": cfg.batch_size,
        "methods": methods,
        "processes": {str(k): v for k, v in runs.items()},
        "speedup_2_vs_1": speedup,
        "efficiency": speedup / 2,
        "cores": os.cpu_count(),
        "method": "wall time of the whole command (start-up and model loading included), each run alone",
    }
