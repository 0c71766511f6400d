"""Zero-shot localized disease induction (method.md §3): draw a finding into one region of normal images.

    python experiments/zero_shot_induction.py finding=effusion zone=right-lower num_images=8
    python experiments/zero_shot_induction.py input=film.png box=36,28,56,48 \
        prompt="small nodule in the left lower zone"

Inputs are an image file or folder (``input=``), or the first ``num_images`` normal images of ``split`` of the
configured data. Every argument is checked, and every region built, before a model is loaded. Writes to
``output_dir``: ``induced/<id>_seed<k>.png``, ``difference/<id>_seed<k>.npy`` (signed, induced minus original, in
grey levels of [0, 1]), ``panels/<id>.png`` (original | region | induced | difference, one row per seed) and
``metrics.json`` (means over inputs and seeds, then every input and seed).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

from configs import instantiate
from datamodules.base import CXRDataModule, to_model_range, to_unit_range
from datamodules.images import IMAGE_SUFFIXES, UnreadableImageError, build_transform, read_gray
from experiments.runner import load_config, log
from lightning_modules.classifier import FindingClassifier
from lightning_modules.induction import RegionError, RegionSpec, inside_fraction, ssim_outside
from lightning_modules.overlays import save_array, save_gray_png
from lightning_modules.pipeline import CounterfactualPipeline

#: means reported in metrics.json. The first four score the output; the ``edit_`` ones the latent blend alone (the
#: decoded result before the paste against the original's VAE round trip), and ``round_trip_ssim_outside`` the
#: autoencoder's own error, which the paste removes.
SCORES = ("inside_fraction", "ssim_outside", "classifier_prob_before", "classifier_prob_after",
          "edit_inside_fraction", "edit_ssim_outside", "round_trip_ssim_outside")


@dataclass
class Inputs:
    ids: list[str]
    images: torch.Tensor  # (N, 1, H, W) normal images in [-1, 1]
    regions: torch.Tensor  # (N, 1, H, W) bool


# 1. check arguments and gather inputs (no model yet) --------------------------------------------------------------
def build_prompt(cfg: DictConfig, datamodule: CXRDataModule, region: RegionSpec) -> str:
    """The given prompt, else the bank's first phrasing of the finding at the zone (e.g. "small nodule in the left
    lower zone"), the fixed wording the model was trained on."""
    if cfg.prompt is not None:
        if not str(cfg.prompt).strip():
            raise ValueError("prompt is empty: give the finding to draw, or prompt=null for the bank's phrasing")
        return str(cfg.prompt)
    bank = datamodule.bank
    if cfg.finding not in bank.findings:
        raise ValueError(f"unknown finding '{cfg.finding}'; the {cfg.data.name} bank has: {', '.join(bank.findings)}")
    try:
        return bank.phrase((cfg.finding, *(region.location or (None, None))), choice=0)
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


def image_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            return files
    raise ValueError(f"input: no image file at {path} (a {', '.join(IMAGE_SUFFIXES)} file or a folder of them)")


def gather_inputs(cfg: DictConfig, datamodule: CXRDataModule, region: RegionSpec) -> Inputs:
    size = datamodule.image_size
    ids, images, regions = [], [], []
    if cfg.input:
        if region.needs_lung_mask:
            raise RegionError(f"zone '{region.zone}' needs lung masks, which image files do not bring: give box= or "
                              "mask_path=")
        resize = build_transform(size)
        for path in image_files(Path(cfg.input)):
            try:
                gray = resize(image=read_gray(path))["image"]  # (size, size) in [0, 1]
            except UnreadableImageError as err:
                log.warning("skipping unreadable image %s (%s)", err.path, err.reason)
                continue
            ids.append(path.stem)
            images.append(to_model_range(torch.from_numpy(np.clip(gray, 0, 1)).float()[None]))
            regions.append(region.mask(size))
        if not ids:
            raise ValueError(f"input: no readable image under {cfg.input}")
    else:
        dataset = datamodule.dataset(cfg.split)
        for i in normal_indices(dataset, cfg.num_images):
            sample = dataset[i]
            if region.needs_lung_mask and "lung_mask" not in sample:
                raise RegionError(f"zone '{region.zone}' needs lung masks, which {cfg.data.name} does not serve "
                                  "here (covid_radiography: data.lung_masks=true); or give box= or mask_path=")
            lung = sample["lung_mask"][0].numpy() if "lung_mask" in sample else None
            ids.append(str(sample["id"]).replace("/", "_"))
            images.append(sample["image"])
            regions.append(region.mask(size, lung))
    return Inputs(ids, torch.stack(images), torch.from_numpy(np.stack(regions))[:, None])


