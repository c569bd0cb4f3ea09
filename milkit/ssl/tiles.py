"""Tiles of many slides under one index, read from the slides through ``milkit tile``'s files.

``milkit tile`` writes ``<coords_dir>/<slide_id>.h5`` with the tile corners and the
:class:`~milkit.slides.tiling.TileSpec` of each slide. `find_slide_tiles` reads those files
and finds each slide; `CohortTileDataset` indexes every tile of every slide with one global
index (map-style) and reads a tile with :func:`~milkit.slides.tiling.read_tile` when asked,
through a small per-process LRU cache of open slide handles. No tile image is written to disk.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import Dataset

from milkit.errors import ConfigError, FeatureFileError
from milkit.features.tile_file import TILING_OPTIONS_ATTR, read_coords
from milkit.slides.folder import index_slides
from milkit.slides.reader import SlideReader, open_slide
from milkit.slides.tiling import TileSpec, read_tile

__all__ = ["CohortTileDataset", "SlideTiles", "find_slide_tiles"]


@dataclass(frozen=True, eq=False)
class SlideTiles:
    """The tiles of one slide.

    Attributes:
        slide_id: The coordinate file's stem.
        slide_path: The slide to read from.
        tile_spec: Geometry of the tiles (level, read size, output size).
        coords_level0: ``(N, 2)`` int64 top-left ``(x, y)`` in level-0 pixels.
        tiling_options: The ``milkit tile`` options the coordinate file records (files
            written before milkit recorded them: None).
    """

    slide_id: str
    slide_path: Path
    tile_spec: TileSpec
    coords_level0: np.ndarray
    tiling_options: dict[str, Any] | None = None


def find_slide_tiles(
    coords_dir: str | Path, slides_dir: str | Path | None = None
) -> list[SlideTiles]:
    """Read every coordinate file of a folder and find its slide.

    A slide is looked up by its id in ``slides_dir`` (searched recursively) when given, so a
    cohort moved to another machine still works; otherwise, or when it is not there, the
    file's ``slide_path`` attribute is used. Unfinished or unreadable coordinate files and
    files without tiles are skipped with a warning.

    Args:
        coords_dir: Folder with ``<slide_id>.h5`` coordinate (or milkit feature) files.
        slides_dir: Folder of the slides.

    Returns:
        One entry per usable file, sorted by slide id.

    Raises:
        ConfigError: ``coords_dir`` has no usable file, or a slide cannot be found (all listed).
    """
    coords_dir = Path(coords_dir)
    files = sorted(coords_dir.glob("*.h5")) if coords_dir.is_dir() else []
    if not files:
        raise ConfigError(
            f"{coords_dir}: no coordinate files (*.h5); run `milkit tile SLIDES OUT` and pass "
            "--data.coords_dir OUT/coords."
        )
    # Relative-path ids, and stems no two slides share: a file's id finds only its own slide.
    by_id = index_slides(slides_dir) if slides_dir is not None else {}
    found: list[SlideTiles] = []
    skipped: list[str] = []
    missing: list[str] = []
    for path in files:
        try:
            tiles = read_coords(path)
        except FeatureFileError as error:
            skipped.append(f"{path.name} ({error})")
            continue
        spec = tiles.tile_spec
        if spec is None or tiles.coords_unit != "level0_px":
            skipped.append(f"{path.name} (no milkit tile_spec; write it with `milkit tile`)")
            continue
        if len(tiles.coords) == 0:
            skipped.append(f"{path.name} (no tiles)")
            continue
        slide_id = str(tiles.attrs.get("slide_id") or path.stem)
        recorded = tiles.attrs.get("slide_path")
        if slide_id in by_id:
            slide_path = by_id[slide_id]
        elif recorded and Path(recorded).is_file():
            slide_path = Path(recorded)
        else:
            missing.append(f"{slide_id} (recorded path {recorded!r})")
            continue
        recorded_options = tiles.attrs.get(TILING_OPTIONS_ATTR)
        found.append(
            SlideTiles(
                slide_id,
                slide_path,
                spec,
                np.asarray(tiles.coords, dtype=np.int64),
                json.loads(recorded_options) if recorded_options else None,
            )
        )
    if missing:
        where = f"in {slides_dir} or " if slides_dir is not None else ""
        raise ConfigError(
            f"cannot find the slides of {len(missing)} coordinate files of {coords_dir} "
            f"{where}at their recorded paths: {'; '.join(missing)}. Pass --data.slides_dir "
            "with the folder that holds them."
        )
    if skipped:
        rank_zero_warn(f"{coords_dir}: skipped {len(skipped)} files: {'; '.join(skipped)}")
    if not found:
        raise ConfigError(f"{coords_dir}: no coordinate file with tiles; check `milkit tile`.")
    return found


class _SlideCache:
    """Least-recently-used open slide handles of one process."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._readers: OrderedDict[Path, SlideReader] = OrderedDict()
        self._pid = os.getpid()

    def get(self, path: Path, mpp: float) -> SlideReader:
        # a handle inherited through fork shares its file state with the parent: never reuse it
        if self._pid != os.getpid():
            self._readers, self._pid = OrderedDict(), os.getpid()
        reader = self._readers.get(path)
        if reader is None:
            reader = open_slide(path, mpp=mpp)
            self._readers[path] = reader
            while len(self._readers) > self.capacity:
                self._readers.popitem(last=False)[1].close()
        self._readers.move_to_end(path)
        return reader

    def __len__(self) -> int:
        return len(self._readers)


