"""Blockwise segmentation as many jobs (dinopipe.segment_parts): the steps, run part by part in
any order, write exactly the one-job blockwise segmentation; a missing part is named."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from dinopipe import io
from dinopipe.evaluate import evaluate_segmentation
from dinopipe.segment import segment
from dinopipe.segment_parts import (
    block_plan,
    parts_dir,
    run_faces,
    run_finish,
    run_fragments,
    run_merge,
    run_plan,
    run_relabel,
)
from dinopipe.stages import run_segment, segment_settings
from test_segment_stage import OFFSETS, prediction  # noqa: F401  (fixture)


def test_parts_take_consecutive_blocks_of_the_one_plan():
    """Segmentation parts follow dinopipe.parts.BlockPlan's rule: ceil(blocks / jobs)
    consecutive blocks (C order) per part, exactly segment.jobs parts."""
    plan = block_plan({"shape": [10, 1, 1], "block_shape": [1, 1, 1], "jobs": 4})
    assert [list(plan.part_blocks(p)) for p in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    few = block_plan({"shape": [2, 1, 1], "block_shape": [1, 1, 1], "jobs": 4})
    assert few.num_parts == 4 and list(few.part_blocks(3)) == []  # more jobs than blocks: nothing to do
    assert few.describe(3).startswith("no blocks")


def run_all_parts(predictions, out, params: dict, jobs: int) -> dict:
    """Every step as the workflow runs them, parts in reverse order (as jobs may finish)."""
    work = parts_dir(out)
    plan = run_plan(predictions, out, segment_settings(predictions, params), jobs, work / "plan.json")
    parts = list(reversed(range(jobs)))
    for p in parts:
        run_fragments(out, p, work / f"fragments-{p}.npz")
    for p in parts:
        run_faces(out, p, work / f"faces-{p}.npz")
    run_merge(work / "plan.json", [str(work / f"fragments-{p}.npz") for p in parts],
              [str(work / f"faces-{p}.npz") for p in parts], work / "table.npz")
    for p in parts:
        run_relabel(out, p, work / "table.npz", work / f"done-{p}.json")
    attrs = run_finish(out, work / "plan.json", work / "table.npz", [str(work / f"done-{p}.json") for p in parts])
    assert plan["blocks"] > jobs
    return attrs


@pytest.mark.parametrize(("method", "fragments", "merge_levels"),
                         [("mutex_watershed", "waterz", None), ("agglomeration", "waterz", None),
                          ("agglomeration", "distance", None), ("agglomeration", "waterz", [[1, 2, 2], 2]),
                          ("agglomeration", "distance", [[1, 2, 2], 2])])
def test_parts_write_the_one_job_blockwise_segmentation(prediction, tmp_path, method, fragments,  # noqa: F811
                                                       merge_levels):
    path, truth = prediction
    params = {"method": method, "block_shape": [4, 8, 8], "min_size": 20, "bias_short": -0.5, "bias_long": -0.5,
              "threshold": 0.5, "fragments": fragments, "merge_levels": merge_levels}
    one = run_segment(path, tmp_path / "one.zarr", params)
    attrs = run_all_parts(path, tmp_path / "many.zarr", params, jobs=3)
    a, b = io.read_image(tmp_path / "one.zarr"), io.read_image(tmp_path / "many.zarr")
    assert np.array_equal(a.read(), b.read()) and a.geometry == b.geometry
    if fragments == "waterz":
        assert evaluate_segmentation(truth, a.read())["voi_sum"] == pytest.approx(0, abs=1e-9)  # the 12 boxes
    else:  # seeded fragments: the one-piece agglomeration (which joins some of these membrane-less boxes)
        whole = segment(io.read_image(path / "affinities").read(), OFFSETS, method="agglomeration", threshold=0.5,
                        fragments="distance", min_size=20)
        assert evaluate_segmentation(whole, a.read())["voi_sum"] == pytest.approx(0, abs=1e-9)
    assert {k: v for k, v in attrs.items() if k not in ("seconds", "jobs")} == {
        k: v for k, v in one.items() if k != "seconds"}
    assert attrs["jobs"] == 3 and b.attrs["jobs"] == 3
    assert attrs.get("merge_levels") == merge_levels
    # the work directory keeps only the small files (the workflow deletes them as temporary)
    assert not (parts_dir(tmp_path / "many.zarr") / "fragments.zarr").exists()
    assert not (parts_dir(tmp_path / "many.zarr") / "segmentation.zarr").exists()


def test_a_missing_part_is_named(prediction, tmp_path):  # noqa: F811
    path, _ = prediction
    out = tmp_path / "seg.zarr"
    work = parts_dir(out)
    with pytest.raises(FileNotFoundError, match="segment_plan"):
        run_fragments(out, 0, work / "f.npz")
    run_plan(path, out, segment_settings(path, {"block_shape": [5, 10, 12]}), 2, work / "plan.json")
    for p in range(2):
        run_fragments(out, p, work / f"f{p}.npz")
        run_faces(out, p, work / f"c{p}.npz")
    run_merge(work / "plan.json", [str(work / "f0.npz"), str(work / "f1.npz")], [str(work / "c0.npz"),
              str(work / "c1.npz")], work / "t.npz")
    run_relabel(out, 1, work / "t.npz", work / "d1.json")
    assert json.loads((work / "d1.json").read_text())["blocks"] == [4, 5, 6, 7]
    with pytest.raises(RuntimeError, match=r"blocks \[0, 1, 2, 3\] of 8 were not relabelled"):
        run_finish(out, work / "plan.json", work / "t.npz", [str(work / "d1.json")])
    assert not out.exists()


@pytest.mark.workflow
@pytest.mark.slow
def test_segment_jobs_through_snakemake(project, tmp_path):
    """The tiny demo's predict_0 (16 x 32 x 32) in 8 blocks by 3 jobs per step: the dry run lists
    the parts; a part killed mid-write (its output missing, its blocks scribbled over) is the
    only fragments job the rerun does; the result is the one-job blockwise segmentation bitwise;
    no work file is left, and nothing remains to be done."""
    import shutil

    import yaml

    from test_workflow import jobs_in, snakemake, tiny_config

    own = tmp_path / "own"
    shutil.copytree(project, own, symlinks=True)
    config = tiny_config()
    config["segment"].update(jobs=3, block_shape=[8, 16, 16])
    (own / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    target = "results/segmentations/predict_0.zarr"
    work = own / "results" / "segmentations" / "predict_0.parts"
    steps = {"segment_plan": 1, "segment_fragments": 3, "segment_faces": 3, "segment_merge": 1, "segment_relabel": 3,
             "segment_finish": 1}
    planned = jobs_in(snakemake(own, "-n", target).stdout)
    assert {k: v for k, v in planned.items() if k.startswith("segment")} == steps

    # every part's fragments (kept: a run for this target alone would drop its temporary inputs),
    # then part 1 "killed": its file gone, its blocks overwritten
    snakemake(own, "--notemp", str(work.relative_to(own) / "faces" / "0.npz"))
    assert sorted(p.name for p in (work / "fragments").iterdir()) == ["0.npz", "1.npz", "2.npz"]
    (work / "fragments" / "1.npz").unlink()
    fragments = zarr.open_group(str(work / "fragments.zarr"), mode="r+")["s0"]
    fragments[0:8, 16:32, 16:32] = 12345  # block 3, the first of part 1 (blocks 3-5; C order: z, y, x)
    assert json.loads((work / "plan.json").read_text())["blocks_per_part"] == 3
    rerun = jobs_in(snakemake(own, "-n", target).stdout)
    assert rerun["segment_fragments"] == 1 and "segment_plan" not in rerun
    snakemake(own, target)

    seg = io.read_image(own / target)
    params = {**config["segment"]}
    tuned = own / "results" / "tune" / "segment.json"
    one = run_segment(own / "results" / "predictions" / "predict_0.zarr", tmp_path / "one.zarr", params,
                      tuned=tuned if tuned.exists() else None)
    assert np.array_equal(seg.read(), io.read_image(tmp_path / "one.zarr").read())
    assert seg.attrs["jobs"] == 3 and seg.attrs["segments"] == one["segments"] > 1
    assert not [p for p in work.rglob("*") if p.is_file()]  # temporary files deleted, stores moved or removed
    assert jobs_in(snakemake(own, "-n", target).stdout) == {}


@pytest.mark.workflow
@pytest.mark.slow
def test_segment_jobs_on_the_emulated_lsf(project, tmp_path):
    """The same volume in 3 parts per step through profiles/lsf on the emulated LSF, the first
    fragments job killed for memory: it alone is resubmitted (with more memory), every step's
    parts run as separate LSF jobs, and the segmentation equals the one-job blockwise one."""
    import os
    import shutil
    import sys

    import yaml

    from lsf_emulator import lsf
    from test_cluster import CPU_QUEUE, GPU_QUEUE, attempt_of, cluster_snakemake, profile_copy, rule_of
    from test_workflow import tiny_config

    own = tmp_path / "own"
    shutil.copytree(project, own, symlinks=True)
    config = tiny_config()
    config["segment"].update(jobs=3, block_shape=[8, 16, 16])
    (own / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    state = lsf.configure(tmp_path / "lsf", max_running=4, queues={CPU_QUEUE: {}, GPU_QUEUE: {"gpus": 4}},
                          faults=[{"job_name": "rule_segment_fragments", "memlimit_mb": 12000, "times": 1}])
    bin_dir = lsf.install(tmp_path / "bin", python=sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "LSF_EMULATOR_DIR": str(state),
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    target = "results/segmentations/predict_0.zarr"
    try:
        cluster_snakemake(own, profile_copy("lsf", tmp_path), target, env=env)
    finally:
        lsf.kill_all(state)
    jobs = lsf.all_jobs(state)
    by_rule: dict[str, list[dict]] = {}
    for job in jobs:
        by_rule.setdefault(rule_of(job["name"]), []).append(job)
    assert len(by_rule["segment_faces"]) == 3 and len(by_rule["segment_relabel"]) == 3
    assert len(by_rule["segment_merge"]) == 1
    assert "segment_plan" not in by_rule and "segment_finish" not in by_rule  # local rules
    fragments = by_rule["segment_fragments"]
    assert sorted((attempt_of(j["command"]), j["stat"]) for j in fragments) == [
        (1, "DONE"), (1, "DONE"), (1, "EXIT"), (2, "DONE")]
    tuned = own / "results" / "tune" / "segment.json"
    run_segment(own / "results" / "predictions" / "predict_0.zarr", tmp_path / "one.zarr", config["segment"],
                tuned=tuned if tuned.exists() else None)
    assert np.array_equal(io.read_image(own / target).read(), io.read_image(tmp_path / "one.zarr").read())


def test_the_documented_settings_validate():
    """docs/cluster.md's `segment:` block is a valid config section (schema of the workflow)."""
    import re

    import yaml

    from dinopipe.config import validate_config
    from test_workflow import ROOT

    text = (ROOT / "docs" / "cluster.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if b.startswith("segment:")]
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["segment"].update(yaml.safe_load(block)["segment"])
    assert validate_config(config)["segment"]["jobs"] == 500
