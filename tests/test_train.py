"""Tests for dinopipe.train on tiny fake feature + target stores."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from dinopipe.checkpoint import load_model
from dinopipe.curves import read_curve
from dinopipe.io import read_image, write_image
from dinopipe.predict import predict_volume
from dinopipe.train import TrainingInterrupted, train, validation_loss
from dinopipe.train_params import DEFAULT_TRAIN_PARAMS, resolve_train_params

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

    semantic = (labels % 3).astype(np.uint8)

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
    root.attrs["dinopipe"] = {"offsets": offsets, "lsd_sigma": 80.0, "num_classes": 3}
    for key, data, channel_axis in (
        ("labels", labels, False),
        ("affinities", affs, True),
        ("lsds", lsds, True),
        ("boundary_weights", weights, False),
        ("mask", mask, False),
        ("raw", rng.uniform(0, 1, size=shape).astype(np.float32), False),
        ("semantic", semantic, False),
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
    "tensorboard": False,
}


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vols")
    return make_fake_volume(tmp, "train_a", seed=1), make_fake_volume(tmp, "val_a", seed=2)


def test_train_writes_outputs_and_the_loaded_model_reproduces(tmp_path, volumes):
    train_vol, val_vol = volumes
    summary = train([train_vol], [val_vol], tmp_path / "model", {**TINY, "tensorboard": True})
    out = tmp_path / "model"
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.pt", "loss_curve.png", "loss_curve.tsv", "model_config.json", "state", "tensorboard"]
    assert sorted(p.name for p in (out / "state").iterdir()) == ["best.pt", "latest.pt", "loss_curve.tsv"]
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = read_curve(out / "loss_curve.tsv")
    assert list(rows[0]) == ["step", "train_loss", "val_loss", "val_bacc", "lr",
                             *(f"val_bacc_{'_'.join(map(str, o))}" for o in OFFSETS)]
    assert [int(r["step"]) for r in rows] == list(range(21))
    assert rows[0]["train_loss"] == "" and rows[0]["val_loss"] != ""
    assert [int(r["step"]) for r in rows if r["val_loss"]] == [0, 10, 20]
    assert all(0 <= float(r["val_bacc"]) <= 1 for r in rows if r["val_loss"])
    for r in rows:  # the overall balanced accuracy is the mean of the per-offset ones
        per = [float(r[f"val_bacc_{'_'.join(map(str, o))}"]) for o in OFFSETS] if r["val_loss"] else []
        assert (float(r["val_bacc"]) == pytest.approx(np.mean(per), rel=1e-6)) if per else r["val_bacc"] == ""
    assert all(float(r["train_loss"]) > 0 for r in rows[1:])
    assert float(rows[1]["lr"]) == pytest.approx(TINY["learning_rate"])

    config = json.loads((out / "model_config.json").read_text())
    assert config["in_channels"] == 16 and config["input_raw"] is False and config["raw_source"] is None
    assert config["offsets"] == OFFSETS and config["target"] == "affinities"
    assert config["unet"]["out_channels"] == 13 and config["unet"]["levels"] == 1
    assert config["feature_signature"]["model_id"] == "tiny-random"
    assert config["train_params"]["steps"] == 20
    assert config["train_params"]["weight_decay"] == DEFAULT_TRAIN_PARAMS["weight_decay"]

    # checkpoint.pt: the best model (state dicts and plain values only)
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert sorted(checkpoint) == ["model", "step", "val_loss"]
    assert checkpoint["step"] == summary["best_val_step"] == config["checkpoint_step"]
    assert checkpoint["val_loss"] == summary["best_val_loss"]

    assert summary["steps"] == 20 and summary["start_step"] == 0 and not summary["stopped_early"]
    assert summary["final_train_loss"] == pytest.approx(float(rows[-1]["train_loss"]), rel=1e-6)
    assert summary["best_val_loss"] == pytest.approx(min(float(r["val_loss"]) for r in rows if r["val_loss"]))

    model, _ = load_model(out)
    assert not model.training
    assert validation_loss(model, [val_vol], TINY) == pytest.approx(summary["best_val_loss"], rel=1e-6)

    predict_volume(train_vol[0], out, tmp_path / "pred.zarr", block_shape=(16, 32, 32), device="cpu")
    affs = read_image(tmp_path / "pred.zarr" / "affinities")
    assert affs.array.shape == (3, 32, 32, 32) and affs.geometry.voxel_size == VOXEL_SIZE
    assert zarr.open_group(str(tmp_path / "pred.zarr")).attrs["dinopipe"]["offsets"] == OFFSETS

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "val/loss", "val/bacc", "val/bacc_1_0_0"} <= set(events.Tags()["scalars"])
    assert {"val/raw", "val/labels", "val/predicted_affinities"} <= set(events.Tags()["images"])


class _Clock:
    """A stand-in for the ``time`` module whose ``perf_counter`` advances a fixed amount per call."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 0.0, tick

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now


