"""The per-volume stages outside Snakemake: demo data, features (whole and blockwise), targets, metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from dinopipe import io
from dinopipe.sheet import Volume
from dinopipe.stages import check_feature_signatures, run_demo_data, run_features, run_metadata, run_targets

DEMO = {"seed": 0, "label_shape": [8, 32, 32], "label_voxel_size": [16, 16, 16], "raw_factor": [2, 2, 2]}
FEATURES = {"backbone": "tiny-vit", "planes": ["xy", "yz"]}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    run_demo_data("v", root / "v.zarr", **DEMO)
    return root


def _volume(demo):
    return Volume("v", str(demo / "v.zarr" / "raw"), str(demo / "v.zarr" / "labels"), "train")


def test_demo_store_is_a_two_scale_pyramid(demo):
    assert io.multiscale_levels(demo / "v.zarr" / "raw") == [("s0", (8.0, 8.0, 8.0)), ("s1", (16.0, 16.0, 16.0))]
    labels = io.read_image(demo / "v.zarr" / "labels")
    assert labels.geometry.shape == (8, 32, 32) and labels.array.dtype == np.uint64
    # the raw s1 voxel centres coincide with the label voxel centres
    assert io.read_image(demo / "v.zarr" / "raw", "s1").geometry.translation == labels.geometry.translation


def _peak_rss_mb_from_proc() -> float:
    """The process's peak resident set size (VmHWM) in MB, read from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise AssertionError("no VmHWM in /proc/self/status")


def test_features_whole_and_blockwise_agree_and_record_provenance(demo, tmp_path):
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs /proc/self/status (Linux) to read the peak RSS independently")
    held = np.ones(64 * 2**20, np.uint8)  # 64 MB resident while the stage runs
    before = _peak_rss_mb_from_proc()
    whole = run_features(_volume(demo), tmp_path / "whole.zarr", FEATURES, {})
    after = _peak_rss_mb_from_proc()
    # the recorded peak is the process's peak, in MB: between the peaks read before and after,
    # and at least the array held throughout
    assert before - 1 <= whole["peak_rss_mb"] <= after + 1
    assert whole["peak_rss_mb"] >= held.nbytes / 2**20
    del held
    blocked = run_features(_volume(demo), tmp_path / "blocked.zarr", {**FEATURES, "block_shape": [4, 32, 32]}, {})
    a = io.read_image(tmp_path / "whole.zarr").read()
    b = io.read_image(tmp_path / "blocked.zarr").read()
    # xy is exact across z-blocks; yz slices are cut at the block faces (halo 16 covers all of z here)
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=1e-2)
    assert whole["blocks"]["count"] == 1 and blocked["blocks"]["count"] == 2
    assert set(whole["timings"]["planes"]) == {"xy", "yz"}
    assert whole["signature"]["image_size"] == {"xy": [64, 64], "yz": [16, 64]}
    stored = io.read_image(tmp_path / "whole.zarr").attrs
    assert stored["signature"] == whole["signature"]
    check_feature_signatures([tmp_path / "whole.zarr", tmp_path / "blocked.zarr"], FEATURES)
    with pytest.raises(ValueError, match="signature key 'planes'"):
        check_feature_signatures([tmp_path / "whole.zarr"], {**FEATURES, "planes": ["xy"]})


