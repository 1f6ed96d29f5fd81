"""Config defaults from one source: the schema ships with the package, and every section's
Python defaults agree with it, section by section."""

from __future__ import annotations

import dataclasses
import inspect
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from dinopipe.augment import DEFAULT_AUGMENT_PARAMS
from dinopipe.config import SCHEMA_PATH, load_schema, schema_defaults
from dinopipe.features import FeatureParams
from dinopipe.segment import METHODS
from dinopipe.stages import DEFAULT_PREDICT, DEFAULT_SEGMENT, DEFAULT_TARGETS
from dinopipe.train_params import DEFAULT_TRAIN_PARAMS, resolve_train_params
from dinopipe.unet import UNetConfig

ROOT = Path(__file__).resolve().parents[1]


def _plain(value):
    """Tuples as lists (YAML has no tuples)."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def test_the_packaged_schema_is_the_workflows():
    assert SCHEMA_PATH.is_file()
    assert load_schema() == yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())


def test_schema_defaults_reads_sections_and_nested_mappings():
    augment = load_schema()["properties"]["train"]["properties"]["augment"]["properties"]
    assert schema_defaults("train", "augment") == {k: v["default"] for k, v in augment.items()}
    assert schema_defaults("predict")["block_shape"] == [32, 64, 64]
    with pytest.raises(KeyError, match="'train.nothing'"):
        schema_defaults("train", "nothing")


def test_features_defaults():
    fields = {f.name: f for f in dataclasses.fields(FeatureParams)}
    schema = schema_defaults("features")
    assert set(schema) == set(fields)
    for name, field in fields.items():
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        assert _plain(default) == schema[name], name


def test_targets_defaults():
    assert {k: _plain(v) for k, v in DEFAULT_TARGETS.items()} == schema_defaults("targets")


def test_train_augment_and_unet_defaults():
    schema = schema_defaults("train")
    assert set(schema) == set(DEFAULT_TRAIN_PARAMS)
    for key, value in DEFAULT_TRAIN_PARAMS.items():
        if key not in ("unet", "augment"):
            assert schema[key] == _plain(value), key
    assert schema_defaults("train", "augment") == DEFAULT_AUGMENT_PARAMS
    unet = {f.name: f.default for f in dataclasses.fields(UNetConfig)}
    unet_schema = schema_defaults("train", "unet")
    # in_channels / out_channels come from the data, never from the config
    assert set(unet) - set(unet_schema) == {"in_channels", "out_channels"}
    for key, value in unet_schema.items():
        assert _plain(unet[key]) == value, key
    resolve_train_params({k: v for k, v in schema.items() if k not in ("unet", "augment")})


def test_segment_defaults():
    """The section's own keys agree with DEFAULT_SEGMENT; a method parameter's schema default
    is the method's own default unless DEFAULT_SEGMENT overrides it (fragments: distance)."""
    schema = schema_defaults("segment")
    for key, value in DEFAULT_SEGMENT.items():
        assert schema[key] == _plain(value), key
    seen = set()
    for method, func in METHODS.items():
        for name, param in inspect.signature(func).parameters.items():
            if name in schema and name not in DEFAULT_SEGMENT:
                assert schema[name] == param.default, (method, name)
                seen.add(name)
    assert {"bias_short", "bias_long", "threshold", "seed_threshold", "fragments_low", "fragments_high"} <= seen


def test_predict_defaults():
    schema = schema_defaults("predict")
    assert set(schema) - set(DEFAULT_PREDICT) == {"roles"}  # selects jobs; not read by the stage
    for key, value in DEFAULT_PREDICT.items():
        assert schema[key] == _plain(value), key


def test_the_cli_validates_with_the_packaged_schema(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("predict: {batch_size: 0}\n")
    proc = subprocess.run([sys.executable, "-m", "dinopipe.cli", "run", "--checkpoint", str(tmp_path),
                           "--features", str(tmp_path / "f.zarr"), "--out", str(tmp_path / "o"),
                           "--config", str(bad)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0
    assert "batch_size" in proc.stderr and "minimum" in proc.stderr


@pytest.mark.slow
def test_a_built_wheel_carries_the_schema(tmp_path):
    """An installed package (no source tree beside it) still finds the schema."""
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info beside the sources
    for name in ("pyproject.toml", "README.md"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "dinopipe", src / "dinopipe", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "workflow" / "schemas", src / "workflow" / "schemas")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "wheel"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("dinopipe-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        text = zf.read("dinopipe/schemas/config.schema.yaml").decode()
    assert yaml.safe_load(text) == load_schema()
