"""Scale choice, output grid, ROI and resampling of raw onto the label grid."""

from __future__ import annotations

import numpy as np
import pytest

from dinopipe import io
from dinopipe.io import Geometry
from dinopipe.sheet import Volume
from dinopipe.sources import choose_scale, open_sources, resample_to_grid

from input_fixtures import write_n5, write_ngff_v05


def test_choose_scale():
    levels = [("s0", (10.0, 10.0, 10.0)), ("s1", (20.0, 20.0, 20.0)), ("s2", (40.0, 40.0, 40.0))]
    assert choose_scale("p", levels, what="raw") == "s0"
    assert choose_scale("p", levels, min_voxel_size=(15, 15, 15), what="raw") == "s1"
    assert choose_scale("p", levels, exact=(40, 40, 40), what="labels") == "s2"
    with pytest.raises(ValueError, match="no scale with voxel size"):
        choose_scale("p", levels, exact=(30, 30, 30), what="labels")
    with pytest.raises(ValueError, match="finer than min_raw_voxel_size"):
        choose_scale("p", levels, min_voxel_size=(50, 50, 50), what="raw")


def test_gala_multiresolution_grid(shared_data):
    gala = shared_data / "gala" / "train.zarr"
    vol = Volume("gala", str(gala / "raw"), str(gala / "labels" / "neurons"), "train")
    src = open_sources(vol, label_voxel_size=(20, 20, 20))
    assert src.raw.scale == "s0" and src.labels.scale == "s1"
    assert src.grid.voxel_size == (20.0, 20.0, 20.0)
    # labels s1 take every second voxel (translation 0): a 20 nm voxel centred at 0 spans
    # -10..10 nm, beyond the raw (which starts at -5 nm), so the first label voxel is dropped
    assert src.grid.translation == (20.0, 20.0, 20.0)
    assert src.grid.shape == (24, 49, 99)
    assert np.all(src.grid.begin_nm >= src.raw.geometry.begin_nm)
    roi = Volume("gala", vol.raw, vol.labels, "train", roi=((0, 200), (0, 400), (100, 500)))
    src = open_sources(roi, label_voxel_size=(20, 20, 20))
    # centres 0..180 (z), 0..380 (y), 100..480 (x) lie in the ROI; the ones at 0 nm stick out of the raw
    assert src.grid.shape == (9, 19, 20)
    assert src.grid.translation == (20.0, 20.0, 100.0)
    with pytest.raises(ValueError, match="finer than min_raw_voxel_size"):
        open_sources(vol, min_raw_voxel_size=(40, 40, 40))


def test_missing_and_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="volume 'v': raw not found"):
        open_sources(Volume("v", str(tmp_path / "none.zarr/raw"), None, "predict"))
    io.write_image(tmp_path / "r.zarr", np.zeros((4, 4, 4), np.uint8), (8, 8, 8), (4, 4, 4))
    io.write_image(tmp_path / "l.zarr", np.zeros((4, 4, 4), np.float32), (8, 8, 8), (4, 4, 4))
    with pytest.raises(ValueError, match="labels .* must be integer"):
        open_sources(Volume("v", str(tmp_path / "r.zarr"), str(tmp_path / "l.zarr"), "train"))
    far = Volume("v", str(tmp_path / "r.zarr"), None, "predict", roi=((100, 200), (0, 8), (0, 8)))
    with pytest.raises(ValueError, match="roi 100:200,0:8,0:8 nm lies outside the data"):
        open_sources(far)


def test_resample_area_average():
    src = Geometry((4, 2, 2), (8.0, 8.0, 8.0), (4.0, 4.0, 4.0))
    dst = Geometry((2, 1, 1), (16.0, 16.0, 16.0), (8.0, 8.0, 8.0))
    data = np.arange(16, dtype=np.float32).reshape(4, 2, 2)
    out = resample_to_grid(data, src, dst)
    np.testing.assert_allclose(out[:, 0, 0], [data[:2].mean(), data[2:].mean()])


