"""Attribution methods: ours (healthy counterfactuals of the diffusion model) and the baselines they are scored against.

One class per file, registered by name in ``METHODS`` (the names ``methods=[...]`` of configs/attribution.yaml takes):

* ``sdedit``, ``inversion`` (ours): the pipeline's healthy counterfactual (``lightning_modules.pipeline``);
* ``refined`` (ours): a second pass of the pipeline restricted to where the first one's map is high;
* ``mean_healthy``: the mean healthy training image as every input's counterfactual;
* ``reconstruction``: one of ours at guidance 0 (null prompt): isolates what the healthy prompt adds;
* ``diffedit``: DiffEdit's noise-difference mask (a map, no image);
* ``saliency``: the classifier's Grad-CAM (a map, no image).

Life of a method: ``build`` makes it from the attribution config (``from_config``: its block validated, before any
model is loaded), ``prepare`` gives it the loaded models once, then it is called batch by batch with its own
generator. It returns a counterfactual image (``counterfactual = True``: the run turns x - x_cf into the map) or a map.

Adding a method: one ``Method`` subclass decorated with ``@register`` in a new file here, and its import at the end.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from lightning_modules.classifier import FindingClassifier
from lightning_modules.pipeline import LatentDiffusionPipeline
from lightning_modules.settings import SamplingSettings


@dataclass
class Models:
    """What the methods run on, loaded once per run."""

    pipeline: LatentDiffusionPipeline
    classifier: FindingClassifier | None = None  # for methods with ``needs_classifier``
    train_split: Dataset | None = None  # the data's train split, for methods with ``needs_train_split``


@dataclass
class MethodOutput:
    counterfactual: torch.Tensor | None = None  # (B, 1, H, W) in [-1, 1]: methods with ``counterfactual = True``
    map: torch.Tensor | None = None  # (B, 1, H, W) non-negative scores: the other methods
    latent_error: torch.Tensor | None = None  # (B,) the reconstruction baseline's ||z_rec - z_0|| / ||z_0||
    weight: torch.Tensor | None = None  # (B, 1, H, W) in [0, 1]: a counterfactual's map is multiplied by it (refined)


class Method(ABC):
    """One attribution method; a subclass sets the class attributes and implements ``from_config`` and ``__call__``."""

    #: the name in ``methods=[...]``, the output folders and the tables
    name: ClassVar[str]
    #: its settings block in configs/attribution.yaml (dotted), named in its validation errors
    config_key: ClassVar[str]
    #: True: it yields a counterfactual image; False: a map only
    counterfactual: ClassVar[bool] = False
    #: a method VALD proposes, not a baseline (reconstruction and diffedit also run the diffusion model): the demo
    #: report's targets score the best of these
    ours: ClassVar[bool] = False
    #: dropped from the run (with a note) when there is no classifier checkpoint
    needs_classifier: ClassVar[bool] = False
    #: gets the data's train split in ``Models.train_split`` before ``prepare``
    needs_train_split: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: DictConfig, defaults: SamplingSettings, **overrides: Any) -> Method:
        """The method with its settings validated: ``cfg`` is the whole attribution config (the method reads its block
        and ``target_prompt``), ``defaults`` the checkpoint's steps and guidance, ``overrides`` replace keys of the
        block (tuning). Raises ``ValueError`` for a bad setting."""

    @classmethod
    def settings_block(cls, cfg: DictConfig, overrides: dict[str, Any], keys: Iterable[str] | None = None) -> dict:
        """The method's config block with ``overrides``; with ``keys``, any other key is an error."""
        block = {**OmegaConf.to_container(OmegaConf.select(cfg, cls.config_key), resolve=True), **overrides}
        unknown = sorted(set(block) - set(keys)) if keys is not None else []
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}; valid: {', '.join(keys)}")
        return block

    def prepare(self, models: Models) -> None:  # noqa: B027 (an optional hook, not abstract)
        """Once, after the models are loaded and before the first batch (default: nothing to do)."""

    @abstractmethod
    def __call__(
        self, images: torch.Tensor, models: Models, generator: torch.Generator, prompts: list[str] | None = None
    ) -> MethodOutput:
        """``images`` (B, 1, H, W) in [-1, 1] on the CPU; ``prompts``: the images' reports, when the data has them."""


#: name -> method class
METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``methods=[<cls.name>]``."""
    if cls.name in METHODS:
        raise ValueError(f"two attribution methods are named {cls.name!r}")
    METHODS[cls.name] = cls
    return cls


def build(name: str, cfg: DictConfig, defaults: SamplingSettings, **overrides: Any) -> Method:
    """``METHODS[name]`` from the config; a bad setting is a ``ValueError`` naming the config block."""
    if name not in METHODS:
        raise ValueError(f"methods: unknown {name!r}; choose from {sorted(METHODS)}")
    cls = METHODS[name]
    try:
        return cls.from_config(cfg, defaults, **overrides)
    except ValueError as err:
        raise ValueError(f"{cls.config_key}: {err}") from None


# every method registers itself on import
from lightning_modules.methods import (  # noqa: E402, F401
    diffedit,
    inversion,
    mean_healthy,
    reconstruction,
    refined,
    saliency,
    sdedit,
)
