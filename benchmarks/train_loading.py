"""Throughput of milkit's MIL data path against raw h5py reads of the same bytes.

Writes a synthetic feature cohort, warms the page cache, then times, in alternation over
several rounds (the best time of each kept):

- raw: per file, ``h5py.File(path)``, ``["features"][()]``, ``["coords"][()]``, close;
- milkit, first epoch: a training epoch (shuffled, every tile, tensors out) through a
  ``MILDataModule`` loader whose dataset is new, so every file is opened during the epoch;
- milkit, later epochs: the same loader again, file handles kept open from the epoch before
  (what training epochs 2, 3, ... do).

Both run in-process on one core (``num_workers=0``). Prints the throughputs and the ratios to
raw (target: >= 0.8). With ``--train-device`` it also times a training epoch of ABMIL (forward,
cross-entropy, backward, AdamW step) over the same loader on that device, and prints its
throughput as a ratio to the loading-only epoch: near 1 means training is bound by reading.

    python benchmarks/train_loading.py [--bags 64] [--tiles 4000] [--dim 384] [--dtype float16]
        [--train-device cuda]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import torch
import torch.nn.functional as F

from milkit.data.bags import BagDataset
from milkit.data.datamodule import MILDataModule
from milkit.models.abmil import ABMIL
from milkit.synth.features import write_witness_cohort


def _raw_epoch(paths: list[Path]) -> int:
    """Read every file's features and coords; returns the bytes read."""
    total = 0
    for path in paths:
        with h5py.File(path, "r") as file:
            total += file["features"][()].nbytes + file["coords"][()].nbytes
    return total


def _milkit_epoch(data: MILDataModule, *, fresh: bool) -> None:
    """One training epoch over every bag and tile (a new dataset when ``fresh``)."""
    cohort = data.cohort
    if fresh or "train" not in data._datasets:
        data._datasets["train"] = BagDataset(cohort.bags, cohort.targets(), training=True)
    bags = sum(len(batch) for batch in data.train_dataloader())
    assert bags == len(cohort.bags)  # every tile of every file: the same bytes as raw


def _training_epoch(data: MILDataModule, model: ABMIL, optimiser: torch.optim.Optimizer) -> None:
    """One ABMIL training epoch on the model's device, synchronised at the end."""
    device = next(model.parameters()).device
    for batch in data.train_dataloader():
        output = model(batch.features.to(device).float(), batch.mask.to(device))
        loss = F.cross_entropy(output.logits, batch.targets.to(device))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    if device.type == "cuda":
        torch.cuda.synchronize()


def _seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bags", type=int, default=64)
    parser.add_argument("--tiles", type=int, default=4000, help="tiles per bag")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--train-device", default=None, help="also time ABMIL training here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="milkit-loading-") as folder:
        cohort = write_witness_cohort(
            folder, n_bags=args.bags, n_tiles=(args.tiles, args.tiles), feature_dim=args.dim,
            dtype=args.dtype, seed=0,
        )  # fmt: skip
        paths = sorted(cohort.features_dir.glob("*.h5"))
        data = MILDataModule(cohort.features_dir, cohort.labels_csv, batch_size=args.batch_size)
        print(f"{len(data.cohort.bags)} bags checked")  # once per run, before any epoch
        epoch_bytes = _raw_epoch(paths)  # also warms the page cache
        times = {"raw": [], "first": [], "later": []}
        for _ in range(args.rounds):  # alternate, so all see the same machine state
            times["raw"].append(_seconds(lambda: _raw_epoch(paths)))
            times["first"].append(_seconds(lambda: _milkit_epoch(data, fresh=True)))
            times["later"].append(_seconds(lambda: _milkit_epoch(data, fresh=False)))
        if args.train_device:
            model = ABMIL(args.dim, data.n_classes).to(args.train_device)
            optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)
            _training_epoch(data, model, optimiser)  # warm-up: kernels, allocator
            times["train"] = [
                _seconds(lambda: _training_epoch(data, model, optimiser)) for _ in range(3)
            ]
    best = {name: min(values) for name, values in times.items()}
    megabytes = epoch_bytes / 1e6
    print(
        f"cohort: {args.bags} bags x {args.tiles} tiles x {args.dim}-d {args.dtype} "
        f"({megabytes:.0f} MB per epoch), batch size {args.batch_size}, best of {args.rounds}"
    )
    print(f"raw h5py read:         {megabytes / best['raw']:7.0f} MB/s ({best['raw']:.3f} s)")
    for name, label in (("first", "milkit first epoch:"), ("later", "milkit later epochs:")):
        ratio = best["raw"] / best[name]
        verdict = "met" if ratio >= 0.8 else "NOT met"
        print(
            f"{label:22s} {megabytes / best[name]:7.0f} MB/s ({best[name]:.3f} s), "
            f"ratio to raw {ratio:.2f} (target >= 0.8: {verdict})"
        )
    if args.train_device:
        print(
            f"ABMIL training epoch on {args.train_device}: {megabytes / best['train']:7.0f} MB/s "
            f"({len(paths) / best['train']:.0f} bags/s), ratio to loading alone "
            f"{best['later'] / best['train']:.2f}"
        )


if __name__ == "__main__":
    main()
