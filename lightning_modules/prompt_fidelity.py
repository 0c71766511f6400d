"""Prompt fidelity: whether generated images show what their prompt names, as the independent classifier sees it.

A plain function of all the scores at once (one process), not a DDP state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torchmetrics.functional.classification import binary_auroc

from lightning_modules.classifier import ABNORMAL, CALLED
from lightning_modules.generation_metrics import NORMAL


def _mean(values: torch.Tensor) -> float | None:
    return float(values.mean()) if values.numel() else None


def prompt_fidelity(
    probabilities: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    finding_names: Sequence[str],
    label_mask: torch.Tensor | None = None,
) -> dict[str, dict]:
    """Whether images show what their prompt names, as the independent finding classifier sees it.

    ``probabilities``: per image set (``generated``, ``real``) the classifier's (N, K + 1) outputs, columns in
    ``finding_names`` order then "abnormal"; image i of every set belongs to prompt i, whose findings are ``labels``
    (N, K). Row f compares p(f) on the images whose prompt names f with p(f) on the normal ones (no finding and,
    with a ``label_mask``, none unknown); row ``Normal`` compares p(abnormal) on the normal ones with it on those
    naming any finding. ``auroc``: how well that output separates the two sets (torchmetrics' binary AUROC, the
    finding side positive), so on the real images it is the ceiling the classifier itself reaches. ``called``: the
    share of the prompted set the classifier calls positive (p >= ``CALLED``): normal samples called abnormal, and
    per finding the share recognised, whose value on the real images (the classifier's recall) bounds what any
    generated or induced finding can reach. An image with several findings counts for each; None where a set is
    empty.
    """
    present = labels >= 0.5  # (N, K)
    known = torch.ones_like(present) if label_mask is None else label_mask >= 0.5
    normal, abnormal = ~present.any(1) & known.all(1), present.any(1)  # (N,)
    # row -> (output column, images on the finding side, images on the normal side)
    rows = {name: (k, present[:, k], normal) for k, name in enumerate(finding_names)}
    rows[NORMAL] = (len(finding_names), abnormal, normal)
    fidelity = {}
    for row, (column, finding, healthy) in rows.items():
        prompted, reference = (healthy, finding) if row == NORMAL else (finding, healthy)
        fidelity[row] = {
            "score": ABNORMAL if row == NORMAL else row,
            "reference": "any finding" if row == NORMAL else NORMAL,
            "n": int(prompted.sum()),
            "n_reference": int(reference.sum()),
        }
        both, separable = finding | healthy, bool(finding.any() and healthy.any())
        for images, p in probabilities.items():
            score = p[:, column].float()  # (N,)
            fidelity[row][images] = {
                "p_prompted": _mean(score[prompted]),
                "called": _mean((score[prompted] >= CALLED).float()),
                "p_reference": _mean(score[reference]),
                "auroc": float(binary_auroc(score[both], finding[both].long())) if separable else None,
            }
    return fidelity
