"""The workflow on real EM data (../shared/data/gala): an OME-NGFF 0.4 multiscale group
(raw 10 nm, labels 20 nm) and HDF5 datasets, each cut down by an ROI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from dinopipe import io
from test_workflow import jobs_in, snakemake, tiny_config

pytestmark = [pytest.mark.workflow, pytest.mark.slow]


def test_gala_zarr_and_hdf5_through_the_workflow(tmp_path, shared_data):
    gala = shared_data / "gala"
    config = tiny_config()
    config["data"] = {"min_raw_voxel_size": None, "label_voxel_size": [20, 20, 20], "output_voxel_size": [20, 20, 20]}
    config["train"]["crop_shape"] = [8, 12, 12]  # fits the train volume's 9 x 15 x 15 grid (checked at start-up)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [
        "name\traw\tlabels\trole\troi\tvoxel_size\toffset",
        f"gala_zarr\t{gala}/train.zarr/raw\t{gala}/train.zarr/labels/neurons\ttrain\t0:200,0:320,0:320\t\t",
        f"gala_h5\t{gala}/test-image.h5:/stack\t\tpredict\t0:200,0:320,0:320\t10,10,10\t-5,-5,-5",
    ]
    (tmp_path / "config" / "volumes.tsv").write_text("\n".join(rows) + "\n")
    dry = snakemake(tmp_path, "-n", "results/metadata/gala_zarr.json", "results/metadata/gala_h5.json").stdout
    assert jobs_in(dry) == {"features": 2, "targets": 1, "metadata": 2}
    assert f"input: {gala}/test-image.h5\n" in dry  # the HDF5 file is the Snakemake input
    snakemake(tmp_path, "results/metadata/gala_zarr.json", "results/metadata/gala_h5.json")
    zarr_feats = io.read_image(tmp_path / "results/features/gala_zarr.zarr")
    # label centres in the ROI at 20, 40, ... (the one at 0 nm sticks out of the raw)
    assert zarr_feats.geometry.shape == (9, 15, 15) and zarr_feats.geometry.translation == (20.0, 20.0, 20.0)
    labels = io.read_image(tmp_path / "results/targets/gala_zarr.zarr/labels").read()
    truth = io.open_source(f"{gala}/train.zarr/labels/neurons", "s1").array[1:10, 1:16, 1:16]
    np.testing.assert_array_equal(labels, truth)
    h5_feats = io.read_image(tmp_path / "results/features/gala_h5.zarr")
    assert h5_feats.geometry.shape == (10, 16, 16) and h5_feats.geometry.voxel_size == (20.0, 20.0, 20.0)
    assert np.isfinite(h5_feats.read().astype(np.float32)).all()
    meta = json.loads((tmp_path / "results/metadata/gala_h5.json").read_text())
    assert meta["sources"]["raw"]["format"] == "hdf5" and meta["sources"]["raw"]["path"].endswith("test-image.h5:/stack")
    meta = json.loads((tmp_path / "results/metadata/gala_zarr.json").read_text())
    assert (meta["sources"]["raw"]["scale"], meta["sources"]["labels"]["scale"]) == ("s0", "s1")
