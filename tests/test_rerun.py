"""Recompute exactly what changed (dinopipe.config): runtime-only keys rerun nothing and leave
every output as it was; result-changing keys rerun exactly their dependants, with Snakemake's
reason; key order and settings a job does not use rerun nothing; a changed input never
resumes a stale training run; and the documented command recomputes one volume downstream.

The dry runs read the session's tiny demo project (tests/conftest.py); tests that run jobs
work on a copy of it.
"""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from dinopipe import io
from dinopipe.config import OPTIONAL_KEYS, RESUME_FREE, RUNTIME_KEYS, SELECTION_KEYS, canonical, result_params
from dinopipe.sheet import read_sheet
from dinopipe.stages import run_features, run_predict, run_train
from test_workflow import ROOT, jobs_in, snakemake, tiny_config

SCHEMA = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())

#: A different value for every runtime-only key (tests that the table is complete).
RUNTIME_CHANGES: dict[str, dict[str, Any]] = {
    "data": {"missing_chunks": "fill"},
    "features": {"device": "cpu", "shard_shape": 32},
    "train": {"device": "cpu", "num_threads": 1, "loader_workers": 1, "prefetch": 1, "resume": False,
              "tensorboard": False},
    "predict": {"device": "cpu", "shard_shape": 32},
    "segment": {"shard_shape": 32},
}


def _changed(**sections: dict[str, Any]) -> dict:
    config = tiny_config()
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    return config


def _dry_run(project: Path, config: dict, name: str) -> str:
    path = project / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    proc = snakemake(project, "-n", "--configfile", str(path))
    return proc.stdout + proc.stderr


# --------------------------------------------------------------------------- classification


def test_every_classified_key_exists_in_the_schema():
    sections = SCHEMA["properties"]
    for table in (RUNTIME_KEYS, SELECTION_KEYS):
        for section, keys in table.items():
            assert keys <= set(sections[section]["properties"]), (section, keys)
    assert set(RUNTIME_CHANGES) == set(RUNTIME_KEYS)
    for section, keys in RUNTIME_KEYS.items():
        assert set(RUNTIME_CHANGES[section]) == keys, section
    assert RESUME_FREE == RUNTIME_KEYS["train"] | {"steps"}


def test_result_params_are_canonical_and_leave_out_what_a_job_does_not_use():
    config = tiny_config()
    reordered = copy.deepcopy(config)
    reordered["train"] = dict(reversed(list(config["train"].items())))
    reordered["train"]["unet"] = dict(reversed(list(config["train"]["unet"].items())))
    assert repr(result_params(reordered, "train")) == repr(result_params(config, "train"))
    assert "device" not in result_params(config, "train") and "steps" in result_params(config, "train")
    assert "roles" not in result_params(config, "predict")
    segment = {"method": "mutex_watershed", "bias_short": -0.3, "threshold": 0.7, "fragments_low": 0.1}
    assert result_params({"segment": segment}, "segment") == {"bias_short": -0.3, "method": "mutex_watershed"}
    assert canonical({"b": (1, {"d": 1, "c": 2}), "a": None}) == {"a": None, "b": [1, {"c": 2, "d": 1}]}


def test_optional_keys_are_left_out_while_off():
    """A project without classes keeps the params it had before targets.classes existed."""
    for section, keys in OPTIONAL_KEYS.items():
        for key, off in keys.items():
            assert SCHEMA["properties"][section]["properties"][key]["default"] == off, (section, key)
    config = tiny_config()
    before = result_params(config, "targets")
    assert "classes" not in before
    config["targets"] = {**config["targets"], "classes": None}
    assert repr(result_params(config, "targets")) == repr(before)
    config["targets"]["classes"] = [{"name": "mito", "ids": [1]}]
    assert result_params(config, "targets")["classes"] == [{"ids": [1], "name": "mito"}]


# --------------------------------------------------------------------------- dry runs


@pytest.mark.workflow
@pytest.mark.slow
def test_runtime_only_keys_rerun_nothing(project):
    out = _dry_run(project, _changed(**RUNTIME_CHANGES), "runtime")
    assert "Nothing to be done" in out, out


@pytest.mark.workflow
@pytest.mark.slow
def test_key_order_and_unused_settings_rerun_nothing(project):
    def reverse(value: Any) -> Any:
        return {k: reverse(value[k]) for k in reversed(list(value))} if isinstance(value, dict) else value

    config = reverse(tiny_config())
    # parameters of a segment method the config does not choose
    assert config["segment"]["method"] == "agglomeration"
    config["segment"].update({"bias_short": -0.9, "bias_long": -0.1})
    out = _dry_run(project, config, "reordered")
    assert "Nothing to be done" in out, out


