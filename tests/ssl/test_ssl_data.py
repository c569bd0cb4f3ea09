"""Pretraining batches: the windowed, capped, rank-sharded sampler and the DataModule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from milkit.errors import ConfigError
from milkit.slides.tiling import TileSpec
from milkit.ssl.data import TileDataModule, TileSampler
from milkit.ssl.tiles import CohortTileDataset, SlideTiles


def _fake_slides(counts: list[int]) -> CohortTileDataset:
    """A dataset whose tiles are never read: only the index geometry matters."""
    spec = TileSpec(1.0, 8, 0, 0, 1.0, 8, 8, 8, 1.0, 1.0)
    slides = [
        SlideTiles(f"s{i}", Path(f"/nowhere/s{i}.svs"), spec, np.zeros((n, 2), np.int64))
        for i, n in enumerate(counts)
    ]
    return CohortTileDataset(slides)


def test_sampler_caps_tiles_per_slide_and_reshuffles_each_epoch() -> None:
    dataset = _fake_slides([50, 3, 20])
    sampler = TileSampler(dataset, max_tiles_per_slide=10, slides_per_window=None, seed=1)
    assert len(sampler) == 10 + 3 + 10
    first = sampler.epoch_order()
    assert len(set(first.tolist())) == len(first)  # no tile twice
    slide_of = np.searchsorted(dataset.offsets, first, side="right") - 1
    assert np.bincount(slide_of).tolist() == [10, 3, 10]
    np.testing.assert_array_equal(first, sampler.epoch_order())  # same epoch, same order
    sampler.set_epoch(1)
    assert not np.array_equal(first, sampler.epoch_order())


def test_sampler_windows_keep_few_slides_open() -> None:
    dataset = _fake_slides([8] * 6)
    sampler = TileSampler(dataset, slides_per_window=2, seed=0)
    slide_of = np.searchsorted(dataset.offsets, sampler.epoch_order(), side="right") - 1
    windows = slide_of.reshape(3, 16)  # 3 windows of 2 slides x 8 tiles
    assert all(len(set(w.tolist())) == 2 for w in windows)
    assert len(set(slide_of.tolist())) == 6
    # within a window the two slides are interleaved, not one after the other
    assert any(np.count_nonzero(np.diff(w)) > 1 for w in windows)


def test_sampler_shards_disjointly_across_ranks() -> None:
    dataset = _fake_slides([7, 6])
    shares = [
        list(TileSampler(dataset, seed=3, num_replicas=3, rank=r, slides_per_window=1))
        for r in range(3)
    ]
    assert [len(s) for s in shares] == [4, 4, 4]  # 13 tiles cut to 12
    union = sorted(i for share in shares for i in share)
    assert len(set(union)) == 12 and set(union) <= set(range(13))
    with pytest.raises(ConfigError, match="rank 3"):
        TileSampler(dataset, num_replicas=3, rank=3)
    with pytest.raises(ConfigError, match="max_tiles_per_slide=0"):
        TileSampler(dataset, max_tiles_per_slide=0)


def _datamodule(cohort: Path, **options: object) -> TileDataModule:
    return TileDataModule(
        cohort / "tiles" / "coords",
        cohort / "slides",
        batch_size=4,
        num_workers=0,
        max_tiles_per_slide=5,
        global_size_px=32,
        local_size_px=16,
        n_local_crops=3,
        **options,  # type: ignore[arg-type]
    )


def test_datamodule_yields_multicrop_batches(cohort: Path) -> None:
    module = _datamodule(cohort, augment_on="workers")
    module.setup("fit")
    assert module.steps_per_epoch == 10 // 4
    batches = list(module.train_dataloader())
    assert len(batches) == 2  # the incomplete last batch is dropped
    crops = module.on_after_batch_transfer(batches[0], 0)  # nothing left to do on the device
    assert crops is batches[0]
    assert [tuple(c.shape) for c in crops] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 3
    assert all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in crops)


def test_datamodule_augments_on_the_device_when_asked(cohort: Path, cohort_tile_px: int) -> None:
    module = _datamodule(cohort, augment_on="device")
    module.setup("fit")
    tiles = next(iter(module.train_dataloader()))
    # the loader only reads: uint8 tiles as stored, 4x smaller to transfer than float crops
    assert tiles.dtype == torch.uint8
    assert tuple(tiles.shape) == (4, cohort_tile_px, cohort_tile_px, 3)
    crops = module.on_after_batch_transfer(tiles, 0)
    assert [tuple(c.shape) for c in crops] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 3
    # auto: the workers without a trainer or on a CPU trainer
    assert not _datamodule(cohort).augments_on_device
    with pytest.raises(ConfigError, match="augment_on='gpu'"):
        _datamodule(cohort, augment_on="gpu")


def test_datamodule_refuses_an_epoch_shorter_than_a_batch(cohort: Path) -> None:
    coords = cohort / "tiles" / "coords"
    TileDataModule(coords, batch_size=8, num_workers=0).setup("fit")
    module = TileDataModule(coords, batch_size=8, num_workers=0, max_tiles_per_slide=3)
    with pytest.raises(
        ConfigError, match="6 tiles per epoch and device, fewer than one batch of 8"
    ):
        module.setup("fit")
    with pytest.raises(ConfigError, match="batch_size=0"):
        TileDataModule(coords, batch_size=0)
