"""Multi-crop tile batches for DINO pretraining, streamed from slides (no tiles on disk).

`TileDataModule` reads the coordinate files of ``milkit tile`` (see :mod:`milkit.ssl.tiles`);
DataLoader workers read tiles from the slides, each through its own LRU of open slide
handles, and turn each into DINO's multi-crop views.

Random sampling with good I/O: `TileSampler` draws up to ``max_tiles_per_slide`` tiles of each
slide per epoch, shuffles the slide order, and shuffles tiles within *windows* of
``slides_per_window`` consecutive slides. A batch thus mixes tiles of several slides, while a
worker only touches the few slides of the current window, which stay open in its LRU cache
(``max_open_slides`` >= ``slides_per_window`` avoids reopening). ``slides_per_window=None``
shuffles over all slides at once (best mixing; fine when all slides fit in the cache or
opening is cheap). The sampler shards its order across DDP ranks itself (it is a
``DistributedSampler``, so Lightning keeps it instead of wrapping it in one that would shuffle
the windows apart).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Protocol, cast, get_args

import lightning as L
import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, DistributedSampler

from milkit.errors import ConfigError
from milkit.ssl.augment import (
    AugmentingCollate,
    MultiCropAugmentation,
    ViewAugmentation,
    collate_tiles,
)
from milkit.ssl.tiles import CohortTileDataset, SlideTiles, find_slide_tiles

__all__ = ["AugmentOn", "TileDataModule", "TileSampler"]

#: Where `TileDataModule` makes the crops: in the DataLoader workers, on the training device
#: after the transfer, or ``auto`` (the device when it is not the CPU, else the workers).
AugmentOn = Literal["auto", "workers", "device"]


class TileSampler(DistributedSampler):
    """Per-epoch tile order: capped per slide, slides shuffled, tiles shuffled within windows.

    The order depends only on ``seed`` and the epoch (`set_epoch`, which Lightning calls), so
    every DDP rank computes the same order and takes every ``num_replicas``-th index from
    ``rank``; the order is first cut to a multiple of ``num_replicas`` so ranks get equal shares.

    Args:
        dataset: The tiles.
        max_tiles_per_slide: Tiles drawn per slide and epoch (without replacement; a fresh draw
            every epoch); None takes all.
        slides_per_window: Slides whose tiles are shuffled together; None shuffles all tiles.
        shuffle: False gives every tile (capped) in slide order, for inspection.
        seed: Base seed of the order.
        num_replicas: Number of DDP ranks.
        rank: This rank.

    Raises:
        ConfigError: If a count is below 1 or ``rank`` is outside ``[0, num_replicas)``.
    """

    def __init__(
        self,
        dataset: CohortTileDataset,
        *,
        max_tiles_per_slide: int | None = None,
        slides_per_window: int | None = 8,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        for name, value in [
            ("max_tiles_per_slide", max_tiles_per_slide),
            ("slides_per_window", slides_per_window),
        ]:
            if value is not None and value < 1:
                raise ConfigError(f"TileSampler: {name}={value} must be >= 1 (or null).")
        if not 0 <= rank < num_replicas:
            raise ConfigError(f"TileSampler: rank {rank} outside [0, {num_replicas}).")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.max_tiles_per_slide = max_tiles_per_slide
        self.slides_per_window = slides_per_window
        counts = np.diff(dataset.offsets)
        capped = np.minimum(counts, max_tiles_per_slide or counts.max())
        #: tiles of one epoch over all ranks, a multiple of ``num_replicas``
        self.epoch_size = int(capped.sum()) // num_replicas * num_replicas
        self.num_samples = self.epoch_size // num_replicas
        self.total_size = self.epoch_size

    def epoch_order(self) -> np.ndarray:
        """``(epoch_size,)`` global tile indices of the current epoch, over all ranks."""
        dataset = cast(CohortTileDataset, self.dataset)  # the one given to __init__
        rng = np.random.default_rng([self.seed, self.epoch])
        n_slides = len(dataset.slides)
        slide_order = rng.permutation(n_slides) if self.shuffle else np.arange(n_slides)
        per_slide = []
        for slide in slide_order:
            start, n_tiles = dataset.offsets[slide], np.diff(dataset.offsets)[slide]
            count = min(n_tiles, self.max_tiles_per_slide or n_tiles)
            if self.shuffle:
                picked = np.sort(rng.choice(n_tiles, count, replace=False))
            else:
                picked = np.arange(count)
            per_slide.append(start + picked)
        window = self.slides_per_window or n_slides
        blocks = [np.concatenate(per_slide[i : i + window]) for i in range(0, n_slides, window)]
        if self.shuffle:
            blocks = [rng.permutation(block) for block in blocks]
        return np.concatenate(blocks)[: self.epoch_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_order()[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


class TileDataHParams(Protocol):
    """:class:`TileDataModule`'s ``hparams`` (its ``__init__`` arguments), typed.

    Lightning types ``hparams`` as a plain mapping; reading it through this gives each
    hyperparameter its type.
    """

    coords_dir: str | Path
    slides_dir: str | Path | None
    batch_size: int
    num_workers: int
    max_tiles_per_slide: int | None
    slides_per_window: int | None
    max_open_slides: int
    seed: int
    global_size_px: int
    local_size_px: int
    n_local_crops: int
    global_scale: tuple[float, float]
    local_scale: tuple[float, float]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    augmentation: ViewAugmentation | dict[str, Any]  # LightningCLI saves the config's dict
    augment_on: AugmentOn


class TileDataModule(L.LightningDataModule):
    """Multi-crop tile batches for DINO, streamed from slides via ``milkit tile`` coordinates.

    Batches are ``list[Tensor]``: 2 global crops ``(B, 3, G, G)`` then ``n_local_crops`` local
    crops ``(B, 3, L, L)`` (see `MultiCropAugmentation`); incomplete last batches are dropped. The
    crop sizes, ``n_local_crops`` and ``mean``/``std`` must equal the model's; ``milkit
    pretrain`` links them, so they are set once, here.

    Args:
        coords_dir: Folder of coordinate files (``OUT/coords`` of ``milkit tile``).
        slides_dir: Folder of the slides, searched by slide id; None uses each file's
            recorded ``slide_path``.
        batch_size: Tiles per batch per device.
        num_workers: DataLoader worker processes reading and augmenting tiles.
        max_tiles_per_slide: Tiles sampled per slide per epoch (fresh each epoch); None: all.
        slides_per_window: Slides whose tiles are shuffled together (see `TileSampler`);
            None shuffles over all slides.
        max_open_slides: Slide handles each worker keeps open.
        seed: Seed of the tile order.
        global_size_px: Side of the global crops (the model's ``img_size``).
        local_size_px: Side of the local crops.
        n_local_crops: Local crops per tile.
        global_scale: Area fraction range of the tile a global crop covers.
        local_scale: Area fraction range of the tile a local crop covers.
        mean: Normalisation mean (RGB in [0, 1]).
        std: Normalisation standard deviation.
        augmentation: The random changes of every crop (flips, colour and stain jitter, blur ...;
            see `ViewAugmentation`). A config sets only the keys it changes.
        augment_on: Where the crops are made: ``workers`` (DataLoader workers, on their CPUs),
            ``device`` (the loader only reads tiles and the batch is augmented on the training
            device after the transfer: on a GPU the augmentation then costs a fraction of a step
            instead of bounding the throughput), or ``auto`` (``device`` unless that is the CPU).

    Raises:
        ConfigError: Invalid sizes or counts (at construction), or too few tiles for one batch
            (at ``setup``).
    """

    def __init__(
        self,
        coords_dir: str | Path,
        slides_dir: str | Path | None = None,
        *,
        batch_size: int = 64,
        num_workers: int = 4,
        max_tiles_per_slide: int | None = None,
        slides_per_window: int | None = 8,
        max_open_slides: int = 8,
        seed: int = 0,
        global_size_px: int = 224,
        local_size_px: int = 96,
        n_local_crops: int = 8,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
        augmentation: ViewAugmentation = ViewAugmentation(),
        augment_on: AugmentOn = "auto",
    ) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise ConfigError(
                f"TileDataModule: batch_size={batch_size} must be >= 1 and "
                f"num_workers={num_workers} >= 0."
            )
        if augment_on not in get_args(AugmentOn):
            raise ConfigError(
                f"TileDataModule: augment_on={augment_on!r} must be one of "
                f"{', '.join(get_args(AugmentOn))}."
            )
        self.save_hyperparameters()
        self.augmentation = MultiCropAugmentation(
            global_size_px=global_size_px,
            local_size_px=local_size_px,
            n_local_crops=n_local_crops,
            # tuple(): they may be lists (from YAML); the casts keep their lengths' types.
            global_scale=cast(tuple[float, float], tuple(global_scale)),
            local_scale=cast(tuple[float, float], tuple(local_scale)),
            mean=cast(tuple[float, float, float], tuple(mean)),
            std=cast(tuple[float, float, float], tuple(std)),
            views=augmentation,
        )
        self.dataset: CohortTileDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Read the coordinate files (once) and build the dataset.

        Raises:
            ConfigError: No usable coordinate file, a missing slide, or fewer tiles per
                epoch than one batch on every rank.
        """
        if self.dataset is not None:
            return
        hp = cast(TileDataHParams, self.hparams)
        slides = find_slide_tiles(hp.coords_dir, hp.slides_dir)
        self.dataset = CohortTileDataset(slides, max_open_slides=hp.max_open_slides)
        per_rank = len(self._sampler())
        if per_rank < hp.batch_size:
            raise ConfigError(
                f"{hp.coords_dir}: {per_rank} tiles per epoch and device, fewer than one batch "
                f"of {hp.batch_size} (incomplete batches are dropped); lower "
                "--data.batch_size or raise --data.max_tiles_per_slide."
            )

    def _dataset(self) -> CohortTileDataset:
        if self.dataset is None:
            raise ConfigError("TileDataModule: call setup() before asking for data.")
        return self.dataset

    def _sampler(self) -> TileSampler:
        world, rank = (
            (self.trainer.world_size, self.trainer.global_rank)
            if self.trainer is not None
            else (1, 0)
        )
        hp = cast(TileDataHParams, self.hparams)
        return TileSampler(
            self._dataset(),
            max_tiles_per_slide=hp.max_tiles_per_slide,
            slides_per_window=hp.slides_per_window,
            seed=hp.seed,
            num_replicas=world,
            rank=rank,
        )

    @property
    def slides(self) -> list[SlideTiles]:
        """The slides and their tiles (after ``setup``)."""
        return self._dataset().slides

    @property
    def steps_per_epoch(self) -> int:
        """Full batches per epoch on one device (after ``setup``)."""
        return len(self._sampler()) // cast(TileDataHParams, self.hparams).batch_size

    @property
    def augments_on_device(self) -> bool:
        """Whether batches are augmented after the transfer to the device (see ``augment_on``)."""
        augment_on = cast(TileDataHParams, self.hparams).augment_on
        if augment_on != "auto":
            return augment_on == "device"
        return self.trainer is not None and self.trainer.strategy.root_device.type != "cpu"

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches (see `TileSampler` for the order): multi-crop batches, or uint8
        tiles ``(B, H, W, 3)`` when the crops are made on the device."""
        hp = cast(TileDataHParams, self.hparams)
        workers = hp.num_workers
        return DataLoader(
            self._dataset(),
            batch_size=hp.batch_size,
            sampler=self._sampler(),
            num_workers=workers,
            collate_fn=collate_tiles
            if self.augments_on_device
            else AugmentingCollate(self.augmentation),
            drop_last=True,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Make the crops of a batch of tiles on the device, when ``augment_on`` says so."""
        return self.augmentation(batch) if self.augments_on_device else batch
