"""Slide readers: one small interface over OpenSlide and plain images.

Coordinates are ``(x, y)`` in level-0 pixels and sizes ``(width, height)``, OpenSlide's
convention. Pixel arrays are ``(height, width, 3)`` uint8 RGB; transparent pixels (outside the
scanned area) are composited on white so that background looks like glass, not black.
"""

from __future__ import annotations

import math
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from PIL import Image

from milkit.errors import MissingMppError, SlideOpenError, SlideReadError
from milkit.slides.tiff_tiles import TileDecoder, TiledLevel, index_levels, paint_region

#: Extensions of plain (non-pyramidal) images read whole through Pillow.
PLAIN_IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
#: Extensions treated as slides when searching a folder.
SLIDE_EXTENSIONS = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm"}
    | PLAIN_IMAGE_EXTENSIONS
)

#: Microns per pixel a scan can have; a file's value outside it is a placeholder (72 dpi is
#: 352.8 µm/px), not a resolution.
PLAUSIBLE_MPP = (0.05, 20.0)
#: Extensions of TIFF-family slides whose tiles may be read directly (:class:`TiffTileReader`).
TIFF_EXTENSIONS = frozenset({".svs", ".tif", ".tiff"})
#: OpenSlide vendors whose levels are plain tile grids (no overlaps or stitching to respect).
_DIRECT_VENDORS = frozenset({"aperio", "generic-tiff"})
#: Environment variable: ``openslide`` reads every slide through OpenSlide (for comparisons).
READER_ENV = "MILKIT_READER"

# Plain images can be large scans; let Pillow open them (we never decode untrusted pickles).
Image.MAX_IMAGE_PIXELS = None

_CM_PER_UNIT = {"centimeter": 1.0, "inch": 2.54, "3": 1.0, "2": 2.54}


