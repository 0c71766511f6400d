"""The demo's one-page report: built from the files the demo's scripts write, refusing when they are missing.

Every test passes ``--results`` into ``tmp_path``: nothing here writes the repository's docs/results.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments import demo_report
from lightning_modules.runs.report import HEADER

REPO = Path(__file__).resolve().parent.parent  # tests/ sits in the repository root


def test_report_collects_timings_tables_and_induction_means(tmp_path):
    (tmp_path / "timings.tsv").write_text("stage 1: autoencoder\t240\nstage 2: latent diffusion\t540\n")
    (tmp_path / "attribution").mkdir()
    (tmp_path / "attribution" / "metrics.md").write_text("| method | AUPRC |\n|---|---|\n| inversion | 0.733 |\n")
    (tmp_path / "evaluation").mkdir()
    (tmp_path / "evaluation" / "metrics.md").write_text("# title line dropped\n\n| Class | n |\n|---|---|\n")
    run = tmp_path / "induction" / "effusion"
    run.mkdir(parents=True)
    run.joinpath("metrics.json").write_text(
        json.dumps(
            {
                "prompt": "small left pleural effusion",
                "per_sample": [{}] * 6,
                "inside_fraction": 1.0,
                "ssim_outside": 0.98765,
                "classifier_prob_before": 0.1,
                "classifier_prob_after": 0.4,
                "classifier_recognised_fraction": 1 / 6,
                "classifier_rise_fraction": 5 / 6,
                "edit_inside_fraction": None,
            }
        )
    )

    results = tmp_path / "docs" / "results.md"
    text = demo_report.main([str(tmp_path), "--results", str(results)])
    row = "| effusion | small left pleural effusion | 6 | 1.000 | 0.988 | 0.100 | 0.400 | 0.167 | 0.833 | - | - | - |"
    assert row in text  # no evaluation metrics.json: no reference recall

    # the classifier's recall on real effusions (evaluation's prompt fidelity) sits beside the induced share
    fidelity = {"effusion": {"real": {"called": 0.75}, "generated": {"called": 0.25}}, "Normal": {"real": {}}}
    (tmp_path / "evaluation" / "metrics.json").write_text(json.dumps({"prompt_fidelity": fidelity}))
    text = demo_report.main([str(tmp_path), "--results", str(results)])

    assert (tmp_path / "report.md").read_text() == text == results.read_text()
    assert text.splitlines()[2] == HEADER.format(target="demo")
    assert "re-run `make demo`" in text and "do not edit by hand" in text
    assert "| **total** | **780** (13.0 min) |" in text
    assert "| inversion | 0.733 |" in text and "title line dropped" not in text
    row = (
        "| effusion | small left pleural effusion | 6 | 1.000 | 0.988 | 0.100 | 0.400 | 0.167 | 0.833 | - | - | 0.750 |"
    )
    assert row in text

    heldout = demo_report.main([str(tmp_path), "--results", str(results), "--target", "demo-heldout"])
    assert heldout.startswith("# What `make demo-heldout` measured") and "re-run `make demo-heldout`" in heldout


def test_report_names_what_is_missing(tmp_path):
    (tmp_path / "timings.tsv").write_text("")
    results = tmp_path / "results.md"
    with pytest.raises(SystemExit, match="attribution/metrics.md, evaluation/metrics.md: run `make demo` first"):
        demo_report.main([str(tmp_path), "--results", str(results)])
    assert not results.exists()


def test_results_default_to_the_repositorys_docs():
    assert demo_report.RESULTS == REPO / "docs" / "results.md"


def test_the_wall_time_is_also_given_in_the_machines_own_unit(tmp_path):
    """With the reference the demo times first, the report says how many UNet steps the run took and what step time
    would fit the budget: 780 s at 0.5 s a step is 1560 steps, which fit 20 min at <= 1200 / 1560 = 0.769 s."""
    (tmp_path / "timings.tsv").write_text("machine reference\t20\nstage 2: latent diffusion\t760\n")
    for part in ("attribution", "evaluation"):
        (tmp_path / part).mkdir()
        (tmp_path / part / "metrics.md").write_text("# title\n\n| a |\n|---|\n")
    results = tmp_path / "results.md"
    assert "such steps" not in demo_report.main([str(tmp_path), "--results", str(results)])  # no reference: no line
    (tmp_path / "reference").mkdir()
    reference = {
        "unet_step_seconds": 0.5,
        "unet_step": "UNet forward + backward at batch 64, 30.0 GFLOP",
        "matmul_peak_flops": 9.6e10,
        "repeats": 5,
        "environment": {"cpu": "AMD EPYC", "num_threads": 2},
    }
    (tmp_path / "reference" / "reference.json").write_text(json.dumps(reference))
    text = demo_report.main([str(tmp_path), "--results", str(results)])
    assert "**0.500 s** (median of 5; float32 matmul peak 96 GFLOP/s, AMD EPYC, 2 threads)" in text
    assert "The run took **1560** such steps: it fits 20 min on a machine where that step takes ≤ 0.769 s." in text
