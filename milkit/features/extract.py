"""Streaming tile-feature extraction: slide regions -> encoder -> rows of an HDF5 feature file.

Tiles are read by DataLoader workers, each with its own slide handle; batches are encoded
under ``torch.inference_mode`` (bf16/fp16 autocast where the device supports it) and appended
to the feature file in chunks, so memory does not depend on the number of tiles. A tile that
cannot be read is recorded in the file (``skipped_coords``) and skipped.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from milkit.errors import FeatureFileError, SlideReadError
from milkit.features.encoders import Encoder
from milkit.features.tile_file import TileFileWriter, read_coords
from milkit.slides.reader import SlideReader, open_slide
from milkit.slides.tiling import TileSpec, read_tile

Precision = Literal["auto", "bf16", "fp16", "fp32"]


def cpu_supports_bf16() -> bool:
    """Whether this CPU runs bf16 matrix products natively (AVX512-BF16 or AMX).

    Without them bf16 autocast on CPU is emulated and slower than fp32, so ``auto`` keeps fp32.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(device: torch.device, precision: Precision) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None = run in fp32).

    ``auto`` picks bf16 on GPUs that support it (fp16 on older ones) and bf16 on CPUs with
    native bf16 instructions.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_supports_bf16():
        return torch.bfloat16
    return None


#: Tiles per side of a reading block: its stored tiles are decoded once for all of them.
BLOCK_TILES = 16


class TileDataset(Dataset[dict[str, Any]]):
    """Tiles of one slide in square blocks, a block per item (read in DataLoader workers, one
    slide handle per worker).

    A block is up to ``BLOCK_TILES x BLOCK_TILES`` neighbouring tiles, read in row order, so
    the stored (e.g. JPEG) tiles under them are decoded once and shared (the reader keeps
    recently decoded tiles); an item is a whole block as one array, so there is no per-tile
    collate. Blocks come in row order; within a block, tiles too. The slide is opened at the
    spec's ``slide_mpp``: the resolution tiling used, whether the file records it or it was
    given (``--slide-mpp``/``--mpp-csv``), so no override travels further.

    Args:
        slide_path: The slide.
        coords_level0: ``(N, 2)`` int64 top-left corners in level-0 pixels.
        spec: Tile geometry of the slide.
        block_tiles: Tiles per block side.
    """

    def __init__(
        self,
        slide_path: str | Path,
        coords_level0: np.ndarray,
        spec: TileSpec,
        *,
        block_tiles: int = BLOCK_TILES,
    ) -> None:
        self.slide_path = Path(slide_path)
        self.coords_level0 = np.asarray(coords_level0, dtype=np.int64).reshape(-1, 2)
        self.spec = spec
        self.blocks = plan_blocks(self.coords_level0, block_tiles * spec.stride_level0)
        self._reader: SlideReader | None = None
        self._reader_owner: int | None = None

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def n_tiles(self) -> int:
        """Number of tiles N."""
        return len(self.coords_level0)

    def _open(self) -> SlideReader:
        # A handle must not cross a fork: reopen when the worker (or process) changes.
        worker = get_worker_info()
        owner = worker.id if worker is not None else -1
        if self._reader is None or self._reader_owner != owner:
            self._reader = open_slide(self.slide_path, mpp=self.spec.slide_mpp)
            self._reader_owner = owner
        return self._reader

    def __getitem__(self, block: int) -> dict[str, Any]:
        """Block ``block``: ``indices`` ``(n,)`` int64 rows of ``coords_level0``, ``tiles``
        ``(n, T, T, 3)`` uint8 (zeros where a tile could not be read), ``errors`` ``n``
        messages ("" for tiles read)."""
        indices = self.blocks[block]
        size = self.spec.tile_size_px
        tiles = np.empty((len(indices), size, size, 3), dtype=np.uint8)
        errors = [""] * len(indices)
        reader = self._open()
        for position, index in enumerate(indices):
            x, y = (int(v) for v in self.coords_level0[index])
            try:
                read_tile(reader, self.spec, (x, y), out=tiles[position])
            except SlideReadError as exc:
                errors[position] = str(exc)
                tiles[position] = 0
        return {
            "indices": torch.from_numpy(indices),
            "tiles": torch.from_numpy(tiles),
            "errors": errors,
        }

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_reader"], state["_reader_owner"] = None, None  # handles are not picklable
        return state


