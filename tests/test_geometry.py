"""dinopipe.geometry: grids, windows and block tiling, against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from dinopipe.geometry import (
    Geometry,
    blocks,
    centre_window,
    check_ratio,
    grow_window,
    inner_window,
    patch_alignment,
    raw_window,
    slice_weights,
    sub_geometry,
)

# raw at 4 nm isotropic, 64^3 voxels starting at 0 nm; labels at 8 nm covering 64..192 nm
RAW = Geometry((64, 64, 64), (4.0, 4.0, 4.0), (2.0, 2.0, 2.0))
LABELS = Geometry((16, 16, 16), (8.0, 8.0, 8.0), (68.0, 68.0, 68.0))


def test_begin_and_end():
    assert list(RAW.begin_nm) == [0, 0, 0] and list(RAW.end_nm) == [256, 256, 256]
    assert list(LABELS.begin_nm) == [64, 64, 64] and list(LABELS.end_nm) == [192, 192, 192]


def test_raw_window_is_the_raw_under_the_grid():
    window, geom = raw_window(RAW, LABELS)
    assert window == (slice(16, 48),) * 3  # 64 nm / 4 nm .. 192 nm / 4 nm
    assert geom == Geometry((32, 32, 32), (4.0, 4.0, 4.0), (66.0, 66.0, 66.0))


def test_raw_window_context_aligns_only_axes_with_context():
    window, geom = raw_window(RAW, LABELS, context=(0, 5, 40), align=16)
    # z: no context, no alignment; y: 16 - 5 = 11 -> 0 (multiple of 16), 48 + 5 = 53;
    # x: 16 - 40 < 0 -> clipped to 0, 48 + 40 -> clipped to 64
    assert window == (slice(16, 48), slice(0, 53), slice(0, 64))
    assert geom.translation == (66.0, 2.0, 2.0) and geom.shape == (32, 53, 64)


def test_centre_window_takes_voxels_whose_centre_is_inside():
    # label centres at 68, 76, ...: [70, 100) holds 76, 84, 92 -> indices 1..3
    assert centre_window(LABELS, (70, 0, 0), (100, 1000, 68)) == (slice(1, 4), slice(0, 16), slice(0, 0))


def test_sub_geometry():
    assert sub_geometry(LABELS, (slice(2, 5), slice(0, 16), slice(15, 16))) == Geometry(
        (3, 16, 1), (8.0, 8.0, 8.0), (84.0, 68.0, 188.0))


def test_blocks_tile_the_grid_exactly_once():
    shape = (5, 7, 3)
    tiles = blocks(shape, (2, 4, 3))
    assert len(tiles) == 3 * 2 * 1
    assert tiles[0] == (slice(0, 2), slice(0, 4), slice(0, 3))
    assert tiles[-1] == (slice(4, 5), slice(4, 7), slice(0, 3))
    cover = np.zeros(shape, int)
    for t in tiles:
        cover[t] += 1
    assert (cover == 1).all()


def test_grow_window_and_inner_window():
    core = (slice(8, 16), slice(0, 8), slice(56, 64))
    grown = grow_window(core, 3, (64, 64, 64), align=(4, 1, 1))
    # z: 8 - 3 = 5 -> 4 (multiple of 4); y: clipped at 0; x: clipped at 64
    assert grown == (slice(4, 19), slice(0, 11), slice(53, 64))
    assert inner_window(core, grown) == (slice(4, 12), slice(0, 8), slice(3, 11))
    assert grow_window(core, (0, 1, 2), (64, 64, 64)) == (slice(8, 16), slice(0, 9), slice(54, 64))


def test_patch_alignment():
    # a 16-pixel patch of 4 nm raw spans 8 label voxels of 8 nm; of 3 nm raw, 6 voxels of 8 nm
    assert patch_alignment(16, (4, 4, 3), (8, 8, 8)) == [8, 8, 6]
    # not whole (16 * 5 / 8 = 10 ok; 16 * 5 / 12 = 6.67 no) or below one voxel
    assert patch_alignment(16, (5, 5, 0.25), (8, 12, 8)) == [10, 1, 1]


def test_slice_weights_area_average_and_nearest():
    # 4 nm raw into 8 nm output: two raw slices per output slice, half each
    pairs = dict(slice_weights(2.0, 4.0, 8, 4.0, 8.0, 4))
    assert pairs[0] == [(0, 0.5)] and pairs[1] == [(0, 0.5)] and pairs[7] == [(3, 0.5)]
    # 16 nm raw into 8 nm output: each output slice takes its nearest raw slice
    pairs = dict(slice_weights(8.0, 16.0, 2, 4.0, 8.0, 4))
    assert pairs == {0: [(0, 1.0), (1, 1.0)], 1: [(2, 1.0), (3, 1.0)]}


def test_check_ratio_names_the_volume_and_axis():
    check_ratio((4, 4, 4), (8, 8, 8), "v")
    with pytest.raises(ValueError, match=r"volume 'v7'.*axis x \(ratio 0\.0625\)"):
        check_ratio((8, 8, 1), (8, 8, 16), "v7")
