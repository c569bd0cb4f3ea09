"""k-nearest-neighbour evaluation of tile encoders (the usual probe of self-supervised features).

`knn_predict` is DINO's weighted k-NN: cosine similarity to the training features, the ``k``
nearest vote with weight ``exp(similarity / temperature)``. On tiles of known class (your own
labelled tiles, or synthetic ones from :mod:`milkit.synth.knn_cohort`), `knn_by_slide` scores an
encoder on slides held out from the labelled ones, `knn_random_init` its architecture at random
initialisation (the baseline) and `knn_supervised_reference` the architecture trained with the
labels (the ceiling).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from milkit.errors import ConfigError
from milkit.features.encoders import Encoder, load_encoder
from milkit.features.extract import ExtractionOptions, TileDataset, iterate_features
from milkit.ssl.augment import MultiCropAugmentation, ViewAugmentation, collate_tiles
from milkit.ssl.tiles import CohortTileDataset, SlideTiles

__all__ = [
    "KnnResult",
    "embed_tiles",
    "knn_accuracy",
    "knn_by_slide",
    "knn_predict",
    "knn_random_init",
    "knn_supervised_reference",
]


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
        dataset = TileDataset(slide.slide_path, slide.coords_level0, slide.tile_spec)
        features = np.zeros((dataset.n_tiles, encoder.embed_dim), dtype=np.float32)
        for index, batch, _ in iterate_features(dataset, encoder, device=device, options=options):
            features[index] = batch
        rows.append(torch.from_numpy(features))
    return torch.cat(rows)


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


def _balanced(labels: np.ndarray, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of an equal number of rows of every class (the rarest class's count)."""
    n = np.bincount(labels, minlength=n_classes).min()
    picks = [rng.permutation(np.flatnonzero(labels == c))[:n] for c in range(n_classes)]
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
        labelled: Per slide (at least 2): its labelled tiles and ``(n,)`` int labels in
            ``[0, C)``, e.g. tiles picked from `milkit.ssl.tiles.find_slide_tiles` with your
            annotations, or `milkit.synth.knn_cohort.synthetic_tile_labels` output.
        k: Neighbours that vote.
        seed: Seed of the class balancing.

    Returns:
        The accuracy, set sizes and embedding spread.

    Raises:
        ConfigError: If a set lacks a class or a label is negative.
    """
    rng = np.random.default_rng(seed)
    if any((np.asarray(y) < 0).any() for _, y in labelled):
        raise ConfigError("knn_by_slide: labels must be class indices 0, 1, 2, ...")
    n_classes = 1 + max((int(y.max()) for _, y in labelled if len(y)), default=0)
    parts = {"train": list(labelled[0::2]), "test": list(labelled[1::2])}
    labels, keep = {}, {}
    for name, part in parts.items():  # check both sets before embedding any tile
        y = np.concatenate([tile_labels for _, tile_labels in part]) if part else np.empty(0, int)
        counts = np.bincount(y, minlength=n_classes)
        if (counts == 0).any():
            raise ConfigError(
                f"knn_by_slide: the {name} slides lack a class (counts {counts.tolist()}); label "
                "tiles of every class on both the even (labelled) and the odd (test) slides."
            )
        keep[name] = _balanced(y, n_classes, rng)
        labels[name] = torch.from_numpy(y[keep[name]])
    features = {
        name: embed_tiles(encoder, [tiles for tiles, _ in part])[keep[name]]
        for name, part in parts.items()
    }
    accuracy = knn_accuracy(
        features["train"], labels["train"], features["test"], labels["test"], k=k
    )
    spread = F.normalize(features["test"], dim=1).std(dim=0).mean()
    return KnnResult(
        accuracy=accuracy,
        n_train=len(labels["train"]) // n_classes,
        n_test=len(labels["test"]) // n_classes,
        embed_std=float(spread),
    )


def _mean_over_seeds(seeds: Sequence[int], draw: Callable[[int], KnnResult]) -> KnnResult:
    """Mean accuracy and spread of ``draw(seed)`` run once per seed (torch seeded with it too,
    for whatever else is random in the draw); the global RNG is kept.

    Raises:
        ConfigError: If ``seeds`` is empty.
    """
    if not seeds:
        raise ConfigError(
            "k-NN random-init and supervised references need at least one seed, e.g. "
            "seeds=(0, 1, 2); got none."
        )
    results = []
    for seed in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            results.append(draw(seed))
    return KnnResult(
        accuracy=float(np.mean([r.accuracy for r in results])),
        n_train=results[0].n_train,
        n_test=results[0].n_test,
        embed_std=float(np.mean([r.embed_std for r in results])),
    )


def knn_random_init(
    encoder_id: str,
    labelled: Sequence[tuple[SlideTiles, np.ndarray]],
    *,
    seeds: Sequence[int] = (0, 1, 2),
    k: int = 20,
) -> KnnResult:
    """`knn_by_slide` of an encoder's architecture at random initialisation, over several draws.

    The baseline a pretrained encoder must beat. One random draw's accuracy varies by a few
    points, so the accuracies (and spreads) of ``seeds`` draws are averaged; the global RNG is
    left as it was.

    Args:
        encoder_id: The encoder (e.g. ``local-dir:RUN/encoder``), built with random weights.
        labelled: Labelled tiles per slide (as for `knn_by_slide`).
        seeds: torch seeds of the draws.
        k: Neighbours that vote.

    Returns:
        The mean accuracy and embedding spread, with the set sizes.

    Raises:
        ConfigError: If ``seeds`` is empty.
    """
    return _mean_over_seeds(
        seeds,
        lambda seed: knn_by_slide(
            load_encoder(encoder_id, pretrained=False, seed=seed), labelled, k=k
        ),
    )


def knn_supervised_reference(
    encoder_id: str,
    labelled: Sequence[tuple[SlideTiles, np.ndarray]],
    training: Sequence[tuple[SlideTiles, np.ndarray]],
    *,
    steps: int = 300,
    seeds: Sequence[int] = (0, 1, 2),
    k: int = 20,
) -> KnnResult:
    """`knn_by_slide` of an encoder's architecture trained *with* the tile labels: the ceiling.

    The randomly initialised architecture and a linear classifier learn the classes from
    ``training`` (cross-entropy, AdamW lr 1e-3, batch 64, one random crop per tile at the
    encoder's input size with flips, rotations, mild colour and stain jitter); its backbone is then
    scored like a pretrained one. Between random initialisation and this lies all that a
    self-supervised encoder could gain on the cohort. Only the even (labelled) slides of
    ``training`` are used, so the test slides of `knn_by_slide` stay unseen. One training's
    accuracy varies by a few points with the seed (and the CPU's arithmetic), so the results of
    ``seeds`` trainings are averaged, as for `knn_random_init`.

    Args:
        encoder_id: The encoder whose architecture is trained (its weights are not used).
        labelled: Labelled tiles per slide to score on (as for `knn_by_slide`).
        training: Labelled tiles to learn from, in the same slide order (e.g. more per class).
        steps: Optimiser steps per training.
        seeds: torch seeds of the initialisation and the batches, one training each.
        k: Neighbours that vote.

    Returns:
        The mean accuracy and embedding spread of the trained backbones.

    Raises:
        ConfigError: If ``seeds`` is empty.
    """
    train = list(training[0::2])
    dataset = CohortTileDataset([tiles for tiles, _ in train])
    tiles = collate_tiles([dataset.read(i) for i in range(len(dataset))])
    labels = torch.from_numpy(np.concatenate([y for _, y in train]))

    def draw(seed: int) -> KnnResult:
        encoder = load_encoder(encoder_id, pretrained=False, device="cpu", seed=seed)
        augment = MultiCropAugmentation(
            global_size_px=encoder.input_size[0],
            n_local_crops=0,
            global_scale=(0.8, 1.0),
            views=ViewAugmentation(global_blur_p=(0.0, 0.0)),
            mean=encoder.mean,
            std=encoder.std,
        )
        classifier = nn.Linear(encoder.embed_dim, int(labels.max()) + 1)
        optimiser = torch.optim.AdamW(
            [*encoder.parameters(), *classifier.parameters()], lr=1e-3, weight_decay=0.05
        )
        encoder.train()
        for _ in range(steps):
            batch = torch.randint(len(labels), (64,))
            loss = F.cross_entropy(classifier(encoder(augment(tiles[batch])[0])), labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        return knn_by_slide(encoder.eval(), labelled, k=k)

    return _mean_over_seeds(seeds, draw)