def test_gala_hdf5_matches_the_zarr_copy(shared_data):
    gala = shared_data / "gala"
    # the Zarr copy puts voxel 0's centre at 0 nm, so its corner (the sheet's offset) is at -5 nm
    h5 = Volume("h", f"{gala}/train-image.h5:/stack", f"{gala}/train-gt.lzf.h5:stack", "train",
                voxel_size=(10, 10, 10), offset=(-5, -5, -5))
    src = open_sources(h5)
    zarr_src = open_sources(Volume("z", str(gala / "train.zarr/raw"), str(gala / "train.zarr/labels/neurons"), "train"))
    assert src.raw.format == "hdf5" and src.raw.scale is None
    assert src.grid == zarr_src.grid == Geometry((50, 100, 200), (10.0, 10.0, 10.0), (0.0, 0.0, 0.0))
    np.testing.assert_array_equal(src.raw.array[[7, 3, 3], 10:20, 5:9], zarr_src.raw.array[[7, 3, 3], 10:20, 5:9])
    np.testing.assert_array_equal(np.asarray(src.labels.array[::7, ::9, ::11]),
                                  np.asarray(zarr_src.labels.array[::7, ::9, ::11]))
    # labels at the raw's grid (columns default to the raw's), offset moves both
    moved = Volume("h", h5.raw, h5.labels, "train", voxel_size=(10, 10, 10), offset=(100, 0, -50))
    assert open_sources(moved).grid.translation == (105.0, 5.0, -45.0)
    with pytest.raises(ValueError, match=r"volume 'h': raw .*train-image.h5:/stack is a plain hdf5 array.*'voxel_size'"):
        open_sources(Volume("h", h5.raw, None, "predict"))
    with pytest.raises(ValueError, match=r"volume 'h': raw: .*no dataset '/nope'.*datasets there: \['/stack'\]"):
        open_sources(Volume("h", f"{gala}/train-image.h5:/nope", None, "predict", voxel_size=(10, 10, 10)))


def test_gala_ngff_with_sheet_voxel_size_is_rejected(shared_data):
    gala = shared_data / "gala" / "train.zarr"
    vol = Volume("g", str(gala / "raw"), None, "predict", voxel_size=(10, 10, 10))
    with pytest.raises(ValueError, match="volume 'g': raw .* is an OME-NGFF multiscale group.*'voxel_size'"):
        open_sources(vol)


def test_ngff_05_zarr_v3_with_scale_and_translation(tmp_path):
    raw = np.arange(8 * 16 * 16, dtype=np.uint16).reshape(8, 16, 16)
    # raw at 4 nm (s0) and 8 nm (s1), corner at 100 nm in z
    write_ngff_v05(tmp_path / "v.zarr" / "raw", [raw, raw[::2, ::2, ::2]], [(4, 4, 4), (8, 8, 8)],
                   [(102, 2, 2), (104, 4, 4)])
    labels = np.zeros((2, 4, 4), np.uint32)
    labels[:, 1:, 1:] = 3
    # a crop: labels at 16 nm covering z 100..132, y/x 16..80 nm
    write_ngff_v05(tmp_path / "v.zarr" / "labels", [labels], [(16, 16, 16)], [(108, 24, 24)])
    vol = Volume("v", str(tmp_path / "v.zarr/raw"), str(tmp_path / "v.zarr/labels"), "train")
    src = open_sources(vol, min_raw_voxel_size=(8, 8, 8))
    assert src.raw.format == "ome-ngff 0.5" and src.raw.scale == "s1"
    assert src.raw.geometry == Geometry((4, 8, 8), (8.0, 8.0, 8.0), (104.0, 4.0, 4.0))
    # the labels crop sets the processed region: its voxels lying wholly inside the raw (0..64 nm in y, x)
    assert src.grid == Geometry((2, 3, 3), (16.0, 16.0, 16.0), (108.0, 24.0, 24.0))
    np.testing.assert_array_equal(src.raw.array[[1, 0], 2:3, 0:2], raw[::2, ::2, ::2][[1, 0], 2:3, 0:2])
    narrowed = Volume("v", vol.raw, vol.labels, "train", roi=((0, 1000), (30, 1000), (0, 1000)))
    assert open_sources(narrowed).grid.shape == (2, 2, 3)


