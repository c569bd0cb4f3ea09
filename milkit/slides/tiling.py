"""Tile grids by physical resolution (microns per pixel), never by pyramid level index.

A :class:`TileSpec` is the single source of truth for tile geometry: it is planned once per
slide from the requested mpp and the slide's pyramid, and saved in every file that holds tiles.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from milkit.errors import TilingError
from milkit.slides.reader import SlideReader

#: A slide level whose mpp is within this relative distance of the target is read as is
#: (e.g. 0.2527 µm/px counts as 0.25): resampling by 1 % would only blur.
DEFAULT_MPP_TOLERANCE = 0.05


@dataclass(frozen=True)
class TileSpec:
    """Geometry of a tile grid on one slide.

    Attributes:
        target_mpp: Requested resolution in microns per pixel.
        tile_size_px: Tile side in pixels at ``effective_mpp`` (what the encoder sees).
        overlap_px: Overlap between neighbouring tiles in pixels at ``effective_mpp``.
        level: Pyramid level the tiles are read from.
        level_mpp: Microns per pixel of ``level``.
        read_size_px: Tile side in pixels of ``level`` (resized to ``tile_size_px`` if different).
        tile_size_level0: Tile side in level-0 pixels.
        stride_level0: Distance between neighbouring tiles' corners in level-0 pixels.
        slide_mpp: Microns per level-0 pixel of the slide.
        effective_mpp: Resolution the tiles actually have: ``level_mpp`` when that level is within
            ``mpp_tolerance`` of the target (no resampling), else ``target_mpp``.
        mpp_tolerance: Relative tolerance used to accept a level as the target resolution.
    """

    target_mpp: float
    tile_size_px: int
    overlap_px: int
    level: int
    level_mpp: float
    read_size_px: int
    tile_size_level0: int
    stride_level0: int
    slide_mpp: float
    effective_mpp: float
    mpp_tolerance: float = DEFAULT_MPP_TOLERANCE

    @property
    def needs_resize(self) -> bool:
        """Whether tiles read at ``level`` must be resized to ``tile_size_px``."""
        return self.read_size_px != self.tile_size_px

    @property
    def magnification(self) -> float:
        """Nominal objective magnification of the tiles (10 µm/px = 1x, so 0.25 µm/px = 40x)."""
        return 10.0 / self.effective_mpp

    def to_json(self) -> str:
        """The spec as canonical JSON (sorted keys), as saved in files."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TileSpec:
        """Rebuild a spec from :meth:`to_json` output."""
        return cls(**json.loads(text))

    def coords_attrs(self, slide_dimensions: tuple[int, int]) -> dict[str, Any]:
        """Attributes of the ``coords`` dataset that CLAM and TRIDENT readers look for.

        Args:
            slide_dimensions: ``(width, height)`` of level 0.
        """
        return {
            "patch_size": self.tile_size_px,
            "patch_size_level0": self.tile_size_level0,
            "patch_level": self.level,
            "target_magnification": self.magnification,
            "level0_magnification": 10.0 / self.slide_mpp,
            "mpp": self.effective_mpp,
            "overlap": self.overlap_px,
            "level0_width": int(slide_dimensions[0]),
            "level0_height": int(slide_dimensions[1]),
        }


def plan_tile_spec(
    reader: SlideReader,
    *,
    target_mpp: float,
    tile_size_px: int,
    overlap_px: int = 0,
    mpp_tolerance: float = DEFAULT_MPP_TOLERANCE,
) -> TileSpec:
    """Choose the pyramid level and read size that give tiles at ``target_mpp``.

    A level whose mpp lies within ``mpp_tolerance`` of the target is read as is (its mpp becomes
    the effective mpp). Otherwise tiles come from the coarsest level that is still finer than the
    target and are downsampled, so no tile is ever upsampled from a coarser level, unless the
    slide itself is coarser than the target (then the request fails).

    Args:
        reader: The open slide.
        target_mpp: Requested microns per pixel (e.g. 0.5 for 20x).
        tile_size_px: Tile side at the target resolution.
        overlap_px: Overlap between neighbours at the target resolution (``< tile_size_px``).
        mpp_tolerance: Relative mpp mismatch accepted without resampling.

    Raises:
        TilingError: The target is finer than the scan, or sizes are invalid.
    """
    if not (math.isfinite(target_mpp) and target_mpp > 0):
        raise TilingError(f"{reader.path}: target mpp must be positive, got {target_mpp}.")
    if tile_size_px <= 0 or not 0 <= overlap_px < tile_size_px:
        raise TilingError(
            f"{reader.path}: need tile size > 0 and 0 <= overlap < tile size, got "
            f"tile size {tile_size_px}, overlap {overlap_px}."
        )
    slide_mpp = reader.mpp
    level_mpps = [reader.level_mpp(level) for level in range(reader.level_count)]

    within = [
        lvl for lvl, mpp in enumerate(level_mpps) if abs(mpp / target_mpp - 1) <= mpp_tolerance
    ]
    if within:
        level = min(within, key=lambda lvl: abs(level_mpps[lvl] / target_mpp - 1))
        effective_mpp = level_mpps[level]
    else:
        finer = [lvl for lvl, mpp in enumerate(level_mpps) if mpp < target_mpp]
        if not finer:
            raise TilingError(
                f"{reader.path}: the slide is scanned at {slide_mpp:.4g} µm/px, coarser than the "
                f"requested {target_mpp:.4g} µm/px; ask for --mpp {slide_mpp:.4g} or coarser "
                "(or correct the slide's mpp with --slide-mpp if the metadata is wrong)."
            )
        level = max(finer, key=lambda lvl: level_mpps[lvl])
        effective_mpp = target_mpp

    scale_to_level = effective_mpp / level_mpps[level]  # 1.0 when the level is read as is
    read_size_px = max(1, round(tile_size_px * scale_to_level))
    downsample = reader.level_downsamples[level]
    tile_size_level0 = max(1, round(read_size_px * downsample))
    stride_level0 = max(1, round((tile_size_px - overlap_px) * effective_mpp / slide_mpp))
    return TileSpec(
        target_mpp=float(target_mpp),
        tile_size_px=int(tile_size_px),
        overlap_px=int(overlap_px),
        level=int(level),
        level_mpp=float(level_mpps[level]),
        read_size_px=int(read_size_px),
        tile_size_level0=int(tile_size_level0),
        stride_level0=int(stride_level0),
        slide_mpp=float(slide_mpp),
        effective_mpp=float(effective_mpp),
        mpp_tolerance=float(mpp_tolerance),
    )


def read_tile(
    reader: SlideReader,
    spec: TileSpec,
    xy_level0: tuple[int, int],
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Read one tile at the spec's resolution.

    Args:
        reader: The open slide.
        spec: Geometry planned for this slide.
        xy_level0: Top-left corner in level-0 pixels.
        out: ``(tile_size_px, tile_size_px, 3)`` uint8 array to write the tile into (a row
            of a batch); None for a new array.

    Returns:
        ``(tile_size_px, tile_size_px, 3)`` uint8 RGB (``out`` when given).
    """
    read_size = (spec.read_size_px, spec.read_size_px)
    if not spec.needs_resize:
        return reader.read_region(xy_level0, spec.level, read_size, out)
    region = reader.read_region(xy_level0, spec.level, read_size)
    tile = np.asarray(
        Image.fromarray(region).resize(
            (spec.tile_size_px, spec.tile_size_px), Image.Resampling.BILINEAR, reducing_gap=None
        )
    )
    if out is None:
        return tile
    out[...] = tile
    return out
