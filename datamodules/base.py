"""What every VALD DataModule serves, so models, pipelines and scripts never care where images came from.

A batch is a dict:
    image  (B, 1, H, W) float32 in [-1, 1]
    prompt list[str]                report-style text prompt, one per image
    label  (B, K) float32           finding vector over ``finding_names`` (1 present, 0 absent)
    mask   (B, 1, H, W) float32     ground-truth lesion mask in {0, 1}; all zeros when unknown
    id     list[str]                stable identifier (file path relative to the root, or ``split-index``)
Optional keys (present when the dataset has them): ``lung_mask`` (B, 1, H, W), ``has_mask`` (B,) bool.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.sampling import EpochSampler, ResumableLoader, run_seed


class CXRDataModule(L.LightningDataModule):
    """Shared loaders; subclasses build ``self.datasets[split]`` in ``setup`` and describe their findings."""

    #: names of the entries of ``label``, in order
    finding_names: tuple[str, ...] = ()
    #: the canonical healthy prompt: the default target of a counterfactual
    normal_prompt: str = "no acute cardiopulmonary abnormality"
    #: side of the square images served
    image_size: int = 64
    #: True when training images change from epoch to epoch (then latents must not be cached)
    has_random_augmentation: bool = False

    def __init__(self, batch_size: int = 32, num_workers: int = 0, eval_batch_size: int | None = None):
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.datasets: dict[str, Dataset] = {}
        #: ids of the latent store stage 2 trains from: the train split then serves no pixels (``without_pixels``)
        self.stored_ids: set[str] | None = None

    def dataset(self, split: str) -> Dataset:
        if split not in self.datasets:
            self.setup("fit" if split in ("train", "val") else "test")
        return self.datasets[split]

    def _loader(self, split: str, batch_size: int) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> ResumableLoader:
        """Epoch orders drawn from the run's seed, sharded by rank, resumable mid-epoch (datamodules/sampling.py)."""
        trainer = self.trainer
        dataset = self.dataset("train")
        if self.stored_ids is not None:
            dataset.without_pixels(self.stored_ids)
        sampler = EpochSampler(
            dataset,
            seed=run_seed(),
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
            weights=self.train_weights(),
        )
        if trainer is not None:  # a run resumed at an epoch's end makes its first iterator before Lightning sets it
            sampler.set_epoch(trainer.current_epoch)
        return ResumableLoader(
            dataset,
            sampler=sampler,
            batches_done=lambda: trainer.fit_loop.epoch_loop.batch_progress.current.processed if trainer else 0,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", batch_size=self.eval_batch_size)

    def sample_prompts(self) -> list[str]:
        """Prompts shown in the training sample grids: the normal prompt first, then one per finding."""
        return [self.normal_prompt]

    def train_weights(self) -> np.ndarray | None:
        """Per-sample weights of the training draw (class-balanced sampling, with replacement); ``None``: a shuffle."""
        return None


def to_model_range(image01: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1], the range the VAE is trained on."""
    return image01 * 2.0 - 1.0


def to_unit_range(image: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] for display and metrics."""
    return ((image + 1.0) / 2.0).clamp(0.0, 1.0)


def spread_indices(length: int, count: int | None) -> list[int]:
    """``count`` indices evenly spread over ``range(length)`` (all of them for None): datasets stored class by class
    (COVID-19 Radiography) then give every class its share, where the first ``count`` would give one class."""
    count = length if count is None else min(count, length)
    return [round(i * (length - 1) / (count - 1)) for i in range(count)] if count > 1 else list(range(count))