def test_data_wait_fraction_is_the_loader_wait_over_the_step_time(tmp_path, volumes, monkeypatch):
    """With clocks that tick known amounts: each step reads the training clock twice (1 s apart)
    and each batch the loader clock twice (0.25 s apart), so a quarter of every step is waiting."""
    import dinopipe.loader
    import dinopipe.train

    monkeypatch.setattr(dinopipe.train, "time", _Clock(1.0))
    monkeypatch.setattr(dinopipe.loader, "time", _Clock(0.25))
    summary = train([volumes[0]], [volumes[1]], tmp_path / "m", {**TINY, "steps": 3, "validate_every": 3})
    assert summary["steps"] == 3
    assert summary["data_wait_fraction"] == pytest.approx(0.25)


def test_training_is_deterministic_on_cpu(tmp_path, volumes):
    params = {**TINY, "steps": 4, "validate_every": 2, "augment": {"feature_noise": 0.1, "channel_dropout": 0.1}}
    first = train([volumes[0]], [volumes[1]], tmp_path / "a", params)
    second = train([volumes[0]], [volumes[1]], tmp_path / "b", {**params, "loader_workers": 1, "prefetch": 1})
    assert (tmp_path / "a" / "loss_curve.tsv").read_text() == (tmp_path / "b" / "loss_curve.tsv").read_text()
    assert first["final_val_loss"] == second["final_val_loss"]
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def _latest_model(out: Path) -> dict:
    return torch.load(out / "state" / "latest.pt", weights_only=True)["model"]