@pytest.mark.parametrize("block_shape", [None, [4, 24, 32]])
def test_sharded_features_are_bitwise_the_unsharded_ones(demo, tmp_path, block_shape):
    """features.shard_shape changes the files, not the values: whole volume, and blockwise
    with blocks that are not whole shards (the writer buffers the shard until it is complete)."""
    features = {**FEATURES, "block_shape": block_shape}
    run_features(_volume(demo), tmp_path / "plain.zarr", features, {})
    attrs = run_features(_volume(demo), tmp_path / "sharded.zarr", {**features, "shard_shape": 32}, {})
    plain, sharded = io.read_image(tmp_path / "plain.zarr"), io.read_image(tmp_path / "sharded.zarr")
    assert (plain.format, sharded.format) == ("ome-ngff 0.4", "ome-ngff 0.5")
    # 8 x 32 x 32 voxels in chunks of (8,) 16 x 16: 32^3 shards capped at the chunks covering z
    assert sharded.array.shards == (plain.array.shape[0], 8, 32, 32)
    np.testing.assert_array_equal(plain.read(), sharded.read())
    assert sharded.attrs["signature"] == attrs["signature"]
    check_feature_signatures([tmp_path / "plain.zarr", tmp_path / "sharded.zarr"], FEATURES)
    def data_files(path: Path) -> list[str]:
        return [f.name for f in (path / "s0").rglob("*") if f.is_file() and f.name[0].isdigit()]

    assert (len(data_files(tmp_path / "plain.zarr")), len(data_files(tmp_path / "sharded.zarr"))) == (4, 1)
    with pytest.raises(ValueError, match="features.shard_shape must be a positive integer"):
        run_features(_volume(demo), tmp_path / "bad.zarr", {**features, "shard_shape": 0}, {})


def test_targets_and_metadata(demo, tmp_path):
    vol = _volume(demo)
    features = run_features(vol, tmp_path / "f.zarr", FEATURES, {})
    attrs = run_targets(vol, tmp_path / "t.zarr", {"lsd_sigma_nm": 32}, {})
    assert attrs["lsd_sigma_nm"] == 32 and attrs["offsets"][0] == [1, 0, 0]
    raw = io.read_image(tmp_path / "t.zarr" / "raw").read()
    assert raw.shape == (8, 32, 32) and 0 <= raw.min() and raw.max() <= 1
    with pytest.raises(ValueError, match="unknown key.*'lsd_sigma'"):
        run_targets(vol, tmp_path / "t2.zarr", {"lsd_sigma": 3}, {})
    assert not (tmp_path / "t2.zarr").exists()
    meta = run_metadata(vol, tmp_path / "f.zarr", tmp_path / "t.zarr", tmp_path / "m.json", {"a": 1})
    assert json.loads((tmp_path / "m.json").read_text())["config_sha256"] == meta["config_sha256"]
    assert meta["targets"]["arrays"]["lsds"] == {"shape": [10, 8, 32, 32], "dtype": "float16"}
    assert meta["labels"]["n_ids"] == len(np.unique(io.read_image(tmp_path / "t.zarr" / "labels").read())) - 1
    assert meta["features"]["bytes"] > 0
    assert meta["features"]["peak_rss_mb"] == features["peak_rss_mb"] and meta["features"]["blocks"]["count"] == 1
    assert set(meta["features"]["timings"]["planes"]["xy"]) >= {"prepare_s", "backbone_s", "resample_s"}


def test_targets_need_labels(demo, tmp_path):
    vol = Volume("v", str(demo / "v.zarr" / "raw"), None, "predict")
    with pytest.raises(ValueError, match="volume 'v' has no labels"):
        run_targets(vol, tmp_path / "t.zarr", {}, {})


def test_all_zero_labels_are_an_error(tmp_path):
    io.write_image(tmp_path / "r.zarr", np.ones((8, 8, 8), np.uint8), (8, 8, 8), (4, 4, 4))
    io.write_image(tmp_path / "l.zarr", np.zeros((4, 4, 4), np.uint64), (16, 16, 16), (8, 8, 8))
    vol = Volume("z", str(tmp_path / "r.zarr"), str(tmp_path / "l.zarr"), "train")
    with pytest.raises(ValueError, match="volume 'z': labels .* are all zero"):
        run_targets(vol, tmp_path / "t.zarr", {}, {})
    assert not (tmp_path / "t.zarr").exists()
    assert zarr.open_group(str(tmp_path / "r.zarr"), mode="r")  # inputs untouched


def _signed_volume(tmp_path, labels):
    io.write_image(tmp_path / "r.zarr", np.random.default_rng(0).integers(0, 255, (8, 8, 8)).astype(np.uint8),
                   (8, 8, 8), (4, 4, 4))
    io.write_image(tmp_path / "l.zarr", labels, (16, 16, 16), (8, 8, 8))
    return Volume("s", str(tmp_path / "r.zarr"), str(tmp_path / "l.zarr"), "train")


