"""The attribution run (experiments/counterfactual_attribution.py): every method on a dataset split or a folder of
images, the maps and counterfactuals written per image, scored against lesion masks when the data has them.

In order: ``check_config`` (the run's own keys) and ``build_methods`` (each method's settings, ``methods/``) before
anything loads; ``load_inputs`` (data: unreadable inputs and missing roots fail here) and ``plan`` (the units); then
``AttributionTask`` on every device (``runs/units.py``: each unit once, committed as it finishes, so a killed run
resumes) and ``merge`` with ``summarize`` + ``markdown``; or ``tune`` (grid search on the validation split, one
process).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, Subset
from torchmetrics import MeanMetric
from torchmetrics.functional.classification import binary_average_precision
from tqdm import tqdm

from configs import instantiate
from datamodules.base import CXRDataModule, spread_indices, to_model_range, to_unit_range
from datamodules.folder import ImageFolder, collate_readable
from lightning_modules.attribution import attribution_map, normalize_per_image, signed_map
from lightning_modules.classifier import FindingClassifier
from lightning_modules.counterfactual_scores import CounterfactualScores
from lightning_modules.localization import OVERALL, LocalizationScores
from lightning_modules.methods import METHODS, Method, Models, build
from lightning_modules.metric_state import export_state, merge_state
from lightning_modules.overlays import save_array, save_gray_png, save_overlay
from lightning_modules.pipeline import LatentDiffusionPipeline
from lightning_modules.runs.units import Parts, UnitSampler, plan_units
from lightning_modules.settings import SamplingSettings

SCORED_KINDS = ("positive", "absolute")  # a signed map cannot be ranked as "lesion here"
SPLITS = ("train", "val", "test")


# 1. the request, checked before any model is loaded ----------------------------------------------------------------
def check_config(cfg: DictConfig) -> None:
    """The run's own keys (each method checks its block in ``build_methods``); ``ValueError`` lists every problem."""
    problems = []
    if not cfg.methods:
        problems.append("methods: none given")
    if cfg.map.kind not in SCORED_KINDS:
        problems.append(f"map.kind must be one of {SCORED_KINDS}, got {cfg.map.kind!r}")
    if not (cfg.map.sigma >= 0 and cfg.map.refined_sigma >= 0):
        problems.append(f"map.sigma, map.refined_sigma: pixels >= 0, got {cfg.map.sigma}, {cfg.map.refined_sigma}")
    if not Path(cfg.checkpoint).is_file():
        problems.append(f"checkpoint: no file at {cfg.checkpoint} (train one: make demo, or experiments/train.py)")
    if cfg.split not in SPLITS or cfg.tune.split not in SPLITS:
        problems.append(f"split and tune.split must be one of {SPLITS}")
    if cfg.tune.enabled and cfg.tune.split == "test":
        problems.append("tune.split=test: settings are never tuned on the test split (use val)")
    if cfg.batch_size < 1 or (cfg.num_images is not None and cfg.num_images < 1):
        problems.append("batch_size and num_images must be positive")
    if problems:
        raise ValueError("\n  ".join(["bad configuration:", *problems]))


def build_methods(cfg: DictConfig, defaults: SamplingSettings) -> dict[str, Method]:
    """Every method of ``cfg.methods`` (duplicates once), its settings validated; ``defaults``: the checkpoint's."""
    return {name: build(name, cfg, defaults) for name in dict.fromkeys(cfg.methods)}


def map_sigma_key(method: str) -> str:
    """The ``map`` key that smooths ``method``'s map: refined's own (its map is zero outside its edit mask), else
    the shared one."""
    return "refined_sigma" if method == "refined" else "sigma"


def map_sigma(cfg: DictConfig, method: str) -> float:
    """The smoothing of ``method``'s map in pixels."""
    return cfg.map[map_sigma_key(method)]


@dataclass
class Trial:
    method: str
    values: dict  # the grid point: setting -> value
    instance: Method


def tuning_trials(cfg: DictConfig, defaults: SamplingSettings) -> list[Trial]:
    """Every grid point of ``tune.<method>`` for the requested methods that have a grid, built (validated) now."""
    trials = []
    for name in (m for m in dict.fromkeys(cfg.methods) if m in METHODS and METHODS[m].counterfactual):
        grid = OmegaConf.to_container(OmegaConf.select(cfg.tune, name) or {})
        if not grid:
            continue
        for values in itertools.product(*grid.values()):
            point = dict(zip(grid, values, strict=True))
            trials.append(Trial(name, point, build(name, cfg, defaults, **point)))
    return trials


