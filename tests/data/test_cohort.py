"""A cohort is checked as a whole: every labels and feature-file problem in one message."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from milkit.data.cohort import load_cohort
from milkit.errors import FeatureFileError, LabelsError


def _bag(folder: Path, slide_id: str, n: int = 4, dim: int = 8, encoder: str | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / f"{slide_id}.h5", "w") as file:
        file["features"] = np.ones((n, dim), np.float32)
        file["coords"] = np.zeros((n, 2), np.int64)
        if encoder:
            file.attrs["encoder"] = encoder


def _labels(tmp_path: Path, rows: list[str]) -> Path:
    path = tmp_path / "labels.csv"
    path.write_text("slide_id,label\n" + "\n".join(rows) + "\n")
    return path


def test_good_cohort(tmp_path: Path) -> None:
    for slide_id in ("a", "b", "c"):
        _bag(tmp_path / "f", slide_id)
    cohort = load_cohort(
        tmp_path / "f", _labels(tmp_path, ["a,pos", "b,neg", "c,pos"]), target="label"
    )
    assert cohort.class_names == ("neg", "pos") and cohort.feature_dim == 8
    assert cohort.targets() == [1, 0, 1]
    assert [bag.slide_id for bag in cohort.bags] == ["a", "b", "c"]


def test_label_and_file_problems_are_reported_together(tmp_path: Path) -> None:
    features = tmp_path / "f"
    _bag(features, "a", dim=8)
    _bag(features, "b", dim=8)
    _bag(features, "c", dim=16)  # other feature size
    _bag(features, "d", n=0)  # empty bag: a problem when strict
    _bag(features, "e", dim=8)
    csv = _labels(tmp_path, ["a,pos", "b,neg", "c,pos", "d,neg", "e,", "ghost,pos"])
    with pytest.raises(LabelsError) as info:
        load_cohort(features, csv, target="label", strict=True)
    message = str(info.value)
    assert "4 problem(s)" in message
    assert "line 4: slide 'c': feature size 16 differs from 8" in message
    assert "line 5: slide 'd': empty bag" in message
    assert "line 6: slide 'e': missing target" in message
    assert f"line 7: slide 'ghost' has no feature file ({features / 'ghost.h5'})" in message


def test_slides_without_tiles_are_left_out_and_named(
    tmp_path: Path, write_tileless: Callable[[Path, str], Path]
) -> None:
    out = tmp_path / "preprocessed"  # milkit preprocess's layout: features/ and coords/
    for slide_id in ("a", "b", "c"):
        _bag(out / "features", slide_id)
    _bag(out / "features", "empty", n=0)  # a feature file without tiles (as other tools write)
    write_tileless(out / "coords", "glass")  # tiled, no tissue: no feature file written
    _bag(out / "features", "unlisted")  # a feature file the labels CSV does not name
    rows = ["a,pos", "glass,neg", "b,neg", "empty,pos", "c,pos"]
    cohort = load_cohort(out / "features", _labels(tmp_path, rows), target="label")
    assert cohort.unlabelled == ("unlisted",)
    assert cohort.notes()[1] == (
        f"1 feature file(s) have no row in {tmp_path / 'labels.csv'} and are not used: unlisted"
    )
    assert [row.slide_id for row in cohort.rows] == [bag.slide_id for bag in cohort.bags]
    assert [row.slide_id for row in cohort.rows] == ["a", "b", "c"]
    assert cohort.targets() == [1, 0, 1]
    assert [(row.slide_id, row.line) for row in cohort.left_out] == [("glass", 3), ("empty", 5)]
    assert cohort.left_out_line() == (
        f"left out 2 slide(s) of {tmp_path / 'labels.csv'} without tiles (no tissue found): "
        "glass (line 3), empty (line 5); --data.strict true refuses them instead"
    )
    with pytest.raises(LabelsError) as info:
        load_cohort(out / "features", tmp_path / "labels.csv", target="label", strict=True)
    assert "line 3: slide 'glass' has no feature file" in str(info.value)
    assert "(its tiling found no tissue)" in str(info.value)
    assert "line 5: slide 'empty': empty bag" in str(info.value)
    only_glass = _labels(tmp_path, ["glass,neg", "empty,pos"])
    with pytest.raises(FeatureFileError, match="none of the cohort's 2 slides has tiles"):
        load_cohort(out / "features", only_glass, target="label")


def test_whole_numbers_written_as_decimals_are_one_class(tmp_path: Path) -> None:
    for slide_id in ("a", "b", "c", "d"):
        _bag(tmp_path / "f", slide_id)
    labels = _labels(tmp_path, ["a,0", "b,1", "c,1.0", "d,0.0"])  # as a spreadsheet exports
    cohort = load_cohort(tmp_path / "f", labels, target="label")
    assert cohort.class_names == ("0", "1") and cohort.targets() == [0, 1, 1, 0]


def test_only_file_problems_raise_feature_file_error(tmp_path: Path) -> None:
    features = tmp_path / "f"
    _bag(features, "a", encoder="vit_s")
    _bag(features, "b", encoder="vit_s")
    _bag(features, "c", encoder="uni")
    (features / "d.h5").write_bytes(b"not hdf5")
    csv = _labels(tmp_path, ["a,pos", "b,neg", "c,pos", "d,neg"])
    with pytest.raises(FeatureFileError) as info:
        load_cohort(features, csv, target="label")
    message = str(info.value)
    assert "line 4: slide 'c': encoder 'uni' differs from 'vit_s'" in message
    assert "line 5: slide 'd':" in message and "not a readable HDF5 file" in message


def test_a_single_class_cannot_be_classified(tmp_path: Path) -> None:
    _bag(tmp_path / "f", "a")
    _bag(tmp_path / "f", "b")
    with pytest.raises(
        LabelsError, match=r"need at least two classes to classify, found \['pos'\]"
    ):
        load_cohort(tmp_path / "f", _labels(tmp_path, ["a,pos", "b,pos"]), target="label")


def test_unlabelled_folder_takes_every_finished_file(tmp_path: Path) -> None:
    _bag(tmp_path / "f", "b")
    _bag(tmp_path / "f", "a")
    (tmp_path / "f" / "c.h5.tmp").write_bytes(b"half written")
    cohort = load_cohort(tmp_path / "f", None, target="label", class_names=["neg", "pos"])
    assert [row.slide_id for row in cohort.rows] == ["a", "b"]
    assert cohort.targets() is None and cohort.class_names == ("neg", "pos")
    with pytest.raises(FeatureFileError, match="no such folder"):
        load_cohort(tmp_path / "missing", None, target="label")
