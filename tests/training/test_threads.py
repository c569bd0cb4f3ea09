"""The thread policy: one intra-op thread for small bags on the CPU, restored afterwards."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from lightning.pytorch.accelerators import CPUAccelerator

from milkit.training.threads import SMALL_BAG_ELEMENTS, intra_op_threads, threads_for_bags


def _data(*tiles: int, dim: int = 166) -> SimpleNamespace:
    bags = [SimpleNamespace(n_tiles=n, feature_dim=dim) for n in tiles]
    return SimpleNamespace(cohort=SimpleNamespace(bags=bags))


def test_small_bags_on_the_cpu_get_one_thread_large_ones_the_default() -> None:
    cpu = SimpleNamespace(accelerator=CPUAccelerator())
    assert threads_for_bags(_data(5, 8, 3), cpu) == 1
    large = SMALL_BAG_ELEMENTS // 384 + 1
    assert threads_for_bags(_data(large, large, 5, dim=384), cpu) is None  # median decides
    gpu = SimpleNamespace(accelerator=object())
    assert threads_for_bags(_data(5), gpu) is None
    assert threads_for_bags(object(), cpu) is None


def test_intra_op_threads_restores_the_count_even_on_error() -> None:
    before = torch.get_num_threads()
    try:
        with intra_op_threads(1) as set_threads:
            assert torch.get_num_threads() == 1
            set_threads(None)
            assert torch.get_num_threads() == before
            set_threads(1)
            raise RuntimeError
    except RuntimeError:
        pass
    assert torch.get_num_threads() == before
