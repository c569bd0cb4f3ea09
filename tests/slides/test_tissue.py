"""Tissue detection, tile tissue fractions, grids and overlays on synthetic thumbnails.

Scenes are described in µm and rendered at a chosen mpp, so the same scene can be drawn at
two thumbnail scales.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from milkit.errors import ConfigError, TilingError
from milkit.slides.overlay import MASK_COLOR, TILE_COLOR, draw_overlay, save_mask_png, save_png
from milkit.slides.tissue import detect_tissue, grid_coords, tissue_fraction_grid

SCENE_UM = (3200.0, 4000.0)  # (height, width) of the field of view in µm, 200 x 250 px at 16 µm/px
GLASS = (245, 245, 245)
PINK = (215, 140, 190)
PALE_PINK = (235, 215, 228)

Shape = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (y_um, x_um) -> bool mask


def positions_um(mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """``(H, W)`` y and x of pixel centres in µm."""
    height, width = round(SCENE_UM[0] / mpp), round(SCENE_UM[1] / mpp)
    y = (np.arange(height) + 0.5) * mpp
    x = (np.arange(width) + 0.5) * mpp
    return np.meshgrid(y, x, indexing="ij")


def disc(cy: float, cx: float, radius: float) -> Shape:
    return lambda y, x: (y - cy) ** 2 + (x - cx) ** 2 <= radius**2


def box(y0: float, y1: float, x0: float, x1: float) -> Shape:
    return lambda y, x: (y >= y0) & (y < y1) & (x >= x0) & (x < x1)


def render(
    layers: list[tuple[Shape, tuple[int, int, int]]],
    mpp: float,
    *,
    background: tuple[int, int, int] = GLASS,
    noise: float = 4.0,
    seed: int = 0,
) -> np.ndarray:
    """``(H, W, 3)`` uint8: layers painted in order on noisy glass, slightly blurred like a scan."""
    y, x = positions_um(mpp)
    image = np.empty(y.shape + (3,), dtype=np.float64)
    image[:] = background
    for shape, color in layers:
        image[shape(y, x)] = color
    image = ndi.gaussian_filter(image, sigma=(0.7, 0.7, 0))
    image += np.random.default_rng(seed).normal(0.0, noise, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def truth(shape: Shape, mpp: float) -> np.ndarray:
    return shape(*positions_um(mpp))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def ellipse(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    return ((y - 1500) / 1000) ** 2 + ((x - 2000) / 1400) ** 2 <= 1


SMALL_HOLE = disc(1500, 1400, 15)  # 700 µm², below the default 1,000 µm² hole limit: filled
LUMEN = disc(1500, 1700, 60)  # 11,300 µm²: a real glass hole (gland lumen, fat), kept
BIG_HOLE = disc(1500, 2500, 300)  # 283,000 µm², kept


@pytest.mark.parametrize("mpp", [4.0, 8.0])
def test_blob_with_holes_small_holes_filled_big_holes_kept(mpp: float) -> None:
    thumbnail = render(
        [(ellipse, PINK), (SMALL_HOLE, GLASS), (LUMEN, GLASS), (BIG_HOLE, GLASS)], mpp
    )
    result = detect_tissue(thumbnail, mpp=mpp)
    expected = truth(ellipse, mpp) & ~truth(BIG_HOLE, mpp) & ~truth(LUMEN, mpp)

    assert result.mask.shape == thumbnail.shape[:2] and result.mask.dtype == bool
    assert iou(result.mask, expected) >= 0.95
    assert result.mask[truth(SMALL_HOLE, mpp)].all()
    assert not result.mask[truth(disc(1500, 1700, 45), mpp)].any()
    assert not result.mask[truth(disc(1500, 2500, 250), mpp)].any()
    assert result.mpp == mpp
    assert result.tissue_area_um2 == pytest.approx(result.mask.sum() * mpp**2)


def test_small_hole_is_found_before_it_is_filled() -> None:
    thumbnail = render([(ellipse, PINK), (SMALL_HOLE, GLASS)], 4.0)
    unfilled = detect_tissue(thumbnail, mpp=4.0, max_hole_area_um2=0.0).mask
    assert unfilled[truth(SMALL_HOLE, 4.0)].mean() <= 0.2  # open, but for its rim


@pytest.mark.parametrize("color", [(150, 60, 140), PINK, PALE_PINK])
def test_outlines_of_fragmented_tissue_have_no_fringe(color: tuple[int, int, int]) -> None:
    # 25 pieces of 120-160 µm radius: a one-pixel fringe would add 10-15 % of their area.
    pieces = [
        disc(500 + 550 * i, 500 + 700 * j, 120 + 20 * ((i + j) % 3))
        for i in range(5)
        for j in range(5)
    ]

    def fragments(y: np.ndarray, x: np.ndarray) -> np.ndarray:
        return np.any([piece(y, x) for piece in pieces], axis=0)

    mask = detect_tissue(render([(fragments, color)], 8.0), mpp=8.0).mask
    expected = truth(fragments, 8.0)
    assert iou(mask, expected) >= 0.97
    assert mask.sum() == pytest.approx(expected.sum(), rel=0.03)


def test_haematoxylin_dark_tissue_is_not_taken_for_pen() -> None:
    # Dense nuclei (lymphocyte aggregate, tumour) are blue-violet, hue about 245°, saturated.
    aggregate = disc(1500, 2000, 400)
    thumbnail = render([(ellipse, PINK), (aggregate, (70, 60, 170))], 16.0)
    mask = detect_tissue(thumbnail, mpp=16.0).mask
    assert mask[truth(aggregate, 16.0)].all()
    assert iou(mask, truth(ellipse, 16.0)) >= 0.95


def test_faint_tissue_is_detected() -> None:
    thumbnail = render([(ellipse, PALE_PINK)], 16.0)
    result = detect_tissue(thumbnail, mpp=16.0)
    assert iou(result.mask, truth(ellipse, 16.0)) >= 0.8


def test_faint_tissue_survives_dark_tissue_on_the_same_slide() -> None:
    dark, faint = disc(1500, 1000, 700), disc(1500, 3000, 700)
    thumbnail = render([(dark, (170, 80, 150)), (faint, PALE_PINK)], 16.0)
    result = detect_tissue(thumbnail, mpp=16.0)

    # Otsu alone splits dark from faint tissue; the ceiling keeps the faint piece.
    assert result.otsu_threshold > result.threshold
    assert iou(result.mask, truth(dark, 16.0) | truth(faint, 16.0)) >= 0.8
    assert result.mask[truth(faint, 16.0)].mean() >= 0.8


def test_borders_and_pen_on_glass_are_not_tissue_but_tissue_under_pen_is() -> None:
    tissue = disc(1500, 2200, 700)
    border = box(0, 3200, 0, 250)
    blue_pen = box(2600, 2700, 400, 3800)
    green_pen = box(300, 400, 400, 3800)
    grey_marker = box(400, 2500, 3700, 3800)
    pen_on_tissue = box(1475, 1525, 1800, 2600)
    thumbnail = render(
        [
            (tissue, PINK),
            (border, (12, 12, 12)),
            (blue_pen, (50, 70, 170)),
            (green_pen, (60, 140, 80)),
            (grey_marker, (70, 70, 72)),
            (pen_on_tissue, (45, 60, 165)),
        ],
        16.0,
    )
    mask = detect_tissue(thumbnail, mpp=16.0).mask

    for artefact in (border, blue_pen, green_pen, grey_marker):
        assert not mask[truth(artefact, 16.0)].any()
    assert iou(mask, truth(tissue, 16.0)) >= 0.95
    assert mask[truth(tissue, 16.0)].mean() >= 0.98


@pytest.mark.parametrize("background", [GLASS, (222, 222, 222), (250, 240, 215)])
def test_blank_slide_gives_an_empty_mask(background: tuple[int, int, int]) -> None:
    thumbnail = render([], 16.0, background=background, noise=5.0)
    result = detect_tissue(thumbnail, mpp=16.0)
    assert not result.mask.any()
    assert result.threshold >= 0.04  # the floor, not Otsu's split of the noise


def test_mask_does_not_depend_on_thumbnail_scale() -> None:
    # Areas chosen so no threshold in pixels could pass both scales: the small disc has more
    # pixels at 4 µm/px (24) than the kept one at 8 µm/px (18).
    too_small = disc(2600, 600, 11)  # 380 µm² < 500 µm² default minimum
    big_enough = disc(2600, 3400, 19)  # 1,130 µm²
    layers = [(ellipse, PINK), (SMALL_HOLE, GLASS), (too_small, PINK), (big_enough, PINK)]
    fine = detect_tissue(render(layers, 4.0), mpp=4.0).mask
    coarse = detect_tissue(render(layers, 8.0), mpp=8.0).mask

    fine_at_coarse = fine.reshape(coarse.shape[0], 2, coarse.shape[1], 2).mean(axis=(1, 3)) >= 0.5
    assert iou(fine_at_coarse, coarse) >= 0.9
    for mask, mpp in ((fine, 4.0), (coarse, 8.0)):
        assert not mask[truth(too_small, mpp)].any()
        assert mask[truth(big_enough, mpp)].all()
        assert mask[truth(SMALL_HOLE, mpp)].all()


def test_detect_tissue_rejects_bad_input() -> None:
    thumbnail = render([], 16.0)
    with pytest.raises(ConfigError, match="uint8"):
        detect_tissue(thumbnail.astype(np.float32), mpp=16.0)
    with pytest.raises(ConfigError, match=r"\(H, W, 3\)"):
        detect_tissue(thumbnail[..., :2], mpp=16.0)
    with pytest.raises(ConfigError, match="mpp"):
        detect_tissue(thumbnail, mpp=0.0)
    with pytest.raises(ConfigError, match="min_threshold"):
        detect_tissue(thumbnail, mpp=16.0, min_threshold=0.2, max_threshold=0.1)
    with pytest.raises(ConfigError, match="edge_fraction"):
        detect_tissue(thumbnail, mpp=16.0, edge_fraction=1.5)
    with pytest.raises(ConfigError, match="level_sigma_px"):
        detect_tissue(thumbnail, mpp=16.0, level_sigma_px=0.0)


def brute_force_fractions(
    mask: np.ndarray, downsample: float, coords: np.ndarray, tile_size: int
) -> np.ndarray:
    """Per-tile loop over the documented footprint rule (rounded edges, outside = no tissue)."""
    height, width = mask.shape
    out = []
    for x, y in coords:
        c0, c1 = round(x / downsample), round((x + tile_size) / downsample)
        r0, r1 = round(y / downsample), round((y + tile_size) / downsample)
        c1, r1 = max(c1, c0 + 1), max(r1, r0 + 1)
        covered = mask[max(r0, 0) : min(r1, height), max(c0, 0) : min(c1, width)].sum()
        out.append(covered / ((c1 - c0) * (r1 - r0)))
    return np.array(out)


@pytest.mark.parametrize("downsample", [1.0, 3.7, 16.0, 64.0])
def test_tissue_fraction_grid_matches_brute_force(downsample: float) -> None:
    rng = np.random.default_rng(int(downsample * 10))
    mask = ndi.binary_opening(rng.random((61, 83)) > 0.4)
    tile_size = int(rng.integers(1, 8) * downsample) + 1
    # Corners all over the mask and beyond its edges, including negative ones.
    extent = np.array([83, 61]) * downsample
    coords = rng.integers(-tile_size, (extent + tile_size).astype(int), size=(500, 2)).astype(
        np.int64
    )

    fractions = tissue_fraction_grid(
        mask, mask_downsample=downsample, coords_level0=coords, tile_size_level0=tile_size
    )

    assert fractions.shape == (500,) and fractions.dtype == np.float32
    np.testing.assert_allclose(
        fractions, brute_force_fractions(mask, downsample, coords, tile_size), atol=1e-6
    )
    assert ((fractions >= 0) & (fractions <= 1)).all()


def test_tissue_fraction_grid_is_the_level0_coverage_when_tiles_align() -> None:
    rng = np.random.default_rng(1)
    mask = rng.random((20, 30)) > 0.5
    level0 = np.kron(mask, np.ones((4, 4), dtype=bool))  # the mask at downsample 4
    padded = np.pad(level0, 32)  # outside the slide: no tissue
    # Corners on the mask grid, some of them beyond the edges.
    coords = (
        np.stack([rng.integers(-6, 33, 200), rng.integers(-6, 23, 200)], axis=1).astype(np.int64)
        * 4
    )
    fractions = tissue_fraction_grid(
        mask, mask_downsample=4.0, coords_level0=coords, tile_size_level0=12
    )
    expected = [padded[y + 32 : y + 44, x + 32 : x + 44].mean() for x, y in coords]
    np.testing.assert_allclose(fractions, expected, atol=1e-6)


def test_tissue_fraction_grid_edge_cases() -> None:
    mask = np.ones((4, 4), dtype=bool)
    empty = tissue_fraction_grid(
        mask, mask_downsample=2.0, coords_level0=np.zeros((0, 2), np.int64), tile_size_level0=4
    )
    assert empty.shape == (0,)
    with pytest.raises(TilingError, match=r"\(N, 2\)"):
        tissue_fraction_grid(
            mask, mask_downsample=2.0, coords_level0=np.zeros((3, 3), np.int64), tile_size_level0=4
        )
    with pytest.raises(TilingError, match="tile_size_level0"):
        tissue_fraction_grid(
            mask, mask_downsample=2.0, coords_level0=np.zeros((1, 2), np.int64), tile_size_level0=0
        )
    with pytest.raises(ConfigError, match="mask_downsample"):
        tissue_fraction_grid(
            mask, mask_downsample=0.0, coords_level0=np.zeros((1, 2), np.int64), tile_size_level0=4
        )


@pytest.mark.parametrize(
    ("width", "height", "tile", "stride"),
    [(1000, 700, 256, 256), (1000, 700, 256, 200), (513, 300, 256, 128)],
)
def test_grid_coords_inside_and_row_major(width: int, height: int, tile: int, stride: int) -> None:
    coords = grid_coords((width, height), tile_size_level0=tile, stride_level0=stride)
    n_x, n_y = (width - tile) // stride + 1, (height - tile) // stride + 1

    assert coords.dtype == np.int64 and coords.shape == (n_x * n_y, 2)
    assert (
        (coords >= 0).all()
        and (coords[:, 0] + tile <= width).all()
        and (coords[:, 1] + tile <= height).all()
    )
    assert np.array_equal(coords, coords[np.lexsort((coords[:, 0], coords[:, 1]))])
    assert np.array_equal(coords[:n_x, 0], np.arange(n_x) * stride) and (coords[:n_x, 1] == 0).all()


def test_grid_coords_edge_cases() -> None:
    assert grid_coords((100, 100), tile_size_level0=256, stride_level0=256).shape == (0, 2)
    assert grid_coords((256, 256), tile_size_level0=256, stride_level0=256).tolist() == [[0, 0]]
    with pytest.raises(TilingError, match="stride_level0"):
        grid_coords((1000, 1000), tile_size_level0=256, stride_level0=0)


def test_draw_overlay_draws_contour_and_tile_outlines() -> None:
    thumbnail = np.full((60, 80, 3), 240, dtype=np.uint8)
    mask = np.zeros((60, 80), dtype=bool)
    mask[10:40, 20:60] = True
    original = thumbnail.copy()
    # Tiles of 40 level-0 px at downsample 4 -> 10 thumbnail px; the second hangs over the edge.
    coords = np.array([[120, 80], [300, 200]], dtype=np.int64)

    image = draw_overlay(
        thumbnail, mask, coords_level0=coords, tile_size_level0=40, thumbnail_downsample=4.0
    )

    assert image.shape == thumbnail.shape and image.dtype == np.uint8
    assert np.array_equal(thumbnail, original)
    assert (image[10, 30:50] == MASK_COLOR).all() and (image[9, 30:50] == MASK_COLOR).all()
    assert (image[25, 19] == MASK_COLOR).all() and (image[25, 20] == MASK_COLOR).all()
    # The first tile spans thumbnail rows 20..29 and columns 30..39; its inside is untouched.
    for row, col in [(20, 35), (29, 35), (25, 30), (25, 39)]:
        assert (image[row, col] == TILE_COLOR).all()
    assert (image[21:29, 31:39] == 240).all()
    assert (image[50, 75:80] == TILE_COLOR).all() and (image[50:60, 75] == TILE_COLOR).all()
    assert (image[55, 76:80] == 240).all()  # the clipped tile has no right edge in the image
    assert (image[45, 10] == 240).all()  # neither contour nor outline


def test_draw_overlay_rejects_a_mask_of_another_size() -> None:
    with pytest.raises(ConfigError, match="differs"):
        draw_overlay(
            np.zeros((10, 10, 3), np.uint8),
            np.zeros((5, 5), bool),
            coords_level0=np.zeros((0, 2), np.int64),
            tile_size_level0=4,
            thumbnail_downsample=1.0,
        )


def test_save_png_and_mask_png_round_trip(tmp_path) -> None:
    image = np.random.default_rng(0).integers(0, 256, size=(12, 9, 3), dtype=np.uint8)
    mask = np.zeros((12, 9), dtype=bool)
    mask[3:7, 2:5] = True
    save_png(tmp_path / "a" / "overlay.png", image)
    save_mask_png(tmp_path / "mask.png", mask)

    assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / "overlay.png")), image)
    saved = np.asarray(Image.open(tmp_path / "mask.png"))
    assert saved.dtype == np.uint8 and set(np.unique(saved)) == {0, 255}
    assert np.array_equal(saved == 255, mask)
    with pytest.raises(ConfigError, match="uint8"):
        save_png(tmp_path / "bad.png", image.astype(np.float32))
