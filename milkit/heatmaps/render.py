"""Heatmaps: per-tile values painted over the slide, whole or a region at higher resolution.

Two steps, so that one slide read serves many values:

1. a :class:`SlideCanvas` is what lies underneath: the slide's pixels (a thumbnail, or a region
   read from a finer level), the :class:`~milkit.heatmaps.raster.Viewport` that places them in
   level-0 coordinates, and optionally the tissue mask detected on them;
2. :func:`render_heatmap` paints one value of a prediction file on a canvas: tiles at their
   level-0 footprint (sub-pixel exact, overlaps averaged), normalised, optionally smoothed, and
   coloured only on tissue with soft edges where a tile covers part of a pixel.

Nothing here re-extracts features: the values come from the prediction file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np
from PIL import Image

from milkit.errors import ConfigError, MissingMppError
from milkit.heatmaps.colour import (
    DEFAULT_CMAP,
    ColourScale,
    NormalizeMode,
    blend,
    colorize,
    normalize_values,
)
from milkit.heatmaps.raster import Viewport, rasterize_tiles
from milkit.slides.reader import SlideReader
from milkit.slides.tissue import THUMBNAIL_MPP, detect_tissue
from milkit.training.prediction_file import Predictions, TileValues

#: Longest side of a whole-slide heatmap by default, in pixels.
DEFAULT_MAX_SIZE_PX = 2048
#: Tissue is detected at no finer than this resolution (µm/px), the tile stage's: finer costs
#: time on large canvases and finds no more tissue.
DETECT_MPP = THUMBNAIL_MPP


class _DisplayTissueOptions(TypedDict):
    """Keyword arguments of :func:`detect_tissue` that :data:`DISPLAY_TISSUE_OPTIONS` sets."""

    closing_radius_um: float
    max_hole_area_um2: float


#: Tissue detection for display: unlike tiling (which fills holes so tiles under a pen stroke or
#: across a small gap survive), glass inside the tissue (fat, lumens, tears) stays uncoloured.
DISPLAY_TISSUE_OPTIONS: _DisplayTissueOptions = {
    "closing_radius_um": 10.0,
    "max_hole_area_um2": 0.0,
}
#: Pixels covered by less than this fraction of a tile are not counted as drawn.
DRAWN_MIN_COVERAGE = 0.5


@dataclass(frozen=True, eq=False)
class SlideCanvas:
    """The slide pixels a heatmap is drawn over.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB.
        viewport: Where ``image`` lies in level-0 coordinates.
        tissue_mask: ``(H, W)`` bool tissue mask, or None to colour wherever tiles are.
        mpp: Microns per canvas pixel, when the slide's resolution is known.
    """

    image: np.ndarray
    viewport: Viewport
    tissue_mask: np.ndarray | None = None
    mpp: float | None = None

    def _repr_png_(self) -> bytes:
        """Notebooks show the slide image."""
        from milkit.heatmaps.figures import image_png_bytes

        return image_png_bytes(self.image)


def whole_slide_canvas(
    reader: SlideReader,
    *,
    max_size_px: int = DEFAULT_MAX_SIZE_PX,
    width_px: int | None = None,
    level: int | None = None,
    detect: bool = True,
    slide_mpp: float | None = None,
) -> SlideCanvas:
    """The whole slide as a thumbnail, at a chosen size or pyramid level.

    Args:
        reader: The open slide.
        max_size_px: Longest side of the thumbnail (used when neither ``width_px`` nor
            ``level`` is given).
        width_px: Width of the thumbnail in pixels.
        level: Draw at this pyramid level's size (beware: level 0 of a slide is gigapixels).
        detect: Detect tissue on the thumbnail, so colour stays on tissue.
        slide_mpp: Microns per level-0 pixel, for slides whose file records none (tissue
            detection needs it; without any, ``detect`` is skipped).

    Returns:
        The canvas.

    Raises:
        ConfigError: ``level`` does not exist or a size is not positive.
    """
    width0, height0 = reader.dimensions
    if level is not None:
        if not 0 <= level < reader.level_count:
            raise ConfigError(
                f"{reader.path}: level {level} does not exist (levels 0-{reader.level_count - 1})."
            )
        max_size_px = max(reader.level_dimensions[level])
    elif width_px is not None:
        max_size_px = round(width_px * max(width0, height0) / width0)
    if max_size_px <= 0:
        raise ConfigError(f"heatmap size must be positive, got {max_size_px} px.")
    image = reader.thumbnail(max_size_px=max_size_px)
    viewport = Viewport.whole_slide(reader.dimensions, image.shape[:2])
    return _canvas(reader, image, viewport, detect=detect, slide_mpp=slide_mpp)


def region_canvas(
    reader: SlideReader,
    region_level0: tuple[int, int, int, int],
    *,
    max_size_px: int = 1024,
    detect: bool = True,
    slide_mpp: float | None = None,
) -> SlideCanvas:
    """A region of interest read from the finest level it needs, for zooming in.

    Args:
        reader: The open slide.
        region_level0: ``(x, y, width, height)`` in level-0 pixels.
        max_size_px: Longest side of the result; never finer than level 0.
        detect: Detect tissue on the region.
        slide_mpp: As in :func:`whole_slide_canvas`.

    Returns:
        The canvas; its viewport is exactly the level-0 area read.

    Raises:
        ConfigError: The region is empty or lies outside the slide.
    """
    x, y, width, height = (int(v) for v in region_level0)
    width0, height0 = reader.dimensions
    if (
        width <= 0
        or height <= 0
        or x >= width0
        or y >= height0
        or x + width <= 0
        or y + height <= 0
    ):
        raise ConfigError(
            f"{reader.path}: region {region_level0} (x, y, width, height in level-0 px) does not "
            f"overlap the slide of {width0} x {height0} px."
        )
    downsample = max(1.0, max(width, height) / max_size_px)
    level = reader.best_level_for_downsample(downsample)
    level_downsample = reader.level_downsamples[level]
    read_size = (math.ceil(width / level_downsample), math.ceil(height / level_downsample))
    region = reader.read_region((x, y), level, read_size)
    size_level0 = (read_size[0] * level_downsample, read_size[1] * level_downsample)
    out_size = (
        max(1, round(size_level0[0] / downsample)),
        max(1, round(size_level0[1] / downsample)),
    )
    if out_size != read_size:
        region = np.asarray(Image.fromarray(region).resize(out_size, Image.Resampling.LANCZOS))
    viewport = Viewport((float(x), float(y)), size_level0, (out_size[1], out_size[0]))
    return _canvas(reader, region, viewport, detect=detect, slide_mpp=slide_mpp)


def _canvas(
    reader: SlideReader,
    image: np.ndarray,
    viewport: Viewport,
    *,
    detect: bool,
    slide_mpp: float | None,
) -> SlideCanvas:
    if slide_mpp is None:
        try:
            slide_mpp = reader.mpp
        except MissingMppError:
            slide_mpp = None
    mpp = slide_mpp * viewport.downsample if slide_mpp is not None else None
    mask = _tissue_mask(image, mpp=mpp) if detect and mpp is not None else None
    return SlideCanvas(image=image, viewport=viewport, tissue_mask=mask, mpp=mpp)


def _tissue_mask(image: np.ndarray, *, mpp: float) -> np.ndarray:
    """``(H, W)`` bool tissue mask, detected at no finer than :data:`DETECT_MPP` and resized.

    Detection cost grows with pixels but its answer does not improve below the resolution the
    tile stage uses, so a large canvas is reduced first and the mask brought back with
    bilinear interpolation (smooth edges, not blocks).
    """
    factor = DETECT_MPP / mpp
    if factor <= 1.5:
        return detect_tissue(image, mpp=mpp, **DISPLAY_TISSUE_OPTIONS).mask
    height, width = image.shape[:2]
    small_size = (max(1, round(width / factor)), max(1, round(height / factor)))
    small = np.asarray(Image.fromarray(image).resize(small_size, Image.Resampling.BOX))
    mask = detect_tissue(small, mpp=mpp * width / small_size[0], **DISPLAY_TISSUE_OPTIONS).mask
    soft = Image.fromarray(mask.astype(np.float32)).resize(
        (width, height), Image.Resampling.BILINEAR
    )
    return np.asarray(soft) >= 0.5


@dataclass(frozen=True, eq=False)
class Heatmap:
    """One value of a prediction file drawn on a canvas.

    Attributes:
        image: ``(H, W, 3)`` uint8, the colours blended over the canvas.
        canvas: What lies underneath.
        values01: ``(H, W)`` float32 normalised values in [0, 1]; NaN where no tile is.
        drawn: ``(H, W)`` bool, pixels that carry colour (covered by tiles, and on tissue).
        scale: How ``values01`` read back as the quantity (the colour bar).
        tile_values: The per-tile values drawn.
        title: A line describing slide and value, for figures.
    """

    image: np.ndarray
    canvas: SlideCanvas
    values01: np.ndarray
    drawn: np.ndarray
    scale: ColourScale
    tile_values: TileValues
    title: str = ""

    def quantity(self) -> np.ndarray:
        """``(H, W)`` float32 values back in the colour bar's units (percentile for rank)."""
        return (self.scale.vmin + self.values01 * (self.scale.vmax - self.scale.vmin)).astype(
            np.float32
        )

    def figure(self, **kwargs: Any) -> Any:
        """The side-by-side slide | heatmap figure; see :func:`~milkit.heatmaps.figures.heatmap_figure`."""
        from milkit.heatmaps.figures import heatmap_figure

        return heatmap_figure(self, **kwargs)

    def _repr_png_(self) -> bytes:
        """Notebooks show the side-by-side figure."""
        from milkit.heatmaps.figures import figure_png_bytes

        return figure_png_bytes(self.figure())