def test_n5_and_plain_zarr_arrays(tmp_path):
    raw = np.random.default_rng(0).integers(0, 255, (6, 10, 12), dtype=np.uint8)
    write_n5(tmp_path / "v.n5", "raw", raw)
    labels = np.ones((3, 5, 6), np.uint64)
    io.write_image(tmp_path / "l.zarr", labels, (20, 20, 20), (10, 10, 10))
    vol = Volume("n", str(tmp_path / "v.n5/raw"), str(tmp_path / "l.zarr/s0"), "train",
                 voxel_size=(10, 10, 10), labels_voxel_size=(20, 20, 20))
    src = open_sources(vol)
    assert src.raw.format == "n5" and src.labels.format == "zarr"
    assert src.raw.array.shape == (6, 10, 12)
    np.testing.assert_array_equal(np.asarray(src.raw.array), raw)
    np.testing.assert_array_equal(src.raw.array[[5, 1], 2:4, 3], raw[[5, 1], 2:4, 3])
    assert src.grid == Geometry((3, 5, 6), (20.0, 20.0, 20.0), (10.0, 10.0, 10.0))
    with pytest.raises(ValueError, match="volume 'n': labels .* plain zarr array.*'labels_voxel_size'"):
        open_sources(Volume("n", str(tmp_path / "l.zarr"), str(tmp_path / "l.zarr/s0"), "train"))


def test_float_raw_with_nan_is_an_error(tmp_path):
    raw = np.ones((4, 4, 4), np.float32)
    raw[2, 1, 3] = np.nan
    io.write_image(tmp_path / "r.zarr", raw, (8, 8, 8), (4, 4, 4))
    with pytest.raises(ValueError, match=r"volume 'f': raw .*r.zarr holds 1\+ NaN .*first at voxel \[2, 1, 3\]"):
        open_sources(Volume("f", str(tmp_path / "r.zarr"), None, "predict"))


def test_raw_and_labels_not_overlapping(tmp_path):
    io.write_image(tmp_path / "r.zarr", np.ones((4, 4, 4), np.uint8), (8, 8, 8), (4, 4, 4))
    io.write_image(tmp_path / "l.zarr", np.ones((4, 4, 4), np.uint8), (8, 8, 8), (1004, 4, 4))
    with pytest.raises(ValueError, match=r"volume 'o': raw and labels do not overlap: raw .* covers \[0:32"):
        open_sources(Volume("o", str(tmp_path / "r.zarr"), str(tmp_path / "l.zarr"), "train"))


# --- chunks that are not stored ----------------------------------------------------------


def _raw_data(shape=(8, 8, 8)) -> np.ndarray:
    return np.random.default_rng(0).integers(1, 255, shape).astype(np.uint8)


