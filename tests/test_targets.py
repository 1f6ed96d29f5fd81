"""Tests of dinopipe.targets: hand-computed toys and comparisons with lsd-lite on real labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dinopipe.targets import (
    AFFINITY_DTYPE,
    BOUNDARY_WEIGHT_DTYPE,
    LSD_CHANNELS,
    LSD_DTYPE,
    MASK_DTYPE,
    compute_affinities,
    compute_boundary_weights,
    compute_lsds,
    compute_mask,
    compute_semantic_targets,
    label_ids,
)

DATA = Path(__file__).parents[1] / ".." / "shared" / "data"
NINE_OFFSETS = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [-3, 0, 0], [0, -3, 0], [0, 0, -3],
                [9, 0, 0], [0, 9, 0], [0, 0, 9]]
BIG = 2**40  # ids above 2**32 would collide if cast to int32/float32


def _cremi_crop() -> np.ndarray:
    path = DATA / "cremi_labels" / "cremi.npz"
    if not path.exists():
        pytest.skip(f"../shared/data not present: {path}")
    labels = np.load(path)["labels"]
    assert labels.dtype == np.uint64
    return labels[:20, :100, :100]


def _gala_crop() -> np.ndarray:
    path = DATA / "gala" / "train-gt.lzf.h5"
    if not path.exists():
        pytest.skip(f"../shared/data not present: {path}")
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "r") as f:
        return f["stack"][:20, :100, :100]


def _voronoi(shape: tuple[int, int, int], n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, shape, size=(n, 3))
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    d2 = ((grid[..., None, :] - centres) ** 2).sum(-1)
    return (d2.argmin(-1) + 1 + BIG).astype(np.uint64)


# --------------------------------------------------------------------------------------------
# affinities
# --------------------------------------------------------------------------------------------


@pytest.fixture
def toy() -> np.ndarray:
    """4x4x4: label A for x < 2, label B for x >= 2, background at (0, 0, 0)."""
    labels = np.empty((4, 4, 4), dtype=np.uint64)
    labels[..., :2] = BIG + 1
    labels[..., 2:] = 2 * BIG + 1  # == BIG + 1 modulo 2**32
    labels[0, 0, 0] = 0
    return labels


def _pattern(axis: int, values: list[int]) -> np.ndarray:
    shape = [1, 1, 1]
    shape[axis] = 4
    return np.broadcast_to(np.array(values, dtype=np.uint8).reshape(shape), (4, 4, 4)).copy()


def test_affinities_toy_every_offset_sign(toy: np.ndarray) -> None:
    offsets = [[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1],
               [3, 0, 0], [0, -2, 0]]
    affs = compute_affinities(toy, offsets)
    assert affs.shape == (8, 4, 4, 4) and affs.dtype == AFFINITY_DTYPE

    expected = {
        # +z: neighbour inside for z < 3; labels constant along z
        0: _pattern(0, [1, 1, 1, 0]),
        1: _pattern(0, [0, 1, 1, 1]),
        2: _pattern(1, [1, 1, 1, 0]),
        3: _pattern(1, [0, 1, 1, 1]),
        # +x: x=0 -> x=1 same label; x=1 -> x=2 crosses A|B; x=2 -> 3 same; x=3 outside
        4: _pattern(2, [1, 0, 1, 0]),
        5: _pattern(2, [0, 1, 0, 1]),
        6: _pattern(0, [1, 0, 0, 0]),  # long range +3 z: only z=0 -> z=3
        7: _pattern(1, [0, 0, 1, 1]),  # -2 y: y=2 -> y=0, y=3 -> y=1
    }
    # the background voxel (0,0,0) has affinity 0 itself, and so do edges pointing to it
    for k in expected:
        expected[k][0, 0, 0] = 0
    expected[1][1, 0, 0] = 0  # -z from (1,0,0)
    expected[3][0, 1, 0] = 0  # -y from (0,1,0)
    expected[5][0, 0, 1] = 0  # -x from (0,0,1)
    expected[6][0, 0, 0] = 0
    expected[7][0, 2, 0] = 0  # -2y from (0,2,0)
    for k, exp in expected.items():
        np.testing.assert_array_equal(affs[k], exp, err_msg=f"offset {offsets[k]}")


def test_affinities_all_background_and_long_offsets() -> None:
    zeros = np.zeros((4, 4, 4), dtype=np.uint64)
    affs = compute_affinities(zeros, NINE_OFFSETS)
    assert affs.shape == (9, 4, 4, 4) and not affs.any()
    ones = np.ones((4, 4, 4), dtype=np.uint64)
    affs = compute_affinities(ones, [[4, 0, 0], [0, -9, 0], [0, 0, 3], [0, 0, 0]])
    assert not affs[:2].any()  # longer than the volume
    np.testing.assert_array_equal(affs[2], _pattern(2, [1, 0, 0, 0]))
    assert affs[3].all()  # zero offset: every non-background voxel with itself


def test_affinities_large_ids_not_merged(toy: np.ndarray) -> None:
    # BIG+1 and 2*BIG+1 agree in the low 32 bits: any narrowing cast would merge them
    affs = compute_affinities(toy, [[0, 0, 1]])
    assert not affs[0, :, :, 1].any()


def test_affinities_bad_input() -> None:
    with pytest.raises(TypeError, match="integer dtype"):
        compute_affinities(np.zeros((4, 4, 4), dtype=np.float32), [[1, 0, 0]])
    with pytest.raises(ValueError, match="3D"):
        compute_affinities(np.zeros((4, 4), dtype=np.uint64), [[1, 0]])
    with pytest.raises(ValueError, match=r"offsets\[1\]"):
        compute_affinities(np.zeros((4, 4, 4), dtype=np.uint64), [[1, 0, 0], [1, 0]])
    with pytest.raises(ValueError, match=r"offsets\[0\]"):
        compute_affinities(np.zeros((4, 4, 4), dtype=np.uint64), [[0.5, 0, 0]])
    with pytest.raises(ValueError, match="negative"):
        compute_affinities(-np.ones((4, 4, 4), dtype=np.int64), [[1, 0, 0]])


def test_affinities_match_lsd_lite_synthetic() -> None:
    lsd_lite = pytest.importorskip("lsd_lite")
    labels = _voronoi((12, 16, 20), 12, seed=3)
    labels[labels % 4 == 0] = 0
    ref = lsd_lite.get_affs(labels, NINE_OFFSETS, dist="equality-no-bg")
    np.testing.assert_array_equal(compute_affinities(labels, NINE_OFFSETS), ref.astype(np.uint8))


@pytest.mark.parametrize("crop", [_cremi_crop, _gala_crop], ids=["cremi", "gala"])
def test_affinities_match_lsd_lite_real(crop) -> None:
    lsd_lite = pytest.importorskip("lsd_lite")
    labels = crop()
    ref = lsd_lite.get_affs(labels, NINE_OFFSETS, dist="equality-no-bg")
    ours = compute_affinities(labels, NINE_OFFSETS)
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref.astype(np.uint8))


# --------------------------------------------------------------------------------------------
# LSDs
# --------------------------------------------------------------------------------------------


def _kernel_1d(sigma_vox: float) -> tuple[np.ndarray, np.ndarray]:
    """Offsets and weights of scipy's normalised Gaussian truncated at 3 sigma."""
    radius = int(3.0 * sigma_vox + 0.5)
    k = np.arange(-radius, radius + 1)
    w = np.exp(-0.5 * (k / sigma_vox) ** 2)
    return k, w / w.sum()