def test_an_interrupted_run_resumes_and_equals_the_uninterrupted_run(tmp_path, volumes, caplog):
    params = {**TINY, "steps": 20, "validate_every": 5, "unet": {"levels": 1, "base_channels": 4, "dropout": 0.2},
              "augment": {"feature_noise": 0.1, "channel_dropout": 0.1}}
    whole = train([volumes[0]], [volumes[1]], tmp_path / "whole", params)
    with pytest.raises(TrainingInterrupted):
        train([volumes[0]], [volumes[1]], tmp_path / "cut", params, stop_after_step=13)
    assert not (tmp_path / "cut" / "checkpoint.pt").exists()  # no output that looks complete
    assert torch.load(tmp_path / "cut" / "state" / "latest.pt", weights_only=True)["step"] == 10
    with caplog.at_level(logging.INFO, logger="dinopipe.train"):
        resumed = train([volumes[0]], [volumes[1]], tmp_path / "cut", params)
    assert "resuming from" in caplog.text and resumed["start_step"] == 10
    assert resumed["steps"] == whole["steps"] == 20
    assert (tmp_path / "cut" / "loss_curve.tsv").read_text() == (tmp_path / "whole" / "loss_curve.tsv").read_text()
    a, b = _latest_model(tmp_path / "whole"), _latest_model(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # rerunning a finished run changes nothing
    again = train([volumes[0]], [volumes[1]], tmp_path / "cut", params)
    assert again["start_step"] == 20
    assert (tmp_path / "cut" / "loss_curve.tsv").read_text() == (tmp_path / "whole" / "loss_curve.tsv").read_text()


def test_more_steps_continue_the_curve(tmp_path, volumes):
    params = {**TINY, "steps": 10, "validate_every": 5, "lr_schedule": "constant"}
    train([volumes[0]], [volumes[1]], tmp_path / "m", params)
    short = read_curve(tmp_path / "m" / "loss_curve.tsv")
    more = train([volumes[0]], [volumes[1]], tmp_path / "m", {**params, "steps": 20})
    assert more["start_step"] == 10 and more["steps"] == 20
    rows = read_curve(tmp_path / "m" / "loss_curve.tsv")
    assert [int(r["step"]) for r in rows] == list(range(21)) and rows[:11] == short
    # with a constant schedule this is exactly the 20-step run
    train([volumes[0]], [volumes[1]], tmp_path / "once", {**params, "steps": 20})
    assert (tmp_path / "once" / "loss_curve.tsv").read_text() == (tmp_path / "m" / "loss_curve.tsv").read_text()


def test_changed_settings_start_afresh(tmp_path, volumes, caplog):
    params = {**TINY, "steps": 4, "validate_every": 2}
    train([volumes[0]], [volumes[1]], tmp_path / "m", params)
    with caplog.at_level(logging.WARNING, logger="dinopipe.train"):
        summary = train([volumes[0]], [volumes[1]], tmp_path / "m", {**params, "learning_rate": 1e-3})
    assert "settings differ in ['train_params.learning_rate']" in caplog.text
    assert summary["start_step"] == 0
    summary = train([volumes[0]], [volumes[1]], tmp_path / "m", {**params, "steps": 6, "resume": False})
    assert summary["start_step"] == 0


def _restamp(path: str, **changes) -> None:
    """Rewrite a store's ``dinopipe`` attributes as a rerun of its stage would (new values,
    new ``store_id``)."""
    group = zarr.open_group(path, mode="a")
    group.attrs["dinopipe"] = {**dict(group.attrs.get("dinopipe", {})), **changes}


@pytest.fixture
def stamped(tmp_path, volumes):
    """A copy of the module's volumes whose stores carry ids, as the stages write them."""
    import shutil

    copies = []
    for features, targets in volumes:
        pair = []
        for kind, path in (("features", features), ("targets", targets)):
            dest = tmp_path / "inputs" / kind / Path(path).name
            shutil.copytree(path, dest)
            _restamp(str(dest), store_id=f"{kind}-{Path(path).name}-1")
            pair.append(str(dest))
        copies.append(tuple(pair))
    return copies


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path / "checkpoint.pt", weights_only=True)["model"]


@pytest.mark.parametrize("change", ["targets", "features", "sheet", "rewritten store"])
def test_changed_inputs_retrain_from_step_0(tmp_path, stamped, caplog, change):
    """The stale-model bug: after the inputs changed, a rerun must not resume the old run."""
    params = {**TINY, "steps": 4, "validate_every": 2}
    (train_f, train_t), (val_f, val_t) = stamped
    train([(train_f, train_t)], [(val_f, val_t)], tmp_path / "m", params)
    before = _weights(tmp_path / "m")
    train_set, val_set = [(train_f, train_t)], [(val_f, val_t)]
    if change == "targets":  # e.g. targets.lsd_sigma_nm 64 -> 48
        affinities = zarr.open_array(f"{train_t}/affinities/s0", mode="r+")
        affinities[...] = 1 - affinities[...]
        _restamp(train_t, lsd_sigma=48.0, store_id="targets-2")
        expected = "inputs.train train_a.targets_attrs.lsd_sigma"
    elif change == "features":  # e.g. another stride
        signature = dict(read_image(train_f).attrs["signature"])
        features = zarr.open_array(f"{train_f}/s0", mode="r+")
        features[...] = -features[...]
        for path in (train_f, val_f):  # every volume's features are recomputed alike
            _restamp(path, signature={**signature, "stride": 8}, store_id=f"features-2-{path}")
        expected = "inputs.train train_a.features_signature.stride"
    elif change == "sheet":  # the validate volume becomes a second train volume
        train_set, val_set = [(train_f, train_t), (val_f, val_t)], []
        expected = "inputs.train val_a"
    else:  # same settings, but the store was written again (e.g. raw rewritten in place)
        _restamp(train_f, store_id="features-2")
        expected = "inputs.train train_a.features_id"
    with caplog.at_level(logging.WARNING, logger="dinopipe.train"):
        again = train(train_set, val_set, tmp_path / "m", params)
    assert again["start_step"] == 0 and again["steps"] == 4
    assert "not resuming" in caplog.text and expected in caplog.text
    after = _weights(tmp_path / "m")
    train(train_set, val_set, tmp_path / "fresh", params)
    fresh = _weights(tmp_path / "fresh")
    assert all(torch.equal(after[k], fresh[k]) for k in after)  # what a first run on these inputs gives
    if change != "rewritten store":  # the content changed, and so does the model
        assert any(not torch.equal(before[k], after[k]) for k in before)


