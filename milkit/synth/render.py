"""Pixels of a synthetic slide: a layout seen at one scan resolution.

Colour follows Beer-Lambert: each pixel's optical density is the sum of hematoxylin, eosin, ink
and glass densities times their RGB absorption, and ``RGB = 255 * 10 ** -OD``. Every quantity is
sampled at the pixel centre's position in µm, so any region can be rendered on its own and two
resolutions agree.
"""

from __future__ import annotations

import math

import numpy as np

from milkit.errors import ConfigError
from milkit.synth.layout import TEXTURE_UM, Layout
from milkit.synth.noise import resample_rect
from milkit.synth.nuclei import BLOCK_UM, Nuclei, TemplateBank, nuclei_in_block_row, stamp

#: Optical density (R, G, B) of clean glass: a slightly blue-grey white.
GLASS_OD = (0.018, 0.022, 0.012)
_TISSUE_EDGE_UM = 2.0  # softness of tissue and tumour borders
_EDGE_RAGGEDNESS_UM = 1.5
_GLASS_NOISE_OD = 0.004
_LN10 = math.log(10.0)
_CACHED_BLOCK_ROWS = 8
_SMOOTH_BLOCK_PX = 8


class SlideRenderer:
    """Renders any level-0 region of a layout at ``mpp``.

    Regions are independent: a region's pixels do not depend on which regions were rendered
    before (the block-row cache only saves time). Not thread-safe: render from one thread.

    Args:
        layout: The slide's content.
        mpp: Microns per level-0 pixel.

    Raises:
        ConfigError: ``mpp`` is not positive.
    """

    def __init__(self, layout: Layout, mpp: float) -> None:
        if not (math.isfinite(mpp) and mpp > 0):
            raise ConfigError(f"synthetic slide mpp must be positive, got {mpp!r}.")
        self.layout = layout
        self.mpp = float(mpp)
        self.dimensions = (
            max(1, round(layout.size_um[0] / mpp)),
            max(1, round(layout.size_um[1] / mpp)),
        )
        self._bank = TemplateBank.build(layout, self.mpp)
        self._block_rows: dict[int, Nuclei] = {}
        style, (h_scale, e_scale) = layout.style, layout.stain_scale
        self._hematoxylin_od = np.asarray(style.hematoxylin_od, dtype=np.float32) * h_scale
        self._eosin_od = np.asarray(style.eosin_od, dtype=np.float32) * e_scale

    def _nuclei(self, x_range_um: tuple[float, float], y_range_um: tuple[float, float]) -> Nuclei:
        """Nuclei whose centres lie in a rectangle (given in µm)."""
        first, last = int(y_range_um[0] // BLOCK_UM), int(y_range_um[1] // BLOCK_UM)
        parts = []
        for block_row in range(max(first, 0), last + 1):
            if block_row not in self._block_rows:
                self._block_rows[block_row] = nuclei_in_block_row(self.layout, block_row)
            row = self._block_rows[block_row]
            start, stop = np.searchsorted(row.x_um, x_range_um)  # rows are sorted by x
            parts.append(row.select(slice(start, stop)))
        for stale in sorted(self._block_rows)[:-_CACHED_BLOCK_ROWS]:
            del self._block_rows[stale]
        return Nuclei.concatenate(parts)

    def render(self, origin_px: tuple[int, int], size_px: tuple[int, int]) -> np.ndarray:
        """Render a region.

        Args:
            origin_px: ``(x, y)`` of the top-left pixel in level-0 pixels.
            size_px: ``(width, height)`` in pixels.

        Returns:
            ``(height, width, 3)`` uint8 RGB.
        """
        mpp, layout, style = self.mpp, self.layout, self.layout.style
        # work on whole 8 x 8 blocks of the slide's pixel grid: slowly varying fields are
        # sampled once per block, the same whatever region is asked for
        block = _SMOOTH_BLOCK_PX
        (x0, y0), (width, height) = origin_px, size_px
        skip_x, skip_y = x0 % block, y0 % block
        x0, y0 = x0 - skip_x, y0 - skip_y
        padded_w = -(-(width + skip_x) // block) * block
        padded_h = -(-(height + skip_y) // block) * block
        x_um = ((np.arange(x0, x0 + padded_w) + 0.5) * mpp).astype(np.float32)
        y_um = ((np.arange(y0, y0 + padded_h) + 0.5) * mpp).astype(np.float32)
        tissue, tumour = layout.fields.rect(x_um, y_um, ("tissue", "tumor"))
        thickness, mix = layout.fields.rect(
            x_um[block // 2 :: block], y_um[block // 2 :: block], ("thickness", "fibre_mix")
        )[:, :, None, :, None]

        def blocks(a: np.ndarray) -> np.ndarray:
            return a.reshape(padded_h // block, block, padded_w // block, block)

        grain = resample_rect(layout.grain[None], TEXTURE_UM, x_um, y_um, wrap=True)[0]
        fibres = resample_rect(layout.fibres, TEXTURE_UM, x_um, y_um, wrap=True)
        (stroma_h, stroma_e), (tumour_h, tumour_e) = style.stroma_stain, style.tumor_stain

        # stroma: eosin along fibres whose direction drifts slowly across the slide
        eosin = fibres[0] - fibres[1]
        blocks(eosin)[...] *= mix
        eosin += fibres[1]
        eosin *= stroma_e * style.fibre_contrast
        eosin += stroma_e
        np.maximum(eosin, 0.08 * stroma_e, out=eosin)
        # tumour: grainy cytoplasm, more hematoxylin
        in_tumour = np.clip(tumour * (1 / _TISSUE_EDGE_UM) + 0.5, 0, 1)
        towards = grain * (0.15 * tumour_e) + tumour_e
        towards -= eosin
        towards *= in_tumour
        eosin += towards
        hematoxylin = in_tumour * (tumour_h - stroma_h) + stroma_h

        reach_um = self._bank.max_half_px * mpp
        nuclei = self._nuclei(
            (x0 * mpp - reach_um, (x0 + padded_w) * mpp + reach_um),
            (y0 * mpp - reach_um, (y0 + padded_h) * mpp + reach_um),
        )
        nucleus_stain = stamp(nuclei, self._bank, mpp, (x0, y0), (padded_w, padded_h))
        hematoxylin += nucleus_stain
        # how much stain: tissue (ragged edge) times section thickness
        amount = grain * _EDGE_RAGGEDNESS_UM + tissue
        amount *= 1 / _TISSUE_EDGE_UM
        amount += 0.5
        np.clip(amount, 0, 1, out=amount)
        blocks(amount)[...] *= thickness
        hematoxylin *= amount
        np.minimum(nucleus_stain, 1, out=nucleus_stain)
        nucleus_stain *= -0.5  # nuclei push eosin aside
        nucleus_stain += 1
        amount *= nucleus_stain
        eosin *= amount

        # Beer-Lambert, folded: 255 * 10**-od == exp(ln 255 - ln 10 * od)
        extra = grain * (-_LN10 * _GLASS_NOISE_OD)
        extra -= self._dust(x_um, y_um, grain) * _LN10
        pen = self._pen(x_um, y_um)
        rgb = np.empty((padded_h, padded_w, 3), dtype=np.uint8)
        for channel in range(3):
            log_value = hematoxylin * (-_LN10 * self._hematoxylin_od[channel])
            log_value += eosin * (-_LN10 * self._eosin_od[channel])
            log_value += extra
            if pen is not None:
                log_value += pen * (-_LN10 * layout.pen_od[channel])
            log_value += math.log(255.0) - _LN10 * GLASS_OD[channel]
            np.exp(log_value, out=log_value)
            np.minimum(log_value, 255, out=log_value)
            rgb[..., channel] = log_value
        return rgb[skip_y : skip_y + height, skip_x : skip_x + width]

    def _pen(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray | None:
        """Ink over the lattice ``y_um x x_um``, or None where the region has none."""
        spacing, ink = self.layout.fields.spacing_um, self.layout.fields["pen"]
        r0, r1 = int(y_um[0] // spacing) - 1, int(y_um[-1] // spacing) + 2
        c0, c1 = int(x_um[0] // spacing) - 1, int(x_um[-1] // spacing) + 2
        if not ink[max(r0, 0) : r1, max(c0, 0) : c1].any():
            return None
        return self.layout.fields.rect(x_um, y_um, ("pen",))[0]

    def _dust(self, x_um: np.ndarray, y_um: np.ndarray, grain: np.ndarray) -> np.ndarray | float:
        """Optical density of dust specks over the lattice ``y_um x x_um`` (grey: the same in
        every channel), with outlines roughened by ``grain``."""
        near = [
            speck
            for speck in self.layout.dust
            if x_um[0] - speck[2] <= speck[0] <= x_um[-1] + speck[2]
            and y_um[0] - speck[2] <= speck[1] <= y_um[-1] + speck[2]
        ]
        if not near:
            return 0.0
        out = np.zeros((y_um.size, x_um.size), dtype=np.float32)
        for x, y, radius, density in near:
            dist = np.hypot(x_um[None, :] - x, y_um[:, None] - y)
            edge = radius * (1 + 0.2 * grain) - dist
            np.maximum(out, density * np.clip(edge / 1.5 + 0.5, 0, 1), out=out)
        return out
