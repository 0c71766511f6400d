"""Stage 2: train the text-conditioned latent diffusion model on the frozen stage-1 VAE.

    python experiments/train.py [data=chexpert] [experiment=smoke] [trainer.max_steps=100] \
        [model.unet.block_out_channels=[64,128]] [ckpt_path=last]
"""

from __future__ import annotations

from omegaconf import OmegaConf

from experiments.runner import build_datamodule, build_trainer, fit, load_config, log, seed_and_threads
from lightning_modules.callbacks import SampleGridLogger
from lightning_modules.latent_diffusion import LatentDiffusionModule
from lightning_modules.metric_callbacks import CounterfactualGridLogger, GenerationMetricsLogger, HParamsLogger

#: the model keys that build LatentDiffusionModule (the rest of `model` configures stage 1 and the classifier)
MODULE_KEYS = ("vae", "unet", "prompt_encoder", "noise_scheduler", "p_uncond", "ema", "optimizer", "compile")


def build_module(cfg, datamodule) -> LatentDiffusionModule:
    model = OmegaConf.to_container(cfg.model, resolve=True)
    cache_latents = model["cache_latents"] and not datamodule.has_random_augmentation
    if model["cache_latents"] and not cache_latents:
        log.warning("model.cache_latents ignored: the data has random augmentation, so latents change every epoch")
    return LatentDiffusionModule(
        **{key: model[key] for key in MODULE_KEYS}, cache_latents=cache_latents,
        image_size=datamodule.image_size, total_steps=cfg.trainer.max_steps,
        sampling={**model["sampling"], "normal_prompt": datamodule.normal_prompt},
    )


def main(argv: list[str] | None = None):
    cfg = load_config("train", argv)
    seed_and_threads(cfg)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    trainer = build_trainer(cfg, [
        SampleGridLogger(**cfg.callbacks.samples),
        CounterfactualGridLogger(**cfg.callbacks.counterfactuals),
        GenerationMetricsLogger(**OmegaConf.to_container(cfg.callbacks.generation_metrics, resolve=True)),
        HParamsLogger(OmegaConf.to_container(cfg, resolve=True)),
    ])
    fit(cfg, trainer, module, datamodule)
    return trainer


if __name__ == "__main__":
    main()