def test_unchanged_inputs_with_more_steps_continue_bitwise(tmp_path, stamped):
    params = {**TINY, "steps": 4, "validate_every": 2, "lr_schedule": "constant"}
    train([stamped[0]], [stamped[1]], tmp_path / "m", params)
    # runtime-only loader settings may differ (num_threads too, but it changes CPU sums by ~1e-5)
    more = train([stamped[0]], [stamped[1]], tmp_path / "m", {**params, "steps": 8, "loader_workers": 1,
                                                               "prefetch": 1})
    assert more["start_step"] == 4
    train([stamped[0]], [stamped[1]], tmp_path / "once", {**params, "steps": 8})
    a, b = _weights(tmp_path / "m"), _weights(tmp_path / "once")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_early_stopping_keeps_the_best_model(tmp_path, volumes):
    params = {**TINY, "steps": 30, "validate_every": 2, "early_stopping_patience": 2,
              "early_stopping_min_delta": 100.0}  # nothing counts as an improvement
    summary = train([volumes[0]], [volumes[1]], tmp_path / "m", params)
    assert summary["stopped_early"] and summary["steps"] == 4
    assert summary["best_val_step"] == 0
    assert torch.load(tmp_path / "m" / "checkpoint.pt", weights_only=True)["step"] == 0
    assert int(read_curve(tmp_path / "m" / "loss_curve.tsv")[-1]["step"]) == 4
    again = train([volumes[0]], [volumes[1]], tmp_path / "m", params)  # a rerun stays stopped
    assert again["stopped_early"] and again["steps"] == 4


def test_raw_as_an_extra_input_channel(tmp_path, volumes):
    train([volumes[0]], [volumes[1]], tmp_path / "m", {**TINY, "steps": 2, "input_raw": True})
    config = json.loads((tmp_path / "m" / "model_config.json").read_text())
    assert config["input_raw"] is True and config["in_channels"] == 17 and config["feature_channels"] == 16
    assert "targets" in config["raw_source"] and "'raw'" in config["raw_source"]
    model, _ = load_model(tmp_path / "m")
    assert model.encoders[0][0].in_channels == 17


def test_unet_on_the_raw_alone(tmp_path, volumes):
    train([volumes[0]], [volumes[1]], tmp_path / "m",
          {**TINY, "steps": 2, "input_raw": True, "input_features": False})
    config = json.loads((tmp_path / "m" / "model_config.json").read_text())
    assert config["input_features"] is False and config["input_raw"] is True
    assert config["in_channels"] == 1 and config["feature_channels"] == 0
    model, _ = load_model(tmp_path / "m")
    assert model.encoders[0][0].in_channels == 1
    with pytest.raises(ValueError, match="input_features.*input_raw"):
        train([volumes[0]], [volumes[1]], tmp_path / "n", {**TINY, "steps": 2, "input_features": False})


