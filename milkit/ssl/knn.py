"""k-nearest-neighbour evaluation of tile encoders (the usual probe of self-supervised features).

`knn_predict` is DINO's weighted k-NN: cosine similarity to the training features, the ``k``
nearest vote with weight ``exp(similarity / temperature)``. On synthetic slides
(:mod:`milkit.synth`), `make_knn_cohort` writes and tiles slides that show every tissue class,
`synthetic_tile_labels` picks tiles of known class (background tiles on glass; stroma, tumour
and lymphocyte-aggregate tiles from the coordinate files), and `knn_by_slide` scores an encoder
on slides held out from the labelled ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from milkit.errors import ConfigError
from milkit.features.encoders import Encoder
from milkit.features.extract import ExtractionOptions, TileDataset, iterate_features
from milkit.slides.tile_stage import TilingOptions, run_tiling
from milkit.slides.tissue import grid_coords
from milkit.ssl.tiles import SlideTiles, find_slide_tiles
from milkit.synth.cohort import write_slide
from milkit.synth.layout import SlideParams
from milkit.synth.organs import ORGANS
from milkit.synth.truth import AGGREGATE, BACKGROUND, STROMA, TUMOR, load_truth, tile_truth

__all__ = [
    "KNN_CLASSES",
    "KnnResult",
    "embed_tiles",
    "knn_accuracy",
    "knn_by_slide",
    "knn_predict",
    "make_knn_cohort",
    "synthetic_tile_labels",
]

#: Classes of the synthetic k-NN task, in label order (labels are these truth class values).
KNN_CLASSES = (BACKGROUND, STROMA, TUMOR, AGGREGATE)


def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    query_features: Tensor,
    *,
    k: int = 20,
    temperature: float | None = 0.07,
    n_classes: int | None = None,
) -> Tensor:
    """Classify query features by their nearest training features (cosine similarity).

    Args:
        train_features: ``(N, D)`` features of the labelled set.
        train_labels: ``(N,)`` integer labels in ``[0, n_classes)``.
        query_features: ``(M, D)`` features to classify.
        k: Neighbours that vote (at most ``N`` are used).
        temperature: Votes weigh ``exp(similarity / temperature)`` (DINO's k-NN); None gives
            every neighbour one vote.
        n_classes: Number of classes; default ``max(train_labels) + 1``.

    Returns:
        ``(M,)`` int64 predicted labels (ties go to the lower label).

    Raises:
        ConfigError: If ``k < 1``, the training set is empty or the shapes disagree.
    """
    if k < 1:
        raise ConfigError(f"knn_predict: k={k} must be >= 1.")
    if len(train_features) == 0 or len(train_features) != len(train_labels):
        raise ConfigError(
            f"knn_predict: need a non-empty training set with one label per row, got "
            f"{tuple(train_features.shape)} features and {tuple(train_labels.shape)} labels."
        )
    if train_features.shape[1:] != query_features.shape[1:]:
        raise ConfigError(
            f"knn_predict: feature sizes differ: train {tuple(train_features.shape)}, "
            f"query {tuple(query_features.shape)}."
        )
    labels = train_labels.long()
    n_classes = n_classes or int(labels.max()) + 1
    similarity = (
        F.normalize(query_features.float(), dim=1) @ F.normalize(train_features.float(), dim=1).T
    )  # (M, N)
    top_sim, top_index = similarity.topk(min(k, len(labels)), dim=1)
    weights = torch.ones_like(top_sim) if temperature is None else (top_sim / temperature).exp()
    votes = torch.zeros(len(query_features), n_classes, dtype=weights.dtype)
    votes.scatter_add_(1, labels[top_index], weights)
    return votes.argmax(dim=1)


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    k: int = 20,
    temperature: float | None = 0.07,
) -> float:
    """Fraction of test features whose k-NN prediction (see `knn_predict`) is right."""
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    predicted = knn_predict(
        train_features,
        train_labels,
        test_features,
        k=k,
        temperature=temperature,
        n_classes=n_classes,
    )
    return float((predicted == test_labels.long()).float().mean())


def embed_tiles(
    encoder: Encoder,
    slides: Sequence[SlideTiles],
    *,
    batch_size: int = 64,
    device: torch.device | None = None,
) -> Tensor:
    """Embed tiles with a feature extractor, the way ``milkit preprocess`` does.

    Args:
        encoder: The encoder (its own resize and normalisation are applied).
        slides: Tiles to embed.
        batch_size: Tiles per forward pass.
        device: Where the encoder runs (default: the first GPU if there is one, else the CPU).

    Returns:
        ``(sum of tiles, D)`` float32 features, slides in order.
    """
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    options = ExtractionOptions(batch_size=batch_size, num_workers=0, precision="fp32")
    rows = []
    for slide in slides:
        dataset = TileDataset(
            slide.slide_path,
            slide.coords_level0,
            slide.tile_spec,
            slide_mpp=slide.tile_spec.slide_mpp,
        )
        features = np.zeros((len(dataset), encoder.embed_dim), dtype=np.float32)
        for index, batch, _ in iterate_features(dataset, encoder, device=device, options=options):
            features[index] = batch
        rows.append(torch.from_numpy(features))
    return torch.cat(rows)


def synthetic_tile_labels(
    coords_dir: str | Path,
    truth_dir: str | Path,
    *,
    slides_dir: str | Path | None = None,
    max_per_class: int = 40,
    min_purity: float = 0.6,
    seed: int = 0,
) -> list[tuple[SlideTiles, np.ndarray]]:
    """Tiles of known class from a synthetic cohort, for k-NN evaluation.

    Tissue tiles come from the coordinate files: stroma, tumour or lymphocyte aggregate when
    that class covers at least ``min_purity`` of the tile. Background tiles lie wholly on
    glass, taken from the same tile grid (tiling keeps none of them). Artefacts are left out.

    Args:
        coords_dir: Coordinate files of the cohort (``milkit tile`` output).
        truth_dir: Truth files ``<slide_id>.h5`` (:func:`milkit.synth.load_truth`).
        slides_dir: Folder of the slides (see `find_slide_tiles`).
        max_per_class: Tiles drawn at most per class and slide.
        min_purity: Area fraction of its class a tissue tile must have.
        seed: Seed of the draw.

    Returns:
        Per slide: its labelled tiles and ``(n,)`` int64 labels, indices into `KNN_CLASSES`.

    Raises:
        ConfigError: If no labelled tile is found.
    """
    rng = np.random.default_rng(seed)
    labelled = []
    for slide in find_slide_tiles(coords_dir, slides_dir):
        truth = load_truth(Path(truth_dir) / f"{slide.slide_id}.h5")
        spec = slide.tile_spec
        grid = grid_coords(
            (int(truth.attrs["level0_width"]), int(truth.attrs["level0_height"])),
            tile_size_level0=spec.tile_size_level0,
            stride_level0=spec.stride_level0,
        )
        glass = grid[tile_truth(truth, grid, spec.tile_size_level0).class_fractions[:, 0] >= 1.0]
        tissue_truth = tile_truth(truth, slide.coords_level0, spec.tile_size_level0)
        coords, labels = [], []
        for label, value in enumerate(KNN_CLASSES):
            if value == BACKGROUND:
                candidates = glass
            else:
                pure = tissue_truth.class_fractions[:, value] >= min_purity
                candidates = slide.coords_level0[pure]
            take = rng.permutation(len(candidates))[:max_per_class]
            coords.append(candidates[np.sort(take)])
            labels.append(np.full(len(take), label, dtype=np.int64))
        if sum(len(c) for c in coords):
            tiles = SlideTiles(slide.slide_id, slide.slide_path, spec, np.concatenate(coords))
            labelled.append((tiles, np.concatenate(labels)))
    if not labelled:
        raise ConfigError(f"{coords_dir}: no tile of a known class; is this a synthetic cohort?")
    return labelled


def make_knn_cohort(
    out_dir: str | Path,
    *,
    n_slides: int = 12,
    size_px: int = 2048,
    mpp: float = 1.0,
    tile_size_px: int = 64,
    seed: int = 0,
    workers: int = 1,
) -> Path:
    """Write and tile synthetic slides in which every tissue class occurs.

    Every slide has tumour (30 % of the tissue) and lymphocyte aggregates, no artefacts. Organs
    (stain palettes, tumour patterns) take turns (slide ``i`` is organ ``i mod 3``), so the
    even and the odd slides of `knn_by_slide` both hold every organ. Tiles keep at least half
    tissue.

    Args:
        out_dir: Folder for ``slides/``, ``truth/`` and ``tiles/`` (``tiles/coords`` inside).
        n_slides: Number of slides.
        size_px: Side of each slide's level 0 in pixels.
        mpp: Scan resolution, which is also the tiling resolution.
        tile_size_px: Tile side in pixels.
        seed: Base seed of the slides.
        workers: Slides tiled in parallel.

    Returns:
        The coordinate folder ``out_dir/tiles/coords``.
    """
    out_dir = Path(out_dir)
    organs = sorted(ORGANS)
    slides = []
    for i in range(n_slides):
        params = SlideParams(
            seed=seed + i,
            task=organs[i % len(organs)],
            tumor=True,
            tumor_fraction=0.3,
            aggregates=True,
            artefacts=False,
        )
        info = write_slide(
            out_dir / "slides" / f"slide_{i:03d}.svs",
            params,
            mpp=mpp,
            size_px=(size_px, size_px),
            truth_path=out_dir / "truth" / f"slide_{i:03d}.h5",
        )
        slides.append(info.slide_path)
    options = TilingOptions(target_mpp=mpp, tile_size_px=tile_size_px, min_tissue=0.5)
    run_tiling(slides, out_dir / "tiles", options, workers=workers)
    return out_dir / "tiles" / "coords"


@dataclass(frozen=True)
class KnnResult:
    """A k-NN score on held-out slides.

    Attributes:
        accuracy: Fraction of test tiles classified right (class-balanced test set).
        n_train: Labelled tiles per class in the training slides.
        n_test: Tiles per class in the test slides.
        embed_std: Mean over dimensions of the std of the L2-normalised test embeddings
            (0 when every tile maps to one point; about ``1/sqrt(D)`` when spread out).
    """

    accuracy: float
    n_train: int
    n_test: int
    embed_std: float


def _balanced(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of an equal number of rows of every class (the rarest class's count)."""
    n = np.bincount(labels, minlength=len(KNN_CLASSES)).min()
    picks = [rng.permutation(np.flatnonzero(labels == c))[:n] for c in range(len(KNN_CLASSES))]
    return np.sort(np.concatenate(picks))


def knn_by_slide(
    encoder: Encoder,
    labelled: Sequence[tuple[SlideTiles, np.ndarray]],
    *,
    k: int = 20,
    seed: int = 0,
) -> KnnResult:
    """k-NN accuracy of an encoder on slides held out from the labelled ones.

    Even-numbered slides (in the order given) are the labelled set, odd-numbered ones the test
    set, so no slide contributes to both. Each set is class-balanced by subsampling every class
    to the rarest one's count, so the accuracy is not dominated by the most common tissue.

    Args:
        encoder: The encoder to score.
        labelled: `synthetic_tile_labels` output (at least 2 slides).
        k: Neighbours that vote.
        seed: Seed of the class balancing.

    Returns:
        The accuracy, set sizes and embedding spread.

    Raises:
        ConfigError: If a set lacks a class.
    """
    rng = np.random.default_rng(seed)
    parts = {"train": list(labelled[0::2]), "test": list(labelled[1::2])}
    features, labels = {}, {}
    for name, part in parts.items():
        y = np.concatenate([tile_labels for _, tile_labels in part]) if part else np.empty(0, int)
        if len(np.unique(y)) < len(KNN_CLASSES):
            raise ConfigError(
                f"knn_by_slide: the {name} slides lack a tissue class (counts "
                f"{np.bincount(y, minlength=len(KNN_CLASSES)).tolist()}); use more or larger slides."
            )
        keep = _balanced(y, rng)
        features[name] = embed_tiles(encoder, [tiles for tiles, _ in part])[keep]
        labels[name] = torch.from_numpy(y[keep])
    accuracy = knn_accuracy(
        features["train"], labels["train"], features["test"], labels["test"], k=k
    )
    spread = F.normalize(features["test"], dim=1).std(dim=0).mean()
    return KnnResult(
        accuracy=accuracy,
        n_train=len(labels["train"]) // len(KNN_CLASSES),
        n_test=len(labels["test"]) // len(KNN_CLASSES),
        embed_std=float(spread),
    )
