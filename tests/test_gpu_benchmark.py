"""benchmarks/gpu.py: the CPU path (skips with a JSON line) and its measuring functions at tiny size on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark_scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu():
    return load_benchmark("gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the benchmark would run for real")
def test_without_cuda_it_says_so_and_exits_0():
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "needs CUDA" in proc.stderr
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line["benchmark"] == "gpu" and line["skipped"] == "needs CUDA" and "goals" in line


def test_channel_cosine_against_hand_values(gpu):
    a = np.array([[[1.0, 0.0]], [[1.0, 1.0]], [[0.0, 0.0]]])
    b = np.array([[[2.0, 0.0]], [[1.0, -1.0]], [[0.0, 0.0]]])
    # parallel, orthogonal, and two zero channels (counted as identical)
    np.testing.assert_allclose(gpu.channel_cosine(a, b), [1.0, 0.0, 1.0])
    np.testing.assert_allclose(gpu.channel_cosine(a[:2], -a[:2]), [-1.0, -1.0])


def test_features_precision_on_the_cpu_is_fp32_both_times(gpu):
    # autocast only acts on CUDA: on the CPU both runs are fp32 and agree exactly
    result = gpu.features_precision("cpu", backbone="tiny-vit", raw_shape=(4, 64, 64), batch_size=2)
    assert result["cosine_min"] == pytest.approx(1.0, abs=1e-9) and result["cosine_mean"] == pytest.approx(1.0)
    assert result["slices"] == 4 and result["image_size"] == [64, 64]
    assert result["slices_per_s_bf16"] > 0 and result["slices_per_s_fp32"] > 0
    with pytest.raises(ValueError, match="even"):
        gpu.features_precision("cpu", backbone="tiny-vit", raw_shape=(3, 64, 64))


def test_training_and_prediction_speed_on_a_tiny_store(gpu, tmp_path):
    from dinopipe.io import read_image

    store = gpu.write_store(tmp_path, shape=(16, 32, 32), channels=8)
    assert read_image(store[0]).array.shape == (8, 16, 32, 32)
    training = gpu.training_speed(tmp_path, store, "cpu", steps=2, crop=(16, 16, 16), batch_size=1,
                                  unet={"levels": 1, "base_channels": 4})
    assert training["steps_per_s"] == pytest.approx(2 / training["seconds"])
    assert (Path(training["model_dir"]) / "checkpoint.pt").is_file()
    prediction = gpu.prediction_speed(tmp_path, store[0], training["model_dir"], "cpu", block_shape=(16, 16, 16))
    assert prediction["voxels"] == 16 * 32 * 32 and prediction["blocks"] == 4
    assert prediction["voxels_per_s"] == pytest.approx(prediction["voxels"] / prediction["seconds"])
    assert read_image(tmp_path / "prediction.zarr" / "affinities").array.shape == (6, 16, 32, 32)


def test_the_whole_command_on_the_cpu_at_tiny_size(gpu, monkeypatch, capsys):
    for name, value in {"RAW_SHAPE": (4, 64, 64), "BACKBONE": "tiny-vit", "STORE_SHAPE": (16, 32, 32),
                        "CHANNELS": 8, "CROP": (16, 16, 16), "BATCH": 1,
                        "UNET": {"levels": 1, "base_channels": 4}}.items():
        monkeypatch.setattr(gpu, name, value)
    assert gpu.main(["--device", "cpu", "--steps", "2"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["benchmark"] == "gpu" and line["device"] == "cpu" and set(line["goals"]) == set(gpu.GOALS)
    assert line["features_cosine_min"] == pytest.approx(1.0)
    assert line["data_wait_fraction"] == line["training"]["data_wait_fraction"]
    assert line["prediction"]["voxels"] == 16 * 32 * 32 and line["training"]["steps_per_s"] > 0