# 2. data ----------------------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    dataset: Dataset  # the split scored (or tuned on), or an ImageFolder of the user's files
    datamodule: CXRDataModule | None  # the data's DataModule, when any split of it is used
    finding_names: tuple[str, ...]
    notes: list[str] = field(default_factory=list)


def load_inputs(cfg: DictConfig, image_size: int, methods: dict[str, Method]) -> Inputs:
    """The images to run on; ``image_size``: the checkpoint's. Sets ``cfg.data.image_size`` to it (noted)."""
    datamodule, notes = None, []
    if cfg.input is None or cfg.tune.enabled or any(m.needs_train_split for m in methods.values()):
        if "image_size" in cfg.data and cfg.data.image_size != image_size:
            notes.append(f"data.image_size set to {image_size}, the size the model was trained on")
            cfg.data.image_size = image_size
        datamodule = instantiate(cfg.data)
    if cfg.input is None or cfg.tune.enabled:
        dataset = datamodule.dataset(cfg.tune.split if cfg.tune.enabled else cfg.split)
    else:
        dataset = ImageFolder(cfg.input, image_size, cfg.resize)
        notes += dataset.notes
    finding_names = tuple(datamodule.finding_names) if datamodule is not None else ()
    return Inputs(dataset, datamodule, finding_names, notes)


def plan(cfg: DictConfig, inputs: Inputs) -> list[list[int]]:
    """The run's units (batches of dataset indices): ``num_images`` spread evenly over a split (every class its share
    in class-ordered datasets), the first ``num_images`` of a folder."""
    dataset = inputs.dataset
    if isinstance(dataset, ImageFolder):
        indices = list(range(len(dataset) if cfg.num_images is None else min(cfg.num_images, len(dataset))))
    else:
        indices = spread_indices(len(dataset), cfg.num_images)
    return plan_units(indices, cfg.batch_size)


def dataset_batches(dataset: Dataset, indices: list[int], batch_size: int, num_workers: int) -> Iterator[dict]:
    """The samples at ``indices``, in order, each batch with the samples' ``index`` into ``dataset``."""
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for start, batch in zip(range(0, len(indices), batch_size), loader, strict=True):
        batch["index"] = indices[start : start + len(batch["id"])]
        yield batch


def finding_masks(dataset: Dataset, batch: dict, names: tuple[str, ...]) -> torch.Tensor | None:
    """(B, K, H, W) one mask per finding type, when the dataset renders them (the phantoms), else None."""
    if not hasattr(dataset, "phantom") or "index" not in batch:
        return None
    masks = [[dataset.phantom(i).finding_mask(kind) for kind in names] for i in batch["index"]]
    return torch.from_numpy(np.array(masks, dtype=bool))


def scored_rows(batch: dict) -> torch.Tensor:
    """(B,) abnormal images with a known lesion mask: the ones localization is scored on."""
    if "label" not in batch:
        return torch.zeros(len(batch["id"]), dtype=torch.bool)
    has_mask = batch["has_mask"].bool() if "has_mask" in batch else batch["mask"].flatten(1).any(1)
    return batch["label"].bool().any(1) & has_mask


def select(batch: dict, rows: torch.Tensor) -> dict:
    """The ``rows`` (B,) bool of every tensor and list of a batch."""
    keep = rows.tolist()
    return {
        k: v[rows] if torch.is_tensor(v) else [x for x, on in zip(v, keep, strict=True) if on] for k, v in batch.items()
    }


# 3. models --------------------------------------------------------------------------------------------------------
def has_classifier(cfg: DictConfig) -> bool:
    return cfg.classifier_checkpoint is not None and Path(cfg.classifier_checkpoint).is_file()


def drop_unavailable(cfg: DictConfig, methods: dict[str, Method], notes: list[str]) -> None:
    """Without the classifier checkpoint, validity and the methods that need it are skipped, and said so."""
    if has_classifier(cfg) or cfg.tune.enabled:
        return
    notes.append(
        f"no classifier checkpoint ({cfg.classifier_checkpoint}; train one with experiments/train_classifier.py): "
        "saliency baseline and validity skipped"
    )
    for name in [n for n, m in methods.items() if m.needs_classifier]:
        del methods[name]


