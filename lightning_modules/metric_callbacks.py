"""Stage 2 evaluation while training: counterfactual grids, FID / SSIM / MS-SSIM, and hyper-parameters beside their
final metrics, all with the EMA weights.

Pictures and hyper-parameters are written by rank zero; the generation metrics are computed by every rank on its own
shard of the validation images and reduced by torchmetrics, so a DDP run reports the value of the whole set.
"""

from __future__ import annotations

from typing import Any, Mapping

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch.utils.data import DataLoader, Subset
from torchvision.utils import make_grid

from datamodules.base import to_unit_range
from lightning_modules.attribution import attribution_map
from lightning_modules.callbacks import _tensorboard
from lightning_modules.metrics import (OVERALL, GenerationMetrics, build_extractors, evaluation_images, flatten,
                                       image_generators, spread_indices)
from lightning_modules.overlays import blend_heat


class _EveryNValidations(L.Callback):
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


class CounterfactualGridLogger(_EveryNValidations):
    """Every ``every_n_validations`` validations, a fixed validation batch as rows in TensorBoard:
    input | healthy counterfactual | attribution |x_a - x_n| over the input | ground-truth lesion mask (if any).

    ``method`` and its settings are ``CounterfactualPipeline`` arguments; each image has its own seed.
    """

    def __init__(self, every_n_validations: int = 1, num_images: int = 8, method: str = "sdedit",
                 num_inference_steps: int = 25, guidance_scale: float = 3.0, strength: float = 0.5,
                 inversion_depth: float = 0.5, attribution_sigma: float = 1.0, seed: int = 0):
        super().__init__(every_n_validations)
        self.num_images, self.attribution_sigma, self.seed = num_images, attribution_sigma, seed
        self.settings = dict(method=method, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                             strength=strength, inversion_depth=inversion_depth)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.due(trainer):
            self.log_grid(trainer, pl_module)

    @rank_zero_only
    def log_grid(self, trainer: L.Trainer, pl_module) -> None:
        from lightning_modules.pipeline import CounterfactualPipeline

        writer = _tensorboard(trainer)
        if writer is None:
            return
        batch = next(iter(trainer.datamodule.val_dataloader()))
        images = batch["image"][: self.num_images].to(pl_module.device)
        ids = list(batch["id"][: self.num_images])
        was_training = pl_module.training
        pl_module.eval()
        with pl_module.ema_weights():
            output = CounterfactualPipeline.from_module(pl_module)(
                images, generator=image_generators(ids, self.seed), **self.settings)
        pl_module.train(was_training)

        inputs = to_unit_range(images).cpu()
        # |x_a - x_n| in [0, 1] image units, one colour scale for the whole grid so rows compare
        heat = attribution_map(output.attribution, "absolute", self.attribution_sigma).cpu() / 2
        vmax = max(float(heat.max()), 1e-6)
        overlays = torch.stack([torch.from_numpy(blend_heat(x[0].numpy(), h[0].numpy(), vmax)).permute(2, 0, 1)
                                for x, h in zip(inputs, heat)]).float()  # (B, 3, H, W)
        rows = [inputs, to_unit_range(output.images).cpu(), overlays]
        has_mask = batch["has_mask"].any() if "has_mask" in batch else batch["mask"].any()
        if has_mask:
            rows.append(batch["mask"][: self.num_images])
        rows = [row.expand(-1, 3, -1, -1) for row in rows]  # (B, 3, H, W) each
        grid = make_grid(torch.cat(rows), nrow=images.shape[0], pad_value=1.0)
        names = "input | counterfactual | attribution" + (" | lesion mask" if has_mask else "")
        writer.add_image("counterfactuals/rows", grid, trainer.global_step)
        writer.add_text("counterfactuals/settings", f"rows: {names} (attribution colour scale 0 to {vmax:.3f}); "
                        f"{self.settings}", trainer.global_step)


class GenerationMetricsLogger(_EveryNValidations):
    """Every ``every_n_validations`` validations, FID / SSIM / MS-SSIM over ``num_images`` validation images spread
    over the split (``lightning_modules.metrics``), logged as ``generation/{generated,counterfactual}/{metric}``.

    Every rank generates for its own shard (each image once, no padding repeats) and the metric states are reduced
    across ranks, so the logged value is the one of the whole set. FID extractors: see ``build_extractors``.
    """

    def __init__(self, generation: Mapping[str, Any], counterfactual: Mapping[str, Any], every_n_validations: int = 2,
                 num_images: int = 32, batch_size: int = 32, seed: int = 0, classifier_checkpoint: str | None = None,
                 inception: bool | str = False, inception_weights: str | None = None):
        """``generation``: ``num_inference_steps``, ``guidance_scale``; ``counterfactual``: pipeline arguments."""
        super().__init__(every_n_validations)
        self.num_images, self.batch_size, self.seed = num_images, batch_size, seed
        self.generation, self.counterfactual = dict(generation), dict(counterfactual)
        self.fid = dict(inception=inception, inception_weights=inception_weights,
                        classifier_checkpoint=classifier_checkpoint)
        self.metrics: GenerationMetrics | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.metrics is None and self.every_n_validations > 0:
            extractors, skipped = build_extractors(**self.fid)
            for name, reason in skipped.items():
                rank_zero_info(f"generation metrics: {name} skipped: {reason}")
            # overall only: per-class numbers are experiments/evaluate.py's (each class is one more FID to compute)
            self.metrics = GenerationMetrics((), trainer.datamodule.image_size, extractors)

    def loader(self, trainer: L.Trainer) -> DataLoader:
        """This rank's shard of ``num_images`` validation images, each image on exactly one rank."""
        dataset = trainer.datamodule.dataset("val")
        subset = Subset(dataset, spread_indices(len(dataset), self.num_images))
        sampler = UnrepeatedDistributedSampler(subset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                               shuffle=False) if trainer.world_size > 1 else None
        return DataLoader(subset, batch_size=self.batch_size, sampler=sampler)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.due(trainer):
            return
        from lightning_modules.pipeline import CounterfactualPipeline

        metrics = self.metrics.to(pl_module.device)
        was_training = pl_module.training
        pl_module.eval()
        with pl_module.ema_weights():
            pipeline = CounterfactualPipeline.from_module(pl_module)
            for batch in self.loader(trainer):
                real = batch["image"].to(pl_module.device)
                fakes = evaluation_images(pipeline, {**batch, "image": real}, self.generation, self.counterfactual,
                                          self.seed)
                metrics.update(real, [[OVERALL]] * len(real), **fakes)
        pl_module.train(was_training)
        values = flatten(metrics.compute())  # identical on every rank: the states were reduced
        metrics.reset()
        # the values are already those of the whole set; averaging identical values only satisfies Lightning's DDP check
        pl_module.log_dict({f"generation/{key}": value for key, value in values.items()}, sync_dist=True)


class HParamsLogger(L.Callback):
    """At the end of training, the run's (flattened) config beside its final ``val/loss`` and generation metrics:
    TensorBoard's HPARAMS tab then compares runs side by side."""

    def __init__(self, params: Mapping[str, Any], prefixes: tuple[str, ...] = ("val/loss", "generation/")):
        self.params, self.prefixes = dict(params), prefixes

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        final = {f"hparams/{key}": float(value) for key, value in trainer.callback_metrics.items()
                 if key.startswith(self.prefixes)}
        if final:
            for logger in trainer.loggers:
                logger.log_hyperparams(self.params, final, step=trainer.global_step)