def check_settings(cfg: DictConfig) -> None:
    if not 0.0 < cfg.strength <= 1.0 or cfg.num_inference_steps < 1 or cfg.feather < 0:
        raise ValueError("need 0 < strength <= 1, num_inference_steps >= 1 and feather >= 0")
    if not cfg.seeds or cfg.num_images < 1 or cfg.batch_size < 1:
        raise ValueError("need at least one seed, num_images >= 1 and batch_size >= 1")
    if not Path(cfg.checkpoint).is_file():
        raise ValueError(f"checkpoint: no file at {cfg.checkpoint} (train one with `make demo` or `make train`)")


# 2. models ----------------------------------------------------------------------------------------------------------
def finding_probability(cfg: DictConfig) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """images (B, 1, H, W) -> (B,) the independent classifier's probability of ``cfg.finding``; None (with a note)
    when there is no classifier checkpoint or it does not score that finding."""
    path = cfg.classifier_checkpoint
    if not path or not Path(path).is_file():
        log.warning("classifier scores skipped: no classifier checkpoint at classifier_checkpoint=%s", path)
        return None
    classifier = FindingClassifier.from_checkpoint(path, cfg.device).to(cfg.device)
    if cfg.finding not in classifier.output_names:
        log.warning("classifier scores skipped: it scores %s, not '%s'", classifier.output_names, cfg.finding)
        return None
    column = classifier.index(cfg.finding)
    return lambda images: classifier.probabilities(images.to(cfg.device))[:, column].cpu()


# 3. induce and score ------------------------------------------------------------------------------------------------
@dataclass
class Induction:
    index: int  # into Inputs
    seed: int
    image: torch.Tensor  # (1, H, W) in [-1, 1]
    scores: dict[str, float | None]


def induce_all(cfg: DictConfig, pipeline: CounterfactualPipeline, probability, inputs: Inputs,
               prompt: str) -> list[Induction]:
    settings = dict(strength=cfg.strength, guidance_scale=cfg.guidance_scale, feather=cfg.feather, paste=cfg.paste,
                    num_inference_steps=cfg.num_inference_steps)
    done = []
    for seed in cfg.seeds:
        for lo in range(0, len(inputs.ids), cfg.batch_size):
            images, regions = inputs.images[lo:lo + cfg.batch_size], inputs.regions[lo:lo + cfg.batch_size]
            result = pipeline.induce(images, regions.float(), prompt, seed=seed, **settings)
            induced, decoded, round_trip = result.images.cpu(), result.decoded.cpu(), result.round_trip.cpu()
            scores = {"inside_fraction": inside_fraction(result.difference.cpu(), regions),
                      "ssim_outside": ssim_outside(induced, images, regions),
                      "edit_inside_fraction": inside_fraction(decoded - round_trip, regions),
                      "edit_ssim_outside": ssim_outside(decoded, round_trip, regions),
                      "round_trip_ssim_outside": ssim_outside(round_trip, images, regions)}
            if probability is not None:
                scores["classifier_prob_before"], scores["classifier_prob_after"] = \
                    probability(torch.cat([images, induced])).chunk(2)
            done += [Induction(lo + k, seed, induced[k], {key: float(v[k]) for key, v in scores.items()})
                     for k in range(len(images))]
    return done


