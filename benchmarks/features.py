"""The whole features stage against the bare backbone, time and memory, in two cases.

ViT-S/16 architecture (real size: 384 channels, 12 layers; random weights, saved as a local
snapshot so the stage loads it like any backbone), raw 2x finer than the output grid:

* ``512``: raw 16 x 512 x 512 uint8 at 4 nm, features on 8 x 256 x 256 at 8 nm, plane xy only:
  512-px slices, so the backbone's activations are large and the resampled token grids are
  384 x 256 x 256 per output slice; the accumulator (805 MB) fits, the whole-volume path.
* ``blockwise``: raw 64 x 128 x 128 at 4 nm, features on 32 x 64 x 64 at 8 nm, three planes,
  ``features.max_memory_mb`` 163, below the 192 MB accumulator, so the stage takes the
  blockwise path: 4 blocks of 32^3 chosen by :meth:`FeatureParams.blocking`, halo 8 output
  voxels (grown blocks 32 x 40 x 40, 75 MB), ``context_nm`` 0 (each block reads the raw under
  its grown block only) to keep the run short.

For each case, in fresh child processes:

* pipeline: :func:`dinopipe.stages.run_features` on an OME-Zarr raw store: read, intensity
  range, slices, backbone, resampling, accumulation, float16 cast, write of the store. Its
  time is the stage's wall time less loading the model (``timings.load_s``, a once-per-job
  cost the bare run does not pay either).
* bare: the model's forward alone (``model(pixel_values=...)``, no_grad) on exactly the same
  slices (same blocks, planes, crops, image sizes) at the same batch size, prepared (not
  timed) one batch at a time.

Printed per case: time ratio pipeline / bare (goal <= 1.15; also as CPU time over all threads,
the stage's model load taken as the bare child's, and as the stage's time over its own
backbone calls — the steadiest on a shared machine, where the two children may meet different
loads, but blind to the stage slowing the backbone itself), and peak RSS of the pipeline
above the child's RSS after its imports (interpreter, torch, transformers, dinopipe) against
what must be held (goal <= 1.5): the float32 accumulator (whole volume, or the largest grown
block) plus the bare run's own peak above its imports (model, one batch of images and the
backbone's activations, the raw slab). The last line is one JSON object.

Run: .venv/bin/python benchmarks/features.py  (about 4 minutes on 2 quiet cores, 10 on busy
ones; BENCH_THREADS sets torch's threads, default 2; BENCH_REPEATS=N runs bare and stage
alternately N times and takes the fastest of each, steadier on a shared machine)
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: The two cases: raw shape (z, y, x) voxels, raw and output voxel size (nm, isotropic),
#: planes, batch size, features.max_memory_mb, features.block_halo (output voxels).
CASES: dict[str, dict[str, Any]] = {
    "512": {"raw_shape": [16, 512, 512], "raw_nm": 4.0, "out_nm": 8.0, "planes": ["xy"], "batch_size": 8,
            "max_memory_mb": 8192.0, "block_halo": 8},
    "blockwise": {"raw_shape": [64, 128, 128], "raw_nm": 4.0, "out_nm": 8.0, "planes": ["xy", "xz", "yz"],
                  "batch_size": 16, "max_memory_mb": 163.0, "block_halo": 8, "context_nm": 0.0},
}

GOAL_TIME = 1.15
GOAL_MEMORY = 1.5


def threads() -> int:
    return int(os.environ.get("BENCH_THREADS", "2"))


def save_vit_s16(path: Path) -> float:
    """Save a ViT-S/16 DINOv3 with seeded random weights as a transformers snapshot; its MB."""
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    model = DINOv3ViTModel(DINOv3ViTConfig(num_register_tokens=4)).eval()  # ViT-S/16: 384 ch, 12 layers
    model.save_pretrained(path)
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def write_raw(path: Path, shape: list[int], voxel_nm: float, seed: int = 0) -> None:
    """A uint8 raw (z, y, x) with EM-like structure (smooth blobs plus noise) as OME-Zarr."""
    import numpy as np

    from dinopipe import io

    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=[max(2, s // 8) for s in shape])
    smooth = np.kron(coarse, np.ones((8, 8, 8)))[: shape[0], : shape[1], : shape[2]]
    raw = np.clip(128 + 40 * smooth + rng.normal(0, 10, shape), 0, 255).astype(np.uint8)
    io.write_image(path, raw, [voxel_nm] * 3, [voxel_nm / 2] * 3)


def config(case: dict[str, Any], model_dir: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``features`` and ``data`` config sections of a case."""
    features = {"backbone": model_dir, "planes": case["planes"], "batch_size": case["batch_size"], "device": "cpu",
                "max_memory_mb": case["max_memory_mb"], "block_halo": case["block_halo"],
                "context_nm": case.get("context_nm")}
    return features, {"output_voxel_size": [case["out_nm"]] * 3}


