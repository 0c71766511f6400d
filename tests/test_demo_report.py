"""The demo's one-page report: built from the files the demo's scripts write, refusing when they are missing.

Every test passes ``--results`` into ``tmp_path``: nothing here writes the repository's docs/results.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments import demo_report
from lightning_modules.methods import METHODS
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


def test_scorecard_reads_each_target_from_the_runs_files_and_says_which_are_met(tmp_path):
    """The best method is ours with the highest AUPRC (a baseline scoring higher is not it); "every finding" targets
    are their weakest finding; a target the run did not measure is listed and not met; the held-out AUPRC goal is
    0.80."""
    assert {name for name, method in METHODS.items() if method.ours} == {"sdedit", "inversion", "refined"}
    (tmp_path / "timings.tsv").write_text("stage 2: latent diffusion\t600\ninduction\t300\n")
    files = {
        "autoencoder/round_trip.json": {"test/round_trip_ssim": 0.93, "test/round_trip_mae": 0.02},
        "attribution/metrics.json": {
            "methods": {
                "sdedit": {"auprc": 0.70, "validity": 0.99, "twin_distance": 0.04},
                "refined": {"auprc": 0.82, "validity": 0.92, "twin_distance": 0.004},
                "diffedit": {"auprc": 0.95},
            },
            "per_finding": {"refined": {"nodule": {"auprc": 0.71}, "effusion": {"auprc": 0.9}}},
        },
        **{
            f"induction/{finding}/metrics.json": {
                "prompt": finding,
                "per_sample": [{}],
                "classifier_recognised_fraction": recognised,
                "edit_inside_fraction": None,
            }
            for finding, recognised in (("nodule", 0.5), ("effusion", 0.9))
        },
        "evaluation/metrics.json": {
            "prompt_fidelity": {
                "nodule": {"generated": {"auroc": 0.95}},
                "effusion": {"generated": {"auroc": 0.91}},
                "Normal": {"generated": {"called": 0.15, "auroc": 0.5}},  # not a finding's fidelity
            }
        },
    }
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(json.dumps(content))
    for part in ("attribution", "evaluation"):
        (tmp_path / part / "metrics.md").write_text("# title\n\n| a |\n|---|\n")

    text = demo_report.main([str(tmp_path), "--results", str(tmp_path / "results.md")])
    card = text.split("## Targets (issue #14)")[1].split("## Time per step")[0]
    assert "| stage 1 round trip SSIM | ≥ 0.92 | 0.930 | yes |" in card
    assert "| stage 1 round trip MAE | ≤ 0.015 | 0.0200 | **no** |" in card
    assert "| attribution AUPRC of our best method | ≥ 0.85 | 0.820 (refined) | **no** |" in card
    assert "| ≥ 0.75 | 0.710 (refined; weakest nodule; effusion 0.90, nodule 0.71) | **no** |" in card
    assert "| the best method's distance to the true healthy twin | ≤ 0.02 | 0.004 (refined) | yes |" in card
    assert "| ≥ 0.8 | 0.500 (weakest nodule; effusion 0.90, nodule 0.50) | **no** |" in card
    assert "| induction: change inside the region before the paste | ≥ 0.9 | not measured | **no** |" in card
    assert "| normal-prompted samples called abnormal | ≤ 0.15 | 0.150 | yes |" in card
    assert "| prompt fidelity AUROC, every finding | ≥ 0.9 | 0.910 (weakest effusion;" in card
    assert "| wall time, minutes | ≤ 20 | 15.0 (this machine) | yes |" in card
    assert "5 of 11 met (test split)" in card  # the unmeasured target counts as not met

    heldout = demo_report.main([str(tmp_path), "--results", str(tmp_path / "r.md"), "--target", "demo-heldout"])
    assert "| attribution AUPRC of our best method | ≥ 0.8 | 0.820 (refined) | yes |" in heldout
