"""Zero-shot localized disease induction (method.md §3): draw a finding into one region of normal images.

    python experiments/zero_shot_induction.py finding=effusion zone=right-lower num_images=8
    python experiments/zero_shot_induction.py input=film.png box=36,28,56,48 \
        prompt="small nodule in the left lower zone" induction.guidance_scale=7

Inputs are an image file or folder (``input=``; ids are paths under the folder), or the first ``num_images`` normal
images of ``split`` of the configured data. Settings: the ``induction`` block (``InductionSettings``; null steps or
guidance: the checkpoint's). Every argument is checked, and every region built, before a model is loaded. Writes to
``output_dir``: ``induced/<id>_seed<k>.png``, ``difference/<id>_seed<k>.npy`` (signed, induced minus original, in
grey levels of [0, 1]), ``panels/<id>.png`` (original | region | induced | difference, one row per seed) and
``metrics.json`` (means over inputs and seeds, the prompt, region and settings used, then every input and seed).
The run itself is ``lightning_modules/runs/induction.py``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from omegaconf import OmegaConf

from lightning_modules.pipeline import LatentDiffusionPipeline
from lightning_modules.runs import induction
from lightning_modules.runs.cli import load_config, run


def main(argv: list[str] | None = None) -> dict:
    cfg = load_config("induction", argv)
    try:
        request = induction.prepare(cfg)
    except ValueError as err:  # RegionError included
        raise SystemExit(f"induction: {err}") from None
    inputs = request.inputs
    print(f"inducing '{request.prompt}' in {len(inputs.ids)} image(s) x {len(cfg.seeds)} seed(s)")

    start = time.perf_counter()
    pipeline = LatentDiffusionPipeline.from_checkpoint(
        cfg.checkpoint, cfg.device, cfg.use_ema, compile=cfg.compile, allow_frozen_mismatch=cfg.allow_frozen_mismatch
    )
    probability = induction.finding_probability(cfg.classifier_checkpoint, cfg.finding, cfg.device)
    inductions = induction.induce_all(pipeline, request, cfg.seeds, cfg.batch_size, probability)
    elapsed = time.perf_counter() - start

    out = Path(cfg.output_dir)
    induction.write_outputs(out, inputs, inductions)
    summary = induction.summarize(inductions)
    metrics = {
        **summary,
        "prompt": request.prompt,
        "region": asdict(request.region),
        "settings": request.settings.asdict(),
        "seconds": round(elapsed, 1),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "per_sample": [{"id": inputs.ids[d.index], "seed": d.seed, **d.scores} for d in inductions],
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"{len(inductions)} inductions in {elapsed:.1f}s (models loaded) -> {out}")
    return metrics


if __name__ == "__main__":
    run(main)
