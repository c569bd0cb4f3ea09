"""Tests of milkit.features.tile_file: atomic writing, status, hashing and format conversion."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

import milkit
from milkit.errors import ConfigError, FeatureFileError
from milkit.features.h5 import file_status, is_complete
from milkit.features.tile_file import (
    TileFileWriter,
    read_bag,
    read_coords,
    read_features_dim,
    read_header,
    write_coords_file,
)
from milkit.slides.tiling import TileSpec

SPEC = TileSpec(
    target_mpp=0.5,
    tile_size_px=224,
    overlap_px=0,
    level=1,
    level_mpp=0.5,
    read_size_px=224,
    tile_size_level0=448,
    stride_level0=448,
    slide_mpp=0.25,
    effective_mpp=0.5,
)
DIMS = (10_000, 8_000)


def _writer(path: Path, dim: int | None = 8, **kwargs: object) -> TileFileWriter:
    return TileFileWriter(
        path,
        tile_spec=SPEC,
        slide_dimensions=DIMS,
        slide_id=path.name.removesuffix(".h5"),
        slide_path=f"/slides/{path.stem}.svs",
        feature_dim=dim,
        encoder="vit_small_patch16_224",
        **kwargs,
    )


def _rows(rng: np.random.Generator, n: int, dim: int = 8) -> tuple[np.ndarray, np.ndarray]:
    features = rng.normal(size=(n, dim)).astype(np.float32)
    coords = rng.integers(0, 9_000, size=(n, 2))
    return features, coords


def _write(path: Path, n: int = 30, config: str | None = "abc") -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    features, coords = _rows(rng, n)
    with _writer(path, config_hash=config) as writer:
        writer.append(features, coords)
        writer.finish()
    return features, coords


def test_round_trip_in_chunks_keeps_values_and_attrs(tmp_path: Path) -> None:
    path = tmp_path / "slide_a.h5"
    rng = np.random.default_rng(1)
    parts = [_rows(rng, n) for n in (7, 0, 13, 5)]
    tissue = [rng.random(len(c)).astype(np.float32) for _, c in parts]
    with _writer(
        path, config_hash="h1", with_tissue_fraction=True, extra_attrs={"qc": {"a": 1}}
    ) as w:
        for (features, coords), fraction in zip(parts, tissue, strict=True):
            w.append(features, coords, fraction)
        assert w.num_rows == 25
        assert not path.exists()  # nothing visible before finish
        assert w.finish() == path
    assert not path.with_name("slide_a.h5.tmp").exists()

    bag = read_bag(path)
    features = np.concatenate([f for f, _ in parts])
    coords = np.concatenate([c for _, c in parts])
    assert bag.format == "milkit" and bag.coords_unit == "level0_px"
    assert bag.features.dtype == np.float32 and bag.features.shape == (25, 8)
    np.testing.assert_allclose(bag.features, features, rtol=1e-3, atol=1e-3)
    assert bag.coords.dtype == np.int64
    np.testing.assert_array_equal(bag.coords, coords)
    np.testing.assert_array_equal(bag.tissue_fraction, np.concatenate(tissue))
    assert bag.tile_size_level0 == 448 and bag.mpp == 0.5
    assert bag.tile_spec == SPEC
    assert bag.attrs["slide_id"] == "slide_a" and bag.attrs["encoder_dim"] == 8
    assert bag.attrs["milkit_version"] == milkit.__version__
    assert bag.attrs["config_hash"] == "h1" and bag.attrs["complete"] is True
    assert json.loads(bag.attrs["qc"]) == {"a": 1}
    assert bag.coords_attrs == SPEC.coords_attrs(DIMS)

    with h5py.File(path, "r") as f:  # what CLAM and TRIDENT readers look at
        assert f["features"].dtype == np.float16 and f["features"].shape == (25, 8)
        assert f["coords"].shape == (25, 2)
        assert f["coords"].attrs["patch_size_level0"] == 448
        assert f["coords"].attrs["patch_size"] == 224
        assert f["coords"].attrs["target_magnification"] == pytest.approx(20.0)
        assert f["coords"].attrs["level0_width"] == DIMS[0]
        assert f["skipped_coords"].shape == (0, 2)


def test_float32_storage_is_exact(tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    features, coords = _rows(np.random.default_rng(2), 9)
    with _writer(path, dtype="float32") as w:
        w.append(features, coords)
        w.finish()
    np.testing.assert_array_equal(read_bag(path).features, features)
    assert read_features_dim(path) == 8


def test_streaming_appends_grow_a_chunked_dataset(tmp_path: Path) -> None:
    path = tmp_path / "big.h5"
    rng = np.random.default_rng(3)
    with _writer(path, dim=16) as w:
        for i in range(10):
            features = np.full((1000, 16), i, np.float32)
            w.append(features, rng.integers(0, 100, size=(1000, 2)))
        w.finish()
    with h5py.File(path, "r") as f:
        ds = f["features"]
        assert ds.shape == (10_000, 16)
        assert ds.chunks is not None and ds.chunks[1] == 16 and ds.chunks[0] < 10_000
        assert ds.maxshape == (None, 16)
    bag = read_bag(path)
    np.testing.assert_array_equal(bag.features[::1000, 0], np.arange(10))


def test_skipped_tiles_are_recorded(tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    features, coords = _rows(np.random.default_rng(4), 3)
    with _writer(path) as w:
        w.append(features, coords)
        w.skip([[10, 20], [30, 40]], "corrupt JPEG tile")
        w.skip(np.array([[50, 60]]), "I/O error")
        w.finish()
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["skipped_coords"][()], [[10, 20], [30, 40], [50, 60]])
        reasons = [r.decode() for r in f["skipped_reasons"][()]]
    assert reasons == ["corrupt JPEG tile", "corrupt JPEG tile", "I/O error"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failure_inside_writer_leaves_no_file(tmp_path: Path, error: type[BaseException]) -> None:
    path = tmp_path / "s.h5"
    features, coords = _rows(np.random.default_rng(5), 4)
    with pytest.raises(error), _writer(path) as w:
        w.append(features, coords)
        assert w.tmp_path == tmp_path / "s.h5.tmp" and w.tmp_path.exists()
        raise error("boom")
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    _write(path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError), _writer(path) as w:
        w.append(*_rows(np.random.default_rng(6), 2))
        raise RuntimeError("encoder crashed")
    assert path.read_bytes() == before
    assert not (tmp_path / "s.h5.tmp").exists()


def test_leaving_without_finish_discards(tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    with _writer(path) as w:
        w.append(*_rows(np.random.default_rng(7), 2))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FeatureFileError, match="finished or discarded"):
        w.append(*_rows(np.random.default_rng(7), 2))


def test_append_rejects_bad_shapes_and_fp16_overflow(tmp_path: Path) -> None:
    with _writer(tmp_path / "s.h5") as w:
        features, coords = _rows(np.random.default_rng(8), 5)
        with pytest.raises(FeatureFileError, match=r"shape \(5, 8\)"):
            w.append(features[:4], coords)
        with pytest.raises(FeatureFileError, match="integers"):
            w.append(features, coords.astype(float))
        with pytest.raises(FeatureFileError, match="float32"):
            w.append(features * 1e6, coords)
        with pytest.raises(FeatureFileError, match="with_tissue_fraction"):
            w.append(features, coords, np.ones(5))
        assert w.num_rows == 0
    with pytest.raises(ConfigError, match="reserved"):
        _writer(tmp_path / "t.h5", extra_attrs={"complete": True})
    with pytest.raises(ConfigError, match="float16 or float32"):
        _writer(tmp_path / "t.h5", dtype="int8")


def test_status(tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    assert file_status(path) == "missing"
    _write(path, config="abc")
    assert file_status(path) == "complete" and file_status(path, config_hash="abc") == "complete"
    assert file_status(path, config_hash="xyz") == "stale"
    assert is_complete(path, "abc") and not is_complete(path, "xyz")

    unfinished = tmp_path / "u.h5"
    with h5py.File(unfinished, "w") as f:
        f.attrs["milkit_version"] = "0.1.0"
        f["coords"] = np.zeros((2, 2), np.int64)
        f["features"] = np.zeros((2, 8), np.float16)
    assert file_status(unfinished) == "incomplete" and not is_complete(unfinished)
    with pytest.raises(FeatureFileError, match="u.h5.*unfinished.*milkit preprocess"):
        read_bag(unfinished)

    text = tmp_path / "t.h5"
    text.write_text("not hdf5")
    assert file_status(text) == "corrupt"
    with pytest.raises(FeatureFileError, match="t.h5 is not a readable HDF5"):
        read_bag(text)

    truncated = tmp_path / "cut.h5"
    truncated.write_bytes(path.read_bytes()[:1500])
    assert file_status(truncated) == "corrupt"
    with pytest.raises(FeatureFileError, match="cut.h5"):
        read_bag(truncated)
    with pytest.raises(FeatureFileError, match="no such file"):
        read_bag(tmp_path / "nope.h5")


def test_coordinate_file(tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    coords = np.array([[0, 0], [448, 0], [0, 448]])
    fraction = np.array([1.0, 0.5, 0.25])
    out = write_coords_file(
        path, coords, fraction, tile_spec=SPEC, slide_dimensions=DIMS, slide_id="s",
        slide_path="/slides/s.svs", config_hash="t1", extra_attrs={"tissue_method": "otsu"},
    )  # fmt: skip
    assert out == path and file_status(path, config_hash="t1") == "complete"
    tiles = read_coords(path)
    np.testing.assert_array_equal(tiles.coords, coords)
    np.testing.assert_array_equal(tiles.tissue_fraction, fraction.astype(np.float32))
    assert tiles.tile_spec == SPEC and tiles.attrs["tissue_method"] == "otsu"
    assert "encoder" not in tiles.attrs
    with pytest.raises(FeatureFileError, match="coordinate file without features"):
        read_bag(path)
    with pytest.raises(FeatureFileError, match="coordinate file without features"):
        read_features_dim(path)


def test_the_header_gives_size_and_attributes_without_the_arrays(tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    _write(path, n=30, config="abc")
    header = read_header(path)
    assert header.n_tiles == 30 == len(read_coords(path).coords)
    assert header.attrs == read_coords(path).attrs and header.attrs["config_hash"] == "abc"
    clam = tmp_path / "clam.h5"
    with h5py.File(clam, "w") as f:
        f["features"] = np.zeros((1, 7, 4), np.float32)  # CLAM's (1, N, D) layout
        f["coords"] = np.zeros((1, 7, 2), np.int64)
    assert read_header(clam).n_tiles == 7
    unfinished = tmp_path / "u.h5"
    with h5py.File(unfinished, "w") as f:
        f.attrs["milkit_version"] = "0.1.0"
        f["coords"] = np.zeros((2, 2), np.int64)
    with pytest.raises(FeatureFileError, match="unfinished"):
        read_header(unfinished)


@pytest.mark.parametrize("leading_one", [False, True])
def test_reads_clam_files(tmp_path: Path, leading_one: bool) -> None:
    path = tmp_path / "clam.h5"
    features, coords = _rows(np.random.default_rng(9), 6, dim=1024)
    with h5py.File(path, "w") as f:
        f["features"] = features[None] if leading_one else features
        f["coords"] = coords.astype(np.int32)[None] if leading_one else coords.astype(np.int32)
    bag = read_bag(path)
    assert bag.format == "clam" and bag.features.shape == (6, 1024)
    np.testing.assert_array_equal(bag.features, features)
    assert bag.coords.dtype == np.int64
    np.testing.assert_array_equal(bag.coords, coords)
    assert bag.tile_size_level0 is None and bag.mpp is None and bag.tile_spec is None
    assert read_features_dim(path) == 1024


def test_clam_coords_attrs_give_level0_tile_size(tmp_path: Path) -> None:
    path = tmp_path / "clam.h5"
    features, coords = _rows(np.random.default_rng(10), 3)
    with h5py.File(path, "w") as f:
        f["features"] = features
        f["coords"] = coords
        f["coords"].attrs.update({"patch_size": 256, "patch_level": 1, "downsample": [4.0, 4.0]})
    assert read_bag(path).tile_size_level0 == 1024


def test_reads_trident_files(tmp_path: Path) -> None:
    path = tmp_path / "trident.h5"
    features, coords = _rows(np.random.default_rng(11), 4)
    with h5py.File(path, "w") as f:
        f["features"] = features.astype(np.float16)
        f["coords"] = coords
        f["coords"].attrs.update(
            {"patch_size": 256, "patch_size_level0": 512, "target_magnification": 20,
             "level0_magnification": 40, "overlap": 0}
        )  # fmt: skip
    bag = read_bag(path)
    assert bag.format == "trident" and bag.tile_size_level0 == 512 and bag.mpp is None
    assert bag.features.dtype == np.float32
    np.testing.assert_allclose(bag.features, features, atol=1e-2)
    np.testing.assert_array_equal(bag.coords, coords)


def test_reads_stamp_files_converting_microns(tmp_path: Path) -> None:
    coords_um = np.array([[0.0, 0.0], [256.0, 0.0], [256.0, 512.0]])
    features = np.random.default_rng(12).normal(size=(3, 8)).astype(np.float16)
    path = tmp_path / "stamp.h5"
    with h5py.File(path, "w") as f:
        f["feats"] = features
        f["coords"] = coords_um
        f.attrs.update(
            {"stamp_version": "2.2", "unit": "um", "tile_size_um": 256.0, "tile_size_px": 224}
        )
    bag = read_bag(path)  # slide mpp unknown: micron coords kept as such
    assert bag.format == "stamp" and bag.coords_unit == "um" and bag.tile_size_level0 is None
    np.testing.assert_array_equal(bag.coords, coords_um)
    assert bag.mpp == pytest.approx(256 / 224)
    np.testing.assert_array_equal(bag.features, features.astype(np.float32))

    converted = read_bag(path, slide_mpp=0.5)
    assert converted.coords_unit == "level0_px" and converted.coords.dtype == np.int64
    np.testing.assert_array_equal(converted.coords, [[0, 0], [512, 0], [512, 1024]])
    assert converted.tile_size_level0 == 512

    with h5py.File(path, "a") as f:
        f.attrs["slide_mpp"] = 0.25
    from_attr = read_coords(path)
    np.testing.assert_array_equal(from_attr.coords, coords_um * 4)
    assert from_attr.tile_size_level0 == 1024


def test_mismatched_rows_and_unknown_layouts_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        f["features"] = np.zeros((5, 8), np.float32)
        f["coords"] = np.zeros((4, 2), np.int64)
    with pytest.raises(FeatureFileError, match=r"bad.h5.*\(5, 8\).*4 coords"):
        read_bag(path)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["embeddings"] = np.zeros((5, 8), np.float32)
    with pytest.raises(FeatureFileError, match="other.h5: not a tile file"):
        read_coords(other)


def test_stamp_rejects_a_nonpositive_slide_mpp(tmp_path: Path) -> None:
    path = tmp_path / "stamp.h5"
    with h5py.File(path, "w") as f:
        f["feats"] = np.zeros((2, 4), np.float16)
        f["coords"] = np.zeros((2, 2))
    with pytest.raises(ConfigError, match="slide_mpp must be a positive"):
        read_bag(path, slide_mpp=0.0)
