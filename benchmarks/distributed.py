"""Distributed prediction (predict.distributed): CPU cost over one job, dry-run cost per block,
memory of one part job as the volume grows.

A synthetic raw-only volume (raw at 8 nm, predicted on a 16 nm label grid; the texture of one
``dinopipe.demo`` volume of ``TILE`` label voxels, mirrored at its faces to fill it) of
``GRIDS["1x"]`` blocks of ``BLOCK`` label voxels is predicted end to end from raw
(``predict.source: raw``: tiny-ViT features of each block + UNet halo + feature halo computed on
the fly, a UNet of ``UNET``) on the CPU with one torch thread per job, every job in a fresh child
process as a cluster job would be (interpreter, imports, model and backbone loading included),
set up as the workflow's predict scripts set it up (``dinopipe.runtime.one_job_gc``); up to
``PARALLEL`` jobs at a time (each child's CPU seconds and peak RSS are its own):

* cpu: the distributed run (``predict_create``, one ``predict_part`` job per
  ``BLOCKS_PER_JOB`` blocks, ``predict_finish``) over the single-job run (``predict`` with
  the same source: it computes the same blocks with the same halos). User + system CPU
  seconds of the children (``wait4``), every job start included. Goal <= 1.2. What the
  distributed run adds is what every part job pays once (interpreter, torch and transformers
  imports, model and backbone loading: ``part_job_start_cpu_s``) and the finish job; it is
  set against the blocks' work (``per_block_cpu_s``: the single job's CPU less the create
  job's, which pays the same start, checks and intensity range without predicting). For many
  parts the ratio tends to 1 + start / (blocks per job x per-block cost), so the script also
  prints how many blocks a job needs for 1.2 at this block cost
  (``blocks_per_job_for_ratio_1.2``). Also reported, without a goal: the same ratio with the
  Snakemake that a cluster executor starts inside every job (estimated as the CPU of the
  one-part dry run; ``cpu_ratio_with_cluster_snakemake_starts``), and the distributed run over
  the cached-features pipeline (one ``features`` job over the whole volume, then ``predict``
  from the features): what recomputing the backbone on each block's halo costs, a matter of
  block geometry (see docs/distributed.md);
* dry run: ``snakemake -n`` of a project whose plan has ``DRY_BLOCKS`` blocks with one block per
  part job (the worst case: one job per block) and with ``BLOCKS_PER_JOB`` per job, minus the
  same dry run with one part; milliseconds per block, of CPU time (user + system of the
  Snakemake process) and of wall time. Goal <= 5 ms per block with one block per job, judged
  on the CPU time: ``snakemake -n`` runs on one core, so its CPU time is its wall time on an
  idle core, while its wall time on a shared machine is that times the load (printed as
  ``load_average_1min``);
* memory: peak RSS of one part job (``BLOCKS_PER_JOB`` blocks) of the 1x volume and of the
  8x volume (2x per axis), and their ratio. Goal <= 1.1;
* bitwise: the distributed prediction equals the single-job one (must be true).

Why these sizes. A part job's start (3-4.5 CPU-s here, most of it importing torch and
transformers) is fixed, so the CPU ratio says as much about the block size as about the
distribution: with blocks of 8 x 16 x 16 voxels (0.15 CPU-s each) a job needed ~200 of them
to amortise its start. Production blocks are 64^3 to 128^3 label voxels or more
(docs/distributed.md: 64 x 128 x 128) under a ViT on a GPU, with thousands of blocks per job.
Here: blocks of 64^3 label voxels (the low end), a UNet of the default depth (2 levels, halo 24
voxels) with half the default channels, and the backbone's default ``block_halo`` of 8, so each
block's backbone input is (64 + 2 x (24 + 8))^3 = 8 times the block and the UNet's (64 + 48)^3
= 5.4 times: the halo share of a real 64^3 block. 64 blocks (a 256^3 label grid, raw 512^3)
in 4 part jobs of 16: several jobs, several blocks each, and the whole script costs about 12
CPU-minutes (7 minutes of wall time on 2 nearly idle cores, 20 at a load average of 5-8). The tiny ViT makes
a block far cheaper than a real backbone would (ViT-S: 12 layers of width 384, here 2 of 32), so
the ratio measured here is an upper bound for production jobs of the same shape.

Also the per-block throughput (CPU seconds per block of a part job, without the job start)
that docs/distributed.md scales to a 10^12-voxel volume. Progress goes to stderr; the last line
on stdout is one JSON object with the figures and a "goals" key.

Run: .venv/bin/python benchmarks/distributed.py
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import yaml
import zarr

ROOT = Path(__file__).resolve().parents[1]
BLOCK = [64, 64, 64]                   # label voxels (z, y, x): the low end of production blocks
GRIDS = {"1x": (4, 4, 4), "8x": (8, 8, 8)}  # blocks along (z, y, x): 64 and 512 blocks
BLOCKS_PER_JOB = 16                    # 4 part jobs of 16 blocks for the 1x volume
UNET = {"levels": 2, "base_channels": 8}  # the default depth (halo 23 -> 24 voxels), half the channels
FEATURES = {"backbone": "tiny-vit", "planes": ["xy", "xz", "yz"], "stride": None, "batch_size": 16,
            "intensity": "percentile", "low": 0.5, "high": 99.5, "block_halo": 8}
OFFSETS = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [3, 0, 0], [0, 3, 0], [0, 0, 3]]
DRY_BLOCKS = 4096
VOXEL = [16.0, 16.0, 16.0]             # label grid, nm (z, y, x)
RAW_FACTOR = [2, 2, 2]                 # raw voxels per label voxel: raw at 8 nm
TILE = [64, 128, 128]                  # label voxels (z, y, x) of the demo volume the volumes mirror
DATA = {"output_voxel_size": VOXEL}  # the volumes have no labels: predict on the 16 nm grid
PARALLEL = max(1, min(4, os.cpu_count() or 1))  # jobs at a time (one torch thread each)

CHILD = """
import json, sys
from dinopipe.logs import logged
from dinopipe.runtime import one_job_gc, peak_resident_mb
from dinopipe import stages
args = json.loads(sys.argv[1])
with logged(args.pop("log")):
    one_job_gc()  # as the workflow's predict scripts do
    if "volume" in args:
        args["volume"] = stages.volume_from_dict(args["volume"])
    getattr(stages, args.pop("function"))(*args.pop("args"), **args)
