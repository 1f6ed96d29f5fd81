"""OME-NGFF writing/reading and atomic outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from dinopipe import io
from dinopipe.geometry import Geometry


def test_write_read_round_trip_with_geometry(tmp_path):
    data = np.arange(2 * 3 * 4 * 5, dtype=np.float16).reshape(2, 3, 4, 5)
    io.write_image(tmp_path / "f.zarr", data, (40, 4, 4), (20, 2, 2), channel_axis=True, attrs={"k": [1, 2]})
    img = io.read_image(tmp_path / "f.zarr")
    assert img.geometry == Geometry((3, 4, 5), (40.0, 4.0, 4.0), (20.0, 2.0, 2.0))
    assert img.channel_axis and img.attrs == {"k": [1, 2]}
    np.testing.assert_array_equal(img.read(), data)
    np.testing.assert_allclose(img.geometry.begin_nm, [0, 0, 0])
    np.testing.assert_allclose(img.geometry.end_nm, [120, 16, 20])


def test_written_images_validate_as_ome_ngff(tmp_path):
    models = pytest.importorskip("ome_zarr_models.v04.image")
    io.write_image(tmp_path / "l.zarr", np.ones((4, 4, 4), np.uint64), (8, 8, 8), (4, 4, 4))
    image = models.Image.from_zarr(zarr.open_group(str(tmp_path / "l.zarr"), mode="r"))
    ms = image.attributes.multiscales[0]
    assert [a.name for a in ms.axes] == ["z", "y", "x"]
    assert ms.datasets[0].coordinateTransformations[0].scale == [8.0, 8.0, 8.0]


def test_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such image"):
        io.read_image(tmp_path / "missing.zarr")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w", zarr_format=2)
    with pytest.raises(ValueError, match="multiscales"):
        io.read_image(tmp_path / "plain.zarr")
    io.write_image(tmp_path / "i.zarr", np.zeros((2, 2, 2), np.uint8), (1, 1, 1), (0, 0, 0))
    with pytest.raises(ValueError, match="scale 's3' not found"):
        io.read_image(tmp_path / "i.zarr", "s3")
    with pytest.raises(ValueError, match="expected a 3D array"):
        io.write_image(tmp_path / "j.zarr", np.zeros((2, 2), np.uint8), (1, 1, 1), (0, 0, 0))


def test_atomic_output_replaces_only_on_success(tmp_path):
    final = tmp_path / "out.zarr"
    with io.atomic_output(final) as tmp:
        io.write_image(tmp, np.ones((2, 2, 2), np.uint8), (1, 1, 1), (0, 0, 0))
    with pytest.raises(RuntimeError, match="boom"):
        with io.atomic_output(final) as tmp:
            io.write_image(tmp, np.full((2, 2, 2), 7, np.uint8), (1, 1, 1), (0, 0, 0))
            raise RuntimeError("boom")
    assert io.read_image(final).read().max() == 1  # old output intact
    assert [p.name for p in tmp_path.iterdir()] == ["out.zarr"]  # no temporary left


def test_write_json_atomic(tmp_path):
    io.write_json(tmp_path / "m.json", {"a": np.float32(1.5), "b": np.arange(2)})
    assert (tmp_path / "m.json").read_text().startswith("{")
    import json

    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1.5, "b": [0, 1]}


def test_reads_gala_multiscale(shared_data):
    levels = io.multiscale_levels(shared_data / "gala" / "train.zarr" / "raw")
    assert levels == [("s0", (10.0, 10.0, 10.0)), ("s1", (20.0, 20.0, 20.0))]
    img = io.read_image(shared_data / "gala" / "train.zarr" / "raw", "s1")
    assert img.geometry.translation == (5.0, 5.0, 5.0)
    assert img.array.shape == (25, 50, 100)


def test_source_array_indexing_matches_numpy(tmp_path):
    from input_fixtures import write_n5

    data = np.arange(5 * 6 * 7, dtype=np.int32).reshape(5, 6, 7)
    io.write_image(tmp_path / "a.zarr", data, (1, 1, 1), (0, 0, 0))
    write_n5(tmp_path / "b.n5", "raw", data)
    import h5py

    with h5py.File(tmp_path / "c.h5", "w") as f:
        f["g/raw"] = data
    sources = [
        io.open_source(str(tmp_path / "a.zarr")),
        io.open_source(str(tmp_path / "b.n5/raw"), voxel_size=(1, 1, 1)),
        io.open_source(f"{tmp_path}/c.h5:/g/raw", voxel_size=(1, 1, 1)),
    ]
    keys = [
        (slice(1, 3), slice(0, 100), slice(2, 5)), (Ellipsis,), (slice(None, None, 2), slice(1, None, 3)),
        ([3, 1, 1], slice(1, 4), slice(0, 2)), (slice(0, 2), [5, 0]), (-1, slice(2, 4), 3), (slice(4, 2),),
    ]
    for src in sources:
        arr = src.array
        assert arr.shape == data.shape and arr.dtype == data.dtype and arr.ndim == 3
        np.testing.assert_array_equal(np.asarray(arr), data)
        for key in keys:
            np.testing.assert_array_equal(arr[key], data[key], err_msg=f"{src.format} {key}")
    assert [s.format for s in sources] == ["ome-ngff 0.4", "n5", "hdf5"]


def test_ngff_05_units_and_multiscale_transforms(tmp_path):
    from input_fixtures import write_ngff_v05

    write_ngff_v05(tmp_path / "i.zarr", [np.zeros((2, 2, 2), np.uint8)], [(2, 2, 2)], [(1, 1, 1)])
    group = zarr.open_group(str(tmp_path / "i.zarr"), mode="a")
    ome = group.attrs["ome"]
    ms = ome["multiscales"][0]
    for axis in ms["axes"]:
        axis["unit"] = "micrometer"
    ms["coordinateTransformations"] = [{"type": "scale", "scale": [0.5, 0.5, 0.5]},
                                       {"type": "translation", "translation": [1, 0, 0]}]
    group.attrs["ome"] = ome
    for img in (io.read_image(tmp_path / "i.zarr"), io.open_source(str(tmp_path / "i.zarr"))):
        # 2 units x 0.5 = 1 um = 1000 nm; centre of voxel 0 at (1 x 0.5 + 1) um in z
        assert img.geometry.voxel_size == (1000.0, 1000.0, 1000.0)
        assert img.geometry.translation == (1500.0, 500.0, 500.0)
        assert img.format == "ome-ngff 0.5"
    assert io.multiscale_levels(tmp_path / "i.zarr") == [("s0", (1000.0, 1000.0, 1000.0))]


def test_open_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        io.open_source(str(tmp_path / "nope.zarr"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        io.open_source(f"{tmp_path}/nope.h5:/raw", voxel_size=(1, 1, 1))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="not a Zarr .* or N5 array or group"):
        io.open_source(str(tmp_path / "folder"))
    zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=2).create_array("raw", shape=(2, 2, 2), dtype="u1")
    with pytest.raises(ValueError, match=r"not an OME-NGFF multiscale image .*found \['raw'\]"):
        io.open_source(str(tmp_path / "g.zarr"))
    with pytest.raises(ValueError, match="plain zarr array without a voxel size"):
        io.open_source(str(tmp_path / "g.zarr/raw"))
    io.write_image(tmp_path / "i.zarr", np.zeros((2, 2, 2), np.uint8), (1, 1, 1), (0, 0, 0))
    with pytest.raises(ValueError, match="states its own voxel size"):
        io.open_source(str(tmp_path / "i.zarr"), voxel_size=(1, 1, 1))
    with pytest.raises(ValueError, match="scale 's1' not found; available: \\['s0'\\]"):
        io.open_source(str(tmp_path / "i.zarr"), "s1")


def test_source_store():
    assert io.source_store("a/b.zarr/raw") == "a/b.zarr"
    assert io.source_store("a/b.zarr") == "a/b.zarr"
    assert io.source_store("/d/c.n5/raw/s0") == "/d/c.n5"
    assert io.source_store("/d/c.h5:/volumes/raw") == "/d/c.h5"
    assert io.source_store("/d/c.hdf5") == "/d/c.hdf5"
    assert io.split_hdf5("x/c.H5:stack") == (Path("x/c.H5"), "stack")


def test_atomic_output_removes_a_killed_jobs_temporary(tmp_path):
    stale = tmp_path / ".out.zarr.tmp-123-deadbeef"
    stale.mkdir()
    (stale / "half-written").write_text("x")
    other = tmp_path / ".other.zarr.tmp-1-aa"
    other.mkdir()
    with io.atomic_output(tmp_path / "out.zarr") as tmp:
        io.write_image(tmp, np.ones((2, 2, 2), np.uint8), (1, 1, 1), (0, 0, 0))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.zarr.tmp-1-aa", "out.zarr"]


# --------------------------------------------------------------------------- sharded stores (OME-NGFF 0.5)


def _files(path: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(path))


@pytest.mark.parametrize("order", ["C", "F"])
def test_sharded_and_unsharded_images_hold_the_same_values_in_far_fewer_files(tmp_path, order):
    rng = np.random.default_rng(0)
    data = rng.standard_normal((5, 40, 36, 20)).astype(np.float16)
    chunks = (5, 8, 8, 8)
    shards = io.shard_shape(data.shape, chunks, 16, channel_axis=True)
    assert shards == (5, 16, 16, 16)
    kwargs = {"channel_axis": True, "chunks": chunks, "compress": False, "order": order, "attrs": {"k": 1}}
    io.write_image(tmp_path / "plain.zarr", data, (8, 4, 4), (4, 2, 2), **kwargs)
    io.write_image(tmp_path / "sharded.zarr", data, (8, 4, 4), (4, 2, 2), shards=shards, **kwargs)
    plain, sharded = io.read_image(tmp_path / "plain.zarr"), io.read_image(tmp_path / "sharded.zarr")
    np.testing.assert_array_equal(sharded.read(), data)
    np.testing.assert_array_equal(plain.read(), data)
    assert sharded.geometry == plain.geometry and sharded.attrs == plain.attrs == {"k": 1}
    assert (plain.format, sharded.format) == ("ome-ngff 0.4", "ome-ngff 0.5")
    # one file per chunk (5 x 5 x 3) vs one per shard (3 x 3 x 2), + metadata files
    # (v2: .zgroup, .zattrs, s0/.zarray, s0/.zattrs; v3: two zarr.json)
    assert _files(tmp_path / "plain.zarr") == 5 * 5 * 3 + 4
    assert _files(tmp_path / "sharded.zarr") == 3 * 3 * 2 + 2
    # tensorstore (loader, predict) reads both, with the chunks' element order
    for name in ("plain.zarr", "sharded.zarr"):
        store = io.open_tensorstore(tmp_path / name / "s0")
        assert io.chunk_order(store) == order
        out = np.zeros((5, 7, 9, 11), np.float16, order="F")
        io.read_into(store, (slice(None), slice(3, 10), slice(20, 29), slice(5, 16)), out).result()
        np.testing.assert_array_equal(out, data[:, 3:10, 20:29, 5:16])


def test_sharded_image_metadata_is_zarr_v3_sharding_and_ome_ngff_05(tmp_path):
    data = np.arange(24 * 24 * 24, dtype=np.uint64).reshape(24, 24, 24)
    io.write_image(tmp_path / "s.zarr", data, (8, 8, 8), (4, 4, 4), chunks=(8, 8, 8), shards=(16, 16, 16),
                   name="seg")
    group = json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())
    assert group["zarr_format"] == 3 and group["attributes"]["ome"]["version"] == "0.5"
    ms = group["attributes"]["ome"]["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"] and "version" not in ms
    array = json.loads((tmp_path / "s.zarr" / "s0" / "zarr.json").read_text())
    assert array["chunk_grid"]["configuration"]["chunk_shape"] == [16, 16, 16]
    assert array["codecs"][0]["name"] == "sharding_indexed"
    assert array["codecs"][0]["configuration"]["chunk_shape"] == [8, 8, 8]
    assert array["dimension_names"] == ["z", "y", "x"]
    models = pytest.importorskip("ome_zarr_models.v05.image")
    image = models.Image.from_zarr(zarr.open_group(str(tmp_path / "s.zarr"), mode="r"))
    assert image.ome_attributes.multiscales[0].datasets[0].coordinateTransformations[0].scale == [8.0, 8.0, 8.0]
    # every inner chunk stored (a missing one means an incomplete store, see count_chunks)
    count = io.count_chunks(str(tmp_path / "s.zarr"), "s0")
    assert (count.expected, count.present) == (27, 27)


def test_shard_shape_rounds_to_whole_chunks_and_names_the_key():
    assert io.shard_shape((32, 48, 48), (32, 48, 48), 64, channel_axis=False) == (32, 48, 48)  # capped at the array
    assert io.shard_shape((100, 200, 200), (32, 48, 48), 64, channel_axis=False) == (64, 96, 96)
    assert io.shard_shape((6, 100, 100, 100), (6, 16, 16, 16), 40, channel_axis=True) == (6, 48, 48, 48)
    assert io.shard_shape((100, 100, 100), (16, 16, 16), None, channel_axis=False) is None
    for bad in (0, -16, 2.5, True, "64"):
        with pytest.raises(ValueError, match="predict.shard_shape must be a positive integer"):
            io.shard_shape((100, 100, 100), (16, 16, 16), bad, channel_axis=False, key="predict.shard_shape")
    with pytest.raises(ValueError, match="whole number of chunks"):
        io.create_image(Path("/nonexistent/x.zarr"), (32, 32, 32), np.uint8, (1, 1, 1), (0, 0, 0),
                        chunks=(16, 16, 16), shards=(24, 32, 32))


class _CountingArray:
    """A zarr array that counts the writes into it."""

    def __init__(self, array):
        self.array, self.writes = array, []
        self.shape, self.dtype, self.shards = array.shape, array.dtype, array.shards

    def __setitem__(self, key, value):
        self.writes.append(key)
        self.array[key] = value


@pytest.mark.parametrize("shards", [None, (4, 16, 16, 16)])
def test_shard_writer_writes_each_shard_once_in_shard_order(tmp_path, shards):
    data = np.random.default_rng(1).standard_normal((4, 40, 40, 24)).astype(np.float32)
    array = _CountingArray(io.create_image(tmp_path / "p.zarr", data.shape, np.float32, (1, 1, 1), (0, 0, 0),
                                           channel_axis=True, chunks=(4, 8, 8, 8), shards=shards))
    starts = [(z, y, x) for z in range(0, 40, 8) for y in range(0, 40, 8) for x in range(0, 24, 8)]
    ordered = io.shard_major(starts, None if shards is None else shards[1:])
    assert sorted(ordered) == sorted(starts) and (ordered == starts) == (shards is None)
    with io.ShardWriter(array) as writer:
        for z, y, x in ordered:
            writer[(slice(None), slice(z, z + 8), slice(y, y + 8), slice(x, x + 8))] = \
                data[:, z : z + 8, y : y + 8, x : x + 8]
    np.testing.assert_array_equal(io.read_image(tmp_path / "p.zarr").read(), data)
    # unsharded: one write per block; sharded: one per shard (3 x 3 x 2), none partial
    assert len(array.writes) == (len(starts) if shards is None else 18) and writer.partial_writes == 0


def test_shard_writer_bounds_its_buffer_and_stays_correct_out_of_order(tmp_path):
    data = np.random.default_rng(2).integers(0, 1000, (40, 40, 24)).astype(np.uint64)
    arr = io.create_image(tmp_path / "s.zarr", data.shape, np.uint64, (1, 1, 1), (0, 0, 0), chunks=(8, 8, 8),
                          shards=(16, 16, 16))
    shard_bytes = 16 * 16 * 16 * 8
    with io.ShardWriter(arr, max_bytes=2 * shard_bytes) as writer:  # C order: a row of shards stays open
        for z in range(0, 40, 8):
            for y in range(0, 40, 8):
                for x in range(0, 24, 8):
                    writer[z : z + 8, y : y + 8, x : x + 8] = data[z : z + 8, y : y + 8, x : x + 8]
            assert sum(b.nbytes for b, _, _ in writer._open.values()) <= 2 * shard_bytes
    assert writer.partial_writes > 0
    np.testing.assert_array_equal(io.read_image(tmp_path / "s.zarr").read(), data)


def test_write_cast_writes_chunk_aligned_cast_pieces_no_bigger_than_asked(tmp_path):
    from dinopipe.io import create_image, read_image, write_cast

    rng = np.random.default_rng(0)
    data = rng.normal(size=(3, 20, 19, 30)).astype(np.float32)
    arr = create_image(tmp_path / "f.zarr", (3, 40, 40, 40), np.float16, (1, 1, 1), (0, 0, 0), channel_axis=True,
                       chunks=(3, 8, 8, 8), compress=False)

    class Recording:  # the zarr array, recording every assignment
        shape, chunks, dtype = arr.shape, arr.chunks, arr.dtype
        writes: list[tuple[tuple[slice, ...], np.ndarray]] = []

        def __setitem__(self, index, value):
            self.writes.append((index, value))
            arr[index] = value

    rec = Recording()
    chunk_bytes = 3 * 8 * 8 * 8 * 2
    pieces = write_cast(rec, data, (0, 5, 8, 3), max_bytes=2 * chunk_bytes)
    # z 5..25 -> [5,8) [8,16) [16,24) [24,25); y 8..27 -> [8,16) [16,24) [24,27); x 3..33 in steps of 16
    # -> [3,16) [16,32) [32,33): 4 * 3 * 3 pieces
    assert pieces == len(rec.writes) == 36
    for index, value in rec.writes:
        assert value.dtype == np.float16 and value.nbytes <= 2 * chunk_bytes
        for s, c in zip(index[1:], (8, 8, 16)):  # no piece crosses a chunk (two chunks along x) boundary
            assert (s.start // c) == ((s.stop - 1) // c)
    back = read_image(tmp_path / "f.zarr").array
    np.testing.assert_array_equal(back[:, 5:25, 8:27, 3:33], data.astype(np.float16))
    assert not np.asarray(back[:, :5]).any() and not np.asarray(back[:, 25:]).any()
    with pytest.raises(ValueError, match="does not match"):
        write_cast(arr, data[0], (0, 0, 0))
