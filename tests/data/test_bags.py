"""Bags read lazily from feature files; padding collate with masks; training-only subsampling."""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from milkit.data.bags import (
    BagDataset,
    BagItem,
    TrainingDraws,
    collate_bags,
    pad_bags,
    probe_bag,
)
from milkit.errors import BagBatchError, FeatureFileError
from milkit.features.tile_file import TileFileWriter
from milkit.slides.tiling import TileSpec


def _clam_file(path: Path, n: int, dim: int = 8, *, leading_axis: bool = False) -> np.ndarray:
    """A CLAM-style file: ``features`` (N, D) and ``coords`` (N, 2), or (1, N, D) and (1, N, 2)
    as some CLAM versions write."""
    features = np.arange(n * dim, dtype=np.float32).reshape(n, dim)
    coords = np.stack([np.arange(n) * 256, np.zeros(n)], axis=1).astype(np.int64)
    with h5py.File(path, "w") as file:
        file["features"] = features[None] if leading_axis else features
        file["coords"] = coords[None] if leading_axis else coords
    return features


def _milkit_file(path: Path, n: int, dim: int = 6) -> np.ndarray:
    spec = TileSpec(
        target_mpp=0.5, tile_size_px=224, overlap_px=0, level=0, level_mpp=0.5, read_size_px=224,
        tile_size_level0=224, stride_level0=224, slide_mpp=0.5, effective_mpp=0.5,
    )  # fmt: skip
    features = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float16)
    coords = np.stack([np.arange(n) * 224, np.arange(n) * 224], axis=1)
    with TileFileWriter(
        path, tile_spec=spec, slide_dimensions=(5000, 5000), slide_id=path.stem,
        slide_path="/slides/a.svs", feature_dim=dim, encoder="vit_small_patch16_224",
    ) as writer:  # fmt: skip
        writer.append(features, coords)
        writer.finish()
    return features


def test_probe_reads_layout_of_milkit_and_clam_files(tmp_path: Path) -> None:
    _milkit_file(tmp_path / "a.h5", 5)
    _clam_file(tmp_path / "b.h5", 7, leading_axis=True)
    a, b = probe_bag(tmp_path / "a.h5"), probe_bag(tmp_path / "b.h5")
    assert (a.slide_id, a.n_tiles, a.feature_dim, a.format) == ("a", 5, 6, "milkit")
    assert a.encoder == "vit_small_patch16_224" and a.slide_path == "/slides/a.svs"
    assert (b.n_tiles, b.feature_dim, b.format, b.encoder) == (7, 8, "clam", None)


def test_probe_rejects_unfinished_files(tmp_path: Path) -> None:
    path = tmp_path / "a.h5"
    with h5py.File(path, "w") as file:
        file.attrs["milkit_version"] = "0.1.0"
        file["features"] = np.zeros((2, 3), np.float16)
        file["coords"] = np.zeros((2, 2), np.int64)
    with pytest.raises(FeatureFileError, match="unfinished"):
        probe_bag(path)


def test_dataset_reads_every_tile_in_the_stored_dtype(tmp_path: Path) -> None:
    stored = _milkit_file(tmp_path / "a.h5", 9)
    clam = _clam_file(tmp_path / "b.h5", 4, leading_axis=True)
    dataset = BagDataset([probe_bag(tmp_path / "a.h5"), probe_bag(tmp_path / "b.h5")], [1, 0])
    a, b = dataset[0], dataset[1]
    assert a.features.dtype == torch.float16 and torch.equal(a.features, torch.from_numpy(stored))
    assert a.coords.dtype == torch.int64 and a.coords[3].tolist() == [3 * 224, 3 * 224]
    assert (a.target, a.slide_id, a.slide_path) == (1, "a", "/slides/a.svs")
    assert torch.equal(b.features, torch.from_numpy(clam)) and b.coords.shape == (4, 2)


