"""Painting per-tile values onto a pixel grid at their exact level-0 footprint.

A tile ``[x, x + s) x [y, y + s)`` in level-0 pixels lands on the render grid as a box with
fractional edges. Every render pixel receives ``value * covered_area`` and ``covered_area`` (the
fraction of the pixel the tile covers, in [0, 1]); the heatmap is their ratio. So overlapping
tiles average, tiles smaller than a pixel still count in proportion to their area, and tiles
that abut leave neither gaps nor seams (the "line artefacts" of grids rounded to whole pixels).

The area of a box over a pixel grid is separable, ``cover(r, c) = wx(c) * wy(r)``, and each 1-D
profile ``w`` is the cumulative sum of four point weights: at an edge ``e = i + f`` (integer
part ``i``, fraction ``f``) the profile rises by ``1 - f`` in pixel ``i`` and by ``f`` in pixel
``i + 1``. The 2-D coverage is then a double cumulative sum of 16 point weights per tile, added
with one ``np.bincount`` for all tiles: linear in tiles plus pixels, whatever the tile count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from milkit.errors import ConfigError

#: Coverage below this is numerical noise of the cumulative sums, not a tile.
COVERAGE_EPS = 1e-6


@dataclass(frozen=True)
class Viewport:
    """Which part of the slide a render grid shows, and at what scale.

    Attributes:
        origin_level0: ``(x, y)`` of the grid's top-left corner in level-0 pixels.
        size_level0: ``(width, height)`` of the area shown, in level-0 pixels.
        shape_px: ``(height, width)`` of the render grid in pixels.
    """

    origin_level0: tuple[float, float]
    size_level0: tuple[float, float]
    shape_px: tuple[int, int]

    def __post_init__(self) -> None:
        height, width = self.shape_px
        if height <= 0 or width <= 0 or min(self.size_level0) <= 0:
            raise ConfigError(
                f"a render viewport needs positive sizes, got {self.size_level0} level-0 px "
                f"shown on {self.shape_px} px."
            )

    @classmethod
    def whole_slide(cls, dimensions: tuple[int, int], shape_px: tuple[int, int]) -> Viewport:
        """The whole slide of level-0 ``(width, height)`` ``dimensions`` on ``(H, W)`` pixels."""
        return cls((0.0, 0.0), (float(dimensions[0]), float(dimensions[1])), shape_px)

    @property
    def scale(self) -> tuple[float, float]:
        """``(x, y)`` render pixels per level-0 pixel."""
        return self.shape_px[1] / self.size_level0[0], self.shape_px[0] / self.size_level0[1]

    @property
    def downsample(self) -> float:
        """Level-0 pixels per render pixel (mean of both axes)."""
        scale_x, scale_y = self.scale
        return 2.0 / (scale_x + scale_y)

    def to_px(self, points_level0: np.ndarray) -> np.ndarray:
        """``(N, 2)`` level-0 ``(x, y)`` to fractional render ``(x, y)`` (pixel edges at integers)."""
        points = np.asarray(points_level0, dtype=np.float64)
        return (points - np.asarray(self.origin_level0)) * np.asarray(self.scale)

    def to_level0(self, points_px: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_px`."""
        points = np.asarray(points_px, dtype=np.float64)
        return points / np.asarray(self.scale) + np.asarray(self.origin_level0)


@dataclass(frozen=True, eq=False)
class TileRaster:
    """Accumulated tile values on a render grid.

    Attributes:
        weighted_sum: ``(H, W)`` float64, ``sum_t value_t * cover_t``.
        coverage: ``(H, W)`` float64, ``sum_t cover_t`` (1 inside one tile, 2 where two overlap).
    """

    weighted_sum: np.ndarray
    coverage: np.ndarray

    @property
    def mean(self) -> np.ndarray:
        """``(H, W)`` float64 area-weighted mean of the tiles over each pixel; NaN where none."""
        out = np.full(self.coverage.shape, np.nan)
        covered = self.coverage > COVERAGE_EPS
        np.divide(self.weighted_sum, self.coverage, out=out, where=covered)
        return out

    @property
    def covered_fraction(self) -> np.ndarray:
        """``(H, W)`` float64 in [0, 1]: how much of each pixel some tile covers (for alpha)."""
        return np.clip(self.coverage, 0.0, 1.0)

    def smoothed(self, sigma_px: float) -> TileRaster:
        """Gaussian-smoothed copy by normalised convolution (values do not bleed into glass).

        Both sums are blurred, so the mean is a coverage-weighted local average; the coverage
        itself is kept, so what counts as covered does not grow.

        Args:
            sigma_px: Gaussian sigma in render pixels (0: no smoothing).
        """
        if sigma_px <= 0:
            return self
        blurred_sum = ndi.gaussian_filter(self.weighted_sum, sigma_px, mode="constant")
        blurred_cover = ndi.gaussian_filter(self.coverage, sigma_px, mode="constant")
        ratio = np.zeros_like(blurred_sum)
        np.divide(blurred_sum, blurred_cover, out=ratio, where=blurred_cover > COVERAGE_EPS)
        return TileRaster(weighted_sum=ratio * self.coverage, coverage=self.coverage)