def load_models(cfg: DictConfig, methods: dict[str, Method], inputs: Inputs, device: str | torch.device) -> Models:
    """The pipeline on ``device``, the classifier (when there is one; not when tuning) and what the methods need;
    each method is prepared."""
    pipeline = LatentDiffusionPipeline.from_checkpoint(
        cfg.checkpoint, device, compile=cfg.compile, allow_frozen_mismatch=cfg.allow_frozen_mismatch
    )
    classifier = None
    if has_classifier(cfg) and not cfg.tune.enabled:
        classifier = FindingClassifier.from_checkpoint(cfg.classifier_checkpoint, map_location=device).eval()
    models = Models(pipeline, classifier)
    if cfg.tune.enabled:
        return models
    if any(m.needs_train_split for m in methods.values()):
        models.train_split = inputs.datamodule.dataset("train")
    for method in methods.values():
        method.prepare(models)
    return models


# 4. one method on one batch ---------------------------------------------------------------------------------------
@dataclass
class Attribution:
    counterfactual01: torch.Tensor | None  # (B, 1, H, W) in [0, 1]
    map: torch.Tensor  # (B, 1, H, W) non-negative: grey-level units for counterfactual methods
    latent_error: torch.Tensor | None = None  # (B,) the reconstruction baseline's round trip
    weighted: bool = False  # the map is the difference times the method's weight (refined: its first map)


def attribute(
    method: Method,
    images: torch.Tensor,
    models: Models,
    seed: int,
    kind: str,
    sigma: float,
    prompts: list[str] | None = None,
) -> Attribution:
    """``images`` (B, 1, H, W) in [-1, 1]. A counterfactual method's map is ``kind`` of x - x_cf (times the method's
    ``weight``, if it gives one), any other's its own scores; both smoothed by ``sigma``. Every method gets its own
    generator from ``seed``, so adding or dropping a method never changes another's output."""
    output = method(images, models, torch.Generator("cpu").manual_seed(seed), prompts)
    if not method.counterfactual:
        return Attribution(None, attribution_map(output.map.cpu(), "absolute", sigma), output.latent_error)
    counterfactual01 = to_unit_range(output.counterfactual.cpu())
    maps = attribution_map(signed_map(to_unit_range(images.cpu()), counterfactual01), kind, sigma)
    if output.weight is not None:
        maps = maps * output.weight.cpu()
    return Attribution(counterfactual01, maps, output.latent_error, weighted=output.weight is not None)


def abnormal_probability(models: Models, images: torch.Tensor) -> torch.Tensor | None:
    if models.classifier is None:
        return None
    with torch.no_grad():
        return models.classifier.abnormal_probability(images.to(models.pipeline.device)).detach().cpu()


