"""The volume sheet of a CellMap-style tree (`dinopipe sheet`): one row per crop, roles by
crop name or a seeded fraction; the rows open as volumes whose labels are the crop groups."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from dinopipe import io
from dinopipe.sheet import assign_roles, cellmap_crops, cellmap_sheet, read_sheet, write_sheet
from dinopipe.sources import open_sources


def _tree(root: Path) -> tuple[str, Path]:
    """dataset.zarr/recon-1/{em/fibsem-uint8, labels/groundtruth/crop{1,2,10}/{mito,er}}."""
    recon = root / "dataset.zarr" / "recon-1"
    raw = recon / "em" / "fibsem-uint8"
    io.write_image(raw, np.zeros((16, 16, 16), np.uint8), (4, 4, 4), (2, 2, 2))
    crops = recon / "labels" / "groundtruth"
    for i, name in enumerate(("crop10", "crop2", "crop1")):
        zarr.open_group(str(crops / name), mode="w", zarr_format=2)
        io.write_image(crops / name / "mito", np.zeros((4, 4, 4), np.uint8), (8, 8, 8), (4 + 8 * i, 4, 4))
        if name != "crop2":
            io.write_image(crops / name / "er", np.zeros((4, 4, 4), np.uint8), (8, 8, 8), (4 + 8 * i, 4, 4))
    (crops / "notes").mkdir()  # not a crop
    return str(raw), crops


def test_crops_and_roles(tmp_path):
    raw, crops = _tree(tmp_path)
    names = cellmap_crops(crops)
    assert names == ["crop1", "crop2", "crop10"]
    assert assign_roles(names, validate=["crop2"]) == {"crop1": "train", "crop2": "validate", "crop10": "train"}
    split = assign_roles(names, validate_fraction=1 / 3, predict_fraction=1 / 3, seed=3)
    assert sorted(split.values()) == ["predict", "train", "validate"]
    assert split == assign_roles(names, validate_fraction=1 / 3, predict_fraction=1 / 3, seed=3)  # seeded
    with pytest.raises(ValueError, match="not in the tree"):
        assign_roles(names, validate=["crop7"])
    with pytest.raises(ValueError, match="no crop is left to train on"):
        assign_roles(names, validate_fraction=1.0)
    with pytest.raises(ValueError, match="no crop found"):
        cellmap_crops(crops / "notes")


def test_sheet_rows_open_as_volumes(tmp_path):
    raw, crops = _tree(tmp_path)
    volumes = cellmap_sheet(raw, crops, "hela_", predict=["crop10"])
    write_sheet(volumes, tmp_path / "volumes.tsv")
    back = read_sheet(tmp_path / "volumes.tsv")
    assert [(v.name, v.role) for v in back] == [("hela_crop1", "train"), ("hela_crop2", "train"),
                                                ("hela_crop10", "predict")]
    src = open_sources(back[2])  # the crop's grid comes from its first class image
    assert src.grid.shape == (4, 4, 4) and src.grid.translation == (4.0, 4.0, 4.0)


def test_the_command_writes_and_appends(tmp_path):
    raw, crops = _tree(tmp_path)
    exe = Path(sys.executable).parent / "dinopipe"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "dinopipe.cli"]
    out = tmp_path / "config" / "volumes.tsv"
    out.parent.mkdir()
    # the README's command, on this tree
    run = subprocess.run([*cmd, "sheet", "--raw", raw, "--crops", str(crops), "--validate-fraction", "0.2",
                          "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    rows = read_sheet(out)
    assert len(rows) == 3 and sum(v.role == "validate" for v in rows) == 1  # round(0.2 * 3) = 1
    again = subprocess.run([*cmd, "sheet", "--raw", raw, "--crops", str(crops), "--out", str(out), "--append"],
                           capture_output=True, text=True)
    assert again.returncode == 2 and "duplicate volume name 'crop1'" in again.stderr
    ok = subprocess.run([*cmd, "sheet", "--raw", raw, "--crops", str(crops), "--out", str(out), "--append",
                         "--prefix", "b_"], capture_output=True, text=True)
    assert ok.returncode == 0 and len(read_sheet(out)) == 6


def test_start_up_checks_match_labels_and_classes(tmp_path):
    from dinopipe.checks import check_class_labels

    raw, crops = _tree(tmp_path)
    volumes = cellmap_sheet(raw, crops)
    arrays = {"targets": {"classes": [{"name": "mito", "array": "mito"}, {"name": "er", "array": "er"}]}}
    assert check_class_labels(arrays, volumes) == []
    ids = {"targets": {"classes": [{"name": "mito", "ids": [1]}]}}
    problems = check_class_labels(ids, volumes)
    assert len(problems) == 3 and "volume 'crop1'" in problems[0] and "needs an 'array' per class" in problems[0]
    plain = [v.__class__(v.name, v.raw, f"{v.labels}/mito", v.role) for v in volumes]
    assert "not a group of class images" in check_class_labels(arrays, plain)[0]
    assert check_class_labels(ids, plain) == [] and check_class_labels({}, volumes)[0].startswith("volume 'crop1'")
