"""Nuclei: where they are (per 64 µm block, hashed) and how they are stamped into pixels.

Candidate nuclei of each kind are laid down per physical block ``(ix, iy)`` from counter-based
hashes of ``(seed, kind, ix, iy, k)``, then thinned by the layout at their position (tumour cells
only in tumour, lymphocytes by the TIL density...). Rendering order, tile size and resolution
therefore never change which nuclei exist. Shapes come from a bank of templates drawn at the
scan resolution and added into the hematoxylin channel with one ``bincount``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from milkit.synth.layout import Layout
from milkit.synth.noise import hash_uniform
from milkit.synth.organs import NucleusKind

#: Side of the blocks that seed nuclei, in µm.
BLOCK_UM = 64.0
STROMA, TUMOR, LYMPHOCYTE = 0, 1, 2
_TEMPLATES_PER_KIND = 24
_STROMA_ORIENTATIONS = 12
# Lymphocyte density relative to the densest packing, in stroma (times the TIL density) and in
# tumour (times the TIL density); aggregates are packed densely.
_LYMPHOCYTE_IN_STROMA = 0.55
_LYMPHOCYTE_IN_TUMOR = 0.12


@dataclass(frozen=True, eq=False)
class Nuclei:
    """Accepted nuclei of a band of blocks.

    Attributes:
        x_um: ``(N,)`` float64 centre x in µm.
        y_um: ``(N,)`` float64 centre y in µm.
        kind: ``(N,)`` int8, :data:`STROMA`, :data:`TUMOR` or :data:`LYMPHOCYTE`.
        template: ``(N,)`` int64 index into the kind's template bank.
        amount: ``(N,)`` float32 hematoxylin multiplier.
    """

    x_um: np.ndarray
    y_um: np.ndarray
    kind: np.ndarray
    template: np.ndarray
    amount: np.ndarray

    _FIELDS = ("x_um", "y_um", "kind", "template", "amount")

    @classmethod
    def concatenate(cls, parts: list[Nuclei]) -> Nuclei:
        """All nuclei of ``parts``, in order."""
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in cls._FIELDS))

    def select(self, index: np.ndarray | slice) -> Nuclei:
        """The nuclei at ``index`` (an index array, mask or slice)."""
        return Nuclei(*(getattr(self, f)[index] for f in self._FIELDS))


def _kinds(layout: Layout) -> tuple[NucleusKind, NucleusKind, NucleusKind]:
    style = layout.style
    return style.stroma_nuclei, style.tumor_nuclei, style.lymphocytes


def nuclei_in_block_row(layout: Layout, block_row: int) -> Nuclei:
    """All nuclei seeded in one row of blocks, across the slide's width.

    Args:
        layout: The slide's content.
        block_row: Block index along y (block ``iy`` covers ``[iy, iy + 1) * BLOCK_UM``).

    Returns:
        The accepted nuclei, sorted by x (then in a fixed order).
    """
    seed = layout.params.seed
    n_blocks = math.ceil(layout.size_um[0] / BLOCK_UM)
    ix = np.arange(n_blocks)[:, None]
    parts: list[tuple[np.ndarray, ...]] = []
    for kind_id, kind in enumerate(_kinds(layout)):
        # stratified: one candidate per sub-cell of a g x g grid, so crowded nuclei rarely pile up
        grid = max(1, round(BLOCK_UM * math.sqrt(kind.density_per_um2)))
        k = np.arange(grid * grid)[None, :]

        def draw(attribute: int, kind_id: int = kind_id, k: np.ndarray = k) -> np.ndarray:
            return hash_uniform(seed, 16 * kind_id + attribute, ix, block_row, k).ravel()

        sub_x, sub_y = np.broadcast_to(k % grid, (n_blocks, k.size)), k // grid
        x = (ix + (sub_x + draw(0).reshape(n_blocks, -1)) / grid).ravel() * BLOCK_UM
        y = (block_row + (sub_y + draw(1).reshape(n_blocks, -1)) / grid).ravel() * BLOCK_UM
        inside = (x < layout.size_um[0]) & (y < layout.size_um[1])
        x, y = x[inside], y[inside]
        tissue, tumour, aggregate, til, _, _, fibre_mix = layout.fields.points(x, y)
        in_tissue = tissue > 0
        in_tumour = in_tissue & (tumour > 0)
        in_aggregate = in_tissue & (aggregate > 0)
        in_stroma = in_tissue & ~in_tumour & ~in_aggregate
        if kind_id == STROMA:
            probability = in_stroma.astype(np.float32)
        elif kind_id == TUMOR:
            probability = in_tumour.astype(np.float32)
        else:
            probability = np.where(in_aggregate, 1.0, 0.0) + til * (
                _LYMPHOCYTE_IN_STROMA * in_stroma + _LYMPHOCYTE_IN_TUMOR * in_tumour
            )
        keep = draw(2)[inside] < probability
        template = (draw(3)[inside] * _TEMPLATES_PER_KIND).astype(np.int64)
        if kind_id == STROMA:  # spindles lie along the local fibre direction
            angle = np.where(fibre_mix > 0.5, *layout.fibre_angles_rad)
            angle = angle + (draw(4)[inside] - 0.5) * 0.6
            bins = np.round(angle / math.pi * _STROMA_ORIENTATIONS).astype(np.int64)
            template = (bins % _STROMA_ORIENTATIONS) * 2 + template % 2
        amount = (0.8 + 0.4 * draw(5)[inside]).astype(np.float32)
        parts.append(
            (
                x[keep],
                y[keep],
                np.full(int(keep.sum()), kind_id, np.int8),
                template[keep],
                amount[keep],
            )
        )
    nuclei = Nuclei.concatenate([Nuclei(*part) for part in parts])
    return nuclei.select(np.argsort(nuclei.x_um, kind="stable"))


def _outline(kind: NucleusKind, rng: np.random.Generator, angle: float, mpp: float) -> np.ndarray:
    """One nucleus drawn at ``mpp``: ``(K, K)`` float32 stain, centre at ``K // 2``."""
    radius = rng.uniform(*kind.radius_um)
    elongation = rng.uniform(*kind.elongation)
    semi_long, semi_short = radius * math.sqrt(elongation), radius / math.sqrt(elongation)
    extent = semi_long * (1 + 1.1 * kind.irregularity) + 2 * mpp
    half = math.ceil(extent / mpp)
    offsets = (np.arange(-half, half + 1) * mpp).astype(np.float32)
    dy, dx = np.meshgrid(offsets, offsets, indexing="ij")
    u = dx * math.cos(angle) + dy * math.sin(angle)
    v = -dx * math.sin(angle) + dy * math.cos(angle)
    theta = np.arctan2(v, u)
    wobble = 1 + kind.irregularity * sum(
        rng.uniform(0.3, 1.0) / order * np.cos(order * theta + rng.uniform(0, 2 * math.pi))
        for order in (2, 3, 4)
    )
    r = np.sqrt((u / semi_long) ** 2 + (v / semi_short) ** 2) / wobble
    edge_um = max(mpp, 0.4)  # about one pixel of anti-aliasing, in µm
    inside = np.clip((1 - r) * semi_short / edge_um + 0.5, 0, 1)
    chromatin = 1 - kind.vesicular * np.clip(1 - r * r, 0, 1)  # pale centre, dark rim
    speckle = 1 + 0.18 * rng.standard_normal(inside.shape)
    stain = inside * chromatin * speckle
    if kind.vesicular > 0.3:  # a nucleolus
        nx, ny = rng.uniform(-0.3, 0.3, 2) * semi_short
        stain += 0.9 * np.clip((0.9 - np.hypot(dx - nx, dy - ny)) / edge_um + 0.5, 0, 1)
    stain = np.clip(stain, 0, None).astype(np.float32)
    used = np.flatnonzero((stain > 0).any(axis=0) | (stain > 0).any(axis=1))
    trim = min(int(used.min()), 2 * half - int(used.max())) if used.size else half
    return stain[trim : stain.shape[0] - trim, trim : stain.shape[1] - trim]