# 5. the run: its units on every device, then merged -------------------------------------------------------------
class AttributionTask(L.LightningModule):
    """Every method on one unit per ``predict_step``: its outputs (written by ``write_unit``) and its part of the
    results (CSV rows and metric states, merged by ``merge``). Each rank loads the models on its own device."""

    def __init__(self, cfg: DictConfig, methods: dict[str, Method], inputs: Inputs, units: list[list[int]]):
        super().__init__()
        self.cfg, self.methods, self.inputs, self.units = cfg, methods, inputs, units
        self.parts = Parts(Path(cfg.output_dir))

    def setup(self, stage: str) -> None:
        self.models = load_models(self.cfg, self.methods, self.inputs, self.trainer.strategy.root_device)

    def predict_dataloader(self) -> DataLoader:
        self.pending = self.parts.pending(len(self.units), self.trainer.global_rank, self.trainer.world_size)
        folder = isinstance(self.inputs.dataset, ImageFolder)
        return DataLoader(
            self.inputs.dataset,
            batch_sampler=UnitSampler(self.units, self.pending),
            collate_fn=collate_readable if folder else None,
            num_workers=0 if folder else self.inputs.datamodule.num_workers,
        )

    def transfer_batch_to_device(self, batch: dict, device: torch.device, dataloader_idx: int) -> dict:
        return batch  # the methods move the images; masks and labels are scored on the CPU

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        unit = self.pending[batch_idx]
        cfg, models, names, dataset = self.cfg, self.models, self.inputs.finding_names, self.inputs.dataset
        skipped = batch.pop("skipped", [])
        localization = LocalizationScores(list(self.methods), names, cfg.metrics.thresholds)
        counterfactual = {n: CounterfactualScores() for n, m in self.methods.items() if m.counterfactual}
        sensitivity, latent_error = MeanMetric(), MeanMetric()
        result = {"unit": unit, "ids": batch["id"], "prompts": batch.get("prompt"), "outputs": {}}
        if not batch["id"]:  # every file of the unit failed to decode
            result["part"] = {"rows": [], "skipped": skipped, "labelled": False}
            return result
        if not isinstance(dataset, ImageFolder):
            batch["index"] = self.units[unit]
        images, ids = batch["image"], batch["id"]
        images01 = to_unit_range(images)
        scored = scored_rows(batch)
        abnormal = batch["label"].bool().any(1) if "label" in batch else None
        per_type = finding_masks(dataset, batch, names) if scored.any() else None
        p_input = abnormal_probability(models, images)
        if p_input is not None and abnormal is not None and abnormal.any():
            sensitivity.update((p_input[abnormal] >= cfg.metrics.abnormal_threshold).float())
        rows = [base_row(batch, i, names, bool(scored[i]), p_input) for i in range(len(ids))]
        for name, method in self.methods.items():
            output = attribute(
                method, images, models, cfg.seed + unit, cfg.map.kind, map_sigma(cfg, name), batch.get("prompt")
            )
            result["outputs"][name] = output
            scores01 = normalize_per_image(output.map)
            if output.latent_error is not None:
                latent_error.update(output.latent_error)
            p_cf = None
            if output.counterfactual01 is not None:
                p_cf = abnormal_probability(models, to_model_range(output.counterfactual01))
                if abnormal is not None:
                    counterfactual[name].update(
                        images01,
                        output.counterfactual01,
                        abnormal,
                        p_cf,
                        to_unit_range(batch["healthy"]) if "healthy" in batch else None,
                        cfg.metrics.abnormal_threshold,
                    )
            if scored.any():
                localization.update(
                    name,
                    scores01[scored],
                    batch["mask"][scored],
                    batch["label"][scored],
                    per_type[scored] if per_type is not None else None,
                )
            for i, row in enumerate(rows):  # every row gets every column (empty when n/a): stable order
                row[f"{name}_map_mean"] = round(float(output.map[i].mean()), 6)
                row[f"{name}_map_max"] = round(float(output.map[i].max()), 6)
                if output.counterfactual01 is not None:
                    row[f"{name}_change"] = round(float((images01[i] - output.counterfactual01[i]).abs().mean()), 6)
                    row[f"{name}_p_abnormal"] = None if p_cf is None else round(float(p_cf[i]), 6)
                if "mask" in batch:
                    auprc = binary_average_precision(scores01[i].flatten(), batch["mask"][i].flatten().long())
                    row[f"{name}_auprc"] = round(float(auprc), 6) if scored[i] else None
        result["images01"] = images01
        result["part"] = {
            "rows": rows,
            "skipped": skipped,
            "labelled": "label" in batch,
            "counts": {
                "images": len(ids),
                "abnormal": int(abnormal.sum()) if abnormal is not None else 0,
                "scored": int(scored.sum()),
            },
            "localization": localization.state(),
            "counterfactual": {n: s.state() for n, s in counterfactual.items()},
            "sensitivity": export_state(sensitivity),
            "latent_error": export_state(latent_error),
        }
        return result


def write_unit(cfg: DictConfig, result: dict) -> None:
    """A unit's files: every method's map, counterfactual and overlay per image."""
    for name, output in result["outputs"].items():
        write_outputs(Path(cfg.output_dir), name, result["ids"], result["images01"], output, cfg, result["prompts"])


def merge(cfg: DictConfig, methods: dict[str, Method], inputs: Inputs, parts: Iterator[dict]) -> tuple[list, dict]:
    """The committed parts, in unit order, as one run: the CSV rows and the scores; ``skipped``: (path, reason) of
    every input file that could not be read (the folder scan's, then the decoder's)."""
    skipped = list(inputs.dataset.skipped) if isinstance(inputs.dataset, ImageFolder) else []
    localization = LocalizationScores(list(methods), inputs.finding_names, cfg.metrics.thresholds)
    counterfactual = {n: CounterfactualScores() for n, m in methods.items() if m.counterfactual}
    sensitivity = MeanMetric()  # abnormal inputs the classifier calls abnormal: what validity is measured against
    latent_error = MeanMetric()  # the reconstruction baseline's round trip, healthy and abnormal inputs alike
    rows, labelled, counts = [], False, {"images": 0, "abnormal": 0, "scored": 0}
    for part in parts:
        rows += part["rows"]
        skipped += [tuple(s) for s in part["skipped"]]
        if not part["rows"]:
            continue
        labelled = labelled or part["labelled"]
        for key, value in part["counts"].items():
            counts[key] += value
        localization.merge(part["localization"])
        for name, state in part["counterfactual"].items():
            counterfactual[name].merge(state)
        merge_state(sensitivity, part["sensitivity"])
        merge_state(latent_error, part["latent_error"])
    if sensitivity.update_count:
        counts["classifier_sensitivity"] = float(sensitivity.compute())
    if latent_error.update_count:
        counts["reconstruction_latent_error"] = float(latent_error.compute())
    results = {
        "counts": counts,
        "labelled": labelled,
        "localization": localization.compute(),
        "counterfactual": {n: s.compute() for n, s in counterfactual.items()},
        "skipped": skipped,
    }
    return rows, results


