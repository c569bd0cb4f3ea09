"""Tissue detection + tiling throughput and peak memory on large synthetic slides.

    python benchmarks/tiling.py [--sizes 10000x7500 40000x30000] [--work benchmarks/_work]

Each slide is tiled in a fresh process (so peak RSS is that slide's alone) at 0.5 µm/px, 224 px.
Prints tiles/s, slides/s and peak RSS per slide size, and the ratio of peak memory between the
largest and the smallest slide: tiling reads a thumbnail level, never level 0, so peak memory
should stay nearly flat while the slide area grows 16x. Slides are cached in the work folder.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def _tile_in_this_process(slide: Path, out: Path) -> None:
    from milkit.pipeline.tile import TilingOptions, tile_slide

    # Imports done and libraries loaded: what is added from here on is the slide's.
    baseline_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    result = tile_slide(slide, out, TilingOptions(target_mpp=0.5, tile_size_px=224))
    seconds = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    record = {
        "tiles": result.n_tiles,
        "seconds": seconds,
        "peak_mib": peak_mib,
        "baseline_mib": baseline_mib,
    }
    print(json.dumps(record))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["10000x7500", "20000x15000", "40000x30000"])
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "_work")
    parser.add_argument("--_tile", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._tile:
        _tile_in_this_process(*args._tile)
        return

    from milkit.synth import SlideParams, write_slide

    rows = []
    for size in args.sizes:
        width, height = (int(v) for v in size.split("x"))
        slide = args.work / f"tiling_{width}x{height}.svs"
        if not slide.exists():
            started = time.perf_counter()
            write_slide(slide, SlideParams(seed=7), size_px=(width, height))
            print(f"wrote {slide} in {time.perf_counter() - started:.0f} s", flush=True)
        out = args.work / f"tiling_out_{width}x{height}"
        run = subprocess.run(
            [sys.executable, __file__, "--_tile", str(slide), str(out)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(
            {
                "size": size,
                "megapixels": width * height / 1e6,
                **json.loads(run.stdout.strip().splitlines()[-1]),
            }
        )

    print(
        f"\n{'slide':>12} {'Mpx':>6} {'tiles':>6} {'s':>6} {'tiles/s':>8} {'slides/s':>8} {'peak MiB':>8} {'added MiB':>9}"
    )
    for row in rows:
        row["added_mib"] = row["peak_mib"] - row["baseline_mib"]
        print(f"{row['size']:>12} {row['megapixels']:6.0f} {row['tiles']:6d} {row['seconds']:6.2f} "
              f"{row['tiles'] / row['seconds']:8.0f} {1 / row['seconds']:8.2f} {row['peak_mib']:8.0f} "
              f"{row['added_mib']:9.0f}")  # fmt: skip
    first, last = rows[0], rows[-1]
    print(
        f"\nslide area x{last['megapixels'] / first['megapixels']:.0f} -> memory added by tiling "
        f"x{last['added_mib'] / max(first['added_mib'], 1.0):.2f} (the thumbnail is capped at "
        "2048 px, so it stops growing once slides are larger than ~8 mm)"
    )


if __name__ == "__main__":
    main()
