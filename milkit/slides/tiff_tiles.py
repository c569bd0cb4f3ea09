"""Direct reading of tiled TIFF slides: each stored tile's bytes read with ``pread`` and decoded
once with imagecodecs (libjpeg-turbo), regions cropped from the decoded tiles.

OpenSlide spends about three times a JPEG decode on the bookkeeping of each ``read_region`` call,
and a 224-px tile grid over 240- or 256-px stored tiles makes it decode each stored tile several
times. Here a level's tiles are indexed once with tifffile (offsets, byte counts, JPEG tables,
colour space) and decoded tiles are kept in a small least-recently-used store, so neighbouring
reads reuse them.

Only what decodes to exactly OpenSlide's pixels is read here: tiled (not NDPI's strips),
8-bit, 3-sample, chunky pages that are JPEG (RGB- or YCbCr-coded) or uncompressed RGB. Aperio's
JPEG tiles are RGB-coded without an Adobe marker, so they are decoded with the colour space the
TIFF states (a JFIF decoder would take them for YCbCr and shift every colour).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile

#: TIFF compression codes read here: none and JPEG ("new-style", with JPEGTables).
_RAW, _JPEG = 1, 7
#: TIFF photometric interpretations read here.
_RGB, _YCBCR = 2, 6


@dataclass(frozen=True, eq=False)
class TiledLevel:
    """Where one pyramid level's tiles lie in the file and how to decode them.

    Attributes:
        width: Level width in pixels.
        height: Level height in pixels.
        tile_width: Stored tile width.
        tile_height: Stored tile height.
        offsets: ``(n_tiles,)`` int64 byte offset of each tile, row-major.
        byte_counts: ``(n_tiles,)`` int64 byte count of each tile (0: an empty, white tile).
        compression: TIFF compression code (1 none, 7 JPEG).
        jpeg_tables: The shared JPEG tables, if any.
        jpeg_colorspace: ``"RGB"`` for RGB-coded JPEG tiles, None for YCbCr.
    """

    width: int
    height: int
    tile_width: int
    tile_height: int
    offsets: np.ndarray
    byte_counts: np.ndarray
    compression: int
    jpeg_tables: bytes | None
    jpeg_colorspace: str | None

    @property
    def tiles_across(self) -> int:
        """Tiles per row."""
        return -(-self.width // self.tile_width)

    def tile_index(self, column: int, row: int) -> int:
        """Row-major index of the tile at ``(column, row)``."""
        return row * self.tiles_across + column


def index_levels(
    path: str | Path, level_dimensions: Sequence[tuple[int, int]]
) -> dict[int, TiledLevel]:
    """Index the levels of a TIFF slide that can be read directly.

    Args:
        path: The slide file.
        level_dimensions: ``(width, height)`` of every level as OpenSlide reports them; each is
            matched with the file's first readable tiled page of those dimensions.

    Returns:
        Level number -> its index, for every level read directly (possibly none).
    """
    try:
        with tifffile.TiffFile(path) as tiff:
            if tiff.is_ndpi:
                return {}
            # Every tiled page is a candidate: tifffile names an SVS's reduced levels
            # "Thumbnail" or "Label" when the file has no separate thumbnail, and OME pyramids
            # keep their levels in sub-IFDs (series levels).
            pages = list(tiff.pages) + [
                level.pages[0] for series in tiff.series for level in series.levels if level.pages
            ]
            by_size: dict[tuple[int, int], TiledLevel] = {}
            for page in pages:
                level = _tiled_level(page) if isinstance(page, tifffile.TiffPage) else None
                if level is not None:
                    by_size.setdefault((level.width, level.height), level)
    except (tifffile.TiffFileError, OSError, ValueError, IndexError):
        return {}
    return {
        number: by_size[tuple(size)]  # type: ignore[index]
        for number, size in enumerate(level_dimensions)
        if tuple(size) in by_size
    }


def _tiled_level(page: tifffile.TiffPage) -> TiledLevel | None:
    """The index of one tifffile page, or None when it is not one this module decodes."""
    if not page.is_tiled or page.is_ndpi:
        return None
    shape = page.shape
    supported = (
        page.bitspersample == 8
        and page.samplesperpixel == 3
        and page.planarconfig == 1  # chunky (RGBRGB...)
        and len(shape) == 3
        and (page.tiledepth or 1) == 1
        and (
            (page.compression == _JPEG and page.photometric in (_RGB, _YCBCR))
            or (page.compression == _RAW and page.photometric == _RGB)
        )
    )
    if not supported:
        return None
    return TiledLevel(
        width=int(page.imagewidth),
        height=int(page.imagelength),
        tile_width=int(page.tilewidth),
        tile_height=int(page.tilelength),
        offsets=np.asarray(page.dataoffsets, dtype=np.int64),
        byte_counts=np.asarray(page.databytecounts, dtype=np.int64),
        compression=int(page.compression),
        jpeg_tables=bytes(page.jpegtables) if page.jpegtables is not None else None,
        jpeg_colorspace="RGB" if page.photometric == _RGB else None,
    )


class TileDecoder:
    """Decodes stored tiles of one file, keeping the most recently used ones.

    Args:
        path: The slide file (opened read-only here; each process opens its own).
        max_bytes: Most bytes of decoded tiles kept. 16 MiB holds the two rows of stored
            tiles a block of :class:`~milkit.features.extract.TileDataset` walks over (each is
            still decoded once), and bounds what random access (DINO's tile sampling keeps
            eight slides open per worker) holds on to.
    """

    def __init__(self, path: str | Path, max_bytes: int = 16 << 20) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.decoded = 0  # tiles decoded so far (not served from the store)
        self._fd: int | None = None
        self._pid = os.getpid()
        self._tiles: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._spare: np.ndarray | None = None

    def tile(self, level_number: int, level: TiledLevel, index: int) -> np.ndarray:
        """The decoded tile ``index`` of a level.

        Args:
            level_number: The level (the store's key).
            level: Its index.
            index: Row-major tile index.

        Returns:
            ``(tile_height, tile_width, 3)`` uint8 RGB; do not write into it.

        Raises:
            Exception: Whatever the decoder raises on a corrupt tile (callers name the place).
        """
        key = (level_number, index)
        tile = self._tiles.get(key)
        if tile is not None:
            self._tiles.move_to_end(key)
            return tile
        shape = (level.tile_height, level.tile_width, 3)
        spare = self._spare if self._spare is not None and self._spare.shape == shape else None
        self._spare = None
        tile = self._decode(level, index, spare)
        self.decoded += 1
        self._tiles[key] = tile
        self._bytes += tile.nbytes
        while self._bytes > self.max_bytes and len(self._tiles) > 1:
            _, dropped = self._tiles.popitem(last=False)
            self._bytes -= dropped.nbytes
            self._spare = dropped  # decoded into next: fresh memory costs page faults
        return tile

    def _decode(self, level: TiledLevel, index: int, out: np.ndarray | None) -> np.ndarray:
        shape = (level.tile_height, level.tile_width, 3)
        count = int(level.byte_counts[index])
        if count == 0:  # a tile the scanner left out: nothing scanned there
            return np.full(shape, 255, dtype=np.uint8)
        data = os.pread(self._file(), count, int(level.offsets[index]))
        if len(data) != count:
            raise OSError(f"tile {index} is cut short ({len(data)} of {count} bytes)")
        if level.compression == _RAW:
            return np.frombuffer(data, dtype=np.uint8).reshape(shape)
        tile = imagecodecs.jpeg8_decode(
            data, tables=level.jpeg_tables, colorspace=level.jpeg_colorspace, out=out
        )
        if tile.shape != shape:  # a short edge tile: pad like the rest of the tile grid
            padded = np.full(shape, 255, dtype=np.uint8)
            rows, cols = min(shape[0], tile.shape[0]), min(shape[1], tile.shape[1])
            padded[:rows, :cols] = tile[:rows, :cols]
            tile = padded
        return tile

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def close(self) -> None:
        """Close the file and drop the kept tiles."""
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None
        self._tiles.clear()
        self._bytes = 0


def paint_region(
    decoder: TileDecoder,
    level_number: int,
    level: TiledLevel,
    location: tuple[int, int],
    size: tuple[int, int],
    out: np.ndarray | None = None,
) -> np.ndarray:
    """A region of one level, cropped from its decoded tiles.

    Args:
        decoder: Where the tiles come from.
        level_number: The level.
        level: Its index.
        location: ``(x, y)`` of the top-left corner in the level's pixels.
        size: ``(width, height)`` in pixels.
        out: ``(height, width, 3)`` uint8 array to paint into; None for a new one.

    Returns:
        ``(height, width, 3)`` uint8 RGB (``out`` when given); white outside the level.
    """
    x, y = location
    width, height = size
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + width, level.width), min(y + height, level.height)
    if out is None:
        out = np.empty((height, width, 3), dtype=np.uint8)
    if (x0, y0, x1, y1) != (x, y, x + width, y + height):  # else every pixel is painted below
        out[...] = 255
    if x1 <= x0 or y1 <= y0:
        return out
    tw, th = level.tile_width, level.tile_height
    for row in range(y0 // th, (y1 - 1) // th + 1):
        top, bottom = max(y0, row * th), min(y1, (row + 1) * th)
        for column in range(x0 // tw, (x1 - 1) // tw + 1):
            left, right = max(x0, column * tw), min(x1, (column + 1) * tw)
            tile = decoder.tile(level_number, level, level.tile_index(column, row))
            out[top - y : bottom - y, left - x : right - x] = tile[
                top - row * th : bottom - row * th, left - column * tw : right - column * tw
            ]
    return out
