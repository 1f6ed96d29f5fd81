"""Benchmark of the training crop loader (dinopipe.loader) on a cached 384-channel volume.

Run from the repository root: ``.venv/bin/python benchmarks/loader.py`` (a few minutes on 2
cores; needs ~8 GB of free disk under the temporary folder). Prints human-readable lines and,
as the last line, one JSON object.

Volume: 128^3 label voxels of 384-channel float16 features (Gaussian noise, which compresses
about as badly as real DINOv3 features) plus the training targets, written once per feature
chunking that is compared. Figures:

* ``loader_vs_raw_read``: useful bytes/s of random 64^3 crops (voxel-aligned starts, not
  chunk-aligned) delivered by the loader (features + targets, stacked, as the training step
  receives them, from ``loader_workers`` threads; each batch's feature buffer is given back
  with ``CropSampler.recycle`` as the training loop does after ``to_device``) divided by the
  bytes/s of reading the same number of bytes as contiguous crop-sized reads at random
  offsets of a raw file on the same disk into a reused buffer. Both files were just written,
  so both are read from the page cache: the ratio measures the loader's own overhead (read
  amplification at chunk borders, decompression, copies), not the disk. The raw rate is
  measured three times, interleaved with the loader runs, and its median is the
  denominator. It is reported for each chunking; the headline figure uses the chunking the
  features stage writes (``io.FEATURE_CHUNK``, ``io.FEATURE_ORDER``).
  ``loader_vs_raw_read_augmented`` adds flips, rotations and transposes: the loader hands
  features over untransformed and ``to_device`` transforms them on the device, so it should
  match (the device-side cost is inside the training step below).
* ``paced_data_wait_fraction``: share of the time a consumer that takes a fixed, GPU-like
  ``STEP_S`` (50 ms) per step spends waiting for the loader's next batch (batch 2 of 64^3
  crops of 384 channels, flips/rotations/transposes on, ``loader_workers`` threads, the
  recommended chunking; the step sleeps, as the host does while the device computes).
  Goal <= 0.1. ``loader_batches_per_s``: the loader's own rate with a null consumer (takes
  each batch and gives its buffer back at once); ``needed_batches_per_s`` = 1 / STEP_S.
* ``data_wait_fraction``: share of the training-step time that ``dinopipe.train.train``
  spends waiting for a batch (small UNet, 64^3 crops, CPU, recommended chunking), the first
  step included. On the CPU a step takes seconds, so this hides a slow loader; the paced
  figure above is the one that speaks for a GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinopipe import io  # noqa: E402
from dinopipe.loader import CropSampler, Prefetcher, open_volume  # noqa: E402
from dinopipe.train import train  # noqa: E402

SHAPE = (128, 128, 128)
CHANNELS = 384
CROP = (64, 64, 64)
VOXEL = (8.0, 8.0, 8.0)
OFFSETS = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [3, 0, 0], [0, 3, 0], [0, 0, 3]]
# (name, spatial chunk edge, element order inside chunks); all uncompressed (zstd saves ~6 %
# on float16 features and read 3.6x slower than raw 32^3 chunks in an earlier run)
CHUNKINGS = [("32^3 C-order", 32, "C"), ("32^3 F-order", 32, "F"),
             (f"{io.FEATURE_CHUNK}^3 {io.FEATURE_ORDER}-order (default)", io.FEATURE_CHUNK, io.FEATURE_ORDER)]
DEFAULT = CHUNKINGS[2][0]
AUGMENT = {"flip": True, "rot90": True, "transpose": True}
STEP_S = 0.05  # a GPU-like training step
PACED_BATCH = 2


def write_features(path: Path, data_slabs, chunk: int, order: str) -> None:
    arr = io.create_image(path, (CHANNELS, *SHAPE), np.float16, VOXEL, (0.0, 0.0, 0.0), channel_axis=True,
                          chunks=(CHANNELS, chunk, chunk, chunk), compress=False, order=order)
    for z0, slab in data_slabs():
        arr[:, z0 : z0 + slab.shape[1]] = slab


def slabs(seed: int, step: int = 16):
    def gen():
        rng = np.random.default_rng(seed)
        for z0 in range(0, SHAPE[0], step):
            yield z0, rng.standard_normal((CHANNELS, step, *SHAPE[1:]), dtype=np.float32).astype(np.float16)

    return gen


def write_targets(path: Path) -> None:
    rng = np.random.default_rng(1)
    labels = (rng.integers(1, 50, size=(16, 16, 16)).repeat(8, 0).repeat(8, 1).repeat(8, 2)).astype(np.uint64)
    from dinopipe.targets import compute_affinities

    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    root.attrs["dinopipe"] = {"offsets": OFFSETS}
    for key, data, ch in (
        ("labels", labels, False),
        ("affinities", compute_affinities(labels, OFFSETS), True),
        ("lsds", rng.uniform(0, 1, size=(10, *SHAPE)).astype(np.float16), True),
        ("boundary_weights", np.ones(SHAPE, np.float32), False),
        ("mask", np.ones(SHAPE, np.uint8), False),
        ("raw", rng.uniform(0, 1, size=SHAPE).astype(np.float32), False),
    ):
        io.write_image(path / key, data, VOXEL, (0.0, 0.0, 0.0), channel_axis=ch)


def loader_rate(features: Path, targets: Path, crops: int, workers: int, augment: dict | None) -> tuple[float, float]:
    """(useful bytes/s, feature bytes per crop) of the loader's training batches."""
    volume = open_volume(features, targets)
    sampler = CropSampler([volume], CROP, 1, seed=0, min_fraction=0.0, augment=augment)
    sampler.batch(1)  # warm up (thread pools, first reads)
    total = 0
    t0 = time.perf_counter()
    with Prefetcher(sampler.batch, 2, crops + 1, workers=workers, depth=2 * workers) as prefetcher:
        for step in range(2, crops + 2):
            batch = prefetcher.get(step)
            total += sum(a.nbytes for k, a in batch.items() if k != "transforms")
            sampler.recycle(batch)
    seconds = time.perf_counter() - t0
    return total / seconds, CHANNELS * int(np.prod(CROP)) * 2


