"""Benchmark of dinopipe.targets against lsd-lite on a synthetic Voronoi volume.

Run from the repository root: ``.venv/bin/python benchmarks/targets.py`` (a few minutes on
2 cores). Prints human-readable lines and, as the last line, one JSON object.

Volume: 128^3 voxels, 200 Voronoi cells from seeded random centres, uint64 ids offset by
2**40 (to exercise large ids), no background, voxel size 1 nm isotropic, so sigma in nm equals
sigma in voxels.

lsd-lite computes every label on the whole volume, so its cost per label does not depend on the
label; timing it on all 200 labels would take ~15 min. It is therefore timed on a random subset
of labels (its own ``labels=`` argument) and the time is scaled linearly to all labels. dinopipe
is timed on all labels. The max |diff| is taken over all voxels of the subset run of both
implementations (dinopipe with ``label_ids=`` the same subset).

Dense volumes, where a bounding box gains least (``--dense``, on by default): the same
comparison (LSDs at the workflow's default sigma, ``targets.lsd_sigma_nm`` = 64 nm) on

* ``gala``: the dense neuron labels of ``../shared/data/gala/train-gt.lzf.h5``, 50 x 100 x 200
  at 10 nm (skipped with a note when the folder is absent);
* ``cremi``: ``../shared/data/cremi_labels/cremi.npz``, the first 25 x 200 x 200 at
  40 x 4 x 4 nm;
* ``tubes``: a synthetic dense-neuron volume, 64 x 128 x 128 at 8 nm, 2D Voronoi cells in
  (y, x) whose centres drift with z, so every object spans the whole volume along z.

Each reports lsd-lite's time (subset of labels, scaled) over dinopipe's on all labels
(goal >= 10) and the max |diff| on the subset's voxels (goal <= 1e-5).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lsd_lite  # noqa: E402

from dinopipe.targets import (  # noqa: E402
    compute_affinities,
    compute_boundary_weights,
    compute_lsds,
)

OFFSETS = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [-3, 0, 0], [0, -3, 0], [0, 0, -3],
           [9, 0, 0], [0, 9, 0], [0, 0, 9]]


def voronoi(shape: tuple[int, int, int], n_cells: int, seed: int) -> np.ndarray:
    """Voronoi labels (uint64, ids 2**40 + 1 .. 2**40 + n_cells) of random seeded centres."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, shape, size=(n_cells, 3))
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    _, nearest = cKDTree(centres).query(grid, workers=-1)
    return (nearest.reshape(shape) + 1 + 2**40).astype(np.uint64)


DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
DENSE_SIGMA_NM = 64.0