def test_count_chunks_in_every_format(tmp_path):
    """Chunk files are counted against the chunk grid from the listing alone; a deleted chunk
    is found and named in the key form its format stores."""
    import h5py
    import zarr

    data = _raw_data()
    # Zarr v2, nested keys (as dinopipe writes): 2x2x2 chunks of 4^3
    io.write_image(tmp_path / "v2.zarr", data, (8, 8, 8), (4, 4, 4), chunks=(4, 4, 4))
    assert io.count_chunks(str(tmp_path / "v2.zarr"), "s0") == io.ChunkCount(8, 8, (), 0)
    (tmp_path / "v2.zarr" / "s0" / "0" / "1" / "0").unlink()
    count = io.count_chunks(str(tmp_path / "v2.zarr"), "s0")
    assert (count.expected, count.present, count.missing) == (8, 7, ("0/1/0",))
    # Zarr v2, dotted keys; a partial edge chunk counts as one chunk (grid 2 x 1 x 3)
    flat = zarr.open_array(str(tmp_path / "dot.zarr"), mode="w", zarr_format=2, shape=(8, 4, 9), chunks=(4, 4, 4),
                           dtype="u1")
    flat[...] = 1
    (tmp_path / "dot.zarr" / "1.0.2").unlink()
    assert io.count_chunks(str(tmp_path / "dot.zarr")) == io.ChunkCount(6, 5, ("1.0.2",), 0)
    # OME-NGFF 0.5 / Zarr v3 (default keys c/z/y/x; the fixture writes 4^3 chunks)
    write_ngff_v05(tmp_path / "v3.zarr", [data], [(8, 8, 8)], [(4, 4, 4)])
    (tmp_path / "v3.zarr" / "s0" / "c" / "1" / "1" / "1").unlink()
    assert io.count_chunks(str(tmp_path / "v3.zarr"), "s0").missing == ("c/1/1/1",)
    # N5: keys in x/y/z order, blocks of 4^3
    write_n5(tmp_path / "a.n5", "raw", data)
    (tmp_path / "a.n5" / "raw" / "1" / "0" / "0").unlink()  # x block 1, y 0, z 0
    count = io.count_chunks(str(tmp_path / "a.n5" / "raw"))
    assert (count.expected, count.present, count.missing) == (8, 7, ("1/0/0",))
    # HDF5: chunks never written are not allocated
    with h5py.File(tmp_path / "a.h5", "w") as f:
        ds = f.create_dataset("raw", shape=(8, 8, 8), chunks=(4, 4, 4), dtype="u1")
        ds[:4] = 1  # the 4 chunks of the first z half only
        f["full"] = data
        f.create_dataset("unwritten", shape=(8, 8, 8), dtype="u1")
    count = io.count_chunks(f"{tmp_path / 'a.h5'}:/raw")
    assert (count.expected, count.present, count.missing[0]) == (8, 4, "[1, 0, 0]")
    assert io.count_chunks(f"{tmp_path / 'a.h5'}:/full").complete
    assert not io.count_chunks(f"{tmp_path / 'a.h5'}:/unwritten").complete


def test_count_chunks_reads_shard_indexes(tmp_path):
    """Sharded Zarr v3 (OME-NGFF 0.5): an inner chunk a shard's index marks empty, a whole
    missing shard, and edge shards whose inner grid runs past the array are told apart."""
    import zarr

    # shape 12 x 16 x 16, shards 8^3 of inner chunks 4^3: shard grid 2 x 2 x 2, inner grid
    # 3 x 4 x 4 = 48 (the z-edge shards hold 1 of their 2 inner z chunks inside the array)
    data = np.random.default_rng(0).integers(1, 255, (12, 16, 16)).astype(np.uint8)
    a = zarr.create_array(str(tmp_path / "s.zarr"), shape=data.shape, chunks=(4, 4, 4), shards=(8, 8, 8),
                          dtype="u1", fill_value=0)
    a[...] = data
    assert io.count_chunks(str(tmp_path / "s.zarr")) == io.ChunkCount(48, 48, (), 0)
    # an inner chunk equal to the fill value is left out of its shard by the writer
    a[4:8, 0:4, 4:8] = 0  # shard (0, 0, 0), inner chunk (1, 0, 1)
    count = io.count_chunks(str(tmp_path / "s.zarr"))
    assert (count.expected, count.present) == (48, 47)
    assert count.missing == ("c/0/0/0 inner chunk [1, 0, 1]",)
    # a deleted shard file misses all of its inner chunks inside the array (edge shard: 1 x 2 x 2)
    (tmp_path / "s.zarr" / "c" / "1" / "1" / "0").unlink()
    count = io.count_chunks(str(tmp_path / "s.zarr"))
    assert (count.expected, count.present) == (48, 43)
    assert count.missing == ("c/0/0/0 inner chunk [1, 0, 1]", "c/1/1/0")
    # a shard cut short (an interrupted copy) is named rather than misread
    shard = tmp_path / "s.zarr" / "c" / "0" / "1" / "1"
    shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(ValueError, match="too short for its index"):
        io.count_chunks(str(tmp_path / "s.zarr"))