def test_semantic_targets_with_class_weights(tmp_path, volumes):
    params = {**TINY, "steps": 4, "validate_every": 2, "target": "semantic", "loss": "cross_entropy",
              "class_weights": [0.5, 1.0, 2.0]}
    summary = train([volumes[0]], [volumes[1]], tmp_path / "m", params)
    config = json.loads((tmp_path / "m" / "model_config.json").read_text())
    assert config["target"] == "semantic" and config["num_classes"] == 3 and config["unet"]["out_channels"] == 3
    assert config["class_weights"] == [0.5, 1.0, 2.0]
    assert summary["best_val_loss"] > 0
    # a class model predicts class probabilities blockwise
    from dinopipe.io import read_image
    from dinopipe.predict import predict_volume

    predict_volume(volumes[1][0], tmp_path / "m", tmp_path / "p.zarr", block_shape=(16, 16, 16), device="cpu")
    probs = read_image(tmp_path / "p.zarr" / "classes").read()
    assert probs.shape == (3, 32, 32, 32) and not (tmp_path / "p.zarr" / "affinities").exists()
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    assert zarr.open_group(str(tmp_path / "p.zarr"), mode="r").attrs["dinopipe"]["target"] == "semantic"
    with pytest.raises(ValueError, match=r"one of \['cross_entropy', 'bce', .*\] for target 'semantic'"):
        resolve_train_params({"target": "semantic", "loss": "hinge"})
    # a sigmoid loss trains overlapping classes only: these targets hold exclusive ones
    with pytest.raises(ValueError, match="train.loss is 'bce' but the classes are exclusive"):
        train([volumes[0]], [volumes[1]], tmp_path / "m2", {**params, "loss": "bce", "class_weights": None})
    with pytest.raises(ValueError, match="needs target: semantic"):
        resolve_train_params({"loss": "cross_entropy"})


def test_without_validate_volumes_warns_and_leaves_val_empty(tmp_path, volumes, caplog):
    with caplog.at_level(logging.WARNING, logger="dinopipe.train"):
        summary = train([volumes[0]], [], tmp_path / "m", {**TINY, "steps": 3})
    assert "no validate volumes" in caplog.text
    rows = read_curve(tmp_path / "m" / "loss_curve.tsv")
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert all(r["val_loss"] == "" for r in rows)
    assert summary["best_val_loss"] is None
    assert torch.load(tmp_path / "m" / "checkpoint.pt", weights_only=True)["step"] == 3


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
    with pytest.raises(ValueError, match=r"unknown parameters \['alpha'\] for loss 'dice'"):
        resolve_train_params({"loss": "dice", "loss_params": {"alpha": 0.3}})
    with pytest.raises(ValueError, match="device"):
        resolve_train_params({"device": "tpu"})
    with pytest.raises(ValueError, match="autocast"):
        resolve_train_params({"autocast": "fp8"})
    assert resolve_train_params({"autocast": True})["autocast"] == "bf16"
    with pytest.raises(ValueError, match=r"unknown train.augment parameters \['mirror'\]"):
        resolve_train_params({"augment": {"mirror": True}})
    with pytest.raises(ValueError, match="early_stopping_patience"):
        resolve_train_params({"early_stopping_patience": 0})
    with pytest.raises(ValueError, match=r"volume train_a: crop_shape \[16, 64, 16\] is larger than the volume"):
        train([volumes[0]], [], tmp_path / "m", {**TINY, "crop_shape": [16, 64, 16]})
    with pytest.raises(ValueError, match="both train and validate volumes"):
        train([volumes[0]], [volumes[0]], tmp_path / "m", TINY)


def test_inconsistent_offsets_are_rejected(tmp_path, volumes):
    other = make_fake_volume(tmp_path, "two_offsets", shape=(16, 16, 16), offsets=[[1, 0, 0], [0, 1, 0]], seed=3)
    with pytest.raises(ValueError, match="volume two_offsets has affinity offsets"):
        train([volumes[0]], [other], tmp_path / "m", TINY)


def test_offsets_not_closed_under_augmentation_are_rejected(tmp_path):
    vol = make_fake_volume(tmp_path, "aniso", shape=(16, 16, 16), offsets=[[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 3, 0]])
    with pytest.raises(ValueError, match=r"affinity offset \[0, 3, 0\] becomes \[0, 0, 3\]"):
        train([vol], [], tmp_path / "m", TINY)
    train([vol], [], tmp_path / "m", {**TINY, "steps": 1, "augment": {"transpose": False, "rot90": False}})


