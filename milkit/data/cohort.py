"""A cohort: the labels CSV joined with its feature files, checked as a whole before training.

Problems are collected across both (a slide without a feature file, an unreadable or
unfinished file, an empty bag, a missing or empty tile subset, feature sizes, encoders or
encoder weights, e.g. two random seeds, that differ between files) and raised together with
the CSV's line numbers, so one run shows everything to fix.

A slide without tiles (no tissue found: its feature file holds none, or, in a ``milkit
preprocess`` folder, its coordinate file holds none and no feature file was written) is left
out and named in :attr:`Cohort.left_out`, so a labels CSV straight from a scanner's export
works; ``strict`` makes it a problem instead.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py

from milkit.atomic import TMP_SUFFIX
from milkit.data.bags import BagInfo, probe_bag, read_tile_subset
from milkit.data.labels import (
    LabelTable,
    ProblemReport,
    SlideLabel,
    TaskType,
    class_names_of,
    read_labels,
)
from milkit.errors import FeatureFileError, LabelsError
from milkit.features.h5 import file_status
from milkit.features.tile_file import read_header


@dataclass(frozen=True)
class Cohort:
    """Slides with their labels and feature files.

    Attributes:
        rows: One labels row per slide (targets None without a labels CSV).
        bags: The feature file of each row, in the same order.
        task: ``"classification"`` or ``"regression"``.
        class_names: Class names in index order (classification), else None.
        feature_dim: The feature length D shared by every file.
        encoder: The encoder id the files record (None if they record none).
        labels: The checked labels CSV, or None for a folder of unlabelled files.
        left_out: Rows of slides without tiles, not in ``rows``.
        unlabelled: Slide ids of the feature files in the folder the labels CSV has no row
            for (not used).
    """

    rows: tuple[SlideLabel, ...]
    bags: tuple[BagInfo, ...]
    task: TaskType
    class_names: tuple[str, ...] | None
    feature_dim: int
    encoder: str | None
    labels: LabelTable | None
    left_out: tuple[SlideLabel, ...] = ()
    unlabelled: tuple[str, ...] = ()

    def notes(self) -> list[str]:
        """Lines naming what the cohort leaves out: slides without tiles, feature files
        without a row in the labels CSV."""
        left_out = self.left_out_line()
        notes = [left_out] if left_out is not None else []
        if self.unlabelled and self.labels is not None:
            named = ", ".join(self.unlabelled[:5]) + (" ..." if len(self.unlabelled) > 5 else "")
            notes.append(
                f"{len(self.unlabelled)} feature file(s) have no row in {self.labels.path} and "
                f"are not used: {named}"
            )
        return notes

    def left_out_line(self) -> str | None:
        """One line naming the slides left out for having no tiles; None when there are none."""
        if not self.left_out:
            return None
        where = f" of {self.labels.path}" if self.labels is not None else ""
        slides = ", ".join(
            f"{row.slide_id} (line {row.line})" if row.line else row.slide_id
            for row in self.left_out
        )
        return (
            f"left out {len(self.left_out)} slide(s){where} without tiles (no tissue found): "
            f"{slides}; --data.strict true refuses them instead"
        )

    def targets(self) -> list[int | float] | None:
        """Class indices (classification) or numbers (regression) per row; None if unlabelled."""
        if any(row.target is None for row in self.rows):
            return None
        if self.class_names is None:
            return [float(row.target) for row in self.rows]  # type: ignore[arg-type]
        index = {name: i for i, name in enumerate(self.class_names)}
        return [index[str(row.target)] for row in self.rows]


def load_cohort(
    features_dir: str | Path,
    labels_csv: str | Path | None,
    *,
    target: str,
    task: TaskType = "classification",
    class_names: Sequence[str] | None = None,
    target_range: tuple[float, float] | None = None,
    tile_subset: str | None = None,
    strict: bool = False,
) -> Cohort:
    """Read the labels, find and probe every slide's feature file, and check them together.

    Args:
        features_dir: Folder of ``<slide_id>.h5`` feature files.
        labels_csv: The labels CSV (docs/design.md §5); None to take every finished file in
            ``features_dir`` without targets (prediction on new slides).
        target: Name of the target column.
        task: ``"classification"`` or ``"regression"``.
        class_names: Classes in index order; None to take the sorted classes of the CSV.
        target_range: Inclusive bounds for regression targets.
        tile_subset: Name of a boolean ``(N,)`` dataset every feature file must hold with at
            least one True tile (e.g. a tumour-bed mask); None to use every tile.
        strict: Make a slide without tiles a problem instead of leaving it out.

    Returns:
        The checked cohort.

    Raises:
        LabelsError: CSV problems, slides without a feature file, or fewer than two classes;
            feature-file problems found alongside are listed in the same message.
        FeatureFileError: Only feature-file problems (unreadable, unfinished, empty, a missing,
            malformed or empty tile subset, or different feature sizes or encoders), every
            one listed.
    """
    features_dir = Path(features_dir)
    if not features_dir.is_dir():
        raise FeatureFileError(f"{features_dir}: no such folder; check --data.features_dir.")
    if labels_csv is None:
        files = sorted(p for p in features_dir.glob("*.h5") if not p.name.endswith(TMP_SUFFIX))
        if not files:
            raise FeatureFileError(f"{features_dir}: no feature files (*.h5) in this folder.")
        rows = tuple(SlideLabel(p.stem, None, p.stem, line=0) for p in files)
        table = None
        problems = ProblemReport(features_dir)
    else:
        problems = ProblemReport(Path(labels_csv))
        table = read_labels(
            labels_csv,
            target=target,
            task=task,
            class_names=class_names,
            target_range=target_range,
            problems=problems,
        )
        rows = table.rows
    label_problem = bool(problems)
    bags: list[BagInfo | None] = []
    left_out: list[SlideLabel] = []
    for row in rows:
        path = features_dir / f"{row.slide_id}.h5"
        if not path.is_file():
            tiled_empty = _tiled_without_tiles(features_dir, row.slide_id)
            if tiled_empty and not strict:
                left_out.append(row)
            else:
                why = " (its tiling found no tissue)" if tiled_empty else ""
                problems.add(row.line, f"slide {row.slide_id!r} has no feature file ({path}){why}")
                label_problem = True
            bags.append(None)
            continue
        try:
            info = probe_bag(path)
        except FeatureFileError as error:
            problems.add(row.line, f"slide {row.slide_id!r}: {error}")
            bags.append(None)
            continue
        if info.n_tiles == 0 and not strict:
            left_out.append(row)
            bags.append(None)
            continue
        if info.n_tiles == 0:
            problems.add(row.line, f"slide {row.slide_id!r}: empty bag, {path} has no tiles")
        elif tile_subset is not None:
            _check_tile_subset(row, info, tile_subset, problems)
        bags.append(info)
    if rows and len(left_out) == len(rows):
        raise FeatureFileError(
            f"{features_dir}: none of the cohort's {len(rows)} slides has tiles (no tissue "
            "found); check the tiling's thumbnails and --min-tissue."
        )
    found = [(row, info) for row, info in zip(rows, bags, strict=True) if info is not None]
    kept = tuple(row for row, _ in found)  # every row but those left out, once nothing failed
    feature_dim = _check_shared(found, "feature_dim", "feature size", problems)
    encoder = _check_shared(found, "encoder", "encoder", problems)
    _check_shared(found, "encoder_weights", "encoder", problems)  # one name, other weights
    names = None
    if task == "classification" and table is None:
        names = tuple(class_names) if class_names else None  # unlabelled: only what is given
    elif task == "classification":
        names = _class_names(kept, class_names, problems)
        label_problem |= names is None
    problems.raise_if_any(
        LabelsError if label_problem else FeatureFileError,
        f"Fix the labels CSV or re-extract the listed feature files in {features_dir}.",
    )
    return Cohort(
        rows=kept,
        bags=tuple(info for _, info in found),
        task=task,
        class_names=names,
        feature_dim=int(feature_dim),
        encoder=encoder,
        labels=table,
        left_out=tuple(left_out),
        unlabelled=_unlabelled(features_dir, rows) if table is not None else (),
    )


def _unlabelled(features_dir: Path, rows: Sequence[SlideLabel]) -> tuple[str, ...]:
    """Slide ids of the finished-looking feature files in the folder that no row names."""
    named = {row.slide_id for row in rows}
    return tuple(sorted(path.stem for path in features_dir.glob("*.h5") if path.stem not in named))


def _tiled_without_tiles(features_dir: Path, slide_id: str) -> bool:
    """Whether a ``milkit preprocess`` folder (``OUT/features``, ``OUT/coords``) holds a
    finished coordinate file of the slide with no tiles: no feature file is written then."""
    coords = features_dir.parent / "coords" / f"{slide_id}.h5"
    return file_status(coords) == "complete" and read_header(coords).n_tiles == 0


def _check_shared(
    found: Sequence[tuple[SlideLabel, BagInfo]], field: str, what: str, problems: ProblemReport
) -> Any:
    """The value of ``field`` most files share; every file that differs is a problem.

    Returns ``Any``: the value has the type of the named :class:`BagInfo` field (None when no
    file was found).
    """
    counts = Counter(getattr(info, field) for _, info in found)
    if not counts:
        return None
    common = counts.most_common(1)[0][0]
    for row, info in found:
        value = getattr(info, field)
        if value != common:
            problems.add(
                row.line,
                f"slide {row.slide_id!r}: {what} {value!r} differs from {common!r} of "
                f"{counts[common]} other file(s) ({info.path})",
            )
    return common


def _check_tile_subset(row: SlideLabel, info: BagInfo, name: str, problems: ProblemReport) -> None:
    """Record a problem if the file's tile subset is missing, malformed or selects no tile."""
    try:
        with h5py.File(info.path, "r") as file:
            selected = int(read_tile_subset(file, name, info.n_tiles).sum())
    except FeatureFileError as error:
        problems.add(row.line, f"slide {row.slide_id!r}: {error}")
        return
    if selected == 0:
        problems.add(
            row.line,
            f"slide {row.slide_id!r}: tile subset {name!r} selects none of its {info.n_tiles} "
            f"tiles ({info.path}); fix the mask or leave the slide out",
        )


def _class_names(
    rows: Sequence[SlideLabel], given: Sequence[str] | None, problems: ProblemReport
) -> tuple[str, ...] | None:
    """The class names in index order, or None (a recorded problem) if fewer than two."""
    names = list(given) if given is not None else class_names_of(row.target for row in rows)
    if len(names) < 2:
        problems.add(None, f"need at least two classes to classify, found {names}")
        return None
    return tuple(names)