def test_lsds_single_cube() -> None:
    voxel = (2.0, 1.0, 1.0)
    sigma_nm = 3.0  # 1.5 voxels in z, 3 in y and x: radius 5 z-voxels, 9 y/x-voxels
    shape = (21, 27, 27)
    labels = np.zeros(shape, dtype=np.uint64)
    labels[5:16, 4:23, 4:23] = 3 * BIG  # cube of 11 x 19 x 19, centre (10, 13, 13)
    lsds = compute_lsds(labels, sigma_nm, voxel)
    assert lsds.shape == (len(LSD_CHANNELS),) + shape and lsds.dtype == np.float32
    inside = labels > 0
    assert not lsds[:, ~inside].any()  # background stays 0

    # centre: kernel support (z 10+-5, y/x 13+-9) lies inside the cube
    c = (10, 13, 13)
    np.testing.assert_allclose(lsds[:3][(slice(None),) + c], 0.5, atol=1e-6)
    np.testing.assert_allclose(lsds[9][c], 1.0, atol=1e-6)
    for d, (v, s_vox) in enumerate(zip(voxel, (1.5, 3.0, 3.0))):
        k, w = _kernel_1d(s_vox)
        variance = (w * (k * v) ** 2).sum() / sigma_nm**2  # truncated Gaussian's variance
        np.testing.assert_allclose(lsds[3 + d][c], variance, atol=1e-5)
    # a box is separable, so axes are uncorrelated: Pearson channels 0.5 on the whole label
    # (up to the float32 cancellation in E[xy] - E[x]E[y] that lsd-lite has too, ~2e-5 here)
    np.testing.assert_allclose(lsds[6:9, inside], 0.5, atol=1e-4)

    # size at the cube's corner voxel: product of 1-D kernel mass falling inside the cube
    corner = (5, 4, 4)
    size = 1.0
    for s_vox in (1.5, 3.0, 3.0):
        k, w = _kernel_1d(s_vox)
        size *= w[k >= 0].sum()
    np.testing.assert_allclose(lsds[9][corner], size, atol=1e-6)

    # mean offsets are antisymmetric about the centre along each axis
    for d in range(3):
        flipped = np.flip(lsds[d], axis=d)
        mirrored = np.flip(inside, axis=d) & inside
        np.testing.assert_allclose(lsds[d][mirrored] - 0.5, -(flipped[mirrored] - 0.5), atol=1e-5)
    # and point towards the centre: x-offset > 0.5 left of the centre, < 0.5 right of it
    assert lsds[2][10, 13, 5] > 0.5 > lsds[2][10, 13, 21]


