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
  features stage writes (``io.FEATURE_CHUNK``, ``io.FEATURE_ORDER``). Each layout also
  reports the files its store holds and the seconds to write it.
* ``layouts``: the storage layouts side by side, unsharded (Zarr v2, one file per
  ``io.FEATURE_CHUNK``^3 chunk) and sharded (Zarr v3 / OME-NGFF 0.5, ``SHARD``^3 shards of
  those chunks: ``features.shard_shape``), each with ``loader_vs_raw_read`` (plain and
  augmented), ``paced_data_wait_fraction``, ``files`` and ``write_s`` (the store written
  as the features stage writes it blockwise: slabs through ``io.ShardWriter``).
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
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinopipe import io  # noqa: E402
from dinopipe.config import schema_defaults  # noqa: E402
from dinopipe.loader import CropSampler, Prefetcher, open_volume  # noqa: E402
from dinopipe.train import train  # noqa: E402

SHAPE = (128, 128, 128)  # set by --shape
CHANNELS = 384  # set by --channels
#: Spatial shard edge of the sharded layout compared with the unsharded one (``features.shard_shape``).
SHARD = 64
CROP = (64, 64, 64)
VOXEL = (8.0, 8.0, 8.0)
OFFSETS = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [3, 0, 0], [0, 3, 0], [0, 0, 3]]
# (name, spatial chunk edge, element order inside chunks, spatial shard edge or None); all
# uncompressed (zstd saves ~6 % on float16 features and read 3.6x slower than raw 32^3 chunks
# in an earlier run)
UNSHARDED = f"{io.FEATURE_CHUNK}^3 {io.FEATURE_ORDER}-order"
SHARDED = f"{UNSHARDED}, {SHARD}^3 shards"
CHUNKINGS = [("32^3 C-order", 32, "C", None), ("32^3 F-order", 32, "F", None),
             (UNSHARDED, io.FEATURE_CHUNK, io.FEATURE_ORDER, None),
             (SHARDED, io.FEATURE_CHUNK, io.FEATURE_ORDER, SHARD)]
#: The layouts compared side by side (paced consumer, files, write time).
LAYOUTS = (UNSHARDED, SHARDED)
#: The layout the features stage writes by default (``features.shard_shape`` in the schema).
DEFAULT = SHARDED if schema_defaults("features")["shard_shape"] else UNSHARDED
AUGMENT = {"flip": True, "rot90": True, "transpose": True}
STEP_S = 0.05  # a GPU-like training step
PACED_BATCH = 2


def write_features(path: Path, data_slabs, chunk: int, order: str, shard: int | None = None) -> None:
    shape, chunks = (CHANNELS, *SHAPE), (CHANNELS, chunk, chunk, chunk)
    arr = io.create_image(path, shape, np.float16, VOXEL, (0.0, 0.0, 0.0), channel_axis=True, chunks=chunks,
                          compress=False, order=order, shards=io.shard_shape(shape, chunks, shard, channel_axis=True))
    with io.ShardWriter(arr) as writer:
        for z0, slab in data_slabs():
            writer[:, z0 : z0 + slab.shape[1]] = slab


def count_files(path: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(path))


def slabs(seed: int, step: int = 16):
    def gen():
        rng = np.random.default_rng(seed)
        for z0 in range(0, SHAPE[0], step):
            yield z0, rng.standard_normal((CHANNELS, step, *SHAPE[1:]), dtype=np.float32).astype(np.float16)

    return gen


