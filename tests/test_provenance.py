"""What the metadata JSON records about where a volume's outputs came from."""

from __future__ import annotations

import json
import socket
import time

from dinopipe.sheet import Volume
from dinopipe.stages import config_hash, run_demo_data, run_features, run_metadata, run_targets

DEMO = {"seed": 0, "label_shape": [8, 16, 16], "label_voxel_size": [16, 16, 16], "raw_factor": [2, 2, 2]}


def test_metadata_records_config_versions_sources_scales_roi_host_timings_sizes(tmp_path):
    run_demo_data("p", tmp_path / "p.zarr", **DEMO)
    roi = ((0, 128), (32, 256), (0, 200))
    vol = Volume("p", str(tmp_path / "p.zarr/raw"), str(tmp_path / "p.zarr/labels"), "train", roi=roi)
    data = {"min_raw_voxel_size": [16, 16, 16]}  # picks the raw's s1
    config = {"volumes": "v.tsv", "data": data, "features": {"backbone": "tiny-vit", "planes": ["xy"]}}
    run_features(vol, tmp_path / "f.zarr", config["features"], data)
    started = time.perf_counter()
    run_targets(vol, tmp_path / "t.zarr", {}, data)
    targets_s = time.perf_counter() - started
    run_metadata(vol, tmp_path / "f.zarr", tmp_path / "t.zarr", tmp_path / "m.json", config)
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["config_sha256"] == config_hash(config) != config_hash({**config, "volumes": "w.tsv"})
    assert meta["config"] == config
    assert all(meta["versions"][k] for k in ("dinopipe", "torch", "transformers", "snakemake"))
    raw, labels = meta["sources"]["raw"], meta["sources"]["labels"]
    assert raw["path"] == vol.raw and raw["scale"] == "s1" and raw["voxel_size"] == [16.0, 16.0, 16.0]
    assert raw["format"] == "ome-ngff 0.4" and labels["path"] == vol.labels and labels["scale"] == "s0"
    assert meta["sources"]["roi_nm"] == [[0, 128], [32, 256], [0, 200]]
    # label voxel centres inside the ROI: y from 40 nm (the voxel at 24 nm starts before 32)
    assert meta["sources"]["grid"] == {"shape": [8, 14, 12], "voxel_size": [16.0, 16.0, 16.0],
                                       "translation": [8.0, 40.0, 8.0]}
    assert meta["host"] == socket.gethostname() and meta["created_utc"].endswith("Z")
    assert meta["features"]["timings"]["extract_s"] > 0
    # each part of the targets stage took some time, and together no longer than the whole call
    parts = meta["targets"]["timings"]
    assert {"lsds_s", "affinities_s", "write_s"} <= set(parts) and parts["lsds_s"] > 0
    assert sum(parts.values()) <= targets_s
    assert meta["features"]["bytes"] > 0 and meta["targets"]["bytes"] > 0
    assert meta["features"]["shape"] == [32, 8, 14, 12]
