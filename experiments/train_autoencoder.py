"""Stage 1: train the autoencoder, then export it (diffusers format, latent scaling factor set) for stage 2.

python experiments/train_autoencoder.py [experiment=smoke] [trainer.max_steps=2000] [key=value ...]
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from lightning_modules.autoencoder import AutoencoderModule
from lightning_modules.image_callbacks import ReconstructionLogger
from lightning_modules.runs.cli import load_config, log, run, write_results
from lightning_modules.runs.training import build_datamodule, build_trainer, fit, resume_path, seed_and_threads


def main(argv: list[str] | None = None) -> Path | None:
    cfg = load_config("train_autoencoder", argv)
    ckpt_path = resume_path(cfg, "stage-1 autoencoder")  # first: an earlier run is never overwritten
    seed_and_threads(cfg)
    datamodule = build_datamodule(cfg)
    module = AutoencoderModule(
        **OmegaConf.to_container(cfg.model.autoencoder, resolve=True), total_steps=cfg.trainer.max_steps
    )
    trainer = build_trainer(cfg, [ReconstructionLogger(**cfg.callbacks.reconstructions)])
    fit(cfg, trainer, module, datamodule, ckpt_path)
    round_trip = trainer.test(module, datamodule=datamodule, verbose=False)[0]  # the weights exported below
    if not trainer.is_global_zero:
        return None
    table = (
        "| split | images | round-trip SSIM | round-trip MAE (grey levels) |\n|---|---:|---:|---:|\n"
        f"| test | {len(datamodule.dataset('test'))} | {round_trip['test/round_trip_ssim']:.3f} | "
        f"{round_trip['test/round_trip_mae']:.4f} |\n"
    )
    write_results(Path(cfg.log_dir) / cfg.run_name, "round_trip", round_trip, table)
    scaling_factor = module.latent_scaling_factor(datamodule.train_dataloader())
    export_dir = module.export(Path(cfg.log_dir) / cfg.run_name / "vae", scaling_factor)
    log.warning("exported the VAE to %s (scaling_factor %.4f)", export_dir, scaling_factor)
    return export_dir


if __name__ == "__main__":
    run(main)
