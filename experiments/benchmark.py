"""Performance benchmark: training and counterfactual throughput of ours against the references, in one process.

    python experiments/benchmark.py                              # default CPU sizes -> outputs/bench/bench.{json,md}
    python experiments/benchmark.py compile=false                # eager lines only (no 2 minutes of compilation)
    python experiments/benchmark.py --quick output_dir=/tmp/b    # tiny networks, 3 repeats: a smoke check (< 30 s)
    python experiments/benchmark.py trainer=gpu repeats=10       # one GPU, bf16 training profile
    python experiments/benchmark.py --reference output_dir=D      # this machine's speed: the UNet step, matmul peak

Random weights and fixed random inputs, so it runs on a fresh clone. The lines and the report are
``lightning_modules/runs/benchmark.py``; the timing harness is ``lightning_modules/runs/timing.py``.
"""

from __future__ import annotations

import sys

from lightning_modules.runs import benchmark
from lightning_modules.runs.cli import load_config, run, write_results
from lightning_modules.runs.report import reference_text


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    quick, only_reference = "--quick" in argv, "--reference" in argv
    preset = [*(benchmark.QUICK if quick else []), *(benchmark.REFERENCE if only_reference else [])]
    cfg = load_config("benchmark", [*preset, *(a for a in argv if a not in ("--quick", "--reference"))])
    if only_reference:
        result = benchmark.reference(cfg)
        out = write_results(cfg.output_dir, "reference", result, reference_text(result) + "\n")
        print(f"wrote {out / 'reference.json'}")
        return result
    try:
        settings = benchmark.benchmark_settings(cfg)  # checked before anything is built or timed
    except ValueError as err:
        raise SystemExit(f"benchmark: {err}") from None

    result = benchmark.run(cfg, settings, quick)
    out = write_results(cfg.output_dir, "bench", result, benchmark.markdown(result))
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return result


if __name__ == "__main__":
    run(main)
