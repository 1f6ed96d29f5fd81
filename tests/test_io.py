"""OME-NGFF writing/reading and atomic outputs."""

from __future__ import annotations

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