def tubes(shape: tuple[int, int, int], n_cells: int, seed: int) -> np.ndarray:
    """Dense neuron-like labels: 2D Voronoi cells in (y, x) whose centres drift smoothly with z,
    so each object runs through the whole volume along z (uint64 ids from 2**40 + 1)."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, shape[1:], size=(n_cells, 2))
    drift = rng.uniform(-0.5, 0.5, size=(n_cells, 2))  # voxels of (y, x) per z slice
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape[1:]], indexing="ij"), -1).reshape(-1, 2)
    labels = np.empty(shape, np.uint64)
    for z in range(shape[0]):
        _, nearest = cKDTree(centres + drift * (z - shape[0] / 2)).query(grid, workers=-1)
        labels[z] = nearest.reshape(shape[1:]) + 1 + 2**40
    return labels


def dense_volumes(seed: int) -> dict[str, tuple[np.ndarray | None, tuple[float, float, float], str]]:
    """name -> (labels or None when the file is absent, voxel size nm, note)."""
    volumes: dict[str, tuple[np.ndarray | None, tuple[float, float, float], str]] = {}
    gala = DATA / "gala" / "train-gt.lzf.h5"
    if gala.exists():
        import h5py

        with h5py.File(gala, "r") as f:
            volumes["gala"] = (np.asarray(f["stack"]).astype(np.uint64), (10.0, 10.0, 10.0), str(gala))
    else:
        volumes["gala"] = (None, (10.0, 10.0, 10.0), f"{gala} not present")
    cremi = DATA / "cremi_labels" / "cremi.npz"
    if cremi.exists():
        volumes["cremi"] = (np.load(cremi)["labels"][:25], (40.0, 4.0, 4.0), str(cremi))
    else:
        volumes["cremi"] = (None, (40.0, 4.0, 4.0), f"{cremi} not present")
    volumes["tubes"] = (tubes((64, 128, 128), 60, seed), (8.0, 8.0, 8.0), "synthetic")
    return volumes


def compare_dense(labels: np.ndarray, voxel: tuple[float, float, float], subset_size: int,
                  seed: int) -> dict[str, float]:
    """lsd-lite (timed on a subset, scaled) against dinopipe (all labels) at :data:`DENSE_SIGMA_NM`."""
    ids = np.unique(labels)
    ids = ids[ids != 0]
    subset = np.sort(np.random.default_rng(seed).choice(ids, size=min(subset_size, len(ids)), replace=False))
    ref, t_ref = timed(lsd_lite.get_lsds, labels, DENSE_SIGMA_NM, voxel, labels=subset)
    full, t_full = timed(compute_lsds, labels, DENSE_SIGMA_NM, voxel)
    in_subset = np.isin(labels, subset)
    diff = float(np.abs(ref[:, in_subset] - full[:, in_subset]).max())
    t_ref_all = t_ref * len(ids) / len(subset)
    return {"n_labels": int(len(ids)), "speedup": t_ref_all / t_full, "seconds": t_full,
            "lsd_lite_seconds_scaled": t_ref_all, "max_abs_diff": diff, "bg_fraction": float(np.mean(labels == 0))}


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="edge length in voxels")
    parser.add_argument("--cells", type=int, default=200, help="number of Voronoi cells")
    parser.add_argument("--subset", type=int, default=20, help="labels timed with lsd-lite")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-dense", dest="dense", action="store_false", help="skip the dense volumes")
    args = parser.parse_args()

    print(f"machine: {platform.platform()}, python {platform.python_version()}, "
          f"cpu_count {os.cpu_count()}, usable cores {len(os.sched_getaffinity(0))}, "
          f"torch threads {torch.get_num_threads()}, numpy {np.__version__}, "
          f"lsd-lite {lsd_lite.__version__}")
    shape = (args.size,) * 3
    labels = voronoi(shape, args.cells, args.seed)
    ids = np.unique(labels)
    rng = np.random.default_rng(args.seed + 1)
    subset = np.sort(rng.choice(ids, size=min(args.subset, len(ids)), replace=False))
    print(f"volume: {shape} uint64, {len(ids)} labels (ids > 2**40), voxel 1 nm; "
          f"lsd-lite timed on {len(subset)} random labels and scaled x{len(ids) / len(subset):.1f}")
    voxel = (1.0, 1.0, 1.0)
    result: dict[str, object] = {"benchmark": "targets", "shape": list(shape),
                                 "n_labels": int(len(ids)), "lsd_lite_subset": int(len(subset))}

    max_diff = 0.0
    for sigma in (5.0, 20.0):
        ref, t_ref = timed(lsd_lite.get_lsds, labels, sigma, voxel, labels=subset)
        sub, t_sub = timed(compute_lsds, labels, sigma, voxel, label_ids=subset.tolist())
        full, t_full = timed(compute_lsds, labels, sigma, voxel)
        _, t_full1 = timed(compute_lsds, labels, sigma, voxel, num_workers=1)
        diff = float(np.abs(ref - sub).max())
        in_subset = np.isin(labels, subset)
        diff_full = float(np.abs(ref[:, in_subset] - full[:, in_subset]).max())
        max_diff = max(max_diff, diff, diff_full)
        t_ref_all = t_ref * len(ids) / len(subset)
        speedup = t_ref_all / t_full
        print(f"LSD sigma {sigma:g} vox: lsd-lite {t_ref:.1f} s for {len(subset)} labels "
              f"-> {t_ref_all:.0f} s scaled to {len(ids)}; dinopipe {t_full:.2f} s all labels "
              f"({t_full1:.2f} s with 1 thread), {t_sub:.2f} s subset; speedup {speedup:.1f}x "
              f"({t_ref_all / t_full1:.1f}x single-threaded); max|diff| subset {diff:.3g}, "
              f"full run on subset voxels {diff_full:.3g}")
        key = f"sigma{sigma:g}"
        result[f"lsd_speedup_{key}"] = round(speedup, 2)
        result[f"lsd_speedup_{key}_1thread"] = round(t_ref_all / t_full1, 2)
        result[f"lsd_seconds_{key}"] = round(t_full, 3)
        result[f"lsd_lite_seconds_{key}_scaled"] = round(t_ref_all, 1)
        if sigma == 20.0:
            approx, t_ds = timed(compute_lsds, labels, sigma, voxel, downsample=2)
            err = np.abs(approx - full)
            print(f"LSD sigma {sigma:g} vox, downsample=2 (approximate): {t_ds:.2f} s, "
                  f"vs exact max|diff| {err.max():.3g}, mean |diff| {err.mean():.3g}, "
                  f"99th percentile {np.percentile(err, 99):.3g}")
            result["lsd_downsample2_sigma20_seconds"] = round(t_ds, 3)
            result["lsd_downsample2_sigma20_max_abs_diff"] = float(err.max())
            result["lsd_downsample2_sigma20_mean_abs_diff"] = float(err.mean())
        del ref, sub, full
    result["lsd_max_abs_diff"] = max_diff

    ref, t_ref = timed(lsd_lite.get_affs, labels, OFFSETS, dist="equality-no-bg")
    ours, t_ours = timed(compute_affinities, labels, OFFSETS)
    exact = bool(np.array_equal(ours, ref.astype(np.uint8)))
    print(f"affinities, {len(OFFSETS)} offsets (1/3/9 voxels, +/-): lsd-lite {t_ref:.2f} s, "
          f"dinopipe {t_ours:.2f} s, speedup {t_ref / t_ours:.1f}x, bit-exact {exact}")
    result["aff_speedup"] = round(t_ref / t_ours, 2)
    result["aff_seconds"] = round(t_ours, 3)
    result["aff_bit_exact"] = exact

    _, t_bw = timed(compute_boundary_weights, labels, voxel, 10.0, 3.0)
    print(f"boundary weights (w_max 10, sigma 3 nm): {t_bw:.2f} s")
    result["boundary_weights_seconds"] = round(t_bw, 3)

    goals = {"lsd_speedup_sigma5": ">= 10", "lsd_speedup_sigma20": ">= 10", "lsd_max_abs_diff": "<= 1e-5"}
    if args.dense:
        for name, (dense, dvoxel, note) in dense_volumes(args.seed).items():
            if dense is None:
                print(f"dense {name}: skipped ({note})")
                result[f"dense_{name}"] = {"skipped": note}
                continue
            r = compare_dense(dense, dvoxel, args.subset, args.seed)
            print(f"dense {name} {dense.shape} at {dvoxel} nm, {r['n_labels']} labels, background "
                  f"{100 * r['bg_fraction']:.1f} %, LSD sigma {DENSE_SIGMA_NM:g} nm: lsd-lite "
                  f"{r['lsd_lite_seconds_scaled']:.0f} s (scaled), dinopipe {r['seconds']:.2f} s, speedup "
                  f"{r['speedup']:.1f}x, max|diff| {r['max_abs_diff']:.3g}")
            result[f"dense_{name}"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}
            result[f"lsd_speedup_dense_{name}"] = round(r["speedup"], 2)
            result["lsd_max_abs_diff"] = max(result["lsd_max_abs_diff"], r["max_abs_diff"])
            goals[f"lsd_speedup_dense_{name}"] = ">= 10"
    result["goals"] = goals
    print(json.dumps(result))


if __name__ == "__main__":
    main()
