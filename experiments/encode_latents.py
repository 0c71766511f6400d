"""Stage 1's posterior of every train and val image into the latent store, once, on every device of the run.

    python experiments/encode_latents.py [the arguments of experiments/train.py]   (make encode-latents GPUS=N ...)

The store lands in ``latent_store.root``, in a folder named by the VAE and the data's pixel settings; train with
``latent_store.enabled=true`` and the same arguments to read it (lightning_modules/latent_store.py).
"""

from __future__ import annotations

from lightning_modules.runs.cli import load_config, log, run
from lightning_modules.runs.training import build_datamodule, latent_store, seed_and_threads
from lightning_modules.vae import load_vae


def main(argv: list[str] | None = None):
    cfg = load_config("train", argv)
    seed_and_threads(cfg)
    datamodule = build_datamodule(cfg)
    path = latent_store(cfg, datamodule, load_vae(cfg.model.vae.path, cfg.model.vae.subfolder))
    log.warning("latent store: %s", path)
    return path


if __name__ == "__main__":
    run(main)