def test_lsds_all_background_and_skips() -> None:
    zeros = np.zeros((6, 7, 8), dtype=np.uint64)
    lsds = compute_lsds(zeros, 2.0, (1, 1, 1))
    assert lsds.shape == (10, 6, 7, 8) and not lsds.any()
    labels = np.ones((6, 7, 8), dtype=np.uint64)
    labels[:, :, 4:] = 5
    assert not compute_lsds(labels, 2.0, (1, 1, 1), labels_to_skip=(1, 5)).any()
    only5 = compute_lsds(labels, 2.0, (1, 1, 1), label_ids=[5, 77])
    both = compute_lsds(labels, 2.0, (1, 1, 1))
    assert not only5[:, labels == 1].any()
    np.testing.assert_array_equal(only5[:, labels == 5], both[:, labels == 5])


def test_lsds_large_ids_preserved() -> None:
    small = np.ones((8, 9, 10), dtype=np.uint64)
    small[:, 4:, :] = 2
    small[:3, :, 7:] = 0
    big = np.where(small == 1, BIG + 1, np.where(small == 2, 2 * BIG + 1, 0)).astype(np.uint64)
    np.testing.assert_array_equal(
        compute_lsds(big, 3.0, (2, 1, 1)), compute_lsds(small, 3.0, (2, 1, 1))
    )


def test_lsds_threads_and_sigma_per_axis_consistent() -> None:
    labels = _voronoi((10, 12, 14), 8, seed=1)
    one = compute_lsds(labels, (4.0, 2.0, 2.0), (2, 1, 1), num_workers=1)
    two = compute_lsds(labels, [4, 2, 2], [2, 1, 1], num_workers=2)
    np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize("sigma", [(1.0, 2.0, 3.0), (0.5, 4.0, 4.0), (2.0, 0.0, 1.0)])
def test_gaussian_skipping_zero_lines_equals_scipy_bit_for_bit(sigma) -> None:
    from scipy.ndimage import gaussian_filter

    from dinopipe.targets import LSD_TRUNCATE, _gaussian_skipping_zero_lines

    rng = np.random.default_rng(0)
    a = np.zeros((20, 30, 40), np.float32)
    a[3:6, 10:12, :] = rng.uniform(0, 500, (3, 2, 40))  # a rod: most lines along every axis are zero
    a[15, 25, 5] = 7.0
    expected = gaussian_filter(a, sigma, mode="constant", cval=0.0, truncate=LSD_TRUNCATE)
    ours = _gaussian_skipping_zero_lines(a, sigma)
    assert ours.dtype == np.float32 and np.array_equal(ours, expected)
    dense = rng.uniform(0, 1, (8, 9, 10)).astype(np.float32)  # no zero line: the plain filter
    assert np.array_equal(_gaussian_skipping_zero_lines(dense, sigma),
                          gaussian_filter(dense, sigma, mode="constant", cval=0.0, truncate=LSD_TRUNCATE))
    zeros = np.zeros((4, 5, 6), np.float32)
    assert np.array_equal(_gaussian_skipping_zero_lines(zeros, sigma), zeros)