def write_targets(path: Path) -> None:
    rng = np.random.default_rng(1)
    cells = tuple(-(-n // 8) for n in SHAPE)
    labels = rng.integers(1, 50, size=cells).repeat(8, 0).repeat(8, 1).repeat(8, 2)
    labels = labels[: SHAPE[0], : SHAPE[1], : SHAPE[2]].astype(np.uint64)
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
    parser.add_argument("--repeats", type=int, default=1, help="measurements of every chunking (medians reported)")
    parser.add_argument("--layouts-only", action="store_true",
                        help="only the unsharded and sharded layouts of the features stage, not the 32^3 chunkings")
    parser.add_argument("--shape", type=int, default=128, help="volume edge in voxels (> 64, the crop)")
    parser.add_argument("--channels", type=int, default=384, help="feature channels")
    args = parser.parse_args()
    global SHAPE, CHANNELS
    SHAPE, CHANNELS = (args.shape,) * 3, args.channels
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
        chunkings = [c for c in CHUNKINGS if c[0] in LAYOUTS] if args.layouts_only else CHUNKINGS
        for repeat in range(args.repeats):
            for name, chunk, order, shard in chunkings:
                features = root / f"features_{chunk}_{order}_{shard}.zarr"
                t0 = time.perf_counter()
                write_features(features, slabs(0), chunk, order, shard)
                write_s = time.perf_counter() - t0
                bases.append(raw_rate(raw, crop_bytes, args.crops))
                rate, _ = loader_rate(features, targets, args.crops, args.workers, None)
                size = io.directory_size(features)
                r = results.setdefault(name, {"chunk": chunk, "order": order, "shard": shard, "runs": []})
                run = {"loader_bytes_per_s": rate, "store_gib": size / 2**30, "write_s": write_s,
                       "files": count_files(features)}
                print(f"{name:34s} loader {rate / 2**20:7.0f} MiB/s  raw file {bases[-1] / 2**20:7.0f} MiB/s  "
                      f"store {size / 2**30:5.2f} GiB in {run['files']:6d} files, written in {write_s:5.1f} s")
                if name in LAYOUTS:
                    run["augmented_bytes_per_s"], _ = loader_rate(features, targets, args.crops, args.workers, AUGMENT)
                    run["paced_wait"], run["paced_rate"] = paced(features, targets, args.paced_steps, args.workers,
                                                                 STEP_S)
                    _, run["null_rate"] = paced(features, targets, args.paced_steps, args.workers, None)
                    print(f"{name:34s} augmented {run['augmented_bytes_per_s'] / 2**20:7.0f} MiB/s; paced consumer "
                          f"({1000 * STEP_S:.0f} ms per step, batch {PACED_BATCH}, augmented) waiting "
                          f"{100 * run['paced_wait']:.1f} % of the time; null consumer {run['null_rate']:.1f} batches/s")
                r["runs"].append(run)
                if name != DEFAULT or repeat < args.repeats - 1:
                    shutil.rmtree(features)
        base = float(np.median(bases))

        def median(name: str, key: str) -> float:
            return float(np.median([run[key] for run in results[name]["runs"]]))

        for name, r in results.items():
            r["ratio"] = median(name, "loader_bytes_per_s") / base
            r["write_s"], r["files"], r["store_gib"] = median(name, "write_s"), median(name, "files"), median(
                name, "store_gib")
            if name in LAYOUTS:
                r["ratio_augmented"] = median(name, "augmented_bytes_per_s") / base
                r["paced_wait"], r["null_rate"] = median(name, "paced_wait"), median(name, "null_rate")
            print(f"{name:34s} ratio to the median raw rate ({base / 2**20:.0f} MiB/s): {r['ratio']:5.2f}")
        best = max(results, key=lambda k: results[k]["ratio"])
        print("layouts side by side (medians of", args.repeats, "runs):")
        for name in LAYOUTS:
            r = results[name]
            print(f"  {name:34s} loader/raw {r['ratio']:5.2f} (augmented {r['ratio_augmented']:5.2f}), paced wait "
                  f"{100 * r['paced_wait']:5.1f} %, {int(r['files']):6d} files, written in {r['write_s']:5.1f} s")
        chunk, order, shard = results[DEFAULT]["chunk"], results[DEFAULT]["order"], results[DEFAULT]["shard"]
        features = root / f"features_{chunk}_{order}_{shard}.zarr"
        augmented, paced_wait, null_rate = (results[DEFAULT]["ratio_augmented"] * base, results[DEFAULT]["paced_wait"],
                                            results[DEFAULT]["null_rate"])
        summary = train([(str(features), str(targets))], [], root / "model", {
            "steps": args.steps, "batch_size": 1, "crop_shape": list(CROP), "validate_every": args.steps,
            "unet": {"levels": 2, "base_channels": 8}, "num_threads": 2, "tensorboard": False,
            "loader_workers": args.workers, "prefetch": 2,
        })
        wait = summary["data_wait_fraction"]
        step_s = summary["seconds"] / args.steps
        print(f"training with {DEFAULT}: {step_s:.2f} s per step, waiting for data {100 * wait:.1f} % of step time")
        print(f"fastest chunking here: {best}; the features stage writes (C, {chunk}, {chunk}, {chunk}) chunks, "
              f"uncompressed, order {order}, " + (f"in {shard}^3 shards" if shard else "unsharded"))
    print(json.dumps({
        "benchmark": "loader",
        "loader_vs_raw_read": round(results[DEFAULT]["ratio"], 3),
        "loader_vs_raw_read_augmented": round(augmented / base, 3),
        "paced_data_wait_fraction": round(paced_wait, 4),
        "paced_step_s": STEP_S,
        "loader_batches_per_s": round(null_rate, 2),
        "needed_batches_per_s": round(1 / STEP_S, 2),
        "data_wait_fraction": round(wait, 4),
        "default_layout": DEFAULT,
        "chunks": [CHANNELS, chunk, chunk, chunk],
        "chunk_order": order,
        "shards": None if shard is None else [CHANNELS, shard, shard, shard],
        "raw_mib_s": [round(b / 2**20, 1) for b in bases],
        "per_chunking": {k: {"ratio": round(v["ratio"], 3), "store_gib": round(v["store_gib"], 3),
                             "files": int(v["files"]), "write_s": round(v["write_s"], 2)} for k, v in results.items()},
        "layouts": {k: {"loader_vs_raw_read": round(results[k]["ratio"], 3),
                        "loader_vs_raw_read_augmented": round(results[k]["ratio_augmented"], 3),
                        "paced_data_wait_fraction": round(results[k]["paced_wait"], 4),
                        "files": int(results[k]["files"]), "write_s": round(results[k]["write_s"], 2)}
                    for k in LAYOUTS},
        "repeats": args.repeats,
        "seconds_per_step": round(step_s, 3),
        "goals": {"loader_vs_raw_read": ">= 0.5", "paced_data_wait_fraction": "<= 0.1",
                  "data_wait_fraction": "<= 0.1"},
    }))


if __name__ == "__main__":
    main()