def paced(features: Path, targets: Path, steps: int, workers: int, step_s: float | None) -> tuple[float, float]:
    """Hand ``steps`` training batches (batch :data:`PACED_BATCH`, augmented) to a consumer that
    takes ``step_s`` seconds per step (None: no time, a null consumer).

    Returns:
        (share of the elapsed time spent waiting for batches, batches per second)
    """
    volume = open_volume(features, targets)
    sampler = CropSampler([volume], CROP, PACED_BATCH, seed=0, min_fraction=0.0, augment=AUGMENT)
    sampler.recycle(sampler.batch(1))  # warm up (thread pools, first reads)
    t0 = time.perf_counter()
    with Prefetcher(sampler.batch, 2, steps + 1, workers=workers, depth=2 * workers) as prefetcher:
        for step in range(2, steps + 2):
            batch = prefetcher.get(step)
            started = time.perf_counter()
            sampler.recycle(batch)  # the training step has copied it to the device
            if step_s is not None:
                time.sleep(max(0.0, step_s - (time.perf_counter() - started)))
        wait = prefetcher.wait_seconds
    seconds = time.perf_counter() - t0
    return wait / seconds, steps / seconds


def raw_rate(path: Path, crop_bytes: int, crops: int) -> float:
    """bytes/s of ``crops`` contiguous reads of ``crop_bytes`` at random offsets of ``path``."""
    size = path.stat().st_size
    buffer = bytearray(crop_bytes)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        for _ in range(crops):
            f.seek(int(rng.integers(0, size - crop_bytes)))
            f.readinto(buffer)
    return crops * crop_bytes / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--crops", type=int, default=12, help="crops per loader measurement")
    parser.add_argument("--steps", type=int, default=8, help="training steps for the wait fraction")
    parser.add_argument("--paced-steps", type=int, default=40, help="steps of the paced and null consumers")
    parser.add_argument("--workers", type=int, default=2, help="loader threads")
    parser.add_argument("--dir", default=None, help="folder for the stores (default: a temporary one)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        print(f"volume {SHAPE} x {CHANNELS} channels float16 ({CHANNELS * np.prod(SHAPE) * 2 / 2**30:.2f} GiB), "
              f"crops {CROP}, {args.crops} crops per measurement, {args.workers} loader threads, "
              f"{os.cpu_count()} CPUs")
        targets = root / "targets.zarr"
        write_targets(targets)
        raw = root / "features.raw"
        with open(raw, "wb") as f:
            for _, slab in slabs(0)():
                f.write(slab.tobytes())
        results = {}
        bases = []
        crop_bytes = CHANNELS * int(np.prod(CROP)) * 2
        for name, chunk, order in CHUNKINGS:
            features = root / f"features_{chunk}_{order}.zarr"
            t0 = time.perf_counter()
            write_features(features, slabs(0), chunk, order)
            write_s = time.perf_counter() - t0
            bases.append(raw_rate(raw, crop_bytes, args.crops))
            rate, _ = loader_rate(features, targets, args.crops, args.workers, None)
            size = io.directory_size(features)
            results[name] = {"chunk": chunk, "order": order, "loader_bytes_per_s": rate, "store_gib": size / 2**30,
                             "write_s": write_s}
            print(f"{name:28s} loader {rate / 2**20:7.0f} MiB/s  raw file {bases[-1] / 2**20:7.0f} MiB/s  "
                  f"store {size / 2**30:5.2f} GiB  written in {write_s:5.1f} s")
            if name != DEFAULT:
                import shutil

                shutil.rmtree(features)
        base = float(np.median(bases))
        for name, r in results.items():
            r["ratio"] = r["loader_bytes_per_s"] / base
            print(f"{name:28s} ratio to the median raw rate ({base / 2**20:.0f} MiB/s): {r['ratio']:5.2f}")
        best = max(results, key=lambda k: results[k]["ratio"])
        chunk, order = results[DEFAULT]["chunk"], results[DEFAULT]["order"]
        features = root / f"features_{chunk}_{order}.zarr"
        augmented, _ = loader_rate(features, targets, args.crops, args.workers, AUGMENT)
        print(f"{DEFAULT} with flips/rotations/transposes: loader {augmented / 2**20:7.0f} MiB/s, "
              f"ratio {augmented / base:5.2f}")
        paced_wait, paced_rate = paced(features, targets, args.paced_steps, args.workers, STEP_S)
        _, null_rate = paced(features, targets, args.paced_steps, args.workers, None)
        print(f"paced consumer ({1000 * STEP_S:.0f} ms per step, batch {PACED_BATCH}, augmented): waiting "
              f"{100 * paced_wait:.1f} % of the time, {paced_rate:.1f} steps/s; null consumer: loader "
              f"{null_rate:.1f} batches/s ({null_rate * PACED_BATCH * crop_bytes / 2**30:.2f} GiB/s of features), "
              f"needed {1 / STEP_S:.0f}")
        summary = train([(str(features), str(targets))], [], root / "model", {
            "steps": args.steps, "batch_size": 1, "crop_shape": list(CROP), "validate_every": args.steps,
            "unet": {"levels": 2, "base_channels": 8}, "num_threads": 2, "tensorboard": False,
            "loader_workers": args.workers, "prefetch": 2,
        })
        wait = summary["data_wait_fraction"]
        step_s = summary["seconds"] / args.steps
        print(f"training with {DEFAULT}: {step_s:.2f} s per step, waiting for data {100 * wait:.1f} % of step time")
        print(f"fastest chunking here: {best}; the features stage writes (C, {chunk}, {chunk}, {chunk}), "
              f"uncompressed, order {order}")
    print(json.dumps({
        "benchmark": "loader",
        "loader_vs_raw_read": round(results[DEFAULT]["ratio"], 3),
        "loader_vs_raw_read_augmented": round(augmented / base, 3),
        "paced_data_wait_fraction": round(paced_wait, 4),
        "paced_step_s": STEP_S,
        "loader_batches_per_s": round(null_rate, 2),
        "needed_batches_per_s": round(1 / STEP_S, 2),
        "data_wait_fraction": round(wait, 4),
        "chunks": [CHANNELS, chunk, chunk, chunk],
        "chunk_order": order,
        "raw_mib_s": [round(b / 2**20, 1) for b in bases],
        "per_chunking": {k: {"ratio": round(v["ratio"], 3), "loader_mib_s": round(v["loader_bytes_per_s"] / 2**20, 1),
                             "store_gib": round(v["store_gib"], 3)} for k, v in results.items()},
        "seconds_per_step": round(step_s, 3),
        "goals": {"loader_vs_raw_read": ">= 0.5", "paced_data_wait_fraction": "<= 0.1",
                  "data_wait_fraction": "<= 0.1"},
    }))


if __name__ == "__main__":
    main()