def test_lsds_bad_input() -> None:
    labels = np.ones((4, 4, 4), dtype=np.uint64)
    with pytest.raises(ValueError, match="sigma_nm"):
        compute_lsds(labels, 0.0, (1, 1, 1))
    with pytest.raises(ValueError, match="voxel_size_nm"):
        compute_lsds(labels, 1.0, (1, 1))
    with pytest.raises(ValueError, match="divisible"):
        compute_lsds(labels, 1.0, (1, 1, 1), downsample=3)
    with pytest.raises(ValueError, match="labels_to_skip"):
        compute_lsds(labels, 1.0, (1, 1, 1), labels_to_skip=(-1,))


def test_lsds_match_lsd_lite_synthetic() -> None:
    lsd_lite = pytest.importorskip("lsd_lite")
    labels = _voronoi((12, 16, 20), 10, seed=2)
    labels[labels == BIG + 3] = 0
    for sigma, voxel, df in [(6.0, (3, 1, 1), 1), ((8.0, 4.0, 4.0), (2, 1, 1), 2)]:
        ref = lsd_lite.get_lsds(labels, sigma, voxel, downsample=df)
        ours = compute_lsds(labels, sigma, voxel, downsample=df)
        assert np.abs(ours - ref).max() <= 1e-5


@pytest.mark.parametrize(
    "crop, voxel, sigma", [(_cremi_crop, (40, 4, 4), 80.0), (_gala_crop, (10, 10, 10), 50.0)],
    ids=["cremi", "gala"],
)
def test_lsds_match_lsd_lite_real(crop, voxel, sigma) -> None:
    """lsd-lite on 12 labels (it is slow); dinopipe on those and on all labels."""
    lsd_lite = pytest.importorskip("lsd_lite")
    labels = crop()
    ids = np.unique(labels)
    subset = np.random.default_rng(0).choice(ids[ids != 0], size=12, replace=False)
    ref = lsd_lite.get_lsds(labels, sigma, voxel, labels=subset)
    ours = compute_lsds(labels, sigma, voxel, label_ids=subset.tolist())
    assert np.abs(ours - ref).max() <= 1e-5
    full = compute_lsds(labels, sigma, voxel)
    in_subset = np.isin(labels, subset)
    assert np.abs(full[:, in_subset] - ref[:, in_subset]).max() <= 1e-5
    assert full[:, ~in_subset & (labels != 0)].any()


def test_lsds_downsampled_match_lsd_lite_gala() -> None:
    lsd_lite = pytest.importorskip("lsd_lite")
    labels = _gala_crop()
    ref = lsd_lite.get_lsds(labels, 50.0, (10, 10, 10), downsample=2)
    ours = compute_lsds(labels, 50.0, (10, 10, 10), downsample=2)
    assert np.abs(ours - ref).max() <= 1e-5


@pytest.mark.slow
def test_lsds_match_lsd_lite_cremi_all_labels() -> None:
    lsd_lite = pytest.importorskip("lsd_lite")
    labels = _cremi_crop()
    ref = lsd_lite.get_lsds(labels, 40.0, (40, 4, 4))
    assert np.abs(compute_lsds(labels, 40.0, (40, 4, 4)) - ref).max() <= 1e-5


# --------------------------------------------------------------------------------------------
# boundary weights
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_boundary_weights_two_labels_analytic(axis: int) -> None:
    voxel = (40.0, 8.0, 4.0)
    w_max, sigma = 10.0, 30.0
    shape = [6, 7, 9]
    shape[axis] = 12
    labels = np.full(shape, BIG + 1, dtype=np.uint64)
    index = [slice(None)] * 3
    index[axis] = slice(5, None)
    labels[tuple(index)] = 2 * BIG + 1  # boundary voxels at 4 and 5 along `axis`
    weights = compute_boundary_weights(labels, voxel, w_max, sigma)
    assert weights.dtype == BOUNDARY_WEIGHT_DTYPE and weights.shape == tuple(shape)

    i = np.arange(12)
    d = np.minimum(np.abs(i - 4), np.abs(i - 5)) * voxel[axis]
    line = 1 + (w_max - 1) * np.exp(-(d**2) / (2 * sigma**2))
    view = [1, 1, 1]
    view[axis] = 12
    expected = np.broadcast_to(line.reshape(view), shape)
    np.testing.assert_allclose(weights, expected, rtol=1e-6)


