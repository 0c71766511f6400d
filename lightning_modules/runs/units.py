"""Inference runs spread over devices with Lightning's ``predict``, resumable, and equal to a one-process run.

A run's work is a fixed list of *units* (batches of input indices), the same whatever the number of processes; a
unit's seed is its number. Rank ``r`` of ``N`` takes units ``r, r + N, ...`` (no padding: each input exactly once).
When a unit's outputs are on disk, its share of the results (CSV rows, metric states) is committed as one part file,
atomically, so a killed run resumes by skipping committed units. Rank zero merges the parts in unit order, which makes
the merged results those of a one-process run. The parts are deleted once merged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Sampler

#: settings that say where and how fast a run goes, not what it computes: a run may resume with other values
RUNTIME_KEYS = ("device", "devices", "num_nodes", "num_threads", "progress", "compile")


def plan_units(indices: list[int], batch_size: int) -> list[list[int]]:
    """``indices`` in consecutive batches of ``batch_size`` (the last one shorter)."""
    return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]


class UnitSampler(Sampler[list[int]]):
    """The batch sampler of one rank: its units not yet committed, in order."""

    def __init__(self, units: list[list[int]], pending: list[int]):
        self.units, self.pending = units, pending

    def __iter__(self) -> Iterator[list[int]]:
        return (self.units[u] for u in self.pending)

    def __len__(self) -> int:
        return len(self.pending)


class Parts:
    """``<output_dir>/parts/<unit>.pt``: each committed unit's results, loaded with ``weights_only=True``."""

    def __init__(self, out: Path):
        self.folder = Path(out) / "parts"

    def path(self, unit: int) -> Path:
        return self.folder / f"{unit:06d}.pt"

    def done(self) -> set[int]:
        return {int(p.stem) for p in self.folder.glob("*.pt")} if self.folder.is_dir() else set()

    def pending(self, num_units: int, rank: int, world_size: int) -> list[int]:
        left = sorted(set(range(num_units)) - self.done())
        return left[rank::world_size]  # the same on every rank: each lists the parts before any rank commits

    def commit(self, unit: int, payload: dict) -> None:
        """Written under a temporary name, then renamed: a part file is whole or absent."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{unit:06d}.pt.{os.getpid()}"
        torch.save(payload, tmp)
        os.replace(tmp, self.path(unit))

    def clear(self) -> None:
        """Once merged: the parts' metric states can be large (exact pixel scores)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def load(self, num_units: int) -> Iterator[dict]:
        """Every unit's part in unit order; a missing one is an error (a rank that failed)."""
        missing = sorted(set(range(num_units)) - self.done())
        if missing:
            raise RuntimeError(f"{len(missing)} of {num_units} units have no results (first: {missing[0]})")
        for unit in range(num_units):
            yield torch.load(self.path(unit), map_location="cpu", weights_only=True)


def launch_rank_zero() -> bool:
    """True in the one process that starts the run: before DDP exists, a process launched on another node by hand
    (``NODE_RANK``) or by a launcher (``RANK``, ``LOCAL_RANK``) is not it."""
    return rank_zero_only.rank == 0 and os.environ.get("NODE_RANK", "0") in ("", "0")


def fingerprint(paths: list[str | None], units: list) -> dict:
    """What a run's results depend on beyond its config: each model file's size and modification time, the units."""
    files = {str(p): [Path(p).stat().st_size, Path(p).stat().st_mtime_ns] for p in paths if p and Path(p).is_file()}
    plan = hashlib.sha256(json.dumps(units).encode()).hexdigest()[:16]
    return {"files": files, "units": len(units), "plan": plan}


