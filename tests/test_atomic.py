"""Atomic outputs under SIGKILL, and determinism of features and targets.

A Snakemake run is killed (the whole process group, SIGKILL) while the features job is
writing blocks into its hidden temporary store; the next run must recompute the features
and end with outputs bitwise identical to an uninterrupted run in another folder.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from dinopipe import io
from test_workflow import ROOT, snakemake, tiny_config

pytestmark = [pytest.mark.workflow, pytest.mark.slow]

TARGETS = ["results/features/train_0.zarr", "results/targets/train_0.zarr"]


def _project(directory: Path) -> Path:
    config = tiny_config()
    config["demo"]["label_shape"] = [16, 32, 32]
    config["features"]["block_shape"] = [4, 32, 32]  # blocks land in the temporary store one by one
    config["features"]["block_halo"] = 4
    (directory / "config").mkdir(parents=True)
    (directory / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    (directory / "config" / "volumes.tsv").write_text(
        "name\traw\tlabels\trole\troi\n"
        "train_0\tresources/demo/train_0.zarr/raw\tresources/demo/train_0.zarr/labels\ttrain\t\n"
    )
    return directory


def _arrays(store: Path) -> dict[str, bytes]:
    """Every array under a store, as raw bytes (with dtype and shape)."""
    out = {}
    root = zarr.open_group(str(store), mode="r")
    for name, arr in root.arrays():
        out[name] = (arr.dtype.str, arr.shape, np.asarray(arr[...]).tobytes())
    for name, group in root.groups():
        out.update({f"{name}/{k}": v for k, v in _arrays(store / name).items()})
    return out


def _wait_for_partial_write(directory: Path, proc: subprocess.Popen, timeout: float = 240) -> Path:
    """The temporary features store, once at least one block has been written into it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for tmp in (directory / "results" / "features").glob(".train_0.zarr.tmp-*"):
            chunks = [p for p in (tmp / "s0").rglob("*") if p.is_file() and not p.name.startswith(".")]
            if chunks:
                return tmp
        if proc.poll() is not None:
            raise AssertionError(f"snakemake ended ({proc.returncode}) before a partial write was seen:\n"
                                 f"{proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.05)
    raise AssertionError("no partial features store appeared")


def test_sigkill_mid_write_then_rerun_gives_identical_outputs(tmp_path):
    reference = _project(tmp_path / "reference")
    snakemake(reference, *TARGETS)

    killed = _project(tmp_path / "killed")
    snakemake(killed, "resources/demo/train_0.zarr")
    proc = subprocess.Popen(
        [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "workflow" / "Snakefile"),
         "--directory", str(killed), "--cores", "2", *TARGETS],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        tmp = _wait_for_partial_write(killed, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert tmp.exists(), "the killed job's temporary store should still be there"
    assert not (killed / "results" / "features" / "train_0.zarr").exists(), "a killed job left a final output"

    # Snakemake's lock survives a SIGKILL: unlock as a user would, then rerun
    snakemake(killed, "--unlock")
    dry = snakemake(killed, "-n", *TARGETS).stdout
    assert "rule features" in dry
    snakemake(killed, *TARGETS)
    assert not list(killed.rglob(".*.tmp-*")), "the stale temporary store was not cleaned up"
    for target in TARGETS:
        assert _arrays(killed / target) == _arrays(reference / target), target
    sig = io.read_image(killed / TARGETS[0]).attrs["signature"]
    assert sig == io.read_image(reference / TARGETS[0]).attrs["signature"]
    assert "Nothing to be done" in snakemake(killed, "-n", *TARGETS).stdout
