"""Tissue detection on a slide thumbnail, and tissue fractions of a tile grid.

Pure functions over arrays (scikit-image style: image first, options keyword-only). Inside this
module arrays are indexed ``(row, col)``; everything that leaves it speaks ``(x, y)`` in level-0
pixels. Sizes are given in µm and µm² and converted with the thumbnail's mpp, so a mask does not
depend on the pyramid level it was computed from.

The rule, in order:

1. White-balance the thumbnail by the glass colour (per-channel 99th percentile of a copy
   smoothed with ``smoothing_sigma_px``), so a grey or tinted background scores as white.
2. Score each pixel ``chroma + darkness_weight * darkness`` with ``chroma = max(R,G,B) -
   min(R,G,B)`` and ``darkness = 1 - max(R,G,B)`` (all in [0, 1]): chroma finds stained tissue,
   darkness adds pale tissue. The smoothed score (robust to noise) decides where tissue is; the
   sharp score, of the pixels as they are, places outlines.
3. Exclude artefacts, found on the sharp pixels: near-black ones (``max(R,G,B) <
   black_value``: borders, black pen, folds), dark colourless ones (``max(R,G,B) < grey_value``,
   HSV saturation ``< grey_max_saturation``: faded marker, dirt) and blue/green ink (hue in
   ``pen_hue_range_deg``, saturation ``>= pen_min_saturation``, grown over its rims down to
   ``pen_edge_saturation``), all widened by ``artefact_margin_px``. Pale, translucent ink counts
   as tissue. The hue range ends between blue markers (about 200-230°) and haematoxylin-dark
   tissue (tumour, lymphocyte aggregates: about 240-270°).
4. Threshold the smoothed score with Otsu over the remaining pixels, clipped to
   ``[min_threshold, max_threshold]``: the floor keeps a blank slide empty (Otsu on glass alone
   splits noise); the ceiling keeps pale tissue when dark tissue on the same slide would pull
   Otsu above it. Open away lines up to ``2 * opening_radius_px`` wide.
5. Put outlines where tissue covers half a pixel. A threshold low enough for pale tissue also
   takes the partly covered pixels around dark tissue, a fringe that costs much area on
   fragmented tissue. So a pixel at most ``edge_band_px`` inside the outline stays only if its
   sharp score reaches ``edge_fraction`` of the local tissue level (mean sharp score of the
   tissue further inside, Gaussian-weighted with sigma ``level_sigma_px``). The score grows
   with the stain a pixel holds, so a half-covered pixel scores about half its neighbours'
   level, pale or dark; deeper pixels are never dropped, so pale spots in tissue stay tissue.
6. Close gaps (``closing_radius_um``); fill holes up to ``max_hole_area_um2`` (pale spots;
   larger holes are lumens or fat and stay) and holes mostly covered by blue/green ink (tissue
   under a pen mark; a stroke that runs off onto glass leaves a gap); drop pieces smaller than
   ``min_tissue_area_um2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import apply_hysteresis_threshold, threshold_otsu
from skimage.morphology import disk

from milkit.errors import ConfigError, TilingError

#: Tissue is detected at about this resolution (fine enough for tiles of 50 µm), on a thumbnail of
#: at most this side, so memory stays bounded (~0.3 GB) however large the slide: a 20 x 15 mm
#: section is then seen at ~10 µm/px, still a dozen mask pixels per 224 px tile at 0.5 µm/px.
THUMBNAIL_MPP = 4.0
THUMBNAIL_MAX_SIZE_PX = 2048

#: Channels of the white reference darker than this mean no glass is visible; no balancing then.
_MIN_WHITE_REFERENCE = 0.6
#: Gaussian weight below which no tissue interior is near enough to give a pixel its level.
_MIN_LEVEL_WEIGHT = 1e-3


@dataclass(frozen=True, eq=False)
class TissueDetection:
    """Result of :func:`detect_tissue`.

    Attributes:
        mask: ``(H, W)`` bool, True on tissue, same grid as the thumbnail.
        threshold: Score threshold actually applied (Otsu clipped to the guards).
        otsu_threshold: Otsu's threshold before clipping (NaN when it could not be computed);
            differs from ``threshold`` when a guard was active.
        mpp: Microns per mask pixel.
    """

    mask: np.ndarray
    threshold: float
    otsu_threshold: float
    mpp: float

    @property
    def tissue_area_um2(self) -> float:
        """Area of the mask in µm²."""
        return float(self.mask.sum()) * self.mpp**2


def detect_tissue(
    thumbnail: np.ndarray,
    *,
    mpp: float,
    smoothing_sigma_px: float = 1.0,
    darkness_weight: float = 0.5,
    min_threshold: float = 0.05,
    max_threshold: float = 0.08,
    black_value: float = 0.15,
    grey_value: float = 0.5,
    grey_max_saturation: float = 0.15,
    pen_hue_range_deg: tuple[float, float] = (90.0, 235.0),
    pen_min_saturation: float = 0.4,
    pen_edge_saturation: float = 0.15,
    artefact_margin_px: int = 2,
    opening_radius_px: int = 1,
    edge_band_px: int = 2,
    edge_fraction: float = 0.5,
    level_sigma_px: float = 2.0,
    closing_radius_um: float = 5.0,
    max_hole_area_um2: float = 1_000.0,
    min_tissue_area_um2: float = 500.0,
) -> TissueDetection:
    """Find tissue on a thumbnail: one global threshold, outlines placed by the local stain.

    See the module docstring for the full rule. H&E tissue is pink/purple (hue about 270-360°
    and 0-30°) and is never excluded as pen; weak blue haematoxylin counterstain on IHC slides
    stays below ``pen_min_saturation`` and is kept unless it touches a pen stroke.

    Args:
        thumbnail: ``(H, W, 3)`` uint8 RGB.
        mpp: Microns per thumbnail pixel (level-0 mpp times the thumbnail's downsample).
        smoothing_sigma_px: Gaussian sigma in thumbnail pixels of the score that is
            thresholded, against pixel noise (0: none).
        darkness_weight: Weight of ``1 - max(R,G,B)`` in the score (0: chroma only).
        min_threshold: Lowest score threshold, above the noise of glass.
        max_threshold: Highest score threshold, below the score of pale tissue.
        black_value: Pixels whose brightest channel is below this (in [0, 1]) are excluded.
        grey_value: Pixels darker than this (brightest channel) and nearly colourless are
            excluded (faded black marker, dirt); tissue this dark is strongly stained.
        grey_max_saturation: HSV saturation below which a dark pixel counts as colourless.
        pen_hue_range_deg: Hue interval ``(low, high)`` in degrees of blue/green pen ink.
        pen_min_saturation: HSV saturation from which a pixel in the pen hue range is ink.
        pen_edge_saturation: Lower saturation down to which ink regions are grown.
        artefact_margin_px: Excluded regions are dilated by a disk of this radius in pixels.
        opening_radius_px: Radius in pixels of an opening that removes lines up to twice as
            wide (coverslip edges, grey rims of borders and ink); 0: none.
        edge_band_px: Depth in pixels of the band inside the outline whose pixels must reach
            ``edge_fraction`` of the local tissue level (0: outlines as thresholded).
        edge_fraction: Fraction in [0, 1] of the local tissue level a band pixel must score.
        level_sigma_px: Gaussian sigma in pixels of the neighbourhood the local tissue level
            is averaged over.
        closing_radius_um: Radius of the morphological closing in µm (0: none).
        max_hole_area_um2: Holes inside tissue up to this area in µm² are filled.
        min_tissue_area_um2: Tissue pieces smaller than this area in µm² are removed.

    Returns:
        The ``(H, W)`` bool mask with the threshold used and the mpp.

    Raises:
        ConfigError: The thumbnail is not ``(H, W, 3)`` uint8, or an option is out of range.
    """
    _check_thumbnail(thumbnail)
    _check_positive(mpp=mpp, level_sigma_px=level_sigma_px)
    _check_ordered("min_threshold", min_threshold, "max_threshold", max_threshold)
    _check_ordered(
        "pen_edge_saturation", pen_edge_saturation, "pen_min_saturation", pen_min_saturation
    )
    _check_ordered("edge_fraction", edge_fraction, "1", 1.0)
    sharp, smooth = _white_balanced(thumbnail, smoothing_sigma_px=smoothing_sigma_px)
    value, chroma = _value_chroma(sharp)
    saturation = np.divide(chroma, value, out=np.zeros_like(chroma), where=value > 0)
    dark = (value < black_value) | ((value < grey_value) & (saturation < grey_max_saturation))
    hue = _hue_deg(sharp, value=value, chroma=chroma)
    in_pen_hue = (hue >= pen_hue_range_deg[0]) & (hue <= pen_hue_range_deg[1])
    # Hysteresis: strongly saturated ink cores, grown over their paler rims.
    ink = apply_hysteresis_threshold(
        np.where(in_pen_hue, saturation, 0.0), pen_edge_saturation, pen_min_saturation
    )
    if artefact_margin_px > 0:
        margin = disk(artefact_margin_px).astype(bool)
        dark, ink = (
            ndi.binary_dilation(m, structure=margin) if m.any() else m for m in (dark, ink)
        )
    artefact = dark | ink

    score = _score(smooth, darkness_weight)
    valid_scores = score[~artefact]
    otsu = float("nan")
    if valid_scores.size > 1 and np.ptp(valid_scores) > 0:
        otsu = float(threshold_otsu(valid_scores))
    threshold = (
        min_threshold if math.isnan(otsu) else float(np.clip(otsu, min_threshold, max_threshold))
    )

    mask = (score > threshold) & ~artefact
    if opening_radius_px > 0:
        mask = ndi.binary_opening(mask, structure=disk(opening_radius_px).astype(bool))
    mask = _refine_outline(
        mask,
        _score(sharp, darkness_weight),
        band_px=edge_band_px,
        fraction=edge_fraction,
        level_sigma_px=level_sigma_px,
    )
    mask = _closing(mask, radius_px=round(closing_radius_um / mpp))
    mask |= _holes_to_fill(mask, max_area_px=max_hole_area_um2 / mpp**2, ink=ink)
    mask = _remove_small_components(mask, min_area_px=min_tissue_area_um2 / mpp**2)
    return TissueDetection(mask=mask, threshold=threshold, otsu_threshold=otsu, mpp=float(mpp))


def tissue_fraction_grid(
    mask: np.ndarray,
    *,
    mask_downsample: float,
    coords_level0: np.ndarray,
    tile_size_level0: int,
) -> np.ndarray:
    """Fraction of each tile's footprint covered by the mask, via a summed-area table.

    A tile ``[x, x + tile_size_level0)`` maps to mask columns ``[round(x / d), round((x +
    tile_size_level0) / d))`` with ``d = mask_downsample`` (rows likewise): each edge is rounded to
    the nearest mask pixel boundary, so neighbouring tiles share their boundary without gap or
    overlap, and a footprint is at least one mask pixel wide. The part of a footprint outside the
    mask counts as non-tissue (the denominator is the whole footprint).

    Args:
        mask: ``(H, W)`` bool tissue mask.
        mask_downsample: Level-0 pixels per mask pixel.
        coords_level0: ``(N, 2)`` int64 tile top-left corners ``(x, y)`` in level-0 pixels.
        tile_size_level0: Tile side in level-0 pixels.

    Returns:
        ``(N,)`` float32 in [0, 1].

    Raises:
        ConfigError: The mask is not 2-D or the downsample is not positive.
        TilingError: The coordinates are not ``(N, 2)`` or the tile size is not positive.
    """
    if mask.ndim != 2:
        raise ConfigError(f"tissue mask must be a 2-D (H, W) array, got shape {mask.shape}.")
    _check_positive(mask_downsample=mask_downsample)
    coords = _check_coords(coords_level0)
    _check_tile_size(tile_size_level0=tile_size_level0)
    height, width = mask.shape
    integral = np.zeros((height + 1, width + 1), dtype=np.int64)
    integral[1:, 1:] = mask.astype(np.int64).cumsum(axis=0).cumsum(axis=1)

    col0, col1 = _footprint_edges(coords[:, 0], tile_size_level0, mask_downsample)
    row0, row1 = _footprint_edges(coords[:, 1], tile_size_level0, mask_downsample)
    area = (col1 - col0) * (row1 - row0)
    c0, c1 = np.clip(col0, 0, width), np.clip(col1, 0, width)
    r0, r1 = np.clip(row0, 0, height), np.clip(row1, 0, height)
    covered = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]
    return (covered / area).astype(np.float32)


def grid_coords(
    slide_dimensions: tuple[int, int],
    *,
    tile_size_level0: int,
    stride_level0: int,
) -> np.ndarray:
    """Top-left corners of a regular grid of tiles lying fully inside the slide.

    Args:
        slide_dimensions: ``(width, height)`` of level 0 in pixels.
        tile_size_level0: Tile side in level-0 pixels.
        stride_level0: Distance between neighbouring corners in level-0 pixels.

    Returns:
        ``(N, 2)`` int64 ``(x, y)`` in level-0 pixels, row-major (sorted by y, then x); empty
        ``(0, 2)`` when the slide is smaller than one tile.

    Raises:
        TilingError: The tile size or stride is not positive.
    """
    _check_tile_size(tile_size_level0=tile_size_level0, stride_level0=stride_level0)
    width, height = (int(side) for side in slide_dimensions)
    xs = np.arange(0, width - tile_size_level0 + 1, stride_level0, dtype=np.int64)
    ys = np.arange(0, height - tile_size_level0 + 1, stride_level0, dtype=np.int64)
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([grid_x.ravel(), grid_y.ravel()], axis=1)


def _footprint_edges(
    starts_level0: np.ndarray, tile_size_level0: int, downsample: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(N,)`` start and end (exclusive) mask indices of tiles along one axis."""
    start = np.rint(starts_level0 / downsample).astype(np.int64)
    end = np.rint((starts_level0 + tile_size_level0) / downsample).astype(np.int64)
    return start, np.maximum(end, start + 1)


def _white_balanced(
    thumbnail: np.ndarray, *, smoothing_sigma_px: float
) -> tuple[np.ndarray, np.ndarray]:
    """The thumbnail as it is and smoothed, both ``(H, W, 3)`` float32 in [0, 1], with the
    glass colour mapped to white."""
    sharp = thumbnail.astype(np.float32) / 255.0
    smooth = sharp
    if smoothing_sigma_px > 0:
        smooth = ndi.gaussian_filter(sharp, sigma=(smoothing_sigma_px, smoothing_sigma_px, 0))
    # From the smoothed copy: the colour of the glass, not of the brightest noise on it.
    white = np.percentile(smooth.reshape(-1, 3), 99, axis=0)
    if white.min() < _MIN_WHITE_REFERENCE:
        # Tissue or borders cover (nearly) everything: stretching them to white would erase them.
        return sharp, smooth
    return np.minimum(sharp / white, 1.0), np.minimum(smooth / white, 1.0)


def _score(rgb: np.ndarray, darkness_weight: float) -> np.ndarray:
    """``(H, W)`` score ``chroma + darkness_weight * darkness`` of ``(H, W, 3)`` RGB in [0, 1]."""
    value, chroma = _value_chroma(rgb)
    return chroma + darkness_weight * (1.0 - value)


def _value_chroma(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(H, W)`` HSV value ``max(R,G,B)`` and chroma ``max - min`` of ``(H, W, 3)`` RGB."""
    # Channel by channel: reducing over a last axis of length 3 is several times slower.
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = np.maximum(np.maximum(red, green), blue)
    return value, value - np.minimum(np.minimum(red, green), blue)


def _hue_deg(rgb: np.ndarray, *, value: np.ndarray, chroma: np.ndarray) -> np.ndarray:
    """``(H, W)`` HSV hue in degrees [0, 360); 0 where the pixel is grey."""
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(
        value == red,
        ((green - blue) / safe) % 6.0,
        np.where(value == green, (blue - red) / safe + 2.0, (red - green) / safe + 4.0),
    )
    return np.where(chroma > 0, hue * 60.0, 0.0)


def _refine_outline(
    mask: np.ndarray,
    score: np.ndarray,
    *,
    band_px: int,
    fraction: float,
    level_sigma_px: float,
) -> np.ndarray:
    """``(H, W)`` bool: ``mask`` without the pixels at most ``band_px`` inside its outline whose
    ``(H, W)`` sharp ``score`` is below ``fraction`` of their local tissue level."""
    if band_px <= 0 or fraction <= 0 or not mask.any():
        return mask
    # border_value=1: the thumbnail's edge is no outline (the tissue may go on beyond it).
    interior = ndi.binary_erosion(mask, structure=disk(band_px).astype(bool), border_value=1)
    band = mask & ~interior
    if not band.any():
        return mask
    level = _local_mean(score, interior, sigma_px=level_sigma_px)
    # Pieces thinner than the band have no interior: their own mean is their level.
    level = np.where(np.isnan(level), _local_mean(score, mask, sigma_px=level_sigma_px), level)
    return mask & ~(band & (score < fraction * level))


def _local_mean(values: np.ndarray, where: np.ndarray, *, sigma_px: float) -> np.ndarray:
    """``(H, W)`` Gaussian-weighted mean of ``values`` over the pixels in ``where``; NaN where
    none of them is near."""
    weight = ndi.gaussian_filter(where.astype(np.float32), sigma_px)
    total = ndi.gaussian_filter(np.where(where, values, 0.0).astype(np.float32), sigma_px)
    return np.divide(
        total, weight, out=np.full_like(total, np.nan), where=weight > _MIN_LEVEL_WEIGHT
    )


def _closing(mask: np.ndarray, *, radius_px: int) -> np.ndarray:
    """Closing by a Euclidean disk, via distance transforms (cost independent of the radius).

    Only pixels inside the image can erode, so tissue touching the thumbnail's edge is kept.
    """
    if radius_px <= 0 or not mask.any():
        return mask
    dilated = ndi.distance_transform_edt(~mask) <= radius_px
    if dilated.all():  # no background pixel left to erode from
        return dilated
    return ndi.distance_transform_edt(dilated) > radius_px


def _holes_to_fill(mask: np.ndarray, *, max_area_px: float, ink: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool: the holes of ``mask`` that are small or mostly ``ink``.

    Background that reaches the image edge is no hole.
    """
    labels, count = ndi.label(~mask)
    if count == 0:
        return np.zeros_like(mask)
    area = np.bincount(labels.ravel(), minlength=count + 1)
    inked = np.bincount(labels.ravel(), weights=ink.ravel(), minlength=count + 1)
    fill = (area <= max_area_px) | (inked >= 0.5 * area)
    fill[np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])] = False
    fill[0] = False
    return fill[labels]


