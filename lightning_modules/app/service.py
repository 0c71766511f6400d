"""What the web app asks of a model, without the web: the models loaded once; an uploaded file read as every script
reads one (``ImageFolder``: PNG, JPEG 8 or 16 bit, DICOM); a counterfactual by the attribution run's own methods and
maps (``runs.attribution.attribute``), an induction by the induction run's (``runs.induction.induce``). A request a
user can get wrong raises ``ValueError`` with one line to show."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from configs import compose, instantiate
from datamodules.base import to_unit_range
from datamodules.folder import ImageFolder
from datamodules.scan import scan_files
from lightning_modules.checkpoints import read_hparams
from lightning_modules.classifier import FindingClassifier
from lightning_modules.methods import Models, build
from lightning_modules.pipeline import LatentDiffusionPipeline
from lightning_modules.regions import RegionSpec
from lightning_modules.runs import attribution, induction
from lightning_modules.settings import InductionSettings, SamplingSettings

#: the app's counterfactual methods and the setting that says how far each goes
METHODS = {"sdedit": "strength", "inversion": "inversion_depth"}


@dataclass
class Example:
    name: str
    path: Path
    lung_mask: np.ndarray  # (H, W) bool: named zones work on the bundled phantoms
    abnormal: bool


@dataclass
class Counterfactual:
    image01: np.ndarray  # (H, W) the input as the model saw it
    counterfactual01: np.ndarray  # (H, W)
    map: np.ndarray  # (H, W) non-negative, grey-level units: the attribution run's map of the same settings
    p_before: float | None  # the classifier's p(abnormal) of the input and of the counterfactual
    p_after: float | None


@dataclass
class Induced:
    image01: np.ndarray
    induced01: np.ndarray
    region: np.ndarray  # (H, W) bool
    prompt: str
    p_before: float | None  # the classifier's probability of the finding
    p_after: float | None


class Explorer:
    """The stage-2 pipeline and the classifier, loaded once; settings default to the checkpoint's and to
    ``configs/attribution.yaml``'s method blocks (what ``make demo`` scores)."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.pipeline = LatentDiffusionPipeline.from_checkpoint(cfg.checkpoint, cfg.device)
        self.classifier = (
            FindingClassifier.from_checkpoint(cfg.classifier_checkpoint, map_location=cfg.device).eval()
            if cfg.classifier_checkpoint and Path(cfg.classifier_checkpoint).is_file()
            else None
        )
        self.size = int(read_hparams(cfg.checkpoint, "stage-2 latent diffusion")["image_size"])
        self.attribution = compose("attribution", [f"data.image_size={self.size}"])
        self.sampling: SamplingSettings = self.pipeline.sampling
        induction_cfg = compose("induction", [f"data.image_size={self.size}"])
        self.data = instantiate(induction_cfg.data)
        self.findings = list(self.data.bank.findings)
        self.induction = InductionSettings.build(self.sampling, **OmegaConf.to_container(induction_cfg.induction))

    @property
    def induction_guidance(self) -> float:
        return self.induction.guidance_scale

    @property
    def induction_steps(self) -> int:
        return self.induction.num_inference_steps

    def prompt_for(self, finding: str, zone: str | None, box: str | None) -> str:
        """The bank's wording of ``finding`` at ``zone`` (what the induction run prompts with)."""
        return induction.build_prompt(None, finding, self.data, RegionSpec.parse(self.size, zone, box))

    # 1. inputs ----------------------------------------------------------------------------------------------------
    def read(self, path: str | Path) -> torch.Tensor:
        """An uploaded file -> (1, 1, S, S) in [-1, 1] at the model's size, or ValueError saying why it cannot be."""
        path = Path(path)
        size = path.stat().st_size
        if size > self.cfg.max_upload_mb * 2**20:
            raise ValueError(f"{path.name} is {size / 2**20:.0f} MB; the limit is {self.cfg.max_upload_mb} MB")
        bad = scan_files([str(path)], "header")
        if bad:  # not an image, or cut short: named without the server's temporary path
            raise ValueError(f"{path.name} cannot be read: {bad[0].reason.replace(str(path), path.name)}")
        sample = ImageFolder(path, self.size, self.cfg.resize)[0]
        if "error" in sample:
            raise ValueError(f"{path.name} cannot be read: {sample['error'].replace(str(path), path.name)}")
        return sample["image"][None]

    def defaults(self, method: str) -> dict:
        """The settings a request starts from: the attribution config's block over the checkpoint's steps/guidance."""
        built = build(method, self.attribution, self.sampling).settings
        return {
            "amount": getattr(built, METHODS[method]),
            "guidance_scale": built.guidance_scale,
            "num_inference_steps": built.num_inference_steps,
        }

    # 2. requests --------------------------------------------------------------------------------------------------
    def counterfactual(
        self, image: torch.Tensor, method: str, amount: float, guidance_scale: float, steps: int, seed: int
    ) -> Counterfactual:
        """``image`` (1, 1, S, S) -> its healthy counterfactual and map: ``attribute`` of the attribution run with
        these settings and ``seed``, so the map equals that run's for a batch of this one image."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}")
        settings = {METHODS[method]: float(amount), "guidance_scale": float(guidance_scale)}
        chosen = build(method, self.attribution, self.sampling, **settings, num_inference_steps=int(steps))
        models = Models(self.pipeline, self.classifier)
        kind, sigma = self.attribution.map.kind, attribution.map_sigma(self.attribution, method)
        output = attribution.attribute(chosen, image, models, int(seed), kind, sigma)
        p_before = attribution.abnormal_probability(models, image)
        p_after = attribution.abnormal_probability(models, output.counterfactual01 * 2 - 1)
        return Counterfactual(
            to_unit_range(image)[0, 0].numpy(),
            output.counterfactual01[0, 0].numpy(),
            output.map[0, 0].numpy(),
            None if p_before is None else float(p_before[0]),
            None if p_after is None else float(p_after[0]),
        )

    def induce(
        self,
        image: torch.Tensor,
        finding: str,
        zone: str | None,
        box: str | None,
        prompt: str | None,
        guidance_scale: float,
        steps: int,
        seed: int,
        lung_mask: np.ndarray | None = None,
    ) -> Induced:
        """Draw ``finding`` into the region (``box`` "x0,y0,x1,y1" in pixels of the model's input, else ``zone``,
        which needs ``lung_mask``) as the induction run does; the prompt defaults to the bank's wording."""
        region = RegionSpec.parse(self.size, zone or None, box or None)
        mask = region.mask(self.size, lung_mask)
        if not mask.any():
            raise ValueError("the region is empty: give a larger box")
        text = induction.build_prompt(prompt or None, finding, self.data, region)
        settings = InductionSettings.build(
            self.sampling,
            **{**self.induction.asdict(), "guidance_scale": float(guidance_scale), "num_inference_steps": int(steps)},
        )
        inputs = induction.Inputs(["upload"], image, torch.from_numpy(mask)[None, None])
        request = induction.Request(settings, region, text, inputs)
        probability = None
        if self.classifier is not None and finding in self.classifier.output_names:  # the classifier loaded once
            column = self.classifier.index(finding)
            probability = lambda x: self.classifier.probabilities(x.to(self.cfg.device))[:, column].cpu()  # noqa: E731
        induced, records = induction.induce(self.pipeline, request, int(seed), [0], probability)
        scores = records[0]["scores"]
        return Induced(
            to_unit_range(image)[0, 0].numpy(),
            to_unit_range(induced)[0, 0].numpy(),
            mask,
            text,
            scores.get("classifier_prob_before"),
            scores.get("classifier_prob_after"),
        )

    # 3. the bundled examples --------------------------------------------------------------------------------------
    def examples(self, folder: Path, count: int) -> list[Example]:
        """``count`` test phantoms (the first abnormal and normal ones, alternating) written as PNGs to ``folder``."""
        from PIL import Image

        dataset = self.data.dataset("test")
        folder.mkdir(parents=True, exist_ok=True)
        abnormal = [i for i in range(len(dataset)) if dataset.findings(i)][: (count + 1) // 2]
        normal = [i for i in range(len(dataset)) if not dataset.findings(i)][: count // 2]
        chosen = [i for pair in zip(abnormal, normal, strict=False) for i in pair] + abnormal[len(normal) :]
        examples = []
        for i in chosen[:count]:
            sample = dataset[i]
            kind = "abnormal" if dataset.findings(i) else "normal"
            path = folder / f"{sample['id']}_{kind}.png"
            image01 = to_unit_range(sample["image"])[0].numpy()
            Image.fromarray(np.round(image01 * 255).astype(np.uint8)).save(path)
            examples.append(Example(path.stem, path, sample["lung_mask"][0].numpy() > 0.5, kind == "abnormal"))
        return examples
