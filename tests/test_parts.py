"""The one partition of a volume's blocks into parts (dinopipe.parts.BlockPlan), used by the
distributed prediction and by the segmentation in parts: hand-computed plans."""

from __future__ import annotations

import pytest

from dinopipe.geometry import blocks
from dinopipe.parts import BlockPlan


def test_block_grid_and_parts_by_hand():
    # 20 x 26 x 30 voxels in 8 x 12 x 16 blocks: 3 x 3 x 2 = 18 blocks; 4 per part: 5 parts (4+4+4+4+2)
    plan = BlockPlan((20, 26, 30), (8, 12, 16), 4)
    assert plan.counts == (3, 3, 2) and plan.num_blocks == 18 and plan.num_parts == 5
    assert [len(plan.part_blocks(p)) for p in range(5)] == [4, 4, 4, 4, 2]
    assert plan.part_blocks(1) == range(4, 8)
    # C order: x fastest, then y, then z
    assert plan.block_start(0) == (0, 0, 0)
    assert plan.block_start(1) == (0, 0, 16)
    assert plan.block_start(2) == (0, 12, 0)
    assert plan.block_start(6) == (8, 0, 0)
    assert plan.block_start(17) == (16, 24, 16)
    assert plan.part_starts(4) == [(16, 24, 0), (16, 24, 16)]
    assert plan.block_index((17, 25, 29)) == 17 and plan.block_index((9, 0, 15)) == 6
    assert plan.part_of_block(17) == 4 and plan.part_of_block(3) == 0 and plan.part_of_block(4) == 1
    # every block in exactly one part
    assert sorted(i for p in range(plan.num_parts) for i in plan.part_blocks(p)) == list(range(18))
    assert plan.describe(4) == ("blocks 16-17 of 18 (first voxels (z, y, x) [16, 24, 0]..[16, 24, 16], "
                                "blocks of [8, 12, 16])")


def test_plan_errors_name_the_bad_value():
    plan = BlockPlan((20, 26, 30), (8, 12, 16), 4)
    with pytest.raises(ValueError, match=r"part 5 does not exist: the plan has parts 0\.\.4"):
        plan.part_blocks(5)
    with pytest.raises(ValueError, match=r"block 18 does not exist"):
        plan.block_start(18)
    with pytest.raises(ValueError, match=r"voxel \[20, 0, 0\] lies outside"):
        plan.block_index((20, 0, 0))
    with pytest.raises(ValueError, match="blocks per part must be >= 1"):
        BlockPlan((4, 4, 4), (4, 4, 4), 0)


def test_a_fixed_number_of_parts_spreads_the_blocks_evenly():
    # segment.jobs: exactly `jobs` parts of ceil(blocks / jobs) consecutive blocks
    plan = BlockPlan.in_jobs((20, 26, 30), (8, 12, 16), 4)
    assert plan.blocks_per_part == 5 and plan.num_parts == 4
    assert [list(plan.part_blocks(p)) for p in range(4)] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9],
                                                             [10, 11, 12, 13, 14], [15, 16, 17]]
    # more jobs than blocks: the trailing parts hold none, and say so
    few = BlockPlan.in_jobs((8, 12, 16), (8, 12, 16), 3)
    assert few.num_blocks == 1 and [len(few.part_blocks(p)) for p in range(3)] == [1, 0, 0]
    assert few.part_starts(2) == [] and few.describe(2).startswith("no blocks")
    with pytest.raises(ValueError, match="must be >= 1"):
        BlockPlan.in_jobs((8, 12, 16), (8, 12, 16), 0)
    with pytest.raises(ValueError, match="cannot hold 18 blocks"):
        BlockPlan((20, 26, 30), (8, 12, 16), 4, parts=4)


def test_windows_are_the_blockwise_grid():
    """A block's window is the one the one-job blockwise stages use (geometry.blocks, C order)."""
    plan = BlockPlan((20, 26, 30), (8, 12, 16), 4)
    assert [plan.window(i) for i in range(plan.num_blocks)] == blocks((20, 26, 30), (8, 12, 16))
