"""Healthy counterfactuals and attribution maps for a folder, one image or a dataset split, scored against baselines.

    python experiments/counterfactual_attribution.py                              # the demo model on the phantoms
    python experiments/counterfactual_attribution.py input=path/to/folder_or_image.png
    python experiments/counterfactual_attribution.py data=covid_radiography data.root=... split=test
    python experiments/counterfactual_attribution.py tune.enabled=true          # grid search on the val split

Per image and method: the counterfactual (PNG), the map (.npy, in grey-level units for the difference maps) and,
for ``overlays.methods``, a PNG panel; one CSV row per image. With labels, ``metrics.json`` and ``metrics.md``:
pixel AUPRC / AUROC / best Dice of every method (maps scaled to [0, 1] per image, scored by
``lightning_modules.localization``), per finding type and overall, plus validity and minimality.
"""

from __future__ import annotations

import csv
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, Subset
from torchmetrics import MeanMetric
from torchmetrics.functional.classification import binary_average_precision
from tqdm import tqdm

from configs import instantiate
from datamodules.base import to_model_range, to_unit_range
from datamodules.images import IMAGE_SUFFIXES, UnreadableImageError, build_transform, check_header, read_gray
from experiments.runner import load_config, write_results
from lightning_modules.attribution import attribution_map, normalize_per_image, signed_map
from lightning_modules.baselines import diffedit_map, mean_healthy_image, reconstruct
from lightning_modules.classifier import FindingClassifier
from lightning_modules.localization import OVERALL, CounterfactualScores, LocalizationScores
from lightning_modules.metrics import spread_indices
from lightning_modules.overlays import save_array, save_gray_png, save_overlay
from lightning_modules.pipeline import METHODS as PIPELINE_METHODS
from lightning_modules.pipeline import CounterfactualPipeline

OURS = ("sdedit", "inversion")
BASELINES = ("mean_healthy", "reconstruction", "diffedit", "saliency")
ALL_METHODS = OURS + BASELINES
#: methods whose output is a counterfactual image (the others give a map only)
COUNTERFACTUAL_METHODS = ("sdedit", "inversion", "mean_healthy", "reconstruction")
SCORED_KINDS = ("positive", "absolute")  # a signed map cannot be ranked as "lesion here"
SPLITS = ("train", "val", "test")


# 1. check the request before any model is loaded ------------------------------------------------------------------
def check_config(cfg: DictConfig) -> None:
    problems = []
    unknown = [m for m in cfg.methods if m not in ALL_METHODS]
    if unknown or not cfg.methods:
        problems.append(f"methods: unknown {unknown}; choose from {list(ALL_METHODS)}")
    if cfg.map.kind not in SCORED_KINDS:
        problems.append(f"map.kind must be one of {SCORED_KINDS}, got {cfg.map.kind!r}")
    if not Path(cfg.checkpoint).is_file():
        problems.append(f"checkpoint: no file at {cfg.checkpoint} (train one: make demo, or experiments/train.py)")
    if cfg.input is not None and not Path(cfg.input).exists():
        problems.append(f"input: {cfg.input} does not exist")
    if cfg.split not in SPLITS or cfg.tune.split not in SPLITS:
        problems.append(f"split and tune.split must be one of {SPLITS}")
    if cfg.tune.enabled and cfg.tune.split == "test":
        problems.append("tune.split=test: settings are never tuned on the test split (use val)")
    if cfg.baselines.reconstruction.method not in PIPELINE_METHODS:
        problems.append(f"baselines.reconstruction.method must be one of {PIPELINE_METHODS}")
    for section, key in (("sdedit", "strength"), ("inversion", "inversion_depth"), ("baselines.diffedit", "strength")):
        node = OmegaConf.select(cfg, section)
        if int(node.num_inference_steps * node[key]) < 1:  # the pipeline would have no timestep to start from
            problems.append(f"{section}.{key}={node[key]} of num_inference_steps={node.num_inference_steps} "
                            "is less than one step")
    if cfg.batch_size < 1 or (cfg.num_images is not None and cfg.num_images < 1):
        problems.append("batch_size and num_images must be positive")
    if problems:
        raise SystemExit("attribution: " + "\n  ".join(["bad configuration:", *problems]))


def image_files(path: Path) -> list[Path]:
    """A file, or every PNG/JPG under a folder (sorted, recursive)."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def scan_files(files: list[Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Split files into readable-looking ones and (path, reason) of those whose header or end is broken."""
    good, skipped = [], []
    for path in files:
        try:
            check_header(path)
            good.append(path)
        except UnreadableImageError as err:
            skipped.append((err.path, err.reason))
    return good, skipped


