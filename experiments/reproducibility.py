"""Which machine settings change a seeded training run: `make repro` -> outputs/repro/reproducibility.{json,md}.

    python experiments/reproducibility.py [steps=12] [output_dir=...]

The variants are configs/reproducibility.yaml's; the runs are lightning_modules/runs/reproducibility.py's.
"""

from __future__ import annotations

from lightning_modules.runs import reproducibility
from lightning_modules.runs.cli import load_config, run, write_results


def main(argv: list[str] | None = None) -> list[dict]:
    cfg = load_config("reproducibility", argv)
    rows = reproducibility.compare(cfg)
    write_results(cfg.output_dir, "reproducibility", rows, reproducibility.markdown(rows, cfg))
    return rows


if __name__ == "__main__":
    run(main)