def windows(raw_store: str, features: dict[str, Any], data: dict[str, Any], patch_size: int, channels: int):
    """The (raw window, raw geometry, output geometry) the stage computes, and the largest
    accumulator it holds (MB): the whole grid, or every grown block of the blockwise path."""
    import numpy as np

    from dinopipe.features import FeatureParams, block_windows, context_raw_window
    from dinopipe.sheet import Volume
    from dinopipe.sources import open_sources, source_args

    params = FeatureParams.from_config(features)
    src = open_sources(Volume("bench", raw_store, None, None), **source_args(data))
    blocking = params.blocking(channels, src.grid.shape)
    if blocking is None:
        window, sub_raw = context_raw_window(src.raw.geometry, src.grid, params, patch_size)
        parts = [(window, sub_raw, src.grid)]
    else:
        parts = [(b.raw, b.raw_geom, b.out_geom)
                 for b in block_windows(src.raw.geometry, src.grid, params, patch_size, blocking, params.block_halo)]
    acc_mb = max(channels * float(np.prod(out.shape)) * 4 / 2**20 for _, _, out in parts)
    return src, params, parts, acc_mb, blocking


def bare(raw_store: str, features: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """Time the model's forward alone on the slices the stage feeds it (this process)."""
    import numpy as np
    import torch

    import dinopipe.features as F
    from dinopipe.backbone import load_backbone
    from dinopipe.sources import intensity_range

    torch.set_num_threads(threads())
    t, c = time.perf_counter(), time.process_time()
    bb = load_backbone(features["backbone"], device="cpu")
    load_s, load_cpu_s = time.perf_counter() - t, time.process_time() - c
    src, params, parts, acc_mb, blocking = windows(raw_store, features, data, bb.patch_size, bb.channels)
    lo, hi = intensity_range(src.raw.array, params.intensity, params.low, params.high)
    seconds, cpu_s, slices, calls = 0.0, 0.0, 0, 0
    for window, sub_raw, sub_out in parts:
        raw = np.asarray(src.raw.array[window])
        for name in params.planes:
            plane = F._Plane(name, sub_raw, sub_out, bb, params)
            for batch in plane.batches(params.batch_size):
                images = F._prepare(plane.take(raw, [j for j, _ in batch]), plane, lo, hi, bb.device)
                t, c = time.perf_counter(), time.process_time()
                with torch.no_grad():
                    bb.model(pixel_values=images)
                seconds += time.perf_counter() - t
                cpu_s += time.process_time() - c
                slices += len(batch)
                calls += 1
                del images
    return {"seconds": seconds, "cpu_s": cpu_s, "load_s": load_s, "load_cpu_s": load_cpu_s, "slices": slices,
            "calls": calls, "accumulator_mb": acc_mb,
            "blocks": len(parts) if blocking is not None else 0, "block_shape": blocking}


def pipeline(raw_store: str, features: dict[str, Any], data: dict[str, Any], out: str) -> dict[str, Any]:
    """Run the whole features stage (this process)."""
    from dinopipe.sheet import Volume
    from dinopipe.stages import run_features

    t, c = time.perf_counter(), time.process_time()
    attrs = run_features(Volume("bench", raw_store, None, None), out, features, data, threads=threads())
    total, total_cpu = time.perf_counter() - t, time.process_time() - c
    planes = attrs["timings"]["planes"]
    return {"seconds": total - attrs["timings"]["load_s"], "load_s": attrs["timings"]["load_s"], "cpu_total_s": total_cpu,
            "backbone_s_inside": sum(p["backbone_s"] for p in planes.values()),
            "resample_s_inside": sum(p["resample_s"] for p in planes.values()),
            "prepare_s_inside": sum(p["prepare_s"] for p in planes.values()),
            "write_s": attrs["timings"]["write_s"], "slices": sum(p["slices"] for p in planes.values()),
            "blocks": attrs["blocks"]["count"] if attrs["blocks"]["block_shape"] else 0}


def child(mode: str, raw_store: str, case_json: str, model_dir: str, out: str) -> None:
    """One measurement in this fresh process: a JSON line with the peak RSS above the imports."""
    import torch  # noqa: F401  (imported before the base RSS is taken, as the stage needs them)
    import transformers  # noqa: F401
    import zarr  # noqa: F401

    import dinopipe.features  # noqa: F401
    import dinopipe.stages  # noqa: F401
    from dinopipe.runtime import resident_mb

    base = resident_mb()
    features, data = config(json.loads(case_json), model_dir)
    result = bare(raw_store, features, data) if mode == "bare" else pipeline(raw_store, features, data, out)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["base_rss_mb"] = base
    print(json.dumps(result))


def run_child(mode: str, raw_store: Path, case: dict[str, Any], model_dir: Path, out: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(raw_store), json.dumps(case), str(model_dir), str(out)],
        capture_output=True, text=True,
    )
    if proc.returncode:
        raise RuntimeError(f"benchmark child {mode} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def repeats() -> int:
    return max(1, int(os.environ.get("BENCH_REPEATS", "1")))


def measure(name: str, case: dict[str, Any], work: Path, model_dir: Path, model_mb: float) -> dict[str, Any]:
    """Bare and pipeline of one case in fresh children, alternately :func:`repeats` times; the
    figures of the case: times from the fastest run of each, memory from the worst pair."""
    raw_store = work / f"raw_{name}.zarr"
    write_raw(raw_store, case["raw_shape"], case["raw_nm"])
    bares, pipes = [], []
    for r in range(repeats()):
        bares.append(run_child("bare", raw_store, case, model_dir, work / "unused"))
        pipes.append(run_child("pipeline", raw_store, case, model_dir, work / f"features_{name}_{r}.zarr"))
        if pipes[-1]["slices"] != bares[-1]["slices"] or pipes[-1]["blocks"] != bares[-1]["blocks"]:
            raise RuntimeError(f"case {name}: bare and pipeline ran different slices: {bares[-1]} vs {pipes[-1]}")

    def memory(b: dict[str, Any], p: dict[str, Any]) -> tuple[float, float, float]:
        held = b["peak_rss_mb"] - b["base_rss_mb"]  # model + one batch + activations + raw
        return (p["peak_rss_mb"] - p["base_rss_mb"]) / (b["accumulator_mb"] + held), held, b["accumulator_mb"] + held

    mem_ratio, bare_held, need = max(memory(b, p) for b, p in zip(bares, pipes))
    worst = max(range(len(pipes)), key=lambda r: memory(bares[r], pipes[r])[0])
    used = pipes[worst]["peak_rss_mb"] - pipes[worst]["base_rss_mb"]
    b = min(bares, key=lambda x: x["seconds"])
    p = min(pipes, key=lambda x: x["seconds"])
    # CPU time (all threads); the stage's model load is taken as the bare child's (the same
    # load_backbone call)
    cpu_ratio = min(x["cpu_total_s"] - y["load_cpu_s"] for x, y in zip(pipes, bares)) / min(x["cpu_s"] for x in bares)
    return {"time_ratio": p["seconds"] / b["seconds"], "cpu_time_ratio": cpu_ratio,
            "inside_time_ratio": min(x["seconds"] / x["backbone_s_inside"] for x in pipes), "memory_ratio": mem_ratio,
            "pipeline_s": p["seconds"],
            "bare_s": b["seconds"], "backbone_s_inside": p["backbone_s_inside"], "resample_s_inside":
            p["resample_s_inside"], "prepare_s_inside": p["prepare_s_inside"], "write_s": p["write_s"],
            "load_s": p["load_s"], "slices": p["slices"], "blocks": p["blocks"], "block_shape": b["block_shape"],
            "peak_rss_mb": pipes[worst]["peak_rss_mb"], "base_rss_mb": pipes[worst]["base_rss_mb"], "used_mb": used,
            "need_mb": need,
            "accumulator_mb": b["accumulator_mb"], "bare_held_mb": bare_held, "model_mb": model_mb,
            "repeats": len(pipes)}


def main() -> None:
    import torch

    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, "
          f"python {platform.python_version()}, torch {torch.__version__}, torch threads {threads()}, "
          f"repeats {repeats()}")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-features-") as tmp:
        work = Path(tmp)
        model_dir = work / "vit-s16-random"
        model_mb = save_vit_s16(model_dir)
        for name, case in CASES.items():
            r = results[name] = measure(name, case, work, model_dir, model_mb)
            blocks = f"{r['blocks']} blocks of {r['block_shape']}" if r["blocks"] else "whole volume"
            print(f"[{name}] raw {case['raw_shape']} at {case['raw_nm']} nm -> {case['out_nm']} nm, planes "
                  f"{case['planes']}, batch {case['batch_size']}, {blocks}, {r['slices']} slices")
            print(f"[{name}] bare backbone {r['bare_s']:.1f} s; stage {r['pipeline_s']:.1f} s (backbone inside "
                  f"{r['backbone_s_inside']:.1f}, prepare {r['prepare_s_inside']:.1f}, resample+accumulate "
                  f"{r['resample_s_inside']:.1f}, write {r['write_s']:.1f}; model load {r['load_s']:.1f} not counted)")
            print(f"[{name}] time ratio stage / bare: {r['time_ratio']:.3f} (goal <= {GOAL_TIME}); CPU time ratio "
                  f"{r['cpu_time_ratio']:.3f}; stage / its own backbone calls {r['inside_time_ratio']:.3f}")
            print(f"[{name}] peak RSS {r['peak_rss_mb']:.0f} MB - base {r['base_rss_mb']:.0f} MB = {r['used_mb']:.0f} MB; "
                  f"held: accumulator {r['accumulator_mb']:.0f} + bare backbone run {r['bare_held_mb']:.0f} "
                  f"(model {r['model_mb']:.0f}, one batch, activations) = {r['need_mb']:.0f} MB")
            print(f"[{name}] memory ratio: {r['memory_ratio']:.3f} (goal <= {GOAL_MEMORY})")
    line: dict[str, Any] = {"benchmark": "features", "load_average": round(os.getloadavg()[0], 1)}
    for name, r in results.items():
        line[f"time_ratio_{name}"] = round(r["time_ratio"], 4)
        line[f"cpu_time_ratio_{name}"] = round(r["cpu_time_ratio"], 4)
        line[f"inside_time_ratio_{name}"] = round(r["inside_time_ratio"], 4)
        line[f"memory_ratio_{name}"] = round(r["memory_ratio"], 4)
        line[f"stage_s_{name}"] = round(r["pipeline_s"], 2)
        line[f"bare_backbone_s_{name}"] = round(r["bare_s"], 2)
        line[f"peak_rss_above_base_mb_{name}"] = round(r["used_mb"], 1)
        line[f"held_mb_{name}"] = round(r["need_mb"], 1)
    line["blocks_blockwise"] = results["blockwise"]["blocks"]
    line["repeats"] = repeats()
    line["goals"] = {f"{kind}_ratio_{name}": f"<= {goal}" for name in results
                     for kind, goal in (("time", GOAL_TIME), ("memory", GOAL_MEMORY))}
    print(json.dumps(line))


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
    else:
        main()
