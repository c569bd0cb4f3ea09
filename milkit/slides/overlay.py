"""A thumbnail with the tissue mask and the kept tiles drawn on it, for checking a slide by eye.

Tile outlines are drawn with difference arrays (one cumulative sum per edge direction), so the
cost is linear in the number of tiles plus the number of pixels, whatever the tile count.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from skimage.segmentation import find_boundaries

from milkit.errors import ConfigError, MilkitError

#: Mask contour colour (green).
MASK_COLOR = (0, 200, 0)
#: Tile outline colour (blue).
TILE_COLOR = (0, 60, 255)


def resize_mask_nearest(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A mask resampled to ``shape`` ``(H, W)`` by nearest neighbour (pixel centres)."""
    rows = ((np.arange(shape[0]) + 0.5) * mask.shape[0] / shape[0]).astype(np.int64)
    cols = ((np.arange(shape[1]) + 0.5) * mask.shape[1] / shape[1]).astype(np.int64)
    return mask[np.minimum(rows, mask.shape[0] - 1)][:, np.minimum(cols, mask.shape[1] - 1)]


def draw_overlay(
    thumbnail: np.ndarray,
    mask: np.ndarray,
    *,
    coords_level0: np.ndarray,
    tile_size_level0: int,
    thumbnail_downsample: float,
    mask_color: tuple[int, int, int] = MASK_COLOR,
    tile_color: tuple[int, int, int] = TILE_COLOR,
) -> np.ndarray:
    """Draw the mask contour (2 px, straddling the edge) and 1-px tile outlines on a thumbnail.

    A tile ``[x, x + tile_size_level0)`` covers thumbnail columns ``round(x / d)`` to
    ``round((x + tile_size_level0) / d) - 1`` with ``d = thumbnail_downsample`` (rows likewise),
    the same rounding as :func:`milkit.slides.tissue.tissue_fraction_grid`; outlines are clipped
    to the image. The contour is drawn over the tile outlines.

    Args:
        thumbnail: ``(H, W, 3)`` uint8 RGB.
        mask: ``(H, W)`` bool tissue mask on the thumbnail's grid.
        coords_level0: ``(N, 2)`` int64 tile top-left corners ``(x, y)`` in level-0 pixels.
        tile_size_level0: Tile side in level-0 pixels.
        thumbnail_downsample: Level-0 pixels per thumbnail pixel.
        mask_color: RGB of the mask contour.
        tile_color: RGB of the tile outlines.

    Returns:
        ``(H, W, 3)`` uint8, a new array (the thumbnail is not modified).

    Raises:
        ConfigError: Shapes do not match, or the downsample or tile size is not positive.
    """
    if thumbnail.ndim != 3 or thumbnail.shape[2] != 3 or thumbnail.dtype != np.uint8:
        raise ConfigError(
            f"overlay needs an (H, W, 3) uint8 thumbnail, got {thumbnail.shape} of {thumbnail.dtype}."
        )
    if mask.shape != thumbnail.shape[:2]:
        raise ConfigError(
            f"overlay mask shape {mask.shape} differs from the thumbnail's {thumbnail.shape[:2]}; "
            "draw the mask on the thumbnail it was detected on."
        )
    if not (thumbnail_downsample > 0 and tile_size_level0 > 0):
        raise ConfigError(
            "overlay needs a positive thumbnail_downsample and tile_size_level0, got "
            f"{thumbnail_downsample} and {tile_size_level0}."
        )
    coords = np.asarray(coords_level0, dtype=np.int64).reshape(-1, 2)
    image = thumbnail.copy()
    image[_tile_outlines(mask.shape, coords, tile_size_level0, thumbnail_downsample)] = tile_color
    image[find_boundaries(mask.astype(bool), mode="thick")] = mask_color
    return image


def _tile_outlines(
    shape: tuple[int, int], coords_level0: np.ndarray, tile_size_level0: int, downsample: float
) -> np.ndarray:
    """``(H, W)`` bool, True on the 1-px outline of any tile."""
    height, width = shape
    left = np.rint(coords_level0[:, 0] / downsample).astype(np.int64)
    top = np.rint(coords_level0[:, 1] / downsample).astype(np.int64)
    right = np.maximum(
        np.rint((coords_level0[:, 0] + tile_size_level0) / downsample).astype(np.int64) - 1, left
    )
    bottom = np.maximum(
        np.rint((coords_level0[:, 1] + tile_size_level0) / downsample).astype(np.int64) - 1, top
    )
    horizontal = _segments(height, width, rows=(top, bottom), start=left, stop=right)
    vertical = _segments(width, height, rows=(left, right), start=top, stop=bottom).T
    return horizontal | vertical


def _segments(
    n_rows: int, n_cols: int, *, rows: tuple[np.ndarray, ...], start: np.ndarray, stop: np.ndarray
) -> np.ndarray:
    """``(n_rows, n_cols)`` bool with segments ``[start, stop]`` (inclusive) on the given rows.

    Each segment adds +1 at its clipped start and -1 after its clipped end in a difference array;
    a cumulative sum along the row turns that into coverage counts.
    """
    diff = np.zeros((n_rows, n_cols + 1), dtype=np.int32)
    first = np.clip(start, 0, n_cols)
    after = np.clip(stop + 1, 0, n_cols)
    for row in rows:
        inside = (row >= 0) & (row < n_rows) & (first < after)
        np.add.at(diff, (row[inside], first[inside]), 1)
        np.add.at(diff, (row[inside], after[inside]), -1)
    return np.cumsum(diff, axis=1)[:, :n_cols] > 0


def save_png(path: str | Path, image: np.ndarray) -> None:
    """Write an ``(H, W, 3)`` or ``(H, W)`` uint8 image as PNG, creating parent folders.

    Raises:
        ConfigError: The image is not uint8 RGB or greyscale.
        MilkitError: The file cannot be written.
    """
    if image.dtype != np.uint8 or not (
        image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)
    ):
        raise ConfigError(
            f"{path}: PNG needs (H, W, 3) or (H, W) uint8, got {image.shape} of {image.dtype}."
        )
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path, format="PNG")
    except OSError as exc:
        raise MilkitError(
            f"{path}: cannot write PNG ({exc}); check the folder is writable."
        ) from exc


def save_mask_png(path: str | Path, mask: np.ndarray) -> None:
    """Write an ``(H, W)`` bool mask as a greyscale PNG with 0 (background) and 255 (tissue).

    Raises:
        ConfigError: The mask is not 2-D.
        MilkitError: The file cannot be written.
    """
    if mask.ndim != 2:
        raise ConfigError(f"{path}: a mask PNG needs an (H, W) array, got shape {mask.shape}.")
    save_png(path, np.where(mask.astype(bool), 255, 0).astype(np.uint8))
