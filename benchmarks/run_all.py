"""Run every stage benchmark and write ``benchmarks/results.md`` with the machine they ran on.

    python benchmarks/run_all.py [--skip pretrain_small] [--out benchmarks/results.md]
    python benchmarks/run_all.py --gpu-results DIR   # add (or replace) the GPU section only

``DIR`` is the output folder of ``bash benchmarks/gpu.sh DIR`` run on a GPU machine.

Each script prints figures as ratios to a reference measured in the same run (model-only
throughput for extraction, raw h5py reads for training data loading, thumbnail reads for
heatmaps, full attention for GDAT). This script only runs them and collects their output.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: In the order a slide travels through milkit.
SCRIPTS = (
    "tiling",
    "reading",
    "extract",
    "train_loading",
    "heatmap",
    "gdat_scaling",
    "pretrain_small",
)


def machine() -> str:
    """One line describing this machine: CPU, cores, memory, accelerator, torch."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))  # fmt: skip
    except (OSError, StopIteration):
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {memory_gib:.0f} GiB, {gpu}, torch {torch.__version__}"


GPU_HEADING = "## GPU (benchmarks/gpu.sh)"
GPU_STAGES = ("gpu", "extract", "train_loading", "pretrain_full")


def split_gpu_section(results: Path) -> tuple[str, str]:
    """``results`` cut before its GPU section: ``(the rest, the GPU section or "")``."""
    text = results.read_text() if results.is_file() else ""
    rest, _, gpu = text.partition(f"\n{GPU_HEADING}")
    return rest.rstrip(), f"{GPU_HEADING}{gpu}".rstrip() if gpu else ""


def add_gpu_section(results: Path, folder: Path) -> None:
    """Replace the GPU section of ``results`` by the stage outputs of ``gpu.sh`` in ``folder``."""
    text = (split_gpu_section(results)[0] or "# milkit benchmarks") + "\n"
    noise = ("Warning", "warn(", "Tip:", "available:", "Seed set", "LOCAL_RANK", "┃", "┏", "┡",
             "│", "└", "params", "Modules in", "FLOPs", "Precision", "You are using", "`Trainer",
             "deprecated", "log_every_n_steps", "checkpoint:", "encoder:", "next:")  # fmt: skip
    sections = [GPU_HEADING, ""]
    for stage in GPU_STAGES:
        path = folder / f"{stage}.txt"
        if path.is_file():
            lines = [line for line in path.read_text().splitlines()
                     if line.strip() and not any(word in line for word in noise)]  # fmt: skip
            sections += [f"### {stage}", "", "```", *lines, "```", ""]
    results.write_text(text + "\n" + "\n".join(sections))
    print(f"wrote the GPU section of {results}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=SCRIPTS, help="benchmarks to leave out"
    )
    parser.add_argument("--out", type=Path, default=HERE / "results.md")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per benchmark")
    parser.add_argument("--gpu-results", type=Path, default=None, metavar="DIR",
                        help="only put gpu.sh's outputs from DIR into the GPU section")  # fmt: skip
    args = parser.parse_args()
    if args.gpu_results is not None:
        add_gpu_section(args.out, args.gpu_results)
        return

    sections = [
        "# milkit benchmarks",
        "",
        f"{datetime.date.today().isoformat()}, {machine()}",
        "",
        "Written by `python benchmarks/run_all.py`; each figure is measured against its reference in the same run.",
    ]
    started = time.perf_counter()
    for name in SCRIPTS:
        if name in args.skip:
            continue
        print(f"== {name} ==", flush=True)
        begin = time.perf_counter()
        try:
            run = subprocess.run([sys.executable, str(HERE / f"{name}.py")], capture_output=True, text=True,
                                 timeout=args.timeout)  # fmt: skip
            output = (
                run.stdout.strip()
                if run.returncode == 0
                else f"FAILED ({run.returncode}):\n{run.stderr[-2000:]}"
            )
        except subprocess.TimeoutExpired:
            output = f"TIMED OUT after {args.timeout} s"
        print(output, flush=True)
        sections += [
            "",
            f"## {name} ({time.perf_counter() - begin:.0f} s)",
            "",
            "```",
            output,
            "```",
        ]
    sections += ["", f"Total: {time.perf_counter() - started:.0f} s."]
    # a CPU rerun keeps the GPU section of an earlier gpu.sh run (this machine may have none)
    gpu_section = split_gpu_section(args.out)[1]
    if gpu_section:
        sections += ["", gpu_section]
    args.out.write_text("\n".join(sections) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
