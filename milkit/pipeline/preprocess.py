"""The ``milkit preprocess`` stage: tile a folder of slides, then extract tile features.

Output folder layout (``OUT_DIR``): ``coords/``, ``masks/``, ``thumbnails/`` from tiling (reused
when finished), ``features/<slide_id>.h5`` (docs/design.md §4), ``errors.csv`` and a log per stage.
A feature file is finished only when it is complete and its ``config_hash`` (encoder, weights,
tile spec, stored dtype) matches this run; anything else is recomputed.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from milkit.features.encoders import Encoder
from milkit.features.extract import ExtractionOptions, ExtractionTiming
from milkit.features.h5 import remove_stale_tmp_files
from milkit.pipeline.batch import BatchSummary, ErrorLog, shard_suffix
from milkit.pipeline.jobs import pending_jobs, run_job
from milkit.pipeline.tile import TilingOptions, run_tiling


def run_preprocess(
    slides: Sequence[Path] | Mapping[str, Path],
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
        slides: Slides of this shard: files (ids: their stems) or slide id -> file.
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
        slides, out_dir, encoder, extraction, tiling=tiling, mpp_by_slide=mpp_by_slide
    )
    summary = BatchSummary(stage="features")
    for slide_id, n_tiles in finished:
        summary.add(slide_id, "skipped", n_tiles)
    if devices * num_nodes > 1:
        # Lightning is imported only when extraction spans several processes.
        from milkit.pipeline.distributed import extract_distributed

        accelerator = "gpu" if torch.device(device).type == "cuda" else "cpu"
        extract_distributed(
            jobs, encoder, extraction, out_dir=out_dir, summary=summary, errors=errors,
            accelerator=accelerator, devices=devices, num_nodes=num_nodes,
        )  # fmt: skip
        return tile_summary, summary, errors.path
    device = torch.device(device)
    timing = ExtractionTiming()
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
            with tqdm(
                total=job.n_tiles,
                desc=job.slide_id,
                unit="tile",
                leave=False,
                disable=not show_progress,
            ) as tile_bar:
                try:
                    result = run_job(
                        job, encoder, extraction, device=device, progress=tile_bar.update
                    )
                except Exception as exc:  # one bad slide never stops the batch
                    message = errors.record(job.slide_path, "features", exc)
                    summary.add(job.slide_id, "failed", error=message)
                    log.writerow([job.slide_id, "failed", 0, 0])
                else:
                    summary.add(job.slide_id, "done", result.n_tiles)
                    log.writerow([job.slide_id, "done", result.n_tiles, result.n_skipped])
                    timing.add(result.timing)
            handle.flush()
            slide_bar.update(1)
    if timing.n_tiles:
        summary.notes.append(timing.describe())
    return tile_summary, summary, errors.path
