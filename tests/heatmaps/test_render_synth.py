"""Acceptance: on synthetic slides with known tumour, scores equal to the truth light up the tumour.

The prediction file's scores are the ground-truth tumour fraction of each tile (from the truth
map, not from the slide's pixels), so the heatmap's hot area must match the tumour mask at the
render size. This checks level, scale and offsets end to end: the IoU must reach 0.8, and it
must be best without any shift (a quarter-tile offset in any direction makes it worse).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from milkit.heatmaps.render import Heatmap, render_heatmap, whole_slide_canvas
from milkit.slides.reader import open_slide
from milkit.slides.tiling import TileSpec, plan_tile_spec
from milkit.slides.tissue import grid_coords
from milkit.synth import SlideParams, SlideTruth, load_truth, tile_truth, write_slide
from milkit.synth.truth import TUMOR
from milkit.training.prediction_file import read_predictions


def truth_run(
    tmp_path: Path, write_predictions, *, task: str, scan_mpp: float, tile_size_px: int
) -> tuple[Path, Path, SlideTruth, TileSpec]:
    """A synthetic slide and a prediction file whose scores are each tile's true tumour fraction."""
    params = SlideParams(seed=5, task=task, tumor=True, tumor_fraction=0.35, artefacts=False)
    info = write_slide(tmp_path / "slide.svs", params, mpp=scan_mpp, size_um=(1200.0, 900.0))
    truth = load_truth(info.truth_path)
    with open_slide(info.slide_path) as reader:
        spec = plan_tile_spec(reader, target_mpp=0.5, tile_size_px=tile_size_px)
        dimensions = reader.dimensions
    coords = grid_coords(
        dimensions, tile_size_level0=spec.tile_size_level0, stride_level0=spec.stride_level0
    )
    labels = tile_truth(truth, coords, spec.tile_size_level0)
    on_tissue = labels.tissue_fraction > 0.1
    path = write_predictions(
        tmp_path / "run" / "predictions" / "slide.h5", coords[on_tissue], tile_spec=spec,
        slide_dimensions=dimensions, scores=labels.tumor_fraction[on_tissue], slide_id="slide",
        slide_path=str(info.slide_path),
    )  # fmt: skip
    return info.slide_path, path, truth, spec


def truth_tumour_mask(
    truth: SlideTruth, heatmap: Heatmap, shift_level0: tuple[float, float] = (0.0, 0.0)
) -> np.ndarray:
    """The truth map's tumour class sampled at the centres of the heatmap's pixels."""
    viewport = heatmap.canvas.viewport
    height, width = viewport.shape_px
    centres_px = np.stack(
        np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5), axis=-1
    ).reshape(-1, 2)
    level0 = viewport.to_level0(centres_px) + np.asarray(shift_level0)
    cols = np.clip((level0[:, 0] / truth.downsample).astype(int), 0, truth.class_map.shape[1] - 1)
    rows = np.clip((level0[:, 1] / truth.downsample).astype(int), 0, truth.class_map.shape[0] - 1)
    return (truth.class_map[rows, cols] == TUMOR).reshape(height, width)


def hot_area_iou(
    truth: SlideTruth, heatmap: Heatmap, shift_level0: tuple[float, float] = (0.0, 0.0)
) -> float:
    hot = heatmap.drawn & (heatmap.values01 >= 0.5)
    tumour = truth_tumour_mask(truth, heatmap, shift_level0)
    return float((hot & tumour).sum() / (hot | tumour).sum())


@pytest.mark.parametrize(
    ("task", "scan_mpp", "tile_size_px"),
    [("breast", 0.5, 32), ("lung", 0.25, 32)],
    ids=["scanned-at-0.5", "scanned-at-0.25-tiled-at-0.5"],
)
def test_hot_area_matches_the_true_tumour(
    tmp_path: Path, write_predictions, task: str, scan_mpp: float, tile_size_px: int
) -> None:
    slide, prediction_path, truth, spec = truth_run(
        tmp_path, write_predictions, task=task, scan_mpp=scan_mpp, tile_size_px=tile_size_px
    )
    assert spec.tile_size_level0 == round(
        tile_size_px * 0.5 / scan_mpp
    )  # 2x the tile px at 0.25 µm/px
    predictions = read_predictions(prediction_path)
    assert predictions.tile_size_level0 == spec.tile_size_level0
    with open_slide(slide) as reader:
        canvas = whole_slide_canvas(reader, max_size_px=600)
    heatmap = render_heatmap(canvas, predictions, "score")
    assert heatmap.scale.mode == "raw" and (heatmap.scale.vmin, heatmap.scale.vmax) == (0.0, 1.0)
    aligned = hot_area_iou(truth, heatmap)
    assert aligned >= 0.8
    quarter = spec.tile_size_level0 / 4
    for shift in ((quarter, 0.0), (-quarter, 0.0), (0.0, quarter), (0.0, -quarter)):
        assert hot_area_iou(truth, heatmap, shift) < aligned, (
            f"a shift of {shift} level-0 px fits better"
        )
