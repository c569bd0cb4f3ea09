"""The task sequence of a continual run: tasks, their classes, splits and loaders.

Tasks come from one labels CSV with a ``task`` column (in order of first appearance), or from a
list of labels CSVs, one task each (named by the CSV's single ``task`` value, else its file
stem). ``tasks`` in the config selects and orders tasks by name. Each task is split on its own
(patient-grouped, stratified; a ``split`` or ``fold`` column is honoured, :mod:`milkit.data.splits`)
and must have slides in train, val and test, and two classes in train, before anything trains.

Classes: task ``t``'s labels become global classes ``offset_t .. offset_t + C_t − 1`` named
``"<task>/<label>"`` (the order of the concatenated heads). By default every task's labels must
be new; a label string used by two tasks is an error. With ``shared_labels`` the same string may
recur, and each task still gets its own classes: class-incremental prediction must then find
the task too (as in CoMEL, where every organ has its own "normal" and "tumour").
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from milkit.data.bags import BagDataset, BagInfo, bag_loader
from milkit.data.cohort import Cohort, load_cohort
from milkit.data.datamodule import split_label_rows
from milkit.data.labels import class_names_of
from milkit.data.splits import Split
from milkit.errors import ConfigError, LabelsError

#: ``(task index, row index within the task)``: one slide of the sequence.
Item = tuple[int, int]
PARTS = ("train", "val", "test")


@dataclass
class ContinualData:
    """Where the tasks come from and how each is split and loaded.

    Args:
        features_dir: Folder of ``<slide_id>.h5`` feature files (optionally with a per-tile
            ``tile_labels`` (N,) 0/1 dataset: tile truth for tile AUROC and Dice).
        labels_csv: One labels CSV with a ``task`` column, or a list of CSVs, one per task.
        target: Name of the class column.
        tasks: Task names to run, in this order; default: every task, in order of first
            appearance (one CSV) or file order (several CSVs).
        shared_labels: Allow the same label in several tasks (still one class per task:
            ``"<task>/<label>"``); by default each task's labels must be new.
        negative_classes: ``fnmatch`` patterns of labels whose slides hold no lesion: BPPL
            skips them and tile scores are scaled by 1 − P(negative). Tasks without such a
            label count every slide as positive.
        n_folds: Generated folds per task when the CSV has no ``fold``/``split`` column.
        fold: Index of the held-out test fold.
        split_seed: Seed of the generated folds and validation parts.
        val_fraction: Fraction of each task's training part (whole patients) validated on.
        max_tiles: In training, a random subset of at most this many tiles per bag.
        batch_size: Bags per batch (padded, with a mask).
        num_workers: DataLoader worker processes.
    """

    features_dir: str | None = None
    labels_csv: str | list[str] | None = None
    target: str = "label"
    tasks: list[str] | None = None
    shared_labels: bool = False
    negative_classes: list[str] = field(default_factory=lambda: ["*negative", "*normal"])
    n_folds: int = 5
    fold: int = 0
    split_seed: int = 0
    val_fraction: float = 0.2
    max_tiles: int | None = None
    batch_size: int = 1
    num_workers: int = 0


@dataclass(frozen=True)
class ContinualTask:
    """One task: its slides, classes and split.

    Attributes:
        name: The task's name.
        labels: Its class labels in local index order.
        offset: Global index of its first class.
        bags: Feature file of every slide.
        targets: ``(n,)`` local class index of every slide.
        split: Row indices of the train/val/test parts.
        source: The labels CSV the rows came from.
    """

    name: str
    labels: tuple[str, ...]
    offset: int
    bags: tuple[BagInfo, ...]
    targets: np.ndarray
    split: Split
    source: Path

    @property
    def n_classes(self) -> int:
        """Number of classes C_t."""
        return len(self.labels)

    @property
    def classes(self) -> np.ndarray:
        """``(C_t,)`` global class indices of this task."""
        return np.arange(self.offset, self.offset + self.n_classes)


@dataclass(frozen=True)
class TaskSequence:
    """The tasks of a continual run, in training order.

    Attributes:
        tasks: The tasks.
        feature_dim: Feature length D shared by all files.
        negative: ``(C,)`` bool over global classes, True for negative (lesion-free) classes.
    """

    tasks: tuple[ContinualTask, ...]
    feature_dim: int
    negative: np.ndarray

    @property
    def names(self) -> list[str]:
        """Task names in order."""
        return [task.name for task in self.tasks]

    @property
    def class_names(self) -> list[str]:
        """Global class names ``"<task>/<label>"`` in index order."""
        return [f"{task.name}/{label}" for task in self.tasks for label in task.labels]

    @property
    def task_of_class(self) -> np.ndarray:
        """``(C,)`` int64 task index of every global class."""
        return np.concatenate([np.full(task.n_classes, i) for i, task in enumerate(self.tasks)])

    def items(self, task: int, part: str) -> list[Item]:
        """The slides of one part of one task.

        Args:
            task: Task index.
            part: ``"train"``, ``"val"`` or ``"test"``.

        Returns:
            ``(task, row)`` pairs.
        """
        return [(task, int(row)) for row in getattr(self.tasks[task].split, part)]

    def loader(
        self,
        items: Sequence[Item],
        *,
        batch_size: int,
        training: bool = False,
        max_tiles: int | None = None,
        num_workers: int = 0,
    ) -> DataLoader:
        """A loader over slides of any tasks, with global class indices as targets.

        Args:
            items: ``(task, row)`` pairs.
            batch_size: Bags per batch.
            training: Shuffle and subsample tiles (``max_tiles``); else every tile, in order.
            max_tiles: Tile subset size in training; None for all.
            num_workers: DataLoader workers.

        Returns:
            A loader of :class:`~milkit.data.bags.BagBatch`.
        """
        dataset = BagDataset(
            [self.tasks[t].bags[row] for t, row in items],
            [int(self.tasks[t].targets[row]) + self.tasks[t].offset for t, row in items],
            max_tiles=max_tiles,
            training=training,
        )
        return bag_loader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=training)


def load_task_sequence(data: ContinualData) -> TaskSequence:
    """Read, check and split the tasks (every problem is raised before training).

    Args:
        data: The data options.

    Returns:
        The sequence.

    Raises:
        ConfigError: No features folder or labels CSV, no ``task`` column with a single CSV,
            or unknown/duplicate names in ``tasks``.
        LabelsError: A slide without a task, an empty task, a task with one class, labels
            shared by two tasks (without ``shared_labels``), or an empty train/val/test part;
            plus everything :func:`milkit.data.cohort.load_cohort` checks.
    """
    if data.features_dir is None or data.labels_csv is None:
        raise ConfigError("continual needs --data.features_dir and --data.labels_csv.")
    sources = [data.labels_csv] if isinstance(data.labels_csv, str) else list(data.labels_csv)
    if not sources:
        raise ConfigError("--data.labels_csv is an empty list; give one CSV per task.")
    found = (
        _tasks_of_one_csv(data, sources[0]) if len(sources) == 1 else _tasks_of_csvs(data, sources)
    )
    order = _task_order(data, found, sources)
    _check_new_labels(data, found, order)
    tasks: list[ContinualTask] = []
    for name in order:
        cohort, rows = found[name]
        task = _make_task(data, name, cohort, rows, offset=sum(t.n_classes for t in tasks))
        tasks.append(task)
    feature_dims = {task.bags[0].feature_dim for task in tasks}
    if len(feature_dims) > 1:
        raise LabelsError(
            f"the tasks' feature files differ in feature size {sorted(feature_dims)}; every "
            "task must use features from the same encoder."
        )
    negative = np.array(
        [
            any(fnmatchcase(label, pattern) for pattern in data.negative_classes)
            for task in tasks
            for label in task.labels
        ]
    )
    return TaskSequence(tuple(tasks), feature_dims.pop(), negative)


Found = dict[str, tuple[Cohort, list[int]]]


def _load_task_cohort(data: ContinualData, source: str) -> Cohort:
    """One labels CSV's cohort; the slides without tiles it leaves out are named on stderr."""
    cohort = load_cohort(data.features_dir, source, target=data.target)  # type: ignore[arg-type]
    line = cohort.left_out_line()
    if line is not None:
        print(f"milkit continual: {line}", file=sys.stderr)
    return cohort


