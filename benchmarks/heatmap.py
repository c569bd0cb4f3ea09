"""How long a heatmap of a slide with 20,000 tiles takes, next to reading its thumbnail.

Writes one synthetic slide (8192 x 6144 px at 0.5 µm/px, three pyramid levels) and a prediction
file with 20,000 tiles of 48 px (attention and two-class scores), then times, each as the median
of ``--repeats`` runs after one warm-up:

- reading the 2048-px thumbnail (the reference: the I/O any viewer pays),
- the canvas: thumbnail plus tissue detection,
- ``render_heatmap`` for attention (per-slide rank) and for a score (fixed range),
  the same with Gaussian smoothing, and with a tenfold finer ``max_size_px`` region,
- the QuPath GeoJSON of all tiles,
- ``render_slide``: everything ``milkit heatmap`` writes for the slide (PNGs, figures, top
  tiles, GeoJSON).

Prints seconds and ratios to the thumbnail read; the target is canvas + render <= 2 s.

Run: ``python benchmarks/heatmap.py`` (about a minute on 2 cores, most of it writing the slide).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np

from milkit.heatmaps.geojson import tile_features, write_geojson
from milkit.heatmaps.render import region_canvas, render_heatmap, whole_slide_canvas
from milkit.pipeline.heatmap import HeatmapOptions, render_slide
from milkit.slides.reader import open_slide
from milkit.slides.tiling import plan_tile_spec
from milkit.slides.tissue import grid_coords
from milkit.synth import SlideParams, write_slide
from milkit.training.prediction_file import read_predictions

N_TILES = 20_000
SLIDE_PX = (8192, 6144)
TILE_PX = 48


def timed(function: Callable[[], object], repeats: int) -> float:
    """Median wall time in seconds of ``repeats`` calls after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_inputs(folder: Path) -> tuple[Path, Path]:
    """The slide and a prediction file with :data:`N_TILES` tiles."""
    slide = folder / "bench.svs"
    write_slide(slide, SlideParams(seed=1, artefacts=False), mpp=0.5, size_px=SLIDE_PX)
    with open_slide(slide) as reader:
        spec = plan_tile_spec(reader, target_mpp=0.5, tile_size_px=TILE_PX)
        dimensions = reader.dimensions
    coords = grid_coords(
        dimensions, tile_size_level0=spec.tile_size_level0, stride_level0=spec.stride_level0
    )[:N_TILES]
    rng = np.random.default_rng(0)
    attention = rng.gamma(1.0, size=len(coords))
    positive = rng.random(len(coords))
    path = folder / "run" / "predictions" / "bench.h5"
    path.parent.mkdir(parents=True)
    with h5py.File(path, "w") as file:
        file.create_dataset("coords", data=coords).attrs.update(spec.coords_attrs(dimensions))
        file["attention"] = (attention / attention.sum()).astype(np.float32)
        file["scores"] = np.stack([1 - positive, positive], axis=1).astype(np.float32)
        file.attrs.update(
            slide_id="bench",
            slide_path=str(slide),
            tile_spec=spec.to_json(),
            label_names='["normal", "tumour"]',
            prediction="tumour",
        )
    return slide, path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs per measurement (median)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        slide, prediction_path = make_inputs(folder)
        predictions = read_predictions(prediction_path)
        print(
            f"slide {SLIDE_PX[0]} x {SLIDE_PX[1]} px, {predictions.num_tiles} tiles of {predictions.tile_size_level0} px"
        )
        with open_slide(slide) as reader:
            thumbnail_s = timed(lambda: reader.thumbnail(max_size_px=2048), args.repeats)
            canvas_s = timed(lambda: whole_slide_canvas(reader), args.repeats)
            canvas = whole_slide_canvas(reader)
            region = region_canvas(reader, (2048, 2048, 2048, 1536), max_size_px=2048)
        rows = [
            ("thumbnail read (reference)", thumbnail_s),
            ("canvas: thumbnail + tissue", canvas_s),
            ("render attention (rank)", timed(lambda: render_heatmap(canvas, predictions, "attention"), args.repeats)),
            ("render score (raw 0-1)", timed(lambda: render_heatmap(canvas, predictions, "score"), args.repeats)),
            ("render score, smoothed", timed(lambda: render_heatmap(canvas, predictions, "score", smooth_sigma_tiles=1.0), args.repeats)),
            ("render score, region at level 0", timed(lambda: render_heatmap(region, predictions, "score"), args.repeats)),
            ("GeoJSON of all tiles", timed(lambda: write_geojson(folder / "t.geojson", tile_features(predictions.coords, predictions.tile_size_level0, predictions.measurements())), args.repeats)),
            ("render_slide (all outputs)", timed(lambda: render_slide(prediction_path, folder / "out", options=HeatmapOptions()), 1)),
        ]  # fmt: skip
    print(
        f"canvas {canvas.image.shape[1]} x {canvas.image.shape[0]} px; region {region.image.shape[1]} x {region.image.shape[0]} px"
    )
    print(f"{'step':<34}{'seconds':>9}{'x thumbnail':>13}")
    for name, seconds in rows:
        print(f"{name:<34}{seconds:>9.3f}{seconds / thumbnail_s:>13.2f}")
    total_s = canvas_s + max(rows[2][1], rows[3][1])
    verdict = "meets" if total_s <= 2.0 else "MISSES"
    print(
        f"canvas + render of {predictions.num_tiles} tiles: {total_s:.2f} s, {verdict} the 2 s target"
    )


if __name__ == "__main__":
    main()
