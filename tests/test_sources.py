"""Scale choice, output grid, ROI and resampling of raw onto the label grid."""

from __future__ import annotations

import numpy as np
import pytest

from dinopipe import io
from dinopipe.io import Geometry
from dinopipe.sheet import Volume
from dinopipe.sources import choose_scale, open_sources, resample_to_grid


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
    with pytest.raises(ValueError, match="do not overlap"):
        open_sources(far)


def test_resample_area_average():
    src = Geometry((4, 2, 2), (8.0, 8.0, 8.0), (4.0, 4.0, 4.0))
    dst = Geometry((2, 1, 1), (16.0, 16.0, 16.0), (8.0, 8.0, 8.0))
    data = np.arange(16, dtype=np.float32).reshape(4, 2, 2)
    out = resample_to_grid(data, src, dst)
    np.testing.assert_allclose(out[:, 0, 0], [data[:2].mean(), data[2:].mean()])
