"""Tiles painted at their level-0 footprint: exact areas, averaged overlaps, no seams."""

from __future__ import annotations

import numpy as np
import pytest

from milkit.errors import ConfigError
from milkit.heatmaps.raster import Viewport, rasterize_tiles


def test_overlapping_tiles_average() -> None:
    # Tiles of 10 level-0 px at 1:1; the second starts 5 px to the right of the first.
    viewport = Viewport.whole_slide((30, 10), (10, 30))
    raster = rasterize_tiles(
        np.array([[0, 0], [5, 0]]), np.array([0.0, 1.0]), tile_size_level0=10, viewport=viewport
    )
    mean = raster.mean
    np.testing.assert_allclose(mean[:, :5], 0.0)
    np.testing.assert_allclose(mean[:, 5:10], 0.5)
    np.testing.assert_allclose(mean[:, 10:15], 1.0)
    assert np.isnan(mean[:, 15:]).all()
    np.testing.assert_allclose(raster.coverage[0, 4:11], [1, 2, 2, 2, 2, 2, 1])


def test_sub_pixel_tiles_keep_their_area() -> None:
    # Tiles 0.3 render px wide must not vanish: total coverage equals total tile area.
    rng = np.random.default_rng(0)
    coords = rng.integers(0, 990, size=(500, 2))
    viewport = Viewport.whole_slide((1000, 1000), (40, 30))  # 33.3 x 25 level-0 px per pixel
    raster = rasterize_tiles(coords, rng.random(500), tile_size_level0=10, viewport=viewport)
    scale_x, scale_y = viewport.scale
    assert raster.coverage.sum() == pytest.approx(500 * 10 * scale_x * 10 * scale_y)
    # A tile inside one pixel covers that pixel by its area fraction.
    single = rasterize_tiles(
        np.array([[40, 30]]), np.array([0.7]), tile_size_level0=10, viewport=viewport
    )
    assert single.coverage[1, 1] == pytest.approx(10 * scale_x * 10 * scale_y)
    assert single.mean[1, 1] == pytest.approx(0.7)


def test_abutting_tiles_leave_no_seams_at_non_integer_scale() -> None:
    # A full grid of 7-px tiles shown at 0.37 px per level-0 px: every pixel is covered exactly once.
    xs, ys = np.meshgrid(np.arange(0, 700, 7), np.arange(0, 490, 7))
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1)
    viewport = Viewport.whole_slide((700, 490), (181, 259))
    raster = rasterize_tiles(
        coords, np.full(len(coords), 0.25), tile_size_level0=7, viewport=viewport
    )
    np.testing.assert_allclose(raster.coverage, 1.0, atol=1e-9)
    np.testing.assert_allclose(raster.mean, 0.25, atol=1e-9)


def test_viewport_offset_and_clipping() -> None:
    # A region starting at (100, 200) shown at 2 render px per level-0 px.
    viewport = Viewport((100.0, 200.0), (50.0, 40.0), (80, 100))
    coords = np.array([[110, 210], [90, 190], [1000, 1000]])  # inside, partly outside, outside
    raster = rasterize_tiles(
        coords, np.array([1.0, 0.0, 5.0]), tile_size_level0=20, viewport=viewport
    )
    inside = raster.coverage > 0
    rows, cols = np.nonzero(inside)
    assert (rows.min(), cols.min()) == (0, 0)
    assert (rows.max(), cols.max()) == (59, 59)  # tile 1 ends at level-0 (130, 230) -> px 60
    np.testing.assert_allclose(raster.mean[20:60, 20:60], 1.0)  # tile 1 alone
    np.testing.assert_allclose(raster.mean[:20, :20], 0.0)  # the clipped corner of tile 2
    assert np.nanmax(raster.mean) <= 1.0  # the far tile contributes nothing


def test_non_finite_values_are_left_out() -> None:
    viewport = Viewport.whole_slide((20, 10), (10, 20))
    raster = rasterize_tiles(
        np.array([[0, 0], [10, 0]]), np.array([np.nan, 0.3]), tile_size_level0=10, viewport=viewport
    )
    assert (raster.coverage[:, :10] == 0).all() and np.isnan(raster.mean[:, :10]).all()
    np.testing.assert_allclose(raster.mean[:, 10:], 0.3)


def test_smoothing_keeps_constants_and_coverage() -> None:
    viewport = Viewport.whole_slide((100, 100), (100, 100))
    xs, ys = np.meshgrid(np.arange(20, 80, 10), np.arange(20, 80, 10))
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1)
    raster = rasterize_tiles(
        coords, np.full(len(coords), 0.6), tile_size_level0=10, viewport=viewport
    )
    smooth = raster.smoothed(5.0)
    np.testing.assert_array_equal(smooth.coverage, raster.coverage)
    covered = raster.coverage > 0
    np.testing.assert_allclose(smooth.mean[covered], 0.6)  # no darkening at the edge of the tissue
    # A step between two halves gets a gradual transition.
    values = np.where(coords[:, 0] < 50, 0.0, 1.0)
    step = (
        rasterize_tiles(coords, values, tile_size_level0=10, viewport=viewport)
        .smoothed(5.0)
        .mean[50]
    )
    assert 0.1 < step[49] < 0.9 and step[25] < step[45] < step[55] < step[75]


def test_bad_input_is_rejected() -> None:
    viewport = Viewport.whole_slide((10, 10), (10, 10))
    with pytest.raises(ConfigError, match="coords"):
        rasterize_tiles(np.zeros((3, 2)), np.zeros(2), tile_size_level0=4, viewport=viewport)
    with pytest.raises(ConfigError, match="tile_size_level0"):
        rasterize_tiles(np.zeros((1, 2)), np.zeros(1), tile_size_level0=0, viewport=viewport)
    with pytest.raises(ConfigError, match="positive"):
        Viewport((0.0, 0.0), (10.0, 10.0), (0, 5))
