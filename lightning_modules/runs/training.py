"""What every training entry point shares: data checked first, the stage-2 module built from the config, logger,
checkpoints, resume, and the config saved beside the run."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from configs import instantiate
from datamodules.base import CXRDataModule
from lightning_modules.latent_diffusion import LatentDiffusionModule
from lightning_modules.runs.cli import log

#: the model keys that build LatentDiffusionModule (the rest of `model` configures stage 1 and the classifier)
MODULE_KEYS = ("vae", "unet", "prompt_encoder", "noise_scheduler", "p_uncond", "ema", "optimizer", "compile")


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


def build_latent_diffusion(cfg: DictConfig, datamodule: CXRDataModule, **overrides) -> LatentDiffusionModule:
    """Stage 2 as ``cfg.model`` describes it, sized to the data; ``overrides`` replace module arguments (the benchmark
    switches the latent cache and compilation). Latents are cached only when the data has no random augmentation."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    cache_latents = model["cache_latents"] and not datamodule.has_random_augmentation
    if model["cache_latents"] and not cache_latents:
        log.warning("model.cache_latents ignored: the data has random augmentation, so latents change every epoch")
    arguments = dict(
        {key: model[key] for key in MODULE_KEYS},
        cache_latents=cache_latents,
        image_size=datamodule.image_size,
        total_steps=cfg.trainer.max_steps,
        sampling={**model["sampling"], "normal_prompt": datamodule.normal_prompt},
    )
    return LatentDiffusionModule(**{**arguments, **overrides})


def build_trainer(cfg: DictConfig, callbacks: list[L.Callback], monitor: str = "val/loss") -> L.Trainer:
    run_dir = Path(cfg.log_dir) / cfg.run_name
    logger = TensorBoardLogger(save_dir=str(run_dir), name="", default_hp_metric=False)
    checkpoints = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor=monitor,
        mode="min",
        save_top_k=1,
        save_last=True,
        enable_version_counter=False,
    )
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_args.pop("name", None)
    return L.Trainer(**trainer_args, logger=logger, callbacks=[checkpoints, LearningRateMonitor("step"), *callbacks])


def save_config(cfg: DictConfig, trainer: L.Trainer) -> None:
    """The resolved config beside the TensorBoard events of this run (rank zero writes it)."""
    if trainer.is_global_zero:
        run = Path(trainer.logger.log_dir)
        run.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run / "config.yaml", resolve=True)


def resume_path(cfg: DictConfig) -> str | None:
    """``ckpt_path=last`` continues logs/<run_name>/checkpoints/last.ckpt (step, optimizer, EMA); a path is used
    as is."""
    if cfg.ckpt_path in (None, "null", ""):
        return None
    path = (
        Path(cfg.log_dir) / cfg.run_name / "checkpoints" / "last.ckpt"
        if cfg.ckpt_path == "last"
        else Path(cfg.ckpt_path)
    )
    if not path.is_file():
        if cfg.ckpt_path == "last":
            log.warning("ckpt_path=last: no %s yet, starting a new run", path)
            return None
        raise SystemExit(f"ckpt_path: no checkpoint at {path}")
    return str(path)


def fit(cfg: DictConfig, trainer: L.Trainer, module: L.LightningModule, datamodule: CXRDataModule) -> None:
    save_config(cfg, trainer)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path(cfg), weights_only=True)