@dataclass(frozen=True, eq=False)
class TemplateBank:
    """Nucleus templates of every kind at one scan resolution.

    Attributes:
        templates: Per kind, ``(T, K, K)`` float32 stain amounts.
        max_half_px: Largest ``K // 2`` over kinds (how far a stamp reaches from its centre).
    """

    templates: tuple[np.ndarray, ...]
    max_half_px: int

    @classmethod
    def build(cls, layout: Layout, mpp: float) -> TemplateBank:
        """Draw the templates of ``layout``'s organ at ``mpp`` (fixed per seed)."""
        rng = np.random.default_rng(np.random.SeedSequence([layout.params.seed, 100]))
        banks = []
        for kind_id, kind in enumerate(_kinds(layout)):
            if kind_id == STROMA:
                angles = [
                    i // 2 * math.pi / _STROMA_ORIENTATIONS for i in range(2 * _STROMA_ORIENTATIONS)
                ]
            else:
                angles = list(rng.uniform(0, math.pi, _TEMPLATES_PER_KIND))
            shapes = [_outline(kind, rng, angle, mpp) * kind.hematoxylin for angle in angles]
            size = max(s.shape[0] for s in shapes)
            bank = np.zeros((len(shapes), size, size), dtype=np.float32)
            for i, s in enumerate(shapes):
                pad = (size - s.shape[0]) // 2
                bank[i, pad : pad + s.shape[0], pad : pad + s.shape[0]] = s
            banks.append(bank)
        return cls(tuple(banks), max(b.shape[1] // 2 for b in banks))


def stamp(
    nuclei: Nuclei,
    bank: TemplateBank,
    mpp: float,
    origin_px: tuple[int, int],
    size_px: tuple[int, int],
) -> np.ndarray:
    """Hematoxylin of the nuclei over a region of level-0 pixels.

    Args:
        nuclei: Candidates; those out of reach of the region are ignored.
        bank: Templates drawn at ``mpp``.
        mpp: Microns per pixel of the region.
        origin_px: ``(x, y)`` of the region's top-left pixel.
        size_px: ``(width, height)`` of the region.

    Returns:
        ``(height, width)`` float32 summed stain (overlapping nuclei add up).
    """
    margin = 2 * bank.max_half_px  # a stamp fits if its centre is >= half from the edge
    width, height = size_px[0] + 2 * margin, size_px[1] + 2 * margin
    col = np.floor(nuclei.x_um / mpp).astype(np.int64) - origin_px[0] + margin
    row = np.floor(nuclei.y_um / mpp).astype(np.int64) - origin_px[1] + margin
    indices, weights = [], []
    for kind_id, templates in enumerate(bank.templates):
        half = templates.shape[1] // 2
        sel = (
            (nuclei.kind == kind_id)
            & (col >= half) & (col < width - half)
            & (row >= half) & (row < height - half)
        )  # fmt: skip
        if not sel.any():
            continue
        offsets = np.arange(-half, half + 1)
        flat = (offsets[:, None] * width + offsets[None, :]).ravel()
        indices.append(((row[sel] * width + col[sel])[:, None] + flat[None, :]).ravel())
        weights.append((templates[nuclei.template[sel]] * nuclei.amount[sel, None, None]).ravel())
    if not indices:
        return np.zeros((size_px[1], size_px[0]), dtype=np.float32)
    canvas = np.bincount(np.concatenate(indices), np.concatenate(weights), minlength=width * height)
    canvas = canvas.reshape(height, width)[margin : -margin or None, margin : -margin or None]
    return canvas.astype(np.float32)
