"""Generation quality of a stage-2 checkpoint in the layout of VALD-MD's tables: per class and overall, FID, SSIM and
MS-SSIM of generated vs real images and of healthy counterfactuals vs their inputs, with the settings beside them;
and prompt fidelity: whether the finding classifier sees in the generated images what their prompts name.

    python experiments/evaluate.py [checkpoint=...] [data=covid_radiography data.root=...] [num_images=null] \
        [counterfactual.method=inversion] [generation.guidance_scale=6] \
        [fid.inception_weights=/path/to/weights-inception-2015-12-05-6726825d.pth]

Settings: the ``generation`` and ``counterfactual`` blocks (null: the checkpoint's own steps and guidance, else the
defaults of ``lightning_modules/settings.py``); the counterfactual target is the data's normal prompt. Writes
``<output_dir>/metrics.json`` and ``<output_dir>/metrics.md`` (the table with the settings used, also printed).
The run itself is ``lightning_modules/runs/evaluation.py``.
"""

from __future__ import annotations

from typing import Any

from lightning_modules.runs import evaluation
from lightning_modules.runs.cli import load_config, run, write_results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = load_config("evaluate", argv)
    try:
        request = evaluation.prepare(cfg)
    except ValueError as err:
        raise SystemExit(f"evaluate: {err}") from None
    report = evaluation.evaluate(cfg, request)
    out = write_results(cfg.output_dir, "metrics", report, evaluation.markdown(report))
    print(f"wrote {out / 'metrics.json'} and {out / 'metrics.md'}")
    return report


if __name__ == "__main__":
    run(main)
