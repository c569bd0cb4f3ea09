"""The ``milkit tile`` stage: tissue detection and a tile grid for every slide of a folder.

For each slide it writes, under ``OUT_DIR``:

- ``coords/<slide_id>.h5``: the coordinate file (docs/design.md §4 without ``features``); written
  last and atomically, so its presence with ``complete`` and a matching ``config_hash`` means the
  slide is finished;
- ``masks/<slide_id>.png``: the tissue mask at thumbnail resolution;
- ``thumbnails/<slide_id>.png``: the thumbnail with the mask contour and kept tiles drawn on it.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from milkit.errors import ConfigError, SlideReadError
from milkit.features.h5 import config_hash, file_status, remove_stale_tmp_files
from milkit.features.tile_file import TILING_OPTIONS_ATTR, write_coords_file
from milkit.pipeline.batch import BatchSummary, ErrorLog, shard_suffix
from milkit.slides.folder import as_slides_by_id
from milkit.slides.overlay import draw_overlay, resize_mask_nearest, save_mask_png, save_png
from milkit.slides.reader import open_slide
from milkit.slides.tiling import plan_tile_spec
from milkit.slides.tiling_options import TilingOptions, slide_tiling_options
from milkit.slides.tissue import (
    THUMBNAIL_MAX_SIZE_PX,
    detect_tissue,
    grid_coords,
    tissue_fraction_grid,
)

#: Longest side, px, of the thumbnail the mask and tiles are drawn on (``thumbnails/``), for
#: slides that have that many pixels.
OVERLAY_SIZE_PX = 1024
#: Median brightness (0-255, brightest channel) of a thumbnail below which its background is
#: dark: a fluorescence scan (brightfield glass is above 200; a DAPI scan measured 13).
DARK_BACKGROUND = 60


@dataclass
class SlideTiling:
    """What tiling one slide produced."""

    slide_id: str
    slide_path: str
    outcome: str
    n_tiles: int = 0
    level: int | None = None
    effective_mpp: float | None = None
    seconds: float = 0.0
    error: BaseException | None = field(default=None, repr=False)
    note: str | None = None


def coords_path(out_dir: Path, slide_id: str) -> Path:
    """Where the coordinate file of ``slide_id`` lives under a tile/preprocess output folder."""
    return out_dir / "coords" / f"{slide_id}.h5"


def tiling_hash(options: TilingOptions, slide_mpp: float | None) -> str:
    """Hash of the options that change a slide's tiles (the per-slide mpp override included).

    Args:
        options: Tiling options.
        slide_mpp: The slide's own override (``--mpp-csv``), if any.
    """
    return config_hash({**slide_tiling_options(options, slide_mpp), "stage": "tile"})


def tile_slide(
    slide_path: Path,
    out_dir: Path,
    options: TilingOptions,
    *,
    slide_mpp: float | None = None,
    slide_id: str | None = None,
) -> SlideTiling:
    """Detect tissue, plan the grid and write the coordinate file, mask and thumbnail of one slide.

    Args:
        slide_path: The slide.
        out_dir: Output folder of the stage.
        options: Tiling options.
        slide_mpp: Scan resolution for this slide, overriding ``options.slide_mpp`` and the file.
        slide_id: Names the output files (default: the file's stem).

    Returns:
        The outcome (``done`` or ``no_tissue``); failures raise.
    """
    started = time.perf_counter()
    mpp_override = options.slide_mpp_for(slide_mpp)
    with open_slide(slide_path, mpp=mpp_override) as reader:
        spec = plan_tile_spec(
            reader,
            target_mpp=options.target_mpp,
            tile_size_px=options.tile_size_px,
            overlap_px=options.overlap_px,
            mpp_tolerance=options.mpp_tolerance,
        )
        thumbnail = reader.thumbnail(max_size_px=THUMBNAIL_MAX_SIZE_PX, mpp=options.thumbnail_mpp)
        thumbnail_downsample = reader.dimensions[0] / thumbnail.shape[1]
        detection = detect_tissue(thumbnail, mpp=reader.mpp * thumbnail_downsample)
        candidates = grid_coords(
            reader.dimensions,
            tile_size_level0=spec.tile_size_level0,
            stride_level0=spec.stride_level0,
        )
        fractions = tissue_fraction_grid(
            detection.mask,
            mask_downsample=thumbnail_downsample,
            coords_level0=candidates,
            tile_size_level0=spec.tile_size_level0,
        )
        # The detector looks for stain on bright glass; a dark background is a fluorescence scan.
        dark = float(np.median(thumbnail.max(axis=2))) < DARK_BACKGROUND
        keep = fractions >= options.min_tissue
        if options.min_tissue == 0.0:
            keep &= fractions > 0.0
        coords, kept_fractions = candidates[keep], fractions[keep].astype(np.float32)
        slide_id = slide_id or reader.slide_id
        save_mask_png(out_dir / "masks" / f"{slide_id}.png", detection.mask)
        # Tissue is detected at ~4 µm/px, too coarse to judge the mask by eye: the overlay is
        # drawn on a larger view when the slide has the pixels for one (when a damaged tile of
        # a finer level spoils that view, on the detection view: it is only a picture).
        view, view_mask = thumbnail, detection.mask
        if max(thumbnail.shape[:2]) < OVERLAY_SIZE_PX:
            try:
                view = reader.thumbnail(max_size_px=OVERLAY_SIZE_PX)
                view_mask = resize_mask_nearest(detection.mask, view.shape[:2])
            except SlideReadError:
                view = thumbnail
        overlay = draw_overlay(
            view,
            view_mask,
            coords_level0=coords,
            tile_size_level0=spec.tile_size_level0,
            thumbnail_downsample=reader.dimensions[0] / view.shape[1],
        )
        save_png(out_dir / "thumbnails" / f"{slide_id}.png", overlay)
        write_coords_file(
            coords_path(out_dir, slide_id),
            coords,
            kept_fractions,
            tile_spec=spec,
            slide_dimensions=reader.dimensions,
            slide_id=slide_id,
            slide_path=str(Path(slide_path).resolve()),
            config_hash=tiling_hash(options, slide_mpp),
            extra_attrs={
                TILING_OPTIONS_ATTR: json.dumps(slide_tiling_options(options, slide_mpp)),
                "tissue_threshold": float(detection.threshold),
                "thumbnail_downsample": float(thumbnail_downsample),
            },
        )
    return SlideTiling(
        slide_id=slide_id,
        slide_path=str(slide_path),
        outcome="done" if len(coords) else "no_tissue",
        n_tiles=len(coords),
        level=spec.level,
        effective_mpp=spec.effective_mpp,
        seconds=time.perf_counter() - started,
        note=(
            "its background is dark (a fluorescence scan?); the tissue detector is made for "
            "brightfield slides (H&E, IHC), so its tiles may be wrong or missing"
            if dark
            else None
        ),
    )


def _tile_or_skip(
    slide_id: str, slide_path: Path, out_dir: Path, options: TilingOptions, slide_mpp: float | None
) -> SlideTiling:
    """Tile a slide unless its finished coordinate file is already there; capture failures."""
    target = coords_path(out_dir, slide_id)
    if file_status(target, config_hash=tiling_hash(options, slide_mpp)) == "complete":
        return SlideTiling(slide_id=slide_id, slide_path=str(slide_path), outcome="skipped")
    try:
        return tile_slide(slide_path, out_dir, options, slide_mpp=slide_mpp, slide_id=slide_id)
    except Exception as exc:  # one bad slide never stops the batch; the error is recorded
        return SlideTiling(
            slide_id=slide_id, slide_path=str(slide_path), outcome="failed", error=exc
        )


def read_mpp_csv(path: Path) -> dict[str, float]:
    """Per-slide scan resolutions from a CSV with columns ``slide_id,mpp``.

    Raises:
        ConfigError: Missing columns or values that are not positive numbers (all rows listed).
    """
    with Path(path).open(newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"slide_id", "mpp"} <= set(reader.fieldnames):
            raise ConfigError(
                f"{path}: needs the columns slide_id,mpp (found {reader.fieldnames})."
            )
        values, bad = {}, []
        for line, row in enumerate(reader, start=2):
            try:
                mpp = float(row["mpp"])
                if not mpp > 0:
                    raise ValueError
                values[row["slide_id"]] = mpp
            except (TypeError, ValueError):
                bad.append(f"line {line}: {row.get('mpp')!r}")
    if bad:
        raise ConfigError(f"{path}: mpp must be a positive number; bad rows: " + "; ".join(bad))
    return values


def run_tiling(
    slides: Sequence[Path] | Mapping[str, Path],
    out_dir: Path,
    options: TilingOptions,
    *,
    mpp_by_slide: Mapping[str, float] | None = None,
    workers: int = 1,
    shard: tuple[int, int] = (0, 1),
    progress: Callable[[int], Any] | None = None,
    errors: ErrorLog | None = None,
) -> tuple[BatchSummary, Path]:
    """Tile every slide, skipping finished ones, recording failures and going on.

    Args:
        slides: Slides of this shard: files (ids: their stems) or slide id -> file.
        out_dir: Output folder.
        options: Tiling options.
        mpp_by_slide: Scan resolution per slide id, for slides whose files record none.
        workers: Slides tiled in parallel processes (1 = in this process).
        shard: ``(index, count)`` of this run, naming its report files.
        progress: Called with 1 after each slide (e.g. ``tqdm.update``).
        errors: Where failures go (default: a fresh ``errors.csv`` in ``out_dir``).

    Returns:
        The summary and the path of ``errors.csv``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp_files(out_dir / "coords")
    suffix = shard_suffix(*shard)
    errors = errors if errors is not None else ErrorLog(out_dir / f"errors{suffix}.csv")
    log_path = out_dir / f"tile_log{suffix}.csv"
    summary = BatchSummary(stage="tile")
    mpp_by_slide = mpp_by_slide or {}
    jobs = [
        (slide_id, path, mpp_by_slide.get(slide_id))
        for slide_id, path in as_slides_by_id(slides).items()
    ]
    with log_path.open("w", newline="") as log_handle:
        log = csv.writer(log_handle)
        log.writerow(
            ["slide_id", "outcome", "n_tiles", "level", "effective_mpp", "seconds", "slide_path"]
        )

        def record(result: SlideTiling) -> None:
            message = (
                errors.record(result.slide_path, "tile", result.error)
                if result.error is not None
                else None
            )
            summary.add(result.slide_id, result.outcome, result.n_tiles, error=message)
            if result.note is not None:
                summary.notes.append(f"{result.slide_id}: {result.note}")
            log.writerow(
                [result.slide_id, result.outcome, result.n_tiles, result.level,
                 result.effective_mpp, f"{result.seconds:.2f}", result.slide_path]
            )  # fmt: skip
            log_handle.flush()
            if progress is not None:
                progress(1)

        if workers <= 1:
            for slide_id, path, mpp in jobs:
                record(_tile_or_skip(slide_id, path, out_dir, options, mpp))
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = [
                    pool.submit(_tile_or_skip, slide_id, path, out_dir, options, mpp)
                    for slide_id, path, mpp in jobs
                ]
                for future in as_completed(futures):
                    record(future.result())
    return summary, errors.path


def default_workers() -> int:
    """Parallel slides by default: the cores this process may use, at most 8."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))


__all__ = [
    "SlideTiling",
    "TilingOptions",
    "coords_path",
    "read_mpp_csv",
    "run_tiling",
    "tile_slide",
]
