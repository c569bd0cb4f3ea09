"""``milkit fit|predict`` through LightningCLI: each model config trains, checkpoints predict."""

from __future__ import annotations

import csv
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from milkit.features.tile_file import read_bag
from milkit.models import ABMIL, DSMIL, gdat
from milkit.models.gdat import spatial_groups
from milkit.synth.features import WitnessCohort, write_witness_cohort
from milkit.training.cli import build_cli, run_lightning
from milkit.training.module import MILModule

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> WitnessCohort:
    return write_witness_cohort(
        tmp_path_factory.mktemp("cohort"),
        n_bags=16,
        n_tiles=(6, 10),
        feature_dim=8,
        n_witnesses=(1, 3),
    )


def _options(cohort: WitnessCohort, root: Path, model: str) -> list[str]:
    return [
        "--trainer", str(CONFIGS / "trainer" / "cpu.yaml"),
        "--data", str(CONFIGS / "data" / "default.yaml"),
        "--model", str(CONFIGS / "model" / f"{model}.yaml"),
        "--data.features_dir", str(cohort.features_dir),
        "--data.labels_csv", str(cohort.labels_csv),
        "--data.num_workers", "0",
        "--data.n_folds", "4",
        "--trainer.default_root_dir", str(root),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("model", "model_class", "gated"),
    [("abmil", ABMIL, False), ("abmil_gated", ABMIL, True), ("dsmil", DSMIL, None)],
)
def test_fast_dev_run_trains_each_model_config(
    cohort: WitnessCohort, tmp_path: Path, model: str, model_class: type, gated: bool | None
) -> None:
    cli = build_cli(["fit", *_options(cohort, tmp_path, model), "--trainer.fast_dev_run", "1"])
    network = cli.model.model
    assert type(network) is model_class
    assert cli.trainer.global_step == 1  # one optimiser step was taken
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    first = network.embed[0] if isinstance(network.embed, torch.nn.Sequential) else None
    in_dim = first.in_features if first is not None else network.instance_classifier.in_features
    assert in_dim == 8 and network.n_classes == 2  # linked from the data
    assert cli.model.class_names == ["negative", "positive"] and cli.model.feature_dim == 8
    if gated is not None:
        assert hasattr(network.pooling, "gate_proj") is gated


