"""Blockwise prediction: overhead over the bare network, and memory as the volume grows.

A UNet (1 level, 8 base channels, 6 affinities + 10 LSDs; its receptive-field halo is
10 voxels per side) on 128 feature channels, blocks of 32^3 label voxels plus halo, on the
CPU with 2 torch threads. Volumes of ``GRIDS`` blocks (1x: 40 blocks, 8x: 320 blocks, 2.7 GB
of features; 8 blocks for the timing) of cached float16 features are written exactly as the
features stage writes them (``dinopipe.stages.run_features``: uncompressed chunks of all
channels x ``dinopipe.io.FEATURE_CHUNK``^3 voxels, element order ``dinopipe.io.FEATURE_ORDER``)
and predicted with ``predict_volume``, each in a fresh child process.

Sizes: what one block costs (the block + halo staged as float16, the network's float32 input
and output, activations) is measured as the child's peak RSS during the 1x prediction above
its RSS just before it (model loaded); the 8x feature store must be >= 10x that, so that
holding the whole volume (or a growing part of it) would show in the growth figure. With a
2-level UNet (halo 24) a 32^3 block reads 80^3 voxels, and the 8x store would need ~470
blocks (~12 GB at 384 channels) for the same margin, too much for this machine; the halo
does not change what is measured. Every buffer and the store scale with the channel count,
so their ratio does not depend on it; 128 channels instead of ViT-S's 384 keep the network
(2.5 s per block at 384 channels here) within the run time. Prints:

* time: ``predict_volume``'s own total (``total_s``: reading, mirroring halos, staging,
  network, writing the outputs; the model already loaded) on the 8-block timing volume, over the
  model's forward time alone on exactly the same padded blocks, already in memory as
  float16 (C, z, y, x), each converted by ``.float()`` (the prediction converts its input
  to float32 too), after one warm-up pass. Both are measured three times, alternately, in
  one fresh process; the fastest of each is used (noise on a shared machine only ever adds
  time). Goal <= 1.25;
* memory: peak RSS (``ru_maxrss``: the whole child process, interpreter, torch, model,
  buffers, page-cache pages mapped while reading) of one prediction of the 1x and 8x
  volumes, and 8x / 1x (goal: flat, <= 1.1); the 8x store over one block's cost (>= 10);
  the 8x peak RSS as a fraction of the whole-volume footprint (the features as stored plus
  their float32 copy and the float32 outputs: what predicting the volume as one block
  would hold before any activation).

The last line is one JSON object with the figures and a "goals" key.

Run: .venv/bin/python benchmarks/predict.py
"""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHANNELS = 128
BLOCK = (32, 32, 32)
GRIDS = {"1x": (2, 4, 5), "8x": (4, 8, 10), "timing": (2, 2, 2)}
UNET = {"levels": 1, "base_channels": 8}
OUT_CHANNELS = 16
TIMING_REPEATS = 3
OFFSETS = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [3, 0, 0], [0, 3, 0], [0, 0, 3]]


def setup(root: Path) -> None:
    """Write the model folder and the three feature volumes (chunk by chunk)."""
    import numpy as np
    import torch

    from dinopipe.io import FEATURE_CHUNK, FEATURE_ORDER, create_image, default_chunks, write_json
    from dinopipe.checkpoint import build_model_config, save_checkpoint
    from dinopipe.unet import UNet3D, UNetConfig, output_channels

    torch.manual_seed(0)
    config = UNetConfig(in_channels=CHANNELS, out_channels=output_channels(len(OFFSETS), True), **UNET)
    (root / "model").mkdir()
    save_checkpoint(root / "model" / "checkpoint.pt", UNet3D(config).eval(), None, step=0)
    write_json(root / "model" / "model_config.json", build_model_config(config, OFFSETS, True, None))
    rng = np.random.default_rng(0)
    block = rng.normal(size=(CHANNELS, *BLOCK)).astype(np.float16)
    for name, grid in GRIDS.items():
        shape = tuple(b * g for b, g in zip(BLOCK, grid))
        # exactly as the features stage writes them (dinopipe.stages.run_features)
        chunks = default_chunks((CHANNELS, *shape), channel_axis=True, spatial=FEATURE_CHUNK)
        arr = create_image(root / f"{name}.zarr", (CHANNELS, *shape), np.float16, (16, 16, 16), (8, 8, 8),
                           channel_axis=True, chunks=chunks, compress=False, order=FEATURE_ORDER)
        for z in range(grid[0]):
            for y in range(grid[1]):
                for x in range(grid[2]):
                    arr[:, z * BLOCK[0] : (z + 1) * BLOCK[0], y * BLOCK[1] : (y + 1) * BLOCK[1],
                        x * BLOCK[2] : (x + 1) * BLOCK[2]] = block


