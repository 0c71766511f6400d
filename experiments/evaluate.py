"""Generation quality of a stage-2 checkpoint in the layout of VALD-MD's tables: per class and overall, FID, SSIM and
MS-SSIM of generated vs real images and of healthy counterfactuals vs their inputs, with the settings beside them;
and prompt fidelity: whether the finding classifier sees in the generated images what their prompts name.

    python experiments/evaluate.py [checkpoint=...] [data=covid_radiography data.root=...] [num_images=null] \
        [counterfactual.method=inversion] [generation.guidance_scale=6] \
        [fid.inception_weights=/path/to/weights-inception-2015-12-05-6726825d.pth]
    make evaluate GPUS=4 ARGS="num_images=null"      # one process per GPU, the same numbers

Settings: the ``generation`` and ``counterfactual`` blocks (null: the checkpoint's own steps and guidance, else the
defaults of ``lightning_modules/settings.py``); the counterfactual target is the data's normal prompt. Writes
``<output_dir>/metrics.json`` and ``<output_dir>/metrics.md`` (the table with the settings used, also printed); the
same command on the same ``output_dir`` resumes an interrupted run. The run itself is
``lightning_modules/runs/evaluation.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning_modules.runs import evaluation
from lightning_modules.runs.cli import load_config, run, write_results
from lightning_modules.runs.units import Parts, claim_output, fingerprint, plan_units, run_units, set_threads


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = load_config("evaluate", argv)
    out = Path(cfg.output_dir)
    try:
        set_threads(cfg)  # checks the devices too
        request = evaluation.prepare(cfg)
        units = plan_units(request.indices, cfg.batch_size)
        claim_output(cfg, out, fingerprint([cfg.checkpoint, cfg.classifier_checkpoint], units))  # ours resumes
    except ValueError as err:
        raise SystemExit(f"evaluate: {err}") from None
    parts = Parts(out)
    if (out / "metrics.json").is_file() and not parts.done():
        print(f"{out} already holds this run's results (delete it to run again)")
        return json.loads((out / "metrics.json").read_text())
    task = evaluation.EvaluationTask(cfg, request, units)
    if not run_units(task, cfg, parts, lambda result: None):  # the parts are the whole output
        return {}  # another rank: rank zero merges
    report = evaluation.merge(cfg, request, task.scorer, parts.load(len(units)), task.target_prompt)
    write_results(out, "metrics", report, evaluation.markdown(report))
    parts.clear()
    print(f"wrote {out / 'metrics.json'} and {out / 'metrics.md'}")
    return report


if __name__ == "__main__":
    run(main)
