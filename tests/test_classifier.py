"""The independent finding classifier: outputs, saliency that points at the evidence, masked loss, checkpoints, CLI."""

from __future__ import annotations

import warnings

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from configs import compose
from datamodules.synthetic import FINDINGS
from experiments import train_classifier
from lightning_modules.classifier import FindingClassifier

SIZE = 64


def classifier(names=FINDINGS) -> FindingClassifier:
    cfg = compose("train_classifier", ["experiment=smoke"]).model.classifier
    return FindingClassifier(finding_names=list(names), **OmegaConf.to_container(cfg))


def blob_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise films, half of them with one bright disc somewhere: images, label (n, 1), disc masks."""
    images = 0.2 * torch.randn(n, 1, SIZE, SIZE, generator=generator) - 0.5
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    centres = torch.randint(10, SIZE - 10, (n, 2), generator=generator)
    masks = ((yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2 <= 25).float()[:, None]
    labels = (torch.arange(n) % 2).float()[:, None]
    return images + 1.2 * masks * labels[..., None, None], labels, masks * labels[..., None, None]


def test_outputs_features_and_saliency_shapes():
    model = classifier().eval()
    images = torch.rand(3, 1, SIZE, SIZE) * 2 - 1
    assert model(images).shape == (3, len(FINDINGS) + 1)
    probabilities = model.probabilities(images)
    assert probabilities.shape == (3, 5) and ((probabilities > 0) & (probabilities < 1)).all()
    assert torch.allclose(model.abnormal_probability(images), probabilities[:, -1])
    assert model.features(images).shape == (3, 128)
    for method in ("gradcam", "gradient_x_input"):
        saliency = model.saliency(images, target=model.index("effusion"), method=method)
        assert saliency.shape == (3, 1, SIZE, SIZE) and (saliency >= 0).all() and saliency.sum() > 0
    assert model.index("abnormal") == 4
    with pytest.raises(ValueError, match="valid: gradcam"):
        model.saliency(images, method="lime")
    with pytest.raises(ValueError, match="valid: nodule"):
        model.index("pneumothorax")


def test_saliency_concentrates_on_the_evidence_after_a_few_seconds_of_training():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = classifier(names=("blob",))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        images, labels, _ = blob_batch(32, generator)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(images)[:, :1], labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    images, labels, masks = blob_batch(16, generator)
    positives = labels[:, 0] > 0
    assert model.probabilities(images)[positives, 0].mean() > model.probabilities(images)[~positives, 0].mean() + 0.3
    # Grad-CAM lives on the last feature map (1/32 of the side, upsampled), so it cannot be as sharp as the gradient
    for method, least in (("gradcam", 1.5), ("gradient_x_input", 3.0)):
        saliency = model.saliency(images[positives], target=0, method=method)
        mask = masks[positives]
        # mass per pixel on the disc over mass per pixel on the film: 1 is chance
        concentration = ((saliency * mask).sum((1, 2, 3)) / mask.sum((1, 2, 3))) / saliency.mean((1, 2, 3))
        assert concentration.median() > least, (method, concentration)


def test_label_mask_leaves_masked_entries_out_of_the_loss():
    model = classifier().eval()
    images = torch.rand(4, 1, SIZE, SIZE) * 2 - 1
    label = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]])
    label_mask = torch.tensor([[1.0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer

        def loss(lab: torch.Tensor) -> torch.Tensor:
            return model._common_step({"image": images, "label": lab, "label_mask": label_mask}, "val")

        base = loss(label)
        flipped_masked = label.clone()
        flipped_masked[0, 1] = flipped_masked[3, 0] = 1.0  # the masked entries (and row 3's unknown "abnormal")
        flipped_known = label.clone()
        flipped_known[1, 2] = 1.0
        assert torch.allclose(loss(flipped_masked), base)
        assert not torch.allclose(loss(flipped_known), base)
        unmasked = model._common_step({"image": images, "label": flipped_masked}, "val")
        assert not torch.allclose(unmasked, base)


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    model = classifier().eval()
    path = tmp_path / "classifier.ckpt"
    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}, path)
    loaded = FindingClassifier.from_checkpoint(str(path))
    images = torch.rand(2, 1, SIZE, SIZE) * 2 - 1
    assert not loaded.training and loaded.output_names == model.output_names
    assert torch.equal(loaded(images), model(images))


def test_train_classifier_smoke_end_to_end(tmp_path):
    checkpoint = train_classifier.main(["experiment=smoke", f"log_dir={tmp_path}"])
    run = tmp_path / "classifier"
    assert checkpoint == run / "checkpoints" / "last.ckpt" and (run / "checkpoints" / "best.ckpt").is_file()
    model = FindingClassifier.from_checkpoint(str(checkpoint))
    assert model.output_names == (*FINDINGS, "abnormal")
    events = EventAccumulator(str(next(run.glob("version_*"))), size_guidance={"scalars": 0}).Reload()
    assert {"train/loss", "val/loss", "val/auroc", "val/auroc/nodule"} <= set(events.Tags()["scalars"])