# 2. batches -------------------------------------------------------------------------------------------------------
def folder_batches(files: list[Path], root: Path, size: int, batch_size: int, resize: str,
                   skipped: list[tuple[str, str]]) -> Iterator[dict]:
    """Decode, grey and resize files batch by batch; a file that fails to decode is added to ``skipped``."""
    transform = build_transform(size, resize)
    names = [p.relative_to(root).with_suffix("").as_posix() for p in files]
    clashing = {n for n in names if names.count(n) > 1}  # a.png and a.jpg: keep the suffix in their ids
    ids = [n + "_" + p.suffix.lower().lstrip(".") if n in clashing else n for n, p in zip(names, files)]
    for start in range(0, len(files), batch_size):
        images, kept = [], []
        for path, sample_id in zip(files[start:start + batch_size], ids[start:start + batch_size]):
            try:
                gray = transform(image=read_gray(path))["image"]  # (size, size) in [0, 1]
            except UnreadableImageError as err:
                skipped.append((err.path, err.reason))
                continue
            images.append(torch.from_numpy(np.ascontiguousarray(gray, np.float32))[None])
            kept.append((sample_id, str(path)))
        if images:
            yield {"image": to_model_range(torch.stack(images)), "id": [k[0] for k in kept],
                   "path": [k[1] for k in kept]}


def dataset_batches(dataset: Dataset, indices: list[int], batch_size: int, num_workers: int) -> Iterator[dict]:
    """The samples at ``indices``, in order, each batch with the samples' ``index`` into ``dataset``."""
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for start, batch in zip(range(0, len(indices), batch_size), loader):
        batch["index"] = indices[start:start + len(batch["id"])]
        yield batch


def finding_masks(dataset: Dataset, batch: dict, names: tuple[str, ...]) -> torch.Tensor | None:
    """(B, K, H, W) one mask per finding type, when the dataset renders them (the phantoms), else None."""
    if not hasattr(dataset, "phantom") or "index" not in batch:
        return None
    masks = [[dataset.phantom(i).finding_mask(kind) for kind in names] for i in batch["index"]]
    return torch.from_numpy(np.array(masks, dtype=bool))


# 3. models --------------------------------------------------------------------------------------------------------
@dataclass
class Models:
    pipeline: CounterfactualPipeline
    classifier: FindingClassifier | None
    mean_healthy: torch.Tensor | None  # (1, 1, H, W) in [-1, 1]


def load_classifier(cfg: DictConfig, notes: list[str]) -> FindingClassifier | None:
    """The judge of validity and the saliency baseline; without its checkpoint both are skipped, and said so."""
    path = cfg.classifier_checkpoint
    if path is None or not Path(path).is_file():
        notes.append(f"no classifier checkpoint ({path}; train one with experiments/train_classifier.py): "
                     "saliency baseline and validity skipped")
        return None
    return FindingClassifier.from_checkpoint(path, map_location=cfg.device).eval()


def checkpoint_image_size(path: str) -> int:
    """The image side a latent diffusion checkpoint was trained on, read without building the model."""
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["hyper_parameters"]["image_size"])


# 4. one batch through every method --------------------------------------------------------------------------------
@dataclass
class MethodOutput:
    counterfactual01: torch.Tensor | None  # (B, 1, H, W) in [0, 1]
    map: torch.Tensor  # (B, 1, H, W) non-negative: grey-level units for counterfactual methods
    latent_error: torch.Tensor | None = None  # (B,) ||z_rec - z_0|| / ||z_0||: the guidance-0 round trip's error


