"""Feature extraction overhead and memory, side by side in one run.

ViT-S/16 architecture (real size, random weights), a 64^3 label-grid volume from 128^3 raw
(raw 8 nm, labels 16 nm), three planes. Prints:

* pipeline wall time / bare backbone forward time on exactly the same slices at the same
  batch size (goal <= 1.15);
* peak RSS / (float32 output accumulator + model + input) (goal <= 1.5), where peak RSS is
  measured in a fresh child process and counted above the RSS of the interpreter with
  torch, transformers and dinopipe already imported (the libraries' own code is not
  what this measures).

Run: .venv/bin/python benchmarks/features.py
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time

RAW = 128
OUT = 64
BATCH = 16


def child(mode: str) -> None:
    """Run one measurement in this (fresh) process and print a JSON line."""
    import numpy as np
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    import dinopipe.features as F
    from dinopipe.backbone import Backbone, weights_hash
    from dinopipe.geometry import Geometry
    from dinopipe.runtime import resident_mb

    threads = int(os.environ.get("BENCH_THREADS", "2"))
    torch.set_num_threads(threads)
    base_rss = resident_mb()
    torch.manual_seed(0)
    model = DINOv3ViTModel(DINOv3ViTConfig(num_register_tokens=4)).eval()  # ViT-S/16: 384 ch, 12 layers
    bb = Backbone(model, "vit-s16-random", None, "vit", 16, 384, 5, weights_hash(model), torch.device("cpu"))
    raw = np.random.default_rng(0).integers(0, 255, (RAW,) * 3).astype(np.uint8)
    raw_geom = Geometry((RAW,) * 3, (8.0,) * 3, (4.0,) * 3)
    out_geom = Geometry((OUT,) * 3, (16.0,) * 3, (8.0,) * 3)
    params = F.FeatureParams(batch_size=BATCH)
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    acc_mb = 384 * OUT**3 * 4 / 2**20
    input_mb = raw.nbytes / 2**20
    result: dict[str, float] = {"model_mb": model_mb, "accumulator_mb": acc_mb, "input_mb": input_mb}
    if mode == "pipeline":
        t = time.perf_counter()
        feats, info = F.extract_features(raw, raw_geom, out_geom, bb, params)
        result["seconds"] = time.perf_counter() - t
        result["backbone_s_inside"] = sum(p["backbone_s"] for p in info["timings"].values())
    else:  # bare forward on the same slices, same batch size, already normalised
        images = []
        for name in params.planes:
            plane = F._Plane(name, raw_geom, out_geom, bb, params)
            order = [j for j, _ in plane.contributions]
            for s in range(0, len(order), BATCH):
                images.append(F._prepare(plane.take(raw, order[s : s + BATCH]), plane, 0.0, 255.0, bb.device))
        t = time.perf_counter()
        with torch.no_grad():
            for x in images:
                model(pixel_values=x)
        result["seconds"] = time.perf_counter() - t
        result["slices"] = sum(len(x) for x in images)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["peak_rss_mb"] = peak_mb
    result["base_rss_mb"] = base_rss
    print(json.dumps(result))


def run(mode: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    import torch

    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}, torch {torch.__version__}")
    print(f"torch threads: {os.environ.get('BENCH_THREADS', '2')}; raw {RAW}^3 uint8 at 8 nm -> features on {OUT}^3 at 16 nm; "
          f"ViT-S/16 (384 channels, random weights); planes xy, xz, yz; batch {BATCH}")
    bare = run("bare")
    pipe = run("pipeline")
    ratio = pipe["seconds"] / bare["seconds"]
    need = pipe["accumulator_mb"] + pipe["model_mb"] + pipe["input_mb"]
    used = pipe["peak_rss_mb"] - pipe["base_rss_mb"]
    mem_ratio = used / need
    print(f"bare backbone forward: {bare['seconds']:.1f} s for {bare['slices']} slices")
    print(f"pipeline:              {pipe['seconds']:.1f} s (backbone inside {pipe['backbone_s_inside']:.1f} s)")
    print(f"time ratio pipeline / bare: {ratio:.3f} (goal <= 1.15)")
    print(f"peak RSS {pipe['peak_rss_mb']:.0f} MB - base {pipe['base_rss_mb']:.0f} MB (interpreter + libraries) = {used:.0f} MB; "
          f"accumulator {pipe['accumulator_mb']:.0f} + model {pipe['model_mb']:.0f} + input {pipe['input_mb']:.0f} = {need:.0f} MB")
    print(f"memory ratio: {mem_ratio:.3f} (goal <= 1.5)")
    print(json.dumps({
        "benchmark": "features",
        "time_ratio": round(ratio, 4),
        "memory_ratio": round(mem_ratio, 4),
        "pipeline_s": round(pipe["seconds"], 2),
        "bare_backbone_s": round(bare["seconds"], 2),
        "peak_rss_mb": round(pipe["peak_rss_mb"], 1),
        "base_rss_mb": round(pipe["base_rss_mb"], 1),
        "goals": {"time_ratio": "<= 1.15", "memory_ratio": "<= 1.5"},
    }))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        main()
