"""Tests for dinopipe.loader: stores opened once, labelled crops, seeded batches, consistent augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts
import zarr

from dinopipe import loader
from dinopipe.augment import apply_spatial, transform_group
from dinopipe.io import write_image
from dinopipe.loader import CropSampler, Prefetcher, open_volume, to_device
from dinopipe.targets import compute_affinities

OFFSETS = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, -2, 0], [0, 0, 2], [-2, 0, 0], [0, 2, 0], [0, 0, -2], [2, 0, 0]]


def write_volume(tmp_path, shape=(24, 24, 24), labelled_z=None, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(1, 6, size=(6, 6, 6)).repeat(4, 0).repeat(4, 1).repeat(4, 2).astype(np.uint64)
    labels[rng.uniform(size=shape) < 0.05] = 0
    mask = np.ones(shape, np.uint8)
    if labelled_z is not None:
        mask[:] = 0
        mask[labelled_z] = 1
    features = rng.normal(size=(5, *shape)).astype(np.float16)
    fpath, tpath = tmp_path / "features" / "v.zarr", tmp_path / "targets" / "v.zarr"
    write_image(fpath, features, (8, 8, 8), (0, 0, 0), channel_axis=True, chunks=(5, 8, 8, 8))
    root = zarr.open_group(str(tpath), mode="w", zarr_format=2)
    root.attrs["dinopipe"] = {"offsets": OFFSETS}
    for key, data, ch in (
        ("labels", labels, False), ("affinities", compute_affinities(labels, OFFSETS), True),
        ("lsds", rng.uniform(size=(10, *shape)).astype(np.float16), True),
        ("boundary_weights", rng.uniform(1, 3, size=shape).astype(np.float32), False),
        ("mask", mask, False), ("raw", rng.uniform(size=shape).astype(np.float32), False),
    ):
        write_image(tpath / key, data, (8, 8, 8), (0, 0, 0), channel_axis=ch)
    return str(fpath), str(tpath), labels, features


def test_stores_are_opened_once_not_per_crop(tmp_path, monkeypatch):
    fpath, tpath, *_ = write_volume(tmp_path)
    calls = []
    real = ts.open
    monkeypatch.setattr(loader.ts, "open", lambda *a, **k: calls.append(a) or real(*a, **k))
    volume = open_volume(fpath, tpath, raw=True)
    opened = len(calls)
    assert opened == 6  # features, mask, affinities, boundary_weights, lsds, raw
    sampler = CropSampler([volume], (8, 8, 8), 2, 0, 0.1, {"flip": True, "rot90": True, "transpose": True}, raw=True)
    for step in range(1, 6):
        sampler.batch(step)
    assert len(calls) == opened


def test_batches_depend_only_on_seed_and_step_and_keep_float16(tmp_path):
    fpath, tpath, *_ = write_volume(tmp_path)
    volume = open_volume(fpath, tpath)
    sampler = CropSampler([volume], (8, 8, 8), 3, 7, 0.1, {"flip": True, "rot90": True, "transpose": True})
    with Prefetcher(sampler.batch, 1, 6, workers=3, depth=4) as prefetcher:
        threaded = [prefetcher.get(step) for step in range(1, 7)]
    for step in (6, 2, 4):
        again = sampler.batch(step)
        assert all(np.array_equal(again[k], threaded[step - 1][k]) for k in again)
    batch = threaded[0]
    assert batch["features"].dtype == np.float16 and batch["features"].shape == (3, 5, 8, 8, 8)
    assert batch["affinities"].shape == (3, len(OFFSETS), 8, 8, 8) and batch["weights"].shape == (3, 8, 8, 8)
    assert not np.array_equal(sampler.batch(1)["features"], sampler.batch(2)["features"])
    on_device = to_device(batch, __import__("torch").device("cpu"))
    assert on_device["features"].dtype.is_floating_point and on_device["mask"].shape == (3, 1, 8, 8, 8)


def test_crops_are_drawn_where_the_mask_has_labels(tmp_path):
    fpath, tpath, *_ = write_volume(tmp_path, labelled_z=slice(16, 24))
    volume = open_volume(fpath, tpath)
    sampler = CropSampler([volume], (8, 8, 8), 1, 0, 0.9, None)
    for step in range(1, 20):
        assert sampler.batch(step)["mask"].mean() >= 0.9


@pytest.mark.parametrize("index", [0, 3, 11, 26, 47])
def test_loaded_augmented_affinities_equal_affinities_of_augmented_labels(tmp_path, index):
    fpath, tpath, labels, features = write_volume(tmp_path)
    volume = open_volume(fpath, tpath)
    sampler = CropSampler([volume], (8, 8, 8), 1, 0, 0.0, {"flip": True, "rot90": True, "transpose": True})
    matrix = transform_group({"flip": True, "rot90": True, "transpose": True}, (8, 8, 8), (8, 8, 8))[index]
    for start in [(0, 0, 0), (16, 16, 16), (5, 9, 13)]:
        crop = sampler.read_crop(volume, start, matrix=matrix)
        # the crop's labels with a margin, transformed; affinities of those, then the core
        m = sampler.margin
        padded = np.pad(labels, m)  # 0 = background outside the volume: affinity 0 there, as stored
        region = padded[tuple(slice(s, s + 8 + 2 * m) for s in start)]
        expected = compute_affinities(apply_spatial(region, matrix), OFFSETS)[(slice(None), *(slice(m, m + 8),) * 3)]
        np.testing.assert_array_equal(crop["affinities"], expected)
        sl = tuple(slice(s, s + 8) for s in start)
        np.testing.assert_array_equal(crop["features"], apply_spatial(features[(slice(None), *sl)], matrix))


def test_apply_spatial_torch_equals_apply_spatial_for_every_transform():
    from dinopipe.augment import apply_spatial_torch

    torch = pytest.importorskip("torch")
    array = np.random.default_rng(0).normal(size=(2, 3, 4, 4, 4)).astype(np.float32)
    group = transform_group({"flip": True, "rot90": True, "transpose": True}, (8, 8, 8), (4, 4, 4))
    assert len(group) == 48
    for matrix in group:
        np.testing.assert_array_equal(apply_spatial_torch(torch.from_numpy(array), matrix).numpy(),
                                      apply_spatial(array, matrix))


@pytest.mark.parametrize(("order", "shards"), [("C", None), ("F", None), ("F", (5, 16, 16, 16))])
def test_batch_features_transformed_on_device_equal_the_cpu_crop(tmp_path, order, shards):
    """Features read into the (reused) batch buffer and transformed by to_device equal the
    crop read and transformed on the CPU, for both chunk orders and a sharded (Zarr v3)
    store, over many augmentations."""
    torch = pytest.importorskip("torch")
    fpath, tpath, _, features = write_volume(tmp_path)
    if order == "F":
        import shutil

        shutil.rmtree(fpath)
        write_image(fpath, features, (8, 8, 8), (0, 0, 0), channel_axis=True, chunks=(5, 8, 8, 8), order="F",
                    shards=shards)
        assert (Path(fpath) / "zarr.json").is_file() == (shards is not None)
    volume = open_volume(fpath, tpath)
    assert loader.chunk_order(volume.arrays["features"]) == order
    augment = {"flip": True, "rot90": True, "transpose": True}
    sampler = CropSampler([volume], (8, 8, 8), 2, 3, 0.1, augment)
    seen = set()
    buffers = set()
    for step in range(1, 13):
        host = sampler.batch(step)
        buffers.add(id(host["features"]))
        assert host["features"].shape == (2, 5, 8, 8, 8) and host["features"].dtype == np.float16
        assert host["transforms"].shape == (2, 3, 3)
        batch = to_device(host, torch.device("cpu"))
        sampler.recycle(host)
        host["features"][...] = 0  # the device copy must not share the recycled buffer
        for i in range(2):
            expected = sampler.sample(np.random.default_rng([3, 0, step, i]))
            np.testing.assert_array_equal(batch["features"][i].numpy(), expected["features"].astype(np.float32))
            np.testing.assert_array_equal(batch["affinities"][i].numpy(), expected["affinities"].astype(np.float32))
            seen.add(host["transforms"][i].tobytes())
        assert batch["features"].is_contiguous()
    assert len(seen) > 10  # many different augmentations were checked
    assert len(buffers) == 1  # one buffer, reused for every batch


def test_buffer_pool_reuses_only_matching_layouts():
    pool = loader.BufferPool(keep=2)
    a = pool.take((1, 3, 4, 4, 4), "F")
    assert a.shape == (1, 3, 4, 4, 4) and a.strides[1] == 2  # channels fastest
    pool.give(a)
    assert pool.take((1, 3, 4, 4, 4), "C") is not a
    assert pool.take((1, 3, 4, 4, 4), "F") is a
    pool.give(a)
    pool.give(a)
    assert len(pool.free) == 1


def test_boundary_crops_are_centred_on_boundary_voxels(tmp_path):
    from dinopipe.targets import boundary_voxels

    fpath, tpath, labels, _ = write_volume(tmp_path, shape=(24, 24, 24))
    # one object filling the volume except a small cube of another label: one boundary region
    labels = np.ones((24, 24, 24), np.uint64)
    labels[16:20, 4:8, 10:14] = 2
    import shutil

    shutil.rmtree(f"{tpath}/labels")
    write_image(f"{tpath}/labels", labels, (8, 8, 8), (0, 0, 0), channel_axis=False)
    volume = open_volume(fpath, tpath, boundary=True)
    boundary = boundary_voxels(labels, None)
    assert volume.coarse_boundary.sum() == boundary.sum()  # counted in slabs and blocks, none lost
    crop = (8, 8, 8)
    rng = np.random.default_rng(0)
    for _ in range(30):
        start, _ = loader.sample_start(volume, crop, rng, 0.0, boundary=True)
        # the jitter is at most a quarter crop: every boundary-centred crop holds boundary voxels
        assert boundary[tuple(slice(s, s + n) for s, n in zip(start, crop))].any()
    # with sample_boundary 1 every training crop holds the boundary; without, most do not
    def hits(fraction: float) -> int:
        sampler = CropSampler([volume], crop, 1, 0, 0.0, None, boundary_fraction=fraction)
        return sum(boundary[tuple(slice(s, s + n) for s, n in zip(sampler.plan(
            np.random.default_rng([0, step]))[1], crop))].any() for step in range(40))
    assert hits(1.0) == 40 and hits(0.0) < 30


def test_boundary_crops_need_the_labels(tmp_path):
    fpath, tpath, *_ = write_volume(tmp_path)
    volume = open_volume(fpath, tpath)
    with pytest.raises(ValueError, match="boundary=True"):
        CropSampler([volume], (8, 8, 8), 1, 0, 0.0, None, boundary_fraction=0.5)
    import shutil

    shutil.rmtree(f"{tpath}/labels")
    with pytest.raises(FileNotFoundError, match="sample_boundary needs the labels"):
        open_volume(fpath, tpath, boundary=True)