class CohortTileDataset(Dataset[Any]):
    """Every tile of every slide under one global index, read from the slide on access.

    Index ``i`` is tile ``i - offsets[s]`` of slide ``s``, slides in the order given.

    Args:
        slides: The slides and their tiles.
        transform: Applied to each ``(H, W, 3)`` uint8 tile (e.g. `MultiCropAugmentation`);
            None returns the tile array.
        max_open_slides: Slide handles kept open per process (LRU).

    Raises:
        ConfigError: If there are no tiles or ``max_open_slides < 1``.
    """

    def __init__(
        self,
        slides: Sequence[SlideTiles],
        transform: Callable[[np.ndarray], Any] | None = None,
        *,
        max_open_slides: int = 8,
    ) -> None:
        if max_open_slides < 1:
            raise ConfigError(f"max_open_slides={max_open_slides} must be >= 1.")
        self.slides = list(slides)
        self.transform = transform
        self.max_open_slides = max_open_slides
        counts = np.array([len(s.coords_level0) for s in self.slides], dtype=np.int64)
        if counts.sum() == 0:
            raise ConfigError("CohortTileDataset: the slides have no tiles.")
        #: ``(S + 1,)`` first global index of each slide, then the total
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self._cache = _SlideCache(max_open_slides)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """``(slide index, tile index within the slide)`` of a global index.

        Raises:
            IndexError: If ``index`` is outside ``[0, len)``.
        """
        if not 0 <= index < len(self):
            raise IndexError(f"tile index {index} outside [0, {len(self)}).")
        slide = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return slide, int(index - self.offsets[slide])

    def read(self, index: int) -> np.ndarray:
        """The tile at a global index as ``(tile_size_px, tile_size_px, 3)`` uint8 RGB."""
        slide_index, tile_index = self.locate(index)
        slide = self.slides[slide_index]
        reader = self._cache.get(slide.slide_path, slide.tile_spec.slide_mpp)
        x, y = (int(v) for v in slide.coords_level0[tile_index])
        return read_tile(reader, slide.tile_spec, (x, y))

    def __getitem__(self, index: int) -> Any:
        tile = self.read(index)
        return tile if self.transform is None else self.transform(tile)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = _SlideCache(self.max_open_slides)  # handles are not picklable
        return state
