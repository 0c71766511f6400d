"""Config composition: one YAML per concern, chosen by group, overridden from the command line.

``compose("train", ["data=chexpert", "trainer.max_steps=100"])`` reads ``configs/train.yaml``, replaces each entry of
its
``defaults`` by the chosen file of that group (``configs/<group>/<choice>.yaml``, stored under ``<group>``), merges the
chosen ``experiment`` (which may pick groups of its own in a ``defaults`` entry) over the result, then applies the
remaining ``key=value`` overrides. Unknown group choices and unknown keys are errors that list what is valid; an
override must keep its key's type, and every value is range-checked (``check``) before anything is built.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

CONFIG_DIR = Path(__file__).resolve().parent
GROUPS = ("data", "model", "trainer", "experiment")


class ConfigError(ValueError):
    """A config name, group choice or key the user gave does not exist."""


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def _load_group(group: str, choice: str) -> DictConfig:
    path = CONFIG_DIR / group / f"{choice}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown {group} '{choice}'; valid choices: {', '.join(choices(group))}")
    return OmegaConf.load(path)


def _split_overrides(overrides: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    selected, dotlist = {}, []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        if not value.strip():  # OmegaConf would read it as null, silently restoring a default
            raise ConfigError(f"override '{item}' has no value: give one, or {key}=null for the default")
        if key in GROUPS:
            selected[key] = value
        else:
            dotlist.append(item)
    return selected, dotlist


def _from_dotlist(dotlist: list[str]) -> DictConfig:
    """``key=value`` overrides -> a config; a value YAML cannot read is a ``ConfigError`` naming the override."""
    for item in dotlist:
        try:
            OmegaConf.from_dotlist([item])
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(
                f"override '{item}' is not a YAML value ({problem}); in a mapping put a space after each colon, "
                "e.g. key='{a: 1, b: [2, 3]}'"
            ) from None
    return OmegaConf.from_dotlist(dotlist)


def _kind(value: Any) -> str | None:
    """The type an override must keep: None (a null default) takes anything."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, (int, float)):
        return "an integer" if isinstance(value, int) else "a number"
    if isinstance(value, str):
        return "text"
    return "a list" if OmegaConf.is_list(value) or isinstance(value, list) else "a mapping"


def _check_types(base: DictConfig, update: DictConfig, prefix: str = "") -> None:
    """Every value of ``update`` keeps the type of ``base``'s (an integer where a number is expected is fine)."""
    for key in update:
        old, new = base.get(key), update[key]
        path = f"{prefix}{key}"
        if isinstance(old, DictConfig) and isinstance(new, DictConfig):
            _check_types(old, new, f"{path}.")
            continue
        want, got = _kind(old), _kind(new)
        if want is None or got is None or want == got or (want == "a number" and got == "an integer"):
            continue
        if want == "text" and got in ("an integer", "a number", "true or false"):
            continue  # a name or path that looks like a number
        raise ConfigError(f"{path} must be {want} (default {old}), got {new!r}")


def _merge_strict(base: DictConfig, update: DictConfig | dict, source: str) -> DictConfig:
    OmegaConf.set_struct(base, True)
    if source == "command line":
        _check_types(base, OmegaConf.create(update))
    try:
        return OmegaConf.merge(base, update)
    except (ConfigAttributeError, ConfigKeyError) as err:
        key = getattr(err, "full_key", None) or str(err)
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.select(base, parent) if parent else base
        valid = ", ".join(sorted(node.keys())) if isinstance(node, DictConfig) else "(not a mapping)"
        where = f"'{parent}'" if parent else "the top level"
        raise ConfigError(f"{source}: unknown key '{key}'; valid keys at {where}: {valid}") from None


