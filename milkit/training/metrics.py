"""Slide-level metrics as torchmetrics collections (synced across DDP ranks by torchmetrics).

Classification (one softmax over C classes; binary tasks are C = 2): ``accuracy``,
``balanced_accuracy`` (macro recall), ``auroc`` (macro one-vs-rest) and ``f1`` (macro), and per
class ``recall/<class>``, ``auroc/<class>``, ``f1/<class>``. Regression, in the target's own
units: ``mse``, ``mae``, ``r2``, ``pearson``, ``spearman`` and, with a cut-off, ``auroc`` of
high (target > cut-off) against low.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import (
    MeanAbsoluteError,
    MeanSquaredError,
    Metric,
    MetricCollection,
    PearsonCorrCoef,
    R2Score,
    SpearmanCorrCoef,
)
from torchmetrics.classification import (
    BinaryAUROC,
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassF1Score,
    MulticlassRecall,
)
from torchmetrics.wrappers import ClasswiseWrapper


def classification_metrics(class_names: Sequence[str], prefix: str) -> MetricCollection:
    """Metrics of slide class probabilities.

    Args:
        class_names: The C >= 2 class names in index order (names used in per-class keys;
            ``/`` is replaced by ``_``).
        prefix: Key prefix, e.g. ``"val/"``.

    Returns:
        A collection updated with ``(probabilities (B, C), targets (B,) int64)``.
    """
    n = len(class_names)
    labels = [name.replace("/", "_") for name in class_names]
    return MetricCollection(
        {
            "accuracy": MulticlassAccuracy(n, average="micro"),
            "balanced_accuracy": MulticlassRecall(n, average="macro"),
            "auroc": MulticlassAUROC(n, average="macro"),
            "f1": MulticlassF1Score(n, average="macro"),
            "recall_per_class": ClasswiseWrapper(
                MulticlassRecall(n, average=None), labels=labels, prefix="recall/"
            ),
            "auroc_per_class": ClasswiseWrapper(
                MulticlassAUROC(n, average=None), labels=labels, prefix="auroc/"
            ),
            "f1_per_class": ClasswiseWrapper(
                MulticlassF1Score(n, average=None), labels=labels, prefix="f1/"
            ),
        },
        prefix=prefix,
        # Compute groups share states with ClasswiseWrapper's inner metric imperfectly (it
        # warns of compute-before-update after a reset); slide-level updates are cheap anyway.
        compute_groups=False,
    )


class CutoffAUROC(BinaryAUROC):
    """AUROC of a predicted value for ``target > cutoff`` (e.g. sTIL-high against sTIL-low).

    Args:
        cutoff: The threshold on the target, in the target's units.
        scale: Predictions lie in ``[0, scale]`` (the target's range).
    """

    def __init__(self, cutoff: float, scale: float = 1.0) -> None:
        super().__init__()
        self.cutoff = cutoff
        self.scale = scale

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add ``(B,)`` predicted values and ``(B,)`` true values."""
        # Scores in [0, 1] are taken as they are; outside, torchmetrics would squash them with
        # a sigmoid that saturates for values in percent and ties them.
        scores = (preds / self.scale).clamp(0.0, 1.0)
        super().update(scores, (target > self.cutoff).long())


class SafeR2Score(R2Score):
    """R² that is NaN, not an error, on fewer than two slides (a tiny validation part)."""

    def compute(self) -> torch.Tensor:
        """R² over the slides seen, or NaN when there are fewer than two."""
        if int(self.total) < 2:
            return torch.tensor(float("nan"))
        return super().compute()


def regression_metrics(
    prefix: str, cutoff: float | None = None, scale: float = 1.0
) -> MetricCollection:
    """Metrics of slide values.

    Args:
        prefix: Key prefix, e.g. ``"val/"``.
        cutoff: Target threshold for the high-vs-low ``auroc``; None leaves it out.
        scale: Upper end of the target's range (predictions lie in ``[0, scale]``).

    Returns:
        A collection updated with ``(predicted (B,), target (B,))`` float values.
    """
    metrics: dict[str, Metric | MetricCollection] = {
        "mse": MeanSquaredError(),
        "mae": MeanAbsoluteError(),
        "r2": SafeR2Score(),
        "pearson": PearsonCorrCoef(),
        "spearman": SpearmanCorrCoef(),
    }
    if cutoff is not None:
        metrics["auroc"] = CutoffAUROC(cutoff, scale)
    return MetricCollection(metrics, prefix=prefix, compute_groups=False)