def rasterize_tiles(
    coords_level0: np.ndarray,
    values: np.ndarray,
    *,
    tile_size_level0: float,
    viewport: Viewport,
) -> TileRaster:
    """Paint tiles at their level-0 footprint onto the viewport's grid, sub-pixel exact.

    Args:
        coords_level0: ``(N, 2)`` tile top-left ``(x, y)`` in level-0 pixels.
        values: ``(N,)`` value per tile; non-finite values are left out (as if no tile).
        tile_size_level0: Tile side in level-0 pixels.
        viewport: The grid to paint on; tiles outside it are ignored.

    Returns:
        The weighted sum and coverage on the ``viewport.shape_px`` grid.

    Raises:
        ConfigError: Shapes disagree or the tile size is not positive.
    """
    coords = np.asarray(coords_level0, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2 or values.shape != (len(coords),):
        raise ConfigError(
            f"rasterize_tiles needs (N, 2) coords and (N,) values, got {coords.shape} and "
            f"{values.shape}."
        )
    if not (math.isfinite(tile_size_level0) and tile_size_level0 > 0):
        raise ConfigError(f"tile_size_level0 must be positive, got {tile_size_level0}.")
    height, width = viewport.shape_px
    start = viewport.to_px(coords)
    end = viewport.to_px(coords + tile_size_level0)
    keep = (
        np.isfinite(values)
        & (end[:, 0] > 0)
        & (end[:, 1] > 0)
        & (start[:, 0] < width)
        & (start[:, 1] < height)
    )
    start, end, values = start[keep], end[keep], values[keep]
    col_index, col_weight = _edge_points(start[:, 0], end[:, 0], width)
    row_index, row_weight = _edge_points(start[:, 1], end[:, 1], height)
    # Outer product of the 4 column and 4 row points of every tile: (n, 4, 4).
    flat = (row_index[:, :, None] * (width + 2) + col_index[:, None, :]).ravel()
    weight = (row_weight[:, :, None] * col_weight[:, None, :]).ravel()
    n_bins = (height + 2) * (width + 2)
    coverage = np.bincount(flat, weights=weight, minlength=n_bins)
    weighted = np.bincount(flat, weights=weight * np.repeat(values, 16), minlength=n_bins)
    coverage = _integrate(coverage, height, width)
    weighted = _integrate(weighted, height, width)
    uncovered = coverage < COVERAGE_EPS  # round-off residue of the cumulative sums, not tiles
    coverage[uncovered] = 0.0
    weighted[uncovered] = 0.0
    return TileRaster(weighted_sum=weighted, coverage=coverage)


def _edge_points(start: np.ndarray, end: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(n, 4)`` indices and weights whose cumulative sum is each interval's pixel coverage.

    Indices are clipped to ``[0, size + 1]``: weight before the grid piles up in pixel 0 (so
    the cumulative sum is right from the first pixel on) and weight after it is cropped away.
    """
    edges = np.stack([start, end], axis=1)
    whole = np.floor(edges)
    fraction = edges - whole
    whole = whole.astype(np.int64)
    index = np.concatenate([whole, whole + 1], axis=1)  # start_i, end_i, start_i+1, end_i+1
    sign = np.array([1.0, -1.0, 1.0, -1.0])
    weight = np.concatenate([1.0 - fraction, fraction], axis=1) * sign
    return np.clip(index, 0, size + 1), weight


def _integrate(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """Double cumulative sum of the ``(height + 2) * (width + 2)`` point weights, cropped.

    A prefix sum at ``(r, c)`` only needs rows ``<= r`` and columns ``<= c``, so the grid is
    cropped first. Down the rows, adding one row to the next in place is several times faster
    than ``np.cumsum(axis=0)``, which walks the array column by column.
    """
    grid = np.ascontiguousarray(points.reshape(height + 2, width + 2)[:height, :width])
    for row in range(1, height):
        np.add(grid[row - 1], grid[row], out=grid[row])
    np.cumsum(grid, axis=1, out=grid)
    return grid
