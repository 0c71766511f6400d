"""A torchmetrics metric's state as plain tensors (``torch.save``-able, ``weights_only`` loadable) and merged back: how
the parts of a run spread over processes and restarts (``lightning_modules/runs/units.py``) add up to one metric."""

from __future__ import annotations

from torchmetrics import Metric


def export_state(metric: Metric) -> dict | None:
    """The metric's state, or None when it saw no data."""
    return dict(metric.metric_state) if metric.update_count else None


def merge_state(metric: Metric, state: dict | None) -> None:
    """Add an ``export_state`` to ``metric`` (a sum, a concatenation: whatever the metric's own reduction is)."""
    if state is None:
        return
    metric.merge_state(state)
    metric._update_count += 1  # merge_state leaves the count that update_count and compute() read
