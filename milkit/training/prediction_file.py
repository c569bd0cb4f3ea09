"""The prediction file (docs/design.md §4): its writer, its reader, and the per-tile value to draw.

``milkit predict`` writes ``<run>/predictions/<slide_id>.h5`` (:func:`write_prediction_file`):
``coords`` (N, 2) int64 level-0 ``(x, y)`` with the feature file's ``coords`` attributes (e.g.
``patch_size_level0``), ``attention`` (N,) or (N, H), ``scores`` (N,) or (N, C) (the model's tile
scores, when it has them), and root attributes ``slide_id``, ``prediction``, ``target`` (when
known), ``probabilities``, ``label_names`` (JSON), ``task``, ``target_name``, ``target_scale`` and
``target_units`` (regression), ``encoder``, ``feature_file``, ``slide_path`` and ``tile_spec``
(when the feature file records them), ``milkit_version`` and ``complete``. Files are written
atomically (:mod:`milkit.atomic`). Regression files keep the model's own scale: ``scores`` are the
tile scores s_i in [0, 1] and ``prediction``/``target`` are divided by ``target_scale`` likewise,
so one factor, ``target_scale``, turns every number of the file into the target's units.

The reader (:func:`read_predictions`) is tolerant of what a file leaves out, so files of other
tools work too: only ``coords`` and one per-tile array are required, and the tile size comes from
``coords.attrs["patch_size_level0"]`` or the ``tile_spec`` JSON.

What is read (everything but ``coords`` and one of the per-tile arrays is optional):

- datasets: ``coords`` (N, 2) level-0 ``(x, y)``; ``attention`` (N,) or (N, H); ``scores``
  (N,) or (N, C); ``tile_scores`` (N,) or (N, C);
- ``coords`` attrs: ``patch_size_level0``, ``level0_width``, ``level0_height``;
- root attrs: ``slide_id``, ``slide_path``, ``tile_spec`` (JSON), ``complete`` (a file with
  ``complete == False`` is unfinished), ``label_names`` (JSON list or string array),
  ``prediction``, ``target``, ``task`` (``"classification"``/``"regression"``),
  ``target_scale`` (multiplies regression scores into the target's units), ``target_units``
  (or ``units``), ``target_name``.

A *value spec* names what to draw: ``attention`` (the mean over heads), ``attention:<head>``,
``score`` (the positive class of a binary head, the predicted class of a multi-class head, or the
regression score), ``score:<class name or index>``, and ``tile_score[:<class>]`` likewise.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np

import milkit
from milkit.atomic import atomic_write
from milkit.errors import ConfigError, FeatureFileError, SlideOpenError
from milkit.features.h5 import number_attr, plain_attr
from milkit.features.tile_file import read_coords
from milkit.slides.tiling import TileSpec

ValueKind = Literal["attention", "probability", "regression", "logit"]

PREDICTIONS_DIR = "predictions"
PREDICTIONS_CSV = "predictions.csv"

#: Per-tile datasets a prediction file may hold, in the order values are listed.
PER_TILE_DATASETS = ("attention", "scores", "tile_scores")
_SPEC_DATASET = {"attention": "attention", "score": "scores", "tile_score": "tile_scores"}


@dataclass
class SlidePrediction:
    """What ``predict`` yields for one slide (padding removed).

    Attributes:
        slide_id: The slide.
        slide_path: The slide file, when the feature file records it.
        feature_path: The feature file the tiles came from.
        coords: ``(n, 2)`` int64 level-0 ``(x, y)`` of the tiles.
        attention: ``(n,)`` or ``(n, H)`` attention over the tiles.
        tile_scores: ``(n,)`` or ``(n, C)`` the model's tile scores (instance logits, or tile
            values in [0, 1] for regression), or None.
        probabilities: ``(C,)`` class probabilities (classification), else None.
        prediction: Predicted class name, or predicted value in target units.
        target: True class name or value, when known.
    """

    slide_id: str
    slide_path: str | None
    feature_path: str
    coords: np.ndarray
    attention: np.ndarray
    tile_scores: np.ndarray | None
    probabilities: np.ndarray | None
    prediction: str | float
    target: str | float | None


@dataclass(frozen=True)
class TileValues:
    """One number per tile, ready to draw.

    Attributes:
        values: ``(N,)`` float64 in the quantity's own units (scaled by ``target_scale`` for
            regression).
        name: Short name used in file names and as the GeoJSON measurement name, e.g.
            ``"attention"``, ``"score: tumour"``.
        kind: ``"attention"``, ``"probability"`` (in [0, 1]), ``"regression"`` or ``"logit"``.
        units: Units shown on the colour bar (e.g. ``"% TILs"``), or ``""``.
        natural_range: The value range a calibrated colour scale spans (``(0, 1)`` for
            probabilities, ``(0, target_scale)`` for regression in [0, 1]), or None.
    """

    values: np.ndarray
    name: str
    kind: ValueKind
    units: str = ""
    natural_range: tuple[float, float] | None = None

    def format(self, value: float) -> str:
        """One value as text in its units, e.g. ``"0.93"``, ``"4.1e-05"``, ``"42.5 % TILs"``."""
        if self.kind == "probability":
            return f"{value:.2f}"
        text = f"{value:.3g}"
        return f"{text} {self.units}" if self.kind == "regression" and self.units else text

    @property
    def slug(self) -> str:
        """``name`` made safe for a file name (``"score: tumour"`` -> ``"score-tumour"``)."""
        return re.sub(r"[^A-Za-z0-9_.]+", "-", self.name).strip("-") or "value"


@dataclass(frozen=True, eq=False)
class Predictions:
    """The per-tile outputs of a MIL head on one slide.

    Attributes:
        path: The prediction file.
        slide_id: Identifier of the slide (attribute, else the file's stem).
        slide_path: Where the slide was read from, when recorded.
        coords: ``(N, 2)`` int64 level-0 ``(x, y)`` top-left corners.
        tile_size_level0: Tile side in level-0 pixels.
        tile_spec: The saved tile geometry, when recorded.
        slide_dimensions: ``(width, height)`` of level 0 the coordinates refer to, when recorded.
        arrays: Per-tile datasets found (``attention``, ``scores``, ``tile_scores``), each
            ``(N, K)`` float64 (1-D datasets get ``K = 1``).
        attrs: All root attributes as plain Python values.
        label_names: Class names, when recorded.
    """

    path: Path
    slide_id: str
    slide_path: str | None
    coords: np.ndarray
    tile_size_level0: int
    tile_spec: TileSpec | None
    slide_dimensions: tuple[int, int] | None
    arrays: dict[str, np.ndarray]
    attrs: dict[str, Any] = field(default_factory=dict)
    label_names: tuple[str, ...] = ()

    @property
    def num_tiles(self) -> int:
        """Number of tiles ``N``."""
        return len(self.coords)

    @property
    def is_regression(self) -> bool:
        """Whether the head predicts a number (``task`` attr, or a float ``prediction``)."""
        task = str(self.attrs.get("task", "")).lower()
        if task:
            return task == "regression"
        if "target_scale" in self.attrs or "target_units" in self.attrs:
            return True
        prediction = self.attrs.get("prediction")
        return not self.label_names and isinstance(prediction, float)

    @property
    def target_scale(self) -> float:
        """Factor from the stored scores to the target's units (1 when not recorded)."""
        scale = number_attr(self.attrs.get("target_scale"))
        return scale if scale is not None and scale != 0 else 1.0

    @property
    def target_units(self) -> str:
        """Units of the regression target, e.g. ``"% TILs"`` (``""`` when not recorded)."""
        return str(self.attrs.get("target_units", self.attrs.get("units", "")) or "")

    @property
    def predicted_class(self) -> int | None:
        """Index of the predicted class, when ``prediction`` names or indexes a known class."""
        return self._class_index_or_none(self.attrs.get("prediction"))

    def describe(self) -> str:
        """One line for titles: slide id, prediction and target in readable form."""
        parts = [self.slide_id]
        for key in ("prediction", "target"):
            if key in self.attrs:
                parts.append(f"{key}: {self._readable(self.attrs[key])}")
        return " | ".join(parts)

    def default_value_specs(self) -> list[str]:
        """The values worth drawing for this file: attention, then the score(s) of interest.

        A binary head gives its positive class; a multi-class head its predicted class, or every
        class when the prediction is not recorded.
        """
        specs = ["attention"] if "attention" in self.arrays else []
        for spec, dataset in (("score", "scores"), ("tile_score", "tile_scores")):
            if dataset not in self.arrays:
                continue
            n_columns = self.arrays[dataset].shape[1]
            if n_columns <= 2 or self.predicted_class is not None:
                specs.append(spec)
            else:
                specs.extend(f"{spec}:{self._class_name(i)}" for i in range(n_columns))
            if dataset == "scores":
                break  # tile_scores duplicate scores when both exist
        return specs

    def values(self, spec: str = "attention") -> TileValues:
        """The per-tile values a value spec names (see the module docstring).

        Args:
            spec: ``attention[:head]``, ``score[:class]`` or ``tile_score[:class]``.

        Returns:
            The values with their name, kind and units.

        Raises:
            ConfigError: Unknown spec, a dataset the file lacks, or an unknown class/head.
        """
        kind_name, _, selector = spec.partition(":")
        kind_name, selector = kind_name.strip().lower(), selector.strip()
        if kind_name not in _SPEC_DATASET:
            raise ConfigError(
                f"unknown heatmap value {spec!r}; use attention[:head], score[:class] or "
                "tile_score[:class]."
            )
        dataset = _SPEC_DATASET[kind_name]
        if dataset not in self.arrays:
            raise ConfigError(
                f"{self.path}: has no `{dataset}` for --value {spec!r}; it holds "
                f"{sorted(self.arrays)}."
            )
        array = self.arrays[dataset]
        if kind_name == "attention":
            return self._attention(array, selector, spec)
        return self._scores(array, selector, spec, label=kind_name.replace("_", " "))

    def measurements(self) -> dict[str, np.ndarray]:
        """Every per-tile quantity under a readable name, for QuPath measurement maps.

        Returns:
            ``{name: (N,) float64}``: attention (per head when several), and each class's score.
        """
        specs = []
        for kind_name, dataset in _SPEC_DATASET.items():
            n_columns = self.arrays[dataset].shape[1] if dataset in self.arrays else 0
            if n_columns == 1 or (kind_name == "attention" and n_columns):
                specs.append(kind_name)
            if n_columns > 1:
                specs.extend(f"{kind_name}:{column}" for column in range(n_columns))
        chosen = [self.values(spec) for spec in specs]
        return {tile_values.name: tile_values.values for tile_values in chosen}

    # -- helpers -------------------------------------------------------------------------------
    def _attention(self, array: np.ndarray, selector: str, spec: str) -> TileValues:
        heads = array.shape[1]
        if not selector:
            return TileValues(array.mean(axis=1), "attention", "attention")
        if selector.isdigit() and int(selector) < heads:
            head = int(selector)
        elif heads == len(self.label_names) and selector in self.label_names:
            head = self.label_names.index(selector)  # one attention branch per class
        else:
            raise ConfigError(
                f"{self.path}: --value {spec!r}: attention has {heads} head(s); pick 0-{heads - 1}"
                " (or a class name when there is one head per class)."
            )
        name = f"attention: {self.label_names[head]}" if heads == len(self.label_names) else None
        return TileValues(array[:, head], name or f"attention: head {head}", "attention")

    def _scores(self, array: np.ndarray, selector: str, spec: str, *, label: str) -> TileValues:
        n_columns = array.shape[1]
        if n_columns == 1:
            if selector not in ("", "0"):
                raise ConfigError(f"{self.path}: --value {spec!r}: the scores have one column.")
            column, class_name = 0, ""
        else:
            column = self._column(selector, n_columns, spec)
            class_name = self._class_name(column)
        values = array[:, column]
        name = f"{label}: {class_name}" if class_name else label
        if self.is_regression:
            scale = self.target_scale
            in_unit_range = bool(values.size) and values.min() >= 0.0 and values.max() <= 1.0
            natural_range = (0.0, scale) if in_unit_range else None
            return TileValues(values * scale, name, "regression", self.target_units, natural_range)
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            return TileValues(values, name, "probability", "probability", (0.0, 1.0))
        return TileValues(values, name, "logit", "logit")

    def _column(self, selector: str, n_columns: int, spec: str) -> int:
        if not selector:
            if n_columns == 2:
                return 1
            predicted = self.predicted_class
            if predicted is not None:
                return predicted
            raise ConfigError(
                f"{self.path}: --value {spec!r} is ambiguous for {n_columns} classes and the file "
                f"records no prediction; name a class, e.g. --value "
                f"'{spec}:{self._class_name(0)}'."
            )
        index = self._class_index_or_none(selector)
        if index is None or index >= n_columns:
            known: list[str] | list[int] = list(self.label_names) or list(range(n_columns))
            raise ConfigError(f"{self.path}: --value {spec!r}: unknown class; known: {known}.")
        return index

    def _class_index_or_none(self, value: Any) -> int | None:
        if isinstance(value, str):
            if value in self.label_names:
                return self.label_names.index(value)
            return int(value) if value.isdigit() else None
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return int(value)
        return None

    def _class_name(self, index: int) -> str:
        return self.label_names[index] if index < len(self.label_names) else f"class {index}"

    def _readable(self, value: Any) -> str:
        index = self._class_index_or_none(value)
        if index is not None and not self.is_regression and index < len(self.label_names):
            return self.label_names[index]
        number = number_attr(value)
        if number is not None and self.is_regression:
            units = f" {self.target_units}" if self.target_units else ""
            return f"{number * self.target_scale:.3g}{units}"
        return str(value)


def read_predictions(path: str | Path) -> Predictions:
    """Read a prediction file.

    Args:
        path: ``<run>/predictions/<slide_id>.h5``.

    Returns:
        The file's per-tile arrays and metadata.

    Raises:
        FeatureFileError: The file is missing, unreadable, unfinished, has no ``coords`` or no
            per-tile values, arrays disagree with ``coords`` in length, or no tile size is known.
    """
    path = Path(path)
    if not path.is_file():
        raise FeatureFileError(f"{path}: no such prediction file; run `milkit predict` first.")
    try:
        with h5py.File(path, "r") as file:
            attrs = {key: plain_attr(value) for key, value in file.attrs.items()}
            if "coords" not in file:
                raise FeatureFileError(
                    f"{path}: a prediction file needs `coords`; it holds {sorted(file)}."
                )
            coords_attrs = {key: plain_attr(value) for key, value in file["coords"].attrs.items()}
            coords = np.asarray(file["coords"][()])
            arrays = {
                name: np.asarray(file[name][()]) for name in PER_TILE_DATASETS if name in file
            }
    except OSError as error:
        raise FeatureFileError(
            f"{path} is not a readable HDF5 file ({error}); delete it and rerun the prediction."
        ) from error
    if attrs.get("complete") is False:
        raise FeatureFileError(f"{path} is unfinished (complete=False); rerun the prediction.")
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise FeatureFileError(f"{path}: `coords` must be (N, 2), got {coords.shape}.")
    if not arrays:
        raise FeatureFileError(
            f"{path}: no per-tile values (expected one of {list(PER_TILE_DATASETS)})."
        )
    for name, array in arrays.items():
        if array.ndim not in (1, 2) or array.shape[0] != len(coords):
            raise FeatureFileError(
                f"{path}: `{name}` has shape {array.shape} for {len(coords)} coords; expected "
                f"({len(coords)},) or ({len(coords)}, K)."
            )
        arrays[name] = array.reshape(len(coords), -1).astype(np.float64)
    tile_spec = TileSpec.from_json(attrs["tile_spec"]) if attrs.get("tile_spec") else None
    tile_size = number_attr(coords_attrs.get("patch_size_level0"))
    if tile_size is None and tile_spec is not None:
        tile_size = float(tile_spec.tile_size_level0)
    if tile_size is None or tile_size <= 0:
        raise FeatureFileError(
            f"{path}: the tile size is unknown; write `coords.attrs['patch_size_level0']` or the "
            "`tile_spec` attribute when saving predictions."
        )
    width, height = (
        number_attr(coords_attrs.get(key)) for key in ("level0_width", "level0_height")
    )
    return Predictions(
        path=path,
        slide_id=str(attrs.get("slide_id") or path.stem),
        slide_path=str(attrs["slide_path"]) if attrs.get("slide_path") else None,
        coords=coords.astype(np.int64),
        tile_size_level0=round(tile_size),
        tile_spec=tile_spec,
        slide_dimensions=(int(width), int(height)) if width and height else None,
        arrays=arrays,
        attrs=attrs,
        label_names=_label_names(attrs.get("label_names")),
    )


def _label_names(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return (value,)
    return tuple(str(plain_attr(name)) for name in np.ravel(value))


def prediction_files(run_dir: str | Path) -> list[Path]:
    """The prediction files of a run, ``RUN_DIR/predictions/*.h5``, sorted."""
    return sorted((Path(run_dir) / "predictions").glob("*.h5"))


def find_runs(root: str | Path) -> list[Path]:
    """Run folders under ``root`` (itself included) that hold prediction files, sorted.

    Args:
        root: E.g. the demo's output folder.

    Raises:
        ConfigError: ``root`` does not exist or holds no run.
    """
    root = Path(root)
    folders = sorted({path.parent.parent for path in root.glob("**/predictions/*.h5")})
    if not folders:
        raise ConfigError(
            f"{root}: no run with predictions/*.h5 here; run `milkit demo` (or predict with a "
            "trained model) first, or point at a run folder."
        )
    return folders


def locate_slide(
    predictions: Predictions,
    slide_index: Mapping[str, Path] | None = None,
    slide_path: str | Path | None = None,
) -> Path:
    """Find the slide a prediction file was made on.

    Args:
        predictions: The prediction file's content.
        slide_index: Slide id -> path in ``--slides-dir``; looked up first.
        slide_path: An explicit slide, overriding both.

    Raises:
        SlideOpenError: No slide is found (the message names what was tried).
    """
    if slide_path is not None:
        return Path(slide_path)
    if slide_index and predictions.slide_id in slide_index:
        return slide_index[predictions.slide_id]
    if predictions.slide_path and Path(predictions.slide_path).is_file():
        return Path(predictions.slide_path)
    recorded = predictions.slide_path or "no slide_path attribute"
    where = "the --slides-dir given" if slide_index is not None else "no --slides-dir given"
    raise SlideOpenError(
        f"{predictions.path}: slide {predictions.slide_id!r} not found ({recorded}; {where}); "
        "pass --slides-dir with the folder holding it."
    )


def write_prediction_file(
    path: Path, slide: SlidePrediction, extra_attrs: dict[str, Any] | None = None
) -> Path:
    """Write one slide's prediction file atomically.

    Args:
        path: Final path, ``<run>/predictions/<slide_id>.h5``.
        slide: The slide's prediction.
        extra_attrs: More root attributes (None values skipped).

    Returns:
        ``path``.
    """
    source = read_coords(slide.feature_path)
    attrs: dict[str, Any] = {
        "milkit_version": milkit.__version__,
        "slide_id": slide.slide_id,
        "slide_path": slide.slide_path,
        "feature_file": slide.feature_path,
        "tile_spec": source.attrs.get("tile_spec"),
        "prediction": slide.prediction,
        "target": slide.target,
        "probabilities": slide.probabilities,
        **(extra_attrs or {}),
    }
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as file:
        coords = file.create_dataset("coords", data=slide.coords.astype(np.int64))
        coords.attrs.update(source.coords_attrs)
        file.create_dataset("attention", data=slide.attention.astype(np.float32))
        if slide.tile_scores is not None:
            file.create_dataset("scores", data=slide.tile_scores.astype(np.float32))
        for key, value in attrs.items():
            if value is not None:
                file.attrs[key] = value
        file.attrs["complete"] = True  # last: a file without it is never a result
    return path
