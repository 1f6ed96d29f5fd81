"""Augmentation/target consistency: augmenting targets equals computing targets of augmented labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinopipe.augment import (
    apply_spatial,
    check_offsets_closed,
    exchangeable_axes,
    feature_noise,
    resolve_augment_params,
    transform_affinities,
    transform_group,
    transform_lsds,
)
from dinopipe.targets import compute_affinities, compute_lsds

ALL = {"flip": True, "rot90": True, "transpose": True}
# every sign, axis-aligned and diagonal, short and long range
OFFSETS = [
    [1, 0, 0], [0, 1, 0], [0, 0, 1], [-1, 0, 0], [0, -1, 0], [0, 0, -1],
    [-3, 0, 0], [0, 3, 0], [0, 0, -3], [0, 0, 3], [3, 0, 0], [0, -3, 0],
    [0, 1, 1], [0, -1, 1], [1, 1, 0], [-1, 1, 0], [1, 0, 1], [1, 0, -1],
]


def voronoi(shape, n, seed, background=True):
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*(np.arange(s) for s in shape), indexing="ij"), -1).reshape(-1, 3)
    centres = rng.uniform(0, shape, size=(n, 3))
    labels = np.argmin(((grid[:, None] - centres[None]) ** 2).sum(-1), 1).reshape(shape).astype(np.uint64) + 1
    if background:
        labels[rng.uniform(size=shape) < 0.1] = 0
    return labels


def test_group_sizes_follow_voxel_size_and_crop():
    assert len(transform_group(ALL, (8, 8, 8), (16, 16, 16))) == 48  # the full cube group
    assert len(transform_group(ALL, (40, 8, 8), (16, 16, 16))) == 16  # z fixed up to a flip
    assert len(transform_group(ALL, (8, 8, 8), (8, 16, 16))) == 16  # z crop differs
    assert len(transform_group({"flip": True}, (8, 8, 8), (16, 16, 16))) == 8
    assert len(transform_group({"rot90": True}, (8, 8, 8), (16, 16, 16))) == 24  # proper rotations only
    assert len(transform_group({}, (8, 8, 8), (16, 16, 16))) == 1
    assert exchangeable_axes((40, 8, 8.0), (8, 16, 16)) == [[0], [1, 2]]
    assert all(round(abs(np.linalg.det(m))) == 1 for m in transform_group(ALL, (8, 8, 8), (16, 16, 16)))


@pytest.mark.parametrize("index", range(48))
def test_augmented_affinities_equal_affinities_of_augmented_labels(index):
    """For every element of the cube group and every offset sign: on a crop with a margin."""
    shape, margin = (20, 20, 20), 3
    labels = voronoi(shape, 30, seed=index)
    matrix = transform_group(ALL, (8, 8, 8), (14, 14, 14))[index]
    affs = compute_affinities(labels, OFFSETS)
    # a crop (start 3, size 14) read with its margin; the volume's edges are inside the crop + margin
    start, size = 3, 14
    full_padded = np.pad(affs, [(0, 0)] + [(margin, margin)] * 3)  # 0 outside the volume
    padded = full_padded[(slice(None), *(slice(start, start + size + 2 * margin),) * 3)]
    crop = (slice(start, start + size),) * 3
    # expected: the affinities of the whole transformed volume, cropped where the crop went
    whole = apply_spatial(labels, matrix)
    expected_full = compute_affinities(whole, OFFSETS)
    # the crop [3, 17) maps to [3, 17) under any flip/permutation of a 20^3 volume (symmetric placement)
    expected = expected_full[(slice(None), *crop)]
    got = transform_affinities(padded, OFFSETS, matrix, margin)
    np.testing.assert_array_equal(got, expected)
    # and on the whole volume with a zero margin outside it
    np.testing.assert_array_equal(transform_affinities(full_padded, OFFSETS, matrix, margin), expected_full)


@pytest.mark.parametrize("index", [1, 5, 17, 30, 47])
def test_augmented_lsds_equal_lsds_of_augmented_labels(index):
    labels = voronoi((12, 12, 12), 8, seed=index)
    matrix = transform_group(ALL, (8, 8, 8), (12, 12, 12))[index]
    lsds = compute_lsds(labels, 16.0, (8, 8, 8), num_workers=1)
    expected = compute_lsds(apply_spatial(labels, matrix), 16.0, (8, 8, 8), num_workers=1)
    # float32 cancellation in the variances (as lsd-lite) differs by ~3e-5; float16 storage resolves 5e-4
    np.testing.assert_allclose(transform_lsds(lsds, matrix), expected, atol=1e-4)
    assert np.all(transform_lsds(lsds, matrix)[:, apply_spatial(labels, matrix) == 0] == 0)


def test_spatial_transform_is_the_same_for_every_array():
    rng = np.random.default_rng(0)
    matrix = transform_group(ALL, (8, 8, 8), (4, 4, 4))[13]
    one = rng.normal(size=(4, 4, 4))
    many = np.stack([one, 2 * one])
    out = apply_spatial(many, matrix)
    np.testing.assert_array_equal(out[0], apply_spatial(one, matrix))
    np.testing.assert_array_equal(out[1], 2 * apply_spatial(one, matrix))


def test_offsets_must_be_closed_under_the_augmentations():
    group = transform_group(ALL, (8, 8, 8), (8, 8, 8))
    check_offsets_closed([[1, 0, 0], [0, 1, 0], [0, 0, 1]], group)
    with pytest.raises(ValueError, match=r"affinity offset \[0, 3, 0\] becomes"):
        check_offsets_closed([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 3, 0]], group)
    # anisotropic: y and x exchange only
    check_offsets_closed([[1, 0, 0], [0, 3, 0], [0, 0, 3]], transform_group(ALL, (40, 8, 8), (8, 8, 8)))


def test_params_are_checked():
    assert resolve_augment_params(None)["flip"] is True
    with pytest.raises(ValueError, match=r"unknown train.augment parameters \['mirror'\]"):
        resolve_augment_params({"mirror": True})
    with pytest.raises(ValueError, match="channel_dropout"):
        resolve_augment_params({"channel_dropout": 1.0})
    with pytest.raises(ValueError, match="feature_noise"):
        resolve_augment_params({"feature_noise": -1})


def test_feature_noise_and_channel_dropout_are_seeded():
    x = torch.ones(2, 50, 2, 2, 2)
    a = feature_noise(x, 0.1, 0.5, torch.Generator().manual_seed(3))
    b = feature_noise(x, 0.1, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    dropped = (a == 0).all(dim=(2, 3, 4))
    assert 0.2 < dropped.float().mean() < 0.8
    kept = a[~dropped]
    assert 0.05 < float((kept - 1).std()) < 0.2
    assert torch.equal(feature_noise(x, 0.0, 0.0, torch.Generator()), x)


def test_raw_intensity_is_seeded_per_crop_and_off_by_default():
    from dinopipe.augment import raw_intensity

    raw = torch.rand(8, 1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    off = resolve_augment_params(None)
    assert torch.equal(raw_intensity(raw, off, torch.Generator()), raw)
    params = resolve_augment_params({"raw_gamma": 0.5, "raw_contrast": 0.3, "raw_brightness": 0.1})
    a = raw_intensity(raw, params, torch.Generator().manual_seed(1))
    assert torch.equal(a, raw_intensity(raw, params, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, raw_intensity(raw, params, torch.Generator().manual_seed(2)))
    # no noise: each crop is a monotone map of its raw (voxel order kept), and crops differ
    for i in range(8):
        order = torch.argsort(raw[i].flatten())
        assert bool((a[i].flatten()[order].diff() >= -1e-6).all())
    assert len({round(float(a[i].std() / raw[i].std()), 3) for i in range(8)}) > 4


def test_raw_intensity_ranges():
    from dinopipe.augment import raw_intensity

    raw = torch.full((200, 1, 2, 2, 2), 0.25)
    raw[:, :, 0] = 0.75  # crop mean 0.5, deviation 0.25
    gen = torch.Generator().manual_seed(0)
    contrast = raw_intensity(raw, resolve_augment_params({"raw_contrast": 0.2}), gen)
    factor = (contrast[:, 0, 0, 0, 0] - 0.5) / 0.25
    assert 0.8 <= float(factor.min()) < 0.85 and 1.15 < float(factor.max()) <= 1.2
    shift = raw_intensity(raw, resolve_augment_params({"raw_brightness": 0.1}), gen) - raw
    assert float(shift.abs().max()) <= 0.1 + 1e-6 and float(shift.abs().max()) > 0.09
    gamma = raw_intensity(raw, resolve_augment_params({"raw_gamma": 0.5}), gen)
    exponent = torch.log(gamma[:, 0, 1, 0, 0]) / np.log(0.25)  # 0.25 ** g
    assert 1 / 1.5 - 1e-4 <= float(exponent.min()) < 0.75 and 1.4 < float(exponent.max()) <= 1.5 + 1e-4
    noise = raw_intensity(raw, resolve_augment_params({"raw_noise": 0.05}), gen) - raw
    assert 0.045 < float(noise.std()) < 0.055
    with pytest.raises(ValueError, match="raw_gamma"):
        resolve_augment_params({"raw_gamma": -0.1})
    with pytest.raises(ValueError, match="raw_noise"):
        resolve_augment_params({"raw_noise": True})