def test_boundary_weights_mask_and_no_boundary() -> None:
    labels = np.zeros((4, 5, 10), dtype=np.uint64)
    labels[..., 5:] = 1
    mask = np.ones(labels.shape, dtype=np.uint8)
    mask[..., 6:] = 0  # the 0|1 edge at x = 4|5 is inside the mask; x >= 6 unknown
    weights = compute_boundary_weights(labels, (1, 1, 1), 5.0, 2.0, mask=mask)
    assert not weights[..., 6:].any()
    d = np.array([4, 3, 2, 1, 0, 0])
    np.testing.assert_allclose(weights[0, 0, :6], 1 + 4 * np.exp(-(d**2) / 8), rtol=1e-6)

    # an edge whose other side is unknown is no boundary
    mask[..., 5] = 0
    weights = compute_boundary_weights(labels, (1, 1, 1), 5.0, 2.0, mask=mask)
    np.testing.assert_array_equal(weights, mask.astype(np.float32))
    uniform = compute_boundary_weights(np.ones((3, 3, 3), np.uint64), (1, 1, 1), 5.0, 2.0)
    np.testing.assert_array_equal(uniform, 1.0)


def test_boundary_weights_bad_input() -> None:
    labels = np.ones((3, 3, 3), dtype=np.uint64)
    with pytest.raises(ValueError, match="w_max"):
        compute_boundary_weights(labels, (1, 1, 1), 0.5, 2.0)
    with pytest.raises(ValueError, match="sigma_nm"):
        compute_boundary_weights(labels, (1, 1, 1), 5.0, 0.0)
    with pytest.raises(ValueError, match="mask has shape"):
        compute_boundary_weights(labels, (1, 1, 1), 5.0, 2.0, mask=np.ones((3, 3)))


# --------------------------------------------------------------------------------------------
# mask
# --------------------------------------------------------------------------------------------


def test_mask_unlabelled_ids_and_background_known() -> None:
    labels = np.array([0, 3, BIG + 7, 2 * BIG + 7, 3], dtype=np.uint64).reshape(1, 1, 5)
    np.testing.assert_array_equal(compute_mask(labels)[0, 0], [1, 1, 1, 1, 1])
    mask = compute_mask(labels, unlabelled_ids=[BIG + 7, 3])
    assert mask.dtype == MASK_DTYPE
    np.testing.assert_array_equal(mask[0, 0], [1, 0, 0, 1, 0])  # 2*BIG+7 is not BIG+7
    np.testing.assert_array_equal(compute_mask(labels, unlabelled_ids=[0])[0, 0], [0, 1, 1, 1, 1])


def test_mask_erosion_anisotropic() -> None:
    labels = np.ones((5, 6, 8), dtype=np.uint64)
    labels[..., :2] = 9  # unknown slab x < 2
    voxel = (40.0, 8.0, 4.0)
    mask = compute_mask(labels, unlabelled_ids=(9,), erosion_nm=8.0, voxel_size_nm=voxel)
    # distance to the slab along x: x=2 -> 4 nm, x=3 -> 8 nm (removed, d <= 8), x=4 -> 12 nm
    np.testing.assert_array_equal(mask, np.broadcast_to([0, 0, 0, 0, 1, 1, 1, 1], labels.shape))
    # the same slab along z is one voxel = 40 nm away: 8 nm erosion removes nothing more there
    labels_z = np.ones((5, 6, 8), dtype=np.uint64)
    labels_z[:2] = 9
    mask_z = compute_mask(labels_z, (9,), 40.0, voxel)
    np.testing.assert_array_equal(mask_z[:, 0, 0], [0, 0, 0, 1, 1])
    # volume border is not unknown; no unknown voxels -> nothing eroded
    assert compute_mask(np.ones((3, 3, 3), np.uint64), (), 100.0, (1, 1, 1)).all()


def test_mask_bad_input() -> None:
    labels = np.ones((3, 3, 3), dtype=np.uint64)
    with pytest.raises(ValueError, match="unlabelled_ids"):
        compute_mask(labels, unlabelled_ids=[2**64])  # does not fit uint64
    with pytest.raises(ValueError, match="unlabelled_ids"):
        compute_mask(labels.astype(np.int8), unlabelled_ids=[300])
    # -1 cannot occur in unsigned labels: ignored there (one config serves signed and unsigned volumes)
    assert compute_mask(labels, unlabelled_ids=[-1]).all()
    signed = np.ones((3, 3, 3), dtype=np.int32)
    signed[0] = -1
    signed[1, 0, 0] = -2
    with pytest.raises(ValueError, match=r"negative ids \(-2\).*unlabelled_ids"):
        compute_mask(signed, unlabelled_ids=[-1])
    with pytest.raises(ValueError, match="erosion_nm"):
        compute_mask(labels, erosion_nm=-1.0)


