"""Tile reading throughput against the decode limit, in one run on this machine.

    python benchmarks/reading.py [--aperio tests/fixtures/CMU-1-Small-Region.svs] [--side 8000]

For a synthetic slide (256-px JPEG tiles) and a real Aperio slide, at the native level (224-px
tiles at the scan resolution) and with a 2x downsample (448 px read, 224 px out), prints tiles/s
and the ratio to the *decode limit* for:

- ``decode limit``: the raw bytes of every stored tile the tiles overlap, read once (``pread``)
  and decoded once (imagecodecs' libjpeg-turbo); no cropping, no resizing;
- ``milkit``: :class:`milkit.features.extract.TileDataset` as ``milkit preprocess`` reads a slide
  (blocks of tiles, the default reader), in this process;
- ``openslide``: OpenSlide ``read_region`` per tile (RGBA out, nothing else; plus the same resize
  when downsampling).

Single-threaded (one intra-op thread, no workers), each reader timed best of five. Target:
milkit >= 0.8 x the decode limit at the native level.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import imagecodecs
import numpy as np
import openslide
import torch
from PIL import Image

from milkit.features.extract import TileDataset
from milkit.features.tile_file import read_coords
from milkit.pipeline.tile import TilingOptions, coords_path, tile_slide
from milkit.slides.reader import open_slide
from milkit.slides.tiff_tiles import TiledLevel
from milkit.slides.tiling import TileSpec
from milkit.synth import SlideParams, write_slide

APERIO = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "CMU-1-Small-Region.svs"


def best_of(run: Callable[[], int], repeats: int = 5) -> float:
    """Tiles/s of the fastest of ``repeats`` runs (the machine's speed drifts)."""
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        n = run()
        rates.append(n / (time.perf_counter() - started))
    return max(rates)


def stored_tiles(
    level: TiledLevel, coords: np.ndarray, spec: TileSpec, downsample: float
) -> list[int]:
    """Indices of the stored tiles any tile overlaps."""
    needed: set[int] = set()
    tw, th = level.tile_width, level.tile_height
    for x0, y0 in coords:
        x, y = int(x0 / downsample), int(y0 / downsample)
        x1 = min(x + spec.read_size_px, level.width) - 1
        y1 = min(y + spec.read_size_px, level.height) - 1
        for row in range(y // th, y1 // th + 1):
            for column in range(x // tw, x1 // tw + 1):
                needed.add(level.tile_index(column, row))
    return sorted(needed)


def measure(slide: Path, target_mpp: float, work: Path) -> dict[str, float]:
    """Tiles/s of each reader on the tissue tiles of ``slide`` at ``target_mpp``."""
    out = work / f"{slide.stem}_{target_mpp:g}"
    tile_slide(slide, out, TilingOptions(target_mpp=target_mpp, tile_size_px=224, min_tissue=0.0))
    coords_file = read_coords(coords_path(out, slide.stem))
    coords, spec = coords_file.coords, coords_file.tile_spec
    assert spec is not None
    with open_slide(slide) as reader:
        level = reader._levels[spec.level]  # noqa: SLF001 - the benchmark needs the index
        downsample = reader.level_downsamples[spec.level]
    needed = stored_tiles(level, coords, spec, downsample)

    def decode_limit() -> int:
        fd = os.open(slide, os.O_RDONLY)
        try:
            for index in needed:
                data = os.pread(fd, int(level.byte_counts[index]), int(level.offsets[index]))
                imagecodecs.jpeg8_decode(
                    data, tables=level.jpeg_tables, colorspace=level.jpeg_colorspace
                )
        finally:
            os.close(fd)
        return len(coords)

    def milkit() -> int:
        dataset = TileDataset(slide, coords, spec)
        for block in range(len(dataset)):
            dataset[block]
        return len(coords)

    def plain_openslide() -> int:
        handle = openslide.OpenSlide(str(slide))
        size = (spec.read_size_px, spec.read_size_px)
        for x, y in coords:
            region = handle.read_region((int(x), int(y)), spec.level, size)
            if spec.needs_resize:
                region.resize(
                    (spec.tile_size_px,) * 2, Image.Resampling.BILINEAR, reducing_gap=None
                )
            else:
                np.asarray(region)
        handle.close()
        return len(coords)

    rates = {"decode limit": best_of(decode_limit)}
    rates["milkit"] = best_of(milkit)
    rates["openslide"] = best_of(plain_openslide)
    rates["tiles"] = len(coords)
    rates["stored tiles decoded once"] = len(needed)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aperio", type=Path, default=APERIO, help="a real Aperio slide")
    parser.add_argument("--side", type=int, default=8000, help="synthetic slide side, px")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as work_name:
        work = Path(work_name)
        synthetic = write_slide(
            work / "synthetic.svs",
            SlideParams(seed=1, artefacts=False),
            size_px=(args.side,) * 2,
            mpp=0.25,
        ).slide_path
        slides = [("synthetic (256-px JPEG tiles, 0.25 µm/px)", synthetic, 0.25)]
        if args.aperio.is_file():
            with open_slide(args.aperio) as reader:
                slides.append(
                    (
                        f"{args.aperio.name} (Aperio, {reader.mpp:.3f} µm/px)",
                        args.aperio,
                        reader.mpp,
                    )
                )
        print("| slide | read | tiles | reader | tiles/s | / decode limit |")
        print("|---|---|---|---|---|---|")
        for name, slide, scan_mpp in slides:
            for label, target in (("native", scan_mpp), ("2x down", 2 * scan_mpp)):
                rates = measure(slide, target, work)
                limit = rates["decode limit"]
                for reader_name in ("decode limit", "milkit", "openslide"):
                    print(
                        f"| {name} | {label} | {rates['tiles']:.0f} | {reader_name} | "
                        f"{rates[reader_name]:,.0f} | {rates[reader_name] / limit:.2f} |"
                    )


if __name__ == "__main__":
    main()