RESULT_CHANGES = [
    # (config change, rules that rerun with their counts; every other rule must not run).
    # Predictions: predict_0 and validate_0 (its prediction tunes the segment parameters).
    ({"features": {"low": 1.0}},
     {"features": 4, "metadata": 4, "train": 1, "predict": 2, "tune_segment": 1, "segment": 1, "evaluate": 1}),
    ({"features": {"batch_size": 3}},
     {"features": 4, "metadata": 4, "train": 1, "predict": 2, "tune_segment": 1, "segment": 1, "evaluate": 1}),
    ({"train": {"learning_rate": 0.001}}, {"train": 1, "predict": 2, "tune_segment": 1, "segment": 1, "evaluate": 1}),
    ({"segment": {"threshold": 0.4}}, {"tune_segment": 1, "segment": 1, "evaluate": 1}),
    ({"predict": {"block_shape": [8, 16, 16]}}, {"predict": 2, "tune_segment": 1, "segment": 1, "evaluate": 1}),
]


@pytest.mark.workflow
@pytest.mark.slow
@pytest.mark.parametrize(("change", "expected"), RESULT_CHANGES, ids=lambda v: str(v)[:40])
def test_result_changing_keys_rerun_exactly_their_dependants(project, change, expected):
    out = _dry_run(project, _changed(**change), "result")
    jobs = jobs_in(out)
    downstream = {"evaluation_summary", "report_slices", "loss_curve_plot", "all"}
    assert {k: v for k, v in jobs.items() if k not in downstream} == expected, out
    first = next(iter(expected))
    assert re.search(rf"rule {first}:.*?reason: [^\n]*[Pp]arams have changed", out, re.S), out


@pytest.mark.workflow
@pytest.mark.slow
def test_a_role_change_reruns_neither_features_nor_targets(project):
    sheet = (project / "config" / "volumes.tsv").read_text()
    moved = project / "config" / "moved.tsv"
    moved.write_text(sheet.replace("train_1\tresources/demo/train_1.zarr/raw\tresources/demo/train_1.zarr/labels\ttrain",
                                   "train_1\tresources/demo/train_1.zarr/raw\tresources/demo/train_1.zarr/labels\tvalidate"))
    assert moved.read_text() != sheet
    out = _dry_run(project, {**tiny_config(), "volumes": "config/moved.tsv"}, "moved")
    jobs = jobs_in(out)
    assert "features" not in jobs and "targets" not in jobs
    assert jobs["metadata"] == 1 and jobs["train"] == 1  # the role is recorded; the train set changed


# --------------------------------------------------------------------------- outputs


def _sheet_row(project: Path, name: str) -> Any:
    """The project's sheet row of volume ``name``, its paths made absolute."""
    volume = next(v for v in read_sheet(project / "config" / "volumes.tsv") if v.name == name)
    return type(volume)(**{**volume.__dict__, "raw": str(project / volume.raw), "labels": str(project / volume.labels)})


@pytest.mark.workflow
@pytest.mark.slow
def test_runtime_only_keys_leave_every_output_as_it_was(project, tmp_path):
    """Recompute features, training and prediction with every runtime-only key changed (and
    one thread instead of two): bitwise the project's outputs. The one exception is torch's
    CPU thread count in training (train.num_threads, or the rule's threads), which changes
    the summation order of a few reductions: agreement to 1e-5, not bitwise."""
    config = _changed(**RUNTIME_CHANGES)
    results = project / "results"
    volume = _sheet_row(project, "train_1")
    run_features(volume, tmp_path / "features.zarr", config["features"], config["data"], threads=1)
    assert np.array_equal(io.read_image(tmp_path / "features.zarr").read(),
                          io.read_image(results / "features" / "train_1.zarr").read())

    run_predict(results / "features" / "predict_0.zarr", results / "model", tmp_path / "pred.zarr",
                config["predict"], threads=1, volume=_sheet_row(project, "predict_0"), data=config["data"])
    for key in ("affinities", "lsds"):
        assert np.array_equal(io.read_image(tmp_path / "pred.zarr" / key).read(),
                              io.read_image(results / "predictions" / "predict_0.zarr" / key).read())

    pairs = {role: [(str(results / "features" / f"{n}.zarr"), str(results / "targets" / f"{n}.zarr"))
                    for n in names] for role, names in (("train", ["train_0", "train_1"]), ("validate", ["validate_0"]))}
    original = torch.load(results / "model" / "checkpoint.pt", weights_only=True)["model"]
    same_threads = {**config["train"], "num_threads": None}  # the rule's 2 threads, as in the project run
    run_train(pairs["train"], pairs["validate"], tmp_path / "model", same_threads, config["features"], threads=2)
    retrained = torch.load(tmp_path / "model" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(original[k], retrained[k]) for k in original)
    assert (tmp_path / "model" / "loss_curve.tsv").read_text() == (results / "model" / "loss_curve.tsv").read_text()

    run_train(pairs["train"], pairs["validate"], tmp_path / "one", config["train"], config["features"], threads=2)
    one = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)["model"]
    for k in original:
        if original[k].is_floating_point():
            assert torch.allclose(original[k], one[k], rtol=1e-4, atol=1e-5), k


