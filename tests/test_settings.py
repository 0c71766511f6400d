"""Sampling settings: values checked once, when built; defaults layered class < checkpoint < given (None = not given);
one counterfactual block serving either method."""

from __future__ import annotations

import dataclasses

import pytest

from lightning_modules.settings import (
    COUNTERFACTUAL_METHODS,
    InductionSettings,
    InversionSettings,
    SamplingSettings,
    SDEditSettings,
    counterfactual_settings,
)

CHECKPOINT = SamplingSettings(num_inference_steps=40, guidance_scale=7.5)  # what a checkpoint stores


def test_class_defaults():
    assert SamplingSettings() == SamplingSettings(25, 3.0)
    assert SDEditSettings().strength == 0.5 and InversionSettings().inversion_depth == 0.5
    induction = InductionSettings()
    assert (induction.strength, induction.feather, induction.paste) == (1.0, 0.0, True)
    assert COUNTERFACTUAL_METHODS == ("sdedit", "inversion")
    assert SDEditSettings.method == "sdedit" and InversionSettings.method == "inversion"


@pytest.mark.parametrize(
    "cls, values",
    [
        (SamplingSettings, dict(num_inference_steps=1, guidance_scale=0)),
        (SamplingSettings, dict(num_inference_steps=1000, guidance_scale=1)),
        (SDEditSettings, dict(strength=1.0)),
        (SDEditSettings, dict(num_inference_steps=10, strength=0.1)),  # exactly one step
        (InversionSettings, dict(inversion_depth=0.04, num_inference_steps=25)),
        (InductionSettings, dict(strength=0.3, feather=2.5, paste=False)),
        (InductionSettings, dict(feather=0)),
    ],
)
def test_valid_values_are_kept(cls, values):
    settings = cls(**values)
    assert all(getattr(settings, k) == v for k, v in values.items())


def test_numbers_are_normalised_to_floats_and_settings_are_frozen():
    settings = SDEditSettings(guidance_scale=3, strength=1)
    assert type(settings.guidance_scale) is float and type(settings.strength) is float
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.strength = 0.2  # type: ignore[misc]
    assert settings.asdict() == {"num_inference_steps": 25, "guidance_scale": 3.0, "strength": 1.0}


@pytest.mark.parametrize(
    "cls, values, message",
    [
        (SamplingSettings, dict(num_inference_steps=0), "num_inference_steps must be an integer >= 1, got 0"),
        (SamplingSettings, dict(num_inference_steps=2.5), "num_inference_steps must be an integer"),
        (SamplingSettings, dict(num_inference_steps=True), "num_inference_steps must be an integer"),
        (SamplingSettings, dict(num_inference_steps="25"), "num_inference_steps must be an integer"),
        (SamplingSettings, dict(guidance_scale=-0.5), "guidance_scale must be a number >= 0"),
        (SamplingSettings, dict(guidance_scale=float("nan")), "guidance_scale must be a number >= 0"),
        (SamplingSettings, dict(guidance_scale=float("inf")), "guidance_scale must be a number >= 0"),
        (SamplingSettings, dict(guidance_scale="high"), "guidance_scale must be a number"),
        (SamplingSettings, dict(guidance_scale=False), "guidance_scale must be a number"),
        (SDEditSettings, dict(strength=0.0), r"strength must be in \(0, 1\], got 0.0"),
        (SDEditSettings, dict(strength=1.5), r"strength must be in \(0, 1\]"),
        (SDEditSettings, dict(strength=True), r"strength must be in \(0, 1\]"),
        (
            SDEditSettings,
            dict(strength=0.1, num_inference_steps=5),
            "strength 0.1 of 5 steps runs no denoising step: raise strength to at least 1/5 "
            "or num_inference_steps to at least 10",
        ),
        (InversionSettings, dict(inversion_depth=-0.1), r"inversion_depth must be in \(0, 1\]"),
        (InversionSettings, dict(inversion_depth=0.2, num_inference_steps=4), "at least 5"),
        (InductionSettings, dict(strength=0.0), "strength must be in"),
        (InductionSettings, dict(feather=-1), "feather must be a number of pixels >= 0"),
        (InductionSettings, dict(feather="wide"), "feather must be a number of pixels"),
        (InductionSettings, dict(resample=0), "resample must be an integer >= 1"),
        (InductionSettings, dict(resample=2.5), "resample must be an integer >= 1"),
        (InductionSettings, dict(paste="yes"), "paste must be true or false"),
        (InductionSettings, dict(paste=1), "paste must be true or false"),
        (InductionSettings, dict(background_steps=-1), "background_steps must be an integer >= 0"),
        (InductionSettings, dict(background_grow=1.5), "background_grow must be an integer >= 0"),
        (InductionSettings, dict(background_steps=True), "background_steps must be an integer >= 0"),
    ],
)
def test_invalid_values_are_refused_with_what_is_valid(cls, values, message):
    with pytest.raises(ValueError, match=message):
        cls(**values)


