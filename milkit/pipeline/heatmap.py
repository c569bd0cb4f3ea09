"""Heatmaps, tile grids and QuPath files for every prediction file of a run (``milkit heatmap``).

For each ``RUN_DIR/predictions/<slide_id>.h5`` it writes, under ``RUN_DIR/heatmaps/<slide_id>/``:

- ``<value>.png``: the heatmap over the thumbnail, at the thumbnail's size;
- ``<value>_figure.png``: slide | heatmap side by side with a colour bar in the value's units;
- ``<value>_tiles.png``: the top-k and bottom-k tiles;
- ``tiles.geojson``: every tile with all its values as QuPath measurements;
- ``tissue.geojson``: the tissue contours as QuPath annotations.

The slide is found through the file's ``slide_path`` attribute, or by its id in ``--slides-dir``
(which wins when given, since slides move between machines). Slides are rendered in parallel
processes; a failing slide is recorded in ``RUN_DIR/heatmaps/errors.csv`` and the batch goes on.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from milkit.errors import ConfigError
from milkit.heatmaps.colour import DEFAULT_CMAP, NormalizeMode
from milkit.heatmaps.figures import save_figure, save_image
from milkit.heatmaps.geojson import ObjectType, tile_features, tissue_features, write_geojson
from milkit.heatmaps.render import DEFAULT_MAX_SIZE_PX, render_heatmap, whole_slide_canvas
from milkit.heatmaps.tiles import tile_gallery
from milkit.pipeline.batch import BatchSummary, ErrorLog
from milkit.slides.folder import index_slides
from milkit.slides.reader import open_slide
from milkit.training.prediction_file import (
    Predictions,
    locate_slide,
    prediction_files,
    read_predictions,
)


@dataclass(frozen=True)
class HeatmapOptions:
    """What to draw and how, for every slide of a run.

    Args:
        values: Value specs to draw (``attention``, ``score:tumour``, ...); empty: the file's
            defaults (:meth:`~milkit.training.prediction_file.Predictions.default_value_specs`).
        normalize: ``auto``, ``raw``, ``rank`` or ``minmax``.
        value_range: ``(vmin, vmax)`` for ``raw``, in the value's units.
        cmap: Matplotlib colour map.
        alpha: Opacity of the colours.
        smooth_sigma_tiles: Gaussian smoothing sigma in tile sides (0: none).
        tissue_only: Colour only on detected tissue.
        max_size_px: Longest side of the heatmap.
        top_k: Tiles of each end in the tile grid (0: no grid).
        geojson: Write the QuPath files.
        object_type: QuPath object type of tiles, ``tile`` or ``detection``.
        slide_mpp: Scan resolution for slides whose files record none.
    """

    values: tuple[str, ...] = ()
    normalize: NormalizeMode = "auto"
    value_range: tuple[float, float] | None = None
    cmap: str = DEFAULT_CMAP
    alpha: float = 0.5
    smooth_sigma_tiles: float = 0.0
    tissue_only: bool = True
    max_size_px: int = DEFAULT_MAX_SIZE_PX
    top_k: int = 8
    geojson: bool = True
    object_type: ObjectType = "tile"
    slide_mpp: float | None = None


@dataclass
class SlideHeatmaps:
    """What happened to one prediction file.

    Attributes:
        slide_id: The slide.
        prediction_path: The prediction file.
        outcome: ``done`` or ``failed``.
        outputs: Files written.
        n_tiles: Tiles drawn.
        seconds: Wall time.
        error: The failure, if any.
    """

    slide_id: str
    prediction_path: str
    outcome: str = "done"
    outputs: list[str] = field(default_factory=list)
    n_tiles: int = 0
    seconds: float = 0.0
    error: BaseException | None = None


def render_slide(
    prediction_path: str | Path,
    out_dir: str | Path,
    *,
    options: HeatmapOptions = HeatmapOptions(),
    slide_index: Mapping[str, Path] | None = None,
    slide_path: str | Path | None = None,
) -> SlideHeatmaps:
    """Write every output of one prediction file to ``out_dir/<slide_id>/``.

    Args:
        prediction_path: ``<run>/predictions/<slide_id>.h5``.
        out_dir: The run's heatmap folder.
        options: What to draw.
        slide_index: Slide id -> path, from ``--slides-dir``.
        slide_path: The slide, overriding the lookup.

    Returns:
        The outcome with the files written.

    Raises:
        MilkitError: Unreadable predictions or slide, a slide that does not match the
            coordinates, or a bad value spec.
    """
    started = time.perf_counter()
    predictions = read_predictions(prediction_path)
    folder = Path(out_dir) / predictions.slide_id
    outputs: list[Path] = []
    slide_mpp = options.slide_mpp or (
        predictions.tile_spec.slide_mpp if predictions.tile_spec else None
    )
    # Resolve the values first: a bad --value fails before any slide is read.
    values = [
        predictions.values(spec) for spec in options.values or predictions.default_value_specs()
    ]
    with open_slide(locate_slide(predictions, slide_index, slide_path)) as reader:
        _check_same_slide(predictions, reader.dimensions, reader.path)
        canvas = whole_slide_canvas(
            reader, max_size_px=options.max_size_px, detect=options.tissue_only, slide_mpp=slide_mpp
        )
        for tile_values in values:
            heatmap = render_heatmap(
                canvas, predictions, tile_values, normalize=options.normalize,
                value_range=options.value_range, cmap=options.cmap, alpha=options.alpha,
                smooth_sigma_tiles=options.smooth_sigma_tiles, tissue_only=options.tissue_only,
            )  # fmt: skip
            slug = tile_values.slug
            outputs.append(save_image(folder / f"{slug}.png", heatmap.image))
            outputs.append(save_figure(heatmap.figure(), folder / f"{slug}_figure.png"))
            if options.top_k > 0:
                gallery = tile_gallery(reader, predictions, tile_values, k=options.top_k)
                outputs.append(save_figure(gallery.figure(), folder / f"{slug}_tiles.png"))
    if options.geojson:
        tiles = tile_features(
            predictions.coords, predictions.tile_size_level0, predictions.measurements(),
            object_type=options.object_type,
        )  # fmt: skip
        outputs.append(write_geojson(folder / "tiles.geojson", tiles))
        if canvas.tissue_mask is not None:
            tissue = tissue_features(canvas.tissue_mask, downsample=canvas.viewport.downsample)
            outputs.append(write_geojson(folder / "tissue.geojson", tissue))
    return SlideHeatmaps(
        slide_id=predictions.slide_id,
        prediction_path=str(prediction_path),
        outputs=[str(path) for path in outputs],
        n_tiles=predictions.num_tiles,
        seconds=time.perf_counter() - started,
    )


def _check_same_slide(
    predictions: Predictions, dimensions: tuple[int, int], slide_path: Path
) -> None:
    recorded = predictions.slide_dimensions
    if recorded is not None and tuple(recorded) != tuple(dimensions):
        raise ConfigError(
            f"{predictions.path}: its tiles were cut from a slide of {recorded[0]} x {recorded[1]} "
            f"px, but {slide_path} is {dimensions[0]} x {dimensions[1]} px; point --slides-dir at "
            "the slides the predictions were made on."
        )


def _render_or_record(
    prediction_path: Path,
    out_dir: Path,
    options: HeatmapOptions,
    slide_index: Mapping[str, Path] | None,
) -> SlideHeatmaps:
    """Render one slide; a failure is returned, not raised, so the batch goes on."""
    try:
        return render_slide(prediction_path, out_dir, options=options, slide_index=slide_index)
    except Exception as error:  # one bad slide never stops the batch; the error is recorded
        return SlideHeatmaps(
            slide_id=prediction_path.stem,
            prediction_path=str(prediction_path),
            outcome="failed",
            error=error,
        )


def render_run(
    run_dir: str | Path,
    *,
    slides_dir: str | Path | None = None,
    slides: Iterable[str] | None = None,
    options: HeatmapOptions = HeatmapOptions(),
    workers: int = 1,
    progress: Callable[[int], Any] | None = None,
) -> tuple[BatchSummary, Path]:
    """Render every prediction file of a run into ``RUN_DIR/heatmaps/``.

    Args:
        run_dir: Folder holding ``predictions/<slide_id>.h5``.
        slides_dir: Folder of slides, searched by slide id (recursively).
        slides: Only these slide ids (default: all).
        options: What to draw.
        workers: Slides rendered in parallel processes (1: in this process).
        progress: Called with 1 after each slide (e.g. ``tqdm.update``).

    Returns:
        The summary and the path of ``errors.csv``.

    Raises:
        ConfigError: No prediction files, or slide ids asked for that have none.
    """
    run_dir = Path(run_dir)
    files = prediction_files(run_dir)
    if slides is not None:
        wanted = set(slides)
        missing = sorted(wanted - {path.stem for path in files})
        if missing:
            raise ConfigError(f"{run_dir / 'predictions'}: no prediction file for {missing}.")
        files = [path for path in files if path.stem in wanted]
    if not files:
        raise ConfigError(
            f"{run_dir / 'predictions'}: no prediction files (*.h5); predict with the trained "
            "model first (`milkit predict`)."
        )
    slide_index = index_slides(slides_dir) if slides_dir is not None else None
    out_dir = run_dir / "heatmaps"
    errors = ErrorLog(out_dir / "errors.csv")
    summary = BatchSummary(stage="heatmap")
    with (out_dir / "heatmap_log.csv").open("w", newline="") as log_handle:
        log = csv.writer(log_handle)
        log.writerow(["slide_id", "outcome", "n_tiles", "seconds", "folder"])

        def record(result: SlideHeatmaps) -> None:
            message = (
                errors.record(result.prediction_path, "heatmap", result.error)
                if result.error is not None
                else None
            )
            summary.add(result.slide_id, result.outcome, result.n_tiles, error=message)
            folder = out_dir / result.slide_id if result.outcome == "done" else ""
            log.writerow(
                [result.slide_id, result.outcome, result.n_tiles, f"{result.seconds:.2f}", folder]
            )
            log_handle.flush()
            if progress is not None:
                progress(1)

        if workers <= 1:
            for path in files:
                record(_render_or_record(path, out_dir, options, slide_index))
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = [
                    pool.submit(_render_or_record, path, out_dir, options, slide_index)
                    for path in files
                ]
                for future in as_completed(futures):
                    record(future.result())
    return summary, errors.path


__all__ = [
    "HeatmapOptions",
    "SlideHeatmaps",
    "render_run",
    "render_slide",
]
