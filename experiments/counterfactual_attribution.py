"""Healthy counterfactuals and attribution maps for a folder, one image or a dataset split, scored against baselines.

    python experiments/counterfactual_attribution.py                              # the demo model on the phantoms
    python experiments/counterfactual_attribution.py input=path/to/folder_or_image.png
    python experiments/counterfactual_attribution.py data=covid_radiography data.root=... split=test
    python experiments/counterfactual_attribution.py device=cuda devices=4        # one process per GPU (make attribute)
    python experiments/counterfactual_attribution.py tune.enabled=true          # grid search on the val split

Per image and method: the counterfactual (PNG), the map (.npy, in grey-level units for the difference maps) and,
for ``overlays.methods``, a PNG panel; one CSV row per image. With labels, ``metrics.json`` and ``metrics.md``:
pixel AUPRC / AUROC / best Dice of every method (maps scaled to [0, 1] per image, scored by
``lightning_modules.localization``), per finding type and overall, plus validity and minimality. The same command
on the same ``output_dir`` resumes an interrupted run; the outputs do not depend on the number of devices.
The methods live in ``lightning_modules/methods/``, the run in ``lightning_modules/runs/attribution.py``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lightning_modules.checkpoints import read_hparams
from lightning_modules.runs import attribution
from lightning_modules.runs.cli import load_config, run, write_csv, write_results
from lightning_modules.runs.units import Parts, claim_output, fingerprint, run_units, set_threads
from lightning_modules.settings import SamplingSettings


def main(argv: list[str] | None = None) -> dict:
    cfg = load_config("attribution", argv)
    out = Path(cfg.output_dir)
    try:  # everything that can be wrong with the request fails here, before any model is loaded
        attribution.check_config(cfg)
        set_threads(cfg)  # checks the devices too
        hparams = read_hparams(cfg.checkpoint, "stage-2 latent diffusion")
        defaults = SamplingSettings.from_hparams(hparams.get("sampling"))  # steps and guidance unless set
        methods = attribution.build_methods(cfg, defaults)
        trials = attribution.tuning_trials(cfg, defaults) if cfg.tune.enabled else []
        inputs = attribution.load_inputs(cfg, int(hparams["image_size"]), methods)
        attribution.drop_unavailable(cfg, methods, inputs.notes)
        units = attribution.plan(cfg, inputs)
        if not cfg.tune.enabled:  # a folder holding another run (settings, models, images) is refused; ours resumes
            names = getattr(inputs.dataset, "ids", None)
            identity = fingerprint([cfg.checkpoint, cfg.classifier_checkpoint], [units, names, list(methods)])
            claim_output(cfg, out, identity)
    except ValueError as err:
        raise SystemExit(f"attribution: {err}") from None
    for note in inputs.notes:
        print(f"note: {note}")

    if cfg.tune.enabled:
        models = attribution.load_models(cfg, methods, inputs, cfg.device)
        report = attribution.tune(cfg, models, trials, inputs, out)
        for line in attribution.best_settings(report):
            print(line)
        return report

    parts = Parts(out)
    if (out / "results.csv").is_file() and not parts.done():
        print(f"{out} already holds this run's results (delete it to run again)")
        return json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else {"rows": []}
    start = time.time()
    task = attribution.AttributionTask(cfg, methods, inputs, units)
    if not run_units(task, cfg, task.parts, lambda result: attribution.write_unit(cfg, result)):
        return {}  # another rank: rank zero merges
    rows, results = attribution.merge(cfg, methods, inputs, parts.load(len(units)))
    skipped = results["skipped"]
    write_csv(out / "results.csv", rows)
    write_csv(out / "skipped.csv", [{"path": p, "reason": r} for p, r in skipped], ["path", "reason"])
    for path, reason in skipped:
        print(f"skipped {path}: {reason}")
    print(f"{len(rows)} images, {len(methods)} methods in {time.time() - start:.0f}s -> {out}")
    summary = {"rows": rows, "skipped": skipped}
    if results["labelled"]:
        summary = attribution.summarize(cfg, results, list(methods), inputs.notes)
        write_results(out, "metrics", summary, attribution.markdown(summary, inputs.finding_names))
    parts.clear()
    return summary


if __name__ == "__main__":
    run(main)
