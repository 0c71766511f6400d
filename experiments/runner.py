"""What every training entry point shares: config from the command line, data checked first, logger, checkpoints,
resume, and the config saved beside the run."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from configs import ConfigError, compose, instantiate
from datamodules.base import CXRDataModule

log = logging.getLogger("vald")


def load_config(name: str, argv: list[str] | None = None) -> DictConfig:
    """``python experiments/<script>.py [group=choice] [key=value ...]``; a bad key exits with the valid ones."""
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        print(f"usage: {Path(sys.argv[0]).name} [data=NAME] [model=NAME] [trainer=NAME] [experiment=NAME] "
              f"[key=value ...]\n\nresolved defaults:\n{OmegaConf.to_yaml(compose(name))}")
        raise SystemExit(0)
    try:
        return compose(name, argv)
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None


def seed_and_threads(cfg: DictConfig) -> None:
    """Seed every RNG; on CPU DDP give each process its share of the cores instead of oversubscribing them."""
    L.seed_everything(cfg.seed, workers=True)
    devices = cfg.trainer.devices
    if cfg.trainer.accelerator == "cpu" and isinstance(devices, int) and devices > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // devices))


def build_datamodule(cfg: DictConfig) -> CXRDataModule:
    """Instantiate and set up the data now, so a missing root or corrupt files fail before any model is built."""
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    return datamodule


def build_trainer(cfg: DictConfig, callbacks: list[L.Callback], monitor: str = "val/loss") -> L.Trainer:
    run_dir = Path(cfg.log_dir) / cfg.run_name
    logger = TensorBoardLogger(save_dir=str(run_dir), name="", default_hp_metric=False)
    checkpoints = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor=monitor, mode="min",
                                  save_top_k=1, save_last=True, enable_version_counter=False)
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_args.pop("name", None)
    return L.Trainer(**trainer_args, logger=logger,
                     callbacks=[checkpoints, LearningRateMonitor("step"), *callbacks])


def save_config(cfg: DictConfig, trainer: L.Trainer) -> None:
    """The resolved config beside the TensorBoard events of this run (rank zero writes it)."""
    if trainer.is_global_zero:
        run = Path(trainer.logger.log_dir)
        run.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run / "config.yaml", resolve=True)


def resume_path(cfg: DictConfig) -> str | None:
    """``ckpt_path=last`` continues logs/<run_name>/checkpoints/last.ckpt (step, optimizer, EMA); a path is used as is."""
    if cfg.ckpt_path in (None, "null", ""):
        return None
    path = Path(cfg.log_dir) / cfg.run_name / "checkpoints" / "last.ckpt" if cfg.ckpt_path == "last" \
        else Path(cfg.ckpt_path)
    if not path.is_file():
        if cfg.ckpt_path == "last":
            log.warning("ckpt_path=last: no %s yet, starting a new run", path)
            return None
        raise SystemExit(f"ckpt_path: no checkpoint at {path}")
    return str(path)


def fit(cfg: DictConfig, trainer: L.Trainer, module: L.LightningModule, datamodule: CXRDataModule) -> None:
    save_config(cfg, trainer)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path(cfg), weights_only=True)


def write_results(out_dir: str | Path, name: str, result: dict, table: str) -> Path:
    """``<name>.json`` (everything measured) and ``<name>.md`` (the table, also printed) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(table)
    print(table)
    return out
