"""Tests for dinopipe.demo."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from dinopipe.demo import make_demo_volume


@pytest.fixture(scope="module")
def default_volume() -> tuple[np.ndarray, np.ndarray]:
    return make_demo_volume(0)


def test_shapes_and_dtypes(default_volume: tuple[np.ndarray, np.ndarray]) -> None:
    raw, labels = default_volume
    assert raw.dtype == np.uint8 and raw.shape == (64, 96, 96)
    assert labels.dtype == np.uint64 and labels.shape == (32, 48, 48)
    assert raw.std() > 10  # not a flat image


def test_deterministic_and_seed_dependent(default_volume: tuple[np.ndarray, np.ndarray]) -> None:
    raw, labels = default_volume
    raw2, labels2 = make_demo_volume(0)
    assert np.array_equal(raw, raw2) and np.array_equal(labels, labels2)
    raw3, labels3 = make_demo_volume(1)
    assert not np.array_equal(labels, labels3)
    assert np.mean(raw != raw3) > 0.5


def test_membranes_dark_and_aligned(default_volume: tuple[np.ndarray, np.ndarray]) -> None:
    raw, labels = default_volume
    # Label voxel i covers raw voxels [2i, 2i + 2) per axis.
    up = labels.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    membrane = raw[up == 0].astype(float).mean()
    inside = raw[up > 0].astype(float).mean()
    assert inside - membrane > 30
    # Raw and labels are aligned: shifting the labels by one raw voxel (half a label
    # voxel) either way along any axis lowers the contrast, by about the same amount
    # (a sub-voxel offset between the grids would make the two sides differ).
    contrast = inside - membrane
    for axis in range(3):
        shifted = []
        for shift in (-1, 1):
            moved = np.roll(up, shift, axis=axis)
            shifted.append(raw[moved > 0].mean() - raw[moved == 0].mean())
        assert max(shifted) < contrast - 3.0
        assert abs(shifted[0] - shifted[1]) < 2.0


def test_labels_plausible(default_volume: tuple[np.ndarray, np.ndarray]) -> None:
    _, labels = default_volume
    ids, sizes = np.unique(labels[labels > 0], return_counts=True)
    assert np.array_equal(ids, np.arange(1, len(ids) + 1))
    # 32*48*48 voxels / (pi/6 * 12**3) ~ 81 whole cells; border pieces add more.
    assert 60 <= len(ids) <= 250
    assert 0.1 < np.mean(labels == 0) < 0.4  # thin membranes, dense cells
    assert np.median(sizes) > 100
    # Membranes are closed: no two cells touch along an axis; each cell is connected.
    for axis in range(3):
        a = np.moveaxis(labels, axis, 0)
        touching = (a[1:] != a[:-1]) & (a[1:] > 0) & (a[:-1] > 0)
        assert not touching.any()
    pieces, n = ndimage.label(labels > 0)
    assert n == len(ids)
    # Membranes are about one voxel thick: almost all membrane voxels border a cell.
    grown = ndimage.grey_dilation(labels, size=(3, 3, 3))
    assert np.mean(grown[labels == 0] > 0) > 0.95


def test_non_cubic_shapes() -> None:
    raw, labels = make_demo_volume(
        3, label_shape=(10, 20, 30), raw_factor=(1, 2, 3), mean_cell_diameter_vox=7.0
    )
    assert raw.shape == (10, 40, 90) and labels.shape == (10, 20, 30)
    up = labels.repeat(1, 0).repeat(2, 1).repeat(3, 2)
    assert raw[up > 0].mean() - raw[up == 0].mean() > 20
    assert labels.max() >= 10


def test_noise_free_option() -> None:
    raw_a, labels_a = make_demo_volume(2, label_shape=(8, 16, 16), noise_level=0.0, organelles_per_cell=0.0)
    raw_b, labels_b = make_demo_volume(2, label_shape=(8, 16, 16), noise_level=2.0, organelles_per_cell=0.0)
    assert np.array_equal(labels_a, labels_b)
    assert np.abs(raw_a.astype(float) - raw_b).mean() > 5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": 0, "label_shape": (32, 48)}, "label_shape"),
        ({"seed": 0, "label_shape": (2, 48, 48)}, "label_shape"),
        ({"seed": 0, "raw_factor": (2, 0, 2)}, "raw_factor"),
        ({"seed": 0, "raw_factor": (2.0, 2, 2)}, "raw_factor"),
        ({"seed": 0, "mean_cell_diameter_vox": 1.0}, "mean_cell_diameter_vox"),
        ({"seed": 0, "mean_cell_diameter_vox": float("nan")}, "mean_cell_diameter_vox"),
        ({"seed": 0, "membrane_width_vox": 10.0}, "membrane_width_vox"),
        ({"seed": 0, "noise_level": -1.0}, "noise_level"),
        ({"seed": 0, "organelles_per_cell": -0.5}, "organelles_per_cell"),
        ({"seed": 0, "blur_sigma_vox": -1.0}, "blur_sigma_vox"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_demo_volume(**kwargs)


def test_organelle_classes_leave_raw_and_labels_unchanged_and_match_the_raw():
    raw, labels = make_demo_volume(3, label_shape=(16, 32, 32), organelles_per_cell=3.0, mean_cell_diameter_vox=16.0)
    raw2, labels2, organelles = make_demo_volume(3, label_shape=(16, 32, 32), organelles_per_cell=3.0,
                                                 mean_cell_diameter_vox=16.0, organelle_classes=True)
    np.testing.assert_array_equal(raw, raw2)
    np.testing.assert_array_equal(labels, labels2)
    assert organelles.dtype == np.uint8 and organelles.shape == labels.shape
    assert {1, 2} <= set(np.unique(organelles).tolist()) <= {0, 1, 2}
    # organelles lie inside cells, dark ones darker than bright ones in the raw (label grid: 2x2x2 means)
    assert (labels[organelles > 0] > 0).mean() > 0.95
    coarse = raw.reshape(16, 2, 32, 2, 32, 2).mean(axis=(1, 3, 5))
    assert coarse[organelles == 1].mean() + 40 < coarse[organelles == 2].mean()