class SlideReader(ABC):
    """A whole-slide image opened for reading.

    Subclasses provide the pyramid geometry and :meth:`_read` ; everything else
    (mpp handling, thumbnails, validation) lives here once. ``backend`` names what decodes
    the pixels (recorded in feature files).

    Args:
        path: The slide file.
        mpp: Microns per level-0 pixel, overriding whatever the file says. Required when the
            file records none.
    """

    backend = "unknown"

    def __init__(self, path: str | Path, *, mpp: float | None = None) -> None:
        self.path = Path(path)
        self._mpp_override = mpp
        if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
            raise MissingMppError(
                f"{self.path}: the slide's mpp (--slide-mpp) must be a positive number, got {mpp!r}."
            )

    # -- geometry ------------------------------------------------------------------------------
    @property
    @abstractmethod
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """``(width, height)`` of every pyramid level, finest first."""

    @property
    @abstractmethod
    def level_downsamples(self) -> tuple[float, ...]:
        """Downsample factor of every level relative to level 0 (level 0 is 1.0)."""

    @property
    def dimensions(self) -> tuple[int, int]:
        """``(width, height)`` of level 0 in pixels."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self.level_dimensions)

    @property
    def properties(self) -> Mapping[str, str]:
        """Raw metadata of the file (vendor keys), for provenance."""
        return {}

    def _mpp_from_file(self) -> float | None:
        """Microns per level-0 pixel as recorded in the file, or None."""
        return None

    @property
    def mpp(self) -> float:
        """Microns per level-0 pixel (x; slides are assumed to have square pixels).

        Raises:
            MissingMppError: Neither the file nor the caller gives a resolution.
        """
        if self._mpp_override is not None:
            return float(self._mpp_override)
        mpp = self._mpp_from_file()
        if mpp is None or not PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]:
            what = (
                "the file records no microns-per-pixel (mpp)"
                if mpp is None
                else f"the file's resolution tag says {mpp:.4g} µm/px, which no slide scanner "
                "gives (a placeholder such as 72 or 300 dpi), so it is not used"
            )
            raise MissingMppError(
                f"{self.path}: {what}. Pass the scan resolution of the scan: `--slide-mpp 0.25` "
                "(40x) or `--slide-mpp 0.5` (20x) on the command line, per slide with "
                "`--mpp-csv FILE` (columns slide_id,mpp), or `open_slide(path, mpp=...)` in "
                "Python. (`--mpp` is the resolution to tile at.)"
            )
        return mpp

    @property
    def slide_id(self) -> str:
        """The file name without its extension; names the slide's output files."""
        return slide_id_from_path(self.path)

    def level_mpp(self, level: int) -> float:
        """Microns per pixel at ``level``."""
        return self.mpp * self.level_downsamples[level]

    # -- pixels --------------------------------------------------------------------------------
    @abstractmethod
    def _read(
        self,
        location_level0: tuple[int, int],
        level: int,
        size: tuple[int, int],
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Read an RGB region (into ``out`` where the reader can); arguments are validated."""

    def read_region(
        self,
        location_level0: tuple[int, int],
        level: int,
        size: tuple[int, int],
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Read a region as RGB.

        Args:
            location_level0: ``(x, y)`` of the top-left corner in level-0 pixels.
            level: Pyramid level to read from.
            size: ``(width, height)`` in pixels of ``level``.
            out: ``(height, width, 3)`` uint8 array to write the region into (e.g. a row of
                a batch, saving a copy); None for a new array.

        Returns:
            ``(height, width, 3)`` uint8 array (``out`` when given); parts outside the slide
            are white.

        Raises:
            SlideReadError: The region cannot be decoded (corrupt tile, I/O error).
        """
        if not 0 <= level < self.level_count:
            raise SlideReadError(
                f"{self.path}: level {level} does not exist (the slide has {self.level_count})."
            )
        width, height = int(size[0]), int(size[1])
        if width <= 0 or height <= 0:
            raise SlideReadError(f"{self.path}: region size must be positive, got {size}.")
        x, y = int(location_level0[0]), int(location_level0[1])
        try:
            region = self._read((x, y), level, (width, height), out)
        except SlideReadError:
            raise
        except Exception as exc:  # decoder errors differ by backend; name the place instead
            raise SlideReadError(
                f"{self.path}: cannot read region at level-0 (x={x}, y={y}), level {level}, "
                f"size {width}x{height}: {exc}"
            ) from exc
        if out is not None and region is not out:
            out[...] = region
            return out
        return region

    def read_level(self, level: int) -> np.ndarray:
        """Read a whole (small) level as ``(height, width, 3)`` uint8 RGB."""
        return self.read_region((0, 0), level, self.level_dimensions[level])

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (within 1 %)."""
        best = 0
        for level, level_downsample in enumerate(self.level_downsamples):
            if level_downsample <= downsample * 1.01:
                best = level
        return best

    def thumbnail(self, *, max_size_px: int = 2048, mpp: float | None = None) -> np.ndarray:
        """A downsampled view of the whole slide, read from the closest pyramid level.

        The level is read in horizontal strips, each reduced at once, so memory is bounded by
        the thumbnail plus one strip, never by level 0 or a large intermediate level.

        Args:
            max_size_px: Longest side of the result in pixels.
            mpp: Wanted microns per thumbnail pixel; the thumbnail is made no larger than this
                asks for (and never larger than ``max_size_px``).

        Returns:
            ``(height, width, 3)`` uint8 RGB; its downsample from level 0 is
            ``dimensions[0] / width``.
        """
        width0, height0 = self.dimensions
        downsample = max(width0, height0) / max_size_px
        if mpp is not None:
            downsample = max(downsample, mpp / self.mpp)
        downsample = max(downsample, 1.0)
        out_width, out_height = (
            max(1, round(width0 / downsample)),
            max(1, round(height0 / downsample)),
        )
        level = self.best_level_for_downsample(downsample)
        level_width, level_height = self.level_dimensions[level]
        scale_y = level_height / out_height
        rows_per_strip = max(1, int(1024 / scale_y))
        out = np.empty((out_height, out_width, 3), dtype=np.uint8)
        level_downsample = self.level_downsamples[level]
        for row0 in range(0, out_height, rows_per_strip):
            row1 = min(out_height, row0 + rows_per_strip)
            top, bottom = round(row0 * scale_y), min(level_height, round(row1 * scale_y))
            strip = self.read_region(
                (0, round(top * level_downsample)), level, (level_width, max(1, bottom - top))
            )
            reduced = Image.fromarray(strip).resize((out_width, row1 - row0), Image.Resampling.BOX)
            out[row0:row1] = np.asarray(reduced)
        return out

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:  # noqa: B027 - readers without handles need no cleanup
        """Release file handles."""

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, dimensions={self.dimensions})"


def slide_id_from_path(path: str | Path) -> str:
    """A slide's id: its file name without the extension (``.ome.tiff`` counts as one)."""
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def _mpp_from_properties(properties: Mapping[str, str]) -> float | None:
    """Find microns per pixel in OpenSlide properties: standard, vendor, then TIFF tags."""
    for key in (
        "openslide.mpp-x",
        "aperio.MPP",
        "hamamatsu.XResolution-um",
        "mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_X",
    ):
        value = _positive_float(properties.get(key))
        if value is not None:
            return value
    resolution = _positive_float(properties.get("tiff.XResolution"))
    unit = str(properties.get("tiff.ResolutionUnit", "")).lower()
    if resolution is not None and unit in _CM_PER_UNIT:
        return _CM_PER_UNIT[unit] * 1e4 / resolution
    return None


def _positive_float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


class OpenSlideReader(SlideReader):
    """Any format OpenSlide opens: SVS, NDPI, MRXS, SCN, BIF, generic tiled TIFF, DICOM.

    Args:
        path: The slide file.
        mpp: Microns per level-0 pixel, overriding the file's metadata.
    """

    backend = "openslide"

    def __init__(self, path: str | Path, *, mpp: float | None = None) -> None:
        super().__init__(path, mpp=mpp)
        import openslide  # imported here: openslide-bin loads a shared library

        try:
            self._slide = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise SlideOpenError(
                f"{self.path}: "
                + (
                    _why_unreadable(self.path)
                    or f"not a slide format OpenSlide can read ({exc}). If it is a plain image, "
                    "save it as PNG/JPEG/TIFF and give its resolution with `--slide-mpp`."
                )
            ) from exc
        except openslide.OpenSlideError as exc:
            raise SlideOpenError(f"{self.path}: the file is damaged or truncated ({exc}).") from exc
        except OSError as exc:
            raise SlideOpenError(f"{self.path}: cannot open ({exc}).") from exc
        # Asked for on every read: OpenSlide answers through several C calls each time.
        self._level_dimensions: tuple[tuple[int, int], ...] = tuple(
            (int(width), int(height)) for width, height in self._slide.level_dimensions
        )
        self._level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._level_downsamples

    @property
    def properties(self) -> Mapping[str, str]:
        return dict(self._slide.properties)

    def _mpp_from_file(self) -> float | None:
        return _mpp_from_properties(self._slide.properties)

    def _read(
        self,
        location_level0: tuple[int, int],
        level: int,
        size: tuple[int, int],
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        import openslide

        try:
            rgba = self._slide.read_region(location_level0, level, size)
        except openslide.OpenSlideError:
            # OpenSlide handles stay in an error state after a failed read: reopen, so one
            # corrupt tile does not make every later tile of the slide unreadable.
            self._slide.close()
            self._slide = openslide.OpenSlide(str(self.path))
            raise
        return _composite_on_white(np.asarray(rgba))

    def close(self) -> None:
        self._slide.close()


class TiffTileReader(OpenSlideReader):
    """A tiled TIFF slide (Aperio SVS, generic pyramidal TIFF) whose tiles are decoded directly.

    OpenSlide still gives the geometry and metadata; :mod:`milkit.slides.tiff_tiles` reads the
    pixels of every level it can index, each stored tile decoded once while it stays in a small
    store. Reads it cannot do exactly as OpenSlide would (other vendors, unsupported pages,
    level coordinates that are not whole pixels) go through OpenSlide.

    Args:
        path: The slide file.
        mpp: Microns per level-0 pixel, overriding the file's metadata.
    """

    def __init__(self, path: str | Path, *, mpp: float | None = None) -> None:
        super().__init__(path, mpp=mpp)
        self._levels: dict[int, TiledLevel] = {}
        if self.properties.get("openslide.vendor") in _DIRECT_VENDORS:
            self._levels = index_levels(self.path, self.level_dimensions)
        self._decoder = TileDecoder(self.path)
        self.backend = "tifffile" if self._levels else "openslide"

    def _read(
        self,
        location_level0: tuple[int, int],
        level: int,
        size: tuple[int, int],
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        tiled = self._levels.get(level)
        if tiled is not None:
            downsample = self.level_downsamples[level]
            x, y = location_level0[0] / downsample, location_level0[1] / downsample
            if x.is_integer() and y.is_integer():
                return paint_region(self._decoder, level, tiled, (int(x), int(y)), size, out)
        return super()._read(location_level0, level, size)

    def close(self) -> None:
        self._decoder.close()
        super().close()


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """``(H, W, 4)`` premultiplied-alpha RGBA (OpenSlide's output) to ``(H, W, 3)`` RGB on white."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    # OpenSlide returns premultiplied colour, so white shows through as (255 - alpha).
    out = rgb.astype(np.uint16) + (255 - alpha[..., None].astype(np.uint16))
    return np.minimum(out, 255).astype(np.uint8)


class ImageReader(SlideReader):
    """A plain image (PNG, JPEG, BMP, flat TIFF) held as one level.

    Plain images have no trustworthy scan resolution, so ``mpp`` is required unless a TIFF
    resolution tag gives one.

    Args:
        path: The image file.
        mpp: Microns per pixel of the image.
    """

    backend = "pillow"

    def __init__(self, path: str | Path, *, mpp: float | None = None) -> None:
        super().__init__(path, mpp=mpp)
        try:
            with Image.open(self.path) as image:
                self._file_mpp = _mpp_from_pil(image)
                self._pixels = np.asarray(_to_rgb_on_white(image))
        except (OSError, SyntaxError, ValueError) as exc:
            raise SlideOpenError(f"{self.path}: not a readable image ({exc}).") from exc
        height, width = self._pixels.shape[:2]
        self._dims = (width, height)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return (self._dims,)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return (1.0,)

    def _mpp_from_file(self) -> float | None:
        return self._file_mpp

    def _read(
        self,
        location_level0: tuple[int, int],
        level: int,
        size: tuple[int, int],
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        x, y = location_level0
        width, height = size
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        src_x0, src_y0 = max(x, 0), max(y, 0)
        src_x1, src_y1 = min(x + width, self._dims[0]), min(y + height, self._dims[1])
        if src_x1 > src_x0 and src_y1 > src_y0:
            out[src_y0 - y : src_y1 - y, src_x0 - x : src_x1 - x] = self._pixels[
                src_y0:src_y1, src_x0:src_x1
            ]
        return out


def _to_rgb_on_white(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _mpp_from_pil(image: Image.Image) -> float | None:
    """Resolution from TIFF tags (282 XResolution, 296 ResolutionUnit) of a flat TIFF."""
    tags = getattr(image, "tag_v2", None)
    if not tags or 282 not in tags:
        return None
    unit = {2: "inch", 3: "centimeter"}.get(int(tags.get(296, 2)))
    resolution = _positive_float(float(tags[282]))
    if unit is None or resolution is None:
        return None
    return _CM_PER_UNIT[unit] * 1e4 / resolution


#: Leading bytes of plain image formats, with the extension the file should have.
_IMAGE_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG", ".png"),
    (b"\xff\xd8\xff", "JPEG", ".jpg"),
    (b"BM", "BMP", ".bmp"),
)
_TIFF_SIGNATURES = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")


def _why_unreadable(path: Path) -> str | None:
    """What is wrong with a file OpenSlide rejects, when the first bytes tell: a plain image
    with a slide's name, or a TIFF cut short or damaged. None when they do not."""
    with path.open("rb") as handle:
        head = handle.read(16)
    for signature, kind, extension in _IMAGE_SIGNATURES:
        if head.startswith(signature):
            return (
                f"a {kind} image named {path.suffix}: rename it to {path.stem}{extension} and "
                "give its resolution with `--slide-mpp`."
            )
    if not head.startswith(_TIFF_SIGNATURES):
        return None
    big = head[2:4] in (b"+\0", b"\0+")
    offset_bytes = head[8:16] if big else head[4:8]
    first_directory = int.from_bytes(offset_bytes, "little" if head[:2] == b"II" else "big")
    size = path.stat().st_size

    def cut_short(what: str, byte: int) -> str:
        return (
            f"the TIFF is cut short: its {what} byte {byte:,} but the file has {size:,} bytes "
            "(an interrupted copy?). Copy it again from the scanner."
        )

    if first_directory >= size:
        return cut_short("image directory lies at", first_directory)
    import tifffile

    try:
        with tifffile.TiffFile(path) as tiff:
            ends = [
                int(offset) + int(count)
                for page in tiff.pages
                if isinstance(page, tifffile.TiffPage)
                for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True)
            ]
    except Exception as exc:  # tifffile's errors vary by damage; the message says what broke
        return f"a damaged TIFF ({exc}). Copy it again from the scanner."
    return cut_short("image data runs to", max(ends)) if ends and max(ends) > size else None


def _looks_like_text(path: Path) -> bool:
    with path.open("rb") as handle:
        head = handle.read(512)
    return bool(head) and b"\x00" not in head and re.fullmatch(rb"[\s\x20-\x7e]*", head) is not None


def open_slide(path: str | Path, *, mpp: float | None = None) -> SlideReader:
    """Open a slide with the reader that fits it.

    OpenSlide is tried first for everything but PNG/JPEG/BMP; flat TIFFs OpenSlide rejects fall
    back to the plain-image reader. SVS and tiled TIFF slides get :class:`TiffTileReader`
    (their tiles decoded directly) unless the environment sets ``MILKIT_READER=openslide``.

    Args:
        path: Slide or image file.
        mpp: Microns per level-0 pixel, overriding the file (required if the file has none).

    Returns:
        An open :class:`SlideReader` (use it as a context manager).

    Raises:
        SlideOpenError: The file is missing, empty, truncated or not an image.
    """
    path = Path(path)
    if not path.is_file():
        raise SlideOpenError(f"{path}: no such file.")
    if path.stat().st_size == 0:
        raise SlideOpenError(f"{path}: the file is empty (0 bytes); re-copy it from the scanner.")
    if not os.access(path, os.R_OK):
        raise SlideOpenError(
            f"{path}: no permission to read it (owner {path.owner()}, mode "
            f"{path.stat().st_mode & 0o777:o}); ask for read access or copy it somewhere you can."
        )
    suffix = path.suffix.lower()
    if suffix in PLAIN_IMAGE_EXTENSIONS:
        return ImageReader(path, mpp=mpp)
    if _looks_like_text(path):
        raise SlideOpenError(f"{path}: this is a text file, not a slide (check the file's origin).")
    direct = suffix in TIFF_EXTENSIONS and os.environ.get(READER_ENV, "auto") != "openslide"
    try:
        return TiffTileReader(path, mpp=mpp) if direct else OpenSlideReader(path, mpp=mpp)
    except SlideOpenError as openslide_error:
        if suffix in (".tif", ".tiff"):
            try:
                return ImageReader(path, mpp=mpp)
            except SlideOpenError:
                pass
        raise openslide_error
