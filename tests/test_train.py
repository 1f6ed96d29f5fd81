"""Tests for dinopipe.train on tiny fake feature + target stores."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from dinopipe.io import read_image, write_image
from dinopipe.predict import load_model, predict_volume
from dinopipe.train import DEFAULT_TRAIN_PARAMS, evaluate, resolve_train_params, train

OFFSETS = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
VOXEL_SIZE = (8.0, 4.0, 4.0)
TRANSLATION = (100.0, 2.0, 2.0)


def make_fake_volume(
    tmp_path: Path,
    name: str,
    shape: tuple[int, int, int] = (32, 32, 32),
    channels: int = 16,
    offsets: list[list[int]] = OFFSETS,
    seed: int = 0,
    learnable: bool = False,
) -> tuple[str, str]:
    """Write ``features/{name}.zarr`` and ``targets/{name}.zarr`` following the storage contract.

    Labels are a random Voronoi tiling; affinities, LSDs (constant per label), boundary
    weights and a mask (the first 10% of z unknown) follow from them. With
    ``learnable`` the first channels of the features encode the affinities and LSDs
    (plus noise); otherwise the features are noise.

    Returns:
        (features_path, targets_path)
    """
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*(np.arange(s) for s in shape), indexing="ij"), axis=-1).reshape(-1, 3)
    seeds = rng.uniform(0, shape, size=(24, 3))
    labels = np.argmin(((grid[:, None, :] - seeds[None]) ** 2).sum(-1), axis=1).reshape(shape).astype(np.uint64) + 1

    affs = np.zeros((len(offsets), *shape), dtype=np.uint8)
    for i, off in enumerate(offsets):
        src = tuple(slice(0, s - o) for s, o in zip(shape, off))
        dst = tuple(slice(o, s) for s, o in zip(shape, off))
        affs[(i, *src)] = labels[src] == labels[dst]
    per_label = rng.uniform(0.1, 0.9, size=(int(labels.max()) + 1, 10))
    lsds = np.moveaxis(per_label[labels.astype(np.int64)], -1, 0).astype(np.float16)
    weights = (1.0 + 2.0 * (affs.min(axis=0) == 0)).astype(np.float32)
    mask = np.ones(shape, dtype=np.uint8)
    mask[: max(1, shape[0] // 10)] = 0

    features = rng.normal(0.0, 1.0, size=(channels, *shape)).astype(np.float32)
    if learnable:
        n = len(offsets)
        features[:n] = 2.0 * affs - 1.0 + rng.normal(0, 0.2, size=affs.shape)
        features[n : n + 10] = 4.0 * (lsds - 0.5) + rng.normal(0, 0.2, size=lsds.shape)

    features_path = tmp_path / "features" / f"{name}.zarr"
    targets_path = tmp_path / "targets" / f"{name}.zarr"
    features_path.parent.mkdir(parents=True, exist_ok=True)
    targets_path.parent.mkdir(parents=True, exist_ok=True)
    signature = {"model_id": "tiny-random", "planes": ["xy"], "dinopipe_version": "test"}
    write_image(
        features_path,
        features.astype(np.float16),
        VOXEL_SIZE,
        TRANSLATION,
        channel_axis=True,
        attrs={"signature": signature},
    )
    root = zarr.open_group(str(targets_path), mode="w", zarr_format=2)
    root.attrs["dinopipe"] = {"offsets": offsets, "lsd_sigma": 80.0}
    for key, data, channel_axis in (
        ("labels", labels, False),
        ("affinities", affs, True),
        ("lsds", lsds, True),
        ("boundary_weights", weights, False),
        ("mask", mask, False),
        ("raw", rng.uniform(0, 1, size=shape).astype(np.float32), False),
    ):
        write_image(targets_path / key, data, VOXEL_SIZE, TRANSLATION, channel_axis=channel_axis)
    return str(features_path), str(targets_path)


TINY = {
    "steps": 20,
    "batch_size": 2,
    "crop_shape": [16, 16, 16],
    "learning_rate": 2e-3,
    "validate_every": 10,
    "validation_crops": 2,
    "unet": {"levels": 1, "base_channels": 4},
    "num_threads": 2,
}


def read_curve(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vols")
    return make_fake_volume(tmp, "train_a", seed=1), make_fake_volume(tmp, "val_a", seed=2)


def test_train_writes_outputs_and_the_loaded_model_reproduces(tmp_path, volumes):
    train_vol, val_vol = volumes
    summary = train([train_vol], [val_vol], tmp_path / "model", TINY)
    out = tmp_path / "model"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "loss_curve.tsv", "model_config.json"]

    rows = read_curve(out / "loss_curve.tsv")
    assert list(rows[0]) == ["step", "train_loss", "val_loss"]
    assert [int(r["step"]) for r in rows] == list(range(21))
    assert rows[0]["train_loss"] == "" and rows[0]["val_loss"] != ""
    assert [int(r["step"]) for r in rows if r["val_loss"]] == [0, 10, 20]
    assert all(float(r["train_loss"]) > 0 for r in rows[1:])

    config = json.loads((out / "model_config.json").read_text())
    assert config["in_channels"] == 16
    assert config["offsets"] == OFFSETS
    assert config["unet"]["out_channels"] == 13 and config["unet"]["levels"] == 1
    assert config["feature_signature"]["model_id"] == "tiny-random"
    assert config["train_params"]["steps"] == 20
    assert config["train_params"]["weight_decay"] == DEFAULT_TRAIN_PARAMS["weight_decay"]

    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert sorted(checkpoint) == ["model", "optimizer", "step"] and checkpoint["step"] == 20

    assert summary["steps"] == 20
    assert summary["final_train_loss"] == pytest.approx(float(rows[-1]["train_loss"]), rel=1e-6)
    assert summary["best_val_loss"] == pytest.approx(min(float(r["val_loss"]) for r in rows if r["val_loss"]))
    assert summary["seconds"] > 0

    model, loaded_config = load_model(out)
    assert not model.training
    assert evaluate(model, [val_vol], TINY) == pytest.approx(summary["final_val_loss"], rel=1e-6)

    predict_volume(train_vol[0], out, tmp_path / "pred.zarr", block_shape=(16, 32, 32), device="cpu")
    affs = read_image(tmp_path / "pred.zarr" / "affinities")
    assert affs.array.shape == (3, 32, 32, 32) and affs.geometry.voxel_size == VOXEL_SIZE
    assert zarr.open_group(str(tmp_path / "pred.zarr")).attrs["dinopipe"]["offsets"] == OFFSETS


def test_training_is_deterministic_on_cpu(tmp_path, volumes):
    params = {**TINY, "steps": 4, "validate_every": 2}
    first = train([volumes[0]], [volumes[1]], tmp_path / "a", params)
    second = train([volumes[0]], [volumes[1]], tmp_path / "b", params)
    assert (tmp_path / "a" / "loss_curve.tsv").read_text() == (tmp_path / "b" / "loss_curve.tsv").read_text()
    assert first["final_val_loss"] == second["final_val_loss"]
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_without_validate_volumes_warns_and_leaves_val_empty(tmp_path, volumes, caplog):
    with caplog.at_level(logging.WARNING, logger="dinopipe.train"):
        summary = train([volumes[0]], [], tmp_path / "m", {**TINY, "steps": 3})
    assert "no validate volumes" in caplog.text
    rows = read_curve(tmp_path / "m" / "loss_curve.tsv")
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert all(r["val_loss"] == "" for r in rows)
    assert summary["best_val_loss"] is None


def test_bad_params_are_rejected(tmp_path, volumes):
    with pytest.raises(ValueError, match=r"unknown train parameters \['epochs', 'lr'\]"):
        resolve_train_params({"epochs": 3, "lr": 0.1})
    with pytest.raises(ValueError, match="must not set \\['in_channels'\\]"):
        resolve_train_params({"unet": {"in_channels": 3}})
    with pytest.raises(ValueError, match=r"unknown UNet config keys \['depth'\]"):
        resolve_train_params({"unet": {"depth": 3}})
    with pytest.raises(ValueError, match=r"crop_shape. must be divisible by 2\*\*unet.levels = 4.*\[16, 18, 16\]"):
        resolve_train_params({"crop_shape": [16, 18, 16]})
    with pytest.raises(ValueError, match="lr_schedule"):
        resolve_train_params({"lr_schedule": "step"})
    with pytest.raises(ValueError, match="unknown loss"):
        resolve_train_params({"loss": "hinge"})
    with pytest.raises(ValueError, match="device"):
        resolve_train_params({"device": "tpu"})
    with pytest.raises(ValueError, match=r"volume train_a: crop_shape \[16, 64, 16\] is larger than the volume"):
        train([volumes[0]], [], tmp_path / "m", {**TINY, "crop_shape": [16, 64, 16]})


def test_inconsistent_offsets_are_rejected(tmp_path, volumes):
    other = make_fake_volume(tmp_path, "two_offsets", shape=(16, 16, 16), offsets=[[1, 0, 0], [0, 1, 0]], seed=3)
    with pytest.raises(ValueError, match="volume two_offsets has affinity offsets"):
        train([volumes[0]], [other], tmp_path / "m", TINY)


@pytest.mark.slow
def test_training_learns_a_learnable_problem(tmp_path):
    train_vol = make_fake_volume(tmp_path, "learn_train", learnable=True, seed=10)
    val_vol = make_fake_volume(tmp_path, "learn_val", learnable=True, seed=11)
    params = {
        **TINY,
        "steps": 150,
        "learning_rate": 1e-2,
        "lr_schedule": "constant",
        "validate_every": 50,
        "validation_crops": 4,
        "unet": {"levels": 1, "base_channels": 8},
    }
    summary = train([train_vol], [val_vol], tmp_path / "m", params)
    rows = read_curve(tmp_path / "m" / "loss_curve.tsv")
    val = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    assert len(val) == 4  # steps 0, 50, 100, 150
    assert val[-1] < 0.25 * val[0], val
    assert summary["best_val_loss"] < 0.25 * val[0]
