"""Stage 2 metrics while training: FID / SSIM / MS-SSIM with the EMA weights, and hyper-parameters beside their
final metrics.

Hyper-parameters are written by rank zero; the generation metrics are computed by every rank on its own
shard of the validation images and reduced by torchmetrics, so a DDP run reports the value of the whole set.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch.utils.data import DataLoader, Subset

from datamodules.base import spread_indices
from lightning_modules.fid import build_extractors
from lightning_modules.generation_metrics import OVERALL, GenerationMetrics, evaluation_images, flatten
from lightning_modules.image_callbacks import EveryNValidations
from lightning_modules.settings import SamplingSettings, counterfactual_settings


class GenerationMetricsLogger(EveryNValidations):
    """Every ``every_n_validations`` validations, FID / SSIM / MS-SSIM over ``num_images`` validation images spread
    over the split (``lightning_modules.generation_metrics``), logged as
    ``generation/{generated,counterfactual}/{metric}``.

    Every rank generates for its own shard (each image once, no padding repeats) and the metric states are reduced
    across ranks, so the logged value is the one of the whole set. FID extractors: see ``build_extractors``.
    """

    def __init__(
        self,
        generation: Mapping[str, Any] | None = None,
        counterfactual: Mapping[str, Any] | None = None,
        every_n_validations: int = 2,
        num_images: int = 32,
        batch_size: int = 32,
        seed: int = 0,
        classifier_checkpoint: str | None = None,
        inception: bool | str = False,
        inception_weights: str | None = None,
    ):
        """``generation``: sampling settings; ``counterfactual``: ``method`` and its settings. What is not given
        comes from the model's defaults; every value is checked here, before training starts."""
        super().__init__(every_n_validations)
        self.num_images, self.batch_size, self.seed = num_images, batch_size, seed
        self.generation, self.counterfactual = dict(generation or {}), dict(counterfactual or {"method": "sdedit"})
        SamplingSettings.build(**self.generation)
        counterfactual_settings(**self.counterfactual)
        self.fid = dict(
            inception=inception, inception_weights=inception_weights, classifier_checkpoint=classifier_checkpoint
        )
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
        sampler = (
            UnrepeatedDistributedSampler(
                subset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
            )
            if trainer.world_size > 1
            else None
        )
        return DataLoader(subset, batch_size=self.batch_size, sampler=sampler)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.due(trainer):
            return
        metrics = self.metrics.to(pl_module.device)
        with pl_module.sampling_pipeline() as pipeline:
            generation = SamplingSettings.build(pipeline.sampling, **self.generation)
            counterfactual = counterfactual_settings(defaults=pipeline.sampling, **self.counterfactual)
            for batch in self.loader(trainer):
                real = batch["image"].to(pl_module.device)
                fakes = evaluation_images(pipeline, {**batch, "image": real}, generation, counterfactual, self.seed)
                metrics.update(real, [[OVERALL]] * len(real), **fakes)
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
        final = {
            f"hparams/{key}": float(value)
            for key, value in trainer.callback_metrics.items()
            if key.startswith(self.prefixes)
        }
        if final:
            for logger in trainer.loggers:
                logger.log_hyperparams(self.params, final, step=trainer.global_step)