def base_row(batch: dict, i: int, finding_names: tuple[str, ...], scored: bool, p_input: torch.Tensor | None) -> dict:
    row = {"id": batch["id"][i]}
    if "path" in batch:
        row["path"] = batch["path"][i]
    if "prompt" in batch:
        row["prompt"] = batch["prompt"][i]
    if "label" in batch:
        row["findings"] = ";".join(n for n, on in zip(finding_names, batch["label"][i].tolist(), strict=True) if on)
    if "mask" in batch:
        row["lesion_fraction"] = round(float(batch["mask"][i].mean()), 6) if scored else None
    row["input_p_abnormal"] = None if p_input is None else round(float(p_input[i]), 6)
    return row


def write_outputs(
    out: Path,
    method: str,
    ids: list[str],
    images01: torch.Tensor,
    output: Attribution,
    cfg: DictConfig,
    prompts: list[str] | None,
) -> None:
    difference_map = output.counterfactual01 is not None
    for i, sample_id in enumerate(ids):
        heat = output.map[i, 0].numpy()
        save_array(out / "maps" / method / f"{sample_id}.npy", heat)
        cf = output.counterfactual01[i, 0].numpy() if difference_map else None
        if cf is not None:
            save_gray_png(out / "counterfactuals" / method / f"{sample_id}.png", cf)
        if method in cfg.overlays.methods:
            label = (
                (
                    {"positive": "denser than counterfactual", "absolute": "|input - counterfactual|"}[cfg.map.kind]
                    + (" x first map" if output.weighted else "")
                    + " (grey fraction)"
                )
                if difference_map
                else f"{method} score"
            )
            title = f"{sample_id}: {prompts[i]}" if prompts else sample_id
            save_overlay(
                out / "overlays" / method / f"{sample_id}.png",
                images01[i, 0].numpy(),
                heat,
                cf,
                title=title,
                label=label,
                vmax=cfg.overlays.vmax if difference_map else None,
                cmap=cfg.overlays.cmap,
            )


# 6. reports -------------------------------------------------------------------------------------------------------
def summarize(cfg: DictConfig, results: dict, methods: list[str], notes: list[str]) -> dict:
    localization, counterfactual = results["localization"], results["counterfactual"]
    summary_methods = {}
    for method in methods:
        entry = {
            k: v
            for k, v in localization.get(method, {}).get(OVERALL, {}).items()
            if k in ("auprc", "auroc", "dice", "threshold")
        }
        entry.update(counterfactual.get(method, {}))
        summary_methods[method] = entry
    return {
        "checkpoint": cfg.checkpoint,
        "classifier_checkpoint": cfg.classifier_checkpoint,
        "data": cfg.data.name if cfg.input is None else None,
        "input": cfg.input,
        "split": cfg.split,
        **{k: v for k, v in results["counts"].items()},
        "settings": {
            key: OmegaConf.to_container(cfg[key]) for key in (*(n for n in METHODS if n in cfg), "map", "baselines")
        },
        "methods": summary_methods,
        "per_finding": {m: {g: v for g, v in groups.items() if g != OVERALL} for m, groups in localization.items()},
        "notes": notes,
    }


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown(summary: dict, finding_names: tuple[str, ...]) -> str:
    lines = [
        f"Scored: {summary['scored']} abnormal images with masks of {summary['images']} "
        f"({summary['abnormal']} abnormal). Maps scaled to [0, 1] per image; pixels pooled over images.",
        "",
        "| method | AUPRC | AUROC | Dice | validity | minimality | distance to true healthy |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, m in summary["methods"].items():
        lines.append(
            f"| {method} | {fmt(m.get('auprc'))} | {fmt(m.get('auroc'))} | {fmt(m.get('dice'))} | "
            f"{fmt(m.get('validity'))} | {fmt(m.get('minimality'))} | {fmt(m.get('twin_distance'))} |"
        )
    present = [n for n in finding_names if any(n in g for g in summary["per_finding"].values())]
    if present:
        lines += [
            "",
            "Per finding type, AUPRC / Dice (images with that type; other findings' pixels ignored):",
            "",
            "| method | " + " | ".join(f"{n} (n={first_count(summary, n)})" for n in present) + " |",
            "|---|" + "---|" * len(present),
        ]
        for method, groups in summary["per_finding"].items():
            cells = [f"{fmt(groups[n]['auprc'])} / {fmt(groups[n]['dice'])}" if n in groups else "-" for n in present]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "validity: share of abnormal inputs whose counterfactual the classifier calls healthy; minimality: "
        "mean |x - x_cf| on healthy inputs; distance to true healthy: mean |x_cf - x_healthy| on abnormal "
        "inputs (grey range [0, 1]).",
    ]
    if "classifier_sensitivity" in summary:
        lines.append(f"The classifier calls {summary['classifier_sensitivity']:.1%} of the abnormal inputs abnormal.")
    if "reconstruction_latent_error" in summary:
        settings = summary["settings"]
        method = settings["baselines"]["reconstruction"]["method"]
        lines.append(
            f"Reconstruction baseline ({method} {settings[method]}, guidance 0): relative latent error "
            f"||z_rec - z_0|| / ||z_0|| = {summary['reconstruction_latent_error']:.4f} on average."
        )
    lines += [f"note: {n}" for n in summary["notes"]]
    return "\n".join(lines) + "\n"