def render_heatmap(
    canvas: SlideCanvas,
    predictions: Predictions,
    value: str | TileValues = "attention",
    *,
    normalize: NormalizeMode = "auto",
    value_range: tuple[float, float] | None = None,
    cmap: str = DEFAULT_CMAP,
    alpha: float = 0.5,
    smooth_sigma_tiles: float = 0.0,
    tissue_only: bool = True,
) -> Heatmap:
    """Paint one per-tile value over a canvas.

    Args:
        canvas: The slide pixels (whole slide or region).
        predictions: The prediction file's content.
        value: A value spec (``attention``, ``score:tumour``, ...) or values already chosen.
        normalize: ``"auto"``, ``"raw"``, ``"rank"`` or ``"minmax"``
            (see :mod:`milkit.heatmaps.colour`).
        value_range: ``(vmin, vmax)`` in the value's units for ``"raw"``.
        cmap: Matplotlib colour map name.
        alpha: Opacity of the colours over tissue, in [0, 1].
        smooth_sigma_tiles: Gaussian sigma in tile sides (0: tiles drawn as squares).
        tissue_only: Colour only where the canvas's tissue mask is True (when it has one).

    Returns:
        The heatmap.

    Raises:
        ConfigError: Bad value spec or options.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}.")
    if smooth_sigma_tiles < 0:
        raise ConfigError(f"smooth_sigma_tiles must be >= 0, got {smooth_sigma_tiles}.")
    tile_values = predictions.values(value) if isinstance(value, str) else value
    normalised, scale = normalize_values(
        tile_values, mode=normalize, value_range=value_range, cmap=cmap
    )
    viewport = canvas.viewport
    raster = rasterize_tiles(
        predictions.coords,
        normalised,
        tile_size_level0=predictions.tile_size_level0,
        viewport=viewport,
    ).smoothed(smooth_sigma_tiles * predictions.tile_size_level0 / viewport.downsample)
    values01 = raster.mean.astype(np.float32)
    opacity = alpha * raster.covered_fraction
    drawn = raster.coverage >= DRAWN_MIN_COVERAGE
    if tissue_only and canvas.tissue_mask is not None and (canvas.tissue_mask & drawn).any():
        # A mask that misses every tile is a detection failure, not an empty slide: ignore it.
        opacity = opacity * canvas.tissue_mask
        drawn &= canvas.tissue_mask
    image = blend(canvas.image, colorize(values01, cmap), opacity)
    return Heatmap(
        image=image,
        canvas=canvas,
        values01=values01,
        drawn=drawn,
        scale=scale,
        tile_values=tile_values,
        title=f"{predictions.describe()} | {tile_values.name}",
    )