print(json.dumps({"peak_rss_mb": peak_resident_mb()}))
"""


def child(function: str, *args, log: Path, **kwargs) -> dict:
    """Run one dinopipe.stages function in a fresh Python, as one cluster job: CPU s (``wait4``),
    peak RSS MB (the child's own ``VmHWM``: ``wait4``'s ``ru_maxrss`` would include this
    process's peak, see ``dinopipe.runtime.peak_resident_mb``)."""
    payload = json.dumps({"function": function, "args": list(args), "log": str(log), **kwargs}, default=str)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, payload], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # it logs into ``log``
    out = proc.stdout.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"{function} failed ({status}); see {log}:\n{Path(log).read_text()[-3000:]}")
    return {"cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": json.loads(out.splitlines()[-1])["peak_rss_mb"]}


def make_tile(seed: int) -> np.ndarray:
    """The raw (uint8, z, y, x; ``TILE`` x ``RAW_FACTOR`` voxels) of one synthetic demo volume."""
    from dinopipe.demo import make_demo_volume

    return make_demo_volume(seed, label_shape=tuple(TILE), raw_factor=tuple(RAW_FACTOR))[0]


def make_volume(root: Path, name: str, grid: tuple[int, int, int], tile: np.ndarray) -> dict:
    """A raw-only OME-Zarr volume of ``grid`` blocks of ``BLOCK`` label voxels (raw at ``VOXEL`` /
    ``RAW_FACTOR``), filled with ``tile`` mirrored at its faces (continuous texture; generating
    the demo at this size would cost minutes and gigabytes), and its sheet row."""
    from dinopipe.ngff import create_image

    shape = [g * b * f for g, b, f in zip(grid, BLOCK, RAW_FACTOR)]
    reps = [s // t for s, t in zip(shape, tile.shape)]
    if any(r * t != s for r, t, s in zip(reps, tile.shape, shape)):
        raise ValueError(f"raw shape {shape} is not a whole number of tiles {list(tile.shape)}")
    rvs = [v / f for v, f in zip(VOXEL, RAW_FACTOR)]
    path = root / f"{name}-raw.zarr"  # not {name}.zarr: the distributed run writes its predictions there
    zarr.open_group(str(path), mode="w", zarr_format=2)
    raw = create_image(path / "raw", shape, np.uint8, rvs, [v / 2 for v in rvs], name="raw")
    for index in np.ndindex(*reps):
        mirrored = tile[tuple(slice(None, None, -1) if i % 2 else slice(None) for i in index)]
        raw[tuple(slice(i * t, (i + 1) * t) for i, t in zip(index, tile.shape))] = mirrored
    return {"name": name, "raw": f"{path}/raw", "labels": None, "role": "predict", "roi": None}


def make_model(root: Path) -> Path:
    """A model folder as train() writes it (random weights) for the tiny ViT's features."""
    import torch

    from dinopipe.backbone import load_backbone
    from dinopipe.checkpoint import build_model_config, save_checkpoint
    from dinopipe.io import write_json
    from dinopipe.unet import UNet3D, UNetConfig, output_channels

    channels = load_backbone("tiny-vit").channels
    torch.manual_seed(0)
    config = UNetConfig(in_channels=channels, out_channels=output_channels(len(OFFSETS), True), **UNET)
    model_dir = root / "model"
    model_dir.mkdir()
    save_checkpoint(model_dir / "checkpoint.pt", UNet3D(config), None, step=0)
    write_json(model_dir / "model_config.json", build_model_config(config, OFFSETS, True, None))
    return model_dir


def params(**extra) -> dict:
    return {"source": "raw", "block_shape": BLOCK, "batch_size": 1, "feature_halo": None, "device": "cpu",
            "autocast": "none", **extra}


def in_parallel(calls: list[Callable[[], Any]]) -> list[Any]:
    """``calls`` (each starts child processes and waits for them), ``PARALLEL`` at a time: the
    wall time is shorter on several cores; each child's CPU seconds and peak RSS are its own."""
    with ThreadPoolExecutor(PARALLEL) as pool:
        return list(pool.map(lambda call: call(), calls))


def distributed_run(root: Path, model: Path, volume: dict, tag: str, parts: list[int] | None = None) -> dict:
    """create + the parts (all, or those listed; ``PARALLEL`` at a time, as a cluster runs them) +
    finish (when all ran), each a child process."""
    from dinopipe.distributed import part_names

    d = root / f"{tag}.parts"
    plan, staging = d / "plan.json", d / "staging.zarr"
    p = params(distributed={"blocks_per_job": BLOCKS_PER_JOB})
    common = {"volume": volume, "features": FEATURES, "data": DATA, "threads": 1}
    runs = {"create": child("run_predict_create", None, model, staging, plan, p, log=root / f"{tag}-create.log",
                            **common)}
    runs["create"]["known"] = json.loads(plan.read_text())["known"]
    names = part_names(plan) if parts is None else [str(i) for i in parts]
    runs["parts"] = in_parallel([
        lambda n=n: child("run_predict_part", None, model, plan, staging, d / f"{n}.done", int(n), p,
                          log=root / f"{tag}-part{n}.log", **common) for n in names])
    if parts is None:
        runs["finish"] = child("run_predict_finish", plan, staging, [str(d / f"{n}.done") for n in names],
                               root / f"{tag}.zarr", log=root / f"{tag}-finish.log")
    runs["markers"] = [json.loads((d / f"{n}.done").read_text()) for n in names]
    return runs


def dry_run_seconds(root: Path, blocks: int, per_job: int) -> dict[str, float]:
    """Wall and CPU seconds (user + system) of ``snakemake -n`` of results/predictions/big.zarr when the plan has ``blocks`` blocks, ``per_job``
    per part: a project whose upstream outputs exist (placeholders, dated in order) so that only the
    part jobs and the finish are to run."""
    from dinopipe.distributed import write_plan
    from dinopipe.parts import BlockPlan
    from dinopipe.stages import run_demo_data

    project = root / f"dry-{blocks}-{per_job}"
    (project / "config").mkdir(parents=True)
    data = root / "dry-data.zarr"
    if not data.exists():
        run_demo_data("d", data, seed=0, label_shape=[24, 32, 32], label_voxel_size=VOXEL, raw_factor=[2, 2, 2])
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["predict"]["distributed"] = {"blocks_per_job": per_job}
    config["data"]["output_voxel_size"] = VOXEL
    (project / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    (project / "config" / "volumes.tsv").write_text(
        "name\traw\tlabels\trole\troi\n"
        f"t\t{data}/raw\t{data}/labels\ttrain\t\nbig\t{data}/raw\t\tpredict\t\n")
    t0 = time.time() - 100
    os.utime(data, (t0 - 10, t0 - 10))  # the input store (dated by its folder) before every output
    for i, rel in enumerate(["results/features/t.zarr/", "results/features/big.zarr/", "results/targets/t.zarr/",
                             "results/model/checkpoint.pt", "results/model/model_config.json",
                             "results/predictions/big.parts/staging.zarr/", "results/predictions/big.parts/plan.json"]):
        path = project / rel
        if rel.endswith("/"):
            path.mkdir(parents=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not rel.endswith("plan.json"):
                path.write_text("placeholder")
        if rel.endswith("plan.json"):
            plan = BlockPlan((64, 16, 16 * blocks), (64, 16, 16), per_job)
            write_plan(path, plan, volume="big", plan_id="x", extra={"images": ["affinities"], "known": {}})
        os.utime(path, (t0 + i, t0 + i))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "workflow" / "Snakefile"), "--directory",
           str(project), "--cores", "1", "-n", "results/predictions/big.zarr", "--rerun-triggers", "mtime"]
    log = root / f"dry-{blocks}-{per_job}.log"
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    text = log.read_text()
    if status != 0:
        raise RuntimeError(text[-6000:])
    jobs = {}
    table = text.split("Job stats:")[-1]
    for line in table.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].isdigit():
            jobs[fields[0]] = int(fields[1])
    expected = -(-blocks // per_job)
    if jobs.get("predict_part") != expected:
        raise RuntimeError(f"dry run lists {jobs} for {blocks} blocks at {per_job} per job, expected {expected} parts:"
                           f"\n{text[-4000:]}")
    return {"wall_s": seconds, "cpu_s": usage.ru_utime + usage.ru_stime}


def note(what: str, start: float) -> None:
    """Progress on stderr (the figures go to stdout)."""
    print(f"[{time.perf_counter() - start:6.0f} s, load {os.getloadavg()[0]:.1f}] {what}", file=sys.stderr, flush=True)


def per_dry_block(many: dict[str, float], one: dict[str, float], key: str) -> float:
    """Milliseconds per block of the big dry run beyond the one-part dry run (``key``: wall_s or cpu_s)."""
    return round(1000 * (many[key] - one[key]) / (DRY_BLOCKS - BLOCKS_PER_JOB), 3)


def main() -> None:
    import logging

    from dinopipe.atomic import directory_size

    logging.basicConfig(level=logging.WARNING)
    start = time.perf_counter()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dinopipe-distributed-") as tmp:
        root = Path(tmp)
        model = make_model(root)
        tile = make_tile(seed=1)
        v1 = make_volume(root, "v1", GRIDS["1x"], tile)
        v8 = make_volume(root, "v8", GRIDS["8x"], tile)
        common = {"volume": v1, "features": FEATURES, "data": DATA, "threads": 1}
        # single job from raw (what rule predict runs), and features + predict from features
        note(f"volumes made; the single job ({int(np.prod(GRIDS['1x']))} blocks) beside the features job and "
             "the prediction from features", start)

        def features_then_predict() -> tuple[dict, dict]:
            feats = child("run_features", out_path=root / "features.zarr", features=FEATURES, data=DATA, volume=v1,
                          threads=1, log=root / "features.log")
            return feats, child("run_predict", root / "features.zarr", model, root / "cached.zarr",
                                params(source="features"), log=root / "cached.log", volume=v1, data=DATA, threads=1)

        single, (feats, cached) = in_parallel([
            lambda: child("run_predict", None, model, root / "single.zarr", params(), log=root / "single.log",
                          **common),
            features_then_predict])
        note("distributed run", start)
        dist = distributed_run(root, model, v1, "v1")
        a, b = (zarr.open_group(str(root / s), mode="r") for s in ("single.zarr", "v1.zarr"))
        bitwise = all(np.array_equal(a[n]["s0"][...], b[n]["s0"][...]) for n in ("affinities", "lsds"))
        stored = directory_size(root / "v1.zarr") / sum(b[n]["s0"].nbytes for n in ("affinities", "lsds"))
        note("one part of the 8x volume; a part job's start alone", start)
        one8 = distributed_run(root, model, v8, "v8", parts=[0])
        # what a part job does before its first block (interpreter, imports, the plan's intensity
        # range, model and backbone), then exits
        start_only = child("_prediction_inputs", None, model, params(), log=root / "start.log", volume=v1,
                           features=FEATURES, data=DATA, known=dist["create"]["known"])
        dist_cpu = dist["create"]["cpu_s"] + sum(p["cpu_s"] for p in dist["parts"]) + dist["finish"]["cpu_s"]
        blocks = int(np.prod(GRIDS["1x"]))
        note("dry runs", start)
        dry_one = dry_run_seconds(root, BLOCKS_PER_JOB, BLOCKS_PER_JOB)
        dry_each = dry_run_seconds(root, DRY_BLOCKS, 1)
        dry_grouped = dry_run_seconds(root, DRY_BLOCKS, BLOCKS_PER_JOB)
    rss1, rss8 = dist["parts"][0]["peak_rss_mb"], one8["parts"][0]["peak_rss_mb"]
    # CPU seconds per block (the single job less its start, which the create job measures alone:
    # the same imports, model and backbone loading, input checks and intensity range) and the
    # fixed cost of starting one part job (interpreter, imports, model and backbone), measured alone
    per_block = (single["cpu_s"] - dist["create"]["cpu_s"]) / blocks
    job_start = start_only["cpu_s"]
    result = {
        "benchmark": "distributed",
        "block_label_voxels": BLOCK,
        "blocks": blocks,
        "blocks_per_job": BLOCKS_PER_JOB,
        "parts": len(dist["parts"]),
        "bitwise_equal_to_single_job": bitwise,
        "cpu_s": {"single_job": round(single["cpu_s"], 2), "distributed": round(dist_cpu, 2),
                  "create": round(dist["create"]["cpu_s"], 2), "finish": round(dist["finish"]["cpu_s"], 2),
                  "parts": [round(p["cpu_s"], 2) for p in dist["parts"]],
                  "features_job": round(feats["cpu_s"], 2), "predict_from_features_job": round(cached["cpu_s"], 2)},
        "cpu_ratio_distributed_over_single_job": round(dist_cpu / single["cpu_s"], 3),
        "cpu_ratio_distributed_over_features_then_predict": round(dist_cpu / (feats["cpu_s"] + cached["cpu_s"]), 3),
        "per_block_cpu_s": round(per_block, 4),
        "per_block_voxels": int(np.prod(BLOCK)),
        "voxels_per_cpu_s": round(np.prod(BLOCK) / per_block),
        "part_job_start_cpu_s": round(job_start, 2),
        # the same derived from the parts: their CPU less their blocks at the single job's per-block
        # cost (carries the blocks' ~10 % variation with the machine's load, and their geometry)
        "part_job_cpu_s_beyond_its_blocks": round(
            float(np.mean([p["cpu_s"] for p in dist["parts"]])) - BLOCKS_PER_JOB * per_block, 2),
        # for many parts the ratio tends to 1 + job start / (blocks per job x per-block cost)
        "blocks_per_job_for_ratio_1.2": int(np.ceil(job_start / (0.2 * per_block))),
        "dry_run_s": {k: {"wall": round(v["wall_s"], 2), "cpu": round(v["cpu_s"], 2)} for k, v in (
            ("one_part", dry_one), (f"{DRY_BLOCKS}_blocks_1_per_job", dry_each),
            (f"{DRY_BLOCKS}_blocks_{BLOCKS_PER_JOB}_per_job", dry_grouped))},
        "dry_run_ms_per_block_1_per_job": per_dry_block(dry_each, dry_one, "wall_s"),
        "dry_run_cpu_ms_per_block_1_per_job": per_dry_block(dry_each, dry_one, "cpu_s"),
        "dry_run_ms_per_block": per_dry_block(dry_grouped, dry_one, "wall_s"),
        # a cluster job (LSF, SLURM executors) starts Snakemake itself to run its one job: about the
        # CPU of the one-part dry run, once for the single job and once for each distributed job
        "cpu_ratio_with_cluster_snakemake_starts": round(
            (dist_cpu + (len(dist["parts"]) + 2) * dry_one["cpu_s"]) / (single["cpu_s"] + dry_one["cpu_s"]), 3),
        "stored_over_uncompressed": round(stored, 3),
        "part_peak_rss_mb": {"1x": round(rss1, 1), "8x": round(rss8, 1)},
        "part_rss_ratio_8x_over_1x": round(rss8 / rss1, 3),
        "cpus": os.cpu_count(),
        "load_average_1min": {"start": round(load_before[0], 2), "end": round(os.getloadavg()[0], 2)},
        "platform": platform.platform(),
        "wall_s": round(time.perf_counter() - start, 1),
    }
    result["goals"] = {
        "cpu_ratio_le_1.2": result["cpu_ratio_distributed_over_single_job"] <= 1.2,
        "dry_run_ms_per_block_le_5": result["dry_run_cpu_ms_per_block_1_per_job"] <= 5,
        "part_rss_ratio_le_1.1": result["part_rss_ratio_8x_over_1x"] <= 1.1,
        "bitwise": bitwise,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
