"""Training writes counterfactual grids, generation metrics and hparams to TensorBoard; experiments/evaluate.py
writes the VALD-MD-style table of a checkpoint; bad requests stop before any model is loaded."""

from __future__ import annotations

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import default_collate

from datamodules.synthetic import FINDINGS, SyntheticCXRDataModule
from experiments import evaluate, train
from lightning_modules.checkpoints import read_hparams
from lightning_modules.classifier import CALLED
from lightning_modules.generation_metrics import evaluation_images
from lightning_modules.pipeline import LatentDiffusionPipeline
from lightning_modules.prompt_fidelity import prompt_fidelity
from lightning_modules.settings import SamplingSettings, SDEditSettings
from tests.helpers import classifier_checkpoint

# steps and guidance left null: the checkpoint's own (experiment=smoke trains with 2 steps)
FAST = ["num_images=8", "batch_size=4", "fid.inception=false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_vae_dir):
    """A smoke training run of 2 steps with a validation after each, and a classifier for fid_domain."""
    log_dir = tmp_path_factory.mktemp("logs")
    classifier = classifier_checkpoint(log_dir / "classifier.ckpt", FINDINGS)
    train.main(
        [
            "experiment=smoke",
            f"log_dir={log_dir}",
            f"model.vae.path={tiny_vae_dir}",
            "trainer.max_steps=2",
            "trainer.val_check_interval=1",
            "callbacks.samples.samples_per_prompt=1",
            f"callbacks.generation_metrics.classifier_checkpoint={classifier}",
        ]
    )
    return log_dir, classifier


def test_training_logs_grids_generation_metrics_and_hparams(run):
    log_dir, _ = run
    (events_dir,) = (log_dir / "ldm").glob("version_*")
    events = EventAccumulator(str(events_dir), size_guidance={"images": 0, "scalars": 0}).Reload()
    grids = events.Images("counterfactuals/rows")
    assert [g.step for g in grids] == [1, 2]  # every validation, not the sanity check
    assert (grids[0].height - 2) // (64 + 2) == 4  # input, counterfactual, attribution, lesion mask rows
    scalars = set(events.Tags()["scalars"])
    expected = {
        f"generation/{pair}/{name}"
        for pair in ("generated", "counterfactual")
        for name in ("ssim", "ms_ssim", "fid_domain")
    }
    assert expected <= scalars
    assert len(events.Scalars("generation/counterfactual/ssim")) == 1  # every 2nd validation
    assert 0.0 <= events.Scalars("generation/generated/ms_ssim")[0].value <= 1.0
    assert {"hparams/val/loss", "hparams/generation/counterfactual/fid_domain"} <= scalars
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")


def test_evaluate_writes_the_per_class_table_with_its_settings(run, tmp_path, capsys):
    log_dir, classifier = run
    checkpoint = log_dir / "ldm" / "checkpoints" / "last.ckpt"
    report = evaluate.main(
        [
            f"checkpoint={checkpoint}",
            f"classifier_checkpoint={classifier}",
            f"output_dir={tmp_path / 'out'}",
            *FAST,
            "generation.guidance_scale=6",
        ]
    )
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"])) and saved["num_images"] == 8
    results = saved["results"]
    assert list(results) == ["overall", "Normal", *FINDINGS]
    assert results["overall"]["n"] == 8 and sum(results[c]["n"] for c in ("Normal", *FINDINGS)) >= 8
    for pair in ("generated", "counterfactual"):
        overall = results["overall"][pair]
        assert 0 < overall["ssim"] <= 1 and 0 <= overall["ms_ssim"] <= 1 and overall["fid_domain"] > 0
        assert overall["fid"] is None  # Inception FID off: kept as null, with the reason in the notes
    assert any(note.startswith("fid skipped") for note in saved["notes"])
    settings = saved["settings"]  # as resolved: null -> the checkpoint's steps and guidance, else the given value
    sampling = read_hparams(checkpoint)["sampling"]
    assert sampling["num_inference_steps"] == 2 and sampling["guidance_scale"] not in (6.0, 3.0)
    assert settings["generated"] == {
        "num_inference_steps": 2,
        "guidance_scale": 6.0,
        "prompts": "each real image's own prompt",
    }
    assert settings["counterfactual"] == {
        "method": "sdedit",
        "num_inference_steps": 2,
        "guidance_scale": sampling["guidance_scale"],
        "strength": 0.5,
        "target_prompt": SyntheticCXRDataModule().normal_prompt,
    }
    assert settings["ms_ssim"]["scales"] == 3 and "fid_domain" in settings["fid_extractors"]

    table = (tmp_path / "out" / "metrics.md").read_text()
    assert table in capsys.readouterr().out
    assert "| Class | n | FID (Inception) ↓ | FID (domain) ↓ | SSIM ↑ | MS-SSIM ↑ |" in table
    assert "| **overall** | 8 |" in table and "3 scales, 11-px" in table
    assert "DDIM steps 2, guidance 6.0;" in table
    assert f"method sdedit, DDIM steps 2, guidance {float(sampling['guidance_scale'])}, strength 0.5;" in table

    fidelity = saved["prompt_fidelity"]  # from the same generated images, scored by the same classifier
    assert list(fidelity) == [*FINDINGS, "Normal"] and fidelity["Normal"]["score"] == "abnormal"
    normal = fidelity["Normal"]
    assert normal["n"] == results["Normal"]["n"] and normal["n"] + normal["n_reference"] == 8
    for row in fidelity.values():
        for images in ("generated", "real"):
            assert row[images]["p_reference"] is None or 0 <= row[images]["p_reference"] <= 1
    assert "## Prompt fidelity of the generated images (finding classifier)" in table
    assert f"| Normal | p(abnormal) | {normal['n']} vs {normal['n_reference']} any finding |" in table


def test_evaluate_without_a_classifier_skips_prompt_fidelity_with_a_note(run, tmp_path):
    log_dir, _ = run
    report = evaluate.main(
        [
            f"checkpoint={log_dir / 'ldm' / 'checkpoints' / 'last.ckpt'}",
            f"output_dir={tmp_path / 'out'}",
            f"classifier_checkpoint={tmp_path / 'none.ckpt'}",
            *FAST,
            "num_images=2",
        ]
    )
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert "prompt_fidelity" in saved and saved["prompt_fidelity"] is None
    assert f"prompt_fidelity skipped: no classifier checkpoint at {tmp_path / 'none.ckpt'}" in report["notes"][-1]
    assert "Prompt fidelity" not in (tmp_path / "out" / "metrics.md").read_text()


def test_evaluate_with_a_classifier_of_other_findings_keeps_fid_domain_and_skips_prompt_fidelity(run, tmp_path):
    """The phantom classifier on the COVID-layout classes: its features still serve fid_domain, its outputs cannot
    judge prompts naming findings it never learned."""
    log_dir, _ = run
    other = classifier_checkpoint(tmp_path / "other.ckpt", ("COVID", "Lung_Opacity"))
    report = evaluate.main(
        [
            f"checkpoint={log_dir / 'ldm' / 'checkpoints' / 'last.ckpt'}",
            f"output_dir={tmp_path / 'out'}",
            f"classifier_checkpoint={other}",
            *FAST,
            "num_images=2",
        ]
    )
    assert report["prompt_fidelity"] is None
    assert report["results"]["overall"]["generated"]["fid_domain"] is not None
    assert (
        "prompt_fidelity skipped: classifier_checkpoint was not trained on this data's findings (unknown finding "
        "'nodule'" in report["notes"][-1]
    )


def test_prompt_fidelity_compares_each_prompt_with_its_reference():
    """Hand-made scores: per finding, p(f) on images naming f vs on normal ones; for Normal, p(abnormal)."""
    names = ("nodule", "effusion", "mass")
    labels = torch.tensor([[1, 0, 0], [0, 0, 0], [0, 0, 0], [1, 1, 0], [0, 1, 0]]).float()
    generated = torch.tensor(
        [  # p(nodule), p(effusion), p(mass), p(abnormal)
            [0.9, 0.1, 0.2, 0.8],
            [0.2, 0.3, 0.1, 0.3],
            [0.5, 0.1, 0.3, 0.6],
            [0.4, 0.7, 0.2, 0.9],
            [0.1, 0.2, 0.2, 0.4],
        ]
    )
    real = torch.cat([labels, labels.amax(1, keepdim=True)], 1) * 0.6 + 0.2  # separates every set perfectly
    fidelity = prompt_fidelity({"generated": generated, "real": real}, labels, names)

    nodule, effusion, normal = fidelity["nodule"], fidelity["effusion"], fidelity["Normal"]
    assert (nodule["n"], nodule["n_reference"], nodule["reference"]) == (2, 2, "Normal")
    assert nodule["generated"] == pytest.approx({"p_prompted": 0.65, "called": 0.5, "p_reference": 0.35, "auroc": 0.75})
    assert effusion["generated"] == pytest.approx(
        {"p_prompted": 0.45, "called": 0.5, "p_reference": 0.2, "auroc": 0.75}
    )
    # Normal: p(abnormal) on the 2 normal images vs the 3 with a finding; 5 of the 6 pairs ordered as they should be;
    # one of the two normal samples (0.6) is called abnormal
    assert (normal["score"], normal["n"], normal["n_reference"]) == ("abnormal", 2, 3)
    assert normal["generated"] == pytest.approx({"p_prompted": 0.45, "called": 0.5, "p_reference": 0.7, "auroc": 5 / 6})
    assert nodule["real"]["auroc"] == effusion["real"]["auroc"] == normal["real"]["auroc"] == 1.0
    assert nodule["real"]["called"] == effusion["real"]["called"] == 1.0 and normal["real"]["called"] == 0.0
    assert fidelity["mass"]["n"] == 0  # nothing prompted with it
    assert fidelity["mass"]["generated"]["auroc"] is None and fidelity["mass"]["generated"]["called"] is None
    assert fidelity["mass"]["generated"]["p_reference"] == pytest.approx(0.2)

    # an image with an unknown label is normal for no one: image 2 leaves every reference set
    mask = torch.ones_like(labels)
    mask[2, 1] = 0
    masked = prompt_fidelity({"generated": generated}, labels, names, mask)
    assert masked["nodule"]["n_reference"] == 1 and masked["nodule"]["generated"]["auroc"] == 1.0
    assert masked["Normal"]["generated"]["p_prompted"] == pytest.approx(0.3)
    assert masked["Normal"]["generated"]["called"] == 0.0  # the one left (0.3) is not called abnormal

    # a probability exactly at the threshold is called, as induction's "recognised" counts it
    at = prompt_fidelity(
        {"generated": torch.tensor([[CALLED, CALLED], [0.1, 0.1]])}, torch.tensor([[1.0], [0.0]]), ["a"]
    )
    assert at["a"]["generated"]["called"] == 1.0


def test_each_image_gets_the_same_noise_whatever_its_batch(tiny_pipeline):
    """Per-image seeds: the numbers do not depend on batch size, order or DDP rank."""
    pipeline = tiny_pipeline
    dataset = SyntheticCXRDataModule(num_val=4).dataset("val")
    batch = default_collate([dataset[i] for i in range(4)])
    settings = dict(
        generation=SamplingSettings(num_inference_steps=2, guidance_scale=3.0),
        counterfactual=SDEditSettings(num_inference_steps=2, strength=0.5),
        seed=3,
    )
    whole = evaluation_images(pipeline, batch, **settings)
    reversed_halves = [
        evaluation_images(pipeline, {k: v[part] for k, v in batch.items()}, **settings)
        for part in (slice(2, 4), slice(0, 2))
    ]
    for pair in ("generated", "counterfactual"):
        torch.testing.assert_close(
            torch.cat([h[pair] for h in reversed_halves[::-1]]), whole[pair], atol=1e-5, rtol=1e-4
        )
    assert not torch.allclose(whole["generated"][0], whole["generated"][1], atol=1e-3)  # yet each its own noise


@pytest.mark.parametrize(
    "override, message",
    [
        ("checkpoint=/nonexistent/last.ckpt", "checkpoint: no file at /nonexistent/last.ckpt"),
        (
            "counterfactual.method=paint",
            "counterfactual: unknown counterfactual method 'paint'; valid: sdedit, inversion",
        ),
        ("counterfactual.strength=1.5", "counterfactual: strength must be in \\(0, 1\\]"),
        ("counterfactual.inversion_depth=0.01", None),  # sdedit ignores the inversion depth: no error, the run goes on
        ("generation.guidance_scale=-1", "generation.guidance_scale must be a number >= 0"),
        ("generation.num_inference_steps=0", "generation.num_inference_steps must be an integer >= 1"),
        ("split=holdout", "split 'holdout'"),
        ("num_images=0", "num_images must be an integer >= 1 or null"),
        ("fid.inception=true", "weights-inception-2015-12-05-6726825d.pth"),
    ],
)
def test_bad_requests_stop_before_any_model_is_loaded(override, message, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no Inception weights there

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(LatentDiffusionPipeline, "from_checkpoint", load)
    checkpoint = tmp_path / "model.ckpt"  # only the defaults the settings are built over
    torch.save(
        {
            "state_dict": {},
            "hyper_parameters": {"unet": {}, "sampling": {"num_inference_steps": 25, "guidance_scale": 10.0}},
        },
        checkpoint,
    )
    argv = [f"checkpoint={checkpoint}", f"output_dir={tmp_path / 'out'}", override]
    if message is None:
        with pytest.raises(AssertionError, match="a model was loaded"):
            evaluate.main(argv)
    else:
        with pytest.raises(SystemExit, match=f"^(evaluate: cannot run: .*|config error: ){message}"):
            evaluate.main(argv)
