"""The organelle demo with overlapping classes (config/organelles_overlap.yaml: a parent class
`organelle` holding `dark` and `bright`, one sigmoid per class) run with real Snakemake on tiny
synthetic volumes in tmp_path: targets hold per-class images and annotation masks, the model
predicts per-class sigmoid probabilities, the segment stage writes one label image per class,
evaluation scores each class within its annotation; and the model learns the classes."""

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

#: The IoU each class must reach on the predicted volume after the short training below (the
#: goal this test states; predicting nothing scores 0, predicting a class everywhere scores its
#: frequency, 1-4 %, checked below).
MIN_IOU = 0.1

NAMES = ["organelle", "dark", "bright"]


def tiny_overlap_config() -> dict:
    """config/organelles_overlap.yaml shrunk to run in a few minutes on 2 cores."""
    config = yaml.safe_load((ROOT / "config" / "organelles_overlap.yaml").read_text())
    config["demo"]["label_shape"] = [16, 48, 48]
    config["train"].update({"steps": 300, "validate_every": 100, "validation_crops": 2, "crop_shape": [16, 32, 32],
                            "learning_rate": 0.004})
    config["predict"]["block_shape"] = [16, 48, 48]
    return config


@pytest.fixture(scope="module")
def overlap_project(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("organelles_overlap")
    (directory / "config").mkdir()
    shutil.copy(ROOT / "config" / "config.yaml", directory / "config" / "config.yaml")
    shutil.copy(ROOT / "config" / "organelles.tsv", directory / "config" / "organelles.tsv")
    (directory / "config" / "organelles_overlap.yaml").write_text(yaml.safe_dump(tiny_overlap_config()))
    # the README's command (`snakemake --configfile config/organelles_overlap.yaml`), the config
    # file given by its absolute path: snakemake resolves --configfile from where it is started
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([*SNAKEMAKE, "--directory", str(directory), "--cores", "2", "--configfile",
                           str(directory / "config" / "organelles_overlap.yaml")], capture_output=True, text=True,
                          env=env, timeout=2400)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    return directory


def _summary(project: Path) -> dict[str, dict[str, str]]:
    with open(project / "results" / "evaluation" / "summary.tsv") as f:
        return {r["volume"]: r for r in csv.DictReader(f, delimiter="\t")}


def test_every_stage_handles_overlapping_classes(overlap_project):
    p = overlap_project
    targets = p / "results" / "targets" / "org_train_0.zarr"
    attrs = zarr.open_group(str(targets), mode="r").attrs["dinopipe"]
    assert attrs["class_names"] == NAMES and attrs["instance_classes"] == ["dark"] and attrs["classes_overlap"]
    classes = io.read_image(targets / "classes").read()
    assert classes.shape == (3, 16, 48, 48) and classes.dtype == np.uint8
    assert (classes[0] == (classes[1] | classes[2])).all()  # the parent holds both children
    assert io.read_image(targets / "class_mask").array.shape == (3, 16, 48, 48)
    assert not (targets / "semantic").exists()
    model = json.loads((p / "results" / "model" / "model_config.json").read_text())
    assert model["target"] == "semantic" and model["classes_overlap"] is True and model["class_names"] == NAMES
    assert model["unet"]["out_channels"] == 3 and model["train_params"]["loss"] == "bce_dice"
    for name in ("org_validate_0", "org_predict_0"):
        probs = io.read_image(p / "results" / "predictions" / f"{name}.zarr" / "classes").read()
        assert probs.shape == (3, 16, 48, 48)
        assert probs.sum(axis=0).max() > 1.0  # one sigmoid per class, not a softmax
        seg = p / "results" / "segmentations" / f"{name}.zarr"
        image = io.read_image(seg)
        assert image.channel_axis and image.array.shape == (3, 16, 48, 48) and image.array.dtype == np.uint8
        assert zarr.open_group(str(seg / "labels"), mode="r").attrs["labels"] == NAMES
        assert io.read_image(seg / "labels" / "dark").array.dtype == np.uint64
        assert (p / "results" / "report" / f"{name}.png").stat().st_size > 0
        scores = json.loads((p / "results" / "evaluation" / f"{name}.json").read_text())
        assert set(scores["classes"]) == set(NAMES)
        assert "instances" in scores["classes"]["dark"] and "instances" not in scores["classes"]["bright"]
    assert not (p / "results" / "tune").exists() and not (p / "results" / "evaluation" / "baseline.json").exists()
    rows = _summary(p)
    assert set(rows) == {"org_validate_0", "org_predict_0"}
    assert {"mean_iou", "iou_organelle", "iou_dark", "iou_bright", "f1_dark", "overall_score"} <= set(
        rows["org_predict_0"])
    # a rerun has nothing to do
    assert jobs_in(snakemake(p, "-n", "--configfile", str(p / "config" / "organelles_overlap.yaml")).stdout) == {}
    # segment.class_threshold is result-changing: segment and evaluate rerun, nothing before them
    changed = tiny_overlap_config()
    changed["segment"]["class_threshold"] = {"dark": 0.6}
    (p / "config" / "changed.yaml").write_text(yaml.safe_dump(changed))
    jobs = jobs_in(snakemake(p, "-n", "--configfile", str(p / "config" / "changed.yaml")).stdout)
    assert set(jobs) >= {"segment", "evaluate"} and not set(jobs) & {"features", "targets", "train", "predict"}, jobs


def test_the_model_learns_the_overlapping_classes(overlap_project):
    p = overlap_project
    rows = _summary(p)
    targets = p / "results" / "targets" / "org_predict_0.zarr"
    truth = io.read_image(targets / "classes").read() > 0
    known = io.read_image(targets / "class_mask").read() > 0
    for k, name in enumerate(NAMES):
        frequency = float(truth[k][known[k]].mean())  # IoU of predicting the class everywhere
        assert 0 < frequency < 0.2
        iou = float(rows["org_predict_0"][f"iou_{name}"])
        assert iou > max(MIN_IOU, frequency), (name, iou, frequency)
