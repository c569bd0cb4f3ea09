"""How GDATMIL's forward pass scales with bag size on CPU, next to full self-attention.

Times one bag of N = 2k, 4k, 8k, 16k tiles (D = 384, the default GDATMIL) and a baseline with
the same embedding, pooling and block sizes but ordinary O(N²) self-attention
(``nn.TransformerEncoderLayer``, pre-norm). Prints per-size times and peak memory and the
ratios t(4N) / t(N): about 4 for linear cost, about 16 for quadratic. The baseline is skipped
for sizes where its N x N attention alone would exceed ``--baseline-max``.

GDAT's time is the median of ``--repeats`` calls, the baseline's a single call. Peak memory is
the growth of the process's peak resident set during the timed calls (Linux: the peak is reset
through ``/proc/self/clear_refs``); elsewhere it prints n/a.

Run: ``python benchmarks/gdat_scaling.py`` (under a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

from milkit.models.gdat import GDATMIL
from milkit.models.pooling import GatedAttentionPooling

IN_DIM = 384
SIZES = (2048, 4096, 8192, 16384)


class FullAttentionMIL(nn.Module):
    """GDATMIL's layout with ordinary multi-head self-attention in the blocks."""

    def __init__(self, in_dim: int, embed_dim: int = 512, n_blocks: int = 2, n_heads: int = 8):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.ReLU())
        layer = nn.TransformerEncoderLayer(
            embed_dim, n_heads, 4 * embed_dim, dropout=0.0, activation="gelu",
            batch_first=True, norm_first=True,
        )  # fmt: skip
        self.blocks = nn.TransformerEncoder(layer, n_blocks, enable_nested_tensor=False)
        self.pooling = GatedAttentionPooling(embed_dim)
        self.head = nn.Linear(embed_dim, 2)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        embedding, _ = self.pooling(self.blocks(self.embed(features)), mask)
        return self.head(embedding)


def peak_rss_mib() -> float | None:
    """The process's peak resident set size in MiB since the last reset (Linux only)."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def reset_peak_rss() -> bool:
    """Reset the peak resident set size to the current one; False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def measure(run: Callable[[], object], repeats: int) -> tuple[float, float | None]:
    """Median wall time in seconds over ``repeats`` calls, and peak memory growth in MiB."""
    can_reset = reset_peak_rss()
    base = peak_rss_mib()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    peak = peak_rss_mib()
    growth = peak - base if can_reset and peak is not None and base is not None else None
    return statistics.median(times), growth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="timed GDAT calls per size")
    parser.add_argument(
        "--baseline-max", type=float, default=4.0,
        help="skip the full-attention baseline where its N x N x heads floats exceed this (GiB)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.manual_seed(0)
    models = {"GDAT": GDATMIL(IN_DIM).eval(), "full attention": FullAttentionMIL(IN_DIM).eval()}
    results: dict[str, dict[int, tuple[float, float | None]]] = {name: {} for name in models}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, one bag, D={IN_DIM}")
    print(f"{'N':>6} | {'model':<15} | {'time s':>7} | {'peak MiB':>8}")
    with torch.inference_mode():
        warm_up = torch.randn(1, 256, IN_DIM), torch.ones(1, 256, dtype=torch.bool)
        for model in models.values():
            model(*warm_up)
        for n in SIZES:
            features = torch.randn(1, n, IN_DIM)
            mask = torch.ones(1, n, dtype=torch.bool)
            coords = torch.randint(0, 200, (1, n, 2)) * 256
            for name, model in models.items():
                if name != "GDAT" and 8 * n * n * 4 / 2**30 > args.baseline_max:
                    print(f"{n:>6} | {name:<15} | {'skipped (N x N too large)':>20}")
                    continue
                inputs = (features, mask, coords) if name == "GDAT" else (features, mask)
                repeats = args.repeats if name == "GDAT" else 1  # its quadratic cost is plain
                seconds, memory = measure(partial(model, *inputs), repeats)
                results[name][n] = (seconds, memory)
                shown = "n/a" if memory is None else f"{memory:.0f}"
                print(f"{n:>6} | {name:<15} | {seconds:>7.3f} | {shown:>8}")
    print("\nt(4N) / t(N)   (linear ~4, quadratic ~16; GDAT target <= 5)")
    for name, timings in results.items():
        ratios = [
            f"{n}->{4 * n}: {timings[4 * n][0] / timings[n][0]:.1f}"
            for n in SIZES
            if n in timings and 4 * n in timings
        ]
        print(f"  {name:<15} " + ("  ".join(ratios) if ratios else "n/a (sizes skipped)"))


if __name__ == "__main__":
    main()
