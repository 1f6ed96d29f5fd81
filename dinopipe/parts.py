"""The blocks of one volume and their partition into parts: one cluster job each.

One rule for every stage that spreads a volume over jobs (distributed prediction,
:mod:`dinopipe.distributed`; segmentation in parts, :mod:`dinopipe.segment_parts`):

* the volume's grid (z, y, x voxels) is tiled by blocks of ``block`` voxels, the last ones
  along each axis clipped to the grid, and the blocks are numbered in C order (z slowest):
  block ``i`` starts at ``unravel_index(i, counts) * block``;
* part ``p`` takes the *consecutive* blocks ``p * n ... p * n + n - 1`` for ``n`` blocks per
  part; the last part may have fewer, and with a fixed number of parts (``parts``) the
  trailing parts may have none.

The stages only choose ``n``: prediction takes ``predict.distributed.blocks_per_job``
(rounded up to a multiple of ``predict.batch_size``, :func:`dinopipe.distributed.blocks_per_part`),
segmentation spreads the blocks evenly over ``segment.jobs`` parts (:meth:`BlockPlan.in_jobs`).
No torch, no I/O: Snakemake imports this module when it parses the workflow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BlockPlan:
    """Blocks of one volume and their partition into parts (one cluster job each).

    Attributes:
        shape: The grid (z, y, x), voxels.
        block: Core block shape (z, y, x), voxels (also the output chunk shape).
        blocks_per_part: Consecutive blocks (C order) per part; the last part may have fewer.
        parts: A fixed number of parts (``segment.jobs``: the workflow knows its jobs before
            the volume's size), at least the parts the blocks need; the trailing ones may
            have no block. None: as many parts as the blocks need.
    """

    shape: tuple[int, int, int]
    block: tuple[int, int, int]
    blocks_per_part: int
    parts: int | None = None

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or len(self.block) != 3 or min(*self.shape, *self.block) < 1:
            raise ValueError(f"a block plan needs a (z, y, x) shape and block of positive voxels, got shape "
                             f"{self.shape} and block {self.block}")
        if self.blocks_per_part < 1:
            raise ValueError(f"blocks per part must be >= 1, got {self.blocks_per_part}")
        needed = -(-self.num_blocks // self.blocks_per_part)
        if self.parts is not None and self.parts < needed:
            raise ValueError(f"{self.parts} parts of {self.blocks_per_part} blocks cannot hold {self.num_blocks} "
                             f"blocks (at least {needed} parts)")

    @classmethod
    def in_jobs(cls, shape: Sequence[int], block: Sequence[int], jobs: int) -> BlockPlan:
        """The blocks spread evenly over exactly ``jobs`` parts: ``ceil(blocks / jobs)`` per part.

        Raises:
            ValueError: ``jobs`` < 1.
        """
        if int(jobs) < 1:
            raise ValueError(f"the number of parts (jobs) must be >= 1, got {jobs}")
        counts = [-(-int(s) // int(b)) for s, b in zip(shape, block, strict=True)]
        per_part = max(1, -(-math.prod(counts) // int(jobs)))
        return cls(tuple(int(s) for s in shape), tuple(int(b) for b in block), per_part, int(jobs))  # type: ignore[arg-type]

    @property
    def counts(self) -> tuple[int, int, int]:
        """Blocks along (z, y, x)."""
        return tuple(-(-s // b) for s, b in zip(self.shape, self.block, strict=True))  # type: ignore[return-value]

    @property
    def num_blocks(self) -> int:
        return math.prod(self.counts)

    @property
    def num_parts(self) -> int:
        return self.parts if self.parts is not None else -(-self.num_blocks // self.blocks_per_part)

    def part_blocks(self, part: int) -> range:
        """Indices of the blocks of ``part`` (0-based); empty for a trailing part without blocks."""
        if not 0 <= part < self.num_parts:
            raise ValueError(f"part {part} does not exist: the plan has parts 0..{self.num_parts - 1}")
        return range(min(part * self.blocks_per_part, self.num_blocks),
                     min((part + 1) * self.blocks_per_part, self.num_blocks))

    def block_start(self, index: int) -> tuple[int, int, int]:
        """The first voxel (z, y, x) of block ``index`` (C order)."""
        if not 0 <= index < self.num_blocks:
            raise ValueError(f"block {index} does not exist: the plan has blocks 0..{self.num_blocks - 1}")
        return tuple(int(i) * b for i, b in zip(np.unravel_index(index, self.counts), self.block))  # type: ignore[return-value]

    def window(self, index: int) -> tuple[slice, slice, slice]:
        """The voxels (z, y, x) of block ``index``, clipped to the grid (as
        :func:`dinopipe.geometry.blocks` lists them)."""
        start = self.block_start(index)
        return tuple(slice(o, min(o + b, s)) for o, b, s in zip(start, self.block, self.shape))  # type: ignore[return-value]

    def block_index(self, voxel: Sequence[int]) -> int:
        """The block holding ``voxel`` (z, y, x)."""
        if len(voxel) != 3 or any(not 0 <= v < s for v, s in zip(voxel, self.shape)):
            raise ValueError(f"voxel {list(voxel)} lies outside the volume of shape {list(self.shape)} (z, y, x)")
        return int(np.ravel_multi_index(tuple(v // b for v, b in zip(voxel, self.block)), self.counts))

    def part_of_block(self, index: int) -> int:
        """The part that holds block ``index``."""
        self.block_start(index)  # checks the index
        return index // self.blocks_per_part

    def part_starts(self, part: int) -> list[tuple[int, int, int]]:
        """Block starts (z, y, x voxels) of ``part``, in C order."""
        return [self.block_start(i) for i in self.part_blocks(part)]

    def describe(self, part: int) -> str:
        """``"blocks 8-15 of 64 (first voxels (z, y, x) [0, 64, 0]..[16, 112, 48], blocks of [8, 16, 16])"``:
        a part's blocks by index and first voxels (shown by ``snakemake -n`` for each part job)."""
        blocks = self.part_blocks(part)
        if not blocks:
            return f"no blocks (the volume has {self.num_blocks} blocks, {self.blocks_per_part} per part)"
        first, last = self.block_start(blocks[0]), self.block_start(blocks[-1])
        return (f"blocks {blocks[0]}-{blocks[-1]} of {self.num_blocks} (first voxels (z, y, x) {list(first)}.."
                f"{list(last)}, blocks of {list(self.block)})")
