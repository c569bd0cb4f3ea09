"""Tiles of many slides: slide lookup through coordinate files, the global index, the cache."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from milkit.errors import ConfigError
from milkit.slides.reader import open_slide
from milkit.slides.tiling import read_tile
from milkit.ssl.tiles import CohortTileDataset, find_slide_tiles


def test_slides_are_found_by_id_or_recorded_path(
    cohort: Path, cohort_tile_px: int, tmp_path: Path
) -> None:
    recorded = find_slide_tiles(cohort / "tiles" / "coords")
    assert [s.slide_id for s in recorded] == ["slide_0", "slide_1"]
    assert all(
        s.slide_path == (cohort / "slides" / f"{s.slide_id}.svs").resolve() for s in recorded
    )
    assert all(
        len(s.coords_level0) > 0 and s.tile_spec.tile_size_px == cohort_tile_px for s in recorded
    )

    moved = tmp_path / "moved" / "deeper"
    moved.mkdir(parents=True)
    for slide in recorded:
        shutil.copy(slide.slide_path, moved / slide.slide_path.name)
    by_id = find_slide_tiles(cohort / "tiles" / "coords", tmp_path / "moved")
    assert [s.slide_path for s in by_id] == [moved / "slide_0.svs", moved / "slide_1.svs"]


def test_missing_slides_and_bad_files_are_reported(cohort: Path, tmp_path: Path) -> None:
    coords = tmp_path / "coords"
    shutil.copytree(cohort / "tiles" / "coords", coords)
    (coords / "broken.h5").write_bytes(b"not hdf5")
    with pytest.warns(UserWarning, match="skipped 1 files: broken.h5"):
        assert len(find_slide_tiles(coords)) == 2

    elsewhere = tmp_path / "other_slides"
    elsewhere.mkdir()
    (coords / "broken.h5").unlink()
    # the recorded paths still exist, so only a slide that is nowhere fails
    shutil.copy(coords / "slide_0.h5", coords / "ghost.h5")
    with h5py.File(coords / "ghost.h5", "a") as h5:
        h5.attrs["slide_id"] = "ghost"
        h5.attrs["slide_path"] = str(tmp_path / "gone.svs")
    with pytest.raises(ConfigError, match=r"ghost.*--data.slides_dir"):
        find_slide_tiles(coords, elsewhere)
    with pytest.raises(ConfigError, match="no coordinate files"):
        find_slide_tiles(tmp_path / "empty")


def test_global_index_reads_the_right_tile(cohort: Path) -> None:
    slides = find_slide_tiles(cohort / "tiles" / "coords")
    dataset = CohortTileDataset(slides, max_open_slides=1)
    n0 = len(slides[0].coords_level0)
    assert len(dataset) == n0 + len(slides[1].coords_level0)
    assert dataset.locate(0) == (0, 0) and dataset.locate(n0) == (1, 0)
    assert dataset.locate(len(dataset) - 1) == (1, len(slides[1].coords_level0) - 1)
    with pytest.raises(IndexError):
        dataset.locate(len(dataset))

    for index in (n0 - 1, n0 + 1):
        slide_index, tile_index = dataset.locate(index)
        slide = slides[slide_index]
        with open_slide(slide.slide_path) as reader:
            expected = read_tile(reader, slide.tile_spec, tuple(slide.coords_level0[tile_index]))
        np.testing.assert_array_equal(dataset[index], expected)
    # one handle at a time: reading the other slide evicted the first
    assert len(dataset._cache) == 1
    clone = pickle.loads(pickle.dumps(dataset))
    assert len(clone._cache) == 0
    np.testing.assert_array_equal(clone[0], dataset[0])
