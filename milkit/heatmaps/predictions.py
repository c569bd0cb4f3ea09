"""Reading a prediction file (design.md §4) and choosing the per-tile value to draw.

A prediction file ``<run>/predictions/<slide_id>.h5`` holds, per tile, the level-0 ``coords``
with the attention and scores of a MIL head, and the slide's prediction and target as root
attributes. The reader is tolerant of what a file leaves out: only ``coords`` and one per-tile
array are required, and the tile size comes from ``coords.attrs["patch_size_level0"]`` or the
``tile_spec`` JSON.

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
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np

from milkit.errors import ConfigError, FeatureFileError
from milkit.slides.tiling import TileSpec

ValueKind = Literal["attention", "probability", "regression", "logit"]

#: Per-tile datasets a prediction file may hold, in the order values are listed.
PER_TILE_DATASETS = ("attention", "scores", "tile_scores")
_SPEC_DATASET = {"attention": "attention", "score": "scores", "tile_score": "tile_scores"}


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
        scale = _as_float(self.attrs.get("target_scale"))
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
        number = _as_float(value)
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
            attrs = {key: _plain(value) for key, value in file.attrs.items()}
            if "coords" not in file:
                raise FeatureFileError(
                    f"{path}: a prediction file needs `coords`; it holds {sorted(file)}."
                )
            coords_attrs = {key: _plain(value) for key, value in file["coords"].attrs.items()}
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
    tile_size = _as_float(coords_attrs.get("patch_size_level0"))
    if tile_size is None and tile_spec is not None:
        tile_size = float(tile_spec.tile_size_level0)
    if tile_size is None or tile_size <= 0:
        raise FeatureFileError(
            f"{path}: the tile size is unknown; write `coords.attrs['patch_size_level0']` or the "
            "`tile_spec` attribute when saving predictions."
        )
    width, height = (_as_float(coords_attrs.get(key)) for key in ("level0_width", "level0_height"))
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
    return tuple(str(_plain(name)) for name in np.ravel(value))


def _plain(value: Any) -> Any:
    """An HDF5 attribute as a plain Python value (numpy scalars unwrapped, bytes decoded)."""
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.dtype.kind in "SO":
        return np.array([_plain(item) for item in value.ravel()], dtype=object)
    return value


def _as_float(value: Any) -> float | None:
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None
