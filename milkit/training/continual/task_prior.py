"""Which task a slide belongs to, from prototypes of each task's input features.

Class-incremental prediction must pick a class among every task's classes without being told
the task. Heads trained one task at a time (a softmax over their own task's classes) never
see another task's slides, so their logits are not comparable: the argmax over all heads'
concatenated logits picks whichever head has the largest scale, not the slide's task
(measured on the synthetic feature tasks: the first head took 88-100 % of later tasks'
slides under OWLoRA).

:class:`TaskPrototypes` keeps, per task, the mean of its training slides' *descriptors* (the
mean of a slide's tile features, before any layer of the model, so it cannot drift when the
model changes) and one pooled per-dimension variance (a diagonal linear discriminant). No
slide is stored: D + 1 numbers per task and D for the variance. The class-incremental
log-probability of class ``c`` of task ``t`` is then::

    log p(t | slide) + log softmax_t(head_t(slide))[c]

a single softmax over all classes that is the task posterior times the task's own
prediction; :func:`class_incremental_log_probs` computes it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from milkit.data.bags import BagBatch

#: Variance floor, as a fraction of the mean variance (dimensions that never vary in the
#: training slides must not dominate the distance).
_VARIANCE_FLOOR = 1e-3


def slide_descriptors(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean tile feature of each slide of a padded batch.

    Args:
        features: ``(B, N, D)`` tile features.
        mask: ``(B, N)`` bool, True on real tiles.

    Returns:
        ``(B, D)`` float64.
    """
    weights = mask.to(torch.float64)[..., None]
    total = (features.to(torch.float64) * weights).sum(dim=1)
    return total / weights.sum(dim=1).clamp(min=1.0)


def loader_descriptors(batches: Iterable[BagBatch]) -> np.ndarray:
    """The descriptors of every slide a loader yields (all tiles: use a non-subsampling loader).

    Args:
        batches: Padded batches.

    Returns:
        ``(n, D)`` float64.
    """
    return np.concatenate([slide_descriptors(b.features, b.mask).numpy() for b in batches])


class TaskPrototypes:
    """Per-task means and a pooled diagonal variance of slide descriptors (module docstring)."""

    def __init__(self) -> None:
        self.means: dict[int, np.ndarray] = {}
        self.counts: dict[int, int] = {}
        self._squared_deviations: np.ndarray | None = None

    def add(self, task: int, descriptors: np.ndarray) -> None:
        """Record a task from its training slides' descriptors.

        Args:
            task: Task index.
            descriptors: ``(n, D)`` descriptors of the task's training slides, n >= 1.
        """
        descriptors = np.asarray(descriptors, dtype=np.float64)
        mean = descriptors.mean(axis=0)
        squared = ((descriptors - mean) ** 2).sum(axis=0)
        self.means[task] = mean
        self.counts[task] = len(descriptors)
        previous = self._squared_deviations
        self._squared_deviations = squared if previous is None else previous + squared

    def variance(self) -> np.ndarray:
        """``(D,)`` pooled within-task variance, floored (see :data:`_VARIANCE_FLOOR`)."""
        assert self._squared_deviations is not None, "no task recorded"
        dof = max(sum(self.counts.values()) - len(self.counts), 1)
        variance = self._squared_deviations / dof
        return variance + _VARIANCE_FLOOR * max(float(variance.mean()), 1e-12)

    def log_posterior(self, descriptors: np.ndarray, tasks: list[int]) -> np.ndarray:
        """``log p(task | slide)`` over some recorded tasks, with equal priors.

        Args:
            descriptors: ``(n, D)`` slide descriptors.
            tasks: Recorded task indices to choose among.

        Returns:
            ``(n, len(tasks))`` log-probabilities; each row's exponentials sum to 1.
        """
        means = np.stack([self.means[t] for t in tasks])
        distances = (((descriptors[:, None, :] - means[None]) ** 2) / self.variance()).sum(-1)
        return torch.from_numpy(-0.5 * distances).log_softmax(dim=1).numpy()

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and ints (saved with each stage's weights)."""
        tasks = sorted(self.means)
        return {
            "tasks": tasks,
            "means": torch.from_numpy(np.stack([self.means[t] for t in tasks]))
            if tasks
            else torch.zeros(0),
            "counts": [self.counts[t] for t in tasks],
            "squared_deviations": None
            if self._squared_deviations is None
            else torch.from_numpy(self._squared_deviations),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        means = state["means"].numpy()
        self.means = {int(t): means[i] for i, t in enumerate(state["tasks"])}
        self.counts = {int(t): int(n) for t, n in zip(state["tasks"], state["counts"], strict=True)}
        deviations = state["squared_deviations"]
        self._squared_deviations = None if deviations is None else deviations.numpy()


def class_incremental_log_probs(
    logits: np.ndarray, task_of_class: np.ndarray, task_log_posterior: np.ndarray | None
) -> np.ndarray:
    """Log-probabilities over all classes of the seen tasks.

    Args:
        logits: ``(n, C)`` logits of every head, concatenated.
        task_of_class: ``(C,)`` task index of each column.
        task_log_posterior: ``(n, T)`` ``log p(task | slide)`` with column ``t`` for task
            ``t`` (tasks ``0..T-1`` appear in ``task_of_class``), or None for the plain
            softmax over all columns (comparable only if the heads were trained together).

    Returns:
        ``(n, C)`` log-probabilities (rows sum to 1 after ``exp``).
    """
    scores = torch.from_numpy(np.asarray(logits, dtype=np.float64))
    if task_log_posterior is None:
        return scores.log_softmax(dim=1).numpy()
    out = torch.empty_like(scores)
    for task in np.unique(task_of_class):
        columns = torch.from_numpy(np.flatnonzero(task_of_class == task))
        within = scores[:, columns].log_softmax(dim=1)
        out[:, columns] = within + torch.from_numpy(task_log_posterior[:, [task]])
    return out.numpy()
