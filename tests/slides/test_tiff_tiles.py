"""The direct TIFF reader: OpenSlide's pixels exactly, each stored tile decoded once, OpenSlide
for everything it cannot read exactly, corrupt tiles named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from milkit.errors import SlideReadError
from milkit.slides.reader import (
    READER_ENV,
    OpenSlideReader,
    TiffTileReader,
    open_slide,
)
from milkit.synth import SlideParams, write_slide

APERIO = Path(__file__).resolve().parents[1] / "fixtures" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-level synthetic SVS, 2100 x 1700 px (256-px JPEG tiles, edge tiles cut)."""
    path = tmp_path_factory.mktemp("tiff") / "s.svs"
    return write_slide(path, SlideParams(seed=3), size_px=(2100, 1700)).slide_path


def _regions(
    reader: OpenSlideReader, level: int, n: int, seed: int
) -> list[tuple[int, int, int, int]]:
    """Random regions on whole level pixels, some past the edges, plus ones over 4 stored tiles."""
    rng = np.random.default_rng(seed)
    width, height = reader.level_dimensions[level]
    downsample = reader.level_downsamples[level]
    regions = [(250, 250, 20, 20), (0, 0, width, height), (width - 5, height - 7, 224, 224)]
    for _ in range(n):
        x, y = int(rng.integers(-50, width + 10)), int(rng.integers(-50, height + 10))
        regions.append((x, y, int(rng.integers(1, 500)), int(rng.integers(1, 500))))
    return [(round(x * downsample), round(y * downsample), w, h) for x, y, w, h in regions]


def _assert_same_pixels(path: Path, seed: int) -> TiffTileReader:
    direct, reference = open_slide(path), OpenSlideReader(path)
    assert isinstance(direct, TiffTileReader) and direct.backend == "tifffile"
    for level in range(direct.level_count):
        for x, y, w, h in _regions(reference, level, 40, seed):
            expected = reference.read_region((x, y), level, (w, h))
            np.testing.assert_array_equal(direct.read_region((x, y), level, (w, h)), expected)
    return direct


def test_synthetic_pixels_equal_openslide_at_every_level(synthetic: Path) -> None:
    direct = _assert_same_pixels(synthetic, seed=0)
    assert set(direct._levels) == set(range(direct.level_count))  # every level read directly
    # a level coordinate between pixels is OpenSlide's to interpolate
    reference = OpenSlideReader(synthetic)
    np.testing.assert_array_equal(
        direct.read_region((402, 301), 1, (50, 40)), reference.read_region((402, 301), 1, (50, 40))
    )


def test_real_aperio_pixels_equal_openslide() -> None:
    if not APERIO.is_file():
        pytest.skip(f"{APERIO} is missing (copy it from ../shared/fixtures)")
    _assert_same_pixels(APERIO, seed=1)


def test_each_stored_tile_is_decoded_once_for_neighbouring_reads(synthetic: Path) -> None:
    reader = open_slide(synthetic)
    assert isinstance(reader, TiffTileReader)
    for x in range(0, 1792, 224):  # a row of 224-px tiles over 256-px stored tiles
        reader.read_region((x, 100), 0, (224, 224))
    assert reader._decoder.decoded == 7 * 2  # 7 stored columns, 2 stored rows


def test_a_corrupt_tile_fails_only_the_reads_that_need_it(synthetic: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.svs"
    broken.write_bytes(synthetic.read_bytes())
    with tifffile.TiffFile(broken) as tiff:
        page = tiff.pages[0]
        offset, count = page.dataoffsets[3], page.databytecounts[3]  # level 0, tile (3, 0)
    with broken.open("r+b") as handle:
        handle.seek(offset)
        handle.write(b"\0" * count)
    reader = open_slide(broken)
    with pytest.raises(SlideReadError, match=r"broken\.svs: cannot read region at level-0 \(x=800"):
        reader.read_region((800, 10), 0, (100, 100))
    good = OpenSlideReader(synthetic).read_region((0, 0), 0, (500, 200))
    np.testing.assert_array_equal(reader.read_region((0, 0), 0, (500, 200)), good)


def test_other_tiffs_and_the_switch_use_openslide(
    synthetic: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lzw = tmp_path / "lzw.tif"  # a tiled pyramid in a compression the direct reader leaves alone
    image = np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)
    tifffile.imwrite(lzw, image, tile=(256, 256), compression="lzw", photometric="rgb")
    reader = open_slide(lzw, mpp=0.5)
    assert reader.backend == "openslide"
    region = reader.read_region((300, 400), 0, (300, 300))
    np.testing.assert_array_equal(region[:112, :212], image[400:, 300:])  # as written
    assert (region[112:] == 255).all() and (region[:, 212:] == 255).all()  # outside: white
    monkeypatch.setenv(READER_ENV, "openslide")
    assert type(open_slide(synthetic)) is OpenSlideReader
