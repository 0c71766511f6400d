"""The zero-shot induction run (method.md §3) behind ``experiments/zero_shot_induction.py``: draw a finding into one
region of normal images and score how well it stayed there.

1. ``prepare``: check every argument, build the settings, the region, the prompt and the inputs; no model yet.
2. ``InductionTask``: one induction per input and seed, scored (``SCORES``), a unit (a seed and a batch of inputs)
   per ``predict_step`` on every device (``runs/units.py``: each unit once, committed, resumable); ``write_unit``
   writes its images and signed differences.
3. ``merge``: the records in unit order, then ``write_panels`` and ``summarize`` (the means of metrics.json).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from configs import instantiate
from datamodules.base import CXRDataModule, to_unit_range
from datamodules.folder import ImageFolder
from lightning_modules.classifier import CALLED, FindingClassifier
from lightning_modules.overlays import diverging, grey, save_array, save_gray_png, save_panel, tint
from lightning_modules.pipeline import LatentDiffusionPipeline
from lightning_modules.regions import RegionError, RegionSpec, inside_fraction, ssim_outside
from lightning_modules.runs.cli import checkpoint_sampling, log
from lightning_modules.runs.units import Parts, plan_units
from lightning_modules.settings import InductionSettings

#: means reported in metrics.json. The first four score the output; the ``edit_`` ones the latent blend alone (the
#: decoded result before the paste against the original's VAE round trip), and ``round_trip_ssim_outside`` the
#: autoencoder's own error, which the paste removes.
SCORES = (
    "inside_fraction",
    "ssim_outside",
    "classifier_prob_before",
    "classifier_prob_after",
    "edit_inside_fraction",
    "edit_ssim_outside",
    "round_trip_ssim_outside",
)


@dataclass
class Inputs:
    ids: list[str]  # output names: a dataset id with "/" -> "_", or the path under the input folder
    images: torch.Tensor  # (N, 1, H, W) normal images in [-1, 1]
    regions: torch.Tensor  # (N, 1, H, W) bool


@dataclass
class Request:
    """Everything a run needs but the models, checked."""

    settings: InductionSettings
    region: RegionSpec
    prompt: str
    inputs: Inputs


# 1. check arguments and gather inputs (no model yet) --------------------------------------------------------------
def build_prompt(
    prompt: str | None, finding: str, datamodule: CXRDataModule, region: RegionSpec, data_name: str = "data"
) -> str:
    """The given prompt, else the bank's first phrasing of the finding at the zone (e.g. "small nodule in the left
    lower zone"), the fixed wording the model was trained on."""
    if prompt is not None:
        if not str(prompt).strip():
            raise ValueError("prompt is empty: give the finding to draw, or prompt=null for the bank's phrasing")
        return str(prompt)
    bank = datamodule.bank
    if finding not in bank.findings:
        raise ValueError(f"unknown finding '{finding}'; the {data_name} bank has: {', '.join(bank.findings)}")
    try:
        return bank.phrase((finding, *(region.location or (None, None))), choice=0)
    except ValueError as err:
        raise ValueError(f"{err}: give zone= (used for the wording) or prompt=") from None


def normal_indices(dataset, count: int) -> list[int]:
    """The first ``count`` samples with no finding: all-zero labels, every label observed."""

    def is_normal(i: int) -> bool:
        if hasattr(dataset, "findings"):  # phantoms: no rendering needed
            return not dataset.findings(i)
        if hasattr(dataset, "labels"):  # XRayDataset: the label table
            observed = dataset.label_mask is None or bool(dataset.label_mask[i].all())
            return observed and not dataset.labels[i].any()
        return not dataset[i]["label"].any()

    found = [i for i in range(len(dataset)) if is_normal(i)][:count]
    if not found:
        raise ValueError(f"no normal images in this split of {len(dataset)}")
    return found


def folder_inputs(path: str, size: int, region: RegionSpec) -> Inputs:
    """Every readable image under ``path`` (``ImageFolder``: ids are paths under the folder), the region on each;
    unreadable files are skipped with a warning."""
    if region.needs_lung_mask:
        raise RegionError(
            f"zone '{region.zone}' needs lung masks, which image files do not bring: give box= or mask_path="
        )
    folder = ImageFolder(path, size)
    for note in folder.notes:
        log.warning("%s", note)
    for bad, reason in folder.skipped:
        log.warning("skipping unreadable image %s (%s)", bad, reason)
    samples = [folder[i] for i in range(len(folder))]
    for sample in samples:
        if "error" in sample:
            log.warning("skipping unreadable image %s (%s)", sample["path"], sample["error"])
    readable = [s for s in samples if "image" in s]
    if not readable:
        raise ValueError(f"input: no readable image under {path}")
    mask = torch.from_numpy(region.mask(size))[None]
    return Inputs(
        [s["id"] for s in readable], torch.stack([s["image"] for s in readable]), torch.stack([mask] * len(readable))
    )