def test_signed_labels_minus_one_unlabelled(tmp_path):
    labels = np.full((4, 4, 4), 3, np.int32)
    labels[:, :, 2:] = 4
    labels[:2] = -1  # not annotated
    vol = _signed_volume(tmp_path, labels)
    # not listed: refused, never cast to 2**64 - 1 (which made the unlabelled region one big cell)
    with pytest.raises(ValueError, match=r"volume 's': labels .*l.zarr contains negative ids \(-1\).*"
                                         r"targets.unlabelled_ids"):
        run_targets(vol, tmp_path / "t.zarr", {}, {})
    assert not (tmp_path / "t.zarr").exists()
    run_targets(vol, tmp_path / "t.zarr", {"unlabelled_ids": [-1], "offsets": [[1, 0, 0], [0, 0, 1]]}, {})
    stored = io.read_image(tmp_path / "t.zarr" / "labels").read()
    assert stored.dtype == np.uint64 and stored.max() == 4 and (stored[:2] == 0).all()
    mask = io.read_image(tmp_path / "t.zarr" / "mask").read()
    np.testing.assert_array_equal(mask[:, 0, 0], [0, 0, 1, 1])
    affs = io.read_image(tmp_path / "t.zarr" / "affinities").read()
    assert not affs[:, :2].any()  # no object inside the unlabelled region
    assert affs[1, 2, 0, 0] == 1 and affs[1, 2, 0, 1] == 0  # 3|3 joined, 3|4 cut


def test_targets_with_classes_write_the_class_image(tmp_path):
    labels = np.zeros((4, 4, 4), np.uint8)
    labels[:, :, 1] = 3
    labels[:, :, 2] = 7
    labels[:, :, 3] = 255  # not annotated (CellMap: the dtype's maximum)
    vol = _signed_volume(tmp_path, labels)
    classes = [{"name": "mito", "ids": [3], "instance": True}, {"name": "er", "ids": [7]}]
    attrs = run_targets(vol, tmp_path / "t.zarr", {"unlabelled_ids": [255], "classes": classes}, {})
    semantic = io.read_image(tmp_path / "t.zarr" / "semantic").read()
    assert semantic.dtype == np.uint8
    np.testing.assert_array_equal(semantic[0, 0], [0, 1, 2, 0])
    np.testing.assert_array_equal(io.read_image(tmp_path / "t.zarr" / "mask").read()[0, 0], [1, 1, 1, 0])
    stored = zarr.open_group(str(tmp_path / "t.zarr"), mode="r").attrs["dinopipe"]
    assert stored["num_classes"] == 3 and stored["class_names"] == ["background", "mito", "er"]
    assert stored["instance_classes"] == ["mito"] and attrs["classes"] == classes
    assert stored["class_weights"] == [1.0, 1.0, 1.0]  # three equally frequent known classes
    # without classes the targets hold no class image and their attrs no 'classes' key
    plain = run_targets(vol, tmp_path / "p.zarr", {"unlabelled_ids": [255]}, {})
    assert "classes" not in plain and not (tmp_path / "p.zarr" / "semantic").exists()


def test_all_unlabelled_mask_is_an_error(tmp_path):
    vol = _signed_volume(tmp_path, np.full((4, 4, 4), 5, np.uint32))
    with pytest.raises(ValueError, match=r"volume 's': labels .*l.zarr: the mask is all zero .*"
                                         r"targets.unlabelled_ids \[5\]"):
        run_targets(vol, tmp_path / "t.zarr", {"unlabelled_ids": [5]}, {})
    assert not (tmp_path / "t.zarr").exists()