def plan_blocks(coords_level0: np.ndarray, block_level0: int) -> list[np.ndarray]:
    """Group tiles into square blocks of the slide, blocks and their tiles in row order.

    Args:
        coords_level0: ``(N, 2)`` int64 top-left corners.
        block_level0: Block side in level-0 pixels.

    Returns:
        ``(n_b,)`` int64 row indices of each non-empty block.
    """
    if not len(coords_level0):
        return []
    x, y = coords_level0[:, 0], coords_level0[:, 1]
    block_row, block_column = y // block_level0, x // block_level0
    order = np.lexsort((x, y, block_column, block_row))  # last key sorts first
    keys = np.stack([block_row[order], block_column[order]], axis=1)
    starts = np.flatnonzero(np.r_[True, (keys[1:] != keys[:-1]).any(axis=1)])
    return [part.astype(np.int64) for part in np.split(order, starts[1:])]


@dataclass
class ExtractionTiming:
    """Where extraction's time went, so a user sees whether reading or the model bounds it.

    Attributes:
        n_tiles: Tiles encoded.
        read_seconds: Seconds the model waited for tiles.
        model_seconds: Seconds in the model (preprocessing and forward).
    """

    n_tiles: int = 0
    read_seconds: float = 0.0
    model_seconds: float = 0.0

    def add(self, other: ExtractionTiming) -> None:
        """Add another slide's times to these."""
        self.n_tiles += other.n_tiles
        self.read_seconds += other.read_seconds
        self.model_seconds += other.model_seconds

    def describe(self) -> str:
        """One line: tiles/s overall and for the model alone, and which one bounds the run."""
        total = self.read_seconds + self.model_seconds
        waiting = self.read_seconds / total if total > 0 else 0.0
        bound = "reading tiles" if waiting > 0.1 else "the model"
        return (
            f"tiles/s: {self.n_tiles / max(total, 1e-9):,.0f} overall, "
            f"{self.n_tiles / max(self.model_seconds, 1e-9):,.0f} for the model alone; "
            f"{waiting:.0%} of the time waiting for tiles: {bound} bounds this run"
            + (" (more --num-workers may help)" if bound == "reading tiles" else "")
        )


