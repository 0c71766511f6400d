"""What every training entry point shares: data checked first, the stage-2 module built from the config, logger,
checkpoints, resume, and the config saved beside the run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from configs import instantiate
from datamodules.base import CXRDataModule
from lightning_modules.checkpoints import AtomicCheckpointIO, frozen_fingerprint, newest_readable, read_checkpoint
from lightning_modules.latent_diffusion import LatentDiffusionModule
from lightning_modules.latent_store import LatentStore, StoreWriter, attach, files_signature, store_path
from lightning_modules.latent_store import encode as encode_store
from lightning_modules.runs.cli import log
from lightning_modules.runs.environment import environment
from lightning_modules.seeding import StepSeeds

#: the model keys that build LatentDiffusionModule (the rest of `model` configures stage 1 and the classifier)
MODULE_KEYS = (
    "vae",
    "unet",
    "prompt_encoder",
    "noise_scheduler",
    "inpainting",
    "p_uncond",
    "snr_gamma",
    "ema",
    "optimizer",
    "compile",
)


def seed_and_threads(cfg: DictConfig) -> None:
    """Check the accelerator is there, seed every RNG; on CPU DDP give each process its share of the cores instead of
    oversubscribing them."""
    if cfg.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"trainer.accelerator={cfg.trainer.accelerator}, but torch sees no CUDA GPU on this machine: "
            "run with GPUS=0 (make) or trainer=cpu, or check the driver with nvidia-smi"
        )
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


def latent_store_callbacks(cfg: DictConfig, datamodule: CXRDataModule, module: LatentDiffusionModule) -> list:
    """With ``latent_store.enabled`` (train.yaml's), stage 2 reads its latents from the store: written now on one
    device when missing; on several, by the run's own ranks as the fit starts (the ``StoreWriter`` returned)."""
    if not OmegaConf.select(cfg, "latent_store.enabled", default=False):
        return []
    path = latent_store(cfg, datamodule, module.vae, write=cfg.trainer.devices == 1)
    if not LatentStore.complete(path):
        return [StoreWriter(path, datamodule)]
    attach(module, datamodule, path)
    return []


def latent_store(cfg: DictConfig, datamodule: CXRDataModule, vae: torch.nn.Module, write: bool = True) -> Path:
    """The path of the store of this data and VAE (lightning_modules/latent_store.py), encoded now if it is missing
    and ``write`` (one process; a DDP fit's ranks write it themselves, ``StoreWriter``)."""
    if datamodule.has_random_augmentation:
        raise ValueError(
            "latent_store.enabled=true with data.augmentations: augmentations change the pixels every epoch, so "
            "precomputed latents would train on images never served; turn one of them off"
        )
    data = OmegaConf.to_container(cfg.data, resolve=True)
    path = store_path(cfg.latent_store.root, frozen_fingerprint(vae=vae)["vae"], data, files_signature(datamodule))
    if LatentStore.complete(path):
        log.info("latent store %s", path)
        return path
    if not write:
        return path
    log.warning("encoding the train and val splits into the latent store %s (once for this VAE and data)", path)
    trainer = {k: cfg.trainer[k] for k in ("accelerator", "devices", "num_nodes", "strategy")}
    return encode_store(path, vae, datamodule, trainer)


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
    return L.Trainer(
        **trainer_args,
        logger=logger,
        callbacks=[checkpoints, LearningRateMonitor("step"), StepSeeds(cfg.seed), *callbacks],
        plugins=[AtomicCheckpointIO()],
    )


def save_config(cfg: DictConfig, trainer: L.Trainer) -> None:
    """The resolved config and the environment (packages, CPU kernels, threads) beside the TensorBoard events of
    this run (rank zero writes them)."""
    if trainer.is_global_zero:
        run = Path(trainer.logger.log_dir)
        run.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run / "config.yaml", resolve=True)
        device = trainer.strategy.root_device
        (run / "environment.json").write_text(json.dumps(environment(device), indent=2) + "\n")


def resume_path(cfg: DictConfig, kind: str) -> str | None:
    """``ckpt_path=last`` continues logs/<run_name>/checkpoints/last.ckpt (step, optimizer, EMA), or the newest
    readable checkpoint there if it is damaged; a path is used as is. Without ``ckpt_path``, a folder that already
    holds a run's checkpoints is refused rather than overwritten."""
    folder = Path(cfg.log_dir) / cfg.run_name / "checkpoints"
    if cfg.ckpt_path in (None, "null", ""):
        earlier = sorted(p.name for p in folder.glob("*.ckpt"))
        if earlier:
            raise ValueError(
                f"{folder} already holds {', '.join(earlier)} from an earlier run: continue it with ckpt_path=last, "
                f"or start another with run_name=<new name> (or log_dir=...); nothing was overwritten"
            )
        return None
    if cfg.ckpt_path == "last":
        path = newest_readable(folder)
        if path is None:
            log.warning("ckpt_path=last: no readable checkpoint in %s yet, starting a new run", folder)
            return None
    else:
        path = Path(cfg.ckpt_path)
    read_checkpoint(path, kind, mmap=True)  # the right kind and readable, or one clear line
    return str(path)


def fit(
    cfg: DictConfig, trainer: L.Trainer, module: L.LightningModule, datamodule: CXRDataModule, ckpt_path: str | None
) -> None:
    """Train ``module`` from scratch, or on from ``ckpt_path`` (``resume_path``'s answer); the config is saved first."""
    save_config(cfg, trainer)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
