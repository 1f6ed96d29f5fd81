"""The organelle demo (labels as classes, config/organelles.yaml) run with real Snakemake on
tiny synthetic volumes in tmp_path: targets hold the class image, the class model predicts
per-class probabilities, the segment stage writes classes and per-class objects, evaluation
scores each class; and the model learns the classes (IoU well above trivial predictors')."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from dinopipe import io
from test_workflow import ROOT, SNAKEMAKE, jobs_in, snakemake

pytestmark = [pytest.mark.workflow, pytest.mark.slow]

#: The IoU each organelle class must reach on the predicted volume after the short training
#: below (the goal this test states; an all-background predictor scores 0, predicting the class
#: everywhere scores its frequency, 1-2 %; measured here: 0.22 dark, 0.18 bright; the full
#: demo, 600 steps, reached 0.35-0.39).
MIN_IOU = 0.1


def tiny_organelle_config() -> dict:
    """config/organelles.yaml shrunk to run in a few minutes on 2 cores."""
    config = yaml.safe_load((ROOT / "config" / "organelles.yaml").read_text())
    config["demo"]["label_shape"] = [16, 48, 48]
    config["train"].update({"steps": 300, "validate_every": 100, "validation_crops": 2, "crop_shape": [16, 32, 32],
                            "learning_rate": 0.004, "class_weights": [0.1, 1.0, 1.0]})
    config["predict"]["block_shape"] = [16, 48, 48]
    return config


@pytest.fixture(scope="module")
def organelle_project(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("organelles")
    (directory / "config").mkdir()
    shutil.copy(ROOT / "config" / "config.yaml", directory / "config" / "config.yaml")
    shutil.copy(ROOT / "config" / "organelles.tsv", directory / "config" / "organelles.tsv")
    (directory / "config" / "organelles.yaml").write_text(yaml.safe_dump(tiny_organelle_config()))
    # the command of the README's "Labels as classes" section (the config file given by its
    # absolute path: snakemake resolves --configfile from where it is started, not --directory)
    # about 8 minutes on 2 busy cores, mostly training: a longer limit than test_workflow.snakemake's
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([*SNAKEMAKE, "--directory", str(directory), "--cores", "2", "--configfile",
                           str(directory / "config" / "organelles.yaml")], capture_output=True, text=True, env=env,
                          timeout=2400)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    return directory


def _summary(project: Path) -> dict[str, dict[str, str]]:
    with open(project / "results" / "evaluation" / "summary.tsv") as f:
        return {r["volume"]: r for r in csv.DictReader(f, delimiter="\t")}


def test_every_stage_handles_classes(organelle_project):
    p = organelle_project
    targets = p / "results" / "targets" / "org_train_0.zarr"
    attrs = zarr.open_group(str(targets), mode="r").attrs["dinopipe"]
    assert attrs["class_names"] == ["background", "dark", "bright"] and attrs["instance_classes"] == ["dark"]
    assert io.read_image(targets / "semantic").array.dtype == np.uint8
    model = json.loads((p / "results" / "model" / "model_config.json").read_text())
    assert model["target"] == "semantic" and model["class_names"] == ["background", "dark", "bright"]
    for name in ("org_validate_0", "org_predict_0"):
        probs = io.read_image(p / "results" / "predictions" / f"{name}.zarr" / "classes")
        assert probs.array.shape == (3, 16, 48, 48)
        seg = p / "results" / "segmentations" / f"{name}.zarr"
        assert io.read_image(seg).array.dtype == np.uint8
        assert io.read_image(seg / "labels" / "dark").array.dtype == np.uint64
        assert (p / "results" / "report" / f"{name}.png").stat().st_size > 0
        scores = json.loads((p / "results" / "evaluation" / f"{name}.json").read_text())
        assert set(scores["classes"]) == {"background", "dark", "bright"}
        assert "instances" in scores["classes"]["dark"] and "instances" not in scores["classes"]["bright"]
    # no tuning and no instance baseline for a class model
    assert not (p / "results" / "tune").exists() and not (p / "results" / "evaluation" / "baseline.json").exists()
    rows = _summary(p)
    assert set(rows) == {"org_validate_0", "org_predict_0"}
    assert {"mean_iou", "iou_dark", "iou_bright", "f1_dark", "hausdorff_nm_dark", "overall_score"} <= set(
        rows["org_predict_0"])
    # a rerun has nothing to do
    assert jobs_in(snakemake(p, "-n", "--configfile", str(p / "config" / "organelles.yaml")).stdout) == {}


def test_the_model_learns_the_classes(organelle_project):
    p = organelle_project
    rows = _summary(p)
    targets = p / "results" / "targets" / "org_predict_0.zarr"
    truth = io.read_image(targets / "semantic").read()
    known = io.read_image(targets / "mask").read().astype(bool)
    for k, name in ((1, "dark"), (2, "bright")):
        frequency = float((truth[known] == k).mean())  # IoU of predicting the class everywhere
        assert 0 < frequency < 0.2
        iou = float(rows["org_predict_0"][f"iou_{name}"])
        assert iou > max(MIN_IOU, frequency), (name, iou, frequency)
    assert float(rows["org_predict_0"]["f1_dark"]) > 0


def test_the_report_names_the_class_panels(organelle_project):
    """The report's figure labels and caption describe a class model's panels, not affinities."""
    p = organelle_project
    snakemake(p, "--report", "report.html", "--configfile", str(p / "config" / "organelles.yaml"))
    text = (p / "report.html").read_text()
    assert "raw | class probabilities | classes" in text  # the figure's label
    # its caption (the report also embeds the rules' code, which names both labels)
    assert "probabilities of the first three foreground classes" in text
    assert "predicted affinities to the z, y and x neighbours" not in text
