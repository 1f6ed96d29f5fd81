"""Tuning the segment parameters on validate volumes (dinopipe.tune, stages.run_tune_segment),
the segment stage using the pick, and the sanity warnings."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import zarr

from dinopipe import io, tune
from dinopipe.segment import sanity_warnings
from dinopipe.stages import run_evaluate, run_segment, run_summary, run_tune_segment
from dinopipe.targets import compute_affinities

OFFSETS = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [3, 0, 0], [0, 3, 0], [0, 0, 3]]


def halves(shape=(8, 12, 16)) -> np.ndarray:
    """Two objects of equal size: x < half is 1, the rest 2."""
    labels = np.ones(shape, dtype=np.uint64)
    labels[..., shape[2] // 2 :] = 2
    return labels


def test_resolve_grid_defaults_overrides_and_errors():
    assert tune.resolve_grid({"method": "mutex_watershed"}) == tune.DEFAULT_GRIDS["mutex_watershed"]
    assert tune.resolve_grid({"method": "agglomeration", "grid": None}) == tune.DEFAULT_GRIDS["agglomeration"]
    assert tune.resolve_grid({"method": "mutex_watershed", "grid": {"bias_long": [-1, -0.5]}}) == {
        "bias_long": [-1, -0.5]}
    assert tune.resolve_grid({"method": "mutex_watershed", "grid": {}}) == {}
    assert tune.resolve_grid({"method": "mutex_watershed", "tune": False, "grid": {"bias_long": [-1]}}) == {}
    # min_size is a parameter of every method, so it may be swept too
    assert tune.resolve_grid({"method": "threshold_components", "grid": {"min_size": [0, 5]}}) == {"min_size": [0, 5]}
    with pytest.raises(ValueError, match=r"segment.grid: \['bias_short'\] are not parameters of method 'threshold_components'"):
        tune.resolve_grid({"method": "threshold_components", "grid": {"bias_short": [0.1]}})
    with pytest.raises(ValueError, match="segment.grid.threshold must be a non-empty list"):
        tune.resolve_grid({"method": "threshold_components", "grid": {"threshold": []}})
    with pytest.raises(ValueError, match="segment.method 'nope' is unknown"):
        tune.resolve_grid({"method": "nope"})


def test_every_default_grid_names_parameters_of_its_method():
    for method, grid in tune.DEFAULT_GRIDS.items():
        assert tune.resolve_grid({"method": method}) == grid


def test_candidates_are_the_cartesian_product_in_grid_order():
    assert tune.candidates({"a": [1, 2], "b": [3, 4, 5]}) == [
        {"a": 1, "b": 3}, {"a": 1, "b": 4}, {"a": 1, "b": 5}, {"a": 2, "b": 3}, {"a": 2, "b": 4}, {"a": 2, "b": 5}]
    assert tune.candidates({}) == [{}]


def test_tuning_picks_the_biases_that_separate_the_objects():
    labels = halves()
    affs = compute_affinities(labels, OFFSETS).astype(np.float32)
    # bias_short +0.6 makes every short-range edge attractive (boundary edges 0 + 0.6 > 0):
    # the two halves merge into one segment, VOI merge = H(truth | test) = 1 bit.
    grid = {"bias_short": [0.6, -0.5], "bias_long": [-0.5]}
    result = tune.tune_segmentation([("v", affs, labels)], OFFSETS, {"method": "mutex_watershed", "min_size": 3},
                                    grid)
    assert result.best == 1
    assert result.parameters == {"bias_short": -0.5, "bias_long": -0.5, "min_size": 3}
    merged, right = result.rows
    assert merged["n_segments"] == 1 and merged["voi_merge"] == pytest.approx(1.0) and merged["voi_split"] == 0
    assert "everything merged" in merged["warnings"]
    assert right["voi_sum"] == pytest.approx(0.0, abs=1e-12) and right["n_segments"] == 2 and not right["warnings"]
    assert result.mean_voi_sum == pytest.approx([1.0, 0.0], abs=1e-12)


def test_tuning_averages_over_volumes_and_keeps_fixed_parameters():
    a, b = halves(), halves((6, 10, 10))
    affs_a = compute_affinities(a, OFFSETS).astype(np.float32) * 0.6 + 0.2  # 0.2 across, 0.8 inside
    affs_b = compute_affinities(b, OFFSETS).astype(np.float32) * 0.6 + 0.2
    # threshold 0.9: no edge strictly above it, every voxel alone; 0.5 separates the halves exactly
    result = tune.tune_segmentation([("a", affs_a, a), ("b", affs_b, b)], OFFSETS,
                                    {"method": "threshold_components", "threshold": 0.9, "min_size": 0},
                                    {"threshold": [0.9, 0.5]})
    assert [r["volume"] for r in result.rows] == ["a", "b", "a", "b"]
    assert result.best == 1 and result.parameters == {"threshold": 0.5, "min_size": 0}
    shattered = [r for r in result.rows if r["candidate"] == 0]
    assert [r["n_segments"] for r in shattered] == [a.size, b.size]
    assert all("over-segmented" in r["warnings"] for r in shattered)
    # every voxel alone: VOI split = H(test | truth) = log2 of the object size
    assert shattered[0]["voi_split"] == pytest.approx(np.log2(a.size / 2))
    assert result.mean_voi_sum[0] == pytest.approx((np.log2(a.size / 2) + np.log2(b.size / 2)) / 2)
    # an empty grid scores the fixed parameters only
    fixed = tune.tune_segmentation([("a", affs_a, a)], OFFSETS, {"method": "threshold_components", "threshold": 0.5}, {})
    assert fixed.best == 0 and fixed.parameters == {"threshold": 0.5} and len(fixed.rows) == 1
    with pytest.raises(ValueError, match="at least one labelled validate volume"):
        tune.tune_segmentation([], OFFSETS, {"method": "threshold_components"}, {})
    with pytest.raises(ValueError, match="volume 'a': affinities"):
        tune.tune_segmentation([("a", affs_a, b)], OFFSETS, {"method": "threshold_components"}, {})


def test_sanity_warnings():
    assert sanity_warnings(1, 1000) == ["1 segment(s) for 1000 voxels: everything merged"]
    assert sanity_warnings(0, 1000)[0].startswith("0 segment(s)")
    assert sanity_warnings(10, 1000) == []  # exactly voxels / 100 is fine
    assert "over-segmented" in sanity_warnings(11, 1000)[0]


@pytest.fixture
def validate_volume(tmp_path):
    """A stored prediction (noisy affinities of two halves) and the targets store of its labels."""
    labels = halves()
    target = compute_affinities(labels, OFFSETS)
    rng = np.random.default_rng(0)
    aff = np.clip(target.astype(np.float32) * 0.6 + 0.2 + rng.normal(0, 0.02, target.shape), 0, 1).astype(np.float32)
    pred = tmp_path / "pred.zarr"
    zarr.open_group(str(pred), mode="w", zarr_format=2).attrs["dinopipe"] = {"offsets": OFFSETS}
    io.write_image(pred / "affinities", aff, (8, 8, 8), (4, 4, 4), channel_axis=True)
    targets = tmp_path / "targets.zarr"
    zarr.open_group(str(targets), mode="w", zarr_format=2).attrs["dinopipe"] = {"offsets": OFFSETS}
    io.write_image(targets / "labels", labels, (8, 8, 8), (4, 4, 4))
    io.write_image(targets / "affinities", target.astype(np.uint8), (8, 8, 8), (4, 4, 4), channel_axis=True)
    io.write_image(targets / "mask", np.ones(labels.shape, np.uint8), (8, 8, 8), (4, 4, 4))
    return pred, targets, labels


def test_tune_stage_writes_table_figure_choice_and_segment_uses_it(validate_volume, tmp_path):
    pred, targets, labels = validate_volume
    segment = {"method": "mutex_watershed", "bias_short": 0.6, "bias_long": -0.5, "min_size": 2,
               "grid": {"bias_short": [0.6, -0.5]}}
    out = run_tune_segment([("val", pred, targets)], tmp_path / "t.tsv", tmp_path / "t.json", tmp_path / "t.png",
                           segment)
    assert out["parameters"] == {"bias_short": -0.5, "bias_long": -0.5, "min_size": 2}
    with open(tmp_path / "t.tsv", newline="") as f:
        table = list(csv.DictReader(f, delimiter="\t"))
    assert [(r["candidate"], r["volume"], r["picked"]) for r in table] == [
        ("0", "val", ""), ("0", "mean", ""), ("1", "val", "yes"), ("1", "mean", "yes")]
    assert float(table[0]["bias_short"]) == 0.6 and table[0]["n_segments"] == "1"
    assert "everything merged" in table[0]["warnings"]
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    choice = json.loads((tmp_path / "t.json").read_text())
    assert choice["method"] == "mutex_watershed" and choice["parameters"] == out["parameters"]
    (vol,) = choice["volumes"]
    assert vol["volume"] == "val" and vol["voi_sum"] == pytest.approx(0, abs=1e-9)
    # affinities 0.2 across the boundary and 0.8 inside (small noise): every edge right
    assert vol["affinity_bacc"] == pytest.approx(1.0) and set(vol["affinities"]) == {"1,0,0", "0,0,3", "0,1,0",
                                                                                     "0,0,1", "3,0,0", "0,3,0"}
    assert vol["segment"] == "mutex_watershed bias_long=-0.5 bias_short=-0.5 min_size=2"

    # the segment stage takes the pick over its own (merging) bias_short
    attrs = run_segment(pred, tmp_path / "seg.zarr", segment, tuned=tmp_path / "t.json")
    assert attrs["parameters"] == {"bias_short": -0.5, "bias_long": -0.5} and attrs["tuned"] and not attrs["warnings"]
    assert attrs["segments"] == 2
    fixed = run_segment(pred, tmp_path / "fixed.zarr", segment)
    assert fixed["segments"] == 1 and "everything merged" in fixed["warnings"][0]
    with pytest.raises(ValueError, match="tuned for segment.method 'mutex_watershed'.*asks for 'threshold_components'"):
        run_segment(pred, tmp_path / "x.zarr", {"method": "threshold_components"}, tuned=tmp_path / "t.json")

    # evaluation records method, parameters and warnings; the summary adds the validate row, rounded
    ev = run_evaluate("p", tmp_path / "fixed.zarr", targets, tmp_path / "p.json", predictions_path=pred)
    assert ev["segment"] == "mutex_watershed bias_long=-0.5 bias_short=0.6 min_size=2"
    assert "everything merged" in ev["warning"] and ev["affinity_bacc"] == pytest.approx(1.0)
    run_summary([tmp_path / "p.json"], tmp_path / "summary.tsv", tuned=tmp_path / "t.json",
                brief_path=tmp_path / "brief.tsv")
    with open(tmp_path / "brief.tsv", newline="") as f:
        brief = list(csv.DictReader(f, delimiter="\t"))
    assert list(brief[0]) == ["volume", "role", "VOI split", "VOI merge", "VOI sum", "adapted Rand error",
                              "affinity bal. acc.", "warning"]
    assert brief[0]["VOI merge"] == "1" and "everything merged" in brief[0]["warning"]
    with open(tmp_path / "summary.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [(r["volume"], r["role"]) for r in rows] == [("p", "predict"), ("val", "validate")]
    assert rows[0]["segment"].startswith("mutex_watershed") and "everything merged" in rows[0]["warning"]
    assert rows[0]["voi_merge"] == "1" and rows[1]["voi_sum"] in ("0", "0.0")
    assert "affinities" not in rows[0] and "rand_split" not in rows[0]


def test_summary_rounds_to_four_significant_digits(tmp_path):
    io.write_json(tmp_path / "a.json", {"volume": "a", "voi_split": 1.0 / 3, "voi_merge": 123456.789, "n_test_ids": 7})
    run_summary([tmp_path / "a.json"], tmp_path / "s.tsv")
    with open(tmp_path / "s.tsv", newline="") as f:
        (row,) = list(csv.DictReader(f, delimiter="\t"))
    assert row["voi_split"] == "0.3333" and row["voi_merge"] == "1.235e+05" and row["n_test_ids"] == "7"