@pytest.fixture
def own_project(project, tmp_path) -> Path:
    """A copy of the finished demo project that a test may change and rerun."""
    directory = tmp_path / "own"
    shutil.copytree(project, directory, symlinks=True)
    return directory


@pytest.mark.workflow
@pytest.mark.slow
def test_a_targets_change_never_serves_the_stale_model(own_project):
    """The reported bug: lsd_sigma_nm 64 -> 48, then `snakemake results/model/checkpoint.pt`
    rewrote the targets and 'resumed' at step 12 of 12, leaving the old checkpoint."""
    before = (own_project / "results" / "model" / "checkpoint.pt").read_bytes()
    config = tiny_config()
    config["targets"]["lsd_sigma_nm"] = 48
    (own_project / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake(own_project, "results/model/checkpoint.pt")
    jobs = jobs_in(proc.stdout + proc.stderr)
    # the targets of the train and validate volumes (not predict_0's: not needed for the model)
    assert jobs.get("targets") == 3 and jobs.get("train") == 1 and "features" not in jobs
    log = (own_project / "logs" / "train.log").read_text()
    assert "not resuming" in log and "targets_attrs.lsd_sigma_nm" in log and "starting from step 0" in log
    assert (own_project / "results" / "model" / "checkpoint.pt").read_bytes() != before
    curve = (own_project / "results" / "model" / "loss_curve.tsv").read_text().splitlines()
    assert len(curve) == 14  # header, step 0, 12 steps: trained again, all of it


@pytest.mark.workflow
@pytest.mark.slow
def test_the_documented_command_recomputes_one_volume_downstream(project):
    """docs: a raw store changed in place is not seen by Snakemake; this reruns one volume."""
    command = ["--forcerun", "results/features/train_1.zarr", "results/targets/train_1.zarr"]
    out = snakemake(project, "-n", *command)
    jobs = jobs_in(out.stdout + out.stderr)
    assert {k: jobs.get(k) for k in ("features", "targets", "metadata", "train", "predict", "segment", "evaluate")} \
        == {"features": 1, "targets": 1, "metadata": 1, "train": 1, "predict": 2, "segment": 1, "evaluate": 1}
    assert re.search(r"output: results/features/train_1\.zarr", out.stdout)
    assert not re.search(r"output: results/features/(train_0|validate_0|predict_0)\.zarr", out.stdout)


@pytest.mark.workflow
@pytest.mark.slow
def test_a_config_file_replaces_the_demo_config_only_when_asked(project):
    """config/README.md: `--configfile my.yaml` is merged over config/config.yaml (the demo's
    values); with --replace-workflow-config missing keys take the schema defaults."""
    minimal = project / "minimal.yaml"
    minimal.write_text(yaml.safe_dump({"volumes": "config/volumes.tsv"}))
    merged = snakemake(project, "-n", "--configfile", str(minimal))
    assert "Nothing to be done" in merged.stdout  # every other key came from config/config.yaml
    replaced = snakemake(project, "-n", "--configfile", str(minimal), "--replace-workflow-config")
    out = replaced.stdout + replaced.stderr
    jobs = jobs_in(out)
    assert jobs["demo_data"] == 4 and jobs["train"] == 1
    # the schema's demo shape (32, 48, 48), not the project's config/config.yaml (16, 32, 32)
    assert re.search(r"rule demo_data:.*?reason: [^\n]*[Pp]arams have changed[^\n]*now: \{'label_shape': \[32, 48, 48\]",
                     out, re.S), out
