"""Every TensorBoard image logger, each on rank zero only so DDP runs write each picture once: stage 1's
reconstructions, stage 2's prompt grids and counterfactual rows (with the EMA weights)."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid

from datamodules.base import to_unit_range
from lightning_modules.attribution import attribution_map
from lightning_modules.overlays import blend_heat
from lightning_modules.seeding import image_generators
from lightning_modules.settings import counterfactual_settings


def tensorboard_writer(trainer: L.Trainer):
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
        writer = tensorboard_writer(trainer)
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
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        prompts = [p for p in trainer.datamodule.sample_prompts() for _ in range(self.samples_per_prompt)]
        size = trainer.datamodule.image_size
        with pl_module.sampling_pipeline() as pipeline:
            images = pipeline.generate(prompts, size, size, generator=torch.Generator("cpu").manual_seed(self.seed))
        writer.add_image(
            "samples/prompt_rows", make_grid(to_unit_range(images), nrow=self.samples_per_prompt), trainer.global_step
        )
        writer.add_text("samples/prompts", "\n\n".join(trainer.datamodule.sample_prompts()), trainer.global_step)
        self.logged_step = trainer.global_step


class EveryNValidations(L.Callback):
    """Counts real validations (not the sanity check) and says when the ``every_n_validations``-th one ends."""

    def __init__(self, every_n_validations: int):
        if every_n_validations < 0:
            raise ValueError("every_n_validations must be >= 0 (0 disables the callback)")
        self.every_n_validations, self.validations = every_n_validations, 0

    def due(self, trainer: L.Trainer) -> bool:
        if trainer.sanity_checking or self.every_n_validations == 0:
            return False
        self.validations += 1
        return self.validations % self.every_n_validations == 0

    def state_dict(self) -> dict[str, int]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.validations = state_dict["validations"]


class CounterfactualGridLogger(EveryNValidations):
    """Every ``every_n_validations`` validations, a fixed validation batch as rows in TensorBoard:
    input | healthy counterfactual | attribution |x_a - x_n| over the input | ground-truth lesion mask (if any).

    Each image has its own seed.
    """

    def __init__(
        self,
        every_n_validations: int = 1,
        num_images: int = 8,
        method: str = "sdedit",
        attribution_sigma: float = 1.0,
        seed: int = 0,
        **settings,
    ):
        """``method`` and ``settings`` (steps, guidance, strength or depth; the model's defaults where not given)
        build the counterfactual settings, checked here, before training starts."""
        super().__init__(every_n_validations)
        self.num_images, self.attribution_sigma, self.seed = num_images, attribution_sigma, seed
        self.method, self.values = method, settings
        counterfactual_settings(method, **settings)  # a bad value fails now, not at the first validation

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.due(trainer):
            self.log_grid(trainer, pl_module)

    @rank_zero_only
    def log_grid(self, trainer: L.Trainer, pl_module) -> None:
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        batch = next(iter(trainer.datamodule.val_dataloader()))
        images = batch["image"][: self.num_images].to(pl_module.device)
        ids = list(batch["id"][: self.num_images])
        with pl_module.sampling_pipeline() as pipeline:
            settings = counterfactual_settings(self.method, pipeline.sampling, **self.values)
            output = pipeline(images, settings, generator=image_generators(ids, self.seed))

        inputs = to_unit_range(images).cpu()
        # |x_a - x_n| in [0, 1] image units, one colour scale for the whole grid so rows compare
        heat = attribution_map(output.attribution, "absolute", self.attribution_sigma).cpu() / 2
        vmax = max(float(heat.max()), 1e-6)
        overlays = torch.stack(
            [
                torch.from_numpy(blend_heat(x[0].numpy(), h[0].numpy(), vmax)).permute(2, 0, 1)
                for x, h in zip(inputs, heat)
            ]
        ).float()  # (B, 3, H, W)
        rows = [inputs, to_unit_range(output.images).cpu(), overlays]
        has_mask = batch["has_mask"].any() if "has_mask" in batch else batch["mask"].any()
        if has_mask:
            rows.append(batch["mask"][: self.num_images])
        rows = [row.expand(-1, 3, -1, -1) for row in rows]  # (B, 3, H, W) each
        grid = make_grid(torch.cat(rows), nrow=images.shape[0], pad_value=1.0)
        names = "input | counterfactual | attribution" + (" | lesion mask" if has_mask else "")
        writer.add_image("counterfactuals/rows", grid, trainer.global_step)
        writer.add_text(
            "counterfactuals/settings",
            f"rows: {names} (attribution colour scale 0 to {vmax:.3f}); {settings}",
            trainer.global_step,
        )
