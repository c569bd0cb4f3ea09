"""`milkit preprocess`: features equal the model's, resume, staleness, multi-process, bad input."""

from __future__ import annotations

import csv
import errno
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import tifffile
import torch

from milkit.cli import main
from milkit.data.cohort import load_cohort
from milkit.errors import EncoderError, FeatureFileError
from milkit.features.encoders import Encoder, load_encoder
from milkit.features.extract import ExtractionOptions, ExtractionTiming
from milkit.features.h5 import file_status
from milkit.features.tile_file import read_bag, read_coords
from milkit.pipeline.batch import ErrorLog
from milkit.pipeline.jobs import features_path
from milkit.pipeline.preprocess import run_preprocess
from milkit.pipeline.tile import TilingOptions
from milkit.slides.reader import READER_ENV, open_slide
from milkit.slides.tiling import read_tile
from milkit.synth import SlideParams, write_slide

TILING = TilingOptions(target_mpp=1.0, tile_size_px=96)
OPTIONS = ExtractionOptions(batch_size=16, num_workers=0, precision="fp32")


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("slides")
    for index in range(3):
        write_slide(
            folder / f"s{index}.svs",
            SlideParams(seed=20 + index, artefacts=False),
            size_px=(2000, 2000),
        )
    return folder


def tiny_encoder(seed: int = 0) -> Encoder:
    return load_encoder("test_vit", pretrained=False, seed=seed)


def preprocess(slides: Path, out: Path, encoder: Encoder, **kwargs) -> tuple:
    return run_preprocess(
        sorted(slides.glob("*.svs")), out, encoder, tiling=kwargs.pop("tiling", TILING),
        extraction=kwargs.pop("extraction", OPTIONS), show_progress=False, **kwargs,
    )  # fmt: skip


def cls_mean_encoder() -> Encoder:
    """test_vit's network read out as Virchow2 is: class token ++ mean of the patch tokens."""
    base = tiny_encoder()
    return Encoder(
        base.model, name="test_vit_cls_mean", architecture=base.architecture,
        input_size=base.input_size, mean=base.mean, std=base.std,
        interpolation=base.interpolation, pooling="cls+mean", pretrained=False,
    )  # fmt: skip


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make_encoder", [tiny_encoder, cls_mean_encoder])
def test_pipeline_features_equal_the_model_on_hand_read_tiles(
    slides: Path, tmp_path: Path, make_encoder, device: str
) -> None:
    encoder = make_encoder()
    _, summary, _ = preprocess(slides, tmp_path, encoder, device=torch.device(device))
    assert summary.outcomes["done"] == 3
    bag = read_bag(features_path(tmp_path, "s1"))
    spec = read_coords(tmp_path / "coords" / "s1.h5").tile_spec
    assert bag.features.shape == (len(bag.coords), encoder.embed_dim)
    with open_slide(slides / "s1.svs") as reader:
        tiles = np.stack([read_tile(reader, spec, tuple(xy)) for xy in bag.coords[:40]])
    with torch.inference_mode():
        encoder.cpu().eval()
        expected = encoder(encoder.preprocess(torch.from_numpy(tiles))).numpy()
    tolerance = 2e-3 if device == "cpu" else 1e-2  # float16 storage; GPU: TF32 convolution
    np.testing.assert_allclose(bag.features[:40], expected, rtol=tolerance, atol=tolerance)
    assert bag.attrs["encoder"] == encoder.name and bag.attrs["encoder_dim"] == encoder.embed_dim
    assert '"pretrained": false' in bag.attrs["encoder_config"]  # random weights are on record