def test_dinopipe_stores_all_chunks_even_empty_ones(tmp_path):
    io.write_image(tmp_path / "z.zarr", np.zeros((8, 8, 8), np.uint64), (8, 8, 8), (4, 4, 4), chunks=(4, 4, 4))
    assert io.count_chunks(str(tmp_path / "z.zarr"), "s0").complete


def test_missing_chunks_are_an_error_unless_declared(tmp_path, caplog):
    io.write_image(tmp_path / "r.zarr", _raw_data(), (8, 8, 8), (4, 4, 4), chunks=(4, 4, 4))
    labels = np.ones((4, 4, 4), np.uint32)
    io.write_image(tmp_path / "l.zarr", labels, (16, 16, 16), (8, 8, 8), chunks=(2, 2, 2))
    vol = Volume("v", str(tmp_path / "r.zarr"), str(tmp_path / "l.zarr"), "train")
    open_sources(vol)  # complete
    (tmp_path / "l.zarr" / "s0" / "1" / "1" / "1").unlink()
    with pytest.raises(ValueError, match=r"volume 'v': labels .*l.zarr/s0: 1 of 8 chunks are not stored \(first "
                                         r"missing: 1/1/1\); they would read as the fill value 0.*"
                                         r"data.missing_chunks: fill_labels"):
        open_sources(vol)
    assert open_sources(vol, missing_chunks="fill_labels").labels is not None
    assert "1 of 8 chunks are not stored" in caplog.text
    (tmp_path / "r.zarr" / "s0" / "0" / "0" / "1").unlink()
    with pytest.raises(ValueError, match=r"volume 'v': raw .*r.zarr/s0: 1 of 8 chunks .*missing_chunks: fill$"):
        open_sources(vol, missing_chunks="fill_labels")
    open_sources(vol, missing_chunks="fill")
    with pytest.raises(ValueError, match=r"data.missing_chunks must be one of \['error', 'fill_labels', 'fill'\]"):
        open_sources(vol, missing_chunks="zeros")


def test_plain_labels_of_another_shape_need_their_voxel_size(tmp_path, caplog):
    """Plain labels at half the raw's resolution, without labels_voxel_size, used to take the
    raw's voxel size silently and cover 1/8 of it."""
    raw = _raw_data((8, 8, 8))
    with h5py_file(tmp_path / "v.h5") as f:
        f["raw"] = raw
        f["half"] = np.ones((4, 4, 4), np.uint32)
        f["same"] = np.ones((8, 8, 8), np.uint32)
    h5 = str(tmp_path / "v.h5")
    vol = Volume("p", f"{h5}:/raw", f"{h5}:/half", "train", voxel_size=(8, 8, 8))
    with pytest.raises(ValueError, match=r"volume 'p': labels .*v.h5:/half are a plain hdf5 array without "
                                         r"labels_voxel_size and their shape \[4, 4, 4\] differs from the raw's "
                                         r"\[8, 8, 8\]: taking the raw's voxel size \[8.0, 8.0, 8.0\] nm would make "
                                         r"them cover \[0:32, 0:32, 0:32\] nm of the raw's \[0:64, 0:64, 0:64\] nm.*"
                                         r"'labels_voxel_size'"):
        open_sources(vol)
    stated = Volume("p", vol.raw, vol.labels, "train", voxel_size=(8, 8, 8), labels_voxel_size=(16, 16, 16))
    assert open_sources(stated).grid == Geometry((4, 4, 4), (16.0, 16.0, 16.0), (8.0, 8.0, 8.0))
    # same shape: the raw's geometry is taken, and said so
    same = open_sources(Volume("p", vol.raw, f"{h5}:/same", "train", voxel_size=(8, 8, 8)))
    assert same.grid == Geometry((8, 8, 8), (8.0, 8.0, 8.0), (4.0, 4.0, 4.0))
    assert "have no labels_voxel_size; taking the raw's voxel size [8.0, 8.0, 8.0] nm" in caplog.text