def claim_output(cfg: DictConfig, out: Path, identity: dict) -> None:
    """Save the run's config and ``identity`` (``fingerprint``) in ``out``, or check that the run already there is
    this one (then it resumes): a folder holding another run's results, or any files without a saved run, is
    refused, never mixed or overwritten. ``RUNTIME_KEYS`` may differ. A run that wrote nothing but its config (it
    failed at the start) is replaced."""
    saved, ours = out / "config.yaml", {"config.yaml", "run.json"}
    current = {"config": OmegaConf.to_container(cfg, resolve=True), **identity}
    written = (
        [p.name for p in out.iterdir() if not p.name.startswith(".") and p.name not in ours] if out.is_dir() else []
    )
    if written and not saved.is_file():
        raise ValueError(
            f"output_dir={out} already holds files ({', '.join(sorted(written)[:3])}, ...) but no run of ours: "
            "choose another output_dir"
        )
    if written:
        try:
            before = json.loads((out / "run.json").read_text())
        except (OSError, ValueError):
            before = {"config": OmegaConf.to_container(OmegaConf.load(saved), resolve=True)}
        config = {k for k in set(before["config"]) | set(current["config"]) if k not in RUNTIME_KEYS}
        changed = sorted(k for k in config if before["config"].get(k) != current["config"].get(k))
        changed += [k for k in ("files", "units", "plan") if before.get(k) != current.get(k)]
        if changed:
            raise ValueError(
                f"output_dir={out} holds a run with other settings or models ({', '.join(changed)} differ): choose "
                "another output_dir, or delete that folder to start over"
            )
    elif launch_rank_zero():  # the other ranks start later, when rank zero calls predict
        out.mkdir(parents=True, exist_ok=True)
        for name, text in (("config.yaml", OmegaConf.to_yaml(cfg, resolve=True)), ("run.json", json.dumps(current))):
            tmp = out / f".{name}.{os.getpid()}"
            tmp.write_text(text)
            os.replace(tmp, out / name)


def trainer_args(cfg: DictConfig) -> dict:
    """The predict Trainer's devices from the run's ``device`` (cpu | cuda | gpu), ``devices`` and ``num_nodes``;
    more than one process is DDP (gloo on the CPU)."""
    device = str(cfg.device)
    accelerator = "gpu" if device.startswith(("cuda", "gpu")) else device
    if accelerator == "gpu" and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device}, but torch sees no CUDA GPU: run with device=cpu (GPUS=0)")
    if cfg.devices < 1 or cfg.num_nodes < 1:
        raise ValueError("devices and num_nodes must be positive")
    devices: int | list[int] = cfg.devices
    if accelerator == "gpu" and ":" in device:  # cuda:1: that one GPU
        if cfg.devices > 1:
            raise ValueError(f"device={device} names one GPU: use device=cuda with devices={cfg.devices}")
        devices = [int(device.split(":")[1])]
    many = cfg.devices * cfg.num_nodes > 1
    return {
        "accelerator": accelerator,
        "devices": devices,
        "num_nodes": cfg.num_nodes,
        "strategy": "ddp" if many else "auto",
    }


def set_threads(cfg: DictConfig) -> None:
    """``num_threads`` per process, or on the CPU with several processes their share of the cores (not torch's
    default of all of them in each: oversubscribed cores slow every process down)."""
    processes = cfg.devices if trainer_args(cfg)["accelerator"] == "cpu" else 1
    if cfg.num_threads or processes > 1:
        threads = cfg.num_threads or max(1, len(os.sched_getaffinity(0)) // processes)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # Lightning's launcher resets the threads of DDP ranks unless set


class PartWriter(BasePredictionWriter):
    """Writes each unit's outputs with ``write_outputs(prediction)``, then commits its part."""

    def __init__(self, parts: Parts, write_outputs):
        super().__init__(write_interval="batch")
        self.parts, self.write_outputs = parts, write_outputs

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        self.write_outputs(prediction)
        self.parts.commit(prediction["unit"], prediction["part"])


def run_units(module: L.LightningModule, cfg: DictConfig, parts: Parts, write_outputs) -> bool:
    """``module.predict_step`` over every pending unit on the run's devices (``module.predict_dataloader`` serves
    ``parts.pending``); True in the one process that then merges, after every rank has committed its units."""
    warnings.filterwarnings("ignore", message=".*custom batch sampler.*")  # UnitSampler returns every unit, unpadded
    trainer = L.Trainer(
        **trainer_args(cfg),
        precision="32-true",
        inference_mode=False,  # no_grad only: gradient saliency turns gradients back on
        use_distributed_sampler=False,  # the units are sharded by ``Parts.pending``, unpadded
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=bool(cfg.progress),
        callbacks=[PartWriter(parts, write_outputs)],
    )
    module.allow_zero_length_dataloader_with_multiple_devices = True  # a rank may have no unit left
    trainer.predict(module, return_predictions=False)
    trainer.strategy.barrier("parts committed")  # every rank's parts are on disk before rank zero merges
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # the merge is local: metrics must not try to sync
    return trainer.is_global_zero
