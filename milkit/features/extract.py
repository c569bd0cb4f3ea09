"""Streaming tile-feature extraction: slide regions -> encoder -> rows of an HDF5 feature file.

Tiles are read by DataLoader workers, each with its own slide handle; batches are encoded
under ``torch.inference_mode`` (bf16/fp16 autocast where the device supports it) and appended
to the feature file in chunks, so memory does not depend on the number of tiles. A tile that
cannot be read is recorded in the file (``skipped_coords``) and skipped.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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


class TileDataset(Dataset[dict[str, Any]]):
    """Tiles of one slide, read on demand (in DataLoader workers, one slide handle per worker).

    The slide is opened at the spec's ``slide_mpp``: the resolution tiling used, whether the file
    records it or it was given (``--slide-mpp``/``--mpp-csv``), so no override travels further.

    Args:
        slide_path: The slide.
        coords_level0: ``(N, 2)`` int64 top-left corners in level-0 pixels.
        spec: Tile geometry of the slide.
    """

    def __init__(self, slide_path: str | Path, coords_level0: np.ndarray, spec: TileSpec) -> None:
        self.slide_path = Path(slide_path)
        self.coords_level0 = np.asarray(coords_level0, dtype=np.int64)
        self.spec = spec
        self._reader: SlideReader | None = None
        self._reader_owner: int | None = None

    def __len__(self) -> int:
        return len(self.coords_level0)

    def _open(self) -> SlideReader:
        # A handle must not cross a fork: reopen when the worker (or process) changes.
        worker = get_worker_info()
        owner = worker.id if worker is not None else -1
        if self._reader is None or self._reader_owner != owner:
            self._reader = open_slide(self.slide_path, mpp=self.spec.slide_mpp)
            self._reader_owner = owner
        return self._reader

    def __getitem__(self, index: int) -> dict[str, Any]:
        x, y = (int(v) for v in self.coords_level0[index])
        size = self.spec.tile_size_px
        try:
            tile = read_tile(self._open(), self.spec, (x, y))
            return {
                "index": index,
                "tile": torch.from_numpy(np.require(tile, requirements=["C", "W"])),
                "error": "",
            }
        except SlideReadError as exc:
            return {
                "index": index,
                "tile": torch.zeros((size, size, 3), dtype=torch.uint8),
                "error": str(exc),
            }

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_reader"], state["_reader_owner"] = None, None  # handles are not picklable
        return state


@dataclass
class ExtractionResult:
    """What extracting one slide produced."""

    slide_id: str
    n_tiles: int
    n_skipped: int
    path: Path


@dataclass(frozen=True)
class ExtractionOptions:
    """How features are computed (only ``dtype`` changes the stored numbers beyond rounding).

    Args:
        batch_size: Tiles per forward pass.
        num_workers: DataLoader workers reading tiles (0 = read in the main process).
        precision: Autocast: ``auto`` (bf16 where supported), ``bf16``, ``fp16`` or ``fp32``.
        dtype: Stored feature dtype, ``float16`` (default) or ``float32``.
    """

    batch_size: int = 64
    num_workers: int = 1
    precision: Precision = "auto"
    dtype: Literal["float16", "float32"] = "float16"


def iterate_features(
    dataset: TileDataset,
    encoder: Encoder,
    *,
    device: torch.device,
    options: ExtractionOptions,
) -> Iterator[tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]]:
    """Encode a slide's tiles batch by batch.

    Yields:
        ``(indices (b,), features (b, D) float32, failures)`` per batch, where ``indices`` are the
        rows of ``dataset.coords_level0`` that were read and ``failures`` lists ``(index,
        message)`` of tiles that could not be read.
    """
    loader = DataLoader(
        dataset,
        batch_size=options.batch_size,
        num_workers=options.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if options.num_workers > 0 else None,
    )
    cast = autocast_dtype(device, options.precision)
    model = encoder.to(device).eval()  # the whole Encoder: its pooling and its mean/std buffers
    for batch in loader:
        errors: list[str] = list(batch["error"])
        indices = batch["index"].numpy()
        good = np.array([not message for message in errors], dtype=bool)
        failures = [(int(i), m) for i, m in zip(indices, errors, strict=True) if m]
        if not good.any():
            yield indices[:0], np.empty((0, encoder.embed_dim), np.float32), failures
            continue
        tiles = batch["tile"][torch.from_numpy(good)].to(device, non_blocking=True)
        autocast = (
            torch.autocast(device_type=device.type, dtype=cast)
            if cast is not None
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            embeddings = model(encoder.preprocess(tiles))
        yield indices[good], embeddings.float().cpu().numpy(), failures


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
        extra_attrs={"encoder_config": encoder.describe(), "precision": options.precision},
    ) as writer:
        for indices, features, failures in iterate_features(
            dataset, encoder, device=device, options=options
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
    )
