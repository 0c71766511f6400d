"""The evaluation run behind ``experiments/evaluate.py``: generation quality of a stage-2 checkpoint in the layout of
VALD-MD's tables, and prompt fidelity.

1. ``prepare``: check the request, build (= validate) the settings, the data and the images to use; no model yet.
2. ``EvaluationTask`` on every device (``runs/units.py``: each unit once, committed, resumable): generated images and
   healthy counterfactuals (``evaluation_images``, each image from its own seed) measured per image; ``merge``: FID /
   SSIM / MS-SSIM per class (``GenerationMetrics``) and prompt fidelity from the parts in order -> the report.
3. ``markdown``: the report as tables, with the settings used underneath.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning_utilities.core.apply_func import apply_to_collection
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from configs import instantiate
from datamodules.base import CXRDataModule, spread_indices
from lightning_modules.classifier import ABNORMAL, CALLED, FindingClassifier
from lightning_modules.fid import build_extractors, find_inception_weights
from lightning_modules.generation_metrics import (
    NORMAL,
    OVERALL,
    PAIRS,
    GenerationMetrics,
    evaluation_images,
    image_groups,
)
from lightning_modules.pipeline import LatentDiffusionPipeline
from lightning_modules.prompt_fidelity import prompt_fidelity
from lightning_modules.runs.cli import checkpoint_sampling
from lightning_modules.runs.units import Parts, UnitSampler
from lightning_modules.settings import CounterfactualSettings, SamplingSettings, counterfactual_settings

SPLITS = ("train", "val", "test")
TITLES = {
    "generated": "Generated vs real (prompted with each real image's own prompt)",
    "counterfactual": "Healthy counterfactual vs its input",
}


@dataclass
class Request:
    """Everything an evaluation needs but the models, checked."""

    generation: SamplingSettings
    counterfactual: CounterfactualSettings
    datamodule: CXRDataModule
    dataset: Dataset  # the split's
    indices: list[int]  # the images to use, spread over ``dataset``


# 1. check the request before anything is loaded ---------------------------------------------------------------------
def check_settings(cfg: DictConfig) -> tuple[SamplingSettings, CounterfactualSettings]:
    """The ``generation`` and ``counterfactual`` settings over the checkpoint's defaults; every problem found (not
    only the first) in one ValueError."""
    problems = []
    defaults = None
    try:
        defaults = checkpoint_sampling(cfg.checkpoint)
    except ValueError as err:
        problems.append(str(err))
    if cfg.split not in SPLITS:
        problems.append(f"split '{cfg.split}' is not one of {', '.join(SPLITS)}")
    if cfg.num_images is not None and cfg.num_images < 1 or cfg.batch_size < 1:
        problems.append(f"num_images (or null) and batch_size must be >= 1, got {cfg.num_images}, {cfg.batch_size}")
    settings = []
    for name, build in (("generation", SamplingSettings.build), ("counterfactual", counterfactual_settings)):
        try:
            settings.append(build(defaults=defaults, **OmegaConf.to_container(cfg[name], resolve=True)))
        except (TypeError, ValueError) as err:  # TypeError: no method given
            problems.append(f"{name}: {err}")
    if cfg.fid.inception is True or cfg.fid.inception_weights:
        try:
            find_inception_weights(cfg.fid.inception_weights)
        except FileNotFoundError as err:
            problems.append(str(err))
    if problems:
        raise ValueError("cannot run: " + "; ".join(problems))
    return settings[0], settings[1]


def prepare(cfg: DictConfig) -> Request:
    """Settings, data and image indices, checked before any model loads; ValueError is a user error."""
    generation, counterfactual = check_settings(cfg)
    L.seed_everything(cfg.seed, verbose=False)
    try:
        datamodule = instantiate(cfg.data)
        dataset = datamodule.dataset(cfg.split)
    except (FileNotFoundError, ValueError) as err:  # a missing root, an unknown class...
        raise ValueError(f"data: {err}") from None
    indices = spread_indices(len(dataset), cfg.num_images)
    if not indices:
        raise ValueError(f"the {cfg.split} split of {cfg.data.name} is empty")
    return Request(generation, counterfactual, datamodule, dataset, indices)


# 2. measure ---------------------------------------------------------------------------------------------------------
def fidelity_columns(classifier: FindingClassifier, finding_names: Sequence[str]) -> tuple[list[int] | None, str]:
    """The classifier's output index of each of the data's findings, then of "abnormal"; or None and why not (a
    classifier trained on other findings still gives fid_domain its features, but cannot judge these prompts)."""
    try:
        return [classifier.index(name) for name in (*finding_names, ABNORMAL)], ""
    except ValueError as err:
        return None, (
            f"classifier_checkpoint was not trained on this data's findings ({err}); train one on it with "
            f"`make train-classifier DATA=...` and pass classifier_checkpoint="
        )


class EvaluationTask(L.LightningModule):
    """One unit of images per ``predict_step``: its samples and counterfactuals measured per image (features,
    SSIM, MS-SSIM, the classifier's scores), kept as the unit's part; ``merge`` adds the parts up in unit order."""

    def __init__(self, cfg: DictConfig, request: Request, units: list[list[int]]):
        super().__init__()
        self.cfg, self.request, self.units = cfg, request, units
        self.parts = Parts(Path(cfg.output_dir))

    def setup(self, stage: str) -> None:
        cfg, datamodule, device = self.cfg, self.request.datamodule, self.trainer.strategy.root_device
        self.pipeline = LatentDiffusionPipeline.from_checkpoint(
            cfg.checkpoint, device, compile=cfg.compile, allow_frozen_mismatch=cfg.allow_frozen_mismatch
        )
        self.target_prompt = datamodule.normal_prompt or self.pipeline.normal_prompt  # the pipeline's fallback
        self.scorer = Scorer(cfg, datamodule).to(device)

    def predict_dataloader(self) -> DataLoader:
        self.pending = self.parts.pending(len(self.units), self.trainer.global_rank, self.trainer.world_size)
        sampler = UnitSampler(self.units, self.pending)
        return DataLoader(self.request.dataset, batch_sampler=sampler, num_workers=self.request.datamodule.num_workers)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        request, scorer = self.request, self.scorer
        real = batch["image"].to(self.device)
        fakes = evaluation_images(
            self.pipeline,
            {**batch, "image": real},
            request.generation,
            request.counterfactual,
            self.cfg.seed,
            self.target_prompt,
        )
        to_cpu = lambda tree: apply_to_collection(tree, torch.Tensor, lambda t: t.detach().cpu())  # noqa: E731
        part = {
            "measured": to_cpu(scorer.metrics.measure(real, **fakes)),
            "groups": image_groups(batch["label"], request.datamodule.finding_names),
        }
        if scorer.columns is not None:
            part["scores"] = {
                images: scorer.classifier.probabilities(x)[:, scorer.columns].cpu()
                for images, x in (("generated", fakes["generated"]), ("real", real))
            }
            part["labels"] = batch["label"].cpu()
            if "label_mask" in batch:
                part["label_mask"] = batch["label_mask"].cpu()
        return {"unit": self.pending[batch_idx], "part": part}


class Scorer(torch.nn.Module):
    """The FID extractors and ``GenerationMetrics`` built on them, and prompt fidelity's classifier columns."""

    def __init__(self, cfg: DictConfig, datamodule: CXRDataModule):
        super().__init__()
        extractors, self.skipped = build_extractors(
            cfg.fid.inception, cfg.fid.inception_weights, cfg.classifier_checkpoint
        )
        self.metrics = GenerationMetrics((NORMAL, *datamodule.finding_names), datamodule.image_size, extractors)
        # prompt fidelity reuses fid_domain's classifier, its outputs in the data's finding order then "abnormal"
        self.classifier = extractors["fid_domain"].classifier if "fid_domain" in extractors else None
        self.columns, self.no_fidelity = (
            fidelity_columns(self.classifier, datamodule.finding_names)
            if self.classifier is not None
            else (None, self.skipped.get("fid_domain", ""))
        )


def merge(cfg: DictConfig, request: Request, scorer: Scorer, parts: Iterator[dict], target_prompt: str) -> dict:
    """The parts in unit order as one run's report (metrics.json): a one-process run's numbers on any count."""
    datamodule, metrics = request.datamodule, scorer.metrics.cpu()
    scores: dict[str, list[torch.Tensor]] = {"generated": [], "real": []}  # (B, K + 1) per unit
    labels, label_masks = [], []
    for part in parts:
        metrics.add(part["measured"], part["groups"])
        if "scores" in part:
            for images in scores:
                scores[images].append(part["scores"][images])
            labels.append(part["labels"])
            label_masks += [part["label_mask"]] if "label_mask" in part else []
    results = metrics.compute()
    for values in results.values():  # a skipped FID stays in the table as null, its reason in "notes"
        for pair in metrics.pairs:
            values[pair].update({name: None for name in scorer.skipped})
    notes = [f"{name} skipped: {reason}" for name, reason in scorer.skipped.items()]
    fidelity = None
    if scorer.columns is None:
        notes.append(f"prompt_fidelity skipped: {scorer.no_fidelity}")
    else:
        fidelity = prompt_fidelity(
            {images: torch.cat(s) for images, s in scores.items()},
            torch.cat(labels),
            datamodule.finding_names,
            torch.cat(label_masks) if label_masks else None,
        )
    generation, counterfactual = request.generation, request.counterfactual
    return {
        "checkpoint": str(cfg.checkpoint),
        "data": cfg.data.name,
        "split": cfg.split,
        "num_images": len(request.indices),
        "image_size": datamodule.image_size,
        "settings": {  # as resolved: the YAML's values over the checkpoint's defaults
            "generated": {**generation.asdict(), "prompts": "each real image's own prompt"},
            "counterfactual": {
                "method": counterfactual.method,
                **counterfactual.asdict(),
                "target_prompt": target_prompt,
            },
            "seed": cfg.seed,
            "noise": "per image: seed + crc32(image id)",
            "scheduler": "DDIM",
            **metrics.settings(),
        },
        "notes": notes,
        "results": results,
        "prompt_fidelity": fidelity,
    }


# 3. report ----------------------------------------------------------------------------------------------------------
def _cell(value: float | None, digits: str) -> str:
    return "n/a" if value is None else format(value, digits)


def fidelity_markdown(report: dict[str, Any]) -> list[str]:
    """Per class: the classifier's mean output on samples whose prompt names it vs on the reference samples, the
    share it calls positive, the AUROC between them, and the same on the real images (the classifier's own ceiling)."""
    fidelity = report["prompt_fidelity"]
    if fidelity is None:
        return []
    header = [
        "Prompt names",
        "Classifier output",
        "n (vs reference)",
        "Samples: p prompted",
        f"called (p ≥ {CALLED:g})",
        "p reference",
        "AUROC",
        "Real: p prompted",
        "called (recall)",
        "p reference",
        "AUROC (ceiling)",
    ]
    lines = [
        "## Prompt fidelity of the generated images (finding classifier)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|",
    ]
    for name, row in fidelity.items():
        values = [
            _cell(row[images][key], ".3f")
            for images in ("generated", "real")
            for key in ("p_prompted", "called", "p_reference", "auroc")
        ]
        lines.append(
            "| "
            + " | ".join(
                [name, f"p({row['score']})", f"{row['n']} vs {row['n_reference']} {row['reference']}", *values]
            )
            + " |"
        )
    return lines + [
        "",
        "Samples: the generated images above, each prompted with its real image's prompt. A finding's "
        "row: samples whose prompt names it vs normal-prompted samples; Normal's row: p(abnormal) on "
        "normal-prompted samples vs on finding-prompted ones. AUROC: how well that output separates the "
        "two sets (finding side positive); on the real images, what the classifier itself reaches. Called: the "
        f"share of the prompted set at p ≥ {CALLED:g} (Normal's row: normal samples called abnormal); on the "
        "real images, the classifier's recall: what an induced finding as conspicuous as a real one would reach. "
        "An image with several findings counts for each.",
        "",
    ]


def markdown(report: dict[str, Any]) -> str:
    """The VALD-MD-style table: one per comparison, a row per class then overall, settings underneath."""
    settings, results = report["settings"], report["results"]
    fids = [("fid", "FID (Inception) ↓"), ("fid_domain", "FID (domain) ↓")]
    header = ["Class", "n", *(title for _, title in fids), "SSIM ↑", "MS-SSIM ↑"]
    ms = settings["ms_ssim"]
    extractors = settings["fid_extractors"]
    lines = [
        f"# Generation quality: {report['data']} {report['split']}, {report['num_images']} images "
        f"({report['image_size']} px)",
        "",
        f"Checkpoint `{report['checkpoint']}`.",
        "",
    ]
    for pair in PAIRS:
        lines += [
            f"## {TITLES[pair]}",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
        ]
        for group in [*(g for g in results if g != OVERALL), OVERALL]:
            row = results[group]
            values = row[pair]
            name = f"**{group}**" if group == OVERALL else group
            lines.append(
                "| "
                + " | ".join(
                    [
                        name,
                        str(row["n"]),
                        *(_cell(values.get(key), ".4g") for key, _ in fids),
                        _cell(values["ssim"], ".4f"),
                        _cell(values["ms_ssim"], ".4f"),
                    ]
                )
                + " |"
            )
        s = settings[pair]
        if pair == "generated":
            how = f"prompts: {s['prompts']}; DDIM steps {s['num_inference_steps']}, guidance {s['guidance_scale']}"
        else:
            depth = (
                f"strength {s['strength']}" if s["method"] == "sdedit" else f"inversion depth {s['inversion_depth']}"
            )
            how = (
                f"method {s['method']}, DDIM steps {s['num_inference_steps']}, guidance {s['guidance_scale']}, "
                f'{depth}; target prompt "{s["target_prompt"]}"'
            )
        lines += ["", f"Settings: {how}; seed {settings['seed']} ({settings['noise']}).", ""]
    lines += [
        "FID extractors: " + ("; ".join(f"`{k}` = {v}" for k, v in extractors.items()) or "none") + ". "
        "FID (domain) is on the classifier's feature scale, not comparable with Inception FIDs.",
        f"MS-SSIM: {ms['scales']} scales, {ms['kernel_size']}-px Gaussian window (sigma {ms['sigma']:.3g}), "
        "exponents " + ", ".join(f"{b:.3f}" for b in ms["betas"]) + " (Wang et al.'s first scales, "
        "renormalised). SSIM/MS-SSIM pairs: each generated image with the real image whose prompt it got; "
        "each counterfactual with its input. Classes: Normal = no finding; an image with several findings "
        "counts in each.",
        "",
    ]
    lines += fidelity_markdown(report)
    lines += [f"Note: {note}" for note in report["notes"]]
    return "\n".join(lines).rstrip() + "\n"