def test_interrupted_extraction_resumes_and_stale_files_are_redone(
    slides: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoder = tiny_encoder()
    forward = encoder.model.forward
    calls = {"n": 0}

    def crash_on_the_second_slide(x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 7:  # well into the second slide (each slide has more than 6 batches)
            raise KeyboardInterrupt
        return forward(x)

    monkeypatch.setattr(encoder.model, "forward", crash_on_the_second_slide)
    with pytest.raises(KeyboardInterrupt):
        preprocess(slides, tmp_path, encoder)
    statuses = {p.stem: file_status(p) for p in (tmp_path / "features").glob("*.h5")}
    assert list(statuses.values()) == ["complete"]  # only the first slide; no half file
    assert not list((tmp_path / "features").glob("*.tmp"))
    (finished,) = statuses
    mtime = features_path(tmp_path, finished).stat().st_mtime_ns

    monkeypatch.setattr(encoder.model, "forward", forward)
    _, summary, _ = preprocess(slides, tmp_path, encoder)
    assert (summary.outcomes["skipped"], summary.outcomes["done"]) == (1, 2)
    assert features_path(tmp_path, finished).stat().st_mtime_ns == mtime
    assert all(file_status(features_path(tmp_path, f"s{i}")) == "complete" for i in range(3))

    # Another encoder (or weights) makes every file stale: recomputed, not silently reused.
    _, summary, _ = preprocess(
        slides, tmp_path, load_encoder("vit_tiny_patch16_224", pretrained=False)
    )
    assert summary.outcomes["done"] == 3
    assert read_bag(features_path(tmp_path, "s0")).features.shape[1] == 192
    # So does another tile spec.
    _, summary, _ = preprocess(
        slides, tmp_path, encoder, tiling=TilingOptions(target_mpp=1.0, tile_size_px=128)
    )
    assert summary.outcomes["done"] == 3


def test_corrupt_feature_file_is_redone_and_unreadable_tiles_skipped(
    slides: Path, tmp_path: Path
) -> None:
    encoder = tiny_encoder()
    preprocess(slides, tmp_path, encoder)
    # A half-written file that lost its tail, under the final name.
    target = features_path(tmp_path, "s2")
    target.write_bytes(target.read_bytes()[:2000])
    assert file_status(target) == "corrupt"
    _, summary, _ = preprocess(slides, tmp_path, encoder)
    assert summary.outcomes["done"] == 1 and file_status(target) == "complete"


def test_two_processes_write_every_slide_once_with_the_same_features(
    slides: Path, tmp_path: Path
) -> None:
    encoder = tiny_encoder()
    preprocess(slides, tmp_path / "one", encoder)
    _, summary, errors = preprocess(slides, tmp_path / "two", encoder, devices=2)
    assert summary.outcomes["done"] == 3 and summary.failed == 0
    for index in range(3):
        single = read_bag(features_path(tmp_path / "one", f"s{index}"))
        double = read_bag(features_path(tmp_path / "two", f"s{index}"))
        np.testing.assert_array_equal(single.coords, double.coords)
        np.testing.assert_allclose(single.features, double.features, atol=1e-3)
    assert not list((tmp_path / "two").glob("features_results.rank-*.csv"))
    with errors.open(newline="") as handle:
        assert list(csv.DictReader(handle)) == []


def test_feature_files_read_as_clam_and_trident_files(slides: Path, tmp_path: Path) -> None:
    preprocess(slides, tmp_path, tiny_encoder())
    with h5py.File(features_path(tmp_path, "s0"), "r") as file:
        # CLAM's reader: features and coords only.
        features, coords = file["features"][:], file["coords"][:]
        assert features.shape[0] == coords.shape[0] and coords.dtype == np.int64
        # TRIDENT's reader: the coords attributes.
        attrs = file["coords"].attrs
        assert attrs["patch_size"] == 96
        assert attrs["patch_size_level0"] == 192  # slide at 0.5 µm/px, tiles at 1.0
        assert attrs["target_magnification"] == pytest.approx(10.0)


def test_unknown_encoder_is_a_clear_error(
    slides: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(EncoderError, match="vit_smal_patch16"):
        load_encoder("vit_smal_patch16_224", pretrained=False)
    code = main(
        ["preprocess", str(slides), str(tmp_path), "--encoder", "not-a-model", "--random-weights"]
    )
    assert code == 2
    assert "not-a-model" in capsys.readouterr().err


def _cli_preprocess(slides: Path, out: Path, *extra: str) -> int:
    return main(
        ["preprocess", str(slides), str(out), "--encoder", "test_vit", "--random-weights",
         "--mpp", "1.0", "--tile-size", "96", "--num-workers", "0", "--precision", "fp32",
         "--batch-size", "16", *extra]
    )  # fmt: skip


def test_random_weights_are_seeded_and_another_seed_makes_files_stale(
    slides: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue #27: the same --seed gives byte-identical features; another seed recomputes
    instead of skipping; a cohort mixing the two is refused with the files named."""
    first, second = tmp_path / "first", tmp_path / "second"
    assert _cli_preprocess(slides, first) == 0
    assert _cli_preprocess(slides, second) == 0
    for path in sorted((first / "features").glob("*.h5")):
        with h5py.File(path) as a, h5py.File(second / "features" / path.name) as b:
            assert a["features"][()].tobytes() == b["features"][()].tobytes()
    capsys.readouterr()

    kept = first / "features" / "s0.h5"
    before = read_bag(kept).features
    assert _cli_preprocess(slides, first, "--seed", "1") == 0
    printed = capsys.readouterr().out
    features_summary = printed[printed.index("milkit features:") :]
    assert "done       3" in features_summary and "already done" not in features_summary
    assert not np.array_equal(read_bag(kept).features, before)  # recomputed with seed 1

    # a cohort of seed-1 files and one seed-0 file is refused, naming the odd file
    (first / "features" / "s2.h5").write_bytes((second / "features" / "s2.h5").read_bytes())
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\ns0,a\ns1,b\ns2,a\n")
    refusal = (
        r"(?s)line 4: slide 's2': encoder 'random weights, seed 0' differs from "
        r"'random weights, seed 1'.*s2\.h5"
    )
    with pytest.raises(FeatureFileError, match=refusal):
        load_cohort(first / "features", labels, target="label")


def test_preprocess_extracts_no_features_from_another_tiling(
    tmp_path: Path, write_blob: Callable[..., Any]
) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    write_blob(slides / "scan.png", size=(400, 300))
    out = tmp_path / "out"
    assert main(["tile", str(slides), str(out), "--slide-mpp", "0.5", "--tile-size", "64"]) == 0
    args = [
        "preprocess",
        str(slides),
        str(out),
        "--tile-size",
        "64",
        "--encoder",
        "vit_tiny_patch16_224",
    ]
    assert main([*args, "--random-weights"]) == 1  # no --slide-mpp this time: tiling fails
    assert "MissingMppError" in (out / "errors.csv").read_text()
    assert not (out / "features" / "scan.h5").exists()  # not from the coordinates of before


@pytest.mark.parametrize("target_mpp", [0.5, 1.0])  # the native level, and a 2x downsample
def test_features_agree_whichever_reader_decodes_the_slide(
    slides: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target_mpp: float
) -> None:
    encoder, tiling = tiny_encoder(), TilingOptions(target_mpp=target_mpp, tile_size_px=96)
    preprocess(slides, tmp_path / "direct", encoder, tiling=tiling)
    monkeypatch.setenv(READER_ENV, "openslide")
    preprocess(slides, tmp_path / "openslide", encoder, tiling=tiling)
    for index in range(3):
        paths = [features_path(tmp_path / name, f"s{index}") for name in ("direct", "openslide")]
        direct, reference = (read_bag(path) for path in paths)
        np.testing.assert_array_equal(direct.coords, reference.coords)
        np.testing.assert_array_equal(direct.features, reference.features)  # the same pixels
        readers = [read_coords(path).attrs["reader"] for path in paths]
        assert readers == ["tifffile", "openslide"]


def test_a_corrupt_jpeg_tile_is_skipped_and_the_slide_goes_on(slides: Path, tmp_path: Path) -> None:
    folder = tmp_path / "slides"
    folder.mkdir()
    broken = folder / "broken.svs"
    broken.write_bytes((slides / "s0.svs").read_bytes())
    with tifffile.TiffFile(broken) as tiff:
        page = tiff.pages[0]
        index = len(page.dataoffsets) // 2 + 3  # a tile inside the tissue
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    with broken.open("r+b") as handle:
        handle.seek(offset)
        handle.write(b"\0" * count)
    tiling = TilingOptions(target_mpp=0.5, tile_size_px=96)
    _, summary, _ = preprocess(folder, tmp_path / "out", tiny_encoder(), tiling=tiling)
    assert summary.outcomes["done"] == 1
    assert "for the model alone" in summary.format()  # which of reading and model bounds it
    with h5py.File(features_path(tmp_path / "out", "broken"), "r") as file:
        skipped, reasons = file["skipped_coords"][()], file["skipped_reasons"][()]
        n_kept = len(file["features"])
    assert 1 <= len(skipped) <= 16 and n_kept > 10 * len(skipped)  # 96-px tiles over 256
    assert all(b"cannot read region" in reason for reason in reasons)
    tiles_per_row = -(-page.imagewidth // page.tilewidth)
    column, row = index % tiles_per_row, index // tiles_per_row
    for x, y in skipped:  # every skipped tile overlaps the damaged stored tile
        assert x < (column + 1) * page.tilewidth and x + 96 > column * page.tilewidth
        assert y < (row + 1) * page.tilelength and y + 96 > row * page.tilelength


def test_the_timing_line_says_what_bounds_extraction() -> None:
    model_bound = ExtractionTiming(n_tiles=1000, read_seconds=0.2, model_seconds=9.8)
    assert model_bound.describe() == (
        "tiles/s: 100 overall, 102 for the model alone; 2% of the time waiting for tiles: "
        "the model bounds this run"
    )
    read_bound = ExtractionTiming(n_tiles=1000, read_seconds=5.0, model_seconds=5.0)
    read_bound.add(ExtractionTiming(n_tiles=1000, read_seconds=5.0, model_seconds=5.0))
    assert read_bound.describe().endswith(
        "50% of the time waiting for tiles: reading tiles bounds this run (more --num-workers "
        "may help)"
    )
    assert "tiles/s: 100 overall, 200 for the model alone" in read_bound.describe()


def test_a_full_disk_stops_the_batch_with_one_line_and_no_half_written_files(
    slides: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    assert _cli_preprocess(slides, out) == 0  # three slides done
    (out / "features" / "s1.h5").unlink()  # one to redo

    def disk_full(job, *args, **kwargs):  # the writer's first bytes do not fit
        Path(job.out_path + ".tmp").write_bytes(b"")
        raise OSError(errno.ENOSPC, "No space left on device", job.out_path + ".tmp")

    def log_full(self, *args, **kwargs):  # nor does the error log's row
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr("milkit.pipeline.preprocess.run_job", disk_full)
    monkeypatch.setattr(ErrorLog, "record_message", log_full)
    capsys.readouterr()
    assert _cli_preprocess(slides, out) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith(
        f"milkit preprocess: error: No space left on device ({out / 'errors.csv'}). Finished "
        "slides are kept: free some space and rerun the same command"
    )
    assert "Traceback" not in "\n".join(error)
    assert not list((out / "features").glob("*.tmp"))  # no half-written file left
    assert sorted(p.name for p in (out / "features").glob("*.h5")) == ["s0.h5", "s2.h5"]


def test_list_encoders_prints_every_preset_without_other_arguments(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from milkit.features.encoder_presets import list_presets

    with pytest.raises(SystemExit) as exit_info:
        main(["preprocess", "--list-encoders"])
    assert exit_info.value.code == 0
    listed = capsys.readouterr().out
    assert all(spec.name in listed for spec in list_presets())
    assert "hf-hub:ORG/NAME" in listed
