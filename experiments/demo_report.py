"""One page of what `make demo` measured: step times, then the tables the scripts wrote, with the commands.

    python experiments/demo_report.py [outputs/demo] [--results docs/results.md] [--target demo]

Reads ``timings.tsv`` (written by experiments/demo.sh), ``autoencoder/round_trip.md``, ``attribution/metrics.md``,
``evaluation/metrics.md`` and ``induction/<finding>/metrics.json``; writes ``report.md`` beside them, the same text
to ``--results`` (default: the repository's ``docs/results.md``, which the README links instead of copying numbers)
and prints it. Every number in it traces back to a file a re-run rewrites.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lightning_modules.runs.cli import run
from lightning_modules.runs.report import report

#: the repository's copy of the report (the repository root is the parent of experiments/)
RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results.md"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description="Collect what `make demo` measured into one page.")
    parser.add_argument("root", nargs="?", default="outputs/demo", help="the demo's output folder")
    parser.add_argument(
        "--results", default=str(RESULTS), help="where the copy goes (default: docs/results.md of the repository)"
    )
    parser.add_argument("--target", default="demo", help="the make target that ran it, for the page's header")
    args = parser.parse_args(argv)
    root, results = Path(args.root), Path(args.results)
    missing = [
        p for p in ("timings.tsv", "attribution/metrics.md", "evaluation/metrics.md") if not (root / p).is_file()
    ]
    if missing:
        raise SystemExit(f"demo_report: {root} lacks {', '.join(missing)}: run `make {args.target}` first")
    text = report(root, args.target)
    (root / "report.md").write_text(text)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    run(main)
