"""Generation quality of a stage-2 checkpoint in the layout of VALD-MD's tables: per class and overall, FID, SSIM and
MS-SSIM of generated vs real images and of healthy counterfactuals vs their inputs, with the settings beside them.

    python experiments/evaluate.py [checkpoint=...] [data=covid_radiography data.root=...] [num_images=null] \
        [counterfactual.method=inversion] [fid.inception_weights=/path/to/weights-inception-2015-12-05-6726825d.pth]

Writes ``<output_dir>/metrics.json`` and ``<output_dir>/metrics.md`` (the table, also printed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from configs import instantiate
from experiments.runner import load_config
from lightning_modules.metrics import (NORMAL, OVERALL, PAIRS, GenerationMetrics, build_extractors,
                                       evaluation_images, find_inception_weights, image_groups, spread_indices)
from lightning_modules.pipeline import METHODS, CounterfactualPipeline

SPLITS = ("train", "val", "test")
TITLES = {"generated": "Generated vs real (prompted with each real image's own prompt)",
          "counterfactual": "Healthy counterfactual vs its input"}


# 1. check the request before anything is loaded ---------------------------------------------------------------------
def check_config(cfg: DictConfig) -> None:
    problems = []
    if not Path(cfg.checkpoint).is_file():
        problems.append(f"checkpoint: no file at {cfg.checkpoint} (train one with `make train` or `make demo`)")
    if cfg.split not in SPLITS:
        problems.append(f"split '{cfg.split}' is not one of {', '.join(SPLITS)}")
    if cfg.num_images is not None and cfg.num_images < 1 or cfg.batch_size < 1:
        problems.append(f"num_images (or null) and batch_size must be >= 1, got {cfg.num_images}, {cfg.batch_size}")
    cf = cfg.counterfactual
    if cf.method not in METHODS:
        problems.append(f"counterfactual.method '{cf.method}' is not one of {', '.join(METHODS)}")
    if not 0 < cf.strength <= 1 or not 0 < cf.inversion_depth <= 1:
        problems.append("counterfactual.strength and counterfactual.inversion_depth must be in (0, 1]")
    if cf.num_inference_steps < 1 or cfg.generation.num_inference_steps < 1:
        problems.append("num_inference_steps must be >= 1")
    if cfg.fid.inception is True or cfg.fid.inception_weights:
        try:
            find_inception_weights(cfg.fid.inception_weights)
        except FileNotFoundError as err:
            problems.append(str(err))
    if problems:
        raise SystemExit("evaluate: " + "\n  ".join(["cannot run:", *problems]))


def device_of(accelerator: str) -> torch.device:
    cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if cuda else "cpu")


# 2. measure ---------------------------------------------------------------------------------------------------------
def evaluate(cfg: DictConfig) -> dict[str, Any]:
    check_config(cfg)
    L.seed_everything(cfg.seed, verbose=False)
    try:
        datamodule = instantiate(cfg.data)
        dataset = datamodule.dataset(cfg.split)
    except (FileNotFoundError, ValueError) as err:  # a missing root, an unknown class...: before any model loads
        raise SystemExit(f"evaluate: data: {err}") from None
    indices = spread_indices(len(dataset), cfg.num_images)
    if not indices:
        raise SystemExit(f"evaluate: the {cfg.split} split of {cfg.data.name} is empty")
    loader = DataLoader(Subset(dataset, indices), batch_size=cfg.batch_size, num_workers=datamodule.num_workers)

    device = device_of(cfg.device)
    pipeline = CounterfactualPipeline.from_checkpoint(cfg.checkpoint, device, normal_prompt=datamodule.normal_prompt)
    extractors, skipped = build_extractors(cfg.fid.inception, cfg.fid.inception_weights, cfg.classifier_checkpoint)
    metrics = GenerationMetrics((NORMAL, *datamodule.finding_names), datamodule.image_size, extractors).to(device)
    generation = OmegaConf.to_container(cfg.generation, resolve=True)
    counterfactual = OmegaConf.to_container(cfg.counterfactual, resolve=True)

    for batch in tqdm(loader, desc=f"evaluate {cfg.split}", unit="batch"):
        real = batch["image"].to(device)
        fakes = evaluation_images(pipeline, {**batch, "image": real}, generation, counterfactual, cfg.seed)
        metrics.update(real, image_groups(batch["label"], datamodule.finding_names), **fakes)

    results = metrics.compute()
    for values in results.values():  # a skipped FID stays in the table as null, its reason in "notes"
        for pair in metrics.pairs:
            values[pair].update({name: None for name in skipped})
    return {
        "checkpoint": str(cfg.checkpoint), "data": cfg.data.name, "split": cfg.split, "num_images": len(indices),
        "image_size": datamodule.image_size,
        "settings": {
            "generated": {**generation, "prompts": "each real image's own prompt"},
            "counterfactual": {**counterfactual, "target_prompt": pipeline.normal_prompt},
            "seed": cfg.seed, "noise": "per image: seed + crc32(image id)",
            "scheduler": "DDIM", **metrics.settings(),
        },
        "notes": [f"{name} skipped: {reason}" for name, reason in skipped.items()],
        "results": results,
    }


# 3. report ----------------------------------------------------------------------------------------------------------
def _cell(value: float | None, digits: str) -> str:
    return "n/a" if value is None else format(value, digits)


def markdown(report: dict[str, Any]) -> str:
    """The VALD-MD-style table: one per comparison, a row per class then overall, settings underneath."""
    settings, results = report["settings"], report["results"]
    fids = [("fid", "FID (Inception) ↓"), ("fid_domain", "FID (domain) ↓")]
    header = ["Class", "n", *(title for _, title in fids), "SSIM ↑", "MS-SSIM ↑"]
    ms = settings["ms_ssim"]
    extractors = settings["fid_extractors"]
    lines = [f"# Generation quality: {report['data']} {report['split']}, {report['num_images']} images "
             f"({report['image_size']} px)", "", f"Checkpoint `{report['checkpoint']}`.", ""]
    for pair in PAIRS:
        lines += [f"## {TITLES[pair]}", "", "| " + " | ".join(header) + " |",
                  "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        for group in [*(g for g in results if g != OVERALL), OVERALL]:
            row = results[group]
            values = row[pair]
            name = f"**{group}**" if group == OVERALL else group
            lines.append("| " + " | ".join([
                name, str(row["n"]), *(_cell(values.get(key), ".4g") for key, _ in fids),
                _cell(values["ssim"], ".4f"), _cell(values["ms_ssim"], ".4f")]) + " |")
        s = settings[pair]
        if pair == "generated":
            how = f"prompts: {s['prompts']}; DDIM steps {s['num_inference_steps']}, guidance {s['guidance_scale']}"
        else:
            depth = f"strength {s['strength']}" if s["method"] == "sdedit" else \
                f"inversion depth {s['inversion_depth']}"
            how = (f"method {s['method']}, DDIM steps {s['num_inference_steps']}, guidance {s['guidance_scale']}, "
                   f"{depth}; target prompt \"{s['target_prompt']}\"")
        lines += ["", f"Settings: {how}; seed {settings['seed']} ({settings['noise']}).", ""]
    lines += ["FID extractors: " + ("; ".join(f"`{k}` = {v}" for k, v in extractors.items()) or "none") + ". "
              "FID (domain) is on the classifier's feature scale, not comparable with Inception FIDs.",
              f"MS-SSIM: {ms['scales']} scales, {ms['kernel_size']}-px Gaussian window (sigma {ms['sigma']:.3g}), "
              "exponents " + ", ".join(f"{b:.3f}" for b in ms["betas"]) + " (Wang et al.'s first scales, "
              "renormalised). SSIM/MS-SSIM pairs: each generated image with the real image whose prompt it got; "
              "each counterfactual with its input. Classes: Normal = no finding; an image with several findings "
              "counts in each.", ""]
    lines += [f"Note: {note}" for note in report["notes"]]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = load_config("evaluate", argv)
    report = evaluate(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (out / "metrics.md").write_text(table)
    print(table)
    print(f"wrote {out / 'metrics.json'} and {out / 'metrics.md'}")
    return report


if __name__ == "__main__":
    main()