def test_features_on_real_multiresolution_data(shared_data, tmp_path):
    """gala: raw at 10 nm, labels at 20 nm (OME-NGFF pyramids); features land on the
    20 nm label grid of the ROI, with the raw read at 10 nm."""
    gala = shared_data / "gala" / "train.zarr"
    vol = Volume("gala", str(gala / "raw"), str(gala / "labels" / "neurons"), "train",
                 roi=((100, 420), (200, 840), (400, 1040)))
    attrs = run_features(vol, tmp_path / "f.zarr", {"backbone": "tiny-convnext"}, {"label_voxel_size": [20, 20, 20]})
    feats = io.read_image(tmp_path / "f.zarr")
    labels = io.read_image(gala / "labels" / "neurons", "s1").geometry
    assert feats.geometry.voxel_size == (20.0, 20.0, 20.0)
    assert feats.array.shape == (32, 16, 32, 32)
    # the output grid is a window of the label grid: same voxel centres
    offset = (np.asarray(feats.geometry.translation) - np.asarray(labels.translation)) / 20.0
    assert np.allclose(offset, np.round(offset)) and feats.geometry.translation == (100.0, 200.0, 400.0)
    assert attrs["raw"]["scale"] == "s0" and attrs["signature"]["raw_voxel_size"] == [10.0, 10.0, 10.0]
    assert np.isfinite(feats.read().astype(np.float32)).all()


def _two_cell_targets(path) -> np.ndarray:
    """A targets-like store (raw 0..1, labels) of two cells split by a dark wall; returns the labels."""
    raw = np.ones((8, 12, 20), dtype=np.float32)
    raw[:, :, 9:11] = 0.0
    labels = np.ones(raw.shape, dtype=np.uint64)
    labels[:, :, 11:] = 2
    labels[:, :, 9:11] = 0
    zarr.open_group(str(path), mode="w", zarr_format=2)
    io.write_image(path / "raw", raw, [10.0] * 3, [5.0] * 3)
    io.write_image(path / "labels", labels, [10.0] * 3, [5.0] * 3)
    return labels


def test_baseline_is_tuned_and_scored_beside_the_segmentation(tmp_path):
    from dinopipe.stages import run_baseline, run_evaluate

    labels = _two_cell_targets(tmp_path / "targets.zarr")
    tuned = run_baseline([tmp_path / "targets.zarr"], tmp_path / "baseline.json")
    assert set(tuned["parameters"]) == {"sigma", "h", "membrane"}
    assert len(tuned["grid"]) == 21  # the default 3 x 7 grid
    assert json.loads((tmp_path / "baseline.json").read_text())["parameters"] == tuned["parameters"]
    # one segment for everything: H(truth | test) = 1 bit (two equal cells), no split
    one = np.ones(labels.shape, dtype=np.uint64)
    io.write_image(tmp_path / "seg.zarr", one, [10.0] * 3, [5.0] * 3)
    result = run_evaluate("v", tmp_path / "seg.zarr", tmp_path / "targets.zarr", tmp_path / "v.json",
                          baseline_path=tmp_path / "baseline.json")
    assert result["voi_merge"] == pytest.approx(1.0) and result["voi_split"] == pytest.approx(0.0)
    # the wall is unmistakable: the tuned baseline separates the two cells exactly
    assert result["baseline_voi_sum"] == pytest.approx(0.0) and result["baseline_adapted_rand_error"] == pytest.approx(0.0)
    assert result["voi_sum_vs_baseline"] is None  # nothing to divide by
    # without a baseline, no baseline keys
    plain = run_evaluate("v", tmp_path / "seg.zarr", tmp_path / "targets.zarr", tmp_path / "w.json")
    assert not any(k.startswith("baseline") for k in plain)
    with pytest.raises(ValueError, match="no targets"):
        run_baseline([], tmp_path / "b.json")


def test_targets_schema_defaults_match_the_library_defaults():
    import yaml

    from dinopipe.stages import DEFAULT_TARGETS

    schema = yaml.safe_load(open(__file__.replace("tests/test_stages.py", "workflow/schemas/config.schema.yaml")))
    props = schema["properties"]["targets"]["properties"]
    assert set(props) == set(DEFAULT_TARGETS)
    assert {k: v["default"] for k, v in props.items()} == DEFAULT_TARGETS
