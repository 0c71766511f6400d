"""What every script shares at its edges: the config from the command line, and results written as JSON + Markdown."""

from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from configs import ConfigError, compose

log = logging.getLogger("vald")


def load_config(name: str, argv: list[str] | None = None) -> DictConfig:
    """``python experiments/<script>.py [group=choice] [key=value ...]``; a bad key exits with the valid ones."""
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        print(
            f"usage: {Path(sys.argv[0]).name} [data=NAME] [model=NAME] [trainer=NAME] [experiment=NAME] "
            f"[key=value ...]\n\nresolved defaults:\n{OmegaConf.to_yaml(compose(name))}"
        )
        raise SystemExit(0)
    try:
        return compose(name, argv)
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None


def checkpoint_sampling(path: str | Path):
    """A stage-2 checkpoint's default ``SamplingSettings`` (steps, guidance), read without loading its weights: the
    defaults of every settings block whose value is null. Raises ValueError (a user error) for a missing or unreadable
    file, so scripts can build and check their settings before any model loads."""
    from lightning_modules.components import read_hparams  # diffusers: only for the scripts that sample
    from lightning_modules.settings import SamplingSettings

    if not Path(path).is_file():
        raise ValueError(f"checkpoint: no file at {path} (train one with `make demo` or `make train`)")
    try:
        hparams = read_hparams(path)
    except Exception as err:  # torch.load's errors for a file that is not a checkpoint vary by format
        raise ValueError(f"checkpoint: cannot read {path} ({type(err).__name__}: {err})") from None
    return SamplingSettings.from_hparams(hparams.get("sampling"))


def write_results(out_dir: str | Path, name: str, result: dict, table: str) -> Path:
    """``<name>.json`` (everything measured) and ``<name>.md`` (the table, also printed) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(table)
    print(table)
    return out


def write_csv(path: str | Path, rows: list[dict], columns: list[str] | None = None) -> None:
    """One row per dict; the columns are every key in first-seen order unless given."""
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