def test_fit_passes_tile_coordinates_to_a_spatial_model(
    cohort: WitnessCohort, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GDAT groups tiles by their coordinates: ``milkit fit`` must hand them to the model."""
    seen: list[torch.Tensor] = []

    def spy(coords: torch.Tensor, mask: torch.Tensor, grid_side: int) -> torch.Tensor:
        seen.append(coords[mask])
        return spatial_groups(coords, mask, grid_side)

    monkeypatch.setattr(gdat, "spatial_groups", spy)
    options = _options(cohort, tmp_path, "abmil")
    options += [
        "--model.model", "milkit.models.GDATMIL",
        "--model.model.init_args.embed_dim", "8",
        "--model.model.init_args.n_heads", "2",
        "--model.model.init_args.n_groups", "4",
        "--model.model.init_args.attention_dim", "4",
        "--trainer.fast_dev_run", "1",
    ]  # fmt: skip
    cli = build_cli(["fit", *options])
    assert isinstance(cli.model.model, gdat.GDATMIL)
    assert seen, "GDATMIL was never given the tiles' coordinates"
    stored = {
        tuple(row)
        for path in cohort.features_dir.glob("*.h5")
        for row in read_bag(path).coords.tolist()
    }
    assert {tuple(row) for batch in seen for row in batch.tolist()} <= stored


def test_checkpoint_round_trips_through_predict(
    cohort: WitnessCohort, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli = build_cli(
        ["fit", *_options(cohort, tmp_path / "fit", "abmil_gated"), "--trainer.max_epochs", "2"]
    )
    checkpoint = tmp_path / "fit" / "checkpoints" / "last.ckpt"  # where the README says
    assert cli.trainer.checkpoint_callback.best_model_path == str(checkpoint)
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1  # the final epoch's model
    # fit ends on a summary: the model, its validation metrics and the predict command.
    summary = capsys.readouterr().out
    assert "milkit fit: done, 2 epoch(s)" in summary and f"checkpoint: {checkpoint}" in summary
    assert re.search(r"validation \(last epoch\): .*auroc \d\.\d{3}", summary)
    next_command = shlex.split(summary.split("next: ", 1)[1].splitlines()[0])
    assert next_command[:2] == ["milkit", "predict"]
    assert next_command[-2:] == ["--ckpt_path", str(checkpoint)]
    run = tmp_path / "predict"
    options = [*next_command[2:], "--trainer.default_root_dir", str(run)]
    assert run_lightning(["predict", *options]) == 0
    printed = capsys.readouterr().out
    assert f"milkit predict: {len(cohort.labels)} slide(s)" in printed
    assert str(run / "predictions.csv") in printed

    with open(run / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["slide_id"] for row in rows] == sorted(cohort.labels)
    assert list(rows[0]) == ["slide_id", "target", "prediction", "prob_negative", "prob_positive"]
    assert all(row["target"] == cohort.labels[row["slide_id"]] for row in rows)

    loaded = MILModule.load_from_checkpoint(checkpoint, weights_only=True).eval()
    assert loaded.class_names == ["negative", "positive"]
    for row in rows[:4]:
        bag = read_bag(cohort.features_dir / f"{row['slide_id']}.h5")
        features = torch.from_numpy(bag.features)[None]
        with torch.no_grad():
            output = loaded(features, torch.ones(features.shape[:2], dtype=torch.bool))
        probabilities = loaded.predictions(
            output, torch.ones(features.shape[:2], dtype=torch.bool)
        )[0]
        assert float(row["prob_positive"]) == pytest.approx(float(probabilities[1]), rel=1e-5)
        assert row["prediction"] == loaded.class_names[int(probabilities.argmax())]
        with h5py.File(run / "predictions" / f"{row['slide_id']}.h5") as file:
            assert bool(file.attrs["complete"]) and file.attrs["slide_id"] == row["slide_id"]
            assert file.attrs["target"] == row["target"] and file.attrs["task"] == "classification"
            assert file.attrs["label_names"] == '["negative", "positive"]'
            assert np.array_equal(file["coords"][()], bag.coords)
            assert np.allclose(file["attention"][()], output.attention[0].numpy(), atol=1e-6)
            assert np.allclose(file["scores"][()], output.tile_scores[0].numpy(), atol=1e-5)
            assert np.allclose(file.attrs["probabilities"], probabilities.numpy(), atol=1e-6)


def test_bad_labels_fail_before_training_with_every_row(
    cohort: WitnessCohort, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\nslide_0000,positive\nmissing_slide,negative\nslide_0001,\n")
    options = _options(cohort, tmp_path, "abmil")
    options[options.index("--data.labels_csv") + 1] = str(labels)
    assert run_lightning(["fit", *options]) == 2
    error = capsys.readouterr().err
    assert error.startswith("milkit fit: error:")
    assert "line 3: slide 'missing_slide' has no feature file" in error
    assert "line 4: slide 'slide_0001': missing target" in error
    assert not (tmp_path / "lightning_logs").exists()  # nothing trained


def test_fit_names_the_slide_without_tiles_it_leaves_out(
    cohort: WitnessCohort,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    write_tileless: Callable[[Path, str], Path],
) -> None:
    features = tmp_path / "out" / "features"
    shutil.copytree(cohort.features_dir, features)
    write_tileless(features.parent / "coords", "glass")
    labels = tmp_path / "labels.csv"
    labels.write_text(cohort.labels_csv.read_text() + "glass,glass_patient,negative\n")
    options = _options(cohort, tmp_path, "abmil")
    options[options.index("--data.labels_csv") + 1] = str(labels)
    options[options.index("--data.features_dir") + 1] = str(features)
    assert run_lightning(["fit", *options, "--trainer.fast_dev_run", "1"]) == 0
    error = capsys.readouterr().err
    assert "milkit fit: classes in index order, with slides: negative (" in error
    assert error.count("left out") == 1
    assert (
        f"milkit fit: left out 1 slide(s) of {labels} without tiles (no tissue found): glass (line 18)"
        in error
    )


def _rescale_files(features_dir: Path, slide_ids: list[str], scale: float, shift: float) -> None:
    """``features * scale + shift`` in the given slides' files (rewritten in place)."""
    for slide_id in slide_ids:
        with h5py.File(features_dir / f"{slide_id}.h5", "r+") as file:
            file["features"][...] = file["features"][()] * scale + shift


def test_standardisation_is_fitted_on_the_training_part_and_applied_by_predict(
    tmp_path: Path,
) -> None:
    """Raw-scale features (x10 + 5) whose validation and test bags are shifted by +50 more:
    the shift must not move the statistics; the checkpoint carries them and ``predict``
    applies them."""
    cohort = write_witness_cohort(
        tmp_path / "cohort", n_bags=16, n_tiles=(6, 10), feature_dim=8, dtype="float32", seed=4
    )
    _rescale_files(cohort.features_dir, list(cohort.labels), 10.0, 5.0)
    options = _options(cohort, tmp_path / "fit", "abmil")
    split_cli = build_cli([*options, "--trainer.max_epochs", "1"], run=False)
    data = split_cli.datamodule
    rows = data.cohort.rows
    held_out = [rows[i].slide_id for i in (*data.split.val, *data.split.test)]
    assert held_out and len(data.split.val)
    _rescale_files(cohort.features_dir, held_out, 1.0, 50.0)
    train_tiles = np.concatenate(
        [
            read_bag(cohort.features_dir / f"{rows[i].slide_id}.h5").features
            for i in data.split.train
        ]
    )

    cli = build_cli(["fit", *options, "--trainer.max_epochs", "1"])
    standardizer = cli.model.standardizer
    assert standardizer.fitted
    assert np.allclose(standardizer.mean.numpy(), train_tiles.mean(0), atol=1e-4)
    assert np.allclose(standardizer.std.numpy(), train_tiles.std(0), atol=1e-4)

    checkpoint = cli.trainer.checkpoint_callback.best_model_path  # the one kept: last.ckpt
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["milkit"]["standardized"] is True
    assert torch.equal(saved["state_dict"]["standardizer.mean"], standardizer.mean)

    run = tmp_path / "predict"
    assert (
        run_lightning(["predict", *_options(cohort, run, "abmil"), "--ckpt_path", checkpoint]) == 0
    )
    network = MILModule.load_from_checkpoint(checkpoint, weights_only=True).model.eval()
    mean, std = saved["state_dict"]["standardizer.mean"], saved["state_dict"]["standardizer.std"]
    for slide_id in sorted(cohort.labels):
        features = torch.from_numpy(read_bag(cohort.features_dir / f"{slide_id}.h5").features)
        mask = torch.ones(1, len(features), dtype=torch.bool)
        with torch.no_grad():
            expected = network(((features - mean) / std)[None], mask).logits.softmax(-1)[0]
            raw = network(features[None], mask).logits.softmax(-1)[0]
        with h5py.File(run / "predictions" / f"{slide_id}.h5") as file:
            probabilities = file.attrs["probabilities"]
        assert np.allclose(probabilities, expected.numpy(), atol=1e-5)
        assert not np.allclose(probabilities, raw.numpy(), atol=1e-3)


@pytest.mark.parametrize(("standardize", "fitted"), [("auto", False), ("on", True), ("off", False)])
def test_standardize_auto_leaves_unit_scale_features_alone(
    tmp_path: Path, standardize: str, fitted: bool
) -> None:
    cohort = write_witness_cohort(
        tmp_path / "cohort", n_bags=12, n_tiles=(40, 60), feature_dim=4, shift=0.0,
        dtype="float32", seed=5,
    )  # fmt: skip
    tiles = np.concatenate([read_bag(p).features for p in cohort.features_dir.glob("*.h5")])
    mean, std = tiles.mean(0), tiles.std(0)
    for path in cohort.features_dir.glob("*.h5"):
        with h5py.File(path, "r+") as file:
            file["features"][...] = (file["features"][()] - mean) / std
    options = _options(cohort, tmp_path / "fit", "abmil")
    cli = build_cli(
        ["fit", *options, "--trainer.max_epochs", "1", "--model.standardize", standardize]
    )
    assert cli.model.standardizer.fitted is fitted


def test_a_killed_fit_resumes_where_it_stopped_and_ends_as_an_uninterrupted_one(
    cohort: WitnessCohort, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    epochs = ("--trainer.max_epochs", "40", "--model.model.init_args.hidden_dim", "16")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run_lightning(["fit", *_options(cohort, whole, "abmil"), *epochs]) == 0
    command = ["fit", *_options(cohort, killed, "abmil"), *epochs]
    process = subprocess.Popen([sys.executable, "-m", "milkit.training.cli", *command])
    last = killed / "checkpoints" / "last.ckpt"
    while not last.is_file() and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)  # as soon as one epoch is saved
    process.wait()
    stopped_at = torch.load(last, weights_only=True)["epoch"]
    assert stopped_at < 39, "the run finished before it was killed"
    capsys.readouterr()

    assert run_lightning(command) == 0  # the same command again
    assert f"milkit fit: resuming from {last}" in capsys.readouterr().err
    resumed, uninterrupted = (
        torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
        for folder in (killed, whole)
    )
    assert resumed["epoch"] == uninterrupted["epoch"] == 39
    for name, value in uninterrupted["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], value, rtol=0, atol=0)

    other = ["fit", *_options(cohort, killed, "abmil"), "--trainer.max_epochs", "3"]
    assert run_lightning(other) == 2
    assert "holds a training run of another configuration" in capsys.readouterr().err


def test_fit_prints_no_third_party_noise_unless_verbose(
    cohort: WitnessCohort, tmp_path: Path
) -> None:
    def fit(*flags: str) -> str:
        command = [sys.executable, "-m", "milkit.cli", *flags, "fit",
                   *_options(cohort, tmp_path / str(len(flags)), "abmil"),
                   "--trainer.max_epochs", "1"]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        return done.stdout + done.stderr

    printed = fit()
    assert "milkit fit: done, 1 epoch(s)" in printed
    # Lightning's hints and deprecations (they name their source file) and its tips are gone.
    assert "site-packages" not in printed and "Tip:" not in printed, printed
    assert "site-packages" in fit("--verbose")


def test_a_one_class_validation_part_is_said_once_with_the_fix(
    cohort: WitnessCohort, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with open(cohort.labels_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    positives = [row["slide_id"] for row in rows if row["label"] == "positive"][:2]
    labels_csv = tmp_path / "labels.csv"
    with open(labels_csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*rows[0], "split"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "split": "val" if row["slide_id"] in positives else "train"})
    options = [*_options(cohort, tmp_path / "run", "abmil"), "--data.labels_csv", str(labels_csv)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_lightning(["fit", *options, "--trainer.max_epochs", "2"]) == 0
    err = capsys.readouterr().err
    assert err.count("the validation part of fold 0 holds 2 slide(s), all of class 'positive'") == 1
    assert "--data.n_folds" in err
    assert not [w for w in caught if "samples in targets" in str(w.message)]