def run_method(method: str, images: torch.Tensor, prompts: list[str] | None, models: Models, cfg: DictConfig,
               seed: int, settings: dict | None = None) -> MethodOutput:
    """``images`` (B, 1, H, W) in [-1, 1]; ``settings`` replace ``cfg[method]`` for our methods (tuning). Every
    method gets its own generator from ``seed``, so adding or dropping a method never changes another's output."""
    generator = torch.Generator("cpu").manual_seed(seed)
    kind, sigma = cfg.map.kind, cfg.map.sigma
    pipeline, device = models.pipeline, models.pipeline.device
    if method in OURS:
        params = settings or OmegaConf.to_container(cfg[method])
        counterfactuals = pipeline(images, method=method, target_prompt=cfg.target_prompt, generator=generator,
                                   **params).images
    elif method == "reconstruction":
        params = OmegaConf.to_container(cfg[cfg.baselines.reconstruction.method])
        output = reconstruct(pipeline, images, cfg.baselines.reconstruction.method, generator=generator, **params)
        cf01 = to_unit_range(output.images.cpu())
        reference = pipeline.encode_image(images)  # the posterior mean, which inversion starts from
        latent_error = (output.latents - reference).flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1)
        return MethodOutput(cf01, attribution_map(signed_map(to_unit_range(images.cpu()), cf01), kind, sigma),
                            latent_error.cpu())
    elif method == "mean_healthy":
        counterfactuals = models.mean_healthy.to(device).expand_as(images)
    elif method == "diffedit":
        params = OmegaConf.to_container(cfg.baselines.diffedit)
        abnormal_prompt = params.pop("abnormal_prompt")
        sources = prompts or [abnormal_prompt] * images.shape[0]
        raw = diffedit_map(pipeline, images.to(device), sources, healthy_prompt=cfg.target_prompt, generator=generator,
                           **params)
        return MethodOutput(None, attribution_map(raw.cpu(), "absolute", sigma))  # non-negative already
    elif method == "saliency":
        raw = models.classifier.saliency(images.to(device), method=cfg.baselines.saliency.method)
        return MethodOutput(None, attribution_map(raw.detach().cpu(), "absolute", sigma))
    else:
        raise ValueError(f"unknown method {method}")
    cf01, images01 = to_unit_range(counterfactuals.cpu()), to_unit_range(images.cpu())
    return MethodOutput(cf01, attribution_map(signed_map(images01, cf01), kind, sigma))


def abnormal_probability(models: Models, images: torch.Tensor) -> torch.Tensor | None:
    if models.classifier is None:
        return None
    with torch.no_grad():
        return models.classifier.abnormal_probability(images.to(models.pipeline.device)).detach().cpu()


def scored_rows(batch: dict) -> torch.Tensor:
    """(B,) abnormal images with a known lesion mask: the ones localization is scored on."""
    if "label" not in batch:
        return torch.zeros(len(batch["id"]), dtype=torch.bool)
    has_mask = batch["has_mask"].bool() if "has_mask" in batch else batch["mask"].flatten(1).any(1)
    return batch["label"].bool().any(1) & has_mask


# 5. the run -------------------------------------------------------------------------------------------------------
def process(cfg: DictConfig, models: Models, batches: Iterator[dict], total: int, methods: list[str],
            dataset: Dataset | None, finding_names: tuple[str, ...], out: Path) -> tuple[list[dict], dict]:
    """Every method on every batch: files written, CSV rows and the accumulated scores returned."""
    localization = LocalizationScores(methods, finding_names, cfg.metrics.thresholds)
    counterfactual_scores = {m: CounterfactualScores() for m in methods if m in COUNTERFACTUAL_METHODS}
    rows, labelled, counts = [], False, {"images": 0, "abnormal": 0, "scored": 0}
    sensitivity = MeanMetric()  # abnormal inputs the classifier calls abnormal: what validity is measured against
    latent_error = MeanMetric()  # the reconstruction baseline's round trip, healthy and abnormal inputs alike
    for b, batch in enumerate(tqdm(batches, total=total, desc="attribution", unit="batch",
                                   disable=not cfg.progress)):
        images, ids = batch["image"], batch["id"]
        images01 = to_unit_range(images)
        scored = scored_rows(batch)
        labelled = labelled or "label" in batch
        abnormal = batch["label"].bool().any(1) if "label" in batch else None
        per_type = finding_masks(dataset, batch, finding_names) if scored.any() else None
        p_input = abnormal_probability(models, images)
        if p_input is not None and abnormal is not None and abnormal.any():
            sensitivity.update((p_input[abnormal] >= cfg.metrics.abnormal_threshold).float())
        batch_rows = [base_row(batch, i, finding_names, bool(scored[i]), p_input) for i in range(len(ids))]
        counts["images"] += len(ids)
        counts["abnormal"] += int(abnormal.sum()) if abnormal is not None else 0
        counts["scored"] += int(scored.sum())
        for method in methods:
            output = run_method(method, images, batch.get("prompt"), models, cfg, cfg.seed + b)
            scores01 = normalize_per_image(output.map)
            if output.latent_error is not None:
                latent_error.update(output.latent_error)
            p_cf = None
            if output.counterfactual01 is not None:
                p_cf = abnormal_probability(models, to_model_range(output.counterfactual01))
                if abnormal is not None:
                    counterfactual_scores[method].update(
                        images01, output.counterfactual01, abnormal, p_cf,
                        to_unit_range(batch["healthy"]) if "healthy" in batch else None,
                        cfg.metrics.abnormal_threshold)
            if scored.any():
                localization.update(method, scores01[scored], batch["mask"][scored], batch["label"][scored],
                                    per_type[scored] if per_type is not None else None)
            write_outputs(out, method, ids, images01, output, cfg, batch.get("prompt"))
            for i, row in enumerate(batch_rows):  # every row gets every column (empty when n/a): stable order
                row[f"{method}_map_mean"] = round(float(output.map[i].mean()), 6)
                row[f"{method}_map_max"] = round(float(output.map[i].max()), 6)
                if output.counterfactual01 is not None:
                    row[f"{method}_change"] = round(float((images01[i] - output.counterfactual01[i]).abs().mean()), 6)
                    row[f"{method}_p_abnormal"] = None if p_cf is None else round(float(p_cf[i]), 6)
                if "mask" in batch:
                    row[f"{method}_auprc"] = round(float(binary_average_precision(
                        scores01[i].flatten(), batch["mask"][i].flatten().long())), 6) if scored[i] else None
        rows.extend(batch_rows)
    if sensitivity.update_count:
        counts["classifier_sensitivity"] = float(sensitivity.compute())
    if latent_error.update_count:
        counts["reconstruction_latent_error"] = float(latent_error.compute())
    results = {"counts": counts, "labelled": labelled, "localization": localization.compute(),
               "counterfactual": {m: s.compute() for m, s in counterfactual_scores.items()}}
    return rows, results


