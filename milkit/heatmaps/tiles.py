"""The tiles a head ranks highest and lowest, read back from the slide.

Tiles are read at the prediction's tile spec (the resolution the encoder saw) when the file has
one, so what is shown is what the model looked at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from milkit.errors import ConfigError
from milkit.slides.reader import SlideReader
from milkit.slides.tiling import read_tile
from milkit.training.prediction_file import Predictions, TileValues


@dataclass(frozen=True, eq=False)
class TileGallery:
    """The top-k and bottom-k tiles of one value.

    Attributes:
        tile_values: The values the tiles are ranked by.
        top_index: ``(k,)`` int64 tile indices, highest value first.
        top_images: ``(k, S, S, 3)`` uint8 tiles.
        bottom_index: ``(k,)`` int64 tile indices, lowest value first.
        bottom_images: ``(k, S, S, 3)`` uint8 tiles.
        coords: ``(N, 2)`` int64 level-0 corners of all tiles (index with the indices above).
        title: A line describing slide and value.
    """

    tile_values: TileValues
    top_index: np.ndarray
    top_images: np.ndarray
    bottom_index: np.ndarray
    bottom_images: np.ndarray
    coords: np.ndarray
    title: str = ""

    def figure(self, **kwargs: Any) -> Any:
        """The grid figure; see :func:`~milkit.heatmaps.figures.tile_gallery_figure`."""
        from milkit.heatmaps.figures import tile_gallery_figure

        return tile_gallery_figure(self, **kwargs)

    def _repr_png_(self) -> bytes:
        """Notebooks show the grid."""
        from milkit.heatmaps.figures import figure_png_bytes

        return figure_png_bytes(self.figure())


def top_bottom_indices(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``k`` highest (descending) and ``k`` lowest (ascending) finite values.

    Ties keep file order (stable sort), so the choice is deterministic. With fewer than ``2k``
    tiles the two lists may share tiles.

    Args:
        values: ``(N,)`` per-tile values.
        k: How many of each.

    Returns:
        ``(top, bottom)``, each ``(min(k, n_finite),)`` int64.

    Raises:
        ConfigError: ``k`` is not positive.
    """
    if k <= 0:
        raise ConfigError(f"the number of top/bottom tiles must be positive, got {k}.")
    values = np.asarray(values, dtype=np.float64)
    finite = np.flatnonzero(np.isfinite(values))
    top = finite[np.argsort(-values[finite], kind="stable")][:k]
    bottom = finite[np.argsort(values[finite], kind="stable")][:k]
    return top.astype(np.int64), bottom.astype(np.int64)


def read_tiles(
    reader: SlideReader,
    predictions: Predictions,
    indices: np.ndarray,
    *,
    size_px: int | None = None,
) -> np.ndarray:
    """Read tiles of a prediction file from its slide.

    Args:
        reader: The open slide the predictions were made on.
        predictions: Coordinates and tile geometry.
        indices: ``(k,)`` tile indices.
        size_px: Side of the returned tiles; default: the tile spec's ``tile_size_px`` (the
            encoder's view), or 224 without a spec.

    Returns:
        ``(k, size_px, size_px, 3)`` uint8.
    """
    spec = predictions.tile_spec
    # The spec's level, when the slide has it; otherwise tiles are read from their footprint.
    usable_spec = spec if spec is not None and spec.level < reader.level_count else None
    size_px = size_px or (spec.tile_size_px if spec is not None else 224)
    out = np.empty((len(indices), size_px, size_px, 3), dtype=np.uint8)
    for row, index in enumerate(np.asarray(indices, dtype=np.int64)):
        xy = (int(predictions.coords[index, 0]), int(predictions.coords[index, 1]))
        if usable_spec is not None:
            tile = read_tile(reader, usable_spec, xy)
        else:
            tile = _read_footprint(reader, xy, predictions.tile_size_level0, size_px)
        if tile.shape[:2] != (size_px, size_px):
            tile = np.asarray(
                Image.fromarray(tile).resize((size_px, size_px), Image.Resampling.LANCZOS)
            )
        out[row] = tile
    return out


def _read_footprint(
    reader: SlideReader, xy_level0: tuple[int, int], tile_size_level0: int, size_px: int
) -> np.ndarray:
    """A tile's level-0 footprint read from the coarsest level still at least ``size_px`` wide."""
    level = reader.best_level_for_downsample(tile_size_level0 / size_px)
    read_px = math.ceil(tile_size_level0 / reader.level_downsamples[level])
    return reader.read_region(xy_level0, level, (read_px, read_px))


def tile_gallery(
    reader: SlideReader,
    predictions: Predictions,
    value: str | TileValues = "attention",
    *,
    k: int = 8,
    size_px: int | None = None,
) -> TileGallery:
    """Read the ``k`` highest and ``k`` lowest tiles of a value.

    Args:
        reader: The open slide.
        predictions: The prediction file's content.
        value: Value spec or values.
        k: Tiles of each end.
        size_px: Side of each tile image (default: the tile spec's).

    Returns:
        The gallery.
    """
    tile_values = predictions.values(value) if isinstance(value, str) else value
    top, bottom = top_bottom_indices(tile_values.values, k)
    return TileGallery(
        tile_values=tile_values,
        top_index=top,
        top_images=read_tiles(reader, predictions, top, size_px=size_px),
        bottom_index=bottom,
        bottom_images=read_tiles(reader, predictions, bottom, size_px=size_px),
        coords=predictions.coords,
        title=f"{predictions.describe()} | {tile_values.name}",
    )


def region_around(
    predictions: Predictions, index: int, *, size_tiles: float = 8.0
) -> tuple[int, int, int, int]:
    """A square region of interest centred on one tile, for zooming in.

    Args:
        predictions: Coordinates and tile size.
        index: The tile to centre on (e.g. ``gallery.top_index[0]``).
        size_tiles: Side of the region in tile sides.

    Returns:
        ``(x, y, width, height)`` in level-0 pixels, clipped to start at 0 and to lie within the
        slide when its size is recorded.
    """
    tile = predictions.tile_size_level0
    side = max(tile, round(size_tiles * tile))
    x = int(predictions.coords[index, 0]) + tile // 2 - side // 2
    y = int(predictions.coords[index, 1]) + tile // 2 - side // 2
    if predictions.slide_dimensions is not None:
        x = min(x, predictions.slide_dimensions[0] - side)
        y = min(y, predictions.slide_dimensions[1] - side)
    return max(0, x), max(0, y), side, side