def _tasks_of_one_csv(data: ContinualData, source: str) -> Found:
    """Tasks from the ``task`` column, in order of first appearance."""
    cohort = _load_task_cohort(data, source)
    if all(row.task is None for row in cohort.rows):
        raise ConfigError(
            f"{source} has no task column (or it is empty): a continual run needs a `task` "
            "column or a list of labels CSVs, one per task, in --data.labels_csv."
        )
    missing = [row.line for row in cohort.rows if row.task is None]
    if missing:
        raise LabelsError(
            f"{source}: line(s) {missing} have no task; every slide of a continual run needs "
            "one. Fill in the task column or remove those rows."
        )
    found: Found = {}
    for index, row in enumerate(cohort.rows):
        found.setdefault(row.task, (cohort, []))[1].append(index)  # type: ignore[arg-type]
    return found


def _tasks_of_csvs(data: ContinualData, sources: list[str]) -> Found:
    """One task per CSV, named by its single ``task`` value or else its file stem."""
    found: Found = {}
    for source in sources:
        if not Path(source).is_file():
            raise LabelsError(f"{source}: no such labels CSV; check --data.labels_csv.")
        cohort = _load_task_cohort(data, source)
        names = {row.task for row in cohort.rows}
        single = names.pop() if len(names) == 1 else None  # the CSV's one task value, if any
        name = single if single is not None else Path(source).stem
        if name in found:
            raise ConfigError(
                f"{source}: task {name!r} is already given by another CSV; give each task "
                "one CSV (or different task values)."
            )
        found[name] = (cohort, list(range(len(cohort.rows))))
    return found


