"""Synthetic tiles of known tissue class for k-NN evaluation (see :mod:`milkit.ssl.knn`).

`make_knn_cohort` writes and tiles synthetic slides (:mod:`milkit.synth`) that show every
tissue class; `synthetic_tile_labels` picks tiles of known class from their ground truth:
background on glass, and stroma, tumour or lymphocyte aggregate when that class fills a tile.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from milkit.errors import ConfigError
from milkit.pipeline.tile import TilingOptions, run_tiling
from milkit.slides.tissue import grid_coords
from milkit.ssl.tiles import SlideTiles, find_slide_tiles
from milkit.synth.cohort import write_slide
from milkit.synth.layout import ONE_LAB_STAIN_SPREAD, SlideParams
from milkit.synth.organs import ORGANS
from milkit.synth.truth import AGGREGATE, BACKGROUND, STROMA, TUMOR, load_truth, tile_truth

__all__ = ["KNN_CLASSES", "make_knn_cohort", "synthetic_tile_labels"]

#: Classes of the synthetic k-NN task, in label order (labels are these truth class values).
KNN_CLASSES = (BACKGROUND, STROMA, TUMOR, AGGREGATE)


def synthetic_tile_labels(
    coords_dir: str | Path,
    truth_dir: str | Path,
    *,
    slides_dir: str | Path | None = None,
    max_per_class: int = 40,
    min_purity: float = 0.9,
    seed: int = 0,
) -> list[tuple[SlideTiles, np.ndarray]]:
    """Tiles of known class from a synthetic cohort, for k-NN evaluation.

    Candidates lie on a grid of the cohort's tiles at half their stride (so the small
    lymphocyte aggregates hold enough whole tiles); a tile is labelled stroma, tumour or
    lymphocyte aggregate when that class covers at least ``min_purity`` of it, background when
    it lies wholly on glass. Artefacts are left out.

    Args:
        coords_dir: Coordinate files of the cohort (``milkit tile`` output): the slides and
            their tile geometry.
        truth_dir: Truth files ``<slide_id>.h5`` (:func:`milkit.synth.load_truth`).
        slides_dir: Folder of the slides (see `find_slide_tiles`).
        max_per_class: Tiles drawn at most per class and slide.
        min_purity: Area fraction of its class a tissue tile must have. With 0.6, up to 40 % of
            a "tumour" tile may be an aggregate: a supervised tiny ViT then reaches only
            0.93 k-NN accuracy, which leaves no room to compare encoders.
        seed: Seed of the draw.

    Returns:
        Per slide: its labelled tiles and ``(n,)`` int64 labels, indices into `KNN_CLASSES`.

    Raises:
        ConfigError: If ``min_purity`` is outside (0.5, 1] or no labelled tile is found.
    """
    if not 0.5 < min_purity <= 1.0:
        raise ConfigError(
            f"synthetic_tile_labels: min_purity={min_purity} must lie in (0.5, 1] so a tile "
            "has one majority class."
        )
    rng = np.random.default_rng(seed)
    labelled = []
    for slide in find_slide_tiles(coords_dir, slides_dir):
        truth = load_truth(Path(truth_dir) / f"{slide.slide_id}.h5")
        spec = slide.tile_spec
        grid = grid_coords(
            (int(truth.attrs["level0_width"]), int(truth.attrs["level0_height"])),
            tile_size_level0=spec.tile_size_level0,
            stride_level0=max(1, spec.stride_level0 // 2),
        )
        fractions = tile_truth(truth, grid, spec.tile_size_level0).class_fractions
        coords, labels = [], []
        for label, value in enumerate(KNN_CLASSES):
            threshold = 1.0 if value == BACKGROUND else min_purity
            candidates = grid[fractions[:, value] >= threshold - 1e-6]
            take = rng.permutation(len(candidates))[:max_per_class]
            coords.append(candidates[np.sort(take)])
            labels.append(np.full(len(take), label, dtype=np.int64))
        if sum(len(c) for c in coords):
            tiles = SlideTiles(slide.slide_id, slide.slide_path, spec, np.concatenate(coords))
            labelled.append((tiles, np.concatenate(labels)))
    if not labelled:
        raise ConfigError(f"{coords_dir}: no tile of a known class; is this a synthetic cohort?")
    return labelled


def make_knn_cohort(
    out_dir: str | Path,
    *,
    n_slides: int = 12,
    size_px: int = 2048,
    mpp: float = 1.0,
    tile_size_px: int = 64,
    seed: int = 0,
    stain_spread: float = ONE_LAB_STAIN_SPREAD,
    workers: int = 1,
) -> Path:
    """Write and tile synthetic slides in which every tissue class occurs.

    Every slide has tumour (30 % of the tissue) and lymphocyte aggregates, no artefacts. Organs
    (stain palettes, tumour patterns) take turns (slide ``i`` is organ ``i mod 3``), so the
    even and the odd slides of `knn_by_slide` both hold every organ. Tiles keep at least half
    tissue.

    Args:
        out_dir: Folder for ``slides/``, ``truth/`` and ``tiles/`` (``tiles/coords`` inside).
        n_slides: Number of slides.
        size_px: Side of each slide's level 0 in pixels.
        mpp: Scan resolution, which is also the tiling resolution.
        tile_size_px: Tile side in pixels.
        seed: Base seed of the slides.
        stain_spread: Per-slide stain strength spread (`milkit.synth.SlideParams`).
        workers: Slides tiled in parallel.

    Returns:
        The coordinate folder ``out_dir/tiles/coords``.
    """
    out_dir = Path(out_dir)
    organs = sorted(ORGANS)
    slides = []
    for i in range(n_slides):
        params = SlideParams(
            seed=seed + i,
            task=organs[i % len(organs)],
            tumor=True,
            tumor_fraction=0.3,
            aggregates=True,
            artefacts=False,
            stain_spread=stain_spread,
        )
        info = write_slide(
            out_dir / "slides" / f"slide_{i:03d}.svs",
            params,
            mpp=mpp,
            size_px=(size_px, size_px),
            truth_path=out_dir / "truth" / f"slide_{i:03d}.h5",
        )
        slides.append(info.slide_path)
    options = TilingOptions(target_mpp=mpp, tile_size_px=tile_size_px, min_tissue=0.5)
    run_tiling(slides, out_dir / "tiles", options, workers=workers)
    return out_dir / "tiles" / "coords"
