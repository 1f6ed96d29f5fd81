"""OME-NGFF writing/reading and atomic outputs."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from dinopipe import io


def test_write_read_round_trip_with_geometry(tmp_path):
    data = np.arange(2 * 3 * 4 * 5, dtype=np.float16).reshape(2, 3, 4, 5)
    io.write_image(tmp_path / "f.zarr", data, (40, 4, 4), (20, 2, 2), channel_axis=True, attrs={"k": [1, 2]})
    img = io.read_image(tmp_path / "f.zarr")
    assert img.geometry == io.Geometry((3, 4, 5), (40.0, 4.0, 4.0), (20.0, 2.0, 2.0))
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