DEMO = {"seed": 0, "label_shape": [16, 48, 48], "label_voxel_size": [16, 16, 16], "raw_factor": [2, 2, 2]}


class _ConstantModel(torch.nn.Module):
    """Predicts the same values everywhere: per affinity channel the logit of the boundary-weighted,
    masked mean affinity of a targets store, per LSD channel the logit of its masked mean LSD (the
    constants minimising the weighted BCE and the MSE on that store)."""

    def __init__(self, targets: str) -> None:
        super().__init__()
        t = Path(targets)
        affs, lsds = read_image(t / "affinities").read(), read_image(t / "lsds").read()
        mask = read_image(t / "mask").read().astype(np.float64)
        weight = read_image(t / "boundary_weights").read() * mask
        p = (affs * weight).sum(axis=(1, 2, 3)) / weight.sum()
        mu = (lsds * mask).sum(axis=(1, 2, 3)) / mask.sum()
        logits = np.log(np.concatenate([p, mu]) / (1 - np.concatenate([p, mu])))
        self.register_buffer("logits", torch.tensor(logits, dtype=torch.float32).view(1, -1, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1, *x.shape[2:]).clone()


@pytest.mark.slow
def test_a_short_run_on_the_demo_lowers_the_validation_loss(tmp_path):
    """Real demo volumes (synthetic EM, tiny ViT features, real targets): learning is real."""
    from dinopipe.sheet import Volume
    from dinopipe.stages import run_demo_data, run_features, run_targets

    pairs = {}
    for name in ("train_0", "validate_0"):
        run_demo_data(name, tmp_path / f"{name}.zarr", **DEMO)
        volume = Volume(name, str(tmp_path / f"{name}.zarr" / "raw"), str(tmp_path / f"{name}.zarr" / "labels"), "train")
        run_features(volume, tmp_path / "features" / f"{name}.zarr", {"backbone": "tiny-vit", "planes": ["xy"]}, {})
        run_targets(volume, tmp_path / "targets" / f"{name}.zarr", {}, {})
        pairs[name] = (str(tmp_path / "features" / f"{name}.zarr"), str(tmp_path / "targets" / f"{name}.zarr"))
    params = {**TINY, "steps": 60, "crop_shape": [16, 32, 32], "learning_rate": 3e-3, "lr_schedule": "constant",
              "validate_every": 20, "validation_crops": 4, "unet": {"levels": 1, "base_channels": 8}}
    summary = train([pairs["train_0"]], [pairs["validate_0"]], tmp_path / "m", params)
    val = [float(r["val_loss"]) for r in read_curve(tmp_path / "m" / "loss_curve.tsv") if r["val_loss"]]
    assert len(val) == 4
    # the bar: the best input-independent prediction, i.e. per channel the train volume's (weighted)
    # mean affinity and mean LSD everywhere; beating it means the model uses its inputs
    constant = validation_loss(_ConstantModel(pairs["train_0"][1]), [pairs["validate_0"]], params)
    assert summary["best_val_loss"] < constant < val[0], (val, constant)
    assert val[-1] < val[1] < val[0], val


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
        # the fake features encode the un-augmented affinities channel by channel: not augmentation-invariant
        "augment": {"flip": False, "rot90": False, "transpose": False},
    }
    summary = train([train_vol], [val_vol], tmp_path / "m", params)
    rows = read_curve(tmp_path / "m" / "loss_curve.tsv")
    val = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    assert len(val) == 4  # steps 0, 50, 100, 150
    assert val[-1] < 0.25 * val[0], val
    assert summary["best_val_loss"] < 0.25 * val[0]


