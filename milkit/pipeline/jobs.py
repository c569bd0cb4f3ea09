"""The slides ``milkit preprocess`` still has to extract, and the extraction of one of them.

Shared by the single-process run (:mod:`milkit.pipeline.preprocess`) and the Lightning one
(:mod:`milkit.pipeline.distributed`). Planning reads only each coordinate file's header, so a
job list of thousands of slides stays small; the coordinates themselves are read once, when
the slide is extracted. The slide's resolution is the one its tile spec records.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from milkit.features.encoders import Encoder
from milkit.features.extract import ExtractionOptions, ExtractionResult, extract_slide
from milkit.features.h5 import config_hash, file_status
from milkit.features.tile_file import read_header
from milkit.pipeline.tile import TilingOptions, coords_path, tiling_hash
from milkit.slides.folder import as_slides_by_id


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
    """One slide to extract.

    Attributes:
        slide_path: The slide.
        slide_id: Its id (the files' stem).
        coords_file: Its coordinate file.
        n_tiles: Tiles in it.
        out_path: The feature file to write.
        config_hash: The :func:`features_hash` the feature file gets.
    """

    slide_path: str
    slide_id: str
    coords_file: str
    n_tiles: int
    out_path: str
    config_hash: str


def pending_jobs(
    slides: Sequence[Path] | Mapping[str, Path],
    out_dir: Path,
    encoder: Encoder,
    options: ExtractionOptions,
    *,
    tiling: TilingOptions,
    mpp_by_slide: Mapping[str, float],
) -> tuple[list[SlideJob], list[tuple[str, int]]]:
    """Split tiled slides into those still to extract and those already finished.

    Slides without a finished coordinate file of this run's tiling (tiling failed: an older
    file from other options is not used) and slides without tissue are left out: the tiling
    stage has already recorded them.

    Args:
        slides: Slides of this shard: files (ids: their stems) or slide id -> file.
        out_dir: Output folder.
        encoder: Tile encoder.
        options: Extraction options.
        tiling: This run's tiling options.
        mpp_by_slide: Scan resolution per slide id (``--mpp-csv``).

    Returns:
        ``(jobs, finished)`` where ``finished`` holds ``(slide_id, n_tiles)`` of skipped slides.
    """
    jobs, finished = [], []
    for slide_id, slide in as_slides_by_id(slides).items():
        coords_file = coords_path(out_dir, slide_id)
        tiled = tiling_hash(tiling, mpp_by_slide.get(slide_id))
        if file_status(coords_file, config_hash=tiled) != "complete":
            continue
        header = read_header(coords_file)
        if header.n_tiles == 0:
            continue
        target = features_path(out_dir, slide_id)
        expected = features_hash(encoder, header.attrs["tile_spec"], options)
        if file_status(target, config_hash=expected) == "complete":
            finished.append((slide_id, header.n_tiles))
            continue
        jobs.append(
            SlideJob(
                slide_path=str(slide),
                slide_id=slide_id,
                coords_file=str(coords_file),
                n_tiles=header.n_tiles,
                out_path=str(target),
                config_hash=expected,
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
) -> ExtractionResult:
    """Extract one slide: its tiles, skipped tiles and where the time went."""
    return extract_slide(
        job.slide_path,
        job.coords_file,
        job.out_path,
        encoder,
        config_hash=job.config_hash,
        device=device,
        options=options,
        progress=progress,
    )
