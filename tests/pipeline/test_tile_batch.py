"""`milkit tile` over folders with bad input: record, go on, exit non-zero only on failure."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from milkit.cli import _tiling_job, build_parser, main
from milkit.errors import ConfigError
from milkit.features.h5 import file_status
from milkit.features.tile_file import read_coords
from milkit.pipeline.batch import parse_shard, take_shard
from milkit.pipeline.tile import tiling_hash
from milkit.slides.folder import find_slides, index_slides
from milkit.slides.tiling_options import TilingOptions, slide_tiling_options, tiling_flags
from milkit.ssl.tiles import find_slide_tiles
from milkit.synth import SlideParams, write_slide


def write_blob_image(
    path: Path, *, tissue: bool = True, size: tuple[int, int] = (1600, 1200)
) -> None:
    """A plain image: a pink ellipse (tissue) on noisy glass, or glass only."""
    width, height = size
    rng = np.random.default_rng(1)
    image = np.full((height, width, 3), 238, np.uint8) + rng.integers(
        0, 8, (height, width, 3), dtype=np.uint8
    )
    if tissue:
        yy, xx = np.mgrid[:height, :width]
        blob = ((xx - width / 2) / (width / 3)) ** 2 + ((yy - height / 2) / (height / 3)) ** 2 < 1
        image[blob] = (196, 110, 168)
    Image.fromarray(image).save(path)


def read_errors(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    slides = tmp_path / "slides"
    (slides / "nested").mkdir(parents=True)
    write_blob_image(slides / "good.png")
    write_blob_image(slides / "nested" / "glass.png", tissue=False)
    (slides / "empty.svs").write_bytes(b"")
    (slides / "readme.svs").write_text("not a slide\n")
    (slides / "notes.txt").write_text("ignored: not a slide extension\n")
    return slides


def test_bad_slides_are_recorded_and_the_batch_goes_on(
    mixed_folder: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    code = main(
        [
            "tile",
            str(mixed_folder),
            str(out),
            "--slide-mpp",
            "0.5",
            "--tile-size",
            "128",
            "--workers",
            "1",
        ]
    )
    assert code == 1
    errors = read_errors(out / "errors.csv")
    assert {Path(row["slide"]).name for row in errors} == {"empty.svs", "readme.svs"}
    assert all(row["stage"] == "tile" and row["error"] == "SlideOpenError" for row in errors)
    assert any("empty (0 bytes)" in row["message"] for row in errors)
    assert any("text file" in row["message"] for row in errors)
    # The good slide and the glass-only slide both finished; glass gives zero tiles, not an error.
    assert len(read_coords(out / "coords" / "good.h5").coords) > 0
    assert len(read_coords(out / "coords" / "glass.h5").coords) == 0
    summary = capsys.readouterr().out
    assert "no_tissue  1: glass" in summary and "failed     2" in summary
    # Each failure's message is on screen, not only in errors.csv.
    for row in errors:
        first_line = row["message"].splitlines()[0][:150]
        assert f"    {Path(row['slide']).stem}: {first_line}" in summary


def test_missing_mpp_fails_with_the_flag_to_use(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    write_blob_image(slides / "scan.png")
    out = tmp_path / "out"
    assert main(["tile", str(slides), str(out), "--workers", "1"]) == 1
    (row,) = read_errors(out / "errors.csv")
    assert row["error"] == "MissingMppError" and "--slide-mpp" in row["message"]
    # Per-slide resolutions from a CSV fix it.
    mpp_csv = tmp_path / "mpp.csv"
    mpp_csv.write_text("slide_id,mpp\nscan,0.5\n")
    assert main(["tile", str(slides), str(out), "--mpp-csv", str(mpp_csv), "--workers", "1"]) == 0
    assert read_errors(out / "errors.csv") == []


def test_bad_mpp_csv_lists_rows(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    mpp_csv = tmp_path / "mpp.csv"
    mpp_csv.write_text("slide_id,mpp\na,0.5\nb,abc\nc,-1\n")
    assert main(["tile", str(slides), str(tmp_path / "out"), "--mpp-csv", str(mpp_csv)]) == 2


def test_clean_run_exits_zero_and_rerun_skips(tmp_path: Path, capsys) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    write_blob_image(slides / "a.png")
    write_blob_image(slides / "b.png")
    out = tmp_path / "out"
    args = [
        "tile",
        str(slides),
        str(out),
        "--slide-mpp",
        "0.5",
        "--tile-size",
        "128",
        "--workers",
        "2",
    ]
    assert main(args) == 0
    mtime = (out / "coords" / "a.h5").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert "already done 2" in capsys.readouterr().out
    assert (out / "coords" / "a.h5").stat().st_mtime_ns == mtime
    # Other options make the old files stale: they are redone, not reused.
    assert main([*args, "--min-tissue", "0.9"]) == 0
    assert (out / "coords" / "a.h5").stat().st_mtime_ns != mtime
    assert (out / "thumbnails" / "a.png").is_file() and (out / "masks" / "a.png").is_file()


def test_coords_files_open_with_plain_h5py(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    write_blob_image(slides / "a.png", size=(2000, 1000))
    out = tmp_path / "out"
    assert (
        main(
            [
                "tile",
                str(slides),
                str(out),
                "--slide-mpp",
                "0.25",
                "--mpp",
                "0.5",
                "--tile-size",
                "100",
            ]
        )
        == 0
    )
    with h5py.File(out / "coords" / "a.h5", "r") as file:
        coords = file["coords"][:]
        assert coords.dtype == np.int64 and coords.shape[1] == 2
        assert file["coords"].attrs["patch_size_level0"] == 200
        assert file["coords"].attrs["patch_size"] == 100
        assert file.attrs["complete"]
        fractions = file["tissue_fraction"][:]
    assert (
        (coords >= 0).all()
        and (coords[:, 0] + 200 <= 2000).all()
        and (coords[:, 1] + 200 <= 1000).all()
    )
    assert (fractions >= 0.25).all()
    assert file_status(out / "coords" / "a.h5") == "complete"


def test_shards_are_disjoint_and_cover_the_list(tmp_path: Path) -> None:
    for name in ("c", "a", "e", "b", "d"):
        write_blob_image(tmp_path / f"{name}.png", size=(64, 64))
    slides = find_slides(tmp_path)
    assert [s.stem for s in slides] == ["a", "b", "c", "d", "e"]
    shards = [take_shard(slides, *parse_shard(f"{i}/3")) for i in range(3)]
    assert sorted(p for shard in shards for p in shard) == slides
    with pytest.raises(ConfigError, match="I/N"):
        parse_shard("3/3")


def test_tiling_flags_read_back_as_the_recorded_options(tmp_path: Path) -> None:
    options = TilingOptions(target_mpp=0.25, tile_size_px=256, overlap_px=16, min_tissue=0.1)
    for scan_mpp in (None, 0.2125):  # the file's own resolution, or one --slide-mpp for all
        recorded = {s: slide_tiling_options(options, scan_mpp) for s in ("a", "b")}
        flags, n_other = tiling_flags(recorded, tmp_path / "unused.csv")
        assert n_other == 0 and ("--slide-mpp" in flags) == (scan_mpp is not None)
        args = build_parser().parse_args(["tile", str(tmp_path), "O", *flags])
        parsed, _, _, per_slide = _tiling_job(args)
        assert per_slide is None and tiling_hash(parsed, None) == tiling_hash(options, scan_mpp)
    assert not (tmp_path / "unused.csv").exists()

    other = {"c": slide_tiling_options(TilingOptions(min_tissue=0.9), None)}
    assert tiling_flags({**recorded, **other}, tmp_path / "mpp.csv")[1] == 1
    assert "--mpp-csv" in tiling_flags({**recorded, **other}, tmp_path / "mpp.csv")[0]
    assert (tmp_path / "mpp.csv").read_text().splitlines() == [
        "slide_id,mpp",
        "a,0.2125",
        "b,0.2125",
    ]


def test_two_slides_with_one_id_are_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    slides = tmp_path / "slides"
    for site in ("siteA", "siteB"):
        (slides / site).mkdir(parents=True)
        write_blob_image(slides / site / "case1.png")
    write_blob_image(slides / "siteA" / "case2.png")
    out = tmp_path / "out"
    assert main(["tile", str(slides), str(out), "--slide-mpp", "0.5", "--workers", "1"]) == 2
    error = capsys.readouterr().err
    assert f"{slides / 'siteA' / 'case1.png'}, {slides / 'siteB' / 'case1.png'}" in error
    assert "'case1'" in error and "--slide-id-from relative-path" in error
    assert not (out / "coords").exists()  # nothing was done


def test_relative_path_ids_keep_slides_that_share_a_file_name_apart(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    for site, size in (("siteA", (1600, 1200)), ("siteB", (1200, 1600))):
        (slides / site).mkdir(parents=True)
        write_blob_image(slides / site / "case1.png", size=size)
    write_blob_image(slides / "siteA" / "case2.png")
    out = tmp_path / "out"
    flags = ["--slide-mpp", "0.5", "--workers", "1", "--slide-id-from", "relative-path"]
    assert main(["tile", str(slides), str(out), *flags]) == 0
    expected = {"siteA__case1": "siteA", "siteA__case2": "siteA", "siteB__case1": "siteB"}
    assert {path.stem for path in (out / "coords").glob("*.h5")} == set(expected)
    with h5py.File(out / "coords" / "siteB__case1.h5") as file:
        assert file.attrs["slide_id"] == "siteB__case1"
        assert file.attrs["slide_path"] == str(slides / "siteB" / "case1.png")
    # Later stages find each slide by the id its files carry; the shared stem finds none.
    index = index_slides(slides)
    assert index["siteB__case1"] == slides / "siteB" / "case1.png"
    assert index["case2"] == slides / "siteA" / "case2.png" and "case1" not in index
    found = {tiles.slide_id: tiles.slide_path for tiles in find_slide_tiles(out / "coords", slides)}
    assert found == {
        slide_id: slides / site / f"{slide_id[7:]}.png" for slide_id, site in expected.items()
    }
    # The same ids on a rerun: every slide is found done, and features carry them too.
    assert main(["tile", str(slides), str(out), *flags]) == 0
    with (out / "tile_log.csv").open(newline="") as handle:
        assert {row["outcome"] for row in csv.DictReader(handle)} == {"skipped"}
    encoder = ["--encoder", "test_vit", "--random-weights", "--num-workers", "0"]
    assert main(["preprocess", str(slides), str(out), *flags[:2], *flags[4:], *encoder]) == 0
    assert {path.stem for path in (out / "features").glob("*.h5")} == set(expected)


def test_unreadable_slides_are_named_with_the_fix_and_the_batch_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    good = write_slide(slides / "good.svs", SlideParams(seed=1), size_px=(1500, 1500)).slide_path
    data = good.read_bytes()
    (slides / "cut.svs").write_bytes(data[: len(data) // 2])  # an interrupted copy
    write_blob_image(tmp_path / "scan.png")
    (slides / "renamed.svs").write_bytes((tmp_path / "scan.png").read_bytes())
    Image.fromarray(np.full((600, 800, 3), 200, np.uint8)).save(slides / "tma.tif", dpi=(72, 72))
    (slides / "locked.svs").write_bytes(data)
    real_access = os.access
    monkeypatch.setattr(  # root reads anything: the file system's refusal, as a user meets it
        os, "access", lambda path, mode: "locked" not in str(path) and real_access(path, mode)
    )
    out = tmp_path / "out"
    assert main(["tile", str(slides), str(out), "--workers", "1"]) == 1
    messages = {Path(row["slide"]).name: row["message"] for row in read_errors(out / "errors.csv")}
    assert "the TIFF is cut short" in messages["cut.svs"] and "Copy it again" in messages["cut.svs"]
    assert "a PNG image named .svs: rename it to renamed.png" in messages["renamed.svs"]
    assert "352.8 µm/px, which no slide scanner gives" in messages["tma.tif"]
    assert "--slide-mpp" in messages["tma.tif"]
    assert "no permission to read it" in messages["locked.svs"]
    assert all(str(slides / name) in message for name, message in messages.items())
    assert len(read_coords(out / "coords" / "good.h5").coords) > 0  # the rest went on


def test_a_fluorescence_scan_is_warned_about_not_silently_empty(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    nuclei = np.zeros((900, 1200, 3), np.uint8)  # DAPI-like: blue nuclei on black
    rng = np.random.default_rng(0)
    for x, y in rng.integers(50, 850, (60, 2)):
        nuclei[y - 6 : y + 6, x - 6 : x + 6, 2] = 220
    Image.fromarray(nuclei).save(slides / "dapi.png")
    write_blob_image(slides / "he.png")
    out = tmp_path / "out"
    assert main(["tile", str(slides), str(out), "--slide-mpp", "0.5", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "dapi: its background is dark (a fluorescence scan?)" in printed
    assert "made for brightfield slides" in printed and "he: its background" not in printed


def test_thumbnails_are_large_enough_to_judge_the_mask(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    write_blob_image(slides / "large.png", size=(2400, 1800))
    write_blob_image(slides / "small.png", size=(600, 500))
    out = tmp_path / "out"
    assert main(["tile", str(slides), str(out), "--slide-mpp", "0.5", "--workers", "1"]) == 0
    # 1024 px on the long side, or the slide's own size; the mask stays at detection resolution.
    assert Image.open(out / "thumbnails" / "large.png").size == (1024, 768)
    assert Image.open(out / "thumbnails" / "small.png").size == (600, 500)
    assert max(Image.open(out / "masks" / "large.png").size) == 2400 * 0.5 / 4
    # The contour is drawn on the large view: green pixels around the pink ellipse.
    thumbnail = np.asarray(Image.open(out / "thumbnails" / "large.png").convert("RGB"))
    green = (thumbnail[..., 1] > 150) & (thumbnail[..., 0] < 100) & (thumbnail[..., 2] < 100)
    rows, cols = np.nonzero(green)
    assert green.sum() > 500
    assert abs(cols.min() - 1024 / 6) < 12 and abs(cols.max() - 1024 * 5 / 6) < 12
