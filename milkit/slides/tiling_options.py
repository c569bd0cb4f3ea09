"""What decides a slide's tiles: :class:`TilingOptions`, and the command-line options that
repeat a recorded tiling.

Coordinate files record the options they were tiled with
(:data:`~milkit.features.tile_file.TILING_OPTIONS_ATTR`); :func:`tiling_flags` turns those
records back into ``milkit tile``/``preprocess`` options, so a later command (e.g. the one
``milkit pretrain`` prints) finds the tiles done.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from milkit.errors import ConfigError
from milkit.slides.tiling import DEFAULT_MPP_TOLERANCE
from milkit.slides.tissue import THUMBNAIL_MPP


@dataclass(frozen=True)
class TilingOptions:
    """Everything that decides a slide's tiles (hashed into the coordinate file).

    Args:
        target_mpp: Resolution to tile at, microns per pixel.
        tile_size_px: Tile side in pixels at ``target_mpp``.
        overlap_px: Overlap of neighbouring tiles in pixels at ``target_mpp``.
        min_tissue: Keep tiles whose tissue fraction is at least this (0-1).
        mpp_tolerance: Relative mpp mismatch read without resampling.
        thumbnail_mpp: Resolution tissue is detected at.
        slide_mpp: Scan resolution for slides that record none (overrides the file).
    """

    target_mpp: float = 0.5
    tile_size_px: int = 224
    overlap_px: int = 0
    min_tissue: float = 0.25
    mpp_tolerance: float = DEFAULT_MPP_TOLERANCE
    thumbnail_mpp: float = THUMBNAIL_MPP
    slide_mpp: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ConfigError(f"--min-tissue must lie in [0, 1], got {self.min_tissue}.")

    def slide_mpp_for(self, per_slide_mpp: float | None) -> float | None:
        """The scan resolution a slide is opened at: its own override, else the run's, else None
        (the file's)."""
        return per_slide_mpp if per_slide_mpp is not None else self.slide_mpp


#: ``milkit tile``/``preprocess`` flag of each option a command line can set.
_FLAGS = (
    ("target_mpp", "--mpp"),
    ("tile_size_px", "--tile-size"),
    ("overlap_px", "--overlap"),
    ("min_tissue", "--min-tissue"),
    ("mpp_tolerance", "--mpp-tolerance"),
    ("slide_mpp", "--slide-mpp"),
)


def slide_tiling_options(options: TilingOptions, slide_mpp: float | None) -> dict[str, Any]:
    """The options one slide is tiled with: the run's, its scan resolution override resolved.

    Args:
        options: Tiling options of the run.
        slide_mpp: The slide's own override (``--mpp-csv``), if any.
    """
    return {**asdict(options), "slide_mpp": options.slide_mpp_for(slide_mpp)}


def tiling_flags(recorded: Mapping[str, Mapping[str, Any]], mpp_csv: Path) -> tuple[list[str], int]:
    """Command-line options that tile slides again exactly as their coordinate files record
    (so ``milkit tile``/``preprocess`` finds them done instead of redoing or failing them).

    Args:
        recorded: Slide id -> the tiling options its coordinate file records
            (:data:`~milkit.features.tile_file.TILING_OPTIONS_ATTR`).
        mpp_csv: Where to write a ``slide_id,mpp`` CSV when the slides were opened at
            different scan resolutions (``--mpp-csv``); untouched otherwise.

    Returns:
        The flags (``--mpp`` and ``--tile-size`` always, the others when not the default),
        and how many slides were tiled with other options than the first (those would be
        tiled again).
    """
    names = {option.name for option in fields(TilingOptions)}
    by_slide = {
        slide_id: TilingOptions(**{k: v for k, v in options.items() if k in names})
        for slide_id, options in recorded.items()
    }
    first = next(iter(by_slide.values()))
    n_other = sum(
        replace(o, slide_mpp=None) != replace(first, slide_mpp=None) for o in by_slide.values()
    )
    scan_mpps = {options.slide_mpp for options in by_slide.values()}
    common = first if len(scan_mpps) == 1 else replace(first, slide_mpp=None)
    defaults = TilingOptions()
    flags: list[str] = []
    for name, flag in _FLAGS:
        value = getattr(common, name)
        if value is not None and (
            name in ("target_mpp", "tile_size_px") or value != getattr(defaults, name)
        ):
            flags += [flag, str(value)]  # repr of a float reads back as the same float
    if len(scan_mpps) > 1:
        rows = [
            (slide_id, o.slide_mpp) for slide_id, o in by_slide.items() if o.slide_mpp is not None
        ]
        with mpp_csv.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["slide_id", "mpp"])
            writer.writerows(rows)
        flags += ["--mpp-csv", str(mpp_csv)]
    return flags, n_other
