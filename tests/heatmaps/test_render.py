"""Heatmaps over a slide: geometry, tissue-only colour, regions of interest, figures, top tiles."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from PIL import Image

from milkit.errors import ConfigError
from milkit.heatmaps.render import region_canvas, render_heatmap, whole_slide_canvas
from milkit.heatmaps.tiles import tile_gallery, top_bottom_indices
from milkit.slides.reader import open_slide
from milkit.training.prediction_file import read_predictions


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A level-0 bool mask at a render size: True where at least half of the pixel is True."""
    area = Image.fromarray(mask.astype(np.float32)).resize(
        (shape[1], shape[0]), Image.Resampling.BOX
    )
    return np.asarray(area) >= 0.5


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_score_heatmap_lights_up_the_tumour(blob_run: dict[str, Any]) -> None:
    predictions = read_predictions(blob_run["predictions"])
    with open_slide(blob_run["slide"], mpp=0.5) as reader:
        canvas = whole_slide_canvas(reader, max_size_px=400)
    heatmap = render_heatmap(canvas, predictions, "score")
    assert heatmap.image.shape == canvas.image.shape == (300, 400, 3)
    assert heatmap.scale.mode == "raw" and heatmap.scale.label == "score: tumour (probability)"
    hot = heatmap.drawn & (heatmap.values01 >= 0.5)
    assert iou(hot, resize_mask(blob_run["tumour"], hot.shape)) >= 0.8
    np.testing.assert_allclose(
        heatmap.quantity()[hot], heatmap.values01[hot]
    )  # raw 0-1: same numbers
    # Exactly: the pixel at each tile's centre shows that tile's score (tiles are 16 px here).
    centres = ((predictions.coords + 32) / 4).astype(int)
    np.testing.assert_allclose(
        heatmap.values01[centres[:, 1], centres[:, 0]], blob_run["tumour_fraction"], atol=1e-6
    )


def test_colour_only_on_tissue(blob_run: dict[str, Any]) -> None:
    predictions = read_predictions(blob_run["predictions"])
    with open_slide(blob_run["slide"], mpp=0.5) as reader:
        canvas = whole_slide_canvas(reader, width_px=320)
    assert canvas.image.shape[1] == 320 and canvas.tissue_mask is not None
    heatmap = render_heatmap(canvas, predictions, "attention", alpha=0.6)
    off_tissue = ~canvas.tissue_mask
    np.testing.assert_array_equal(heatmap.image[off_tissue], canvas.image[off_tissue])
    assert not heatmap.drawn[off_tissue].any()
    changed = (heatmap.image != canvas.image).any(axis=-1)
    assert changed[heatmap.drawn].mean() > 0.95
    # Without the tissue restriction, tiles overhanging the tissue edge are coloured too.
    everywhere = render_heatmap(canvas, predictions, "attention", tissue_only=False)
    assert (everywhere.drawn & off_tissue).any()
    assert (
        render_heatmap(canvas, predictions, "attention", alpha=0.0).image.tobytes()
        == canvas.image.tobytes()
    )


def test_region_of_interest_at_full_resolution(blob_run: dict[str, Any]) -> None:
    predictions = read_predictions(blob_run["predictions"])
    region = (400, 300, 500, 400)  # x, y, width, height in level-0 px, around the tumour
    with open_slide(blob_run["slide"], mpp=0.5) as reader:
        canvas = region_canvas(reader, region, max_size_px=1000)
        np.testing.assert_array_equal(canvas.image, reader.read_region((400, 300), 0, (500, 400)))
        half = region_canvas(reader, region, max_size_px=250)
    assert canvas.viewport.downsample == 1.0 and half.image.shape == (200, 250, 3)
    heatmap = render_heatmap(canvas, predictions, "score")
    truth = blob_run["tumour"][300:700, 400:900]
    assert iou(heatmap.drawn & (heatmap.values01 >= 0.5), truth) >= 0.8
    # The same tiles at half the resolution give the same picture, halved.
    coarse = render_heatmap(half, predictions, "score")
    fine_halved = heatmap.values01.reshape(200, 2, 250, 2).mean(axis=(1, 3))
    both = ~np.isnan(fine_halved) & ~np.isnan(coarse.values01)
    np.testing.assert_allclose(coarse.values01[both], fine_halved[both], atol=1e-5)
    with pytest.raises(ConfigError, match="does not overlap"):
        region_canvas(reader, (5000, 5000, 10, 10))


def test_smoothing_and_options_are_checked(blob_run: dict[str, Any]) -> None:
    predictions = read_predictions(blob_run["predictions"])
    with open_slide(blob_run["slide"], mpp=0.5) as reader:
        canvas = whole_slide_canvas(reader, max_size_px=200, detect=False)
        with pytest.raises(ConfigError, match="level 9"):
            whole_slide_canvas(reader, level=9)
    assert canvas.tissue_mask is None
    sharp = render_heatmap(canvas, predictions, "score")
    smooth = render_heatmap(canvas, predictions, "score", smooth_sigma_tiles=1.0)
    # Smoothing softens edges (fewer distinct levels across the tumour border) but keeps the extent.
    np.testing.assert_array_equal(smooth.drawn, sharp.drawn)
    gradient = lambda v: np.nanmean(np.abs(np.diff(v, axis=1)))  # noqa: E731
    assert gradient(smooth.values01) < gradient(sharp.values01)
    with pytest.raises(ConfigError, match="alpha"):
        render_heatmap(canvas, predictions, "score", alpha=2.0)


def test_figures_and_top_tiles(blob_run: dict[str, Any]) -> None:
    predictions = read_predictions(blob_run["predictions"])
    with open_slide(blob_run["slide"], mpp=0.5) as reader:
        canvas = whole_slide_canvas(reader, max_size_px=300)
        heatmap = render_heatmap(canvas, predictions, "attention")
        gallery = tile_gallery(reader, predictions, "score", k=4)
        first = reader.read_region(tuple(predictions.coords[gallery.top_index[0]]), 0, (64, 64))
    assert heatmap._repr_png_().startswith(b"\x89PNG")
    scores = predictions.values("score").values
    np.testing.assert_allclose(scores[gallery.top_index], np.sort(scores)[::-1][:4])
    np.testing.assert_allclose(scores[gallery.bottom_index], np.sort(scores)[:4])
    assert gallery.top_images.shape == (4, 64, 64, 3)  # the tile spec's size in pixels
    np.testing.assert_array_equal(gallery.top_images[0], first)  # read at the tile's own coords
    assert gallery._repr_png_().startswith(b"\x89PNG")


def test_top_bottom_skips_nan_and_keeps_file_order_for_ties() -> None:
    top, bottom = top_bottom_indices(np.array([0.5, np.nan, 0.9, 0.5, 0.1]), 2)
    assert top.tolist() == [2, 0] and bottom.tolist() == [4, 0]
    with pytest.raises(ConfigError, match="positive"):
        top_bottom_indices(np.zeros(3), 0)
