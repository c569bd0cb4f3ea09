"""How many intra-op threads a CPU training run uses: one for small bags.

A MIL step on a bag of a few hundred tiles is a chain of tiny operations. Split across
threads, each operation spends longer handing work over than computing, and far longer when
the cores are shared with other jobs (a laptop, a shared node, CI): measured on MUSK1 (bags of
~5 tiles x 166 features) on 2 loaded cores, a plain training loop ran 60 times faster with one
thread than with two (issue #19; ``benchmarks/cv_speed.py`` measures it on any machine). Large
bags (thousands of tiles of ViT features) are real matrix products and keep torch's default.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from lightning.pytorch.accelerators import CPUAccelerator

#: Bags whose median tile count x feature length is at most this train with one thread
#: (e.g. 2,730 tiles of 384-d features; ~6,300 of 166-d).
SMALL_BAG_ELEMENTS = 1 << 20


def threads_for_bags(datamodule: Any, trainer: Any) -> int | None:
    """The intra-op thread count for training on this data: 1 for small bags on the CPU.

    Args:
        datamodule: A :class:`~milkit.data.datamodule.MILDataModule` (anything with a
            ``cohort``; None or other objects keep the default).
        trainer: The Lightning trainer (its accelerator decides whether this is a CPU run).

    Returns:
        1, or None to keep torch's default.
    """
    cohort = getattr(datamodule, "cohort", None)
    if cohort is None or not isinstance(trainer.accelerator, CPUAccelerator):
        return None
    return 1 if small_bags(cohort.bags) else None


def small_bags(bags: Sequence[Any]) -> bool:
    """Whether the median bag's tile count x feature length is at most
    :data:`SMALL_BAG_ELEMENTS`.

    Args:
        bags: Anything with ``n_tiles`` and ``feature_dim`` (:class:`~milkit.data.bags.BagInfo`).
    """
    sizes = [bag.n_tiles * bag.feature_dim for bag in bags]
    return bool(sizes) and float(np.median(sizes)) <= SMALL_BAG_ELEMENTS


def free_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@contextmanager
def intra_op_threads(threads: int | None) -> Iterator[Callable[[int | None], None]]:
    """Set torch's intra-op threads for a block and restore them after it.

    Args:
        threads: Threads for the block; None keeps the current number.

    Yields:
        A setter to change the number inside the block (None: back to the number before).
    """
    before = torch.get_num_threads()

    def set_threads(count: int | None) -> None:
        torch.set_num_threads(count if count is not None else before)

    set_threads(threads)
    try:
        yield set_threads
    finally:
        torch.set_num_threads(before)
