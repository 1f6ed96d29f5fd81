"""Tests for dinopipe.distributed: the block plan, parts and markers, and a prediction spread over
part jobs that equals the single-job prediction bit for bit (library level; the workflow and the
emulated LSF are tested in tests/test_distributed_workflow.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from dinopipe.distributed import blocks_per_part, check_parts, describe_part, part_names, read_plan
from dinopipe.stages import run_predict, run_predict_create, run_predict_finish, run_predict_part
from test_predict import make_features, make_model_dir

# --------------------------------------------------------------------------- the plan (hand-computed)


def test_blocks_per_part_follows_batches_and_threshold():
    assert blocks_per_part({"blocks_per_job": 5}, (64, 64, 64), 100) == 5
    # rounded up to whole batches, so parts start where a single job starts a batch
    assert blocks_per_part({"blocks_per_job": 5}, (64, 64, 64), 100, batch_size=2) == 6
    assert blocks_per_part({"blocks_per_job": 6}, (64, 64, 64), 100, batch_size=3) == 6
    # a volume below min_voxels is one part
    assert blocks_per_part({"blocks_per_job": 5, "min_voxels": 64**3 + 1}, (64, 64, 64), 100) == 100
    assert blocks_per_part({"blocks_per_job": 5, "min_voxels": 64**3}, (64, 64, 64), 100) == 5
    with pytest.raises(ValueError, match="blocks_per_job"):
        blocks_per_part({"blocks_per_job": 0}, (8, 8, 8), 1)


# --------------------------------------------------------------------------- parts through the library

SHAPE = (20, 26, 30)  # not a multiple of the block shape on any axis
BLOCK = [8, 12, 16]   # with levels 2 rounded to 8 x 12 x 16: 3 x 3 x 2 = 18 blocks


def _params(**distributed) -> dict:
    return {"source": "features", "block_shape": BLOCK, "batch_size": 1, "device": "cpu",
            "distributed": distributed or None}


@pytest.fixture
def setup(tmp_path):
    features = make_features(tmp_path / "features.zarr", SHAPE, channels=5)
    model_dir = make_model_dir(tmp_path / "model", channels=5, levels=2, norm="batch")
    return tmp_path, features, model_dir


def _distributed(tmp_path: Path, features: str, model_dir: Path, params: dict, order=None, name="vol") -> Path:
    parts = tmp_path / f"{name}.parts"
    plan_path, staging = parts / "plan.json", parts / "staging.zarr"
    run_predict_create(features, model_dir, staging, plan_path, params, threads=1)
    names = part_names(plan_path)
    for part in order(names) if order else names:
        run_predict_part(features, model_dir, plan_path, staging, parts / f"{part}.done", int(part), params, threads=1)
    out = tmp_path / f"{name}.zarr"
    run_predict_finish(plan_path, staging, [parts / f"{p}.done" for p in names], out)
    return out


def _arrays(store: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(store), mode="r")
    return {name: np.asarray(group[name]["s0"][...]) for name in sorted(group.group_keys())}


def test_parts_in_any_order_equal_the_single_job_bitwise(setup):
    tmp_path, features, model_dir = setup
    run_predict(features, model_dir, tmp_path / "single.zarr", _params(), threads=1)
    out = _distributed(tmp_path, features, model_dir, _params(blocks_per_job=4), order=lambda n: n[::-1])
    single, spread = _arrays(tmp_path / "single.zarr"), _arrays(out)
    assert list(spread) == ["affinities", "lsds"] and spread["affinities"].shape == (4, *SHAPE)
    for name in single:
        assert single[name].std() > 1e-3
        np.testing.assert_array_equal(spread[name], single[name])
    # the same store layout: chunks, dtype, image attrs (voxel size, offsets); root attrs but timings
    for name in single:
        a, b = (zarr.open_array(str(s / name / "s0"), mode="r") for s in (tmp_path / "single.zarr", out))
        assert (a.chunks, a.dtype, a.shape) == (b.chunks, b.dtype, b.shape)
        assert (zarr.open_group(str(tmp_path / "single.zarr" / name)).attrs.asdict()
                == zarr.open_group(str(out / name)).attrs.asdict())
    one, many = (zarr.open_group(str(s)).attrs["dinopipe"] for s in (tmp_path / "single.zarr", out))
    assert many.pop("distributed") == {"parts": 5, "blocks_per_part": 4, "blocks": 18}
    one.pop("timings"), many.pop("timings")
    assert one == many
    assert not (tmp_path / "vol.parts" / "staging.zarr").exists()  # moved into place


def test_batches_keep_their_blocks_across_parts(setup):
    """With batch_size 2, parts are whole batches (blocks_per_job 3 becomes 4): bitwise equal too."""
    tmp_path, features, model_dir = setup
    run_predict(features, model_dir, tmp_path / "single.zarr", {**_params(), "batch_size": 2}, threads=1)
    params = {**_params(blocks_per_job=3), "batch_size": 2}
    out = _distributed(tmp_path, features, model_dir, params)
    assert read_plan(tmp_path / "vol.parts" / "plan.json")[0].blocks_per_part == 4
    for name, array in _arrays(tmp_path / "single.zarr").items():
        np.testing.assert_array_equal(_arrays(out)[name], array)


def test_finish_refuses_missing_parts_and_blocks(setup):
    tmp_path, features, model_dir = setup
    params = _params(blocks_per_job=8)  # 18 blocks: parts 0, 1, 2
    parts = tmp_path / "v.parts"
    plan_path, staging = parts / "plan.json", parts / "staging.zarr"
    run_predict_create(features, model_dir, staging, plan_path, params, threads=1)
    assert part_names(plan_path) == ["0", "1", "2"]
    assert describe_part(plan_path, 2) == ("part 2 of 3 of v: blocks 16-17 of 18 (first voxels (z, y, x) "
                                           "[16, 24, 0]..[16, 24, 16], blocks of [8, 12, 16])")
    for part in (0, 2):
        run_predict_part(features, model_dir, plan_path, staging, parts / f"{part}.done", part, params, threads=1)
    marker = json.loads((parts / "2.done").read_text())
    assert marker["blocks"] == [16, 18] and marker["part"] == 2 and marker["timings"]["forward_s"] > 0
    markers = [parts / f"{p}.done" for p in (0, 2)]
    with pytest.raises(ValueError, match=r"1 of 3 parts .* are not finished \(first: \[1\]\)"):
        run_predict_finish(plan_path, staging, markers, tmp_path / "v.zarr")
    # a marker present but its blocks not stored (e.g. the store was replaced): refused too
    (parts / "1.done").write_text(json.dumps({**marker, "part": 1, "blocks": [8, 16]}))
    with pytest.raises(ValueError, match=r"8 of 18 blocks are not stored"):
        run_predict_finish(plan_path, staging, [*markers, parts / "1.done"], tmp_path / "v.zarr")
    # a marker of an earlier plan does not count
    (parts / "1.done").write_text(json.dumps({**marker, "part": 1, "plan_id": "old"}))
    with pytest.raises(ValueError, match=r"markers of another plan"):
        run_predict_finish(plan_path, staging, [*markers, parts / "1.done"], tmp_path / "v.zarr")
    assert not (tmp_path / "v.zarr").exists() and staging.is_dir()
    with pytest.raises(ValueError, match=r"part 3 does not exist"):
        run_predict_part(features, model_dir, plan_path, staging, parts / "3.done", 3, params, threads=1)


def test_part_refuses_a_plan_made_for_other_settings(setup):
    tmp_path, features, model_dir = setup
    parts = tmp_path / "v.parts"
    run_predict_create(features, model_dir, parts / "s.zarr", parts / "plan.json", _params(blocks_per_job=8),
                       threads=1)
    other = {**_params(blocks_per_job=8), "block_shape": [16, 16, 16]}
    with pytest.raises(ValueError, match=r"plan .* has shape \[20, 26, 30\], blocks \[8, 12, 16\].*forcerun"):
        run_predict_part(features, model_dir, parts / "plan.json", parts / "s.zarr", parts / "0.done", 0, other,
                         threads=1)
    with pytest.raises(ValueError, match=r"predict.distributed is None"):
        run_predict_create(features, model_dir, parts / "t.zarr", parts / "p2.json", _params(), threads=1)


def test_check_parts_without_a_plan_names_the_rule(tmp_path):
    with pytest.raises(FileNotFoundError, match="predict_create writes it"):
        check_parts(tmp_path / "plan.json", [])
    assert "once predict_create has written" in describe_part(tmp_path / "plan.json", 0)


def test_a_shard_shape_gives_an_unsharded_store_with_a_warning(setup, caplog):
    tmp_path, features, model_dir = setup
    parts = tmp_path / "v.parts"
    params = {**_params(blocks_per_job=8), "shard_shape": 32}
    with caplog.at_level("WARNING", logger="dinopipe.stages"):
        run_predict_create(features, model_dir, parts / "s.zarr", parts / "plan.json", params, threads=1)
    assert "predict.shard_shape 32: a distributed prediction writes an unsharded store" in caplog.text
    assert zarr.open_array(str(parts / "s.zarr" / "affinities" / "s0"), mode="r").metadata.zarr_format == 2


def test_one_block_of_a_finished_volume_is_predicted_again_by_index(setup):
    """run_predict_block (rule predict_block): a block deleted or corrupted in the finished
    store is predicted again in its forward batch and rewritten, bitwise as before; the
    store records it; an intact block is rewritten with the same bits and recorded unchanged."""
    from dinopipe.distributed import batch_of
    from dinopipe.stages import run_predict_block

    tmp_path, features, model_dir = setup
    params = {**_params(blocks_per_job=3), "batch_size": 2}  # parts of 4 blocks, batches of 2
    out = _distributed(tmp_path, features, model_dir, params)
    before = _arrays(out)
    plan_path = tmp_path / "vol.parts" / "plan.json"
    plan, _ = read_plan(plan_path)
    assert batch_of(plan, 5, 2) == range(4, 6) and batch_of(plan, 16, 2) == range(16, 18)
    index = 5
    window = (slice(None), *plan.window(index))
    chunk = Path(out) / "affinities" / "s0" / "0" / "0" / "2" / "1"  # block 5: (z, y, x) = (0, 2, 1)
    assert chunk.is_file()
    chunk.write_bytes(b"\x02\x01half a chunk")  # a corrupt chunk (as a job killed mid-write leaves)
    lsds = zarr.open_array(str(out / "lsds" / "s0"), mode="r+")
    lsds[window] = 0.5  # and wrong values in the other image
    entry = run_predict_block(features, model_dir, plan_path, out, tmp_path / "blocks" / "5.json", index, params,
                              threads=1)
    assert entry["changed"] and entry["changed_images"] == ["affinities", "lsds"] and entry["batch"] == [4, 6]
    for name, array in _arrays(out).items():
        np.testing.assert_array_equal(array, before[name], err_msg=name)
    assert json.loads((tmp_path / "blocks" / "5.json").read_text())["block"] == 5
    # a deleted chunk too, and an intact block: recorded unchanged
    chunk.unlink()
    run_predict_block(features, model_dir, plan_path, out, tmp_path / "blocks" / "5.json", index, params, threads=1)
    again = run_predict_block(features, model_dir, plan_path, out, tmp_path / "blocks" / "0.json", 0, params, threads=1)
    assert not again["changed"] and again["batch"] == [0, 2]
    for name, array in _arrays(out).items():
        np.testing.assert_array_equal(array, before[name], err_msg=name)
    recorded = zarr.open_group(str(out)).attrs["dinopipe"]["recomputed_blocks"]
    assert [(r["block"], r["changed"]) for r in recorded] == [(5, True), (5, True), (0, False)]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".block-")]  # no scratch left
    with pytest.raises(ValueError, match=r"block 18 does not exist"):
        run_predict_block(features, model_dir, plan_path, out, tmp_path / "b.json", 18, params, threads=1)
    with pytest.raises(FileNotFoundError, match=r"no finished prediction at .*PART.done"):
        run_predict_block(features, model_dir, plan_path, tmp_path / "none.zarr", tmp_path / "b.json", 1, params,
                          threads=1)
