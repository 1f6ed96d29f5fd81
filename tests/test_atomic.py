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


# --- a full disk: a small tmpfs --------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs at tmp_path/disk (mounting needs root; skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill the disk needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _no_trace(disk: Path, name: str) -> None:
    assert not (disk / name).exists(), "a failed write left an output"
    assert not list(disk.glob(".*.tmp-*")), "a failed write left its temporary output"


def test_disk_full_while_writing_a_store(small_disk):
    data = np.random.default_rng(0).random((64, 64, 64), dtype=np.float32)  # 1 MiB, incompressible
    with pytest.raises(OSError) as err:
        with io.atomic_output(small_disk / "x.zarr", what="features of volume 'v'", expected_bytes=data.nbytes) as tmp:
            io.write_image(tmp, data, (8, 8, 8), (4, 4, 4), compress=False)
    text = str(err.value)
    assert err.value.errno == 28
    assert f"features of volume 'v' ({small_disk / 'x.zarr'}): no space left on the device holding {small_disk}" in text
    assert "about 1.0 MiB needed for the whole output" in text and "nothing was left at" in text
    _no_trace(small_disk, "x.zarr")


def test_disk_full_while_saving_a_checkpoint(small_disk):
    """torch.save reports a full disk as "RuntimeError: [enforce fail at inline_container.cc] . unexpected pos"."""
    import torch

    with pytest.raises(OSError, match=r"checkpoint.pt\): no space left on the device .*RuntimeError"):
        with io.atomic_output(small_disk / "checkpoint.pt", what="the model") as tmp:
            torch.save({"model": torch.randn(256, 1024)}, tmp)  # 1 MiB
    _no_trace(small_disk, "checkpoint.pt")


def test_disk_full_in_the_features_stage_names_the_volume(small_disk, tmp_path):
    from dinopipe.sheet import Volume
    from dinopipe.stages import run_demo_data, run_features

    run_demo_data("v", tmp_path / "v.zarr", seed=0, label_shape=(8, 32, 32), label_voxel_size=(16, 16, 16),
                  raw_factor=(2, 2, 2))
    volume = Volume("v", str(tmp_path / "v.zarr" / "raw"), str(tmp_path / "v.zarr" / "labels"), "train")
    out = small_disk / "features" / "v.zarr"
    with pytest.raises(OSError, match=r"features of volume 'v' \(.*features/v.zarr\): no space left on the device "
                                      r".*about 512.0 KiB needed"):  # 32 channels x 8 x 32 x 32 float16
        run_features(volume, out, {"backbone": "tiny-vit", "planes": ["xy"]}, {})
    _no_trace(small_disk / "features", "v.zarr")