def _task_order(data: ContinualData, found: Found, sources: list[str]) -> list[str]:
    """The tasks to run: ``data.tasks`` (checked) or every task found."""
    if data.tasks is None:
        return list(found)
    if not data.tasks:
        raise ConfigError(
            "--data.tasks is an empty list; name at least one task or leave it unset."
        )
    duplicates = sorted({name for name in data.tasks if data.tasks.count(name) > 1})
    if duplicates:
        raise ConfigError(f"--data.tasks lists {duplicates} more than once.")
    empty = [name for name in data.tasks if name not in found]
    if empty:
        raise LabelsError(
            f"task(s) {empty} of --data.tasks have no slides in {', '.join(sources)} (tasks "
            f"there: {list(found)}); an empty task cannot be learned. Fix the task names."
        )
    return list(data.tasks)


def _check_new_labels(data: ContinualData, found: Found, order: list[str]) -> None:
    """Raise when two tasks share a label and the config says classes are new."""
    if data.shared_labels:
        return
    first_task: dict[str, str] = {}
    clashes: dict[tuple[str, str], list[str]] = {}
    for name in order:
        cohort, rows = found[name]
        for label in sorted({str(cohort.rows[i].target) for i in rows}):
            if label in first_task:
                clashes.setdefault((first_task[label], name), []).append(label)
            else:
                first_task[label] = name
    if clashes:
        pairs = "; ".join(
            f"tasks {a!r} and {b!r} share label(s) {labels}" for (a, b), labels in clashes.items()
        )
        raise LabelsError(
            f"{pairs}. Class-incremental tasks must bring new classes; rename the labels, or "
            "set --data.shared_labels true to keep one class per task (named '<task>/<label>')."
        )


def _make_task(
    data: ContinualData, name: str, cohort: Cohort, rows: list[int], offset: int
) -> ContinualTask:
    """Classes, split and checks of one task."""
    table_rows = [cohort.rows[i] for i in rows]
    table = cohort.labels
    source = table.path if table is not None else Path(str(data.labels_csv))
    labels = class_names_of(row.target for row in table_rows)
    if len(labels) < 2:
        raise LabelsError(
            f"{source}: task {name!r} has only the class(es) {labels} (lines "
            f"{[row.line for row in table_rows][:10]}...); each task needs two classes."
        )
    index = {label: i for i, label in enumerate(labels)}
    targets = np.array([index[str(row.target)] for row in table_rows], dtype=np.int64)
    try:
        split = split_label_rows(
            table,
            table_rows,
            targets,
            fold=data.fold,
            n_folds=data.n_folds,
            val_fraction=data.val_fraction,
            seed=data.split_seed,
        )
    except ConfigError as error:
        raise ConfigError(f"task {name!r}: {error}") from None
    for part in PARTS:
        if not len(getattr(split, part)):
            raise LabelsError(
                f"{source}: task {name!r} has no slides in its {part} part ({len(rows)} "
                "slides in all); each task needs train, val and test slides (val for early "
                "stopping and thresholds). Add slides, check the split/fold column or "
                "--data.val_fraction."
            )
    if len(set(targets[split.train].tolist())) < 2:
        raise LabelsError(
            f"{source}: the training part of task {name!r} holds a single class; add slides "
            "of the other class or change the split."
        )
    return ContinualTask(
        name=name,
        labels=tuple(labels),
        offset=offset,
        bags=tuple(cohort.bags[i] for i in rows),
        targets=targets,
        split=split,
        source=source,
    )
