"""Benchmark: how long `snakemake -n` takes on large volume sheets.

Run from the repository root: ``.venv/bin/python benchmarks/dag.py`` (a few minutes on 2 cores).
Prints human-readable lines and, as the last line, one JSON object.

For each size (1,000 and 10,000 volumes) a project is generated in a temporary directory, as a
user's would look before the first run: the demo configuration (config/config.yaml as is) and a
sheet of volumes whose data already exist on disk. The data are one tiny OME-NGFF store
(``data/shared.zarr`` with ``raw`` and ``labels``, written by the demo generator) and one
symlink to it per volume (``data/vol_00042.zarr``), so every row names its own existing path,
as in a real sheet; no demo_data jobs. Every 10th volume has role train, every 10th validate,
the rest predict; all are labelled (the most jobs a volume can have). The dry run therefore
counts, per volume, features, targets and metadata, and per predicted volume (8 in 10) also
predict, segment and evaluate: 5.4 jobs per volume. Once per sheet come train, loss_curve_plot,
evaluation_summary, all, and report_slices for the first ``report.volume_figures`` (10)
predicted volumes. The job counts per rule, and per volume, are printed and in the JSON.

Timed, as wall clock of the whole command (interpreter start, parsing, DAG, the printed plan;
output to a pipe), with the command's CPU time alongside (less sensitive to other load on the
machine; the goals are on wall clock):

* ``snakemake -n`` exactly as a user types it (so with workflow/profiles/default);
* ``snakemake --list-rules``: parsing only (Snakefile, common.smk, config validation, reading
  and checking the sheet), to tell the sheet from the DAG.

Goals: at most 10 ms per volume at both sizes, and the 10x sheet at most ~10x the time.

Where the time goes (cProfile, 1,000 vs 10,000 volumes): most of it is Snakemake's own per-job
work (DAG, printing the plan; ~1.5 ms/job). What grows faster than the sheet is Snakemake's
cycle check in ``DAG.update``: for every job that needs the output of a fan-in job (train,
tune_segment, baseline), it tests ``file in job.input`` against that job's whole input list,
so its cost is dependents x inputs (snakemake/snakemake#598). On a quiet machine: 8.1 and
9.1 ms/volume, scaling 11.2x (the quadratic part is ~20 % of the 10,000-volume run).
``--profile`` additionally runs the 1,000-volume dry run under cProfile and prints where the
time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "workflow" / "Snakefile")]
GOAL_MS_PER_VOLUME = 10.0
GOAL_SCALING = 10.0


def write_project(directory: Path, n_volumes: int) -> None:
    """The demo configuration with a sheet of ``n_volumes`` labelled volumes on disk: one tiny
    OME-NGFF store and a symlink to it per volume (see the module docstring)."""
    from dinopipe.stages import run_demo_data

    (directory / "config").mkdir(parents=True)
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    (directory / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    data = directory / "data"
    # as large as the demo's train.crop_shape (24, 32, 32): the start-up checks refuse smaller train volumes
    run_demo_data("shared", data / "shared.zarr", seed=0, label_shape=(24, 32, 32), label_voxel_size=(16, 16, 16),
                  raw_factor=(2, 2, 2))
    rows = ["name\traw\tlabels\trole\troi"]
    for i in range(n_volumes):
        role = ("train", "validate", *["predict"] * 8)[i % 10]
        name = f"vol_{i:05d}"
        (data / f"{name}.zarr").symlink_to("shared.zarr")
        rows.append(f"{name}\tdata/{name}.zarr/raw\tdata/{name}.zarr/labels\t{role}\t")
    (directory / "config" / "volumes.tsv").write_text("\n".join(rows) + "\n")


def timed(directory: Path, *args: str, timeout: float) -> tuple[float, float, str]:
    """Wall-clock and CPU seconds of one snakemake command in ``directory``, and its output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([*SNAKEMAKE, "--directory", str(directory), *args], capture_output=True,
                          text=True, timeout=timeout)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds, cpu, proc.stdout + proc.stderr


def job_stats(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run as {rule: count}, with 'total'."""
    table = output.split("Job stats:")[-1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M)}


def profile_dry_run(directory: Path, top: int = 25) -> str:
    """cProfile of the same dry run in this process (with ``--quiet``: the plan is still
    formatted, not printed): the functions with the most cumulative time."""
    from snakemake.cli import main

    profiler = cProfile.Profile()
    argv = ["--snakefile", str(ROOT / "workflow" / "Snakefile"), "--directory", str(directory), "-n", "--quiet", "all"]
    profiler.enable()
    try:
        main(argv)
    except SystemExit:
        pass
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[1000, 10000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--timeout", type=float, default=480, help="seconds allowed for one dry run")
    parser.add_argument("--profile", action="store_true", help="also profile the small dry run")
    args = parser.parse_args()

    print(f"snakemake -n on generated sheets; {platform.node()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="dag-benchmark-") as tmp:
        for n in args.sizes:
            directory = Path(tmp) / f"sheet_{n}"
            write_project(directory, n)
            parse_s, _, _ = timed(directory, "--list-rules", timeout=args.timeout)
            load = os.getloadavg()[0]
            dry_s, cpu_s, out = timed(directory, "-n", timeout=args.timeout)
            stats = job_stats(out)
            jobs = stats.pop("total", 0)
            results[n] = {"dry_run_s": dry_s, "cpu_s": cpu_s, "parse_s": parse_s, "jobs": jobs, "load": load}
            print(f"{n:>6} volumes, {jobs} jobs ({jobs / n:.2f} per volume: "
                  f"{', '.join(f'{rule} {count}' for rule, count in stats.items())})")
            print(f"        snakemake -n {dry_s:7.1f} s = {1000 * dry_s / n:6.2f} ms/volume "
                  f"({1000 * dry_s / jobs:.2f} ms/job; CPU {1000 * cpu_s / n:.2f} ms/volume; load average "
                  f"{load:.1f} before); parsing and the sheet alone {parse_s:.1f} s")
        if args.profile:
            print(profile_dry_run(Path(tmp) / f"sheet_{args.sizes[0]}"))
    small, large = args.sizes
    ms_small = 1000 * results[small]["dry_run_s"] / small
    ms_large = 1000 * results[large]["dry_run_s"] / large
    scaling = results[large]["dry_run_s"] / results[small]["dry_run_s"]
    print(f"{large // small}x the volumes took {scaling:.1f}x the time "
          f"(goals: <= {GOAL_MS_PER_VOLUME:g} ms/volume, <= {GOAL_SCALING:g}x)")
    print(json.dumps({
        "benchmark": "dag",
        f"ms_per_volume_{small}": round(ms_small, 2),
        f"ms_per_volume_{large}": round(ms_large, 2),
        "scaling_10x": round(scaling, 2),
        "goals": {f"ms_per_volume_{small}": f"<= {GOAL_MS_PER_VOLUME:g}",
                  f"ms_per_volume_{large}": f"<= {GOAL_MS_PER_VOLUME:g}",
                  "scaling_10x": f"<= {GOAL_SCALING:g}"},
        "jobs": {str(n): r["jobs"] for n, r in results.items()},
        "jobs_per_volume": {str(n): round(r["jobs"] / n, 2) for n, r in results.items()},
        "cpu_ms_per_volume": {str(n): round(1000 * r["cpu_s"] / n, 2) for n, r in results.items()},
        "load_average": {str(n): round(r["load"], 1) for n, r in results.items()},
        "parse_s": {str(n): round(r["parse_s"], 2) for n, r in results.items()},
    }))


if __name__ == "__main__":
    main()
