"""`make demo-freetext`'s page: the two models side by side, and a verdict that follows the numbers."""

from __future__ import annotations

import json

import pytest

from datamodules.mimic_phantoms import main as write_tree
from experiments import freetext_report


def _attribution(path, auprc: dict[str, float]):
    path.mkdir(parents=True)
    per = {m: {"nodule": {"auprc": a - 0.1}, "effusion": {"auprc": a + 0.1}} for m, a in auprc.items()}
    methods = {m: {"auprc": a, "validity": 0.9} for m, a in auprc.items()}
    settings = {m: {"steps": 50} for m in auprc} | {"map": {"sigma": 2.0}}
    path.joinpath("metrics.json").write_text(
        json.dumps({"methods": methods, "per_finding": per, "scored": 78, "images": 128, "settings": settings})
    )


def _induction(path, prompt: str, recognised: float):
    path.mkdir(parents=True)
    keys = ("classifier_rise_fraction", "inside_fraction")
    path.joinpath("metrics.json").write_text(
        json.dumps({"prompt": prompt, "classifier_recognised_fraction": recognised, **dict.fromkeys(keys, 0.5)})
    )


@pytest.fixture
def tree(tmp_path):
    write_tree(["--out", str(tmp_path / "tree"), "--image-size", "16", "--num-train", "6", "--num-val", "1",
                "--num-test", "1"])  # fmt: skip
    return tmp_path / "tree"


@pytest.mark.parametrize(
    ("free_refined", "verdict"),
    [(0.71, "within 0.05 of the template-prompt model: yes** (largest loss: refined, 0.050)"), (0.70, ": NO**")],
)
def test_the_verdict_asks_every_method_to_hold(tmp_path, tree, free_refined, verdict):
    _attribution(tmp_path / "attribution", {"sdedit": 0.65, "inversion": 0.77, "refined": 0.76, "saliency": 0.05})
    _attribution(tmp_path / "freetext" / "attribution", {"sdedit": 0.64, "inversion": 0.78, "refined": free_refined})
    _induction(tmp_path / "induction" / "nodule", "small nodule in the left lower zone", 0.25)
    _induction(tmp_path / "freetext" / "induction" / "nodule", "Small round nodule in the left lower lung.", 0.5)
    text = freetext_report.main([str(tmp_path), "--tree", str(tree), "--max-prompt-tokens", "16"])
    assert verdict in text and (tmp_path / "freetext" / "report.md").read_text() == text
    assert "| inversion | 0.770 | 0.780 | +0.010 |" in text and "saliency" not in text  # the methods both ran
    assert (
        "| nodule | small nodule in the left lower zone | Small round nodule in the left lower lung. | 0.250 / 0.500"
        in text
    )
    assert "6 training studies" in text


def test_runs_scored_differently_are_not_compared(tmp_path, tree):
    _attribution(tmp_path / "attribution", {"inversion": 0.77})
    _attribution(tmp_path / "freetext" / "attribution", {"inversion": 0.78})
    path = tmp_path / "freetext" / "attribution" / "metrics.json"
    path.write_text(path.read_text().replace('"steps": 50', '"steps": 25'))
    with pytest.raises(ValueError, match="differ in their inversion settings"):
        freetext_report.main([str(tmp_path), "--tree", str(tree)])


def test_a_missing_run_says_what_to_run(tmp_path, tree):
    with pytest.raises(FileNotFoundError, match="make demo-freetext"):
        freetext_report.main([str(tmp_path), "--tree", str(tree)])