# ---- layering ---------------------------------------------------------------------------------------------------
def test_build_layers_class_defaults_then_the_checkpoint_then_given_values():
    assert SamplingSettings.build() == SamplingSettings()  # nothing given, no checkpoint: the class defaults
    assert SamplingSettings.build(CHECKPOINT) == CHECKPOINT  # the checkpoint's steps and guidance
    assert SamplingSettings.build(CHECKPOINT, guidance_scale=2.0) == SamplingSettings(40, 2.0)  # given values win
    assert SamplingSettings.build(CHECKPOINT, num_inference_steps=None, guidance_scale=None) == CHECKPOINT  # None
    sdedit = SDEditSettings.build(CHECKPOINT, strength=None)
    assert sdedit == SDEditSettings(40, 7.5, strength=0.5)  # a fraction has no checkpoint default: the class's
    induction = InductionSettings.build(CHECKPOINT, num_inference_steps=10, feather=None, paste=False)
    assert induction == InductionSettings(10, 7.5, strength=1.0, feather=0.0, paste=False)


def test_build_takes_only_steps_and_guidance_from_the_defaults():
    """Defaults that are themselves a method's settings pass on steps and guidance, never their fraction."""
    assert SDEditSettings.build(InductionSettings(strength=0.25)).strength == 0.5
    assert InversionSettings.build(SDEditSettings(12, 2.0, strength=0.9)) == InversionSettings(12, 2.0)


def test_build_validates_the_layered_result():
    with pytest.raises(ValueError, match="runs no denoising step"):  # valid alone, not with the checkpoint's steps
        SDEditSettings.build(SamplingSettings(num_inference_steps=4), strength=0.2)
    with pytest.raises(ValueError, match="guidance_scale must be"):
        SamplingSettings.build(CHECKPOINT, guidance_scale=-1)


def test_build_refuses_unknown_keys_and_names_the_valid_ones():
    with pytest.raises(
        ValueError,
        match=r"unknown SamplingSettings setting\(s\) \['strength'\]; valid: "
        "guidance_scale, num_inference_steps",
    ):
        SamplingSettings.build(strength=0.5)
    with pytest.raises(ValueError, match=r"unknown InductionSettings setting\(s\) \['feathr'\]"):
        InductionSettings.build(feathr=2.0)


def test_from_hparams_reads_a_checkpoints_sampling_block():
    stored = {
        "scheduler": {"steps_offset": 1},
        "num_inference_steps": 40,
        "guidance_scale": 7.5,
        "normal_prompt": "no finding",
    }
    assert SamplingSettings.from_hparams(stored) == CHECKPOINT  # the other keys are the pipeline's, not settings
    assert SamplingSettings.from_hparams({"guidance_scale": 5}) == SamplingSettings(25, 5.0)
    assert SamplingSettings.from_hparams(None) == SamplingSettings.from_hparams({}) == SamplingSettings()
    with pytest.raises(ValueError, match="num_inference_steps"):
        SamplingSettings.from_hparams({"num_inference_steps": 0})


# ---- counterfactual_settings ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, cls", [("sdedit", SDEditSettings), ("inversion", InversionSettings)])
def test_counterfactual_settings_picks_the_methods_class_and_layers_the_defaults(method, cls):
    settings = counterfactual_settings(method, CHECKPOINT, guidance_scale=None, strength=0.3, inversion_depth=0.7)
    assert type(settings) is cls and (settings.num_inference_steps, settings.guidance_scale) == (40, 7.5)
    assert getattr(settings, cls.fraction_name) == (0.3 if method == "sdedit" else 0.7)
    assert counterfactual_settings(method) == cls()


@pytest.mark.parametrize("method, ignored", [("sdedit", "inversion_depth"), ("inversion", "strength")])
def test_counterfactual_settings_ignore_the_other_methods_fraction_even_when_invalid(method, ignored):
    assert counterfactual_settings(method, **{ignored: 5.0}) == counterfactual_settings(method)


def test_counterfactual_settings_refuse_unknown_methods_and_keys():
    with pytest.raises(ValueError, match="unknown counterfactual method 'magic'; valid: sdedit, inversion"):
        counterfactual_settings("magic")
    with pytest.raises(ValueError, match=r"unknown SDEditSettings setting\(s\) \['feather'\]"):
        counterfactual_settings("sdedit", feather=1.0)  # induction's, not a counterfactual's
    with pytest.raises(ValueError, match=r"unknown InversionSettings setting\(s\) \['depth'\]"):
        counterfactual_settings("inversion", depth=0.5)
    with pytest.raises(ValueError, match="inversion_depth must be in"):  # its own fraction is checked
        counterfactual_settings("inversion", inversion_depth=0.0)
