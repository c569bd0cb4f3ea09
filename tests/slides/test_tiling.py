"""Tile geometry planned from physical resolution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from milkit.errors import TilingError
from milkit.slides.reader import SlideReader
from milkit.slides.tiling import TileSpec, plan_tile_spec, read_tile


class PyramidReader(SlideReader):
    """An in-memory pyramid: level k is level 0 block-averaged by ``downsamples[k]``."""

    def __init__(self, image: np.ndarray, *, mpp: float, downsamples: tuple[int, ...] = (1, 4, 16)):
        super().__init__(Path("memory.svs"), mpp=mpp)
        self._levels = [image]
        for factor in downsamples[1:]:
            h, w = image.shape[0] // factor, image.shape[1] // factor
            blocks = image[: h * factor, : w * factor].reshape(h, factor, w, factor, 3)
            self._levels.append(blocks.mean(axis=(1, 3)).astype(np.uint8))
        self._downsamples = tuple(float(d) for d in downsamples)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((lvl.shape[1], lvl.shape[0]) for lvl in self._levels)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._downsamples

    def _read(self, location_level0, level, size, out=None):
        ds = self._downsamples[level]
        x, y = round(location_level0[0] / ds), round(location_level0[1] / ds)
        return self._levels[level][y : y + size[1], x : x + size[0]]


def gradient_image(width: int, height: int) -> np.ndarray:
    """RGB image whose red channel encodes x and green encodes y: positions can be read back."""
    xs = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    ys = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return np.stack([xs, ys, np.full_like(xs, 128)], axis=-1).astype(np.uint8)


def test_level_within_tolerance_is_read_without_resampling() -> None:
    reader = PyramidReader(gradient_image(2048, 2048), mpp=0.2527)
    spec = plan_tile_spec(reader, target_mpp=0.25, tile_size_px=224)
    assert spec.level == 0
    assert spec.effective_mpp == pytest.approx(0.2527)
    assert spec.read_size_px == 224 and not spec.needs_resize
    assert spec.tile_size_level0 == 224
    assert spec.magnification == pytest.approx(10 / 0.2527)


def test_no_matching_level_reads_finer_level_and_downsamples() -> None:
    reader = PyramidReader(gradient_image(2048, 2048), mpp=0.25)  # levels at 0.25, 1.0, 4.0 µm/px
    spec = plan_tile_spec(reader, target_mpp=0.5, tile_size_px=224)
    assert spec.level == 0
    assert spec.effective_mpp == 0.5
    assert spec.read_size_px == 448 and spec.needs_resize
    assert spec.tile_size_level0 == 448
    # The physical side of a tile is tile_size_px * effective_mpp, whatever level is read.
    assert spec.tile_size_level0 * spec.slide_mpp == pytest.approx(
        spec.tile_size_px * spec.effective_mpp
    )


def test_coarser_exact_level_is_preferred() -> None:
    reader = PyramidReader(gradient_image(2048, 2048), mpp=0.25, downsamples=(1, 2, 8))
    spec = plan_tile_spec(reader, target_mpp=0.5, tile_size_px=256)
    assert (spec.level, spec.read_size_px, spec.tile_size_level0) == (1, 256, 512)


def test_intermediate_level_is_used_when_finer_than_target() -> None:
    reader = PyramidReader(gradient_image(4096, 4096), mpp=0.25)  # 0.25, 1.0, 4.0
    spec = plan_tile_spec(reader, target_mpp=2.0, tile_size_px=64)
    assert spec.level == 1  # 1.0 µm/px is the coarsest level still finer than 2.0
    assert spec.read_size_px == 128
    assert spec.tile_size_level0 == 512


def test_overlap_sets_stride() -> None:
    reader = PyramidReader(gradient_image(1024, 1024), mpp=0.5)
    spec = plan_tile_spec(reader, target_mpp=0.5, tile_size_px=224, overlap_px=32)
    assert spec.stride_level0 == 192


def test_target_finer_than_scan_is_an_error_naming_the_slide() -> None:
    reader = PyramidReader(gradient_image(512, 512), mpp=0.5)
    with pytest.raises(TilingError, match=r"memory\.svs.*coarser than the requested 0\.25"):
        plan_tile_spec(reader, target_mpp=0.25, tile_size_px=224)


@pytest.mark.parametrize(("size", "overlap"), [(0, 0), (224, 224), (224, -1)])
def test_bad_sizes_are_rejected(size: int, overlap: int) -> None:
    reader = PyramidReader(gradient_image(512, 512), mpp=0.5)
    with pytest.raises(TilingError, match="tile size"):
        plan_tile_spec(reader, target_mpp=0.5, tile_size_px=size, overlap_px=overlap)


def test_read_tile_covers_the_planned_physical_area() -> None:
    image = gradient_image(2048, 2048)
    reader = PyramidReader(image, mpp=0.25)
    spec = plan_tile_spec(reader, target_mpp=0.5, tile_size_px=128)
    tile = read_tile(reader, spec, (512, 1024))
    assert tile.shape == (128, 128, 3) and tile.dtype == np.uint8
    # The tile's corners carry the gradient values of the level-0 footprint's corners.
    footprint = image[1024 : 1024 + spec.tile_size_level0, 512 : 512 + spec.tile_size_level0]
    np.testing.assert_allclose(tile[0, 0, :2], footprint[0, 0, :2], atol=2)
    np.testing.assert_allclose(tile[-1, -1, :2], footprint[-1, -1, :2], atol=2)


def test_spec_json_round_trip_and_coords_attrs() -> None:
    reader = PyramidReader(gradient_image(1024, 1024), mpp=0.25)
    spec = plan_tile_spec(reader, target_mpp=0.5, tile_size_px=224)
    assert TileSpec.from_json(spec.to_json()) == spec
    attrs = spec.coords_attrs(reader.dimensions)
    assert attrs["patch_size_level0"] == 448 and attrs["patch_size"] == 224
    assert attrs["target_magnification"] == pytest.approx(20.0)
    assert attrs["level0_magnification"] == pytest.approx(40.0)
    assert (attrs["level0_width"], attrs["level0_height"]) == (1024, 1024)
