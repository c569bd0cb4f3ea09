"""Streaming writer of pyramidal, tiled, JPEG-compressed Aperio-style TIFFs (``.svs``).

Level 0 is rendered one row of tiles at a time (the next row in a background thread while the
current one is compressed) and handed to tifffile as a stream of tiles; only a 4x downsampled
copy is kept (for the lower levels), so memory stays at about 1/16 of the slide's raw size plus
two rows of tiles. Every level is a separate, tiled top-level IFD.
The first page carries an Aperio ImageDescription (``|AppMag = ..|MPP = ..``), from which
OpenSlide reports ``openslide.mpp-x``; TIFF resolution tags (centimetres) say the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from milkit.atomic import atomic_write
from milkit.errors import ConfigError

#: Downsample between consecutive pyramid levels.
LEVEL_FACTOR = 4
#: Levels are added until one's longest side falls below this many pixels.
MIN_LEVEL_SIDE_PX = 512

RegionRenderer = Callable[[tuple[int, int], tuple[int, int]], np.ndarray]


def level_dimensions(dimensions: tuple[int, int]) -> list[tuple[int, int]]:
    """``(width, height)`` of every level: downsample 4 each until a level is < 512 px."""
    levels = [dimensions]
    while max(levels[-1]) >= MIN_LEVEL_SIDE_PX and min(levels[-1]) >= LEVEL_FACTOR:
        width, height = levels[-1]
        levels.append((width // LEVEL_FACTOR, height // LEVEL_FACTOR))
    return levels


def _downsample(strip: np.ndarray) -> np.ndarray:
    """Mean of 4 x 4 pixel blocks of ``(H, W, 3)`` uint8 (remainders dropped)."""
    rows, cols = strip.shape[0] // LEVEL_FACTOR, strip.shape[1] // LEVEL_FACTOR
    blocks = strip[: rows * LEVEL_FACTOR, : cols * LEVEL_FACTOR].reshape(
        rows, LEVEL_FACTOR, cols, LEVEL_FACTOR, 3
    )
    total = blocks.sum(axis=(1, 3), dtype=np.uint16)
    return ((total + LEVEL_FACTOR**2 // 2) // LEVEL_FACTOR**2).astype(np.uint8)


def _tiles(strip: np.ndarray, tile_px: int) -> Iterator[np.ndarray]:
    """Tiles of one row of tiles, left to right, edge tiles padded with white."""
    for x in range(0, strip.shape[1], tile_px):
        tile = strip[:, x : x + tile_px]
        if tile.shape[:2] != (tile_px, tile_px):
            padded = np.full((tile_px, tile_px, 3), 255, dtype=np.uint8)
            padded[: tile.shape[0], : tile.shape[1]] = tile
            tile = padded
        yield tile


def _aperio_description(dimensions: tuple[int, int], mpp: float, tile_px: int, quality: int) -> str:
    width, height = dimensions
    return (
        f"Aperio Image Library v12.0.0 \n{width}x{height} [0,0 {width}x{height}] "
        f"({tile_px}x{tile_px}) JPEG/RGB Q={quality}|AppMag = {10 / mpp:g}|MPP = {mpp:.6g}"
        "|Software = milkit.synth"
    )


def write_pyramid(
    path: str | Path,
    render: RegionRenderer,
    dimensions: tuple[int, int],
    mpp: float,
    *,
    tile_px: int = 256,
    chunk_px: int = 512,
    quality: int = 90,
) -> list[tuple[int, int]]:
    """Write a slide rendered region by region as a pyramidal SVS, atomically.

    Args:
        path: Output file (written as ``<path>.tmp`` and renamed when complete).
        render: ``render((x, y), (width, height)) -> (height, width, 3) uint8`` in level-0 px.
        dimensions: ``(width, height)`` of level 0.
        mpp: Microns per level-0 pixel, recorded in the file.
        tile_px: Side of the TIFF tiles.
        chunk_px: Width in pixels of the regions asked of ``render`` (bounds working memory).
        quality: JPEG quality (1-100).

    Returns:
        ``(width, height)`` of every level written.

    Raises:
        ConfigError: ``tile_px`` is not a positive multiple of 16.
    """
    if tile_px <= 0 or tile_px % 16:
        raise ConfigError(f"TIFF tile size must be a positive multiple of 16, got {tile_px}.")
    path = Path(path)
    levels = level_dimensions(dimensions)
    width, height = dimensions
    # level 1 (written only if the slide is large enough to need it)
    lower = np.empty((height // LEVEL_FACTOR, width // LEVEL_FACTOR, 3), dtype=np.uint8)

    def render_strip(y: int) -> np.ndarray:
        strip = np.empty((min(tile_px, height - y), width, 3), dtype=np.uint8)
        for x in range(0, width, chunk_px):
            strip[:, x : x + chunk_px] = render((x, y), (min(chunk_px, width - x), strip.shape[0]))
        return strip

    def level0_tiles() -> Iterator[np.ndarray]:
        # the next row of tiles renders in a thread while tifffile compresses this one
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(render_strip, 0)
            for y in range(0, height, tile_px):
                strip = pending.result()
                if y + tile_px < height:
                    pending = pool.submit(render_strip, y + tile_px)
                small = _downsample(strip)
                lower[y // LEVEL_FACTOR : y // LEVEL_FACTOR + small.shape[0]] = small
                yield from _tiles(strip, tile_px)

    def array_tiles(image: np.ndarray) -> Iterator[np.ndarray]:
        for y in range(0, image.shape[0], tile_px):
            yield from _tiles(image[y : y + tile_px], tile_px)

    options: dict[str, Any] = {
        "dtype": np.uint8,
        "tile": (tile_px, tile_px),
        "photometric": "rgb",  # OpenSlide decodes YCbCr-flagged tifffile JPEGs with wrong colours
        "compression": "jpeg",
        "compressionargs": {"level": quality},
        "resolutionunit": "CENTIMETER",
        "metadata": None,
    }
    # classic TIFF offsets end at 4 GiB; BigTIFF well before compressed data could get there
    bigtiff = width * height * 3 > 2**31
    with atomic_write(path, durable=False) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
        tif.write(
            level0_tiles(),
            shape=(height, width, 3),
            description=_aperio_description(dimensions, mpp, tile_px, quality),
            resolution=(1e4 / mpp, 1e4 / mpp),
            **options,
        )
        image = lower
        for level, (level_w, level_h) in enumerate(levels[1:], start=1):
            level_mpp = mpp * LEVEL_FACTOR**level
            tif.write(
                array_tiles(image),
                shape=(level_h, level_w, 3),
                subfiletype=1,
                resolution=(1e4 / level_mpp, 1e4 / level_mpp),
                **options,
            )
            image = _downsample(image)
    return levels