def compose(name: str = "train", overrides: Sequence[str] = ()) -> DictConfig:
    """Build the config for the entry point ``name`` (a file in ``configs/``) with command-line ``overrides``."""
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        tops = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown config '{name}'; valid: {', '.join(tops)}")
    primary = OmegaConf.load(path)
    selected, dotlist = _split_overrides(overrides)

    defaults = dict(primary.pop("defaults", {}))
    experiment = selected.get("experiment", defaults.get("experiment"))
    experiment_cfg = _load_group("experiment", experiment) if experiment not in (None, "null", "none") else None
    if experiment_cfg is not None:
        defaults.update(experiment_cfg.pop("defaults", {}))
    defaults.update({k: v for k, v in selected.items() if k != "experiment"})

    cfg = OmegaConf.create({})
    for group in ("data", "model", "trainer"):
        if group in defaults:
            cfg[group] = _load_group(group, defaults[group])
            cfg[group]["name"] = defaults[group]
    cfg = OmegaConf.merge(cfg, primary)
    cfg.experiment = experiment if experiment_cfg is not None else None
    if experiment_cfg is not None:
        for group in GROUPS:  # an experiment shrinks every stage; entry points without a group skip its part
            if group not in defaults and group in experiment_cfg:
                experiment_cfg.pop(group)
        cfg = _merge_strict(cfg, experiment_cfg, f"experiment '{experiment}'")
    cfg = _merge_strict(cfg, _from_dotlist(dotlist), "command line")
    OmegaConf.resolve(cfg)
    check(cfg)
    return cfg


#: range rules by key name, wherever the key sits: (test, what it must be); None passes where null means "default"
RULES: dict[str, tuple[Any, str]] = {
    "batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "eval_batch_size": (lambda v: v >= 1, "an integer >= 1 or null"),
    "max_steps": (lambda v: v >= 1, "an integer >= 1"),
    "num_inference_steps": (lambda v: v >= 1, "an integer >= 1 or null"),
    "num_images": (lambda v: v >= 1, "an integer >= 1 or null"),
    "image_size": (lambda v: v >= 8, "an integer >= 8"),
    "num_workers": (lambda v: v >= 0, "an integer >= 0"),
    "guidance_scale": (lambda v: v >= 0, "a number >= 0 or null (0: unconditional)"),
    "lr": (lambda v: v > 0, "a number > 0"),
}


def _walk(node: DictConfig, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, DictConfig):
            yield from _walk(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", str(key), value


def check(cfg: DictConfig) -> None:
    """Range-check every value ``RULES`` names, and the image size against the networks' downsampling, so a bad
    value is one clear line here instead of a shape error deep inside a model."""
    for path, key, value in _walk(cfg):
        if key not in RULES or value is None:
            continue
        test, want = RULES[key]
        for item in value if OmegaConf.is_list(value) else [value]:  # a tuning grid: every point
            if isinstance(item, bool) or not isinstance(item, (int, float)) or not test(item):
                raise ConfigError(f"{path} must be {want}, got {value!r}")
    size = OmegaConf.select(cfg, "data.image_size")
    for path, factor in _downsampling(cfg).items():
        if size is not None and size % factor:
            below, above = size - size % factor, size - size % factor + factor
            raise ConfigError(
                f"data.image_size={size} is not a multiple of {factor}, the downsampling of {path}: "
                f"use {below or above} or {above}"
            )


def _downsampling(cfg: DictConfig) -> dict[str, int]:
    """The factor each configured network needs the image side to divide: the VAE halves it per block after the
    first, and the UNet halves the latent side again per block after the first."""
    factors = {}
    vae_blocks = OmegaConf.select(cfg, "model.autoencoder.network.block_out_channels")
    vae = 2 ** (len(vae_blocks) - 1) if vae_blocks else None
    if vae:
        factors["model.autoencoder.network"] = vae
    unet_blocks = OmegaConf.select(cfg, "model.unet.block_out_channels")
    if vae and unet_blocks:
        factors["model.unet (on the VAE's latents)"] = vae * 2 ** (len(unet_blocks) - 1)
    return factors


def instantiate(node: DictConfig | dict, **kwargs: Any) -> Any:
    """Build ``node['_target_']`` with the node's other keys (minus ``name``) and ``kwargs`` as arguments."""
    params = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    target = params.pop("_target_")
    params.pop("name", None)
    module_name, attr = target.rsplit(".", 1)
    return getattr(importlib.import_module(module_name), attr)(**params, **kwargs)
