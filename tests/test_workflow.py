"""Real Snakemake runs of the whole workflow on a tiny demo configuration in tmp_path.

One full run (module-scoped) feeds the three ways users drive the workflow:
the complete DAG to summary.tsv, a dry run after changing the LSD sigma, and forcing
one volume's features; and a dry run choosing the report's figures.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from dinopipe import io
from dinopipe.evaluate import evaluate_segmentation

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "workflow" / "Snakefile")]
VOLUMES = {"train_0": "train", "train_1": "train", "validate_0": "validate", "predict_0": "predict"}

pytestmark = [pytest.mark.workflow, pytest.mark.slow]


def tiny_config() -> dict:
    """The demo configuration shrunk to run in well under a minute on 2 cores."""
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["demo"]["label_shape"] = [16, 32, 32]
    config["features"]["planes"] = ["xy", "xz", "yz"]
    # Features only: 12 steps are enough for the features path to beat a trivial segmentation,
    # not for the demo's input_raw model (tests/test_demo_quality.py runs the demo config itself).
    config["train"].update(
        {"input_raw": False, "steps": 12, "batch_size": 1, "crop_shape": [16, 16, 16], "validate_every": 6, "validation_crops": 2,
         "unet": {"levels": 2, "base_channels": 4}}
    )
    config["predict"]["block_shape"] = [16, 16, 16]
    return config


def write_project(directory: Path, config: dict) -> None:
    (directory / "config").mkdir(parents=True, exist_ok=True)
    (directory / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    rows = ["name\traw\tlabels\trole\troi"]
    rows += [f"{n}\tresources/demo/{n}.zarr/raw\tresources/demo/{n}.zarr/labels\t{r}\t" for n, r in VOLUMES.items()]
    (directory / "config" / "volumes.tsv").write_text("\n".join(rows) + "\n")


def snakemake(directory: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [*SNAKEMAKE, "--directory", str(directory), "--cores", "2", *args],
        capture_output=True, text=True, env=env, timeout=900,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def jobs_in(output: str) -> dict[str, int]:
    """The 'Job stats' table of a Snakemake run or dry run as {rule: count}."""
    table = output.split("Job stats:")[-1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M) if m.group(1) != "total"}


def test_full_dag_produces_every_output(project):
    for name, role in VOLUMES.items():
        feats = io.read_image(project / "results" / "features" / f"{name}.zarr")
        assert feats.array.dtype == np.float16
        assert feats.array.shape == (32, 16, 32, 32)  # tiny ViT: 32 channels on the 16x32x32 label grid
        assert feats.geometry.voxel_size == (16.0, 16.0, 16.0)
        assert feats.attrs["signature"]["model_id"] == "tiny-vit"
        targets = project / "results" / "targets" / f"{name}.zarr"
        assert sorted(zarr.open_group(str(targets), mode="r").group_keys()) == [
            "affinities", "boundary_weights", "labels", "lsds", "mask", "raw"]
        assert io.read_image(targets / "affinities").array.shape == (6, 16, 32, 32)
        assert io.read_image(targets / "lsds").array.shape == (10, 16, 32, 32)
        assert io.read_image(targets / "labels").array.dtype == np.uint64
        meta = json.loads((project / "results" / "metadata" / f"{name}.json").read_text())
        assert meta["volume"] == name and meta["role"] == role
        assert meta["labels"]["n_ids"] > 5
        assert meta["features"]["signature"]["weights_hash"]
        assert set(meta["versions"]) >= {"dinopipe", "torch", "transformers", "snakemake"}
        assert meta["features"]["timings"]["planes"]["xy"]["backbone_s"] > 0
    model = project / "results" / "model"
    curve = (model / "loss_curve.tsv").read_text().splitlines()
    # header, the untrained model's validation (step 0), then one row per step
    assert curve[0].split("\t")[:3] == ["step", "train_loss", "val_loss"] and len(curve) == 14
    validated = [row.split("\t")[0] for row in curve[1:] if row.split("\t")[2]]
    assert validated == ["0", "6", "12"]
    assert json.loads((model / "model_config.json").read_text())
    pred = project / "results" / "predictions" / "predict_0.zarr"
    affs = io.read_image(pred / "affinities").read()
    assert affs.shape == (6, 16, 32, 32) and 0 <= affs.min() and affs.max() <= 1
    seg = io.read_image(project / "results" / "segmentations" / "predict_0.zarr").read()
    assert seg.dtype == np.uint64 and seg.shape == (16, 32, 32) and seg.max() >= 1
    evaluation = json.loads((project / "results" / "evaluation" / "predict_0.json").read_text())
    # the scores are those of this segmentation against the volume's ground truth, and better than
    # both trivial segmentations: everything one segment (VOI = H(truth), all merge) and every voxel
    # its own segment (all split)
    truth = io.read_image(project / "resources" / "demo" / "predict_0.zarr" / "labels").read()
    assert evaluation["voi_sum"] == pytest.approx(evaluate_segmentation(truth, seg)["voi_sum"])
    all_one = evaluate_segmentation(truth, np.ones_like(truth))
    singletons = evaluate_segmentation(truth, np.arange(1, truth.size + 1, dtype=np.uint64).reshape(truth.shape))
    assert all_one["voi_split"] == 0 and singletons["voi_merge"] == 0
    assert evaluation["voi_sum"] < min(all_one["voi_sum"], singletons["voi_sum"]), (evaluation, all_one)
    assert evaluation["adapted_rand_error"] < min(all_one["adapted_rand_error"], singletons["adapted_rand_error"])
    summary = (project / "results" / "evaluation" / "summary.tsv").read_text().splitlines()
    # the predicted volume, then the validate volume the segment parameters were tuned on
    assert summary[0].startswith("volume\trole\t") and len(summary) == 3
    assert summary[1].startswith("predict_0\tpredict\t") and summary[2].startswith("validate_0\tvalidate\t")
    # the classical baseline, tuned on the train volumes, is scored beside dinopipe
    assert {"baseline_voi_sum", "voi_sum_vs_baseline"} <= set(summary[0].split("\t"))
    assert evaluation["baseline_voi_sum"] >= 0
    tuned = json.loads((project / "results" / "evaluation" / "baseline.json").read_text())
    assert len(tuned["volumes"]) == 2 and tuned["parameters"]["sigma"] > 0
    assert not list(project.rglob(".*.tmp-*")), "temporary outputs were left behind"
    # nothing left to do
    assert "Nothing to be done" in snakemake(project, "-n").stdout


def test_dry_run_after_lsd_sigma_change_reruns_targets_not_features(project):
    config = tiny_config()
    config["targets"]["lsd_sigma_nm"] = 48
    (project / "changed.yaml").write_text(yaml.safe_dump(config))
    out = snakemake(project, "-n", "--configfile", str(project / "changed.yaml")).stdout
    jobs = jobs_in(out)
    assert "features" not in jobs and "demo_data" not in jobs
    assert jobs["targets"] == 4 and jobs["metadata"] == 4 and jobs["train"] == 1
    # validate_0 is predicted too: the segment parameters are tuned on it
    assert jobs["segment"] == jobs["evaluate"] == jobs["tune_segment"] == 1 and jobs["predict"] == 2
    assert re.search(r"rule targets:.*?reason: [^\n]*[Pp]arams have changed", out, re.S)


def test_forcing_one_volume_recomputes_exactly_that_job(project):
    target = project / "results" / "features" / "train_1.zarr"
    before = {p: p.stat().st_mtime_ns for p in (project / "results").rglob("*") if p.is_file()}
    first = io.read_image(target).read()
    proc = snakemake(project, "results/features/train_1.zarr", "--force")
    assert jobs_in(proc.stdout + proc.stderr) == {"features": 1}
    changed = {p for p, t in before.items() if not p.exists() or p.stat().st_mtime_ns != t}
    own_benchmark = project / "results" / "benchmarks" / "features" / "train_1.tsv"
    assert changed and all(str(p).startswith(str(target)) or p == own_benchmark for p in changed)
    assert np.array_equal(io.read_image(target).read(), first)  # deterministic on CPU


def test_report_figures_only_for_the_first_volume_figures_predicted_volumes(tmp_path):
    config = tiny_config()
    config["report"] = {"volume_figures": 2}
    write_project(tmp_path, config)
    rows = [f"extra_{i}\tresources/demo/extra_{i}.zarr/raw\t\tpredict\t" for i in range(3)]
    with (tmp_path / "config" / "volumes.tsv").open("a") as sheet:
        sheet.write("\n".join(rows) + "\n")
    out = snakemake(tmp_path, "-n").stdout
    jobs = jobs_in(out)
    # every predicted volume is predicted and segmented, labelled or not; two get a figure
    assert jobs["segment"] == 4 and jobs["evaluate"] == 1 and jobs["predict"] == 5  # + validate_0, for tuning
    assert set(re.findall(r"output: results/report/(\w+)\.png", out)) == {"predict_0", "extra_0", "loss_curve"}


@pytest.mark.parametrize("segment", [{"tune": False}, {"grid": {}}])
def test_fixed_segment_parameters_skip_tuning(tmp_path, segment):
    config = tiny_config()
    config["segment"].update(segment)
    write_project(tmp_path, config)
    jobs = jobs_in(snakemake(tmp_path, "-n").stdout)
    assert "tune_segment" not in jobs and jobs["predict"] == jobs["segment"] == 1


def test_a_grid_key_of_another_method_is_an_error_at_start(tmp_path):
    config = tiny_config()
    assert config["segment"]["method"] == "agglomeration"
    config["segment"]["grid"] = {"bias_short": [-0.5]}  # a parameter of mutex_watershed, not agglomeration
    write_project(tmp_path, config)
    proc = snakemake(tmp_path, "-n", check=False)
    assert proc.returncode != 0
    assert "segment.grid: ['bias_short'] are not parameters of method 'agglomeration'" in proc.stdout + proc.stderr
