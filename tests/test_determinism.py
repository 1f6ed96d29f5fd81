"""The same configuration twice gives bitwise identical features and targets on the CPU.

(Across two complete Snakemake runs this is also checked by tests/test_atomic.py.)
"""

from __future__ import annotations

import numpy as np
import zarr

from dinopipe import io
from dinopipe.sheet import Volume
from dinopipe.stages import run_demo_data, run_features, run_targets

DEMO = {"seed": 3, "label_shape": [8, 16, 32], "label_voxel_size": [16, 16, 16], "raw_factor": [2, 2, 2]}


def _bytes(store) -> dict[str, bytes]:
    root = zarr.open_group(str(store), mode="r")
    out = {name: np.asarray(arr[...]).tobytes() for name, arr in root.arrays()}
    for name, _ in root.groups():
        out.update({f"{name}/{k}": v for k, v in _bytes(store / name).items()})
    return out


def test_features_and_targets_are_bitwise_reproducible(tmp_path):
    run_demo_data("d", tmp_path / "d.zarr", **DEMO)
    vol = Volume("d", str(tmp_path / "d.zarr/raw"), str(tmp_path / "d.zarr/labels"), "train")
    features = {"backbone": "tiny-vit", "planes": ["xy", "xz", "yz"], "device": "cpu"}
    for run in ("a", "b"):
        run_features(vol, tmp_path / f"f_{run}.zarr", features, {})
        run_features(vol, tmp_path / f"fb_{run}.zarr", {**features, "block_shape": [4, 16, 16]}, {})
        run_targets(vol, tmp_path / f"t_{run}.zarr", {}, {})
    for prefix in ("f", "fb", "t"):
        a, b = _bytes(tmp_path / f"{prefix}_a.zarr"), _bytes(tmp_path / f"{prefix}_b.zarr")
        assert a.keys() == b.keys() and a, prefix
        assert all(a[k] == b[k] for k in a), prefix
    sig_a = io.read_image(tmp_path / "f_a.zarr").attrs["signature"]
    assert sig_a == io.read_image(tmp_path / "f_b.zarr").attrs["signature"]
