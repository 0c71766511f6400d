"""Which machine settings change a seeded run: the same short training in fresh processes, one per variant of the
environment (threads, CPU kernels), compared weight by weight. The evidence behind README's Reproducibility."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig

from lightning_modules.runs.environment import PINS

ROOT = Path(__file__).resolve().parents[2]


def train(cfg: DictConfig, env: dict[str, str], log_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The smoke classifier after ``cfg.steps`` steps with this machine's defaults plus ``env``; its environment."""
    command = [
        sys.executable,
        str(ROOT / "experiments" / "train_classifier.py"),
        "experiment=smoke",
        f"data.num_train={cfg.num_train}",
        f"trainer.max_steps={cfg.steps}",
        "trainer.enable_progress_bar=false",
        f"log_dir={log_dir}",
    ]
    defaults = {k: v for k, v in os.environ.items() if k not in PINS}
    subprocess.run(command, env={**defaults, **env}, check=True, capture_output=True, cwd=ROOT)
    weights = torch.load(log_dir / "classifier" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    environment = json.loads(next((log_dir / "classifier").glob("version_*/environment.json")).read_text())
    return weights, environment


def compare(cfg: DictConfig) -> list[dict]:
    """One row per variant: its settings, the kernels and threads it ran with, its largest weight difference."""
    runs, rows = {}, []
    with tempfile.TemporaryDirectory() as scratch:
        for name, variant in cfg.variants.items():
            env = {str(k): str(v) for k, v in variant.env.items()}
            weights, environment = train(cfg, env, Path(scratch) / name)
            runs[name] = weights
            row = {"variant": name, "env": env, "cpu_capability": environment["cpu_capability"]}
            row["threads"] = environment["num_threads"]
            if variant.against is not None:
                other = runs[variant.against]
                row["against"] = variant.against
                row["max_abs_difference"] = max((weights[k] - other[k]).abs().max().item() for k in weights)
            rows.append(row)
    return rows


def markdown(rows: list[dict], cfg: DictConfig) -> str:
    lines = [
        f"Smoke classifier, {cfg.steps} steps on {cfg.num_train} phantoms, seed 0; each run in its own process.",
        "",
        "| run | environment | kernels | threads | against | largest weight difference |",
        "|---|---|---|---:|---|---:|",
    ]
    for row in rows:
        env = " ".join(f"{k}={v}" for k, v in row["env"].items()) or "this machine's defaults"
        difference = row.get("max_abs_difference")
        shown = "-" if difference is None else ("0 (bit-identical)" if difference == 0 else f"{difference:.2g}")
        lines.append(
            f"| {row['variant']} | {env} | {row['cpu_capability']} | {row['threads']} | {row.get('against', '-')} "
            f"| {shown} |"
        )
    return "\n".join(lines) + "\n"