def dataset_inputs(
    datamodule: CXRDataModule, split: str, count: int, region: RegionSpec, data_name: str = "data"
) -> Inputs:
    """The first ``count`` normal images of ``split``; a zone region is cut from each image's lung mask."""
    size = datamodule.image_size
    dataset = datamodule.dataset(split)
    ids, images, regions = [], [], []
    for i in normal_indices(dataset, count):
        sample = dataset[i]
        if region.needs_lung_mask and "lung_mask" not in sample:
            raise RegionError(
                f"zone '{region.zone}' needs lung masks, which {data_name} does not serve here "
                "(covid_radiography: data.lung_masks=true); or give box= or mask_path="
            )
        lung = sample["lung_mask"][0].numpy() if "lung_mask" in sample else None
        ids.append(str(sample["id"]).replace("/", "_"))
        images.append(sample["image"])
        regions.append(region.mask(size, lung))
    return Inputs(ids, torch.stack(images), torch.from_numpy(np.stack(regions))[:, None])


def prepare(cfg: DictConfig) -> Request:
    """Check the request and gather the inputs before any model loads; ValueError (RegionError included) is a
    one-line user error. ``cfg.induction`` holds the ``InductionSettings``; null steps or guidance: the checkpoint's."""
    if not cfg.seeds or cfg.num_images < 1 or cfg.batch_size < 1:
        raise ValueError("need at least one seed, num_images >= 1 and batch_size >= 1")
    settings = InductionSettings.build(
        checkpoint_sampling(cfg.checkpoint), **OmegaConf.to_container(cfg.induction, resolve=True)
    )
    try:
        datamodule = instantiate(cfg.data)
    except FileNotFoundError as err:  # a missing data root
        raise ValueError(f"data: {err}") from None
    region = RegionSpec.parse(datamodule.image_size, cfg.zone, cfg.box, cfg.mask_path)
    prompt = build_prompt(cfg.prompt, cfg.finding, datamodule, region, cfg.data.name)
    inputs = (
        folder_inputs(cfg.input, datamodule.image_size, region)
        if cfg.input
        else dataset_inputs(datamodule, cfg.split, cfg.num_images, region, cfg.data.name)
    )
    return Request(settings, region, prompt, inputs)


