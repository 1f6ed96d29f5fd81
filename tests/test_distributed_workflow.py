"""Distributed prediction through real Snakemake: one volume in 8 blocks over 4 part jobs, locally
and through profiles/lsf on the emulated LSF (tests/lsf_emulator), against the single-job prediction.

One project (module-scoped) is run in steps as a user would meet them: two parts by name, a
third part interrupted mid-write (a chunk half written, no marker), a dry run that lists the
parts that remain, the rerun that finishes the volume. The same project's prediction is then
repeated through the emulated LSF with one part job killed (for memory) and resubmitted.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from dinopipe.config import job_settings, result_params
from dinopipe.stages import run_predict, volume_from_dict
from lsf_emulator import lsf
from test_cluster import CPU_QUEUE, GPU_QUEUE, cluster_snakemake, profile_copy, rule_of
from test_cluster_docs import DOC_VOLUME, documented_commands
from test_workflow import ROOT, jobs_in, snakemake, tiny_config, write_project

pytestmark = [pytest.mark.workflow, pytest.mark.slow]

VOLUME = "predict_0"
PARTS = f"results/predictions/{VOLUME}.parts"
DOCS = ROOT / "docs" / "distributed.md"


def distributed_config() -> dict:
    """The tiny demo (label grid 16 x 32 x 32) in 8 blocks of 8 x 16 x 16, 2 blocks per part job."""
    config = tiny_config()
    config["predict"]["block_shape"] = [8, 16, 16]
    config["predict"]["distributed"] = {"blocks_per_job": 2}
    return config


def single_job_prediction(project: Path, out: Path) -> Path:
    """What rule predict writes for the volume (same params, one job), by its library call."""
    from dinopipe.sheet import read_sheet

    config = distributed_config()
    config["predict"] = {**config["predict"], "device": "cpu"}
    (row,) = [v for v in read_sheet(str(project / "config" / "volumes.tsv")) if v.name == VOLUME]
    cwd = os.getcwd()
    os.chdir(project)  # the sheet's paths are relative to the project
    try:
        run_predict(f"results/features/{VOLUME}.zarr", "results/model", str(out),
                    job_settings({**result_params(config, "predict"), "distributed": None}, config, "predict"),
                    threads=1, volume=volume_from_dict(row.to_record()))
    finally:
        os.chdir(cwd)
    return out


def arrays(store: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(store), mode="r")
    return {name: np.asarray(group[name]["s0"][...]) for name in sorted(group.group_keys())}


def assert_bitwise_equal(store: Path, reference: Path) -> None:
    got, want = arrays(store), arrays(reference)
    assert list(got) == list(want) == ["affinities", "lsds"]
    for name in want:
        assert want[name].std() > 1e-4, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def documented(cluster: bool = False, blocks: bool = False) -> list[str]:
    """The snakemake commands of docs/distributed.md's bash blocks for the test volume: the local
    ones for parts, or (``cluster``) those through profiles/lsf, or (``blocks``) those that
    predict one block again; each is run by a test here."""
    commands = list(dict.fromkeys(c.replace(DOC_VOLUME, VOLUME) for c in documented_commands(DOCS, "snakemake ")))
    block = [c for c in commands if "/blocks/" in c]
    local = [c for c in commands if "--profile" not in c and c not in block]
    lsf_ = [c for c in commands if c.startswith("snakemake --profile profiles/lsf --workflow-profile none ")]
    assert len(local) + len(lsf_) + len(block) == len(commands), commands
    assert len(local) == 3 and len(lsf_) == 2 and len(block) == 2, commands
    return block if blocks else lsf_ if cluster else local


def run_documented(project: Path, command: str):
    args = shlex.split(command)[1:]
    assert "--profile" not in args
    return snakemake(project, *args)


@pytest.fixture(scope="module")
def steps(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("distributed")
    project = base / "project"
    write_project(project, distributed_config())
    out: dict = {"dir": project, "base": base}
    dry, one_part, rest = documented()
    # two parts by name: trains the model first
    out["named"] = snakemake(project, f"{PARTS}/0.done", f"{PARTS}/1.done")
    # part 2 interrupted mid-write: one of its chunks half written, no marker
    chunk = project / PARTS / "staging.zarr" / "affinities" / "s0" / "0" / "1" / "0" / "0"
    assert not chunk.exists()
    chunk.parent.mkdir(parents=True, exist_ok=True)
    chunk.write_bytes(b"\x02\x01half a chunk")
    out["dry"] = run_documented(project, dry)
    out["part"] = run_documented(project, one_part)  # part 2 by name: redone over the half-written chunk
    out["rest"] = run_documented(project, rest)
    out["after"] = snakemake(project, "-n", f"results/predictions/{VOLUME}.zarr")
    out["reference"] = single_job_prediction(project, base / "single.zarr")
    out["first"] = arrays(project / "results" / "predictions" / f"{VOLUME}.zarr")
    # docs/distributed.md, "Not yet": recompute a finished volume
    (command,) = re.findall(r"`(snakemake \S+ --forcerun predict_create)`", DOCS.read_text())
    out["again"] = run_documented(project, command.replace(DOC_VOLUME, VOLUME))
    return out


def test_dry_run_lists_the_parts_that_remain(steps):
    assert jobs_in(steps["named"].stdout + steps["named"].stderr).get("predict_part") == 2
    dry = steps["dry"].stdout + steps["dry"].stderr
    assert jobs_in(dry) == {"predict_part": 2, "predict_finish": 1}, dry
    # each remaining job names its blocks, as docs/distributed.md shows
    assert "predict predict_0: part 2 of 4 of predict_0: blocks 4-5 of 8" in dry
    assert "part 3 of 4 of predict_0: blocks 6-7 of 8" in dry
    example = re.search(r"`(predict vol_003: part 2 of 4 [^`]+)`", DOCS.read_text()).group(1)
    assert example.replace(DOC_VOLUME, VOLUME) in dry
    assert jobs_in(steps["part"].stdout + steps["part"].stderr) == {"predict_part": 1}
    assert jobs_in(steps["rest"].stdout + steps["rest"].stderr) == {"predict_part": 1, "predict_finish": 1}
    assert "Nothing to be done" in steps["after"].stdout + steps["after"].stderr


def test_interrupted_part_is_redone_and_equals_the_single_job_bitwise(steps):
    project = steps["dir"]
    store = project / "results" / "predictions" / f"{VOLUME}.zarr"
    for name, array in steps["first"].items():
        np.testing.assert_array_equal(array, arrays(steps["reference"])[name], err_msg=name)
    assert zarr.open_group(str(store)).attrs["dinopipe"]["distributed"] == {"parts": 4, "blocks_per_part": 2,
                                                                            "blocks": 8}
    assert sorted(p.name for p in (project / PARTS).glob("*.done")) == ["0.done", "1.done", "2.done", "3.done"]
    assert not (project / PARTS / "staging.zarr").exists()
    log = (project / "logs" / "predict_part" / VOLUME / "2.log").read_text()
    assert "blocks 4-5 of 8" in log


def test_forcerun_recomputes_a_finished_volume(steps):
    out = steps["again"].stdout + steps["again"].stderr
    # the parts join the DAG after the checkpoint, so the first job table lists create and finish
    assert jobs_in(out.split("Job stats:")[1]) == {"predict_create": 1, "predict_finish": 1}, out
    assert set(re.findall(r"predict predict_0: part (\d) of 4 of predict_0", out)) == {"0", "1", "2", "3"}, out
    assert_bitwise_equal(steps["dir"] / "results" / "predictions" / f"{VOLUME}.zarr", steps["reference"])


def test_lsf_distributed_prediction_with_a_killed_part(steps):
    """The prediction again through profiles/lsf on the emulated LSF: part 2's job is killed for
    memory on its first attempt and resubmitted; the store equals the single-job one bitwise."""
    base = steps["base"]
    project = base / "cluster"
    shutil.copytree(steps["dir"], project, symlinks=True)
    shutil.rmtree(project / "results" / "predictions")
    killed = f"rule_predict_part:volume={VOLUME},part=2"
    state = lsf.configure(base / "lsf", max_running=4, queues={CPU_QUEUE: {}, GPU_QUEUE: {"gpus": 4}},
                          faults=[{"job_name": killed, "memlimit_mb": 40000}])
    bin_dir = lsf.install(base / "bin", python=sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "LSF_EMULATOR_DIR": str(state),
           "PYTHONUNBUFFERED": "1"}
    dry, launch = sorted(documented(cluster=True), key=lambda c: " -n " not in c)
    profile = profile_copy("lsf", base)
    try:
        before = cluster_snakemake(project, profile, *shlex.split(dry)[5:], env=env)
        proc = cluster_snakemake(project, profile, *shlex.split(launch)[5:], env=env)
        after = cluster_snakemake(project, profile, *shlex.split(dry)[5:], env=env)
    finally:
        lsf.kill_all(state)
    jobs = lsf.all_jobs(state)
    # before the plan exists the dry run knows the create and finish jobs, not the parts
    assert jobs_in(before.stdout + before.stderr) == {"predict_create": 1, "predict_finish": 1}
    assert "Nothing to be done" in after.stdout + after.stderr
    assert sorted(rule_of(j["name"]) for j in jobs) == ["predict_create", "predict_finish",
                                                      *["predict_part"] * 5], [j["name"] for j in jobs]
    tries = [j for j in jobs if killed in j["name"]]
    assert [(j["stat"], j["mem_total_mb"]) for j in tries] == [("EXIT", 32000), ("DONE", 64000)]
    parts = [j for j in jobs if rule_of(j["name"]) == "predict_part"]
    assert all(j["queue"] == GPU_QUEUE and j["gpus"] == 1 for j in parts)
    assert re.search(r"part 2 of 4 of predict_0: blocks 4-5 of 8", proc.stdout + proc.stderr)
    assert_bitwise_equal(project / "results" / "predictions" / f"{VOLUME}.zarr", steps["reference"])


def test_switching_distributed_on_reruns_nothing(project, tmp_path):
    """README, "What reruns when": on a project predicted by one job per volume, switching
    predict.distributed on reruns nothing (the predictions would be the same); forcing
    predict_create re-predicts the volumes, and only what follows."""
    config = tiny_config()
    config["predict"]["distributed"] = {"blocks_per_job": 2}
    path = tmp_path / "distributed.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = snakemake(project, "-n", "--configfile", str(path))
    assert "Nothing to be done" in proc.stdout + proc.stderr
    proc = snakemake(project, "-n", "--configfile", str(path), "--forcerun", "predict_create")
    jobs = jobs_in(proc.stdout + proc.stderr)
    assert jobs.get("predict_create") and jobs.get("predict_finish"), jobs
    assert not {"features", "targets", "train", "metadata"} & set(jobs), jobs


def test_another_blocks_per_job_recreates_the_plan(steps, tmp_path):
    """docs/distributed.md: on a distributed project, another blocks_per_job reruns predict_create
    (its params changed), and with it every part."""
    config = distributed_config()
    config["predict"]["distributed"] = {"blocks_per_job": 4}
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = snakemake(steps["dir"], "-n", f"results/predictions/{VOLUME}.zarr", "--configfile", str(path))
    out = proc.stdout + proc.stderr
    jobs = jobs_in(out)
    assert jobs.get("predict_create") == 1 and jobs.get("predict_finish") == 1, out
    assert not {"features", "targets", "train"} & set(jobs), jobs
    assert re.search(r"params have changed", out, re.I), out


def test_lsf_prediction_and_segmentation_in_parts_killed_mid_write(project, tmp_path):
    """Issue #17's proof: predict.distributed and segment.jobs together through profiles/lsf on the
    emulated LSF. predict_0 (16 x 32 x 32) is 8 blocks: 4 prediction parts of 2 blocks, 3
    segmentation parts of 3, 3, 2 blocks. The first run dies twice mid-write: prediction part 2
    while writing its first chunk (half a chunk file, no marker), and, in the second run,
    segmentation part 1 while writing its first fragments chunk; each run without retries, so the
    dry run between them lists exactly what is missing and the next run redoes only that. The
    prediction equals the single-job prediction bitwise, the segmentation the one-job blockwise
    one. Then docs/distributed.md's block commands: an intact block predicted again leaves
    nothing to do; a corrupted one is rewritten bitwise as before, and Snakemake resegments."""
    from dinopipe import io
    from dinopipe.stages import run_segment

    own = tmp_path / "own"
    shutil.copytree(project, own, symlinks=True)
    for stale in ("predictions/predict_0.zarr", "predictions/predict_0.parts", "segmentations/predict_0.zarr"):
        shutil.rmtree(own / "results" / stale, ignore_errors=True)
    config = distributed_config()
    config["segment"].update(jobs=3, block_shape=[8, 16, 16], tune=False)
    (own / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    target = f"results/segmentations/{VOLUME}.zarr"
    killed_part = f"rule_predict_part:volume={VOLUME},part=2"
    killed_fragments = f"rule_segment_fragments:volume={VOLUME},part=1"
    state = lsf.configure(tmp_path / "lsf", max_running=4, queues={CPU_QUEUE: {}, GPU_QUEUE: {"gpus": 4}}, faults=[
        # block 4, the first of part 2: chunk (c, z, y, x) = (0, 1, 0, 0), written by zarr as a temporary file
        {"job_name": killed_part, "die_writing": f"{PARTS}/staging.zarr/affinities/s0/0/1/0/0.*", "times": 1},
        {"job_name": killed_fragments, "die_writing": f"results/segmentations/{VOLUME}.parts/fragments.zarr/s0/*",
         "times": 1},
    ])
    bin_dir = lsf.install(tmp_path / "bin", python=sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "LSF_EMULATOR_DIR": str(state),
           "PYTHONUNBUFFERED": "1"}
    profile = profile_copy("lsf", tmp_path)
    once = ("--retries", "0", "--keep-going", target)
    try:
        with pytest.raises(AssertionError, match="failed"):
            cluster_snakemake(own, profile, *once, env=env)
        dry_1 = snakemake(own, "-n", target)
        with pytest.raises(AssertionError, match="failed"):
            cluster_snakemake(own, profile, *once, env=env)
        dry_2 = snakemake(own, "-n", target)
        cluster_snakemake(own, profile, target, env=env)
    finally:
        lsf.kill_all(state)
    jobs = lsf.all_jobs(state)

    # each kill: one job EXIT, nothing else of its step resubmitted
    def tries(name: str) -> list[str]:
        return [j["stat"] for j in jobs if name in j["name"]]
    assert tries(killed_part) == ["EXIT", "DONE"] and tries(killed_fragments) == ["EXIT", "DONE"]
    counts: dict[str, int] = {}
    for job in jobs:
        counts[rule_of(job["name"])] = counts.get(rule_of(job["name"]), 0) + 1
    assert counts == {"predict_create": 1, "predict_part": 5, "predict_finish": 1, "segment_fragments": 4,
                      "segment_faces": 3, "segment_merge": 1, "segment_relabel": 3}, counts
    segment_steps = {"segment_plan": 1, "segment_fragments": 3, "segment_faces": 3, "segment_merge": 1,
                     "segment_relabel": 3, "segment_finish": 1}
    dry = dry_1.stdout + dry_1.stderr
    assert jobs_in(dry) == {"predict_part": 1, "predict_finish": 1, **segment_steps}, dry
    assert "part 2 of 4 of predict_0: blocks 4-5 of 8" in dry
    staged = sorted((own / PARTS).glob("*.done"))  # (staging moved since; markers stay)
    assert [p.name for p in staged] == ["0.done", "1.done", "2.done", "3.done"]
    dry = dry_2.stdout + dry_2.stderr
    assert jobs_in(dry) == {k: v for k, v in {**segment_steps, "segment_fragments": 1}.items()
                            if k != "segment_plan"}, dry
    assert "Nothing to be done" in (lambda p: p.stdout + p.stderr)(snakemake(own, "-n", target))

    store = own / "results" / "predictions" / f"{VOLUME}.zarr"
    reference = single_job_prediction(own, tmp_path / "single.zarr")
    assert_bitwise_equal(store, reference)
    assert not list(store.rglob("*.partial")), "the half-written chunk of the killed part was left in the store"
    seg = io.read_image(own / target)
    run_segment(store, tmp_path / "one.zarr", config["segment"])
    one = io.read_image(tmp_path / "one.zarr")
    assert np.array_equal(seg.read(), one.read()) and seg.attrs["jobs"] == 3 and one.attrs["segments"] > 1

    # docs/distributed.md: one block by index, intact (nothing downstream reruns) ...
    first, forced = documented(blocks=True)
    ran = run_documented(own, first)
    assert jobs_in(ran.stdout + ran.stderr) == {"predict_block": 1}
    record = json.loads((own / PARTS / "blocks" / "5.json").read_text())
    assert record["block"] == 5 and not record["changed"]
    assert "Nothing to be done" in (lambda p: p.stdout + p.stderr)(snakemake(own, "-n", target))
    # ... and corrupted (a chunk of block 5 = (z, y, x) (1, 0, 1) scribbled over): rewritten as before
    chunk = store / "affinities" / "s0" / "0" / "1" / "0" / "1"
    chunk.write_bytes(b"\x02\x01half a chunk")
    ran = run_documented(own, forced)
    assert jobs_in(ran.stdout + ran.stderr) == {"predict_block": 1}
    assert json.loads((own / PARTS / "blocks" / "5.json").read_text())["changed_images"] == ["affinities"]
    assert_bitwise_equal(store, reference)
    recorded = zarr.open_group(str(store)).attrs["dinopipe"]["recomputed_blocks"]
    assert [(r["block"], r["changed"]) for r in recorded] == [(5, False), (5, True)]
    dry = snakemake(own, "-n", target)
    assert jobs_in(dry.stdout + dry.stderr) == segment_steps, dry.stdout  # the segmentation read the old block