@pytest.mark.parametrize("masked_in", [0, 5])
def test_empty_or_nearly_empty_mask_is_refused_before_training(tmp_path, masked_in):
    good = make_fake_volume(tmp_path, "good")
    bad = make_fake_volume(tmp_path, "empty", seed=1)
    mask = np.zeros((32, 32, 32), np.uint8)
    mask.flat[:masked_in] = 1
    zarr.open_array(str(Path(bad[1]) / "mask" / "s0"), mode="r+")[...] = mask
    # a 16^3 crop with min_mask_fraction 0.1 needs 410 labelled voxels
    with pytest.raises(ValueError, match=rf"train volume\(s\) with an empty or nearly empty mask \(empty: "
                                         rf"{masked_in} labelled voxel\(s\) in .*empty.zarr/mask\).*at least 410"):
        train([good, bad], [], tmp_path / "m", TINY)
    with pytest.raises(ValueError, match=r"validate volume\(s\) with an empty or nearly empty mask \(empty:"):
        train([good], [bad], tmp_path / "m", TINY)
    assert not (tmp_path / "m" / "checkpoint.pt").exists()


def test_validation_scores_boundary_edges_as_much_as_inside_edges():
    """An output saying "same object" everywhere: F1 on the (mostly positive) edges would be
    high, balanced accuracy is 0.5 on every offset; a perfect output scores 1."""
    from dinopipe.evaluate import balanced_accuracy
    from dinopipe.objective import Objective

    labels = np.ones((1, 8, 8, 8), dtype=np.int64)
    labels[..., 6:] = 2  # one boundary plane across x
    affs = torch.ones((1, 3, 8, 8, 8))
    affs[:, 2, :, :, 5] = 0  # x edges crossing the boundary
    affs[:, 0, -1], affs[:, 1, :, -1], affs[:, 2, :, :, -1] = 0, 0, 0  # edges leaving the volume
    batch = {"affinities": affs, "mask": torch.ones((1, 1, 8, 8, 8))}
    objective = Objective(resolve_train_params({}), 3, None, torch.device("cpu"))
    always = torch.full((1, 3, 8, 8, 8), 5.0)  # logits > 0: affinity 1 everywhere
    counts = objective.confusion(always, batch)
    # x: 8*8*8 edges, 8*8 crossing the boundary + 8*8 leaving the volume are 0
    assert counts[2].tolist() == [8 * 8 * 6, 8 * 8 * 2, 0, 0]
    assert balanced_accuracy(counts).tolist() == [0.5, 0.5, 0.5]
    perfect = (affs * 10 - 5)
    assert balanced_accuracy(objective.confusion(perfect, batch)).tolist() == [1.0, 1.0, 1.0]
    # masked-out voxels do not count
    batch["mask"][..., 4:] = 0
    assert objective.confusion(always, batch)[2].tolist() == [8 * 8 * 4, 0, 0, 0]


def test_raw_intensity_augmentation_changes_the_raw_channel_only_in_training():
    from dinopipe.objective import Objective

    p = resolve_train_params({"input_raw": True, "augment": {"raw_contrast": 0.5, "raw_noise": 0.1}})
    objective = Objective(p, 3, None, torch.device("cpu"))
    batch = {"features": torch.rand(2, 4, 4, 4, 4), "raw": torch.rand(2, 1, 4, 4, 4)}
    plain = objective.inputs(batch)  # validation and prediction: no generator, no augmentation
    assert torch.equal(plain, torch.cat([batch["features"], batch["raw"]], 1))
    augmented = objective.inputs(batch, torch.Generator().manual_seed(0))
    assert torch.equal(augmented[:, :4], batch["features"]) and not torch.equal(augmented[:, 4:], batch["raw"])
    raw_only = Objective({**p, "input_features": False}, 3, None, torch.device("cpu"))
    assert torch.equal(raw_only.inputs(batch, torch.Generator().manual_seed(0)), augmented[:, 4:])


def test_boundary_centred_crops_change_the_training_batches(tmp_path, volumes):
    with pytest.raises(ValueError, match="sample_boundary"):
        resolve_train_params({"sample_boundary": 1.5})
    runs = {}
    for fraction in (0.0, 1.0):
        out = tmp_path / str(fraction)
        train([volumes[0]], [volumes[1]], out, {**TINY, "steps": 3, "validate_every": 3, "sample_boundary": fraction})
        runs[fraction] = [r["train_loss"] for r in read_curve(out / "loss_curve.tsv")[1:]]
    assert runs[0.0] != runs[1.0]