# 4. outputs ---------------------------------------------------------------------------------------------------------
def save_panel(path: Path, rows: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
               vmax: float) -> None:
    """original | region | induced | difference, one row per (title, ...); grey in [0, 1], the difference signed."""
    figure = Figure(figsize=(8.8, 2.2 * len(rows)), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(rows), 4, squeeze=False)
    for row, (title, original, region, induced, difference) in zip(axes, rows):
        for ax, picture, name in zip(row, (original, original, induced), (f"original, {title}", "region", "induced")):
            ax.imshow(picture, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(name, fontsize=8)
        tint = np.zeros((*region.shape, 4))
        tint[..., 0], tint[..., 3] = 1.0, 0.35 * region  # red, see-through
        row[1].imshow(tint, interpolation="nearest")
        shown = row[3].imshow(difference, cmap=colormaps["RdBu_r"], vmin=-vmax, vmax=vmax, interpolation="nearest")
        row[3].set_title("induced - original", fontsize=8)
        figure.colorbar(shown, ax=row[3], fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)
        for ax in row:
            ax.set_axis_off()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", metadata={"Software": None})


def write_outputs(out: Path, inputs: Inputs, inductions: list[Induction]) -> None:
    originals = to_unit_range(inputs.images[:, 0]).numpy()  # (N, H, W) in [0, 1]
    pictures = [to_unit_range(done.image[0]).numpy() for done in inductions]
    differences = [picture - originals[done.index] for picture, done in zip(pictures, inductions)]
    vmax = max(float(np.abs(d).max()) for d in differences) or 1.0  # one colour scale for the whole run
    panels: dict[int, list] = {}
    for done, picture, difference in zip(inductions, pictures, differences):
        name = f"{inputs.ids[done.index]}_seed{done.seed}"
        save_gray_png(out / "induced" / f"{name}.png", picture)
        save_array(out / "difference" / f"{name}.npy", difference)
        panels.setdefault(done.index, []).append((f"seed {done.seed}", originals[done.index],
                                                  inputs.regions[done.index, 0].float().numpy(), picture, difference))
    for index, rows in panels.items():
        save_panel(out / "panels" / f"{inputs.ids[index]}.png", rows, vmax)


def summarize(inductions: list[Induction]) -> dict[str, float | None]:
    """Means over inputs and seeds; ``classifier_rise_fraction``: share where the finding's probability rose."""
    scores = [done.scores for done in inductions]
    summary = {key: float(np.mean([s[key] for s in scores])) if key in scores[0] else None for key in SCORES}
    summary["classifier_rise_fraction"] = float(np.mean(
        [s["classifier_prob_after"] > s["classifier_prob_before"] for s in scores])) \
        if summary["classifier_prob_after"] is not None else None
    return summary


def main(argv: list[str] | None = None) -> dict:
    cfg = load_config("induction", argv)
    try:
        check_settings(cfg)
        datamodule = instantiate(cfg.data)
        region = RegionSpec.parse(datamodule.image_size, cfg.zone, cfg.box, cfg.mask_path)
        prompt = build_prompt(cfg, datamodule, region)
        inputs = gather_inputs(cfg, datamodule, region)
    except ValueError as err:  # RegionError included
        raise SystemExit(f"induction: {err}") from None
    print(f"inducing '{prompt}' in {len(inputs.ids)} image(s) x {len(cfg.seeds)} seed(s)")

    start = time.perf_counter()
    pipeline = CounterfactualPipeline.from_checkpoint(cfg.checkpoint, cfg.device, cfg.use_ema, compile=cfg.compile)
    inductions = induce_all(cfg, pipeline, finding_probability(cfg), inputs, prompt)
    elapsed = time.perf_counter() - start

    out = Path(cfg.output_dir)
    write_outputs(out, inputs, inductions)
    summary = summarize(inductions)
    metrics = {
        **summary, "prompt": prompt, "region": asdict(region), "seconds": round(elapsed, 1),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "per_sample": [{"id": inputs.ids[d.index], "seed": d.seed, **d.scores} for d in inductions],
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"{len(inductions)} inductions in {elapsed:.1f}s (models loaded) -> {out}")
    return metrics


if __name__ == "__main__":
    main()
