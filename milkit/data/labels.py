"""The labels CSV (docs/design.md §5): one row per slide, read and checked all at once.

Columns: ``slide_id`` (the feature file's stem), a target column named in the config, and
optionally ``patient_id`` (splits never cut a patient), ``fold`` (integer) or ``split``
(``train``/``val``/``test``), and ``task`` (continual runs). Every bad row is collected with
its line number and reported in one :class:`~milkit.errors.LabelsError`, before anything
trains, so a user fixes the whole file in one go.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from milkit.errors import LabelsError, MilkitError

TaskType = Literal["classification", "regression"]

#: Cell values read as "no value" (compared case-insensitively after stripping).
MISSING_VALUES = frozenset({"", "na", "n/a", "nan", "none", "null"})
#: Accepted ``split`` values and what they mean.
SPLIT_ALIASES = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}


@dataclass(frozen=True)
class SlideLabel:
    """One row of the labels CSV.

    Attributes:
        slide_id: The feature file's stem.
        target: Class name (classification), number (regression), or None for a slide
            without a target (allowed only where no target is needed, e.g. prediction).
        patient_id: The patient; the slide id itself when the CSV has no ``patient_id``.
        line: Line number in the CSV (the header is line 1).
        fold: The ``fold`` column's value, when present.
        split: ``"train"``, ``"val"`` or ``"test"`` from the ``split`` column, when present.
        task: The ``task`` column's value (continual runs), when present.
    """

    slide_id: str
    target: str | float | None
    patient_id: str
    line: int
    fold: int | None = None
    split: str | None = None
    task: str | None = None


@dataclass(frozen=True)
class LabelTable:
    """A checked labels CSV.

    Attributes:
        path: The CSV file.
        target: Name of the target column.
        task: ``"classification"`` or ``"regression"``.
        rows: One entry per slide, in file order.
        has_fold: Whether the CSV has a ``fold`` column.
        has_split: Whether the CSV has a ``split`` column.
    """

    path: Path
    target: str
    task: TaskType
    rows: tuple[SlideLabel, ...]
    has_fold: bool
    has_split: bool


class ProblemReport:
    """Collects problems with their line numbers and raises them together.

    Args:
        source: The file the line numbers refer to.
    """

    def __init__(self, source: Path) -> None:
        self.source = source
        self._items: list[tuple[int, str]] = []

    def __bool__(self) -> bool:
        return bool(self._items)

    def add(self, line: int | None, message: str) -> None:
        """Record one problem; ``line`` None for a problem of the whole file."""
        self._items.append((line or 0, message))

    def raise_if_any(self, error: type[MilkitError], advice: str) -> None:
        """Raise ``error`` listing every problem, sorted by line.

        Args:
            error: The exception class to raise.
            advice: What to do, appended to the message.

        Raises:
            MilkitError: ``error``, if any problem was recorded.
        """
        if not self._items:
            return
        lines = [
            f"  line {line}: {message}" if line else f"  {message}"
            for line, message in sorted(self._items, key=lambda item: item[0])
        ]
        raise error(f"{self.source}: {len(lines)} problem(s):\n" + "\n".join(lines) + f"\n{advice}")


def read_labels(
    path: str | Path,
    *,
    target: str,
    task: TaskType = "classification",
    class_names: Sequence[str] | None = None,
    target_range: tuple[float, float] | None = None,
    require_target: bool = True,
    problems: ProblemReport | None = None,
) -> LabelTable:
    """Read and check a labels CSV.

    Args:
        path: The CSV file (UTF-8, comma-separated, with a header).
        target: Name of the target column.
        task: ``"classification"`` (targets are class names) or ``"regression"`` (numbers).
        class_names: The allowed classes; rows with another class are errors. None allows any.
        target_range: ``(low, high)`` inclusive bounds for regression targets.
        require_target: Whether a row without a target is an error (else its target is None).
        problems: Collect row problems here instead of raising them (the caller raises them
            with its own); the table then holds only the good rows.

    Returns:
        The checked table.

    Raises:
        LabelsError: Every problem at once, with line numbers: missing file or columns, empty
            or duplicate slide ids, missing or invalid targets, bad ``fold``/``split`` values,
            and patients whose slides sit in different folds or splits.
    """
    path = Path(path)
    if task not in get_args(TaskType):
        raise LabelsError(f"task must be one of {get_args(TaskType)}, got {task!r}.")
    if not path.is_file():
        raise LabelsError(f"{path}: no such labels CSV; check --data.labels_csv.")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [name.strip() for name in reader.fieldnames or []]
        reader.fieldnames = columns
        needed = ["slide_id", target] if require_target else ["slide_id"]
        missing = [name for name in needed if name not in columns]
        if missing:
            raise LabelsError(
                f"{path}: missing column(s) {missing}; the header has {columns}. "
                "Rename the columns or set --data.target to the target column."
            )
        raw_rows = [(reader.line_num, row) for row in reader]
    collect = problems is not None
    problems = problems if problems is not None else ProblemReport(path)
    allowed = set(class_names) if class_names is not None else None
    rows: list[SlideLabel] = []
    first_line: dict[str, int] = {}
    for line, row in raw_rows:
        slide_id = _cell(row.get("slide_id"))
        if slide_id is None:
            problems.add(line, "empty slide_id")
            continue
        if slide_id in first_line:
            problems.add(
                line, f"slide {slide_id!r} is listed twice (first at line {first_line[slide_id]})"
            )
            continue
        first_line[slide_id] = line
        value = _target(row.get(target), task, allowed, target_range, require_target)
        if isinstance(value, _Bad):
            problems.add(line, f"slide {slide_id!r}: {value.reason} in column {target!r}")
            continue
        fold = _cell(row.get("fold"))
        if fold is not None and not _is_int(fold):
            problems.add(line, f"slide {slide_id!r}: fold {fold!r} is not an integer")
            continue
        split = _cell(row.get("split"))
        if split is not None and split.lower() not in SPLIT_ALIASES:
            problems.add(line, f"slide {slide_id!r}: split {split!r} is not one of train/val/test")
            continue
        rows.append(
            SlideLabel(
                slide_id=slide_id,
                target=value,
                patient_id=_cell(row.get("patient_id")) or slide_id,
                line=line,
                fold=int(fold) if fold is not None else None,
                split=SPLIT_ALIASES[split.lower()] if split is not None else None,
                task=_cell(row.get("task")),
            )
        )
    has_fold, has_split = "fold" in columns, "split" in columns
    for column, present in (("fold", has_fold), ("split", has_split)):
        if present:
            _check_partition(rows, column, problems)
    if not rows and not problems:
        problems.add(None, "no slides listed")
    if not collect:
        problems.raise_if_any(LabelsError, "Fix these rows (or remove them) and run again.")
    return LabelTable(path, target, task, tuple(rows), has_fold, has_split)


def class_names_of(targets: Iterable[str | float | None]) -> list[str]:
    """The sorted distinct class names (numerically when all of them are integers).

    Args:
        targets: Classification targets; None entries are skipped.

    Returns:
        The class names in the order that defines class indices.
    """
    names = {str(target) for target in targets if target is not None}
    if all(_is_int(name) for name in names):
        return sorted(names, key=int)
    return sorted(names)


def _class_name(value: str) -> str:
    """A class label as one name: whole numbers written as decimals (``1.0``, as spreadsheets
    export them) are the integer (``1``), so ``1`` and ``1.0`` are one class."""
    try:
        number = float(value)
    except ValueError:
        return value
    return str(int(number)) if number.is_integer() and math.isfinite(number) else value


class _Bad:
    """A rejected cell, with the reason."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _cell(value: str | None) -> str | None:
    """A stripped cell, or None for a missing value."""
    if value is None:
        return None
    value = value.strip()
    return None if value.lower() in MISSING_VALUES else value


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _target(
    raw: str | None,
    task: TaskType,
    allowed: set[str] | None,
    value_range: tuple[float, float] | None,
    required: bool,
) -> str | float | None | _Bad:
    value = _cell(raw)
    if value is None:
        if not required:
            return None
        # Name the placeholder (NaN, NA, ...) so that a user sees why a filled cell is missing.
        given = (raw or "").strip()
        return _Bad(f"missing target ({given!r} reads as no value)" if given else "missing target")
    if task == "classification":
        value = _class_name(value)
        if allowed is not None and value not in allowed:
            return _Bad(f"class {value!r} is not one of {sorted(allowed)}")
        return value
    try:
        number = float(value)
    except ValueError:
        return _Bad(f"target {value!r} is not a number")
    if not math.isfinite(number):
        return _Bad(f"target {value!r} is not finite")
    if value_range is not None and not value_range[0] <= number <= value_range[1]:
        return _Bad(
            f"target {number:g} is outside [{value_range[0]:g}, {value_range[1]:g}] (set "
            "--data.target_scale to the top of the target's range)"
        )
    return number


def _check_partition(rows: Sequence[SlideLabel], column: str, problems: ProblemReport) -> None:
    """Every row needs a ``fold``/``split`` value, and one patient's slides share it."""
    seen: dict[str, tuple[object, int]] = {}
    for row in rows:
        value = getattr(row, column)
        if value is None:
            problems.add(row.line, f"slide {row.slide_id!r} has no {column}")
            continue
        first = seen.setdefault(row.patient_id, (value, row.line))
        if first[0] != value:
            problems.add(
                row.line,
                f"patient {row.patient_id!r} is in {column} {value!r} here but in {column} "
                f"{first[0]!r} at line {first[1]}; one patient's slides must share a {column}",
            )
