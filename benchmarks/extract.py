"""Extraction throughput: the whole pipeline from a slide vs the model alone, in one run.

    python benchmarks/extract.py [--encoder vit_small_patch16_224 ...] [--device cpu] [--tiles 512]

Prints model-only tiles/s (pre-made uint8 tiles already in memory, same preprocessing and
autocast), pipeline tiles/s (``extract_slide`` on a synthetic slide: reading, decoding,
resizing, encoding, writing) and their ratio, for each encoder given, on one slide, interleaved,
best of two; and the share of the pipeline's wall time the model was busy (one run, so immune to
the machine's drift). The target is a ratio >= 0.97.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from milkit.features.encoders import load_encoder
from milkit.features.extract import ExtractionOptions, autocast_dtype, extract_slide
from milkit.features.tile_file import read_coords
from milkit.pipeline.tile import TilingOptions, coords_path, tile_slide
from milkit.synth import write_slide
from milkit.synth.layout import SlideParams


def model_only(
    encoder, tiles: torch.Tensor, *, device: torch.device, options: ExtractionOptions
) -> float:
    """Tiles/s of preprocessing + forward on tiles already in memory."""
    cast = autocast_dtype(device, options.precision)
    model = encoder.to(device).eval()
    batches = tiles.split(options.batch_size)

    def run() -> None:
        for batch in batches:
            with (
                torch.inference_mode(),
                torch.autocast(device.type, dtype=cast or torch.float32, enabled=cast is not None),
            ):
                model(encoder.preprocess(batch.to(device))).float().cpu()

    run()  # warm-up (allocator, kernels)
    started = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(tiles) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", nargs="+", default=["vit_small_patch16_224"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--tiles", type=int, default=512, help="tiles in the synthetic slide (about)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=ExtractionOptions().num_workers)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    device = torch.device(args.device)
    options = ExtractionOptions(
        batch_size=args.batch_size, num_workers=args.num_workers, precision=args.precision
    )
    with tempfile.TemporaryDirectory() as work:
        work_dir = Path(work)
        side_px = int(
            224 * np.sqrt(args.tiles / 0.35)
        )  # about a third of a synthetic slide is tissue
        slide = write_slide(
            work_dir / "bench.svs", SlideParams(seed=1, artefacts=False), size_px=(side_px, side_px)
        ).slide_path
        tile_slide(slide, work_dir, TilingOptions(target_mpp=0.5, tile_size_px=224))
        coords = read_coords(coords_path(work_dir, slide.stem))
        n_tiles = len(coords.coords)

        from milkit.slides.reader import open_slide
        from milkit.slides.tiling import read_tile

        with open_slide(slide) as reader:
            tiles = torch.from_numpy(
                np.stack([read_tile(reader, coords.tile_spec, xy) for xy in coords.coords])
            )
        cast = autocast_dtype(device, options.precision)
        print(
            f"{n_tiles} tiles on {device}, autocast {cast}, batch {options.batch_size}, "
            f"workers {options.num_workers}, random weights"
        )
        for name in args.encoder:
            encoder = load_encoder(name, pretrained=False)
            model_rates, pipeline_rates, busy = [], [], []
            for repeat in range(2):  # interleaved, best of two: the machine's speed drifts
                model_rates.append(model_only(encoder, tiles, device=device, options=options))
                started = time.perf_counter()
                result = extract_slide(
                    slide,
                    coords.path,
                    work_dir / f"{name}_{repeat}.h5",
                    encoder,
                    config_hash="bench",
                    device=device,
                    options=options,
                )
                wall = time.perf_counter() - started
                pipeline_rates.append(n_tiles / wall)
                busy.append(result.timing.model_seconds / wall)
            model_rate, pipeline_rate = max(model_rates), max(pipeline_rates)
            print(
                f"{name}: model-only {model_rate:.1f} tiles/s, pipeline {pipeline_rate:.1f} "
                f"tiles/s, ratio pipeline/model {pipeline_rate / model_rate:.3f} (target >= 0.97); "
                f"within the pipeline's run the model was busy {max(busy):.3f} of the time"
            )


if __name__ == "__main__":
    main()
