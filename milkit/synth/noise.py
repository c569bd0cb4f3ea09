"""Random fields defined in physical space (µm), and their sampling at any resolution.

Everything a synthetic slide shows is a function of the position in µm, never of a pixel index,
so the same slide "scanned" at 0.25 and 0.5 µm/px shows the same tissue in the same place. Two
kinds of randomness make that possible:

- smooth fields on a fixed µm grid (:class:`FieldStack`), drawn once per slide from its seed and
  sampled with bilinear interpolation at pixel centres or at arbitrary points;
- counter-based hashes (:func:`hash_uniform`): the k-th random number of a physical block
  ``(ix, iy)`` depends only on ``(seed, stream, ix, iy, k)``, not on the order of rendering.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import fft as sp_fft
from scipy import ndimage as ndi

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser over a uint64 array (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def hash_uniform(seed: int, stream: int, *keys: np.ndarray | int) -> np.ndarray:
    """Uniform numbers in [0, 1) that depend only on their integer keys.

    Args:
        seed: Slide seed.
        stream: Which quantity is drawn (distinct streams give independent numbers).
        *keys: Integer arrays broadcast together (e.g. block ix, block iy, candidate k).

    Returns:
        float64 array of the broadcast shape of ``keys``.
    """
    h = np.zeros(1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for key in (seed, stream, *keys):
            key64 = np.atleast_1d(np.asarray(key, dtype=np.int64)).view(np.uint64)
            h = _splitmix(h ^ (key64 + _GOLDEN))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int], sigma_cells: float
) -> np.ndarray:
    """Gaussian-smoothed white noise, normalised to zero mean and unit standard deviation.

    Large ``sigma_cells`` are drawn on a coarser grid and zoomed up, so the cost stays linear in
    the number of cells whatever the correlation length.

    Args:
        rng: Source of randomness.
        shape: ``(rows, cols)`` of the grid.
        sigma_cells: Correlation length in grid cells.

    Returns:
        ``(rows, cols)`` float32 field.
    """
    factor = max(1, int(sigma_cells // 3))
    coarse_shape = (shape[0] // factor + 3, shape[1] // factor + 3)
    white = rng.standard_normal(coarse_shape, dtype=np.float32)
    field = ndi.gaussian_filter(white, sigma_cells / factor, mode="wrap")
    if factor > 1:
        field = ndi.zoom(field, factor, order=1)
    field = np.ascontiguousarray(field[: shape[0], : shape[1]])
    field -= field.mean()
    field /= max(float(field.std()), 1e-12)
    return field


def periodic_texture(
    rng: np.random.Generator,
    size_cells: int,
    *,
    sigma_along_cells: float,
    sigma_across_cells: float,
    angle_rad: float,
) -> np.ndarray:
    """Tileable anisotropic noise (fibres when ``sigma_along >> sigma_across``).

    Args:
        rng: Source of randomness.
        size_cells: Side of the square, periodic texture in cells.
        sigma_along_cells: Correlation length along ``angle_rad``.
        sigma_across_cells: Correlation length across it.
        angle_rad: Direction of the fibres, counter-clockwise from +x.

    Returns:
        ``(size_cells, size_cells)`` float32, zero mean and unit standard deviation.
    """
    ky = (np.fft.fftfreq(size_cells) * 2 * np.pi).astype(np.float32)[:, None]
    kx = (np.fft.rfftfreq(size_cells) * 2 * np.pi).astype(np.float32)[None, :]
    k_along = kx * np.cos(angle_rad) + ky * np.sin(angle_rad)
    k_across = -kx * np.sin(angle_rad) + ky * np.cos(angle_rad)
    gain = np.exp(
        -0.5 * ((k_along * sigma_along_cells) ** 2 + (k_across * sigma_across_cells) ** 2)
    )
    white = rng.standard_normal((size_cells, size_cells), dtype=np.float32)
    field = sp_fft.irfft2(sp_fft.rfft2(white) * gain, s=white.shape)
    return ((field - field.mean()) / max(float(field.std()), 1e-12)).astype(np.float32)


def _window(coords_um: np.ndarray, spacing_um: float, n: int, wrap: bool) -> tuple[np.ndarray, ...]:
    """Cells around positions along one axis (cell centres at ``(i + 0.5) * spacing``).

    Returns the grid indices of the window of cells the positions need (wrapped or clamped), and
    for each position the window-relative index of its left neighbour and its weight on the right
    one.
    """
    pos = coords_um / spacing_um - 0.5
    lo = np.floor(pos)
    frac = (pos - lo).astype(np.float32)
    lo = lo.astype(np.int64)
    first = int(lo.min())
    cells = np.arange(first, int(lo.max()) + 2)
    cells = cells % n if wrap else np.clip(cells, 0, n - 1)
    return cells, lo - first, frac


def resample_rect(
    grid: np.ndarray,
    spacing_um: float,
    x_um: np.ndarray,
    y_um: np.ndarray,
    *,
    wrap: bool = False,
    fields: list[int] | None = None,
) -> np.ndarray:
    """Bilinear samples of gridded fields on an axis-aligned lattice of positions.

    Separable: the window of cells in reach is cut out and interpolated along x, then along y,
    so the cost is a few operations per output sample.

    Args:
        grid: ``(F, rows, cols)`` fields with cell centres at ``(i + 0.5) * spacing_um``.
        spacing_um: Grid spacing in µm.
        x_um: ``(W,)`` positions of the output columns in µm.
        y_um: ``(H,)`` positions of the output rows in µm.
        wrap: Treat the grid as periodic (textures); otherwise clamp at the edges.
        fields: Indices of the fields to sample (default all); only their window is copied.

    Returns:
        ``(len(fields), H, W)`` float32.
    """
    rows, r0, fy = _window(y_um, spacing_um, grid.shape[1], wrap)
    cols, c0, fx = _window(x_um, spacing_um, grid.shape[2], wrap)
    field_index = np.arange(grid.shape[0]) if fields is None else np.asarray(fields)
    window = grid[np.ix_(field_index, rows, cols)]
    # along x on the few window rows first, then along y by copying whole rows (cheap);
    # np.take keeps results C-contiguous, which keeps each gather fast
    along_x = window.take(c0, axis=2) * (1 - fx) + window.take(c0 + 1, axis=2) * fx
    out = along_x.take(r0, axis=1)
    out += (along_x.take(r0 + 1, axis=1) - out) * fy[None, :, None]
    return out


@dataclass(frozen=True, eq=False)
class FieldStack:
    """Named smooth fields on one µm grid.

    Attributes:
        names: Field names, in the order of ``values``.
        values: ``(F, rows, cols)`` float32; cell ``(i, j)`` is centred at
            ``((j + 0.5) * spacing_um, (i + 0.5) * spacing_um)``.
        spacing_um: Grid spacing in µm.
    """

    names: tuple[str, ...]
    values: np.ndarray
    spacing_um: float

    def __getitem__(self, name: str) -> np.ndarray:
        return self.values[self.names.index(name)]

    def rect(self, x_um: np.ndarray, y_um: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
        """Sample ``names`` on the lattice ``y_um x x_um``; returns ``(len(names), H, W)``."""
        index = [self.names.index(name) for name in names]
        return resample_rect(self.values, self.spacing_um, x_um, y_um, fields=index)

    def points(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Sample every field at ``(N,)`` scattered points; returns ``(F, N)`` float32."""
        n_rows, n_cols = self.values.shape[1:]
        pos_y = np.clip(y_um / self.spacing_um - 0.5, 0, n_rows - 1)
        pos_x = np.clip(x_um / self.spacing_um - 0.5, 0, n_cols - 1)
        r0 = np.minimum(pos_y.astype(np.int64), max(n_rows - 2, 0))
        c0 = np.minimum(pos_x.astype(np.int64), max(n_cols - 2, 0))
        fy, fx = (pos_y - r0).astype(np.float32), (pos_x - c0).astype(np.float32)
        r1, c1 = np.minimum(r0 + 1, n_rows - 1), np.minimum(c0 + 1, n_cols - 1)
        v = self.values
        top = v[:, r0, c0] * (1 - fx) + v[:, r0, c1] * fx
        bottom = v[:, r1, c0] * (1 - fx) + v[:, r1, c1] * fx
        return top * (1 - fy) + bottom * fy