def default_loader_workers() -> int:
    """Tile-reading workers by default: every core this process may use but one (for the
    model), at least one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


@dataclass
class ExtractionResult:
    """What extracting one slide produced."""

    slide_id: str
    n_tiles: int
    n_skipped: int
    path: Path
    timing: ExtractionTiming = field(default_factory=ExtractionTiming)


@dataclass(frozen=True)
class ExtractionOptions:
    """How features are computed (only ``dtype`` changes the stored numbers beyond rounding).

    Args:
        batch_size: Tiles per forward pass.
        num_workers: DataLoader workers reading tiles (0 = read in the main process); default
            one per core but one (:func:`default_loader_workers`).
        precision: Autocast: ``auto`` (bf16 where supported), ``bf16``, ``fp16`` or ``fp32``.
        dtype: Stored feature dtype, ``float16`` (default) or ``float32``.
    """

    batch_size: int = 64
    num_workers: int = field(default_factory=default_loader_workers)
    precision: Precision = "auto"
    dtype: Literal["float16", "float32"] = "float16"


def iterate_features(
    dataset: TileDataset,
    encoder: Encoder,
    *,
    device: torch.device,
    options: ExtractionOptions,
    timing: ExtractionTiming | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]]:
    """Encode a slide's tiles batch by batch (tiles of blocks, in the dataset's block order).

    Args:
        dataset: The slide's tiles.
        encoder: The encoder.
        device: Where it runs.
        options: Batch size, workers and precision.
        timing: Where to add the seconds spent waiting for tiles and running the model.

    Yields:
        ``(indices (b,), features (b, D) float32, failures)`` per batch, where ``indices`` are the
        rows of ``dataset.coords_level0`` that were read and ``failures`` lists ``(index,
        message)`` of tiles that could not be read.
    """
    loader = DataLoader(
        dataset,
        batch_size=None,  # an item is already a block of tiles
        num_workers=options.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=2 if options.num_workers > 0 else None,
    )
    timing = timing if timing is not None else ExtractionTiming()
    cast = autocast_dtype(device, options.precision)
    encoder.to(device).eval()  # the whole Encoder: its pooling and its mean/std buffers
    pending_indices: list[torch.Tensor] = []
    pending_tiles: list[torch.Tensor] = []
    waited_from = time.perf_counter()
    blocks = iter(loader)
    while True:
        block = next(blocks, None)
        timing.read_seconds += time.perf_counter() - waited_from
        if block is not None:
            errors: list[str] = block["errors"]
            good = torch.tensor([not message for message in errors], dtype=torch.bool)
            indices = block["indices"]
            failures = [(int(indices[i]), m) for i, m in enumerate(errors) if m]
            if failures:
                yield np.empty(0, np.int64), np.empty((0, encoder.embed_dim), np.float32), failures
            pending_indices.append(indices[good])
            pending_tiles.append(block["tiles"][good])
        n_pending = sum(len(part) for part in pending_indices)
        while n_pending >= options.batch_size or (block is None and n_pending):
            batch_indices = torch.cat(pending_indices)
            batch_tiles = torch.cat(pending_tiles) if len(pending_tiles) > 1 else pending_tiles[0]
            take = min(options.batch_size, n_pending)
            pending_indices, pending_tiles = [batch_indices[take:]], [batch_tiles[take:]]
            n_pending -= take
            started = time.perf_counter()
            features = _encode(encoder, batch_tiles[:take], device=device, cast=cast)
            timing.model_seconds += time.perf_counter() - started
            timing.n_tiles += take
            yield batch_indices[:take].numpy(), features, []
        if block is None:
            return
        waited_from = time.perf_counter()


def _encode(
    encoder: Encoder,
    tiles: torch.Tensor,
    *,
    device: torch.device,
    cast: torch.dtype | None,
) -> np.ndarray:
    """``(b, D)`` float32 features of ``(b, T, T, 3)`` uint8 tiles."""
    autocast = (
        torch.autocast(device_type=device.type, dtype=cast)
        if cast is not None
        else contextlib.nullcontext()
    )
    with torch.inference_mode(), autocast:
        embeddings = encoder(encoder.preprocess(tiles.to(device, non_blocking=True)))
    return embeddings.float().cpu().numpy()


def extract_slide(
    slide_path: str | Path,
    coords_file: str | Path,
    out_path: str | Path,
    encoder: Encoder,
    *,
    config_hash: str,
    device: torch.device | str = "cpu",
    options: ExtractionOptions = ExtractionOptions(),
    progress: Callable[[int], Any] | None = None,
) -> ExtractionResult:
    """Extract one slide's tile features into ``out_path`` (atomically).

    Args:
        slide_path: The slide.
        coords_file: Its coordinate file from ``milkit tile``.
        out_path: The feature file to write.
        encoder: The tile encoder.
        config_hash: Hash of everything that changes the numbers (stored for resume checks).
        device: Where the encoder runs.
        options: Batch size, workers, precision and stored dtype.
        progress: Called with the number of tiles done after each batch.

    Raises:
        FeatureFileError: The coordinate file is unfinished or not milkit's, or no tile could
            be read.
    """
    device = torch.device(device)
    coords = read_coords(coords_file)
    spec = coords.tile_spec
    if spec is None:
        raise FeatureFileError(
            f"{coords_file}: not a milkit coordinate file (no tile_spec); rerun `milkit tile`."
        )
    dataset = TileDataset(slide_path, coords.coords, spec)
    with open_slide(slide_path, mpp=spec.slide_mpp) as reader:
        backend = reader.backend  # recorded: which decoder made the pixels
    timing = ExtractionTiming()
    skipped: list[tuple[int, str]] = []
    with TileFileWriter(
        out_path,
        tile_spec=spec,
        slide_dimensions=(
            int(coords.coords_attrs["level0_width"]),
            int(coords.coords_attrs["level0_height"]),
        ),
        slide_id=str(coords.attrs["slide_id"]),
        slide_path=str(coords.attrs.get("slide_path", slide_path)),
        feature_dim=encoder.embed_dim,
        dtype=options.dtype,
        encoder=encoder.name,
        config_hash=config_hash,
        with_tissue_fraction=coords.tissue_fraction is not None,
        extra_attrs={
            "encoder_config": encoder.describe(),
            "precision": options.precision,
            "reader": backend,
        },
    ) as writer:
        for indices, features, failures in iterate_features(
            dataset, encoder, device=device, options=options, timing=timing
        ):
            fractions = (
                coords.tissue_fraction[indices] if coords.tissue_fraction is not None else None
            )
            writer.append(features, coords.coords[indices], fractions)
            for index, message in failures:
                writer.skip(coords.coords[index : index + 1], message)
            skipped.extend(failures)
            if progress is not None:
                progress(len(indices) + len(failures))
        if len(coords.coords) and len(skipped) == len(coords.coords):
            raise FeatureFileError(
                f"{slide_path}: none of its {len(skipped)} tiles could be read (first error: "
                f"{skipped[0][1]}); the slide file is probably corrupt."
            )
        writer.finish()
    return ExtractionResult(
        slide_id=str(coords.attrs.get("slide_id", Path(slide_path).stem)),
        n_tiles=len(coords.coords) - len(skipped),
        n_skipped=len(skipped),
        path=Path(out_path),
        timing=timing,
    )
