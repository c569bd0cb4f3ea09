"""What is where on a synthetic slide: smooth fields and the class map on an 8 µm grid.

Regions are stored as approximate signed distances in µm (positive inside), so the renderer can
draw edges of a fixed physical softness at any resolution, and the class map (truth) and the
pixels come from the same numbers. Each component draws from its own random stream
(``(seed, component)``), so switching artefacts or tumour off leaves the rest of a slide as is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from milkit.errors import ConfigError
from milkit.synth.noise import FieldStack, periodic_texture, smooth_noise
from milkit.synth.organs import OrganStyle, get_organ
from milkit.synth.truth import AGGREGATE, ARTEFACT, BACKGROUND, STROMA, TUMOR

#: Spacing of the layout grid (and of the truth maps) in µm.
GRID_UM = 8.0
#: Spacing and period of the stroma fibre textures in µm.
TEXTURE_UM = 1.0
_TEXTURE_CELLS = 512
_GRAIN_CELLS = 243  # 3**5: fast to transform, and never repeats in step with the fibres
FIELD_NAMES = ("tissue", "tumor", "aggregate", "til", "pen", "thickness", "fibre_mix")
#: Optical density (R, G, B) of marker inks.
PEN_INKS: dict[str, tuple[float, float, float]] = {
    "blue": (0.95, 0.52, 0.10),
    "green": (0.85, 0.22, 0.60),
    "black": (1.25, 1.25, 1.15),
}
# Lower quantile (epithelium) and upper quantile (gland lumen) of the tumour pattern noise.
_PATTERN_QUANTILES = {"nests": (0.42, None), "glands": (0.38, 0.86), "sheets": (0.12, None)}
_OUTSIDE_UM = -1000.0  # signed distance of regions a slide does not have
#: Per-slide stain strength spread of slides from one lab (`SlideParams.stain_spread`).
ONE_LAB_STAIN_SPREAD = 0.15


@dataclass(frozen=True)
class SlideParams:
    """Everything that defines a synthetic slide's content (not its resolution).

    Attributes:
        seed: Non-negative random seed; same seed and parameters give the same slide.
        task: Organ family, a key of :data:`milkit.synth.organs.ORGANS`.
        tumor: Whether the slide contains tumour.
        tumor_fraction: Target tumour area / tissue area in (0, 0.9); drawn in [0.02, 0.4]
            when None.
        til_level: Typical stromal lymphocyte density in [0, 1]; drawn when None.
        aggregates: Whether dense lymphocyte aggregates appear; drawn when None.
        artefacts: Whether pen marks and dust may appear (each drawn per slide).
        stain_spread: Half-width of the per-slide stain strength draw: hematoxylin and eosin
            are each scaled by a factor in ``[1 - stain_spread, 1 + stain_spread]`` (in
            ``[0, 0.9]``). The default is one lab's day-to-day variation; cohorts pooled from
            several sites spread further (0.5).
    """

    seed: int
    task: str = "breast"
    tumor: bool = True
    tumor_fraction: float | None = None
    til_level: float | None = None
    aggregates: bool | None = None
    artefacts: bool = True
    stain_spread: float = ONE_LAB_STAIN_SPREAD

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int | np.integer) or self.seed < 0:
            raise ConfigError(
                f"synthetic slide seed must be a non-negative integer, got {self.seed!r}."
            )
        get_organ(self.task)
        if self.tumor_fraction is not None and not 0 < self.tumor_fraction < 0.9:
            raise ConfigError(f"tumor_fraction must be in (0, 0.9), got {self.tumor_fraction!r}.")
        if self.til_level is not None and not 0 <= self.til_level <= 1:
            raise ConfigError(f"til_level must be in [0, 1], got {self.til_level!r}.")
        if not 0 <= self.stain_spread <= 0.9:
            raise ConfigError(f"stain_spread must be in [0, 0.9], got {self.stain_spread!r}.")


@dataclass(frozen=True, eq=False)
class Layout:
    """A slide's content in physical space, independent of any scan resolution.

    Attributes:
        params: The parameters it was built from.
        style: The organ family.
        size_um: ``(width, height)`` of the slide in µm.
        fields: Smooth fields :data:`FIELD_NAMES` on the :data:`GRID_UM` grid.
        class_map: ``(rows, cols)`` uint8 classes (see :mod:`milkit.synth.truth`) per grid cell.
        til_density: ``(rows, cols)`` float32 lymphocyte density in [0, 1] per grid cell.
        fibres: ``(2, n, n)`` float32 periodic fibre textures at :data:`TEXTURE_UM`.
        fibre_angles_rad: Direction of each fibre texture.
        grain: ``(m, m)`` float32 periodic isotropic noise at :data:`TEXTURE_UM`.
        pen_od: Optical density (R, G, B) of this slide's marker ink.
        dust: ``(N, 4)`` float32 dust specks: x µm, y µm, radius µm, optical density.
        stain_scale: ``(hematoxylin, eosin)`` strength of this slide's staining.
    """

    params: SlideParams
    style: OrganStyle
    size_um: tuple[float, float]
    fields: FieldStack
    class_map: np.ndarray
    til_density: np.ndarray
    fibres: np.ndarray
    fibre_angles_rad: tuple[float, float]
    grain: np.ndarray
    pen_od: np.ndarray
    dust: np.ndarray
    stain_scale: tuple[float, float]


def _rng(seed: int, component: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), component]))


def _signed(field: np.ndarray, threshold: float) -> np.ndarray:
    """``field - threshold`` scaled to approximate µm of distance from the level set."""
    gy, gx = np.gradient(field.astype(np.float32), GRID_UM)
    slope = max(float(np.mean(np.hypot(gx, gy))), 1e-6)
    return ((field - threshold) / slope).astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


def _tissue_pieces(rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """1-3 irregular pieces side by side along the long axis; signed µm, > 0 inside."""
    width, height = xs[-1] + GRID_UM / 2, ys[-1] + GRID_UM / 2
    n_pieces = int(rng.integers(1, 4))
    long_is_x = width >= height
    slot = (width if long_is_x else height) / n_pieces
    short = height if long_is_x else width
    shape = (ys.size, xs.size)
    signed = np.full(shape, _OUTSIDE_UM, dtype=np.float32)
    for i in range(n_pieces):
        along = slot * (i + 0.5 + rng.uniform(-0.08, 0.08))
        across = short * (0.5 + rng.uniform(-0.06, 0.06))
        cx, cy = (along, across) if long_is_x else (across, along)
        half_along = slot * rng.uniform(0.30, 0.42)
        half_across = short * rng.uniform(0.28, 0.40)
        ax, ay = (half_along, half_across) if long_is_x else (half_across, half_along)
        angle = rng.uniform(-0.3, 0.3)
        dx, dy = xs[None, :] - cx, ys[:, None] - cy
        u = (dx * math.cos(angle) + dy * math.sin(angle)) / ax
        v = (-dx * math.sin(angle) + dy * math.cos(angle)) / ay
        scale = min(ax, ay)
        wobble = 0.22 * smooth_noise(rng, shape, 0.18 * scale / GRID_UM)
        wobble += 0.05 * smooth_noise(rng, shape, 0.04 * scale / GRID_UM)
        piece = (1.0 - np.sqrt(u * u + v * v) + wobble) * scale
        np.maximum(signed, piece.astype(np.float32), out=signed)
    return signed


def _holes(rng: np.random.Generator, style: OrganStyle, pieces: np.ndarray) -> np.ndarray:
    """Fat, alveoli or tears: signed µm, > 0 where tissue is solid."""
    shape = pieces.shape
    field = smooth_noise(rng, shape, style.hole_um / GRID_UM)
    field += 0.7 * smooth_noise(rng, shape, 8 * style.hole_um / GRID_UM)  # holes come in clumps
    inside = field[pieces > 0]
    threshold = float(np.quantile(inside, 1 - style.hole_fraction)) if inside.size else 0.0
    return -_signed(field, threshold)


def _tumour(
    rng: np.random.Generator,
    style: OrganStyle,
    pieces: np.ndarray,
    holes: np.ndarray,
    target_fraction: float | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Tissue and tumour signed fields with tumour area / tissue area close to the target.

    Tumour grows where a large-scale field exceeds a threshold, in the organ's pattern (nests,
    glands with lumens, sheets); it fills normal holes (alveoli, fat) and brings its own lumens.
    The threshold is found by bisection on the grid.
    """
    shape = pieces.shape
    # tumour fronts: a large-scale field roughened at smaller scales, so borders are irregular
    envelope = smooth_noise(rng, shape, 260 / GRID_UM)
    envelope += 0.35 * smooth_noise(rng, shape, 90 / GRID_UM)
    envelope += 0.12 * smooth_noise(rng, shape, 30 / GRID_UM)
    pattern = smooth_noise(rng, shape, style.pattern_um / GRID_UM)
    low_q, lumen_q = _PATTERN_QUANTILES[style.tumor_pattern]
    epithelium = _signed(pattern, float(np.quantile(pattern, low_q)))
    lumen = _signed(pattern, float(np.quantile(pattern, lumen_q))) if lumen_q else None
    envelope_signed = _signed(envelope, 0.0)

    def compose(offset_um: float) -> tuple[np.ndarray, np.ndarray]:
        zone = envelope_signed - offset_um
        tumour_zone = np.minimum(zone, epithelium)
        tissue = np.minimum(pieces, np.maximum(holes, tumour_zone))
        if lumen is not None:
            tissue = np.minimum(tissue, -np.minimum(zone, lumen))
        return tissue, np.minimum(tissue, tumour_zone)

    if target_fraction is None:
        return np.minimum(pieces, holes), np.full(shape, _OUTSIDE_UM, dtype=np.float32)
    low, high = float(envelope_signed.min()), float(envelope_signed.max())
    for _ in range(30):
        middle = 0.5 * (low + high)
        tissue, tumour = compose(middle)
        fraction = np.count_nonzero(tumour > 0) / (int(np.count_nonzero(tissue > 0)) or 1)
        low, high = (middle, high) if fraction > target_fraction else (low, middle)
    return compose(low)  # the lower offset errs on the side of some tumour


