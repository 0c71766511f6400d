"""The independent finding classifier: the judge of counterfactuals, trained on the same data as the generator.

It scores what the generator cannot score about itself: whether a healthy counterfactual is called healthy
(validity), whether an induced finding is recognised, a gradient saliency baseline to compare attribution maps
against, and the pooled features of a domain FID. Outputs are the K findings of the DataModule plus "abnormal"
(any finding), last.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchmetrics.classification import MultilabelAUROC
from torchvision.models.regnet import BlockParams, RegNet

from lightning_modules.checkpoints import read_checkpoint
from lightning_modules.optim import adamw_with_warmup, grad_scaled

ABNORMAL = "abnormal"
#: the classifier calls an output present at or above this probability (induction's "recognised", fidelity's "called")
CALLED = 0.5
SALIENCY_METHODS = ("gradcam", "gradient_x_input")


def build_network(num_classes: int, arch: str = "regnet", **kwargs) -> nn.Module:
    """A torchvision classifier with a 1-channel first convolution.

    ``arch="regnet"`` builds a ``torchvision.models.RegNet`` from ``depths``, ``widths``, ``group_width``,
    ``stem_width`` and ``strides`` (small enough for the CPU); any other ``arch`` is a torchvision builder name
    (``resnet18``, ``regnet_y_400mf``, ``efficientnet_b0`` ...) called with ``weights=None`` and ``kwargs``.
    """
    if arch == "regnet":
        depths, widths = kwargs.pop("depths"), kwargs.pop("widths")
        group_width = kwargs.pop("group_width", 8)
        params = BlockParams(
            depths,
            widths,
            group_widths=[min(group_width, w) for w in widths],
            bottleneck_multipliers=[1.0] * len(depths),
            strides=kwargs.pop("strides", [2] * len(depths)),
        )
        network = RegNet(params, num_classes=num_classes, **kwargs)
    else:
        network = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    if not isinstance(getattr(network, "avgpool", None), nn.Module):
        raise ValueError(
            f"classifier network '{arch}' has no `avgpool` module; Grad-CAM and features need one "
            "(resnet*, regnet*, mobilenet_v3*, efficientnet*, convnext*)"
        )
    name, conv = next((n, m) for n, m in network.named_modules() if isinstance(m, nn.Conv2d))
    network.set_submodule(
        name,
        nn.Conv2d(
            1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=conv.bias is not None
        ),
    )
    return network


def abnormal_target(labels: torch.Tensor, label_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) "any finding" and whether it is known: yes if a known finding is present or every finding is known."""
    if label_mask is None:
        return labels.amax(1), torch.ones_like(labels[:, 0])
    present = (labels * label_mask).amax(1)
    return present, torch.maximum(present, label_mask.amin(1))


