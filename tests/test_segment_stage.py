"""run_segment / run_summary: whole-volume and blockwise segmentation of a stored prediction; unlabelled volumes."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import zarr

from dinopipe import io
from dinopipe.evaluate import evaluate_segmentation
from dinopipe.stages import run_segment, run_summary
from dinopipe.targets import compute_affinities

OFFSETS = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [3, 0, 0], [0, 3, 0], [0, 0, 3]]


@pytest.fixture
def prediction(tmp_path):
    """A prediction store holding the (slightly noisy) affinities of a box volume."""
    truth = np.zeros((10, 20, 24), dtype=np.uint64)
    ids = 1
    for z in (0, 5):
        for y in (0, 7, 14):
            for x in (0, 12):
                truth[z : z + 5, y : y + 7, x : x + 12] = ids
                ids += 1
    rng = np.random.default_rng(0)
    aff = compute_affinities(truth, OFFSETS).astype(np.float32) * 0.8 + 0.1
    aff = np.clip(aff + rng.normal(0, 0.03, aff.shape), 0, 1).astype(np.float32)
    path = tmp_path / "pred.zarr"
    zarr.open_group(str(path), mode="w", zarr_format=2).attrs["dinopipe"] = {"offsets": OFFSETS}
    io.write_image(path / "affinities", aff, (8, 8, 8), (4, 4, 4), channel_axis=True)
    return path, truth


@pytest.mark.parametrize("method", ["mutex_watershed", "agglomeration", "threshold_components"])
@pytest.mark.parametrize("blocks", [None, [4, 8, 8]])
def test_run_segment(prediction, tmp_path, method, blocks):
    path, truth = prediction
    # waterz fragments: these boxes touch without membrane voxels, where distance-seeded fragments
    # may give the voxels right at a contact to the box across it (dinopipe.segment.distance_fragments)
    params = {"method": method, "bias_short": -0.5, "bias_long": -0.5, "threshold": 0.5, "min_size": 4,
              "fragments": "waterz",
              "block_shape": blocks}
    attrs = run_segment(path, tmp_path / "seg.zarr", params)
    seg = io.read_image(tmp_path / "seg.zarr")
    assert seg.array.dtype == np.uint64
    assert seg.geometry.voxel_size == (8, 8, 8) and seg.geometry.translation == (4, 4, 4)
    labels = seg.read()
    assert evaluate_segmentation(truth, labels)["voi_sum"] == pytest.approx(0, abs=1e-9)
    assert set(np.unique(labels)) == set(range(1, attrs["segments"] + 1))
    assert attrs["blockwise"] is (blocks is not None)
    assert "bias_short" not in attrs["parameters"] or method == "mutex_watershed"


@pytest.mark.parametrize("blocks", [None, [4, 8, 8]])
def test_sharded_segmentation_is_the_unsharded_one_in_few_files(prediction, tmp_path, blocks):
    """segment.shard_shape (whole volume, or blockwise: relabelled into whole shards from a
    scratch array that does not stay) writes the same labels as a Zarr v3 / OME-NGFF 0.5 store."""
    path, _ = prediction
    params = {"method": "agglomeration", "fragments": "waterz", "min_size": 4, "block_shape": blocks}
    run_segment(path, tmp_path / "plain.zarr", params)
    run_segment(path, tmp_path / "sharded.zarr", {**params, "shard_shape": 16})
    plain, sharded = io.read_image(tmp_path / "plain.zarr"), io.read_image(tmp_path / "sharded.zarr")
    assert (plain.format, sharded.format) == ("ome-ngff 0.4", "ome-ngff 0.5")
    np.testing.assert_array_equal(plain.read(), sharded.read())
    # chunks: 64^3 in memory (capped: one shard of 10 x 20 x 24); blocks 4 x 8 x 8 -> shards of
    # 16 voxels, capped at the 3 blocks covering z
    assert sharded.array.shards == ((10, 20, 24) if blocks is None else (12, 16, 16))
    files = sorted(p.relative_to(tmp_path / "sharded.zarr").as_posix()
                   for p in (tmp_path / "sharded.zarr").rglob("*") if p.is_file())
    shard_files = [f for f in files if f.startswith("s0/c/")]
    assert len(shard_files) == (1 if blocks is None else 1 * 2 * 2), files
    assert set(files) - set(shard_files) == {"zarr.json", "s0/zarr.json"}, files  # no scratch left
    with pytest.raises(ValueError, match="segment.shard_shape must be a positive integer"):
        run_segment(path, tmp_path / "bad.zarr", {**params, "shard_shape": 0})


def test_large_volumes_go_blockwise(prediction, tmp_path):
    path, truth = prediction
    attrs = run_segment(path, tmp_path / "seg.zarr", {"max_voxels": 1000})
    assert attrs["blockwise"] and attrs["block_shape"] == [10, 20, 24]
    with pytest.raises(ValueError, match="segment.method 'nope'"):
        run_segment(path, tmp_path / "bad.zarr", {"method": "nope"})


def test_summary_notes_unlabelled_volumes(tmp_path):
    io.write_json(tmp_path / "a.json", {"volume": "a", "voi_split": 0.5})
    run_summary([tmp_path / "a.json"], tmp_path / "summary.tsv", unscored=["b"])
    with open(tmp_path / "summary.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [r["volume"] for r in rows] == ["a", "b"]
    assert rows[1]["note"] == "no labels: not evaluated" and rows[1]["voi_split"] == ""