# 2. induce and score ------------------------------------------------------------------------------------------------
def finding_probability(
    checkpoint: str | None, finding: str, device: str
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """images (B, 1, H, W) -> (B,) the independent classifier's probability of ``finding``; None (with a note)
    when there is no classifier checkpoint or it does not score that finding."""
    if not checkpoint or not Path(checkpoint).is_file():
        log.warning("classifier scores skipped: no classifier checkpoint at classifier_checkpoint=%s", checkpoint)
        return None
    classifier = FindingClassifier.from_checkpoint(checkpoint, device).to(device)
    if finding not in classifier.output_names:
        log.warning("classifier scores skipped: it scores %s, not '%s'", classifier.output_names, finding)
        return None
    column = classifier.index(finding)
    return lambda images: classifier.probabilities(images.to(device))[:, column].cpu()


def plan(num_inputs: int, seeds: Sequence[int], batch_size: int) -> list[tuple[int, list[int]]]:
    """The run's units: (seed, input indices), seed by seed, in batches."""
    return [(seed, indices) for seed in seeds for indices in plan_units(list(range(num_inputs)), batch_size)]


def induce(
    pipeline: LatentDiffusionPipeline,
    request: Request,
    seed: int,
    indices: list[int],
    probability: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[dict]]:
    """One unit: the inputs at ``indices`` induced from ``torch.Generator("cpu").manual_seed(seed)``; returns the
    induced images (B, 1, H, W) in [-1, 1] and one record {index, seed, scores} per input."""
    images, regions = request.inputs.images[indices], request.inputs.regions[indices]
    result = pipeline.induce(
        images, regions.float(), request.prompt, request.settings, torch.Generator("cpu").manual_seed(seed)
    )
    induced, decoded, round_trip = result.images.cpu(), result.decoded.cpu(), result.round_trip.cpu()
    scores = {
        "inside_fraction": inside_fraction(result.difference.cpu(), regions),
        "ssim_outside": ssim_outside(induced, images, regions),
        "edit_inside_fraction": inside_fraction(decoded - round_trip, regions),
        "edit_ssim_outside": ssim_outside(decoded, round_trip, regions),
        "round_trip_ssim_outside": ssim_outside(round_trip, images, regions),
    }
    if probability is not None:
        scores["classifier_prob_before"], scores["classifier_prob_after"] = probability(
            torch.cat([images, induced])
        ).chunk(2)
    records = [
        {"index": index, "seed": seed, "scores": {key: float(v[k]) for key, v in scores.items()}}
        for k, index in enumerate(indices)
    ]
    return induced, records


class InductionTask(L.LightningModule):
    """One unit per ``predict_step``; each rank loads the pipeline and the classifier on its own device."""

    def __init__(self, cfg: DictConfig, request: Request, units: list[tuple[int, list[int]]]):
        super().__init__()
        self.cfg, self.request, self.units = cfg, request, units
        self.parts = Parts(Path(cfg.output_dir))

    def setup(self, stage: str) -> None:
        device, cfg = self.trainer.strategy.root_device, self.cfg
        self.pipeline = LatentDiffusionPipeline.from_checkpoint(
            cfg.checkpoint, device, cfg.use_ema, compile=cfg.compile, allow_frozen_mismatch=cfg.allow_frozen_mismatch
        )
        self.probability = finding_probability(cfg.classifier_checkpoint, cfg.finding, device)

    def predict_dataloader(self) -> DataLoader:
        pending = self.parts.pending(len(self.units), self.trainer.global_rank, self.trainer.world_size)
        return DataLoader(pending, batch_size=None)  # a batch is a unit's number

    def predict_step(self, unit: int, batch_idx: int) -> dict:
        seed, indices = self.units[unit]
        induced, records = induce(self.pipeline, self.request, seed, indices, self.probability)
        return {"unit": unit, "induced": induced, "part": {"records": records}}


def output_name(inputs: Inputs, record: dict) -> str:
    return f"{inputs.ids[record['index']]}_seed{record['seed']}"


def write_unit(out: Path, inputs: Inputs, result: dict) -> None:
    """``induced/<id>_seed<k>.png`` and ``difference/<id>_seed<k>.npy`` (induced minus original, grey levels)."""
    for image, record in zip(result["induced"], result["part"]["records"], strict=True):
        picture = to_unit_range(image[0]).numpy()
        original = to_unit_range(inputs.images[record["index"], 0]).numpy()
        save_gray_png(out / "induced" / f"{output_name(inputs, record)}.png", picture)
        save_array(out / "difference" / f"{output_name(inputs, record)}.npy", picture - original)


def merge(parts: Iterator[dict]) -> list[dict]:
    """Every unit's records in unit order (seed by seed, inputs in order): a one-process run's."""
    return [record for part in parts for record in part["records"]]


# 3. outputs ---------------------------------------------------------------------------------------------------------
def write_panels(out: Path, inputs: Inputs, records: list[dict]) -> None:
    """``panels/<id>.png``, one row per seed, from the written differences; one colour scale for every panel."""
    originals = to_unit_range(inputs.images[:, 0]).numpy()  # (N, H, W) in [0, 1]
    differences = [np.load(out / "difference" / f"{output_name(inputs, r)}.npy") for r in records]
    vmax = max(float(np.abs(d).max()) for d in differences) or 1.0
    panels: dict[int, list] = {}
    for record, difference in zip(records, differences, strict=True):
        index = record["index"]
        region = inputs.regions[index, 0].float().numpy()
        original, induced = originals[index], originals[index] + difference
        tiles = [
            ("original", grey(original)),
            ("region", tint(original, region)),
            ("induced", grey(induced)),
            ("induced - original", diverging(difference, vmax)),
        ]
        panels.setdefault(index, []).append((f"{inputs.ids[index]}, seed {record['seed']}", tiles))
    for index, rows in panels.items():
        path = out / "panels" / f"{inputs.ids[index]}.png"
        save_panel(path, rows, vmax, "induced - original (grey levels)", "RdBu_r", vmin=-vmax)


def summarize(records: list[dict]) -> dict[str, float | None]:
    """Means over inputs and seeds; ``classifier_recognised_fraction``: share the classifier calls the finding
    present in (p >= ``CALLED``), the target; ``classifier_rise_fraction``: share where its probability merely rose."""
    scores = [record["scores"] for record in records]
    summary = {key: float(np.mean([s[key] for s in scores])) if key in scores[0] else None for key in SCORES}
    scored = summary["classifier_prob_after"] is not None
    summary["classifier_recognised_fraction"] = (
        float(np.mean([s["classifier_prob_after"] >= CALLED for s in scores])) if scored else None
    )
    summary["classifier_rise_fraction"] = (
        float(np.mean([s["classifier_prob_after"] > s["classifier_prob_before"] for s in scores])) if scored else None
    )
    return summary