class FindingClassifier(L.LightningModule):
    """Multi-label BCE over ``finding_names`` + "abnormal"; entries with ``label_mask`` 0 are left out of the loss."""

    def __init__(
        self, finding_names: Sequence[str], network: dict, optimizer: dict | None = None, total_steps: int | None = None
    ):
        super().__init__()
        self.save_hyperparameters()
        self.output_names = (*finding_names, ABNORMAL)
        self.network = build_network(len(self.output_names), **network)
        # per-output AUROC, accumulated over the epoch; torchmetrics syncs the states across DDP processes
        self.auroc = nn.ModuleDict(
            {
                f"{stage}_auroc": MultilabelAUROC(len(self.output_names), average=None, ignore_index=-1)
                for stage in ("train", "val")
            }
        )

    @classmethod
    def from_checkpoint(cls, path: str, map_location: str | torch.device = "cpu") -> FindingClassifier:
        """Rebuild from a Lightning checkpoint with ``weights_only=True`` loading (no pickled code is executed)."""
        checkpoint = read_checkpoint(path, "finding classifier", map_location=map_location)
        module = cls(**checkpoint["hyper_parameters"])
        module.load_state_dict(checkpoint["state_dict"])
        return module.eval()

    def index(self, name: str) -> int:
        """Output index of a finding name (or "abnormal")."""
        if name not in self.output_names:
            raise ValueError(f"unknown finding '{name}'; valid: {', '.join(self.output_names)}")
        return self.output_names.index(name)

    # ------------------------------------------------------------------------------------------------ scoring

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)  # (B, 1, H, W) -> (B, K + 1) logits

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return self(images).sigmoid()  # (B, K + 1)

    def abnormal_probability(self, images: torch.Tensor) -> torch.Tensor:
        return self.probabilities(images)[:, -1]  # (B,)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, F) pooled features, the input of the classification head: a domain-specific FID's embedding."""
        pooled = {}
        handle = self.network.avgpool.register_forward_hook(lambda m, i, o: pooled.setdefault("z", o))
        try:
            self(images)
        finally:
            handle.remove()
        return pooled["z"].flatten(1)

    def saliency(
        self,
        images: torch.Tensor,
        target: int | None = None,
        method: Literal["gradcam", "gradient_x_input"] = "gradcam",
    ) -> torch.Tensor:
        """(B, 1, H, W) non-negative map of the evidence for output ``target`` (default: "abnormal").

        ``gradcam``: ReLU of the channel-weighted last feature maps (weights: spatially averaged gradients),
        upsampled bilinearly. ``gradient_x_input``: |d logit / d x * x| with x in [0, 1], measured from black
        (no signal on the film) rather than from the mid-grey 0 of the [-1, 1] range, where lungs would vanish.
        """
        if method not in SALIENCY_METHODS:
            raise ValueError(f"unknown saliency method '{method}'; valid: {', '.join(SALIENCY_METHODS)}")
        target = len(self.output_names) - 1 if target is None else target
        with torch.enable_grad():
            if method == "gradient_x_input":
                x01 = ((images.detach() + 1) / 2).requires_grad_(True)
                score = self(x01 * 2 - 1)[:, target].sum()
                (grad,) = torch.autograd.grad(score, x01)
                return (grad * x01).abs().detach()
            captured = {}
            handle = self.network.avgpool.register_forward_hook(lambda m, i, o: captured.update(a=i[0]))
            try:
                score = self(images.detach())[:, target].sum()
            finally:
                handle.remove()
            activations = captured["a"]  # (B, C, h, w)
            (grad,) = torch.autograd.grad(score, activations)
        cam = F.relu((grad.mean((2, 3), keepdim=True) * activations).sum(1, keepdim=True)).detach()  # (B, 1, h, w)
        return F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)

    # ----------------------------------------------------------------------------------------------- training

    def _common_step(self, batch: dict, stage: str) -> torch.Tensor:
        labels, label_mask = batch["label"], batch.get("label_mask")
        abnormal, abnormal_known = abnormal_target(labels, label_mask)
        targets = torch.cat([labels, abnormal[:, None]], 1)  # (B, K + 1)
        known = torch.cat([torch.ones_like(labels) if label_mask is None else label_mask, abnormal_known[:, None]], 1)
        logits = self(batch["image"])
        loss = (
            F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * known
        ).sum() / known.sum().clamp_min(1.0)
        self.auroc[f"{stage}_auroc"].update(logits.detach().sigmoid(), torch.where(known > 0, targets, -1).long())
        on_step = stage == "train"
        self.log(
            f"{stage}/loss",
            loss,
            on_step=on_step,
            on_epoch=not on_step,
            prog_bar=on_step,
            sync_dist=not on_step,
            batch_size=labels.shape[0],
        )
        return loss

    def _log_auroc(self, stage: str) -> None:
        metric = self.auroc[f"{stage}_auroc"]
        values = metric.compute()  # (K + 1,)
        self.log_dict({f"{stage}/auroc/{name}": value for name, value in zip(self.output_names, values)})
        self.log(f"{stage}/auroc", values[:-1].mean(), prog_bar=stage == "val")
        metric.reset()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._common_step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._common_step(batch, "val")

    def on_train_epoch_end(self) -> None:
        self._log_auroc("train")

    def on_validation_epoch_end(self) -> None:
        self._log_auroc("val")

    def configure_optimizers(self):
        return adamw_with_warmup(
            self.network.parameters(),
            total_steps=self.hparams.total_steps,
            grad_scaled=grad_scaled(self),
            **(self.hparams.optimizer or {"lr": 1e-3}),
        )