def child(root: Path, name: str, timing: bool) -> None:
    """Predict one volume in this fresh process; with ``timing``, :data:`TIMING_REPEATS` times,
    each followed by the forward passes alone over the same blocks."""
    import torch

    from dinopipe.checkpoint import load_model
    from dinopipe.io import read_image
    from dinopipe.predict import FeatureReader, _block_starts, _read_block, _round_up, predict_volume
    from dinopipe.runtime import resident_mb
    from dinopipe.unet import receptive_field_halo

    torch.set_num_threads(2)
    load_model(root / "model")  # what the prediction below loads again: libraries, model
    rss_before_mb = resident_mb()
    runs, inputs = [], None
    for rep in range(TIMING_REPEATS if timing else 1):
        stats = predict_volume(root / f"{name}.zarr", root / "model", root / f"pred_{name}_{rep}.zarr",
                               block_shape=BLOCK, device="cpu")
        run = {"wall_s": stats["total_s"], **{k: stats[k] for k in ("read_s", "wait_s", "forward_s", "write_s")}}
        if timing:
            if inputs is None:  # the padded blocks predict_volume read, float16 (C, z, y, x) as stored
                model, _ = load_model(root / "model")
                features = read_image(root / f"{name}.zarr")
                halo = _round_up(receptive_field_halo(model.config), model.config.divisor)
                reader = FeatureReader(features)
                inputs = [torch.from_numpy(_read_block([reader], features.geometry.shape, s, BLOCK, halo))[None]
                          for s in _block_starts(features.geometry.shape, BLOCK)]
                with torch.no_grad():
                    model(inputs[0].float())  # warm-up
            with torch.no_grad():
                t = time.perf_counter()
                for x in inputs:
                    model(x.float())
                run["bare_forward_s"] = time.perf_counter() - t
        runs.append(run)
    result = {"name": name, "blocks": stats["blocks"], "runs": runs, "rss_before_mb": rss_before_mb,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if timing:
        result["bare_blocks"] = len(inputs)
    print(json.dumps(result))


def _run_child(root: Path, name: str, timing: bool) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", str(root), name, str(int(timing))],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    import numpy as np

    print(f"blockwise prediction benchmark on {platform.processor() or platform.machine()}, "
          f"{CHANNELS} feature channels, blocks {BLOCK} + halo, UNet {UNET}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        setup(root)
        runs = {}
        for name in ("1x", "8x"):
            runs[name] = _run_child(root, name, timing=False)
            r = runs[name]["runs"][0]
            print(f"{name}: {runs[name]['blocks']} blocks, wall {r['wall_s']:.1f}s (read {r['read_s']:.1f}s in the "
                  f"background, network waited {r['wait_s']:.1f}s, network {r['forward_s']:.1f}s, write "
                  f"{r['write_s']:.1f}s), peak RSS {runs[name]['peak_rss_mb']:.0f} MB "
                  f"({runs[name]['rss_before_mb']:.0f} MB before predicting)")
        # Timing on the small volume, in its own fresh process: prediction then bare forwards, repeated.
        timing = _run_child(root, "timing", timing=True)
    for i, r in enumerate(timing["runs"]):
        print(f"timing run {i + 1}: blockwise {r['wall_s']:.2f}s (network waited {r['wait_s']:.2f}s), forward alone "
              f"{r['bare_forward_s']:.2f}s, ratio {r['wall_s'] / r['bare_forward_s']:.3f}")
    wall = min(r["wall_s"] for r in timing["runs"])
    bare = min(r["bare_forward_s"] for r in timing["runs"])
    ratio = wall / bare
    growth = runs["8x"]["peak_rss_mb"] / runs["1x"]["peak_rss_mb"]
    voxels_8x = int(np.prod([b * g for b, g in zip(BLOCK, GRIDS["8x"])]))
    store_8x_mb = CHANNELS * voxels_8x * 2 / 2**20
    block_cost_mb = runs["1x"]["peak_rss_mb"] - runs["1x"]["rss_before_mb"]
    whole_mb = voxels_8x * (CHANNELS * (2 + 4) + OUT_CHANNELS * 4) / 2**20
    store_vs_block = store_8x_mb / block_cost_mb
    fraction = runs["8x"]["peak_rss_mb"] / whole_mb
    print(f"time: blockwise {wall:.2f}s / forward alone {bare:.2f}s over the same "
          f"{timing['bare_blocks']} blocks (fastest of {len(timing['runs'])} each) = {ratio:.3f} (goal <= 1.25)")
    print(f"peak RSS: 1x {runs['1x']['peak_rss_mb']:.0f} MB, 8x {runs['8x']['peak_rss_mb']:.0f} MB; "
          f"8x / 1x = {growth:.3f} (goal <= 1.1)")
    print(f"one block costs {block_cost_mb:.0f} MB (1x peak over the RSS before predicting); the 8x feature store "
          f"is {store_8x_mb:.0f} MB = {store_vs_block:.1f}x that (goal >= 10); 8x peak RSS is {fraction:.3f} of the "
          f"whole-volume footprint ({whole_mb:.0f} MB: features float16 + float32 + outputs float32)")
    print(json.dumps({
        "benchmark": "predict",
        "time_ratio": round(ratio, 4),
        "blocks_1x": runs["1x"]["blocks"],
        "blocks_8x": runs["8x"]["blocks"],
        "peak_rss_mb_1x": round(runs["1x"]["peak_rss_mb"], 1),
        "peak_rss_mb_8x": round(runs["8x"]["peak_rss_mb"], 1),
        "rss_growth_8x_vs_1x": round(growth, 4),
        "block_cost_mb": round(block_cost_mb, 1),
        "feature_store_mb_8x": round(store_8x_mb, 1),
        "store_vs_block_cost": round(store_vs_block, 2),
        "whole_volume_footprint_mb_8x": round(whole_mb, 1),
        "peak_rss_fraction_of_whole_volume_8x": round(fraction, 4),
        "blockwise_s": round(wall, 2),
        "forward_only_s": round(bare, 2),
        "goals": {"time_ratio": "<= 1.25", "rss_growth_8x_vs_1x": "<= 1.1", "store_vs_block_cost": ">= 10",
                  "blocks_8x": ">= 64"},
    }))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(Path(sys.argv[2]), sys.argv[3], sys.argv[4] == "1")
    else:
        main()
