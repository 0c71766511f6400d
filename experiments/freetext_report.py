"""Free-text training beside template prompts: what `make demo-freetext` measured, on one page.

    python experiments/freetext_report.py [outputs/demo] [--tree data/phantoms_mimic] [--max-prompt-tokens 32]

Reads the template-prompt model's ``attribution/metrics.json`` and ``induction/<finding>/metrics.json`` (from
`make demo`) and the free-text model's under ``freetext/`` (experiments/demo_freetext.sh); writes
``freetext/report.md`` and prints it (lightning_modules/runs/freetext.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lightning_modules.runs.cli import run
from lightning_modules.runs.freetext import report


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description="Free-text training beside template prompts, on one page.")
    parser.add_argument("root", nargs="?", default="outputs/demo", help="the demo's output folder")
    parser.add_argument("--tree", default="data/phantoms_mimic", help="the MIMIC-CXR-style tree trained on")
    parser.add_argument("--max-prompt-tokens", type=int, default=32, help="data.max_prompt_tokens of that training")
    args = parser.parse_args(argv)
    root = Path(args.root)
    text = report(root, Path(args.tree), args.max_prompt_tokens)
    (root / "freetext" / "report.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    run(main)
