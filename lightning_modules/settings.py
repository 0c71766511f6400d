"""Sampling settings: one typed, validated object per way of sampling, used by the pipeline, the callbacks, the
scripts and the configs alike.

A setting is declared and range-checked here only. Values come in three layers: the class defaults, then the
checkpoint's ``sampling`` (steps and guidance chosen for that model, stored with it at training time), then what the
user gives (a YAML block or a command-line override). ``None`` in a YAML block means "not given".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar


def check_integer(name: str, value: Any, minimum: int) -> None:
    """One rule for every count a user sets: an int (not a bool, which is one in Python) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class SamplingSettings:
    """Text -> image: DDIM steps and the classifier-free guidance scale (0: unconditional, 1: conditional only)."""

    num_inference_steps: int = 25
    guidance_scale: float = 3.0

    #: the fraction of the schedule the method runs (1 for sampling from noise)
    fraction_name: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        check_integer("num_inference_steps", self.num_inference_steps, 1)
        if (
            isinstance(self.guidance_scale, bool)
            or not isinstance(self.guidance_scale, (int, float))
            or not math.isfinite(self.guidance_scale)
            or self.guidance_scale < 0
        ):
            raise ValueError(f"guidance_scale must be a number >= 0, got {self.guidance_scale!r}")
        object.__setattr__(self, "guidance_scale", float(self.guidance_scale))
        if self.fraction_name is not None:
            self._check_fraction(self.fraction_name)

    def _check_fraction(self, name: str) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
            raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        object.__setattr__(self, name, float(value))
        if int(self.num_inference_steps * value) < 1:  # the pipeline would have no timestep to start from
            raise ValueError(
                f"{name} {value} of {self.num_inference_steps} steps runs no denoising step: raise {name} "
                f"to at least 1/{self.num_inference_steps} or num_inference_steps to at least {math.ceil(1 / value)}"
            )

    @classmethod
    def from_hparams(cls, sampling: Mapping[str, Any] | None) -> SamplingSettings:
        """The defaults a checkpoint stores under ``hyper_parameters.sampling``."""
        sampling = sampling or {}
        return SamplingSettings(**{f: sampling[f] for f in ("num_inference_steps", "guidance_scale") if f in sampling})

    @classmethod
    def build(cls, defaults: SamplingSettings | None = None, **values: Any):
        """``values`` (``None`` = not given) over ``defaults``' steps and guidance over the class defaults."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} setting(s) {unknown}; valid: {', '.join(sorted(fields))}")
        given = {k: v for k, v in values.items() if v is not None}
        inherited = (
            {}
            if defaults is None
            else {"num_inference_steps": defaults.num_inference_steps, "guidance_scale": defaults.guidance_scale}
        )
        return cls(**{**inherited, **given})

    def asdict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SDEditSettings(SamplingSettings):
    """Noise the image latent to ``strength`` of the schedule, denoise toward the target prompt (img2img)."""

    strength: float = 0.5
    method: ClassVar[str] = "sdedit"
    fraction_name: ClassVar[str] = "strength"


@dataclass(frozen=True)
class InversionSettings(SamplingSettings):
    """DDIM-invert the image latent to ``inversion_depth`` of the schedule, then guided DDIM decoding."""

    inversion_depth: float = 0.5
    method: ClassVar[str] = "inversion"
    fraction_name: ClassVar[str] = "inversion_depth"


@dataclass(frozen=True)
class InductionSettings(SamplingSettings):
    """Zero-shot induction: the region starts from ``strength`` of the schedule (1: pure noise); ``feather`` (pixels)
    softens the region's edge; ``paste`` lays the decoded region over the original pixels; ``resample`` runs each
    step that many times, re-noising in between (RePaint's U; 1: plain latent blending); ``background_steps`` > 0
    then fits the latent cells of the region grown by ``background_grow`` cells so the decoded image keeps the
    original outside (``LatentDiffusionPipeline.reconstruct_background``; 0: off)."""

    strength: float = 1.0
    feather: float = 0.0
    paste: bool = True
    resample: int = 1
    background_steps: int = 0
    background_grow: int = 2
    fraction_name: ClassVar[str] = "strength"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_integer("resample", self.resample, 1)
        check_integer("background_steps", self.background_steps, 0)
        check_integer("background_grow", self.background_grow, 0)
        if isinstance(self.feather, bool) or not isinstance(self.feather, (int, float)) or self.feather < 0:
            raise ValueError(f"feather must be a number of pixels >= 0, got {self.feather!r}")
        if not isinstance(self.paste, bool):
            raise ValueError(f"paste must be true or false, got {self.paste!r}")


CounterfactualSettings = SDEditSettings | InversionSettings
COUNTERFACTUAL_SETTINGS: dict[str, type[SDEditSettings] | type[InversionSettings]] = {
    "sdedit": SDEditSettings,
    "inversion": InversionSettings,
}
COUNTERFACTUAL_METHODS = tuple(COUNTERFACTUAL_SETTINGS)


def counterfactual_settings(
    method: str, defaults: SamplingSettings | None = None, **values: Any
) -> CounterfactualSettings:
    """The settings of counterfactual ``method``. ``values`` may hold the other method's fraction too (a config block
    that serves either method); it is ignored, every other unknown key is an error."""
    if method not in COUNTERFACTUAL_SETTINGS:
        raise ValueError(f"unknown counterfactual method {method!r}; valid: {', '.join(COUNTERFACTUAL_METHODS)}")
    cls = COUNTERFACTUAL_SETTINGS[method]
    others = {c.fraction_name for c in COUNTERFACTUAL_SETTINGS.values()} - {cls.fraction_name}
    return cls.build(defaults, **{k: v for k, v in values.items() if k not in others})