def test_signed_labels_with_unlabelled_minus_one() -> None:
    signed = np.array([[[-1, -1, 0, 5, 5, 7]]], dtype=np.int32)
    mask = compute_mask(signed, unlabelled_ids=[-1])
    np.testing.assert_array_equal(mask[0, 0], [0, 0, 1, 1, 1, 1])
    ids = label_ids(signed, [-1])
    assert ids.dtype == np.uint64
    np.testing.assert_array_equal(ids[0, 0], [0, 0, 0, 5, 5, 7])  # never 2**64 - 1
    # the unlabelled region is not an object: no affinity inside it
    affs = compute_affinities(ids, [[0, 0, 1]])
    np.testing.assert_array_equal(affs[0, 0, 0], [0, 0, 0, 1, 0, 0])
    # unlisted negative ids are refused, naming what was read
    with pytest.raises(ValueError, match=r"volume 'v': labels a.zarr contains negative ids \(-1\)"):
        label_ids(signed, [], "volume 'v': labels a.zarr")
    # unsigned and non-negative signed labels pass through unchanged
    np.testing.assert_array_equal(label_ids(np.abs(signed), [-1])[0, 0], [1, 1, 0, 5, 5, 7])
    big = np.array([[[BIG + 3]]], dtype=np.uint64)
    assert label_ids(big, [-1])[0, 0, 0] == BIG + 3


# --------------------------------------------------------------------------------------------
# semantic targets
# --------------------------------------------------------------------------------------------


def test_semantic_targets_class_map_and_weights() -> None:
    # 10 voxels: id 0 x4, 5 x3, BIG+3 x2, 9 x1
    flat = [0, 0, 0, 0, 5, 5, 5, BIG + 3, BIG + 3, 9]
    labels = np.array(flat, dtype=np.uint64).reshape(1, 2, 5)
    classes, weights = compute_semantic_targets(labels, {5: 1, BIG + 3: 2}, num_classes=4)
    assert classes.dtype == np.uint8 and weights.dtype == np.float32
    np.testing.assert_array_equal(classes.ravel(), [0, 0, 0, 0, 1, 1, 1, 2, 2, 0])
    # counts 5, 3, 2, 0; N = 10, K = 3: w_c = 10 / (3 n_c); absent class 3 -> 0
    np.testing.assert_allclose(weights, [10 / 15, 10 / 9, 10 / 6, 0], rtol=1e-6)
    counts = np.array([5, 3, 2, 0])
    np.testing.assert_allclose((counts * weights).sum() / 10, 1.0, rtol=1e-6)

    _, clipped = compute_semantic_targets(labels, {5: 1, BIG + 3: 2}, 4, max_weight=1.5)
    np.testing.assert_allclose(clipped, [10 / 15, 10 / 9, 1.5, 0], rtol=1e-6)

    mask = np.ones(labels.shape, dtype=bool)
    mask.ravel()[:3] = False  # counts 2, 3, 2 -> N = 7, K = 3
    _, masked = compute_semantic_targets(labels, {5: 1, BIG + 3: 2}, 3, mask=mask)
    np.testing.assert_allclose(masked, [7 / 6, 7 / 9, 7 / 6], rtol=1e-6)


def test_semantic_targets_identity_and_errors() -> None:
    labels = np.array([0, 1, 1, 2], dtype=np.uint64).reshape(1, 1, 4)
    classes, weights = compute_semantic_targets(labels, None, 3)
    np.testing.assert_array_equal(classes.ravel(), [0, 1, 1, 2])
    np.testing.assert_allclose(weights, [4 / 3, 2 / 3, 4 / 3], rtol=1e-6)
    with pytest.raises(ValueError, match="num_classes=2"):
        compute_semantic_targets(labels, None, 2)
    with pytest.raises(ValueError, match=r"class_map\[1\]"):
        compute_semantic_targets(labels, {1: 3}, 3)
    with pytest.raises(ValueError, match="num_classes"):
        compute_semantic_targets(labels, None, 300)


def test_storage_dtypes() -> None:
    assert AFFINITY_DTYPE == np.uint8 and LSD_DTYPE == np.float16
    assert BOUNDARY_WEIGHT_DTYPE == np.float32 and MASK_DTYPE == np.uint8
