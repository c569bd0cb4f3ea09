"""Reading blocks: every tile in exactly one block, blocks and their tiles in row order."""

from __future__ import annotations

import numpy as np

from milkit.features.extract import plan_blocks


def test_blocks_partition_the_tiles_in_row_order() -> None:
    grid = np.array([(x, y) for y in range(0, 1000, 100) for x in range(0, 1000, 100)])
    shuffled = grid[np.random.default_rng(0).permutation(len(grid))]
    blocks = plan_blocks(shuffled, block_level0=400)
    assert sorted(np.concatenate(blocks).tolist()) == list(range(len(grid)))  # each tile once
    corners = [tuple(shuffled[block[0]]) for block in blocks]
    assert corners == [(x, y) for y in (0, 400, 800) for x in (0, 400, 800)]  # blocks by rows
    first = shuffled[blocks[0]]
    assert first.tolist() == [[x, y] for y in range(0, 400, 100) for x in range(0, 400, 100)]
    assert [len(block) for block in blocks] == [16, 16, 8, 16, 16, 8, 8, 8, 4]
    assert plan_blocks(np.zeros((0, 2), np.int64), 400) == []