def h5py_file(path):
    import h5py

    return h5py.File(path, "w")


def test_metadata_only_opening_agrees_with_the_real_one(tmp_path):
    """The start-up checks open every format from its metadata files: same shape, dtype and
    geometry as a real open, and no data can be read."""
    import h5py

    data = np.random.default_rng(0).integers(0, 255, (6, 10, 12)).astype(np.uint16)
    write_n5(tmp_path / "a.n5", "raw", data)
    write_ngff_v05(tmp_path / "v3.zarr", [data], [(8, 8, 8)], [(4, 4, 4)])
    io.write_image(tmp_path / "v2.zarr", data, (8, 8, 8), (4, 4, 4))
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["raw"] = data
    for path, vs in ((str(tmp_path / "a.n5" / "raw"), (8, 8, 8)), (str(tmp_path / "v3.zarr"), None),
                     (str(tmp_path / "v2.zarr"), None), (str(tmp_path / "v2.zarr" / "s0"), (8, 8, 8)),
                     (f"{tmp_path / 'a.h5'}:/raw", (8, 8, 8))):
        real = io.open_source(path, voxel_size=vs)
        meta = io.open_source(path, voxel_size=vs, metadata_only=True)
        assert (meta.array.shape, meta.array.dtype, meta.geometry, meta.format) == (
            real.array.shape, real.array.dtype, real.geometry, real.format), path
        assert meta.array.shape == (6, 10, 12) and meta.array.dtype == np.uint16
        with pytest.raises(RuntimeError, match="metadata only"):
            meta.array[0]


def test_a_truncated_chunk_names_the_volume(tmp_path):
    io.write_image(tmp_path / "r.zarr", _raw_data(), (8, 8, 8), (4, 4, 4), chunks=(4, 4, 4))
    chunk = tmp_path / "r.zarr" / "s0" / "1" / "0" / "1"
    chunk.write_bytes(chunk.read_bytes()[:10])  # an interrupted copy
    src = open_sources(Volume("v", str(tmp_path / "r.zarr"), None, "predict"))
    with pytest.raises(ValueError, match=r"volume 'v': raw .*r.zarr/s0: cannot read \[0:8, 0:8, 0:8\]"):
        src.raw.read()


def test_a_sharded_input_with_a_hole_names_the_volume(tmp_path):
    import zarr

    data = _raw_data((8, 8, 8))
    a = zarr.create_array(str(tmp_path / "r.zarr"), shape=data.shape, chunks=(4, 4, 4), shards=(8, 8, 8),
                          dtype="u1", fill_value=0)
    a[...] = data
    vol = Volume("v", str(tmp_path / "r.zarr"), None, "predict", voxel_size=(8.0, 8.0, 8.0))
    open_sources(vol)  # complete
    a[4:8, 4:8, 0:4] = 0
    with pytest.raises(ValueError, match=r"volume 'v': raw .*r.zarr: 1 of 8 chunks are not stored \(first missing: "
                                         r"c/0/0/0 inner chunk \[1, 1, 0\]\)"):
        open_sources(vol)
    open_sources(vol, missing_chunks="fill")
    shard = tmp_path / "r.zarr" / "c" / "0" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(ValueError, match=r"volume 'v': raw .*r.zarr: shard .* too short for its index"):
        open_sources(vol, missing_chunks="fill")