def _remove_small_components(mask: np.ndarray, *, min_area_px: float) -> np.ndarray:
    """Drop 4-connected components of ``mask`` with area below ``min_area_px`` pixels."""
    labels, count = ndi.label(mask)
    if count == 0:
        return mask
    keep = np.bincount(labels.ravel(), minlength=count + 1) >= min_area_px
    keep[0] = False
    return keep[labels]


def _check_thumbnail(thumbnail: np.ndarray) -> None:
    if (
        thumbnail.ndim != 3
        or thumbnail.shape[2] != 3
        or thumbnail.dtype != np.uint8
        or thumbnail.size == 0
    ):
        raise ConfigError(
            f"tissue detection needs a non-empty (H, W, 3) uint8 RGB thumbnail, got shape "
            f"{thumbnail.shape} of {thumbnail.dtype}; convert RGBA/float images to RGB uint8 first."
        )


def _check_positive(**values: float) -> None:
    for name, number in values.items():
        if not (math.isfinite(number) and number > 0):
            raise ConfigError(f"{name} must be a positive number, got {number}.")


def _check_ordered(low_name: str, low: float, high_name: str, high: float) -> None:
    if not 0 <= low <= high:
        raise ConfigError(
            f"tissue detection needs 0 <= {low_name} <= {high_name}, got {low} and {high}."
        )


def _check_coords(coords_level0: np.ndarray) -> np.ndarray:
    coords = np.asarray(coords_level0)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise TilingError(
            f"tile coordinates must be an (N, 2) array of (x, y), got shape {coords.shape}."
        )
    return coords.astype(np.int64, copy=False)


def _check_tile_size(**sizes: int) -> None:
    for name, size in sizes.items():
        if int(size) <= 0:
            raise TilingError(f"{name} must be a positive number of level-0 pixels, got {size}.")
