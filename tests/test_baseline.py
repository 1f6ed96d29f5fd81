"""Tests for dinopipe.baseline (seeded watershed on smoothed raw)."""

from __future__ import annotations

import numpy as np
import pytest

from dinopipe.baseline import tune_baseline, watershed_baseline


def two_cells(membrane: float = 0.0, inside: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """8x12x20 volume: two cells (x < 9 and x > 10) separated by a 2-voxel membrane wall at x = 9, 10."""
    raw = np.full((8, 12, 20), inside, dtype=np.float32)
    raw[:, :, 9:11] = membrane
    labels = np.ones(raw.shape, dtype=np.uint64)
    labels[:, :, 11:] = 2
    labels[:, :, 9:11] = 0
    return raw, labels


def test_two_cells_split_at_the_dark_membrane() -> None:
    raw, labels = two_cells()
    seg = watershed_baseline(raw, sigma=1.0, h=0.1)
    assert seg.dtype == np.uint64 and seg.shape == raw.shape
    assert set(np.unique(seg)) == {1, 2}
    # each cell interior is one segment, and the two differ
    assert len(np.unique(seg[:, :, :9])) == 1 and len(np.unique(seg[:, :, 11:])) == 1
    assert seg[0, 0, 0] != seg[0, 0, 19]


def test_bright_membrane_needs_membrane_bright() -> None:
    raw, _ = two_cells(membrane=1.0, inside=0.0)
    assert len(np.unique(watershed_baseline(raw, sigma=1.0, h=0.1, membrane="bright"))) == 2
    # read as dark membranes, the bright wall is the only cell
    assert len(np.unique(watershed_baseline(raw, sigma=1.0, h=0.1, membrane="dark"))) == 1


def test_h_above_the_contrast_merges_the_cells() -> None:
    raw, _ = two_cells(membrane=0.7, inside=0.8)  # contrast 0.1, halved by smoothing
    assert len(np.unique(watershed_baseline(raw, sigma=1.0, h=0.5))) == 1
    assert len(np.unique(watershed_baseline(raw, sigma=1.0, h=0.01))) == 2


def test_flat_image_is_one_segment_and_min_size_removes_small_segments() -> None:
    assert np.all(watershed_baseline(np.zeros((4, 5, 6)), sigma=1.0, h=0.1) == 1)
    raw = np.zeros((6, 6, 30), dtype=np.float32)
    raw[:, :, :3] = 1.0  # a small bright cell of 108 voxels
    raw[:, :, 6:] = 1.0  # a large one
    seg = watershed_baseline(raw, sigma=0.0, h=0.5, min_size=200)
    assert np.all(seg[:, :, 8:] == 1) and np.all(seg[:, :, :2] == 0)


@pytest.mark.parametrize("kwargs, key", [
    ({"sigma": -1.0}, "sigma"), ({"h": 0.0}, "h"), ({"membrane": "grey"}, "membrane"),
])
def test_bad_parameters_are_named(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        watershed_baseline(np.zeros((4, 4, 4)), **kwargs)


def test_bad_raw() -> None:
    with pytest.raises(ValueError, match="3D"):
        watershed_baseline(np.zeros((4, 4)))
    raw = np.zeros((4, 4, 4))
    raw[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        watershed_baseline(raw)


def test_tune_picks_the_parameters_that_separate_the_cells() -> None:
    raw, labels = two_cells(membrane=0.7, inside=0.8)
    best, rows = tune_baseline([(raw, labels)], grid={"sigma": [1.0], "h": [0.01, 0.5]})
    assert best == {"sigma": 1.0, "h": 0.01, "membrane": "dark"}
    assert [(r["sigma"], r["h"]) for r in rows] == [(1.0, 0.01), (1.0, 0.5)]
    # h = 0.5 merges both cells into one segment: VOI merge = H(truth | one segment) = 1 bit
    # (two equal cells), no split
    merged = rows[1]
    assert merged["voi_merge"] == pytest.approx(1.0) and merged["voi_split"] == pytest.approx(0.0)
    assert rows[0]["voi_sum"] == pytest.approx(0.0)


def test_tune_rejects_bad_input() -> None:
    raw, labels = two_cells()
    with pytest.raises(ValueError, match="at least one"):
        tune_baseline([])
    with pytest.raises(ValueError, match="grid"):
        tune_baseline([(raw, labels)], grid={"radius": [1]})
    with pytest.raises(ValueError, match="shape"):
        tune_baseline([(raw, labels[:-1])])
