"""Slide readers: plain images, mpp metadata and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from milkit.errors import MissingMppError, SlideOpenError, SlideReadError
from milkit.slides.reader import ImageReader, _mpp_from_properties, open_slide


def write_png(path: Path, width: int = 300, height: int = 200) -> np.ndarray:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def test_plain_image_needs_explicit_mpp(tmp_path: Path) -> None:
    path = tmp_path / "scan.png"
    write_png(path)
    reader = open_slide(path)
    assert isinstance(reader, ImageReader)
    with pytest.raises(MissingMppError, match=r"scan\.png.*--slide-mpp"):
        _ = reader.mpp
    assert open_slide(path, mpp=0.5).mpp == 0.5


def test_plain_image_regions_and_white_outside(tmp_path: Path) -> None:
    path = tmp_path / "scan.png"
    pixels = write_png(path)
    with open_slide(path, mpp=0.5) as reader:
        assert reader.dimensions == (300, 200) and reader.level_count == 1
        region = reader.read_region((250, 150), 0, (100, 100))
        np.testing.assert_array_equal(region[:50, :50], pixels[150:200, 250:300])
        assert (region[50:, :] == 255).all() and (region[:, 50:] == 255).all()


def test_tiff_resolution_tags_give_mpp(tmp_path: Path) -> None:
    path = tmp_path / "flat.tif"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(path, dpi=(2.54e4 / 0.5, 2.54e4 / 0.5))
    with open_slide(path) as reader:
        assert reader.mpp == pytest.approx(0.5, rel=1e-3)


def test_thumbnail_keeps_aspect_ratio(tmp_path: Path) -> None:
    path = tmp_path / "scan.png"
    write_png(path, 600, 300)
    with open_slide(path, mpp=0.5) as reader:
        thumb = reader.thumbnail(max_size_px=100)
        assert thumb.shape == (50, 100, 3)
        assert reader.thumbnail(max_size_px=1000, mpp=2.0).shape == (75, 150, 3)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.svs", b"", "empty"),
        ("notes.svs", b"patient 12, stained 2024-01-01\n", "text file"),
        ("garbage.svs", bytes(range(256)) * 8, "OpenSlide|damaged"),
        ("broken.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not a readable image"),
    ],
)
def test_bad_files_raise_open_errors_naming_the_file(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SlideOpenError, match=message) as info:
        open_slide(path)
    assert name in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SlideOpenError, match="no such file"):
        open_slide(tmp_path / "absent.svs")


def test_bad_level_and_size(tmp_path: Path) -> None:
    path = tmp_path / "scan.png"
    write_png(path)
    with open_slide(path, mpp=0.5) as reader:
        with pytest.raises(SlideReadError, match="level 3 does not exist"):
            reader.read_region((0, 0), 3, (10, 10))
        with pytest.raises(SlideReadError, match="positive"):
            reader.read_region((0, 0), 0, (0, 10))


@pytest.mark.parametrize(
    ("properties", "expected"),
    [
        ({"openslide.mpp-x": "0.2527"}, 0.2527),
        ({"aperio.MPP": "0.5"}, 0.5),
        ({"tiff.XResolution": "40000", "tiff.ResolutionUnit": "centimeter"}, 0.25),
        ({"tiff.XResolution": "101600", "tiff.ResolutionUnit": "inch"}, 0.25),
        ({"tiff.XResolution": "72", "tiff.ResolutionUnit": "none"}, None),
        ({"openslide.mpp-x": "0"}, None),
        ({}, None),
    ],
)
def test_mpp_sources(properties: dict[str, str], expected: float | None) -> None:
    value = _mpp_from_properties(properties)
    assert value == (pytest.approx(expected) if expected is not None else None)


def test_invalid_mpp_override(tmp_path: Path) -> None:
    path = tmp_path / "scan.png"
    write_png(path)
    with pytest.raises(MissingMppError, match="positive"):
        open_slide(path, mpp=-1.0)
