"""Stage 2: train the text-conditioned latent diffusion model on the frozen stage-1 VAE.

    python experiments/train.py [data=chexpert] [experiment=smoke] [trainer.max_steps=100] \
        [model.unet.block_out_channels=[64,128]] [ckpt_path=last]
"""

from __future__ import annotations

from omegaconf import OmegaConf

from lightning_modules.image_callbacks import CounterfactualGridLogger, SampleGridLogger
from lightning_modules.metric_callbacks import GenerationMetricsLogger, HParamsLogger
from lightning_modules.runs.cli import load_config, run
from lightning_modules.runs.training import (
    build_datamodule,
    build_latent_diffusion,
    build_trainer,
    fit,
    latent_store_callbacks,
    resume_path,
    seed_and_threads,
)


def main(argv: list[str] | None = None):
    cfg = load_config("train", argv)
    ckpt_path = resume_path(cfg, "stage-2 latent diffusion")  # first: an earlier run is never overwritten
    seed_and_threads(cfg)
    datamodule = build_datamodule(cfg)
    module = build_latent_diffusion(cfg, datamodule)
    trainer = build_trainer(
        cfg,
        [
            *latent_store_callbacks(cfg, datamodule, module),
            SampleGridLogger(**cfg.callbacks.samples),
            CounterfactualGridLogger(**OmegaConf.to_container(cfg.callbacks.counterfactuals, resolve=True)),
            GenerationMetricsLogger(**OmegaConf.to_container(cfg.callbacks.generation_metrics, resolve=True)),
            HParamsLogger(OmegaConf.to_container(cfg, resolve=True)),
        ],
    )
    fit(cfg, trainer, module, datamodule, ckpt_path)
    return trainer


if __name__ == "__main__":
    run(main)
