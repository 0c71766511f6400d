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
    path.joinpath("metrics.json").write_text(
        json.dumps({"methods": methods, "per_finding": per, "scored": 78, "images": 128})
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


@pytest.mark.parametrize(("free_inversion", "verdict"), [(0.73, "(within 0.05)"), (0.70, "(NOT within 0.05)")])
def test_the_verdict_follows_the_best_methods(tmp_path, tree, free_inversion, verdict):
    _attribution(tmp_path / "attribution", {"sdedit": 0.65, "inversion": 0.77, "refined": 0.76, "saliency": 0.05})
    _attribution(tmp_path / "freetext" / "attribution", {"sdedit": 0.6, "inversion": free_inversion, "refined": 0.5})
    _induction(tmp_path / "induction" / "nodule", "small nodule in the left lower zone", 0.25)
    _induction(tmp_path / "freetext" / "induction" / "nodule", "Small round nodule in the left lower lung.", 0.5)
    text = freetext_report.main([str(tmp_path), "--tree", str(tree), "--max-prompt-tokens", "16"])
    assert verdict in text and (tmp_path / "freetext" / "report.md").read_text() == text
    assert "| inversion | 0.770 |" in text and "saliency" not in text  # only the methods both models ran
    assert (
        "| nodule | small nodule in the left lower zone | Small round nodule in the left lower lung. | 0.250 / 0.500"
        in text
    )
    assert "6 training studies" in text


def test_a_missing_run_says_what_to_run(tmp_path, tree):
    with pytest.raises(FileNotFoundError, match="make demo-freetext"):
        freetext_report.main([str(tmp_path), "--tree", str(tree)])
