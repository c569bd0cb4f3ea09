"""From tile values to colours: normalisation modes, the colour scale, and blending.

Three ways to map values to [0, 1], each suited to a kind of value:

- ``"raw"``: a fixed range ``(vmin, vmax)``, clipped. For calibrated scores (probabilities, a
  regression in the target's units) so that colours mean the same on every slide.
- ``"rank"``: the per-slide percentile rank of each tile (ties share their mean rank). For
  attention, whose raw weights (about ``1/N``) depend on the bag size and would look "cold
  everywhere"; every slide then spans the whole colour map.
- ``"minmax"``: the slide's own minimum to maximum, linearly, so the colour bar still reads in the
  value's units.

``"auto"`` picks rank for attention and logits, and raw over the natural range for probabilities
and unit-interval regression scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.stats import rankdata

from milkit.errors import ConfigError
from milkit.training.prediction_file import TileValues

NormalizeMode = Literal["auto", "raw", "rank", "minmax"]
NORMALIZE_MODES = ("auto", "raw", "rank", "minmax")

#: Default colour map: perceptually ordered, readable over pink H&E, colour-blind safer than jet.
DEFAULT_CMAP = "turbo"


@dataclass(frozen=True)
class ColourScale:
    """How normalised values in [0, 1] read back as the quantity, for the colour bar.

    Attributes:
        mode: The normalisation applied (``"raw"``, ``"rank"`` or ``"minmax"``).
        vmin: Quantity at colour 0 (0 for rank, in percentiles).
        vmax: Quantity at colour 1 (100 for rank).
        label: Colour-bar label with units, e.g. ``"score: tumour (probability)"``.
        cmap: Matplotlib colour map name.
    """

    mode: str
    vmin: float
    vmax: float
    label: str
    cmap: str = DEFAULT_CMAP


def normalize_values(
    tile_values: TileValues,
    *,
    mode: NormalizeMode = "auto",
    value_range: tuple[float, float] | None = None,
    cmap: str = DEFAULT_CMAP,
) -> tuple[np.ndarray, ColourScale]:
    """Map tile values to [0, 1] and describe the mapping.

    Args:
        tile_values: The ``(N,)`` values with their name, kind and units.
        mode: ``"auto"``, ``"raw"``, ``"rank"`` or ``"minmax"`` (see the module docstring).
        value_range: ``(vmin, vmax)`` for ``"raw"``, in the value's units; default: the value's
            natural range (e.g. 0-1 for probabilities), else the slide's min-max.
        cmap: Matplotlib colour map name, recorded in the scale.

    Returns:
        ``(N,)`` float64 in [0, 1] (NaN stays NaN) and the colour scale.

    Raises:
        ConfigError: Unknown mode, or an empty or reversed ``value_range``.
    """
    if mode not in NORMALIZE_MODES:
        raise ConfigError(f"unknown normalisation {mode!r}; use one of {NORMALIZE_MODES}.")
    values = np.asarray(tile_values.values, dtype=np.float64)
    finite = np.isfinite(values)
    if mode == "auto":
        raw_ok = value_range is not None or tile_values.natural_range is not None
        mode = "raw" if raw_ok and tile_values.kind in ("probability", "regression") else "rank"
    units = f" ({tile_values.units})" if tile_values.units else ""
    if mode == "rank":
        out = np.full(values.shape, np.nan)
        n = int(finite.sum())
        if n == 1:
            out[finite] = 1.0
        elif n > 1:
            out[finite] = (rankdata(values[finite]) - 1.0) / (n - 1)
        label = f"{tile_values.name}: percentile within slide"
        return out, ColourScale("rank", 0.0, 100.0, label, cmap)
    if mode == "raw":
        vmin, vmax = value_range or tile_values.natural_range or _data_range(values[finite])
    else:
        vmin, vmax = _data_range(values[finite])
    if not vmin < vmax:
        if value_range is not None:
            raise ConfigError(f"value range must have vmin < vmax, got {value_range}.")
        vmax = vmin + 1.0  # a constant slide: one colour, the bottom of the scale
    out = np.clip((values - vmin) / (vmax - vmin), 0.0, 1.0)
    return out, ColourScale(mode, float(vmin), float(vmax), f"{tile_values.name}{units}", cmap)


def _data_range(values: np.ndarray) -> tuple[float, float]:
    if values.size == 0:
        return 0.0, 1.0
    return float(values.min()), float(values.max())


def colour_lut(cmap: str = DEFAULT_CMAP, n: int = 256) -> np.ndarray:
    """``(n, 3)`` uint8 RGB table of a matplotlib colour map.

    Raises:
        ConfigError: Unknown colour map.
    """
    import matplotlib

    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError as error:
        raise ConfigError(
            f"unknown colour map {cmap!r}; try turbo, viridis, inferno, magma or RdBu_r."
        ) from error
    return np.round(colormap(np.linspace(0.0, 1.0, n))[:, :3] * 255).astype(np.uint8)


def colorize(values01: np.ndarray, cmap: str = DEFAULT_CMAP) -> np.ndarray:
    """Colour ``(H, W)`` values in [0, 1] (NaN: black, to be masked) as ``(H, W, 3)`` uint8."""
    lut = colour_lut(cmap)
    index = np.nan_to_num(values01, nan=0.0) * (len(lut) - 1) + 0.5
    return lut[np.clip(index, 0, len(lut) - 1).astype(np.intp)]


def blend(image: np.ndarray, colours: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Blend colours over an image with a per-pixel opacity.

    Only pixels with some opacity are computed, in 8-bit fixed point (opacity in 1/255 steps).

    Args:
        image: ``(H, W, 3)`` uint8 background (the slide).
        colours: ``(H, W, 3)`` uint8 overlay colours.
        alpha: ``(H, W)`` float opacity in [0, 1] (0: image only).

    Returns:
        ``(H, W, 3)`` uint8.
    """
    weight = np.rint(np.clip(alpha, 0.0, 1.0) * 255).astype(np.uint16).ravel()
    out = image.copy()
    flat_out = out.reshape(-1, 3)
    where = np.flatnonzero(weight)
    w = weight[where][:, None]
    mixed = flat_out[where] * (255 - w) + colours.reshape(-1, 3)[where] * w
    flat_out[where] = (mixed + 127) // 255
    return out