def test_subsampling_only_in_training_and_rows_stay_paired(tmp_path: Path) -> None:
    features = _clam_file(tmp_path / "a.h5", 50)
    info = probe_bag(tmp_path / "a.h5")
    train = BagDataset([info], [0], max_tiles=10, training=True)
    evaluation = BagDataset([info], [0], max_tiles=10, training=False)
    torch.manual_seed(0)
    first, second = train[0], train[0]
    assert len(first.features) == 10 and len(evaluation[0].features) == 50
    assert not torch.equal(first.coords, second.coords)  # a new subset every epoch
    rows = (first.coords[:, 0] // 256).numpy()
    assert np.array_equal(first.features.numpy(), features[rows])  # features match their coords
    assert np.all(np.diff(rows) > 0)  # kept in file order
    small = BagDataset([info], [0], max_tiles=80, training=True)[0]
    assert len(small.features) == 50


def test_a_drawn_seed_fixes_the_subsample(tmp_path: Path) -> None:
    _clam_file(tmp_path / "a.h5", 50)
    train = BagDataset([probe_bag(tmp_path / "a.h5")], [0], max_tiles=10, training=True)
    assert torch.equal(train[0, 7].coords, train[0, 7].coords)
    assert not torch.equal(train[0, 7].coords, train[0, 8].coords)


def test_training_draws_follow_the_seed_and_the_epoch() -> None:
    draws = TrainingDraws(12, seed=5)
    first = list(draws)  # epoch 0, then each iteration is the next epoch
    second = list(draws)
    draws.set_epoch(0)  # Lightning sets it (and a resumed run starts at its epoch)
    assert list(draws) == first and list(TrainingDraws(12, seed=5)) == first
    assert first != second and first != list(TrainingDraws(12, seed=6))
    assert sorted(index for index, _ in first) == list(range(12))  # a shuffle
    assert len({item_seed for _, item_seed in first}) == 12
    in_order = [index for index, _ in TrainingDraws(4, seed=5, shuffle=False)]
    assert in_order == [0, 1, 2, 3] and len(draws) == 12

    weighted = TrainingDraws(3, seed=0, draw_weights=[0.0, 1.0, 3.0])
    drawn = np.array([index for _ in range(100) for index, _ in weighted])
    assert len(drawn) == 300 and 0 not in drawn
    assert 0.2 < np.mean(drawn == 1) < 0.3  # in proportion to the weights
    with pytest.raises(ValueError, match="2 draw weights for 3 bags"):
        TrainingDraws(3, seed=0, draw_weights=[1.0, 1.0])


def test_handles_are_opened_lazily_and_never_pickled(tmp_path: Path) -> None:
    _clam_file(tmp_path / "a.h5", 3)
    dataset = BagDataset([probe_bag(tmp_path / "a.h5")])
    dataset[0]
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone._files._files == {}  # the copy opens its own handle on first use
    assert torch.equal(clone[0].features, dataset[0].features) and clone[0].target is None


def _item(n: int, dim: int = 4, target: int | float | None = 1, dtype=torch.float32) -> BagItem:
    return BagItem(
        features=torch.arange(n * dim, dtype=dtype).reshape(n, dim) + 1,
        coords=torch.arange(n * 2).reshape(n, 2),
        target=target,
        slide_id=f"s{n}",
        slide_path=None,
        feature_path=f"/f/s{n}.h5",
    )


def test_collate_pads_with_zeros_and_masks() -> None:
    batch = collate_bags([_item(3), _item(5, target=0), _item(1)])
    assert batch.features.shape == (3, 5, 4) and batch.coords.shape == (3, 5, 2)
    assert batch.mask.tolist() == [
        [True, True, True, False, False],
        [True] * 5,
        [True, False, False, False, False],
    ]
    assert torch.all(batch.features[0, 3:] == 0) and torch.all(batch.coords[2, 1:] == 0)
    assert torch.equal(batch.features[1], _item(5).features)
    assert batch.targets.dtype == torch.int64 and batch.targets.tolist() == [1, 0, 1]
    assert batch.slide_ids == ["s3", "s5", "s1"] and len(batch) == 3


def test_collate_single_bag_mixed_dtypes_and_missing_targets() -> None:
    single = collate_bags([_item(4, dtype=torch.float16)])
    assert single.features.shape == (1, 4, 4) and single.features.dtype == torch.float16
    assert single.mask.all()
    mixed = collate_bags([_item(2, dtype=torch.float16), _item(3, target=0.5)])
    assert mixed.features.dtype == torch.float32 and mixed.targets.dtype == torch.float32
    assert collate_bags([_item(2, target=None), _item(3)]).targets is None


def test_pad_bags_builds_mask_from_lengths() -> None:
    bags = [torch.ones(2, 3), 2 * torch.ones(4, 3)]
    features, mask = pad_bags(bags)
    assert features.shape == (2, 4, 3)
    assert mask.tolist() == [[True, True, False, False], [True, True, True, True]]
    assert torch.all(features[0, 2:] == 0) and torch.all(features[1] == 2)


def test_pad_bags_rejects_empty_and_mismatched_bags() -> None:
    with pytest.raises(BagBatchError, match="at least one bag"):
        pad_bags([])
    with pytest.raises(BagBatchError, match=r"\(0, 3\)"):
        pad_bags([torch.ones(2, 3), torch.ones(0, 3)])
    with pytest.raises(BagBatchError, match=r"\(2, 4\)"):
        pad_bags([torch.ones(2, 3), torch.ones(2, 4)])


def test_in_memory_bags_are_read_once_and_handed_out_as_copies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from milkit.data import bags as bags_module

    memory = bags_module.BagMemory(max_bytes=1 << 20)
    monkeypatch.setattr(bags_module, "BAG_MEMORY", memory)
    stored = _clam_file(tmp_path / "a.h5", 5)
    dataset = BagDataset([probe_bag(tmp_path / "a.h5")], in_memory=True)
    reads = []
    read_file = dataset._read_file
    monkeypatch.setattr(dataset, "_read_file", lambda info: reads.append(info) or read_file(info))
    first = dataset[0].features
    first[:] = -1  # a caller writing into its bag must not change the kept one
    assert torch.equal(dataset[0].features, torch.from_numpy(stored)) and len(reads) == 1
    assert memory.bytes == stored.nbytes + 5 * 2 * 8
    # a rewritten file (another size) is another bag
    rewritten = _clam_file(tmp_path / "new.h5", 7)
    (tmp_path / "new.h5").replace(tmp_path / "a.h5")
    dataset.bags = [probe_bag(tmp_path / "a.h5")]
    assert torch.equal(dataset[0].features, torch.from_numpy(rewritten)) and len(reads) == 2


def test_bag_memory_drops_the_least_recently_used_bag_beyond_its_budget() -> None:
    from milkit.data.bags import BagMemory

    def bag(n: int) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros((n, 10), np.float32), np.zeros((n, 2), np.int64)  # 56 bytes a tile

    memory = BagMemory(max_bytes=56 * 10)
    memory.get("a", lambda: bag(4))
    memory.get("b", lambda: bag(4))
    memory.get("a", lambda: pytest.fail("'a' is kept"))  # now 'b' is the oldest
    memory.get("c", lambda: bag(4))
    assert memory.bytes == 56 * 8
    assert memory.get("a", lambda: bag(99))[0].shape == (4, 10)  # still kept
    assert memory.get("b", lambda: bag(1))[0].shape == (1, 10)  # was dropped, read again
    memory.get("huge", lambda: bag(11))  # larger than the budget: read, never kept
    assert memory.bytes <= 56 * 10 and "huge" not in memory._bags