def first_count(summary: dict, finding: str) -> int:
    return next(g[finding]["images"] for g in summary["per_finding"].values() if finding in g)


# 7. tuning on the validation split --------------------------------------------------------------------------------
def tune(cfg: DictConfig, models: Models, trials: list[Trial], inputs: Inputs, out: Path) -> dict:
    """Grid search of ``trials`` (our methods' settings) and the map on ``tune.split`` by pixel AUPRC of abnormal
    images; writes ``tune.json`` and returns its content."""
    dataset, finding_names = inputs.dataset, inputs.finding_names
    first = range(min(cfg.tune.num_images, len(dataset)))
    batches = [b for b in dataset_batches(dataset, list(first), cfg.batch_size, 0) if scored_rows(b).any()]
    batches = [select(b, scored_rows(b)) for b in batches]
    maps = list(itertools.product(cfg.tune.map.kind, cfg.tune.map.sigma))
    results = []
    for trial in trials:
        scores = LocalizationScores([f"{k}:{s}" for k, s in maps], finding_names, cfg.metrics.thresholds)
        for b, batch in enumerate(tqdm(batches, desc=f"tune {trial.method} {trial.values}", disable=not cfg.progress)):
            output = trial.instance(batch["image"], models, torch.Generator("cpu").manual_seed(cfg.seed + b))
            signed = signed_map(to_unit_range(batch["image"]), to_unit_range(output.counterfactual.cpu()))
            for kind, sigma in maps:
                scores.update(
                    f"{kind}:{sigma}",
                    normalize_per_image(attribution_map(signed, kind, sigma)),
                    batch["mask"],
                    batch["label"],
                )
        for key, groups in scores.compute().items():
            kind, sigma = key.split(":")
            results.append(
                {
                    "method": trial.method,
                    **trial.values,
                    "map.kind": kind,
                    "map.sigma": float(sigma),
                    **{k: groups[OVERALL][k] for k in ("auprc", "auroc", "dice")},
                }
            )
    best = {
        m: max((t for t in results if t["method"] == m), key=lambda t: t["auprc"])
        for m in dict.fromkeys(t["method"] for t in results)
    }
    report = {"split": cfg.tune.split, "images": sum(len(b["id"]) for b in batches), "best": best, "trials": results}
    (out / "tune.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def best_settings(report: dict) -> list[str]:
    """One line per tuned method: its best AUPRC and the command-line overrides that select its settings."""
    lines = []
    for method, best in report["best"].items():
        overrides = " ".join(
            f"{method}.{k}={v}"
            for k, v in best.items()
            if k not in ("method", "auprc", "auroc", "dice", "map.kind", "map.sigma")
        )
        lines.append(
            f"best {method} on {report['split']} ({report['images']} abnormal images): AUPRC "
            f"{best['auprc']:.3f}  ->  {overrides} map.kind={best['map.kind']} "
            f"map.{map_sigma_key(method)}={best['map.sigma']}"
        )
    return lines
