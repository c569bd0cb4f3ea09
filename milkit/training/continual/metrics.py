"""Metrics of a continual run: per-task bag and tile metrics, accuracy matrices, BWT, the plot.

Bag level, for task ``j`` after stage ``t`` (on ``j``'s test part):

- ``accuracy`` (class-incremental): the most probable class over every seen task's classes is
  the true global class (the task must be recognised as well). With task prototypes
  (:mod:`milkit.training.continual.task_prior`, ``--task_prior prototypes``) a class's
  probability is p(task | slide) times its own head's softmax; without (``none``) it is the
  argmax of all heads' concatenated logits;
- ``head_accuracy``: that argmax of the concatenated logits, whatever the task prior (how far
  the heads' scales alone recognise the task); ``task_id_accuracy``: how often the task
  prototypes name the slide's task (None without them);
- ``task_accuracy`` (task-incremental): argmax over task ``j``'s own head;
- ``task_auroc``: macro one-vs-rest AUROC of task ``j``'s own softmax.

Tile level, where the feature files hold tile truth (a ``tile_labels`` (N,) 0/1 dataset, in the
order of ``features``): a tile's score is its attention min-max normalised within the slide,
times the slide's probability of a positive (non-negative) class under task ``j``'s head, so a
slide called negative shows no hot spot (docs/papers.md E). ``tile_auroc`` pools every test tile of
the task, negative slides included; ``tile_dice`` is the pooled Dice ``2TP / (2TP + FP + FN)``
at the threshold that maximised it on the task's validation part when the task was learnt.

Forgetting: with ``R[t][j]`` the metric after stage ``t`` on task ``j``, the average is the mean
of the last row and ``BWT = mean_{j < T-1} (R[T-1][j] − R[j][j])`` (None for a single stage).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import binary_auroc, multiclass_auroc

from milkit.errors import FeatureFileError
from milkit.training.continual.bppl import minmax_within_bags
from milkit.training.continual.module import ContinualModule, own_task_attention
from milkit.training.continual.strategies import StageContext
from milkit.training.continual.task_prior import (
    TaskPrototypes,
    class_incremental_log_probs,
    slide_descriptors,
)
from milkit.training.module import model_logits

#: Name of the optional per-tile truth dataset in a feature file.
TILE_LABELS = "tile_labels"
_THRESHOLDS = np.linspace(0.0, 1.0, 101)


@dataclass
class BagPredictions:
    """The model's outputs on one part of one task.

    Attributes:
        logits: ``(n, C)`` logits over all heads' classes.
        targets: ``(n,)`` global class indices.
        attention: ``n`` arrays ``(n_i,)``, attention over each slide's tiles.
        tile_truth: ``n`` arrays ``(n_i,)`` of 0/1, or None where a file has no tile truth.
        descriptors: ``(n, D)`` mean tile feature of each slide (the task prototypes' input).
    """

    logits: np.ndarray
    targets: np.ndarray
    attention: list[np.ndarray]
    tile_truth: list[np.ndarray | None]
    descriptors: np.ndarray


def read_tile_labels(path: str | Path, n_tiles: int) -> np.ndarray | None:
    """A feature file's tile truth, if it has one.

    Args:
        path: The feature file.
        n_tiles: Its number of tiles.

    Returns:
        ``(n_tiles,)`` uint8 0/1, or None.

    Raises:
        FeatureFileError: ``tile_labels`` of the wrong length.
    """
    with h5py.File(path, "r") as file:
        if TILE_LABELS not in file:
            return None
        labels = np.asarray(file[TILE_LABELS][()]).reshape(-1)
    if len(labels) != n_tiles:
        raise FeatureFileError(
            f"{path}: {TILE_LABELS} has {len(labels)} entries for {n_tiles} tiles; write one "
            "0/1 label per tile, in the order of `features`."
        )
    return (labels > 0).astype(np.uint8)


@torch.no_grad()
def predict_bags(
    model: nn.Module, loader: DataLoader, device: torch.device, task: int
) -> BagPredictions:
    """Run a model over a loader (every tile, in file order) in eval mode.

    Args:
        model: A multi-head model.
        loader: A non-shuffling, non-subsampling loader of one task's slides.
        device: Where to run.
        task: The slides' task (whose attention map is kept when there is one per task).

    Returns:
        The predictions with tile truth.
    """
    was_training = model.training
    model.eval().to(device)
    logits, targets, attention, truth, descriptors = [], [], [], [], []
    for batch in loader:
        descriptors.append(slide_descriptors(batch.features, batch.mask).numpy())
        moved = replace(
            batch,
            features=batch.features.to(device),
            mask=batch.mask.to(device),
            coords=batch.coords.to(device),
        )
        output = ContinualModule.run_model(model, moved)
        logits.append(model_logits(output).float().cpu().numpy())
        targets.append(batch.targets.numpy())
        weights = own_task_attention(
            output.attention.float(), torch.full((len(batch),), task, device=device)
        )
        for b, path in enumerate(batch.feature_paths):
            real = batch.mask[b].numpy()
            attention.append(weights[b].cpu().numpy()[real])
            truth.append(read_tile_labels(path, int(real.sum())))
    model.train(was_training)
    return BagPredictions(
        np.concatenate(logits),
        np.concatenate(targets),
        attention,
        truth,
        np.concatenate(descriptors),
    )


def tile_scores(
    predictions: BagPredictions, classes: np.ndarray, negative: np.ndarray
) -> list[np.ndarray]:
    """Each slide's tile scores: normalised attention times P(positive class) (module docstring).

    Args:
        predictions: The task's predictions.
        classes: ``(C_j,)`` the task's global class indices.
        negative: ``(C,)`` bool over global classes.

    Returns:
        ``n`` arrays ``(n_i,)`` in [0, 1].
    """
    local = torch.from_numpy(predictions.logits[:, classes]).softmax(dim=-1).numpy()
    positive = local[:, ~negative[classes]].sum(axis=1)
    scores = []
    for attention, p in zip(predictions.attention, positive, strict=True):
        a = torch.from_numpy(attention)[None]
        normalised = minmax_within_bags(a, torch.ones_like(a, dtype=torch.bool))[0].numpy()
        scores.append(normalised * p)
    return scores


def pooled_tiles(
    predictions: BagPredictions, scores: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray] | None:
    """Concatenate scores and truth over slides with tile truth; None if none has it."""
    pairs = [(s, t) for s, t in zip(scores, predictions.tile_truth, strict=True) if t is not None]
    if not pairs:
        return None
    return np.concatenate([s for s, _ in pairs]), np.concatenate([t for _, t in pairs])


def dice(scores: np.ndarray, truth: np.ndarray, threshold: float) -> float:
    """Pooled Dice of ``scores > threshold`` against ``truth`` (1.0 when both are empty)."""
    predicted = scores > threshold
    positive = truth > 0
    denominator = predicted.sum() + positive.sum()
    return 1.0 if denominator == 0 else float(2 * (predicted & positive).sum() / denominator)


def best_threshold(scores: np.ndarray, truth: np.ndarray) -> float:
    """The threshold on [0, 1] (steps of 0.01) with the highest Dice (the lowest on ties)."""
    values = [dice(scores, truth, threshold) for threshold in _THRESHOLDS]
    return float(_THRESHOLDS[int(np.argmax(values))])


def validation_threshold(
    predictions: BagPredictions, classes: np.ndarray, negative: np.ndarray
) -> float | None:
    """The tile-score threshold chosen on a task's validation part; None without tile truth."""
    pooled = pooled_tiles(predictions, tile_scores(predictions, classes, negative))
    return None if pooled is None else best_threshold(*pooled)


def task_metrics(
    predictions: BagPredictions,
    classes: np.ndarray,
    negative: np.ndarray,
    threshold: float | None,
    task_of_class: np.ndarray,
    prototypes: TaskPrototypes | None,
) -> dict[str, float | int | None]:
    """Bag and tile metrics of one task's test part (module docstring).

    Args:
        predictions: Predictions on the task's test slides.
        classes: ``(C_j,)`` the task's global class indices.
        negative: ``(C,)`` bool over global classes.
        threshold: Tile-score threshold from validation, or None (no Dice).
        task_of_class: ``(C,)`` task index of each of the logits' columns.
        prototypes: The seen tasks' prototypes, or None (class-incremental = argmax of the
            concatenated logits).

    Returns:
        ``accuracy``, ``head_accuracy``, ``task_id_accuracy``, ``task_accuracy``,
        ``task_auroc``, ``tile_auroc``, ``tile_dice`` (None where undefined) and ``n_test``.
    """
    targets = predictions.targets
    seen = sorted(int(t) for t in np.unique(task_of_class))
    task_id_accuracy = log_posterior = None
    if prototypes is not None:
        log_posterior = prototypes.log_posterior(predictions.descriptors, seen)
        true_task = task_of_class[targets]
        task_id_accuracy = float(
            (np.asarray(seen)[log_posterior.argmax(axis=1)] == true_task).mean()
        )
    log_probs = class_incremental_log_probs(predictions.logits, task_of_class, log_posterior)
    local = predictions.logits[:, classes]
    local_targets = torch.from_numpy(targets - classes[0])
    probabilities = torch.from_numpy(local).softmax(dim=-1)
    task_auroc = None
    if len(np.unique(targets)) > 1:
        task_auroc = float(
            multiclass_auroc(
                probabilities, local_targets, num_classes=len(classes), average="macro"
            )
        )
    tile_auroc = tile_dice = None
    pooled = pooled_tiles(predictions, tile_scores(predictions, classes, negative))
    if pooled is not None:
        scores, truth = pooled
        if 0 < truth.sum() < len(truth):
            tile_auroc = _finite(binary_auroc(torch.from_numpy(scores), torch.from_numpy(truth)))
        if threshold is not None:
            tile_dice = dice(scores, truth, threshold)
    return {
        "accuracy": float((log_probs.argmax(axis=1) == targets).mean()),
        "head_accuracy": float((predictions.logits.argmax(axis=1) == targets).mean()),
        "task_id_accuracy": task_id_accuracy,
        "task_accuracy": float((classes[local.argmax(axis=1)] == targets).mean()),
        "task_auroc": task_auroc,
        "tile_auroc": tile_auroc,
        "tile_dice": tile_dice,
        "n_test": len(targets),
    }


def evaluate_stage(
    model: nn.Module,
    context: StageContext,
    device: torch.device,
    previous_thresholds: dict[str, float | None],
    reference_logits: dict[str, np.ndarray],
    prototypes: TaskPrototypes | None,
) -> tuple[dict[str, float | None], dict[str, dict[str, Any]], dict[str, np.ndarray]]:
    """Choose the new tasks' tile thresholds on validation, then test every task seen so far.

    Args:
        model: The model after the stage (best weights).
        context: The stage.
        device: Where to run the model.
        previous_thresholds: Tile thresholds of the tasks learnt in earlier stages.
        reference_logits: ``(n_test, C_j)`` own-head test logits of each task learnt in an
            earlier stage, right after it was learnt (for ``logit_drift``).

    Returns:
        Tile thresholds of all tasks learnt so far (None without tile truth), the test metrics
        (:func:`task_metrics`, plus ``logit_drift``) of each seen task, and each seen task's
        ``(n_test, C_j)`` own-head test logits, all by task name.
    """
    sequence, data = context.sequence, context.data

    def predict(task: int, part: str) -> BagPredictions:
        items = sequence.items(task, part)
        loader = sequence.loader(items, batch_size=data.batch_size, num_workers=data.num_workers)
        return predict_bags(model, loader, device, task)

    thresholds = dict(previous_thresholds)
    for task in context.tasks:
        thresholds[sequence.tasks[task].name] = validation_threshold(
            predict(task, "val"), sequence.tasks[task].classes, sequence.negative
        )
    metrics, logits = {}, {}
    for t in range(max(context.tasks) + 1):
        name, classes = sequence.tasks[t].name, sequence.tasks[t].classes
        predictions = predict(t, "test")
        logits[name] = predictions.logits[:, classes]
        metrics[name] = task_metrics(
            predictions,
            classes,
            sequence.negative,
            thresholds.get(name),
            sequence.task_of_class[: predictions.logits.shape[1]],
            prototypes,
        )
        metrics[name]["logit_drift"] = (
            0.0 if t in context.tasks else logit_drift(logits[name], reference_logits.get(name))
        )
    return thresholds, metrics, logits


def logit_drift(logits: np.ndarray, reference: np.ndarray | None) -> float | None:
    """How far a task's own-head outputs moved since it was learnt: ``‖L − L₀‖ / ‖L₀‖``.

    Args:
        logits: ``(n_test, C_j)`` the task head's test logits now.
        reference: The same right after the task was learnt; None when not recorded.

    Returns:
        The relative Frobenius change, or None without a reference.
    """
    if reference is None:
        return None
    return float(np.linalg.norm(logits - reference) / max(float(np.linalg.norm(reference)), 1e-12))


def _finite(value: torch.Tensor) -> float | None:
    """A metric as a float, None where it is undefined (NaN, e.g. a class absent from test)."""
    number = float(value)
    return number if np.isfinite(number) else None


def average_and_bwt(matrix: Sequence[Sequence[float | None]]) -> tuple[float | None, float | None]:
    """Average of the last row and backward transfer of a stage x task matrix.

    Args:
        matrix: ``R[t][j]``: the metric after stage ``t`` on task ``j`` (None where task ``j``
            was not seen yet or the metric is undefined).

    Returns:
        ``(average, bwt)``; either is None when undefined (BWT needs one stage per task and at
        least two tasks).
    """
    if not matrix:
        return None, None
    last = [value for value in matrix[-1] if value is not None]
    average = float(np.mean(last)) if last else None
    n_tasks = len(matrix[-1])
    if len(matrix) != n_tasks or n_tasks < 2:
        return average, None
    drops = [
        matrix[-1][j] - matrix[j][j]  # type: ignore[operator]
        for j in range(n_tasks - 1)
        if matrix[-1][j] is not None and matrix[j][j] is not None
    ]
    return average, float(np.mean(drops)) if drops else None


def plot_accuracy_matrices(
    matrices: dict[str, list[list[float | None]]],
    tasks: Sequence[str],
    stages: Sequence[str],
    path: Path,
    title: str,
) -> Path:
    """Heatmaps of stage x task matrices, side by side, values written in the cells.

    Args:
        matrices: Panel title -> ``R[t][j]`` (None for unseen tasks, left blank).
        tasks: Task names (columns).
        stages: Stage names (rows).
        path: The PNG to write.
        title: Figure title.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(
        1, len(matrices), figsize=(1.0 + 4.2 * len(matrices), 1.2 + 0.5 * len(stages) + 2.0),
        squeeze=False,
    )  # fmt: skip
    for axis, (name, matrix) in zip(axes[0], matrices.items(), strict=True):
        values = np.array([[np.nan if v is None else v for v in row] for row in matrix], float)
        image = axis.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis")
        for (row, column), value in np.ndenumerate(values):
            if np.isfinite(value):
                colour = "black" if value > 0.6 else "white"
                axis.text(column, row, f"{value:.2f}", ha="center", va="center", color=colour)
        axis.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
        axis.set_yticks(range(len(stages)), stages)
        axis.set_xlabel("evaluated on task")
        axis.set_ylabel("after training")
        axis.set_title(name)
        figure.colorbar(image, ax=axis, fraction=0.046)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
