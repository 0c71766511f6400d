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
``devices=N`` (``make induce GPUS=N``) spreads the inductions over N processes with the same outputs; the same command
on the same ``output_dir`` resumes an interrupted run. The run itself is ``lightning_modules/runs/induction.py``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from omegaconf import OmegaConf

from lightning_modules.runs import induction
from lightning_modules.runs.cli import load_config, run
from lightning_modules.runs.units import RUNTIME_KEYS, Parts, claim_output, fingerprint, run_units, set_threads


def main(argv: list[str] | None = None) -> dict:
    cfg = load_config("induction", argv)
    out = Path(cfg.output_dir)
    try:
        set_threads(cfg)  # checks the devices too
        request = induction.prepare(cfg)
        units = induction.plan(len(request.inputs.ids), cfg.seeds, cfg.batch_size)
        identity = fingerprint([cfg.checkpoint, cfg.classifier_checkpoint], [units, request.inputs.ids])
        claim_output(cfg, out, identity)  # a folder holding another run is refused; this run's own is resumed
    except ValueError as err:  # RegionError included
        raise SystemExit(f"induction: {err}") from None
    inputs, parts = request.inputs, Parts(out)
    if (out / "metrics.json").is_file() and not parts.done():
        print(f"{out} already holds this run's results (delete it to run again)")
        return json.loads((out / "metrics.json").read_text())
    print(f"inducing '{request.prompt}' in {len(inputs.ids)} image(s) x {len(cfg.seeds)} seed(s)")

    start = time.perf_counter()
    task = induction.InductionTask(cfg, request, units)
    if not run_units(task, cfg, parts, lambda result: induction.write_unit(out, inputs, result)):
        return {}  # another rank: rank zero merges
    records = induction.merge(parts.load(len(units)))
    elapsed = time.perf_counter() - start
    induction.write_panels(out, inputs, records)
    summary = induction.summarize(records)
    metrics = {
        **summary,
        "prompt": request.prompt,
        "region": asdict(request.region),
        "settings": request.settings.asdict(),
        "seconds": round(elapsed, 1),
        "config": {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in RUNTIME_KEYS},
        "per_sample": [{"id": inputs.ids[r["index"]], "seed": r["seed"], **r["scores"]} for r in records],
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    parts.clear()
    print(json.dumps(summary, indent=2))
    print(f"{len(records)} inductions in {elapsed:.1f}s (models loaded) -> {out}")
    return metrics


if __name__ == "__main__":
    run(main)