def base_row(batch: dict, i: int, finding_names: tuple[str, ...], scored: bool,
             p_input: torch.Tensor | None) -> dict:
    row = {"id": batch["id"][i]}
    if "path" in batch:
        row["path"] = batch["path"][i]
    if "prompt" in batch:
        row["prompt"] = batch["prompt"][i]
    if "label" in batch:
        row["findings"] = ";".join(n for n, on in zip(finding_names, batch["label"][i].tolist()) if on)
    if "mask" in batch:
        row["lesion_fraction"] = round(float(batch["mask"][i].mean()), 6) if scored else None
    row["input_p_abnormal"] = None if p_input is None else round(float(p_input[i]), 6)
    return row


def write_outputs(out: Path, method: str, ids: list[str], images01: torch.Tensor, output: MethodOutput,
                  cfg: DictConfig, prompts: list[str] | None) -> None:
    difference_map = output.counterfactual01 is not None
    for i, sample_id in enumerate(ids):
        heat = output.map[i, 0].numpy()
        save_array(out / "maps" / method / f"{sample_id}.npy", heat)
        cf = output.counterfactual01[i, 0].numpy() if difference_map else None
        if cf is not None:
            save_gray_png(out / "counterfactuals" / method / f"{sample_id}.png", cf)
        if method in cfg.overlays.methods:
            label = ({"positive": "denser than counterfactual", "absolute": "|input - counterfactual|"}
                     [cfg.map.kind] + " (grey fraction)") if difference_map else f"{method} score"
            title = f"{sample_id}: {prompts[i]}" if prompts else sample_id
            save_overlay(out / "overlays" / method / f"{sample_id}.png", images01[i, 0].numpy(), heat, cf,
                         title=title, label=label, vmax=cfg.overlays.vmax if difference_map else None,
                         cmap=cfg.overlays.cmap)


