"""Scores of counterfactuals as counterfactuals (docs/method.md): ``validity`` is the share of abnormal inputs whose
counterfactual the classifier calls healthy; ``minimality`` the mean absolute change |x - x_cf| of *healthy* inputs
(grey range [0, 1]); ``twin_distance`` the mean |x_cf - x_healthy| of abnormal inputs to their true healthy twin, when
the data has one.
"""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric

from lightning_modules.metric_state import export_state, merge_state

SCORES = ("validity", "minimality", "twin_distance")


class CounterfactualScores:
    """Validity, minimality and distance to the true healthy twin of one method's counterfactuals."""

    def __init__(self):
        self.validity, self.minimality, self.twin_distance = MeanMetric(), MeanMetric(), MeanMetric()

    def update(
        self,
        images01: torch.Tensor,
        counterfactuals01: torch.Tensor,
        abnormal: torch.Tensor,
        p_abnormal: torch.Tensor | None = None,
        healthy01: torch.Tensor | None = None,
        threshold: float = 0.5,
    ) -> None:
        """Images in [0, 1] (B, 1, H, W); ``abnormal`` (B,) bool; ``p_abnormal`` the classifier on the
        counterfactuals (B,); ``healthy01`` the true healthy twins when known."""
        abnormal = abnormal.bool().cpu()
        change = (images01 - counterfactuals01).abs().flatten(1).mean(1).cpu()  # (B,)
        if (~abnormal).any():
            self.minimality.update(change[~abnormal])
        if not abnormal.any():
            return
        if p_abnormal is not None:
            self.validity.update((p_abnormal.cpu()[abnormal] < threshold).float())
        if healthy01 is not None:
            self.twin_distance.update((counterfactuals01 - healthy01).abs().flatten(1).mean(1).cpu()[abnormal])

    def state(self) -> dict:
        return {name: export_state(getattr(self, name)) for name in SCORES}

    def merge(self, state: dict) -> None:
        """Add another instance's ``state()``."""
        for name in SCORES:
            merge_state(getattr(self, name), state[name])

    def compute(self) -> dict[str, float]:
        """The scores that received data (a MeanMetric that saw nothing is left out, never reported as 0)."""
        return {name: float(getattr(self, name).compute()) for name in SCORES if getattr(self, name).update_count}
