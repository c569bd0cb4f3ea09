"""Bags of tile features read lazily from feature files, and the padding collate.

:func:`probe_bag` learns a file's layout once (through :mod:`milkit.features.tile_file`, which
knows the milkit, CLAM, TRIDENT and STAMP formats). :class:`BagDataset` then reads only the
``features`` and ``coords`` datasets per item through h5py handles that each process opens
for itself on first use (never pickled into DataLoader workers) and keeps open. Features keep
their stored dtype (float16 halves the bytes moved); the training module casts them on its
device. ``tile_file.py`` has no such cheap per-item reader, so it lives here; files that need a
conversion on read (STAMP's micron coordinates) go through :func:`milkit.features.tile_file.read_bag`.

A *tile subset* (e.g. the tumour bed) is a boolean ``(N,)`` dataset in the feature file, named
by the caller; tiles outside it are left out of the bag when it is read. That is the same as
ANDing the subset into the bag's mask (a left-out tile, like padding, gets no weight and no
gradient), and the subset's tiles alone reach the model, the subsampling and the predictions.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from milkit.errors import BagBatchError, FeatureFileError
from milkit.features.tile_file import read_bag, read_coords, read_features_dim


@dataclass(frozen=True)
class BagInfo:
    """What a feature file holds, learned once per file.

    Attributes:
        slide_id: The file's stem.
        path: The feature file.
        n_tiles: Number of tiles N.
        feature_dim: Feature length D.
        format: ``"milkit"``, ``"clam"``, ``"trident"`` or ``"stamp"``.
        encoder: The encoder id recorded in the file, if any.
        slide_path: The slide the file came from, if recorded.
        direct: Whether ``features``/``coords`` can be read as stored (else through ``read_bag``).
        encoder_weights: Which weights the encoder had (e.g. ``"random weights, seed 0"``), when
            the file records it: two encoders of one name can differ.
    """

    slide_id: str
    path: Path
    n_tiles: int
    feature_dim: int
    format: str
    encoder: str | None
    slide_path: str | None
    direct: bool
    encoder_weights: str | None = None


def probe_bag(path: str | Path) -> BagInfo:
    """Learn a feature file's layout (cached per path, size and modification time).

    Args:
        path: A milkit, CLAM, TRIDENT or STAMP feature file.

    Returns:
        Its :class:`BagInfo`.

    Raises:
        FeatureFileError: Missing, unfinished, malformed or coordinate-only file.
    """
    path = Path(path)
    stat = path.stat() if path.is_file() else None
    return _probe(path, stat.st_size if stat else -1, stat.st_mtime_ns if stat else -1)


@lru_cache(maxsize=65536)
def _probe(path: Path, size: int, mtime_ns: int) -> BagInfo:
    meta = read_coords(path)
    encoder = meta.attrs.get("encoder")
    slide_path = meta.attrs.get("slide_path")
    return BagInfo(
        slide_id=path.stem,
        path=path,
        n_tiles=len(meta.coords),
        feature_dim=read_features_dim(path),
        format=meta.format,
        encoder=str(encoder) if encoder else None,
        slide_path=str(slide_path) if slide_path else None,
        direct=meta.format != "stamp",
        encoder_weights=weights_identity(meta.attrs.get("encoder_config")),
    )


def weights_identity(encoder_config: Any) -> str | None:
    """A short, readable name for the weights an encoder description records.

    Args:
        encoder_config: A feature file's ``encoder_config`` attribute (the encoder's
            ``describe()``, as a mapping or JSON text), or None.

    Returns:
        E.g. ``"random weights, seed 3"`` or ``"weights sha256 1a2b3c4d5e6f"``; None when
        nothing is recorded.
    """
    if isinstance(encoder_config, str):
        try:
            encoder_config = json.loads(encoder_config)
        except json.JSONDecodeError:
            return None
    if not isinstance(encoder_config, dict):
        return None
    if not encoder_config.get("pretrained", True):
        seed = encoder_config.get("random_seed")
        return f"random weights, seed {seed}" if seed is not None else "random weights, unseeded"
    if encoder_config.get("weights_sha256"):
        return f"weights sha256 {str(encoder_config['weights_sha256'])[:12]}"
    hub_id = encoder_config.get("hub_id")
    return f"weights from {hub_id}" if hub_id else "published weights"


@dataclass
class BagItem:
    """One bag as the dataset yields it.

    Attributes:
        features: ``(n, D)`` tile features in the stored dtype (float16 or float32).
        coords: ``(n, 2)`` int64 level-0 ``(x, y)`` of the same tiles.
        target: Class index (classification), number (regression), or None.
        slide_id: The slide.
        slide_path: The slide file, when the feature file records it.
        feature_path: The feature file.
    """

    features: torch.Tensor
    coords: torch.Tensor
    target: int | float | None
    slide_id: str
    slide_path: str | None
    feature_path: str


@dataclass
class BagBatch:
    """A padded batch of bags (Lightning moves its tensors to the device).

    Attributes:
        features: ``(B, N, D)`` features, zero on padding.
        mask: ``(B, N)`` bool, True for real tiles.
        coords: ``(B, N, 2)`` int64 level-0 ``(x, y)``, zero on padding.
        targets: ``(B,)`` int64 class indices or float32 values; None without targets.
        slide_ids: ``B`` slide ids.
        slide_paths: ``B`` slide files (None where unknown).
        feature_paths: ``B`` feature files.
    """

    features: torch.Tensor
    mask: torch.Tensor
    coords: torch.Tensor
    targets: torch.Tensor | None
    slide_ids: list[str]
    slide_paths: list[str | None]
    feature_paths: list[str]

    def __len__(self) -> int:
        return len(self.slide_ids)

    def pin_memory(self) -> BagBatch:
        """Page-lock the tensors (called by DataLoader with ``pin_memory=True``)."""
        values = {field.name: getattr(self, field.name) for field in fields(self)}
        pinned: dict[str, Any] = {
            k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in values.items()
        }
        return BagBatch(**pinned)


class BagMemory:
    """Whole bags kept in this process's memory, least recently used first out.

    Keyed by file identity (path, size, modification time) and tile subset, so a rewritten
    file is read again. Bounded by bytes: a bag that does not fit is read but not kept.

    Args:
        max_bytes: Most bytes of features and coordinates kept.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._bags: OrderedDict[Hashable, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def get(
        self, key: Hashable, read: Callable[[], tuple[np.ndarray, np.ndarray]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The bag kept under ``key``, read (and kept if it fits) on a miss.

        Args:
            key: The bag's identity.
            read: Reads ``(features, coords)`` from its file.

        Returns:
            The kept arrays; do not write into them.
        """
        bag = self._bags.get(key)
        if bag is not None:
            self._bags.move_to_end(key)
            return bag
        bag = read()
        size = bag[0].nbytes + bag[1].nbytes
        if size <= self.max_bytes:
            self._bags[key] = bag
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (features, coords) = self._bags.popitem(last=False)
                self.bytes -= features.nbytes + coords.nbytes
        return bag


def memory_budget_bytes() -> int:
    """Bytes of bags a process may keep: a quarter of the machine's memory, at most 16 GiB."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a small machine
        physical = 8 << 30
    return min(physical // 4, 16 << 30)


#: The process-wide store of :class:`BagDataset` with ``in_memory=True``.
BAG_MEMORY = BagMemory(memory_budget_bytes())


class _OpenFiles:
    """Per-process LRU of open read-only feature files, as their ``(features, coords)``
    datasets (looked up once per file); dropped when pickled or forked."""

    def __init__(self, max_open: int) -> None:
        self.max_open = max_open
        self._pid = os.getpid()
        self._files: OrderedDict[Path, tuple[h5py.Dataset, h5py.Dataset]] = OrderedDict()

    def get(self, path: Path) -> tuple[h5py.Dataset, h5py.Dataset]:
        if self._pid != os.getpid():  # a forked worker must not share the parent's handles
            self._files = OrderedDict()
            self._pid = os.getpid()
        datasets = self._files.get(path)
        if datasets is None:
            file = h5py.File(path, "r")
            datasets = self._files[path] = (file["features"], file["coords"])
            while len(self._files) > self.max_open:
                self._files.popitem(last=False)[1][0].file.close()
        else:
            self._files.move_to_end(path)
        return datasets

    def __getstate__(self) -> dict[str, Any]:
        return {"max_open": self.max_open}

    def __setstate__(self, state: dict[str, Any]) -> None:
        _OpenFiles.__init__(self, state["max_open"])


def read_tile_subset(file: h5py.File, name: str, n_tiles: int) -> np.ndarray:
    """Read a tile-subset mask (e.g. the tumour bed) stored beside the features.

    Args:
        file: The open feature file.
        name: Name of the subset dataset: ``(N,)`` bool, or integers 0/1.
        n_tiles: Number of tiles N of the file.

    Returns:
        ``(N,)`` bool, True for tiles in the subset.

    Raises:
        FeatureFileError: The dataset is missing, not ``(N,)``, or holds values other than
            booleans or 0/1.
    """
    path = file.filename
    if name not in file:
        raise FeatureFileError(
            f"{path}: no tile-subset dataset {name!r}; add it as an (N,) boolean dataset or "
            "leave out --data.tile_subset."
        )
    dataset = file[name]
    if not isinstance(dataset, h5py.Dataset) or dataset.shape != (n_tiles,):
        shape = getattr(dataset, "shape", "a group")
        raise FeatureFileError(
            f"{path}: tile subset {name!r} has shape {shape}; it needs one value per tile "
            f"({n_tiles},)."
        )
    values = dataset[()]
    if values.dtype != np.bool_ and not (
        np.issubdtype(values.dtype, np.integer) and np.isin(values, (0, 1)).all()
    ):
        raise FeatureFileError(
            f"{path}: tile subset {name!r} must hold booleans (or 0/1), got {values.dtype} values."
        )
    return values.astype(bool)


class BagDataset(Dataset[BagItem]):
    """Bags of tile features, one per feature file.

    Args:
        bags: The files, as probed by :func:`probe_bag`.
        targets: ``(len(bags),)`` class indices or numbers, or None (prediction).
        max_tiles: In training, keep a random subset of at most this many tiles per bag. The
            subset is drawn from the seed :class:`TrainingDraws` hands with the index
            (so it does not depend on which worker reads the bag); a plain integer index
            draws from torch's global generator. None keeps all.
        training: Whether to subsample; evaluation always reads every tile.
        tile_subset: Name of a boolean ``(N,)`` dataset in every feature file; only its
            tiles form the bag (see the module docstring). None keeps every tile.
        max_open_files: Open file handles kept per process.
        in_memory: Keep every bag read in :data:`BAG_MEMORY`, the process-wide store shared
            by every dataset (a cross-validation's folds read each file once); use it with
            no DataLoader workers, which would each hold a copy.
    """

    def __init__(
        self,
        bags: Sequence[BagInfo],
        targets: Sequence[int | float] | None = None,
        *,
        max_tiles: int | None = None,
        training: bool = False,
        tile_subset: str | None = None,
        max_open_files: int = 128,
        in_memory: bool = False,
    ) -> None:
        if targets is not None and len(targets) != len(bags):
            raise ValueError(f"{len(targets)} targets for {len(bags)} bags.")
        self.bags = list(bags)
        self.targets = list(targets) if targets is not None else None
        self.max_tiles = max_tiles
        self.training = training
        self.tile_subset = tile_subset
        self.in_memory = in_memory
        self._files = _OpenFiles(max_open_files)

    def __len__(self) -> int:
        return len(self.bags)

    def read_all(self, index: int) -> np.ndarray:
        """``(n, D)`` features of every tile of bag ``index`` (no training subsample), stored
        dtype."""
        return self._read(self.bags[index])[0]

    def __getitem__(self, index: int | tuple[int, int]) -> BagItem:
        """One bag.

        Args:
            index: The bag's position, or ``(position, seed)`` as :class:`TrainingDraws` yields
                it: the seed of this item's tile subsample.

        Returns:
            The bag (a random subset of ``max_tiles`` tiles when training).
        """
        index, draw_seed = index if isinstance(index, tuple) else (index, None)
        info = self.bags[index]
        features, coords = self._read(info)
        if self.training and self.max_tiles is not None and len(features) > self.max_tiles:
            generator = None if draw_seed is None else torch.Generator().manual_seed(draw_seed)
            permutation = torch.randperm(len(features), generator=generator)
            keep = permutation[: self.max_tiles].sort().values.numpy()
            features, coords = features[keep], coords[keep]
        return BagItem(
            features=torch.from_numpy(np.ascontiguousarray(features)),
            coords=torch.from_numpy(np.ascontiguousarray(coords, dtype=np.int64)),
            target=self.targets[index] if self.targets is not None else None,
            slide_id=info.slide_id,
            slide_path=info.slide_path,
            feature_path=str(info.path),
        )

    def _read(self, info: BagInfo) -> tuple[np.ndarray, np.ndarray]:
        """``(n, D)`` features (stored dtype) and ``(n, 2)`` coords of one file's tiles (of
        its tile subset, when one is set); copies of the kept bag when ``in_memory``."""
        if not self.in_memory:
            return self._read_file(info)
        stat = info.path.stat()
        key = (info.path, stat.st_size, stat.st_mtime_ns, self.tile_subset)
        features, coords = BAG_MEMORY.get(key, lambda: self._read_file(info))
        return features.copy(), coords.copy()  # callers may write into what they get

    def _read_file(self, info: BagInfo) -> tuple[np.ndarray, np.ndarray]:
        if not info.direct:
            bag = read_bag(info.path)
            features, coords = bag.features, np.rint(bag.coords).astype(np.int64)
            keep = self._subset_of(info.path, len(coords))
        elif self.in_memory:  # read once: no handle kept, so a replaced file is seen anew
            with h5py.File(info.path, "r") as file:
                features, coords = _read_datasets(file["features"], file["coords"])
                keep = self._subset_of(file, len(coords))
        else:
            features_dataset, coords_dataset = self._files.get(info.path)
            features, coords = _read_datasets(features_dataset, coords_dataset)
            keep = self._subset_of(coords_dataset.file, len(coords))
        return (features, coords) if keep is None else (features[keep], coords[keep])

    def _subset_of(self, file: h5py.File | Path, n_tiles: int) -> np.ndarray | None:
        """``(N,)`` bool tile subset of an open file or a path; None without a subset."""
        if self.tile_subset is None:
            return None
        if isinstance(file, h5py.File):
            return read_tile_subset(file, self.tile_subset, n_tiles)
        with h5py.File(file, "r") as opened:
            return read_tile_subset(opened, self.tile_subset, n_tiles)


def _read_datasets(features: h5py.Dataset, coords: h5py.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Whole ``features`` and ``coords`` arrays; some CLAM versions write (1, N, D) and
    (1, N, 2), which the feature-file readers accept, so they are read here too."""
    return (
        features[0] if features.ndim == 3 else features[()],
        coords[0] if coords.ndim == 3 else coords[()],
    )


def pad_bags(
    bags: Sequence[torch.Tensor], dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack bags of different lengths into one zero-padded batch (milkit's one padding).

    Each byte is written once: no zero fill of the whole batch first, and a single bag is
    batched without copying.

    Args:
        bags: ``B`` tensors of shape ``(N_b, K)`` (features, or coordinates), each non-empty.
        dtype: Type of the batch; default the bags' own (float32 when they differ).

    Returns:
        ``padded (B, max N_b, K)`` with zero tails and ``mask (B, max N_b)`` bool.

    Raises:
        BagBatchError: If there are no bags, a bag is empty, or the widths differ.
    """
    if not bags:
        raise BagBatchError("pad_bags needs at least one bag, got none.")
    if len({tuple(bag.shape[1:]) for bag in bags}) != 1 or any(
        bag.dim() != 2 or len(bag) == 0 for bag in bags
    ):
        shapes = [tuple(bag.shape) for bag in bags]
        raise BagBatchError(f"bags must be non-empty (N_b, K) with one K, got shapes {shapes}.")
    if dtype is None:
        dtypes = {bag.dtype for bag in bags}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32  # mixed precisions
    device = bags[0].device
    lengths = torch.tensor([len(bag) for bag in bags], device=device)
    if len(bags) == 1:
        padded = bags[0][None].to(dtype)
    else:
        padded = torch.empty(
            (len(bags), int(lengths.max()), bags[0].shape[1]), dtype=dtype, device=device
        )
        for index, bag in enumerate(bags):
            padded[index, : len(bag)] = bag
            padded[index, len(bag) :] = 0
    mask = torch.arange(padded.shape[1], device=device) < lengths[:, None]
    return padded, mask


def collate_bags(items: Sequence[BagItem]) -> BagBatch:
    """Pad bags of different lengths into one batch.

    Args:
        items: ``B`` bags from :class:`BagDataset`.

    Returns:
        The padded :class:`BagBatch`; a single bag is batched without copying.
    """
    features, mask = pad_bags([item.features for item in items])
    coords, _ = pad_bags([item.coords for item in items], torch.int64)
    targets = [item.target for item in items]
    target_tensor = None
    if all(target is not None for target in targets):
        dtype = torch.int64 if all(isinstance(t, int) for t in targets) else torch.float32
        target_tensor = torch.tensor(targets, dtype=dtype)
    return BagBatch(
        features=features,
        mask=mask,
        coords=coords,
        targets=target_tensor,
        slide_ids=[item.slide_id for item in items],
        slide_paths=[item.slide_path for item in items],
        feature_paths=[item.feature_path for item in items],
    )


class TrainingDraws(Sampler[tuple[int, int]]):
    """The bags of one training epoch, each with a seed for its own random draws.

    Epoch ``e``'s order and seeds come from one generator seeded by ``(seed, e)`` in the
    process that iterates the sampler (the main one), so the bags, their order and their tile
    subsamples are the same whatever the number of DataLoader workers, however often a loader
    starts an iteration, and when a run resumes at epoch ``e``. Lightning sets the epoch
    (``set_epoch``); else each iteration is the next epoch.

    Args:
        n_bags: Number of bags.
        seed: The run's seed.
        shuffle: Reorder the bags every epoch (else file order).
        draw_weights: ``(n_bags,)`` weights: draw ``n_bags`` bags with replacement, in
            proportion (class-balanced sampling); instead of ``shuffle``.
    """

    def __init__(
        self,
        n_bags: int,
        seed: int,
        *,
        shuffle: bool = True,
        draw_weights: Sequence[float] | None = None,
    ) -> None:
        if draw_weights is not None and len(draw_weights) != n_bags:
            raise ValueError(f"{len(draw_weights)} draw weights for {n_bags} bags.")
        self.n_bags = n_bags
        self.seed = seed
        self.shuffle = shuffle
        self.draw_weights = draw_weights
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw epoch ``epoch``'s bags on the next iteration.

        Args:
            epoch: Zero-based epoch.
        """
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        seed_words = np.random.SeedSequence([self.seed, self.epoch]).generate_state(2)
        generator = torch.Generator().manual_seed(int(seed_words.view(np.uint64)[0]))
        self.epoch += 1
        if self.draw_weights is not None:
            weights = torch.as_tensor(self.draw_weights, dtype=torch.float64)
            order = torch.multinomial(weights, self.n_bags, replacement=True, generator=generator)
        elif self.shuffle:
            order = torch.randperm(self.n_bags, generator=generator)
        else:
            order = torch.arange(self.n_bags)
        item_seeds = torch.randint(1 << 62, (self.n_bags,), generator=generator)
        return iter(zip(order.tolist(), item_seeds.tolist(), strict=True))

    def __len__(self) -> int:
        return self.n_bags


def bag_loader(
    dataset: BagDataset,
    *,
    batch_size: int,
    num_workers: int = 0,
    shuffle: bool = False,
    draw_weights: Sequence[float] | None = None,
    sampler: Sampler | None = None,
    seed: int | None = None,
) -> DataLoader:
    """The DataLoader of padded bag batches every milkit training run uses.

    Its randomness (shuffle, weighted draws, tile subsamples, workers' seeds) comes from
    generators of its own seeded by ``seed`` (:class:`TrainingDraws`): torch's global
    generator, which drives the model's dropout, is left alone, and a run is the same with any
    ``num_workers``.

    Args:
        dataset: The bags.
        batch_size: Bags per batch.
        num_workers: Worker processes reading bags (0: in this process); kept alive between
            epochs.
        shuffle: Reshuffle every epoch.
        draw_weights: ``(len(dataset),)`` weights: draw ``len(dataset)`` bags with replacement
            every epoch, in proportion (class-balanced sampling); instead of ``shuffle``.
        sampler: Order of the bags for evaluation, e.g. a rank's share under DDP (instead of
            the :class:`TrainingDraws` that shuffled, weighted or training loaders use).
        seed: Seed of the loader's draws; default ``torch.initial_seed()``, the run's seed
            after ``seed_everything``.

    Returns:
        A loader of :class:`BagBatch`.
    """
    seed = torch.initial_seed() if seed is None else seed
    if sampler is None and (shuffle or draw_weights is not None or dataset.training):
        sampler = TrainingDraws(len(dataset), seed, shuffle=shuffle, draw_weights=draw_weights)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_bags,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        # The workers' seeds are drawn from it (not from torch's global generator), once per
        # epoch without persistent workers and once per run with them.
        generator=torch.Generator().manual_seed(seed),
    )
