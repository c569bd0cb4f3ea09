"""`milkit synth` -> `milkit tile` end to end, against the synthetic ground truth."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from milkit.cli import main
from milkit.features.h5 import file_status
from milkit.features.tile_file import read_coords
from milkit.pipeline.tile import TilingOptions, tile_slide
from milkit.slides.reader import open_slide
from milkit.synth import SlideParams, load_truth, tile_truth, write_slide

SIZE_PX = 2400


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    assert (
        main(
            [
                "synth",
                str(out),
                "--n-slides",
                "4",
                "--seed",
                "3",
                "--size-px",
                str(SIZE_PX),
                str(SIZE_PX),
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def tiled(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiles")
    assert (
        main(
            [
                "tile",
                str(cohort / "slides"),
                str(out),
                "--mpp",
                "0.5",
                "--tile-size",
                "112",
                "--workers",
                "2",
            ]
        )
        == 0
    )
    return out


def test_slides_open_with_recorded_mpp(cohort: Path) -> None:
    slides = sorted((cohort / "slides").iterdir())
    assert len(slides) == 4
    for path in slides:
        with open_slide(path) as reader:
            assert reader.mpp == pytest.approx(0.5)
            assert reader.dimensions == (SIZE_PX, SIZE_PX)
            assert reader.level_count >= 3


def test_kept_tiles_hold_tissue_and_lie_inside(cohort: Path, tiled: Path) -> None:
    for truth_path in sorted((cohort / "truth").glob("*.h5")):
        coords = read_coords(tiled / "coords" / f"{truth_path.stem}.h5")
        size = coords.tile_size_level0
        assert len(coords.coords) > 20
        assert (coords.coords >= 0).all() and (coords.coords + size <= SIZE_PX).all()
        fractions = tile_truth(load_truth(truth_path), coords.coords, size).tissue_fraction
        # One tile of boundary slack: detection works on a thumbnail, truth at its own scale.
        assert (fractions < 0.25 - 0.05).sum() <= 1, truth_path.stem
        with h5py.File(coords.path, "r") as file:  # plain h5py is enough to read them
            assert file["coords"].dtype == np.int64 and file.attrs["complete"]


def test_coarser_tiling_of_a_finer_scan_covers_the_same_area(tmp_path: Path) -> None:
    params = SlideParams(seed=11, artefacts=False)
    fine = write_slide(tmp_path / "fine.svs", params, mpp=0.25, size_um=(1200, 1200))
    coarse = write_slide(tmp_path / "coarse.svs", params, mpp=0.5, size_um=(1200, 1200))
    options = TilingOptions(target_mpp=0.5, tile_size_px=112)
    result_fine = tile_slide(fine.slide_path, tmp_path / "out", options)
    result_coarse = tile_slide(coarse.slide_path, tmp_path / "out", options)
    spec_fine = read_coords(tmp_path / "out" / "coords" / "fine.h5").tile_spec
    spec_coarse = read_coords(tmp_path / "out" / "coords" / "coarse.h5").tile_spec
    assert spec_fine.tile_size_level0 == 2 * spec_coarse.tile_size_level0 == 224
    assert spec_fine.effective_mpp == spec_coarse.effective_mpp == 0.5
    # Same physical grid: tiles in µm agree, and so does the number of tissue tiles (± a few).
    fine_um = read_coords(tmp_path / "out" / "coords" / "fine.h5").coords * 0.25
    coarse_um = read_coords(tmp_path / "out" / "coords" / "coarse.h5").coords * 0.5
    shared = {tuple(c) for c in fine_um.tolist()} & {tuple(c) for c in coarse_um.tolist()}
    assert len(shared) >= 0.9 * max(result_fine.n_tiles, result_coarse.n_tiles)


def _truncate(source: Path, target: Path, keep: float) -> None:
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * keep)])


def _corrupt_first_tile_with_tissue(path: Path) -> None:
    """Overwrite the JPEG data of level-0 tiles in the middle of the slide with garbage."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offsets, counts = page.dataoffsets, page.databytecounts
    middle = len(offsets) // 2
    with path.open("r+b") as handle:
        for index in range(middle - 2, middle + 2):
            handle.seek(offsets[index])
            handle.write(b"\x00\xff" * (counts[index] // 2))


def test_truncated_and_corrupt_slides_are_recorded(cohort: Path, tmp_path: Path) -> None:
    source = sorted((cohort / "slides").iterdir())[0]
    slides = tmp_path / "slides"
    slides.mkdir()
    _truncate(source, slides / "truncated.svs", keep=0.3)
    corrupt = slides / "corrupt.svs"
    corrupt.write_bytes(source.read_bytes())
    _corrupt_first_tile_with_tissue(corrupt)
    out = tmp_path / "out"
    code = main(["tile", str(slides), str(out), "--workers", "1"])
    with (out / "errors.csv").open(newline="") as handle:
        errors = {Path(row["slide"]).name: row for row in csv.DictReader(handle)}
    assert code == 1
    assert "truncated.svs" in errors
    assert errors["truncated.svs"]["error"] in {"SlideOpenError", "SlideReadError"}
    # The corrupt level-0 tiles are not read when tiling (the thumbnail comes from a coarser level),
    # so the slide tiles fine; reading one of those tiles fails with a SlideReadError that names it.
    assert "corrupt.svs" not in errors
    from milkit.errors import SlideReadError
    from milkit.slides.tiling import read_tile

    coords = read_coords(out / "coords" / "corrupt.h5")
    with open_slide(corrupt) as reader:
        failures = 0
        for xy in coords.coords:
            try:
                read_tile(reader, coords.tile_spec, tuple(xy))
            except SlideReadError as exc:
                assert "corrupt.svs" in str(exc)
                failures += 1
        assert 0 < failures < len(coords.coords)  # and later tiles still read after a failure


@pytest.mark.slow
def test_killed_run_resumes_without_redoing_finished_slides(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    for index in range(6):
        write_slide(
            slides / f"s{index}.svs", SlideParams(seed=index, artefacts=False), size_px=(3000, 3000)
        )
    out = tmp_path / "out"
    command = [sys.executable, "-m", "milkit.cli", "tile", str(slides), str(out), "--workers", "1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((out / "coords").glob("*.h5"))) < 2:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "coords").glob("*.h5")}
    assert 2 <= len(finished) < 6, "the run should have been killed part-way"
    for path in finished:
        assert file_status(out / "coords" / path) == "complete"

    assert subprocess.run(command, capture_output=True).returncode == 0
    after = {p.name: p.stat().st_mtime_ns for p in (out / "coords").glob("*.h5")}
    assert len(after) == 6
    assert all(after[name] == mtime for name, mtime in finished.items())
    assert not list(out.rglob("*.tmp"))
    assert all(file_status(out / "coords" / name) == "complete" for name in after)
    with (out / "tile_log.csv").open(newline="") as handle:
        outcomes = {row["slide_id"]: row["outcome"] for row in csv.DictReader(handle)}
    assert sorted(o for o in outcomes.values()) == sorted(
        ["skipped"] * len(finished) + ["done"] * (6 - len(finished))
    )
    os.sync()
