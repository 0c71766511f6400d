"""One page of what `make demo` measured: step times, then the tables the scripts wrote, with the commands.

    python experiments/demo_report.py [outputs/demo]

Reads ``timings.tsv`` (written by experiments/demo.sh), ``attribution/metrics.md``, ``evaluation/metrics.md`` and
``induction/<finding>/metrics.json``; writes ``report.md`` beside them and prints it. The README's tables are copied
from this file, so every number there traces back to a file a re-run rewrites.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

INDUCTION_COLUMNS = (
    ("inside_fraction", "change inside"), ("ssim_outside", "SSIM outside"),
    ("classifier_prob_before", "p before"), ("classifier_prob_after", "p after"),
    ("classifier_rise_fraction", "p rose"), ("edit_inside_fraction", "edit inside (no paste)"),
    ("edit_ssim_outside", "edit SSIM outside (no paste)"))


def timings(root: Path) -> list[str]:
    rows = [line.split("\t") for line in (root / "timings.tsv").read_text().splitlines() if line.strip()]
    total = sum(float(seconds) for _, seconds in rows)
    return ["| step | seconds |", "|---|---:|", *(f"| {name} | {float(s):.0f} |" for name, s in rows),
            f"| **total** | **{total:.0f}** ({total / 60:.1f} min) |"]


def induction(root: Path) -> list[str]:
    runs = sorted((root / "induction").glob("*/metrics.json"))
    if not runs:
        return ["(no induction run)"]
    lines = ["| finding | prompt | inductions | " + " | ".join(name for _, name in INDUCTION_COLUMNS) + " |",
             "|---|---|---:|" + "---:|" * len(INDUCTION_COLUMNS)]
    for path in runs:
        m = json.loads(path.read_text())
        cells = ["-" if m.get(key) is None else f"{m[key]:.3f}" for key, _ in INDUCTION_COLUMNS]
        lines.append(f"| {path.parent.name} | {m['prompt']} | {len(m['per_sample'])} | " + " | ".join(cells) + " |")
    return lines


def section(title: str, command: str, body: list[str] | str) -> list[str]:
    text = body if isinstance(body, str) else "\n".join(body)
    return [f"## {title}", "", f"`{command}`", "", text.strip(), ""]


def report(root: Path) -> str:
    lines = ["# What `make demo` measured", ""]
    lines += section("Time per step", "bash experiments/demo.sh", timings(root))
    lines += section("Healthy counterfactuals and attribution maps (held-out test phantoms)",
                     "python experiments/counterfactual_attribution.py output_dir=outputs/demo/attribution",
                     (root / "attribution" / "metrics.md").read_text())
    lines += section("Generation quality and prompt fidelity (held-out test phantoms)",
                     "python experiments/evaluate.py output_dir=outputs/demo/evaluation",
                     (root / "evaluation" / "metrics.md").read_text().split("\n", 1)[1])
    lines += section("Zero-shot localized disease induction (held-out normal test phantoms)",
                     "python experiments/zero_shot_induction.py finding=<finding> zone=<zone> "
                     "output_dir=outputs/demo/induction/<finding>", induction(root))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0] if argv else "outputs/demo")
    missing = [p for p in ("timings.tsv", "attribution/metrics.md", "evaluation/metrics.md") if not (root / p).is_file()]
    if missing:
        raise SystemExit(f"demo_report: {root} lacks {', '.join(missing)}: run `make demo` first")
    text = report(root)
    (root / "report.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
