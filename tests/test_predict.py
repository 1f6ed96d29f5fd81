"""Tests for dinopipe.predict: blockwise prediction, model loading, errors."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr

from dinopipe.io import FEATURE_ORDER, read_image, write_image, write_json
from dinopipe.checkpoint import build_model_config, load_model, save_checkpoint
from dinopipe.predict import FeatureReader, _block_starts, _BlockStager, predict_blocks, predict_volume
from dinopipe.unet import UNet3D, UNetConfig, output_channels

OFFSETS = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [2, 0, 0]]
VOXEL_SIZE = (8.0, 4.0, 4.0)
TRANSLATION = (40.0, -6.0, 2.0)


def make_features(path: Path, shape: tuple[int, int, int], channels: int, seed: int = 0, **layout: Any) -> str:
    """A random (C, z, y, x) float16 feature image with a signature (``layout``: chunks,
    compress, order for :func:`write_image`)."""
    data = np.random.default_rng(seed).normal(size=(channels, *shape)).astype(np.float16)
    write_image(path, data, VOXEL_SIZE, TRANSLATION, channel_axis=True, attrs={"signature": {"model_id": "tiny"}},
                **layout)
    return str(path)


def make_model_dir(path: Path, channels: int, levels: int, norm: str | None, lsds: bool = True, seed: int = 0) -> Path:
    """A model folder as train() writes it, with random weights (and batch norm statistics)."""
    torch.manual_seed(seed)
    config = UNetConfig(
        in_channels=channels,
        out_channels=output_channels(len(OFFSETS), lsds),
        levels=levels,
        base_channels=4,
        norm=norm,
    )
    model = UNet3D(config)
    for module in model.modules():  # non-trivial running statistics for eval-mode batch norm
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    path.mkdir(parents=True)
    save_checkpoint(path / "checkpoint.pt", model, None, step=0)
    write_json(path / "model_config.json", build_model_config(config, OFFSETS, lsds, {"model_id": "tiny"}))
    return path


@pytest.mark.parametrize(("levels", "norm"), [(1, "batch"), (2, None)])
def test_blockwise_equals_whole_volume(tmp_path, levels, norm):
    shape = (20, 26, 30)  # not a multiple of the block shape on any axis
    features = make_features(tmp_path / "features.zarr", shape, channels=5)
    model_dir = make_model_dir(tmp_path / "model", channels=5, levels=levels, norm=norm)
    predict_volume(features, model_dir, tmp_path / "whole.zarr", block_shape=(64, 64, 64), device="cpu")
    predict_volume(features, model_dir, tmp_path / "blocks.zarr", block_shape=(8, 12, 16), device="cpu", batch_size=3)
    for name, channels in (("affinities", 4), ("lsds", 10)):
        whole = read_image(tmp_path / "whole.zarr" / name)
        blocks = read_image(tmp_path / "blocks.zarr" / name)
        assert whole.array.shape == (channels, *shape)
        assert whole.array.dtype == np.float32
        assert whole.geometry.voxel_size == VOXEL_SIZE and whole.geometry.translation == TRANSLATION
        a, b = whole.read(), blocks.read()
        assert np.all((a >= 0) & (a <= 1))
        assert a.std() > 1e-3  # not a constant output
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    attrs = zarr.open_group(str(tmp_path / "blocks.zarr")).attrs["dinopipe"]
    assert attrs["offsets"] == OFFSETS
    assert attrs["block_shape"] == [8, 12, 16]


def test_channel_fastest_feature_chunks_predict_the_same(tmp_path):
    """Features stored as the features stage stores them (uncompressed, order "F", several
    chunks per block) give the same prediction as compressed C-ordered ones."""
    shape = (20, 26, 30)
    plain = make_features(tmp_path / "c.zarr", shape, channels=5)
    stage_like = make_features(tmp_path / "f.zarr", shape, channels=5, chunks=(5, 8, 8, 8), compress=False,
                               order=FEATURE_ORDER)
    assert zarr.open_array(str(tmp_path / "f.zarr" / "s0")).metadata.order == "F"
    model_dir = make_model_dir(tmp_path / "model", channels=5, levels=1, norm="batch")
    predict_volume(plain, model_dir, tmp_path / "a.zarr", block_shape=(64, 64, 64), device="cpu")
    predict_volume(stage_like, model_dir, tmp_path / "b.zarr", block_shape=(8, 12, 16), device="cpu", batch_size=2)
    for name in ("affinities", "lsds"):
        np.testing.assert_allclose(read_image(tmp_path / "a.zarr" / name).read(),
                                   read_image(tmp_path / "b.zarr" / name).read(), atol=1e-5, rtol=0)


def _files(path: Path) -> int:
    return sum(1 for f in path.rglob("*") if f.is_file())


@pytest.mark.parametrize("batch_size", [1, 2])
def test_sharded_features_and_predictions_are_bitwise_the_unsharded_ones(tmp_path, batch_size):
    """Sharded stores (Zarr v3, OME-NGFF 0.5) on both sides: features read from shards and
    predictions written shard by shard (blocks in another order, an odd number of them)
    equal the unsharded run bit for bit, in one file per shard."""
    shape = (20, 26, 30)
    plain = make_features(tmp_path / "c.zarr", shape, channels=5, chunks=(5, 8, 8, 8), compress=False,
                          order=FEATURE_ORDER)
    sharded = make_features(tmp_path / "s.zarr", shape, channels=5, chunks=(5, 8, 8, 8), compress=False,
                            order=FEATURE_ORDER, shards=(5, 16, 16, 16))
    model_dir = make_model_dir(tmp_path / "model", channels=5, levels=1, norm="batch")
    kwargs = {"block_shape": (8, 12, 12), "device": "cpu", "batch_size": batch_size}  # 3 x 3 x 3 blocks
    predict_volume(plain, model_dir, tmp_path / "a.zarr", **kwargs)
    predict_volume(sharded, model_dir, tmp_path / "b.zarr", shard_shape=20, **kwargs)
    for name in ("affinities", "lsds"):
        a, b = read_image(tmp_path / "a.zarr" / name), read_image(tmp_path / "b.zarr" / name)
        assert (a.format, b.format) == ("ome-ngff 0.4", "ome-ngff 0.5")
        assert b.array.shards == (b.array.shape[0], 24, 24, 24)  # 20 rounded up to whole blocks
        np.testing.assert_array_equal(a.read(), b.read())
    # two images of 27 chunk files (+ 4 metadata files each, 2 of the root) vs 1 x 2 x 2 shard
    # files (+ 2 zarr.json each, 1 of the root)
    assert (_files(tmp_path / "a.zarr"), _files(tmp_path / "b.zarr")) == (2 + 2 * (4 + 27), 1 + 2 * (2 + 4))
    assert zarr.open_group(str(tmp_path / "b.zarr")).attrs["dinopipe"]["offsets"] == OFFSETS


@pytest.mark.parametrize("convert_on_host", [True, False])
def test_staged_batches_equal_padded_blocks(tmp_path, convert_on_host):
    """The background reader's batches (either conversion path, last batch partial) are
    the reflect-padded blocks of the volume, float32, channels first (x: the halo is
    longer than the volume, so reflection repeats); the last, partial batch is filled up
    to the batch size (the network always sees batches of one size)."""
    shape, block, halo = (12, 14, 3), (8, 8, 8), 4
    features = read_image(make_features(tmp_path / "f.zarr", shape, channels=3, chunks=(3, 8, 8, 8),
                                        compress=False, order=FEATURE_ORDER))
    reader = FeatureReader(features)
    dense = features.read()
    starts = list(_block_starts(shape, block))
    assert len(starts) == 4
    seen = []
    with _BlockStager([reader], shape, block, halo, 3, torch.device("cpu"), convert_on_host=convert_on_host) as stager:
        for batch in stager:
            x = stager.to_device()
            assert x.dtype == torch.float32 and x.is_contiguous() and x.shape == (3, 3, 16, 16, 16)
            for i, start in enumerate(batch):
                window = tuple(slice(s - halo, s + b + halo) for s, b in zip(start, block, strict=True))
                lo = [max(-w.start, 0) for w in window]
                hi = [max(w.stop - n, 0) for w, n in zip(window, shape, strict=True)]
                inside = dense[(slice(None), *(slice(max(w.start, 0), min(w.stop, n))
                                               for w, n in zip(window, shape, strict=True)))]
                expected = np.pad(inside, [(0, 0), *zip(lo, hi, strict=True)], mode="reflect")
                np.testing.assert_array_equal(x[i].numpy(), expected.astype(np.float32))
                seen.append(start)
    assert seen == starts
    assert stager.read_s > 0


def test_reader_errors_reach_the_caller_and_leave_no_output(tmp_path):
    features = make_features(tmp_path / "features.zarr", (24, 8, 8), channels=3)
    model_dir = make_model_dir(tmp_path / "model", channels=3, levels=1, norm=None)
    model, config = load_model(model_dir)
    image = read_image(features)

    class Failing(FeatureReader):
        calls = 0

        def read_into(self, window, out):
            Failing.calls += 1
            if Failing.calls == 2:
                raise ValueError("broken chunk in block 2")
            super().read_into(window, out)

    with pytest.raises(ValueError, match="broken chunk in block 2"):
        predict_blocks([Failing(image)], image.geometry, model, config, tmp_path / "p.zarr", block_shape=(8, 8, 8),
                       device="cpu")
    assert not (tmp_path / "p.zarr").exists()
    assert not any(t.name == "predict-reader" for t in threading.enumerate())


def test_block_shape_is_rounded_to_the_pooling_grid(tmp_path):
    features = make_features(tmp_path / "features.zarr", (12, 12, 12), channels=3)
    model_dir = make_model_dir(tmp_path / "model", channels=3, levels=2, norm=None, lsds=False)
    predict_volume(features, model_dir, tmp_path / "p.zarr", block_shape=(5, 6, 100), device="cpu")
    root = zarr.open_group(str(tmp_path / "p.zarr"))
    assert root.attrs["dinopipe"]["block_shape"] == [8, 8, 12]
    assert root.attrs["dinopipe"]["lsds"] is False
    assert "lsds" not in root  # a model without LSDs writes affinities only
    assert read_image(tmp_path / "p.zarr" / "affinities").array.shape == (4, 12, 12, 12)


def test_channel_mismatch_names_paths_and_counts(tmp_path):
    features = make_features(tmp_path / "features.zarr", (8, 8, 8), channels=6)
    model_dir = make_model_dir(tmp_path / "model", channels=5, levels=1, norm=None)
    message = r"features .*features\.zarr have 6 channels but the model in .*model expects 5"
    with pytest.raises(ValueError, match=message):
        predict_volume(features, model_dir, tmp_path / "p.zarr", device="cpu")
    assert not (tmp_path / "p.zarr").exists()


def test_load_model(tmp_path):
    model_dir = make_model_dir(tmp_path / "model", channels=5, levels=1, norm="batch")
    model, config = load_model(model_dir)
    assert not model.training
    assert config["offsets"] == OFFSETS and config["in_channels"] == 5
    with pytest.raises(FileNotFoundError, match="no model_config.json in model folder"):
        load_model(tmp_path)
    (tmp_path / "model" / "checkpoint.pt").unlink()
    with pytest.raises(FileNotFoundError, match="no checkpoint.pt in model folder"):
        load_model(model_dir)


def test_bad_arguments(tmp_path):
    features = make_features(tmp_path / "features.zarr", (8, 8, 8), channels=5)
    model_dir = make_model_dir(tmp_path / "model", channels=5, levels=1, norm=None)
    with pytest.raises(ValueError, match="block_shape"):
        predict_volume(features, model_dir, tmp_path / "p.zarr", block_shape=(8, 8), device="cpu")
    with pytest.raises(ValueError, match="batch_size"):
        predict_volume(features, model_dir, tmp_path / "p.zarr", batch_size=0, device="cpu")


# --- end to end from raw, and models that also take the raw image ----------------------

DEMO = {"seed": 0, "label_shape": [8, 32, 32], "label_voxel_size": [16, 16, 16], "raw_factor": [2, 2, 2]}
FEATURE_CONFIG = {"backbone": "tiny-vit", "planes": ["xy", "yz"]}


@pytest.fixture(scope="module")
def demo_volume(tmp_path_factory):
    """A demo volume with its cached (whole-volume) features and targets."""
    from dinopipe.sheet import Volume
    from dinopipe.stages import run_demo_data, run_features, run_targets

    root = tmp_path_factory.mktemp("demo")
    run_demo_data("v", root / "v.zarr", **DEMO)
    volume = Volume("v", str(root / "v.zarr" / "raw"), str(root / "v.zarr" / "labels"), "predict")
    attrs = run_features(volume, root / "features.zarr", FEATURE_CONFIG, {})
    run_targets(volume, root / "targets.zarr", {}, {})
    return volume, root, attrs["signature"]


def _demo_model(path: Path, channels: int, signature: dict, input_raw: bool = False,
                input_features: bool = True) -> Path:
    torch.manual_seed(1)
    in_channels = (channels if input_features else 0) + int(input_raw)
    config = UNetConfig(in_channels=in_channels, out_channels=output_channels(len(OFFSETS), True),
                        levels=1, base_channels=4, norm=None)
    path.mkdir(parents=True)
    save_checkpoint(path / "checkpoint.pt", UNet3D(config), None, step=0)
    write_json(path / "model_config.json",
               build_model_config(config, OFFSETS, True, signature, input_raw=input_raw,
                                  input_features=input_features))
    return path


def test_predict_from_raw_matches_cached_features(demo_volume, tmp_path):
    from dinopipe.predict import predict_from_raw

    volume, root, signature = demo_volume
    channels = int(read_image(root / "features.zarr").array.shape[0])
    model_dir = _demo_model(tmp_path / "model", channels, signature)
    predict_volume(root / "features.zarr", model_dir, tmp_path / "cached.zarr", block_shape=(8, 16, 16), device="cpu")
    # One block covering the volume: the backbone sees exactly what whole-volume extraction saw.
    whole = predict_from_raw(volume, model_dir, tmp_path / "raw_whole.zarr", FEATURE_CONFIG, {},
                             block_shape=(64, 64, 64), device="cpu")
    blocks = predict_from_raw(volume, model_dir, tmp_path / "raw_blocks.zarr", FEATURE_CONFIG, {},
                              block_shape=(8, 16, 16), device="cpu", feature_halo=16)
    assert (whole["blocks"], blocks["blocks"]) == (1, 4)
    cached = read_image(tmp_path / "cached.zarr" / "affinities")
    a = cached.read()
    b = read_image(tmp_path / "raw_whole.zarr" / "affinities").read()
    c = read_image(tmp_path / "raw_blocks.zarr" / "affinities").read()
    np.testing.assert_allclose(a, b, atol=5e-3)  # only the float16 rounding of cached features differs
    assert np.abs(a - c).mean() < 0.02  # per-block features: the ViT attends within the grown block only
    assert cached.geometry == read_image(tmp_path / "raw_blocks.zarr" / "affinities").geometry
    attrs = zarr.open_group(str(tmp_path / "raw_blocks.zarr")).attrs["dinopipe"]
    assert attrs["source"] == "raw" and attrs["feature_halo"] == 16
    # A mismatching backbone is a clear error.
    with pytest.raises(ValueError, match="differ in signature key"):
        predict_from_raw(volume, model_dir, tmp_path / "bad.zarr", {**FEATURE_CONFIG, "seed": 3}, {}, device="cpu")


def test_input_raw_models_get_the_raw_channel(demo_volume, tmp_path):
    from dinopipe.sources import RawOnGridReader, open_sources

    volume, root, signature = demo_volume
    channels = int(read_image(root / "features.zarr").array.shape[0])
    model_dir = _demo_model(tmp_path / "model", channels, signature, input_raw=True)
    with pytest.raises(ValueError, match="input_raw"):
        predict_volume(root / "features.zarr", model_dir, tmp_path / "p.zarr", device="cpu")
    stats = predict_volume(root / "features.zarr", model_dir, tmp_path / "p.zarr", block_shape=(8, 16, 16),
                           device="cpu", volume=volume, data={})
    assert stats["blocks"] == 4
    assert zarr.open_group(str(tmp_path / "p.zarr")).attrs["dinopipe"]["input_raw"] is True
    # The raw channel read per window equals the targets' raw image (what training saw).
    src = open_sources(volume)
    reader = RawOnGridReader(src.raw.array, src.raw.geometry, src.grid)
    target_raw = read_image(root / "targets.zarr" / "raw").read()
    window = (slice(2, 7), slice(5, 20), slice(0, 32))
    np.testing.assert_allclose(reader.read(window)[0], target_raw[window], atol=1e-5)
    # A raw-only volume (the CLI's --features F --raw R) gives the same raw channel; raw that
    # does not cover the features' grid is refused.
    from dataclasses import replace

    from dinopipe.predict import _raw_reader_for

    raw_only = replace(volume, labels=None, role="predict")
    predict_volume(root / "features.zarr", model_dir, tmp_path / "r.zarr", block_shape=(8, 16, 16), device="cpu",
                   volume=raw_only, data={})
    np.testing.assert_array_equal(read_image(tmp_path / "r.zarr" / "affinities").read(),
                                  read_image(tmp_path / "p.zarr" / "affinities").read())
    grid = read_image(root / "features.zarr").geometry
    moved = replace(grid, translation=(grid.translation[0] + 1000.0, *grid.translation[1:]))
    with pytest.raises(ValueError, match="raw channel must come from the raw the features were computed from"):
        _raw_reader_for(raw_only, {}, moved, str(model_dir))
    # Without input_raw in the config, the extra channel is a channel mismatch.
    other = _demo_model(tmp_path / "model2", channels + 1, signature)
    with pytest.raises(ValueError, match=f"have {channels} channels but the model .* expects {channels + 1}"):
        predict_volume(root / "features.zarr", other, tmp_path / "q.zarr", device="cpu")


def test_raw_only_models_read_no_features(demo_volume, tmp_path):
    from dinopipe.predict import predict_from_raw

    volume, root, signature = demo_volume
    channels = int(read_image(root / "features.zarr").array.shape[0])
    model_dir = _demo_model(tmp_path / "model", channels, signature, input_raw=True, input_features=False)
    predict_volume(root / "features.zarr", model_dir, tmp_path / "cached.zarr", block_shape=(8, 16, 16),
                   device="cpu", volume=volume, data={})
    # from raw: no backbone is run, so a different backbone config changes nothing
    predict_from_raw(volume, model_dir, tmp_path / "raw.zarr", {**FEATURE_CONFIG, "seed": 3}, {},
                     block_shape=(8, 16, 16), device="cpu")
    a = read_image(tmp_path / "cached.zarr" / "affinities").read()
    np.testing.assert_array_equal(a, read_image(tmp_path / "raw.zarr" / "affinities").read())
    # the output is the model on the raw alone: run it on the whole targets' raw, reflected at the
    # faces by the halo (as prediction pads), and compare
    from dinopipe.unet import receptive_field_halo

    model, _ = load_model(model_dir)
    halo = receptive_field_halo(model.config)
    raw = read_image(root / "targets.zarr" / "raw").read()
    pad = -(-halo // 2) * 2
    padded = torch.from_numpy(np.pad(raw, pad, mode="reflect"))[None, None]
    with torch.no_grad():
        whole = torch.sigmoid(model(padded)[0, : len(OFFSETS)]).numpy()[:, pad:-pad, pad:-pad, pad:-pad]
    np.testing.assert_allclose(a, whole, atol=1e-4)
