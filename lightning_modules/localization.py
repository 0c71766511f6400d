"""Scores of attribution maps against ground-truth lesion masks.

Localization (method.md §4, as What is Healthy? reports it): every pixel of every scored image is one binary
prediction, pooled over the set, so one threshold serves all images:

* ``auprc``: average precision (torchmetrics ``BinaryAveragePrecision``);
* ``auroc``: area under the ROC curve (``BinaryAUROC``);
* ``dice``: Dice at the best threshold. Pooled Dice at threshold ``t`` is the F1 score of ``map >= t``, so it is the
  maximum of 2PR / (P + R) along the precision-recall curve (``BinaryPrecisionRecallCurve``).

The three share one state (a torchmetrics compute group). ``thresholds=None`` keeps every pixel (exact; fine for a few
million pixels); an integer bins maps in [0, 1] at that many thresholds in constant memory, for large sets.

Per finding type ``k``: only images that contain a finding of type ``k``; positives are the pixels of type ``k``'s
mask, pixels of the image's *other* findings are ignored (neither positive nor negative), all other pixels are
negatives. "overall" scores every scored image against its full lesion mask.
"""

from __future__ import annotations

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision, BinaryPrecisionRecallCurve

from lightning_modules.metric_state import export_state, merge_state

OVERALL = "overall"
IGNORE = -1


def pixel_metrics(thresholds: int | None = None) -> MetricCollection:
    """AUPRC, AUROC and the precision-recall curve (for Dice) over pixels; ``IGNORE`` targets are left out."""
    common = dict(thresholds=thresholds, ignore_index=IGNORE)
    return MetricCollection(
        {
            "auprc": BinaryAveragePrecision(**common),
            "auroc": BinaryAUROC(**common),
            "curve": BinaryPrecisionRecallCurve(**common),
        }
    )


def best_dice(precision: torch.Tensor, recall: torch.Tensor, thresholds: torch.Tensor) -> tuple[float, float]:
    """Maximum pooled Dice (= F1) along a precision-recall curve, and the threshold reaching it."""
    thresholds = thresholds.reshape(-1)  # a constant map gives one threshold as a 0-d tensor
    dice = (2 * precision * recall / (precision + recall).clamp(min=1e-12)).nan_to_num(0.0)  # binned: 0/0 above all
    best = int(dice[: len(thresholds)].argmax())  # the curve's last point (P=1, R=0) has no threshold
    return float(dice[best]), float(thresholds[best])


class LocalizationScores:
    """Pixel AUPRC / AUROC / best Dice of several methods, overall and per finding type, streamed batch by batch."""

    def __init__(self, methods: list[str], finding_names: list[str] | tuple[str, ...], thresholds: int | None = None):
        self.finding_names = tuple(finding_names)
        self.groups = (OVERALL, *self.finding_names)
        self.metrics = {m: {g: pixel_metrics(thresholds) for g in self.groups} for m in methods}
        self.images = {m: dict.fromkeys(self.groups, 0) for m in methods}

    def update(
        self,
        method: str,
        maps: torch.Tensor,
        masks: torch.Tensor,
        labels: torch.Tensor,
        finding_masks: torch.Tensor | None = None,
    ) -> None:
        """Add scored images only: ``maps`` (B, 1, H, W) in [0, 1], ``masks`` (B, 1, H, W) lesion masks,
        ``labels`` (B, K) findings present, ``finding_masks`` (B, K, H, W) one mask per type (None: only images
        with a single finding type count per type, their lesion mask being that type's)."""
        maps, masks, labels = maps.detach().float().cpu(), masks.bool().cpu(), labels.bool().cpu()
        self._add(method, OVERALL, maps, masks.long())
        if finding_masks is None:
            single = labels.sum(1) == 1
            finding_masks = masks & labels[:, :, None, None]  # (B, K, H, W)
            labels = labels & single[:, None]
        finding_masks = finding_masks.bool().cpu()
        for k, name in enumerate(self.finding_names):
            rows = labels[:, k]
            if not rows.any():
                continue
            own = finding_masks[rows, k : k + 1]  # (b, 1, H, W)
            target = torch.where(masks[rows] & ~own, IGNORE, own.long())
            self._add(method, name, maps[rows], target)

    def _add(self, method: str, group: str, maps: torch.Tensor, target: torch.Tensor) -> None:
        self.metrics[method][group].update(maps.flatten(), target.flatten())
        self.images[method][group] += maps.shape[0]

    def state(self) -> dict:
        """{method: {group: {images, state}}} of the groups that saw images: ``merge`` adds it to other scores."""
        return {
            method: {
                group: {"images": self.images[method][group], "state": export_state(next(iter(metrics.values())))}
                for group, metrics in groups.items()
                if self.images[method][group]
            }
            for method, groups in self.metrics.items()
        }

    def merge(self, state: dict) -> None:
        """Add another instance's ``state()`` (the three metrics of a group share one state: each gets it)."""
        for method, groups in state.items():
            for group, entry in groups.items():
                for metric in self.metrics[method][group].values():
                    merge_state(metric, entry["state"])
                self.images[method][group] += entry["images"]

    def compute(self) -> dict[str, dict[str, dict[str, float]]]:
        """{method: {group: {auprc, auroc, dice, threshold, images}}}; groups without images are left out."""
        results: dict[str, dict[str, dict[str, float]]] = {}
        for method, groups in self.metrics.items():
            results[method] = {}
            for group, metrics in groups.items():
                if not self.images[method][group]:
                    continue
                values = metrics.compute()
                dice, threshold = best_dice(*values["curve"])
                results[method][group] = {
                    "auprc": float(values["auprc"]),
                    "auroc": float(values["auroc"]),
                    "dice": dice,
                    "threshold": threshold,
                    "images": self.images[method][group],
                }
        return results
