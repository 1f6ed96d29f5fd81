"""benchmarks/features.py: its bare and pipeline runs see the same slices, at tiny size on the CPU."""

from __future__ import annotations

import numpy as np
import pytest

from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("features")


@pytest.mark.slow
def test_blockwise_case_runs_the_same_slices_bare_and_in_the_stage(bench, tmp_path):
    from dinopipe.io import read_image

    # raw 16 x 64 x 64 at 4 nm -> features 8 x 32 x 32 at 8 nm; a 0.25 MB budget forces blocks
    case = {"raw_shape": [16, 64, 64], "raw_nm": 4.0, "out_nm": 8.0, "planes": ["xy", "xz", "yz"],
            "batch_size": 4, "max_memory_mb": 0.25, "block_halo": 4}
    store = tmp_path / "raw.zarr"
    bench.write_raw(store, case["raw_shape"], case["raw_nm"])
    features, data = bench.config(case, "tiny-vit")
    bare = bench.bare(str(store), features, data)
    pipe = bench.pipeline(str(store), features, data, str(tmp_path / "features.zarr"))

    from dinopipe.backbone import load_backbone

    bb = load_backbone("tiny-vit", device="cpu")
    _, _, parts, acc_mb, blocking = bench.windows(str(store), features, data, bb.patch_size, bb.channels)
    assert blocking is not None and len(parts) > 1 and bare["blocks"] == pipe["blocks"] == len(parts)
    # raw 2x finer: every plane of a grown block takes 2 raw slices per output voxel along its axis
    assert bare["slices"] == pipe["slices"] == sum(2 * sum(out.shape) for _, _, out in parts)
    assert acc_mb == pytest.approx(max(bb.channels * np.prod(out.shape) * 4 / 2**20 for _, _, out in parts))
    assert bare["seconds"] > 0 and pipe["seconds"] > 0
    feats = read_image(tmp_path / "features.zarr").array
    assert feats.shape == (bb.channels, 8, 32, 32) and feats.dtype == np.float16
    values = np.asarray(feats, dtype=np.float32)
    assert np.isfinite(values).all() and values.std() > 0


@pytest.mark.slow
def test_measure_alternates_children_and_keeps_the_fastest(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_REPEATS", "2")
    case = {"raw_shape": [8, 64, 64], "raw_nm": 4.0, "out_nm": 8.0, "planes": ["xy"], "batch_size": 4,
            "max_memory_mb": 8192.0, "block_halo": 8}
    r = bench.measure("tiny", case, tmp_path, "tiny-vit", 0.0)
    assert r["repeats"] == 2 and r["blocks"] == 0 and r["slices"] == 8  # 8 raw xy slices, whole volume
    assert r["time_ratio"] == pytest.approx(r["pipeline_s"] / r["bare_s"])
    assert r["memory_ratio"] == pytest.approx(r["used_mb"] / r["need_mb"])
    assert r["need_mb"] == pytest.approx(r["accumulator_mb"] + r["bare_held_mb"])
    assert r["accumulator_mb"] == pytest.approx(32 * 4 * 32 * 32 * 4 / 2**20)  # tiny-vit: 32 channels, 4 x 32 x 32
    assert sorted(p.name for p in tmp_path.glob("features_tiny_*.zarr")) == ["features_tiny_0.zarr",
                                                                               "features_tiny_1.zarr"]
