"""The ``milkit preprocess`` stage: tile a folder of slides, then extract tile features.

Output folder layout (``OUT_DIR``): ``coords/``, ``masks/``, ``thumbnails/`` from tiling (reused
when finished), ``features/<slide_id>.h5`` (design.md §4), ``errors.csv`` and a log per stage.
A feature file is finished only when it is complete and its ``config_hash`` (encoder, weights,
tile spec, stored dtype) matches this run; anything else is recomputed.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from milkit.batch import BatchSummary, ErrorLog, shard_suffix
from milkit.features.encoders import Encoder
from milkit.features.extract import ExtractionOptions, extract_slide
from milkit.features.formats import read_coords
from milkit.features.store import config_hash, file_status, remove_stale_tmp_files
from milkit.slides.reader import slide_id_from_path
from milkit.slides.tile_stage import TilingOptions, coords_path, run_tiling


def features_path(out_dir: Path, slide_id: str) -> Path:
    """Where the feature file of ``slide_id`` lives under a preprocess output folder."""
    return out_dir / "features" / f"{slide_id}.h5"


def features_hash(encoder: Encoder, tile_spec_json: str, options: ExtractionOptions) -> str:
    """Hash of everything that changes a slide's feature values."""
    return config_hash(
        {"encoder": encoder.describe(), "tile_spec": tile_spec_json, "dtype": options.dtype}
    )


@dataclass(frozen=True)
class SlideJob:
    """One slide to extract: where it is, its coordinates and where its features go."""

    slide_path: str
    slide_id: str
    coords_file: str
    out_path: str
    slide_mpp: float | None


def pending_jobs(
    slides: Sequence[Path],
    out_dir: Path,
    encoder: Encoder,
    options: ExtractionOptions,
    *,
    mpp_by_slide: Mapping[str, float],
    slide_mpp: float | None,
) -> tuple[list[SlideJob], list[tuple[str, int]]]:
    """Split tiled slides into those still to extract and those already finished.

    Slides without a finished coordinate file (tiling failed) and slides without tissue are left
    out: the tiling stage has already recorded them.

    Returns:
        ``(jobs, finished)`` where ``finished`` holds ``(slide_id, n_tiles)`` of skipped slides.
    """
    jobs, finished = [], []
    for slide in slides:
        slide_id = slide_id_from_path(slide)
        coords_file = coords_path(out_dir, slide_id)
        if file_status(coords_file) != "complete":
            continue
        coords = read_coords(coords_file)
        if len(coords.coords) == 0:
            continue
        target = features_path(out_dir, slide_id)
        expected = features_hash(encoder, coords.attrs["tile_spec"], options)
        if file_status(target, config_hash=expected) == "complete":
            finished.append((slide_id, len(coords.coords)))
            continue
        jobs.append(
            SlideJob(
                slide_path=str(slide),
                slide_id=slide_id,
                coords_file=str(coords_file),
                out_path=str(target),
                slide_mpp=mpp_by_slide.get(slide_id, slide_mpp),
            )
        )
    return jobs, finished


def run_job(
    job: SlideJob,
    encoder: Encoder,
    options: ExtractionOptions,
    *,
    device: torch.device,
    progress: Callable[[int], Any] | None = None,
) -> tuple[int, int]:
    """Extract one slide; returns ``(n_tiles, n_skipped_tiles)``."""
    coords = read_coords(job.coords_file)
    result = extract_slide(
        job.slide_path,
        job.coords_file,
        job.out_path,
        encoder,
        config_hash=features_hash(encoder, coords.attrs["tile_spec"], options),
        device=device,
        options=options,
        slide_mpp=job.slide_mpp,
        progress=progress,
    )
    return result.n_tiles, result.n_skipped


def run_preprocess(
    slides: Sequence[Path],
    out_dir: Path,
    encoder: Encoder,
    *,
    tiling: TilingOptions,
    extraction: ExtractionOptions,
    mpp_by_slide: Mapping[str, float] | None = None,
    device: torch.device | str = "cpu",
    tiling_workers: int = 1,
    shard: tuple[int, int] = (0, 1),
    devices: int = 1,
    num_nodes: int = 1,
    show_progress: bool = True,
) -> tuple[BatchSummary, BatchSummary, Path]:
    """Tile, then extract features for every slide of this shard.

    Args:
        slides: Slides of this shard.
        out_dir: Output folder.
        encoder: Tile encoder.
        tiling: Tiling options.
        extraction: Extraction options.
        mpp_by_slide: Scan resolution per slide id, for slides whose files record none.
        device: Where the encoder runs.
        tiling_workers: Slides tiled in parallel processes.
        shard: ``(index, count)`` of this run, naming its report files.
        devices: Extraction processes (GPUs) through Lightning; 1 extracts in this process.
        num_nodes: Nodes for multi-node extraction through Lightning.
        show_progress: Show progress bars (slides and tiles).

    Returns:
        Tiling summary, feature summary, and the path of ``errors.csv`` (both stages).
    """
    from tqdm import tqdm

    mpp_by_slide = dict(mpp_by_slide or {})
    errors = ErrorLog(out_dir / f"errors{shard_suffix(*shard)}.csv")
    with tqdm(total=len(slides), desc="tile", unit="slide", disable=not show_progress) as bar:
        tile_summary, _ = run_tiling(
            slides, out_dir, tiling, mpp_by_slide=mpp_by_slide, workers=tiling_workers,
            shard=shard, progress=bar.update, errors=errors,
        )  # fmt: skip
    remove_stale_tmp_files(out_dir / "features")
    jobs, finished = pending_jobs(
        slides, out_dir, encoder, extraction, mpp_by_slide=mpp_by_slide, slide_mpp=tiling.slide_mpp
    )
    summary = BatchSummary(stage="features")
    for slide_id, n_tiles in finished:
        summary.add(slide_id, "skipped", n_tiles)
    if devices * num_nodes > 1:
        from milkit.features.distributed import extract_distributed

        accelerator = "gpu" if torch.device(device).type == "cuda" else "cpu"
        extract_distributed(
            jobs, encoder, extraction, out_dir=out_dir, summary=summary, errors=errors,
            accelerator=accelerator, devices=devices, num_nodes=num_nodes,
        )  # fmt: skip
        return tile_summary, summary, errors.path
    device = torch.device(device)
    log_path = out_dir / f"features_log{shard_suffix(*shard)}.csv"
    with (
        log_path.open("w", newline="") as handle,
        tqdm(
            total=len(jobs), desc="features", unit="slide", disable=not show_progress
        ) as slide_bar,
    ):
        log = csv.writer(handle)
        log.writerow(["slide_id", "outcome", "n_tiles", "n_skipped_tiles"])
        for job in jobs:
            n_total = len(read_coords(job.coords_file).coords)
            with tqdm(
                total=n_total,
                desc=job.slide_id,
                unit="tile",
                leave=False,
                disable=not show_progress,
            ) as tile_bar:
                try:
                    n_tiles, n_skipped = run_job(
                        job, encoder, extraction, device=device, progress=tile_bar.update
                    )
                except Exception as exc:  # one bad slide never stops the batch
                    errors.record(job.slide_path, "features", exc)
                    summary.add(job.slide_id, "failed")
                    log.writerow([job.slide_id, "failed", 0, 0])
                else:
                    summary.add(job.slide_id, "done", n_tiles)
                    log.writerow([job.slide_id, "done", n_tiles, n_skipped])
            handle.flush()
            slide_bar.update(1)
    return tile_summary, summary, errors.path
