"""Stores with few files (docs/storage.md): a real Snakemake run of the tiny demo with sharded
feature, prediction and segmentation stores gives bitwise the unsharded run's outputs in far
fewer files, and the loader benchmark that compares the layouts runs."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dinopipe import io
from test_workflow import ROOT, VOLUMES, snakemake, tiny_config, write_project

pytestmark = [pytest.mark.workflow, pytest.mark.slow]

SHARD = 32  # voxels: the tiny volumes (16 x 32 x 32) fit in one shard


def _data_files(store: Path) -> int:
    """Chunk or shard files of every array in ``store`` (metadata files left out)."""
    meta = {"zarr.json", ".zarray", ".zattrs", ".zgroup", ".snakemake_timestamp"}
    return sum(1 for f in store.rglob("*") if f.is_file() and f.name not in meta)


def test_sharded_stores_hold_the_unsharded_outputs_in_few_files(project, tmp_path):
    config = tiny_config()
    for section in ("features", "predict", "segment"):
        config[section] = {**config[section], "shard_shape": SHARD}
    sharded = tmp_path / "sharded"
    write_project(sharded, config)
    snakemake(sharded)
    for kind, name in [("features", v) for v in VOLUMES] + [("predictions", "predict_0"),
                                                         ("predictions", "validate_0"),
                                                         ("segmentations", "predict_0")]:
        plain_store = project / "results" / kind / f"{name}.zarr"
        sharded_store = sharded / "results" / kind / f"{name}.zarr"
        images = ["affinities", "lsds"] if kind == "predictions" else [""]
        for image in images:
            a, b = io.read_image(plain_store / image), io.read_image(sharded_store / image)
            assert (a.format, b.format) == ("ome-ngff 0.4", "ome-ngff 0.5"), (kind, name)
            assert json.loads((sharded_store / image / "s0" / "zarr.json").read_text())["codecs"][0]["name"] \
                == "sharding_indexed"
            np.testing.assert_array_equal(a.read(), b.read(), err_msg=f"{kind}/{name}/{image}")
            assert b.geometry == a.geometry
        # one file per array: features 4 chunks of 16^3 -> 1; predictions 4 blocks of 16^3 -> 1 per image
        assert _data_files(sharded_store) == len(images), (kind, name)
        if kind != "segmentations":  # the segmentation is one 64^3-capped chunk either way
            assert _data_files(plain_store) == 4 * len(images), (kind, name)
    # the scores are the same, and a storage layout is runtime-only: nothing to rerun when the
    # sharded project is driven with the unsharded config
    plain_eval = json.loads((project / "results" / "evaluation" / "predict_0.json").read_text())
    sharded_eval = json.loads((sharded / "results" / "evaluation" / "predict_0.json").read_text())
    assert sharded_eval["voi_sum"] == plain_eval["voi_sum"]
    (sharded / "plain.yaml").write_text(json.dumps(tiny_config()))
    assert "Nothing to be done" in snakemake(sharded, "-n", "--configfile", str(sharded / "plain.yaml")).stdout


def test_the_loader_benchmark_compares_both_layouts(tmp_path):
    """The command docs/storage.md shows, at a tiny size (later flags override its defaults;
    the figures mean nothing at this size)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "docs" / "storage.md").read_text(), re.S)
    (command,) = [line for block in blocks for line in block.splitlines() if "benchmarks/loader.py" in line]
    args = shlex.split(command)
    assert args[:2] == [".venv/bin/python", "benchmarks/loader.py"], command
    tiny = ["--shape", "80", "--channels", "8", "--crops", "2", "--steps", "1", "--paced-steps", "2", "--repeats", "1",
            "--dir", str(tmp_path)]
    proc = subprocess.run([sys.executable, *args[1:], *tiny], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    layouts = result["layouts"]
    assert len(layouts) == 2
    unsharded_name = next(k for k in layouts if "shards" not in k)
    unsharded, sharded = layouts.pop(unsharded_name), layouts.popitem()[1]
    assert result["default_layout"] == unsharded_name  # docs/storage.md: the default stays unsharded
    # 80^3 voxels: 5^3 chunk files of 16^3 vs 2^3 shard files of 64^3 (+ metadata files)
    assert unsharded["files"] == 125 + 4 and sharded["files"] == 8 + 2
    for figures in (unsharded, sharded):
        assert figures["loader_vs_raw_read"] > 0 and 0 <= figures["paced_data_wait_fraction"] <= 1
