"""Config composition: one YAML per concern, chosen by group, overridden from the command line.

``compose("train", ["data=chexpert", "trainer.max_steps=100"])`` reads ``configs/train.yaml``, replaces each entry of
its
``defaults`` by the chosen file of that group (``configs/<group>/<choice>.yaml``, stored under ``<group>``), merges the
chosen ``experiment`` (which may pick groups of its own in a ``defaults`` entry) over the result, then applies the
remaining ``key=value`` overrides. Unknown group choices and unknown keys are errors that list what is valid.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
        if key in GROUPS:
            selected[key] = value
        else:
            dotlist.append(item)
    return selected, dotlist


def _merge_strict(base: DictConfig, update: DictConfig | dict, source: str) -> DictConfig:
    OmegaConf.set_struct(base, True)
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
    cfg = _merge_strict(cfg, OmegaConf.from_dotlist(dotlist), "command line")
    OmegaConf.resolve(cfg)
    return cfg


def instantiate(node: DictConfig | dict, **kwargs: Any) -> Any:
    """Build ``node['_target_']`` with the node's other keys (minus ``name``) and ``kwargs`` as arguments."""
    params = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    target = params.pop("_target_")
    params.pop("name", None)
    module_name, attr = target.rsplit(".", 1)
    return getattr(importlib.import_module(module_name), attr)(**params, **kwargs)