# 6. reports -------------------------------------------------------------------------------------------------------
def summarize(cfg: DictConfig, results: dict, methods: list[str], notes: list[str]) -> dict:
    localization, counterfactual = results["localization"], results["counterfactual"]
    summary_methods = {}
    for method in methods:
        entry = {k: v for k, v in localization.get(method, {}).get(OVERALL, {}).items()
                 if k in ("auprc", "auroc", "dice", "threshold")}
        entry.update(counterfactual.get(method, {}))
        summary_methods[method] = entry
    return {
        "checkpoint": cfg.checkpoint, "classifier_checkpoint": cfg.classifier_checkpoint,
        "data": cfg.data.name if cfg.input is None else None, "input": cfg.input, "split": cfg.split,
        **{k: v for k, v in results["counts"].items()},
        "settings": {m: OmegaConf.to_container(cfg[m]) for m in (*OURS, "map", "baselines")},
        "methods": summary_methods,
        "per_finding": {m: {g: v for g, v in groups.items() if g != OVERALL} for m, groups in localization.items()},
        "notes": notes,
    }


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown(summary: dict, finding_names: tuple[str, ...]) -> str:
    lines = [f"Scored: {summary['scored']} abnormal images with masks of {summary['images']} "
             f"({summary['abnormal']} abnormal). Maps scaled to [0, 1] per image; pixels pooled over images.", "",
             "| method | AUPRC | AUROC | Dice | validity | minimality | distance to true healthy |",
             "|---|---|---|---|---|---|---|"]
    for method, m in summary["methods"].items():
        lines.append(f"| {method} | {fmt(m.get('auprc'))} | {fmt(m.get('auroc'))} | {fmt(m.get('dice'))} | "
                     f"{fmt(m.get('validity'))} | {fmt(m.get('minimality'))} | {fmt(m.get('twin_distance'))} |")
    present = [n for n in finding_names if any(n in g for g in summary["per_finding"].values())]
    if present:
        lines += ["", "Per finding type, AUPRC / Dice (images with that type; other findings' pixels ignored):", "",
                  "| method | " + " | ".join(f"{n} (n={first_count(summary, n)})" for n in present) + " |",
                  "|---|" + "---|" * len(present)]
        for method, groups in summary["per_finding"].items():
            cells = [f"{fmt(groups[n]['auprc'])} / {fmt(groups[n]['dice'])}" if n in groups else "-" for n in present]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "validity: share of abnormal inputs whose counterfactual the classifier calls healthy; minimality: "
              "mean |x - x_cf| on healthy inputs; distance to true healthy: mean |x_cf - x_healthy| on abnormal "
              "inputs (grey range [0, 1])."]
    if "classifier_sensitivity" in summary:
        lines.append(f"The classifier calls {summary['classifier_sensitivity']:.1%} of the abnormal inputs abnormal.")
    if "reconstruction_latent_error" in summary:
        settings = summary["settings"]
        method = settings["baselines"]["reconstruction"]["method"]
        lines.append(f"Reconstruction baseline ({method} {settings[method]}, guidance 0): relative latent error "
                     f"||z_rec - z_0|| / ||z_0|| = {summary['reconstruction_latent_error']:.4f} on average.")
    lines += [f"note: {n}" for n in summary["notes"]]
    return "\n".join(lines) + "\n"


def first_count(summary: dict, finding: str) -> int:
    return next(g[finding]["images"] for g in summary["per_finding"].values() if finding in g)


def write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> None:
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def select(batch: dict, rows: torch.Tensor) -> dict:
    """The ``rows`` (B,) bool of every tensor and list of a batch."""
    keep = rows.tolist()
    return {k: v[rows] if torch.is_tensor(v) else [x for x, on in zip(v, keep) if on] for k, v in batch.items()}