def _aggregates(
    rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray, stroma: np.ndarray, present: bool
) -> np.ndarray:
    """1-4 round lymphoid aggregates centred in stroma; signed µm."""
    out = np.full(stroma.shape, _OUTSIDE_UM, dtype=np.float32)
    candidates = np.flatnonzero(stroma)
    if not present or candidates.size == 0:
        return out
    wobble = 0.15 * smooth_noise(rng, stroma.shape, 30 / GRID_UM)
    diagonal = math.hypot(xs[-1], ys[-1])
    for cell in rng.choice(candidates, size=int(rng.integers(1, 5))):
        row, col = divmod(int(cell), stroma.shape[1])
        radius = min(rng.uniform(50, 170), 0.05 * diagonal)
        dist = np.hypot(xs[None, :] - xs[col], ys[:, None] - ys[row])
        np.maximum(out, (radius * (1 + wobble) - dist).astype(np.float32), out=out)
    return out


def _segment_distance(xs: np.ndarray, ys: np.ndarray, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Distance in µm from every grid cell to the segment ``p``-``q``."""
    d = q - p
    t = ((xs[None, :] - p[0]) * d[0] + (ys[:, None] - p[1]) * d[1]) / max(float(d @ d), 1e-9)
    t = np.clip(t, 0, 1)
    return np.hypot(xs[None, :] - p[0] - t * d[0], ys[:, None] - p[1] - t * d[1])


def _pen(
    rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray, tissue: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Marker strokes starting near the tissue edge, so they cross glass and tissue.

    Returns:
        Coverage (0..1, which cells the strokes cover) and ink amount (coverage times an
        uneven strength).
    """
    ink = np.zeros(tissue.shape, dtype=np.float32)
    diagonal = math.hypot(xs[-1], ys[-1])
    edge = np.flatnonzero(np.abs(tissue) < 60)
    for _ in range(int(rng.integers(1, 4))):
        cell = int(rng.choice(edge)) if edge.size else int(rng.integers(tissue.size))
        row, col = divmod(cell, tissue.shape[1])
        point, angle = np.array([xs[col], ys[row]]), rng.uniform(0, 2 * math.pi)
        half_width = min(rng.uniform(60, 200), 0.03 * diagonal)  # small slides stay visible
        for _ in range(int(rng.integers(3, 8))):
            angle += rng.normal(0, 0.35)
            step = rng.uniform(0.03, 0.08) * diagonal
            nxt = point + step * np.array([math.cos(angle), math.sin(angle)])
            # only the cells within reach of this segment are measured
            reach = half_width + 2 * GRID_UM
            c0 = max(int((min(point[0], nxt[0]) - reach) // GRID_UM), 0)
            c1 = min(int((max(point[0], nxt[0]) + reach) // GRID_UM) + 1, xs.size)
            r0 = max(int((min(point[1], nxt[1]) - reach) // GRID_UM), 0)
            r1 = min(int((max(point[1], nxt[1]) + reach) // GRID_UM) + 1, ys.size)
            if c1 > c0 and r1 > r0:
                dist = _segment_distance(xs[c0:c1], ys[r0:r1], point, nxt)
                stroke = np.clip((half_width - dist) / 12.0 + 0.5, 0, 1)
                np.maximum(ink[r0:r1, c0:c1], stroke.astype(np.float32), out=ink[r0:r1, c0:c1])
            point = nxt
    strength = rng.uniform(0.55, 1.0) * (1 + 0.15 * smooth_noise(rng, tissue.shape, 40 / GRID_UM))
    return ink, ink * strength


def _dust(rng: np.random.Generator, size_um: tuple[float, float]) -> np.ndarray:
    n = int(rng.integers(3, 25))
    return np.stack(
        [
            rng.uniform(0, size_um[0], n),
            rng.uniform(0, size_um[1], n),
            np.exp(rng.uniform(math.log(3), math.log(20), n)),
            rng.uniform(0.25, 0.8, n),
        ],
        axis=1,
    ).astype(np.float32)


def _fibre_textures(
    rng: np.random.Generator, style: OrganStyle
) -> tuple[np.ndarray, tuple[float, float]]:
    """Two periodic collagen textures whose directions differ by 35-70 degrees."""
    angle = rng.uniform(0, math.pi)
    angles = (angle, angle + rng.uniform(0.6, 1.2))
    along, across = (v / TEXTURE_UM for v in style.fibre_um)
    textures = [
        periodic_texture(
            rng, _TEXTURE_CELLS, sigma_along_cells=along, sigma_across_cells=across, angle_rad=a
        )
        for a in angles
    ]
    return np.stack(textures), angles


def _class_map(
    xs: np.ndarray,
    ys: np.ndarray,
    tissue: np.ndarray,
    tumour: np.ndarray,
    aggregate: np.ndarray,
    pen_coverage: np.ndarray,
    dust: np.ndarray,
) -> np.ndarray:
    classes = np.full(tissue.shape, BACKGROUND, dtype=np.uint8)
    classes[tissue > 0] = STROMA
    classes[tumour > 0] = TUMOR
    classes[aggregate > 0] = AGGREGATE
    classes[pen_coverage > 0.5] = ARTEFACT
    for x, y, radius, _ in dust:  # every cell the speck touches, at least the one it is in
        reach = radius + GRID_UM / 2
        r0, r1 = max(int((y - reach) // GRID_UM), 0), int((y + reach) // GRID_UM) + 1
        c0, c1 = max(int((x - reach) // GRID_UM), 0), int((x + reach) // GRID_UM) + 1
        near = np.hypot(xs[None, c0:c1] - x, ys[r0:r1, None] - y) <= reach
        classes[r0:r1, c0:c1][near] = ARTEFACT
    return classes


def build_layout(params: SlideParams, size_um: tuple[float, float]) -> Layout:
    """Draw a slide's content.

    Args:
        params: What the slide shows.
        size_um: ``(width, height)`` of the slide in µm.

    Returns:
        The layout; its grid has ``ceil(size / GRID_UM)`` cells per axis.

    Raises:
        ConfigError: The size is not positive.
    """
    if min(size_um) <= 0:
        raise ConfigError(f"synthetic slide size must be positive, got {size_um} µm.")
    style = get_organ(params.task)
    shape = (math.ceil(size_um[1] / GRID_UM), math.ceil(size_um[0] / GRID_UM))
    xs = ((np.arange(shape[1]) + 0.5) * GRID_UM).astype(np.float32)
    ys = ((np.arange(shape[0]) + 0.5) * GRID_UM).astype(np.float32)

    pieces = _tissue_pieces(_rng(params.seed, 1), xs, ys)
    holes = _holes(_rng(params.seed, 2), style, pieces)
    draws = _rng(params.seed, 3)
    target = params.tumor_fraction
    if target is None:
        target = math.exp(draws.uniform(math.log(0.02), math.log(0.4)))
    tissue, tumour = _tumour(
        _rng(params.seed, 4), style, pieces, holes, target if params.tumor else None
    )
    with_aggregates = draws.random() < 0.5 if params.aggregates is None else params.aggregates
    til_level = draws.beta(0.9, 2.0) if params.til_level is None else params.til_level
    stroma = (tissue > 0) & (tumour <= 0)
    aggregate = np.minimum(
        _aggregates(_rng(params.seed, 5), xs, ys, stroma, with_aggregates), tissue
    )
    aggregate = np.minimum(aggregate, -tumour)

    looks = _rng(params.seed, 6)
    logit = math.log(max(til_level, 0.01) / max(1 - til_level, 0.01))
    til = _sigmoid(logit + 1.1 * smooth_noise(looks, shape, 280 / GRID_UM))
    thickness = np.clip(1 + 0.15 * smooth_noise(looks, shape, 200 / GRID_UM), 0.6, 1.4)
    fibre_mix = _sigmoid(2.0 * smooth_noise(looks, shape, 150 / GRID_UM))
    fibres, angles = _fibre_textures(looks, style)
    grain = periodic_texture(
        looks, _GRAIN_CELLS, sigma_along_cells=0.7, sigma_across_cells=0.7, angle_rad=0.0
    )
    spread = params.stain_spread
    stain_scale = (looks.uniform(1 - spread, 1 + spread), looks.uniform(1 - spread, 1 + spread))

    artefacts = _rng(params.seed, 7)
    pen_coverage = pen = np.zeros(shape, dtype=np.float32)
    dust = np.zeros((0, 4), dtype=np.float32)
    ink = PEN_INKS[str(artefacts.choice(sorted(PEN_INKS)))]
    if params.artefacts and artefacts.random() < 0.4:
        pen_coverage, pen = _pen(artefacts, xs, ys, tissue)
    if params.artefacts and artefacts.random() < 0.7:
        dust = _dust(artefacts, size_um)

    classes = _class_map(xs, ys, tissue, tumour, aggregate, pen_coverage, dust)
    fields = FieldStack(
        FIELD_NAMES,
        np.stack([tissue, tumour, aggregate, til, pen, thickness, fibre_mix], dtype=np.float32),
        GRID_UM,
    )
    return Layout(
        params=params,
        style=style,
        size_um=(float(size_um[0]), float(size_um[1])),
        fields=fields,
        class_map=classes,
        til_density=np.where(classes == AGGREGATE, np.float32(1), til).astype(np.float32),
        fibres=fibres,
        fibre_angles_rad=angles,
        grain=grain,
        pen_od=np.asarray(ink, dtype=np.float32),
        dust=dust,
        stain_scale=stain_scale,
    )
