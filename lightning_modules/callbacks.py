"""TensorBoard image logging, done on rank zero only so DDP runs write each picture once."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid

from datamodules.base import to_unit_range


def _tensorboard(trainer: L.Trainer):
    for logger in trainer.loggers:
        if hasattr(logger.experiment, "add_image"):
            return logger.experiment
    return None


class ReconstructionLogger(L.Callback):
    """Stage 1: a fixed validation batch over its reconstructions, after every validation."""

    def __init__(self, num_images: int = 8):
        self.num_images = num_images

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer = _tensorboard(trainer)
        if writer is None or trainer.sanity_checking:
            return
        batch = next(iter(trainer.datamodule.val_dataloader()))
        images = batch["image"][: self.num_images].to(pl_module.device)
        reconstructions = pl_module.reconstruct(images)
        grid = make_grid(to_unit_range(torch.cat([images, reconstructions])), nrow=images.shape[0])
        writer.add_image("autoencoder/input_over_reconstruction", grid, trainer.global_step)


class SampleGridLogger(L.Callback):
    """Stage 2: every ``every_n_steps``, images generated from fixed prompts and seeds with the EMA weights.

    One row per prompt (the dataset's ``sample_prompts()``: the normal prompt first, then one per finding); steps and
    guidance are the model's ``sampling`` settings.
    """

    def __init__(self, every_n_steps: int = 200, samples_per_prompt: int = 4, seed: int = 0):
        self.every_n_steps, self.samples_per_prompt, self.seed = every_n_steps, samples_per_prompt, seed
        self.logged_step: int | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step % self.every_n_steps == 0:
            self.log_samples(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if self.logged_step != trainer.global_step:  # the final model, unless the last step already showed it
            self.log_samples(trainer, pl_module)

    @rank_zero_only
    def log_samples(self, trainer: L.Trainer, pl_module) -> None:
        from lightning_modules.pipeline import CounterfactualPipeline

        writer = _tensorboard(trainer)
        if writer is None:
            return
        prompts = [p for p in trainer.datamodule.sample_prompts() for _ in range(self.samples_per_prompt)]
        size = trainer.datamodule.image_size
        was_training = pl_module.training
        pl_module.eval()
        with pl_module.ema_weights():
            pipeline = CounterfactualPipeline.from_module(pl_module)
            sampling = pl_module.hparams.sampling
            images = pipeline.generate(prompts, size, size, sampling["guidance_scale"],
                                       sampling["num_inference_steps"], torch.Generator("cpu").manual_seed(self.seed))
        pl_module.train(was_training)
        writer.add_image("samples/prompt_rows", make_grid(to_unit_range(images), nrow=self.samples_per_prompt),
                         trainer.global_step)
        writer.add_text("samples/prompts", "\n\n".join(trainer.datamodule.sample_prompts()), trainer.global_step)
        self.logged_step = trainer.global_step
