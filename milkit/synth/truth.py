"""Ground truth of synthetic slides: class and lymphocyte-density maps, and labels of any tile.

A truth file ``<out>/truth/<slide_id>.h5`` holds two maps on one low-resolution grid:

| name | type | meaning |
|---|---|---|
| ``class_map`` | (rows, cols) uint8 | :data:`CLASS_NAMES` index per map pixel |
| ``til_density`` | (rows, cols) float32 | lymphocyte density u in [0, 1] (meaningful over stroma) |

Both carry attrs ``downsample`` (level-0 px per map px), ``mpp`` (µm per map px) and ``classes``
(JSON list); the root attrs hold the slide's id, size, task and generation parameters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from milkit.atomic import atomic_write
from milkit.errors import TruthFileError

CLASS_NAMES = ("background", "stroma", "tumor", "lymphocyte_aggregate", "artefact")
BACKGROUND, STROMA, TUMOR, AGGREGATE, ARTEFACT = range(len(CLASS_NAMES))
#: Classes that are tissue (artefacts are not, even when a pen stroke covers tissue).
TISSUE_CLASSES = (STROMA, TUMOR, AGGREGATE)
#: Classes over which stromal TIL density is averaged.
STROMA_CLASSES = (STROMA, AGGREGATE)


@dataclass(frozen=True, eq=False)
class SlideTruth:
    """Ground truth of one slide.

    Attributes:
        class_map: ``(rows, cols)`` uint8 class per map pixel (see :data:`CLASS_NAMES`).
        til_density: ``(rows, cols)`` float32 lymphocyte density in [0, 1].
        downsample: Level-0 pixels per map pixel.
        mpp: Microns per map pixel.
        classes: Class names, index = value in ``class_map``.
        attrs: Provenance (``slide_id``, ``task``, ``seed``, ``level0_width``, ...).
    """

    class_map: np.ndarray
    til_density: np.ndarray
    downsample: float
    mpp: float
    classes: tuple[str, ...] = CLASS_NAMES
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def tumor_fraction(self) -> float:
        """Tumour area / tissue area (0 when there is no tissue)."""
        tissue = np.count_nonzero(tissue_mask(self))
        return float(np.count_nonzero(self.class_map == TUMOR) / tissue) if tissue else 0.0

    @property
    def stil_score(self) -> float:
        """100 x mean lymphocyte density over stroma and aggregates (NaN without stroma)."""
        stroma = np.isin(self.class_map, STROMA_CLASSES)
        return float(100 * self.til_density[stroma].mean()) if stroma.any() else float("nan")


def save_truth(truth: SlideTruth, path: str | Path) -> Path:
    """Write ``truth`` to an HDF5 file atomically (``<path>.tmp``, then rename).

    Returns:
        The path written.
    """
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as h5:
        for name, data in (("class_map", truth.class_map), ("til_density", truth.til_density)):
            dataset = h5.create_dataset(name, data=data, compression="gzip", shuffle=True)
            dataset.attrs["downsample"] = float(truth.downsample)
            dataset.attrs["mpp"] = float(truth.mpp)
            dataset.attrs["classes"] = json.dumps(list(truth.classes))
        for key, value in truth.attrs.items():
            h5.attrs[key] = value
    return Path(path)


def load_truth(path: str | Path) -> SlideTruth:
    """Read a truth file written by :func:`save_truth`.

    Raises:
        TruthFileError: The file is missing or lacks the maps or their attributes.
    """
    path = Path(path)
    if not path.is_file():
        raise TruthFileError(f"{path}: no such ground-truth file; write it with milkit.synth.")
    try:
        with h5py.File(path, "r") as h5:
            class_map = h5["class_map"]
            return SlideTruth(
                class_map=class_map[()].astype(np.uint8),
                til_density=h5["til_density"][()].astype(np.float32),
                downsample=float(class_map.attrs["downsample"]),
                mpp=float(class_map.attrs["mpp"]),
                classes=tuple(json.loads(class_map.attrs["classes"])),
                attrs={key: _plain(value) for key, value in h5.attrs.items()},
            )
    except (OSError, KeyError, ValueError) as exc:
        raise TruthFileError(
            f"{path}: not a milkit ground-truth file ({exc}); regenerate it with milkit.synth."
        ) from exc


def _plain(value: Any) -> Any:
    """HDF5 attribute values as plain Python objects."""
    return value.item() if isinstance(value, np.generic) else value


def tissue_mask(truth: SlideTruth) -> np.ndarray:
    """``(rows, cols)`` bool, True on stroma, tumour and lymphocyte aggregates."""
    return np.isin(truth.class_map, TISSUE_CLASSES)


@dataclass(frozen=True, eq=False)
class TileTruth:
    """Ground-truth labels of a set of tiles.

    Attributes:
        class_fractions: ``(N, 5)`` float32 area fraction of each class in each tile; area
            outside the slide counts as background, so rows sum to 1.
        tumor_fraction: ``(N,)`` float32 tumour area / tile area.
        tissue_fraction: ``(N,)`` float32 tissue (stroma, tumour, aggregate) area / tile area.
        til_density: ``(N,)`` float32 mean lymphocyte density over the tile's stroma and
            aggregates; NaN where the tile has none.
        majority_class: ``(N,)`` uint8 class with the largest area.
    """

    class_fractions: np.ndarray
    tumor_fraction: np.ndarray
    tissue_fraction: np.ndarray
    til_density: np.ndarray
    majority_class: np.ndarray


def _area(
    integral: np.ndarray, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray
) -> np.ndarray:
    """Integral of a piecewise-constant map over rectangles given in map pixels.

    ``integral`` is the ``(rows + 1, cols + 1)`` summed-area table. Within a cell the integral
    is bilinear in the corner position, so bilinear interpolation of the table is exact.
    """
    rows, cols = integral.shape[0] - 1, integral.shape[1] - 1

    def at(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        x, y = np.clip(x, 0, cols), np.clip(y, 0, rows)
        c, r = np.minimum(x.astype(np.int64), cols - 1), np.minimum(y.astype(np.int64), rows - 1)
        fx, fy = x - c, y - r
        top = integral[r, c] * (1 - fx) + integral[r, c + 1] * fx
        bottom = integral[r + 1, c] * (1 - fx) + integral[r + 1, c + 1] * fx
        return top * (1 - fy) + bottom * fy

    return at(x1, y1) - at(x0, y1) - at(x1, y0) + at(x0, y0)


def _summed_area(values: np.ndarray) -> np.ndarray:
    table = np.zeros((values.shape[0] + 1, values.shape[1] + 1), dtype=np.float64)
    np.cumsum(np.cumsum(values, axis=0, dtype=np.float64), axis=1, out=table[1:, 1:])
    return table


def tile_truth(truth: SlideTruth, coords_level0: np.ndarray, tile_size_level0: int) -> TileTruth:
    """Labels of square tiles from the truth maps (exact area weighting of map pixels).

    Args:
        truth: The slide's ground truth.
        coords_level0: ``(N, 2)`` int64 top-left ``(x, y)`` of each tile in level-0 pixels
            (as in feature files and ``TileSpec`` grids).
        tile_size_level0: Tile side in level-0 pixels (``TileSpec.tile_size_level0``).

    Returns:
        Per-tile class fractions, tumour and tissue fractions, stromal TIL density and
        majority class.

    Raises:
        TruthFileError: ``coords_level0`` is not ``(N, 2)`` or the tile size is not positive.
    """
    coords = np.asarray(coords_level0)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise TruthFileError(f"coords_level0 must have shape (N, 2), got {coords.shape}.")
    if tile_size_level0 <= 0:
        raise TruthFileError(f"tile_size_level0 must be positive, got {tile_size_level0}.")
    x0 = coords[:, 0].astype(np.float64) / truth.downsample
    y0 = coords[:, 1].astype(np.float64) / truth.downsample
    side = tile_size_level0 / truth.downsample
    x1, y1 = x0 + side, y0 + side
    tile_area = side * side

    fractions = np.zeros((coords.shape[0], len(truth.classes)), dtype=np.float64)
    for value in range(1, len(truth.classes)):
        table = _summed_area((truth.class_map == value).astype(np.float32))
        fractions[:, value] = _area(table, x0, y0, x1, y1) / tile_area
    fractions[:, BACKGROUND] = 1 - fractions[:, 1:].sum(axis=1)
    fractions = np.clip(fractions, 0, 1)

    stroma = np.isin(truth.class_map, STROMA_CLASSES)
    stroma_area = _area(_summed_area(stroma.astype(np.float32)), x0, y0, x1, y1)
    til_sum = _area(_summed_area(np.where(stroma, truth.til_density, 0)), x0, y0, x1, y1)
    has_stroma = stroma_area > 1e-6 * tile_area
    til = np.full(coords.shape[0], np.nan)
    til[has_stroma] = til_sum[has_stroma] / stroma_area[has_stroma]

    return TileTruth(
        class_fractions=fractions.astype(np.float32),
        tumor_fraction=fractions[:, TUMOR].astype(np.float32),
        tissue_fraction=fractions[:, list(TISSUE_CLASSES)].sum(axis=1).astype(np.float32),
        til_density=np.clip(til, 0, 1).astype(np.float32),
        majority_class=fractions.argmax(axis=1).astype(np.uint8),
    )