# 7. tuning on the validation split --------------------------------------------------------------------------------
def tune(cfg: DictConfig, models: Models, dataset: Dataset, finding_names: tuple[str, ...], out: Path) -> dict:
    """Grid search of our methods' settings and the map on ``tune.split`` by pixel AUPRC of abnormal images."""
    first = range(min(cfg.tune.num_images, len(dataset)))
    batches = [b for b in dataset_batches(dataset, list(first), cfg.batch_size, 0) if scored_rows(b).any()]
    batches = [select(b, scored_rows(b)) for b in batches]
    maps = list(itertools.product(cfg.tune.map.kind, cfg.tune.map.sigma))
    trials = []
    for method in (m for m in OURS if m in cfg.methods):
        grid = OmegaConf.to_container(cfg.tune[method])
        for values in itertools.product(*grid.values()):
            settings = {**OmegaConf.to_container(cfg[method]), **dict(zip(grid, values))}
            scores = LocalizationScores([f"{k}:{s}" for k, s in maps], finding_names, cfg.metrics.thresholds)
            for b, batch in enumerate(tqdm(batches, desc=f"tune {method} {dict(zip(grid, values))}",
                                           disable=not cfg.progress)):
                output = run_method(method, batch["image"], None, models, cfg, cfg.seed + b, settings)
                signed = signed_map(to_unit_range(batch["image"]), output.counterfactual01)
                for kind, sigma in maps:
                    scores.update(f"{kind}:{sigma}", normalize_per_image(attribution_map(signed, kind, sigma)),
                                  batch["mask"], batch["label"])
            for key, groups in scores.compute().items():
                kind, sigma = key.split(":")
                trials.append({"method": method, **dict(zip(grid, values)), "map.kind": kind,
                               "map.sigma": float(sigma),
                               **{k: groups[OVERALL][k] for k in ("auprc", "auroc", "dice")}})
    best = {m: max((t for t in trials if t["method"] == m), key=lambda t: t["auprc"])
            for m in dict.fromkeys(t["method"] for t in trials)}
    report = {"split": cfg.tune.split, "images": sum(len(b["id"]) for b in batches), "best": best, "trials": trials}
    (out / "tune.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


# ----------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    cfg = load_config("attribution", argv)
    check_config(cfg)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    methods = list(dict.fromkeys(cfg.methods))
    notes: list[str] = []
    out = Path(cfg.output_dir)
    skipped: list[tuple[str, str]] = []

    # data first: unreadable inputs and missing dataset roots fail before any model is built
    size = checkpoint_image_size(cfg.checkpoint)
    datamodule, dataset, files = None, None, []
    needs_data = cfg.input is None or cfg.tune.enabled or "mean_healthy" in methods
    if needs_data:
        if "image_size" in cfg.data and cfg.data.image_size != size:
            notes.append(f"data.image_size set to {size}, the size the model was trained on")
            cfg.data.image_size = size
        datamodule = instantiate(cfg.data)
    if cfg.input is None or cfg.tune.enabled:
        dataset = datamodule.dataset(cfg.tune.split if cfg.tune.enabled else cfg.split)
    else:
        files, skipped = scan_files(image_files(Path(cfg.input)))
        if not files:
            reasons = "; ".join(f"{p}: {r}" for p, r in skipped) or "no PNG/JPG files"
            raise SystemExit(f"attribution: no readable image under {cfg.input}: {reasons}")
    finding_names = tuple(datamodule.finding_names) if datamodule is not None else ()

    pipeline = CounterfactualPipeline.from_checkpoint(cfg.checkpoint, cfg.device, normal_prompt=cfg.target_prompt,
                                                      compile=cfg.compile)
    models = Models(pipeline, None, None)
    models.classifier = None if cfg.tune.enabled else load_classifier(cfg, notes)
    if models.classifier is None and "saliency" in methods:
        methods.remove("saliency")
    if "mean_healthy" in methods and not cfg.tune.enabled:
        healthy = mean_healthy_image(datamodule.dataset("train"), cfg.baselines.mean_healthy.num_images)
        models.mean_healthy = healthy[None]  # (1, 1, H, W)
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    for note in notes:
        print(f"note: {note}")

    if cfg.tune.enabled:
        report = tune(cfg, models, dataset, finding_names, out)
        for method, best in report["best"].items():
            overrides = " ".join(f"{method}.{k}={v}" for k, v in best.items()
                                 if k not in ("method", "auprc", "auroc", "dice", "map.kind", "map.sigma"))
            print(f"best {method} on {report['split']} ({report['images']} abnormal images): AUPRC "
                  f"{best['auprc']:.3f}  ->  {overrides} map.kind={best['map.kind']} map.sigma={best['map.sigma']}")
        return report

    start = time.time()
    if dataset is not None:
        indices = spread_indices(len(dataset), cfg.num_images)  # every class its share in class-ordered datasets
        n = len(indices)
        batches = dataset_batches(dataset, indices, cfg.batch_size, datamodule.num_workers)
    else:
        files = files[: cfg.num_images]
        n = len(files)
        root = Path(cfg.input) if Path(cfg.input).is_dir() else Path(cfg.input).parent
        batches = folder_batches(files, root, size, cfg.batch_size, cfg.resize, skipped)
    rows, results = process(cfg, models, batches, -(-n // cfg.batch_size), methods, dataset, finding_names, out)

    write_csv(out / "results.csv", rows)
    write_csv(out / "skipped.csv", [{"path": p, "reason": r} for p, r in skipped], ["path", "reason"])
    for path, reason in skipped:
        print(f"skipped {path}: {reason}")
    print(f"{len(rows)} images, {len(methods)} methods in {time.time() - start:.0f}s -> {out}")
    if not results["labelled"]:
        return {"rows": rows, "skipped": skipped}
    summary = summarize(cfg, results, methods, notes)
    write_results(out, "metrics", summary, markdown(summary, finding_names))
    return summary


if __name__ == "__main__":
    main()
