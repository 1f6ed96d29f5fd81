"""Start-up checks (dinopipe.checks): config combinations and volumes from metadata only."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from dinopipe import io
from dinopipe.checks import check_config, check_grids, check_workflow, volume_grids
from dinopipe.io import Geometry
from dinopipe.sheet import Volume

OFFSETS = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]


def _config(**sections):
    config = {"features": {"backbone": "tiny-vit", "stride": 4, "low": 0.5, "high": 99.5, "device": "auto"},
              "targets": {"offsets": OFFSETS},
              "train": {"crop_shape": [8, 8, 8], "unet": {"levels": 2}, "device": "auto",
                        "augment": {"flip": True, "rot90": True, "transpose": True}},
              "predict": {"roles": ["predict"], "device": "auto"}, "data": {}}
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value}
    return config


def test_a_good_config_has_no_problems():
    assert check_config(_config()) == []
    classes = [{"name": "mito", "ids": [1, 2], "instance": True}, {"name": "er", "ids": [3]}]
    assert check_config(_config(targets={"classes": classes, "unlabelled_ids": [255]},
                                train={"target": "semantic", "loss": "cross_entropy"})) == []
    overlapping = [{"name": "organelle", "ids": [1, 2]}, {"name": "dark", "ids": [1], "instance": True}]
    assert check_config(_config(targets={"classes": overlapping, "classes_overlap": True},
                                train={"target": "semantic", "loss": "bce_dice"})) == []


@pytest.mark.parametrize("sections, message", [
    ({"features": {"device": "gpu"}}, "features.device is 'gpu'; allowed: 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ({"train": {"device": "cuda:x"}}, "train.device is 'cuda:x'"),
    ({"predict": {"device": "GPU"}}, "predict.device is 'GPU'"),
    ({"features": {"low": 99.5, "high": 0.5}}, "features.low (99.5) must be below features.high (0.5)"),
    ({"features": {"low": 50, "high": 50}}, "features.low (50) must be below features.high (50)"),
    ({"features": {"stride": 6}}, "features.stride 6 does not divide the patch size 16 of backbone 'tiny-vit'; "
                                  "allowed: [1, 2, 4, 8, 16] or null"),
    ({"features": {"backbone": "tiny-convnext", "stride": 24}}, "patch size 32 of backbone 'tiny-convnext'"),
    ({"targets": {"offsets": [[1, 0, 0], [0, 0, 0]]}}, "targets.offsets: [0, 0, 0] links a voxel to itself"),
    ({"targets": {"offsets": [[1, 0, 0], [1, 0, 0]]}}, "targets.offsets: [1, 0, 0] is listed twice"),
    ({"targets": {"offsets": [[1, 0]]}}, "targets.offsets: [1, 0] is not three integers"),
    ({"train": {"crop_shape": [8, 8, 10]}}, "train.crop_shape [8, 8, 10] is not divisible by 2**train.unet.levels = 4"),
    ({"train": {"unet": {"levels": 4}}}, "train.crop_shape [8, 8, 8] is not divisible by 2**train.unet.levels = 16"),
    ({"train": {"target": "semantic"}}, "train.target is 'semantic' but targets.classes is null"),
    ({"targets": {"classes": [{"name": "mito", "ids": [1]}]}}, "targets.classes is set but train.target is 'affinities'"),
    ({"targets": {"classes": [{"name": "mito", "ids": [1]}, {"name": "er", "ids": [1]}]},
      "train": {"target": "semantic"}}, "label id 1 is in classes 'mito' and 'er'"),
    ({"targets": {"classes": [{"name": "mito", "ids": [1, 255]}], "unlabelled_ids": [255]},
      "train": {"target": "semantic", "loss": "cross_entropy"}}, "label id(s) [255] are in targets.classes and in targets.unlabelled_ids"),
    # overlapping classes (targets.classes_overlap) need a per-class sigmoid loss, exclusive ones cross_entropy
    ({"targets": {"classes": [{"name": "organelle", "ids": [1, 2]}, {"name": "dark", "ids": [1]}],
                  "classes_overlap": True}, "train": {"target": "semantic", "loss": "cross_entropy"}},
     "train.loss is 'cross_entropy' but the classes overlap"),
    ({"targets": {"classes": [{"name": "mito", "ids": [1]}]}, "train": {"target": "semantic", "loss": "dice"}},
     "train.loss is 'dice' but the classes are exclusive"),
    ({"targets": {"classes": [{"name": "organelle", "ids": [1, 2]}, {"name": "dark", "ids": [1]}]},
      "train": {"target": "semantic", "loss": "cross_entropy"}}, "set targets.classes_overlap: true"),
    ({"targets": {"classes": [{"name": "organelle", "ids": [1, 2]}, {"name": "dark", "ids": [1]}],
                  "classes_overlap": True}, "train": {"target": "semantic", "loss": "bce"},
      "segment": {"class_threshold": {"mito": 0.6}}}, "segment.class_threshold names ['mito'], which are not classes"),
    ({"segment": {"method": "mutex_watershed", "merge_levels": [4]}}, "segment.merge_levels is set but segment.method"),
    ({"segment": {"merge_levels": [2, 3]}}, "segment.merge_levels[1]: blocks per super-block [3, 3, 3] must be "
                                            "multiples of the previous level's [2, 2, 2]"),
])
def test_config_problems(sections, message):
    problems = check_config(_config(**sections))
    assert len(problems) == 1 and message in problems[0], problems


def test_stride_of_a_local_snapshot_is_read_from_its_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "dinov3_vit", "patch_size": 14}))
    problems = check_config(_config(features={"backbone": str(tmp_path), "stride": 4}))
    assert problems == [f"features.stride 4 does not divide the patch size 14 of backbone '{tmp_path}'; "
                        f"allowed: [1, 2, 7, 14] or null (the patch size)"]
    assert check_config(_config(features={"backbone": str(tmp_path), "stride": 7})) == []
    # a hub id that is not in the local cache: unknown, not checked here (the features job does)
    assert check_config(_config(features={"backbone": "nobody/not-cached", "stride": 5})) == []


def _volume(tmp_path, name, label_shape, role="train", label_voxel=16.0):
    store = tmp_path / f"{name}.zarr"
    raw_shape = tuple(int(s * label_voxel / 8) for s in label_shape)
    io.write_image(store / "raw", np.ones(raw_shape, np.uint8), (8, 8, 8), (4, 4, 4))
    io.write_image(store / "labels", np.ones(label_shape, np.uint32), (label_voxel,) * 3, (label_voxel / 2,) * 3)
    return Volume(name, str(store / "raw"), str(store / "labels"), role)


def test_grids_from_metadata_and_problems_between_volumes(tmp_path):
    volumes = [_volume(tmp_path, "t", (8, 16, 16)), _volume(tmp_path, "small", (4, 16, 16), "validate"),
               _volume(tmp_path, "coarse", (4, 8, 8), "predict", label_voxel=32.0),
               Volume("lost", str(tmp_path / "nowhere.zarr/raw"), None, "predict")]
    grids, problems = volume_grids(volumes, {})
    assert grids["t"] == Geometry((8, 16, 16), (16.0, 16.0, 16.0), (8.0, 8.0, 8.0))
    assert grids["coarse"].voxel_size == (32.0, 32.0, 32.0)
    assert len(problems) == 1 and "volume 'lost': raw not found" in problems[0]
    problems = check_grids(_config(), volumes, grids)
    assert problems == [
        "volume 'small' (validate): its grid [4, 16, 16] (z, y, x voxels) is smaller than train.crop_shape [8, 8, 8]; "
        "use a smaller crop_shape or remove the volume from validate",
        "volume 'coarse' (predict): grid voxel size [32.0, 32.0, 32.0] nm differs from train volume 't''s "
        "[16.0, 16.0, 16.0] nm; one model works at one voxel size (choose the scales with data.label_voxel_size / "
        "data.output_voxel_size, or resample the volume)",
    ]
    # volumes that are not predicted are not compared
    assert len(check_grids(_config(predict={"roles": []}), volumes, grids)) == 1


def test_offsets_that_augmentation_cannot_map(tmp_path):
    grids = {"t": Geometry((8, 16, 16), (16.0, 16.0, 16.0), (8.0, 8.0, 8.0))}
    volumes = [Volume("t", "r", "l", "train")]
    config = _config(targets={"offsets": [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 3]]})
    problems = check_grids(config, volumes, grids)
    assert len(problems) == 1 and "affinity offset [0, 0, 3] becomes" in problems[0]
    assert "disable train.augment flip/rot90/transpose" in problems[0]
    no_exchange = _config(targets=config["targets"], train={"augment": {"flip": True, "rot90": False,
                                                                        "transpose": False}})
    assert check_grids(no_exchange, volumes, grids) == []


def test_check_workflow_lists_every_problem_and_reads_no_data(tmp_path):
    good = _volume(tmp_path, "t", (8, 16, 16))
    float_labels = tmp_path / "f.zarr"
    io.write_image(float_labels / "raw", np.ones((16, 32, 32), np.uint8), (8, 8, 8), (4, 4, 4))
    io.write_image(float_labels / "labels", np.ones((8, 16, 16), np.float32), (16, 16, 16), (8, 8, 8))
    # delete every chunk: metadata alone must be enough (data would be read as zeros if read)
    for chunk in (tmp_path / "t.zarr").rglob("s0/*/*/*"):
        chunk.unlink()
    volumes = [good, Volume("f", str(float_labels / "raw"), str(float_labels / "labels"), "train"),
               Volume("demo", "resources/demo/d.zarr/raw", None, "predict")]
    with pytest.raises(ValueError) as err:
        check_workflow(_config(features={"device": "gpu"}), volumes, generated=["resources/demo/"])
    text = str(err.value)
    assert text.startswith("2 problem(s) found before running any job:\n  - features.device is 'gpu'")
    assert "  - volume 'f': labels " in text and "must be integer (instance ids), got float32" in text
    check_workflow(_config(), [good, volumes[2]], generated=["resources/demo/"])


def test_start_up_checks_do_not_import_torch():
    """torch takes seconds to import: the checks run at every `snakemake` start."""
    code = ("import sys; from dinopipe.checks import check_workflow, check_config; import dinopipe.augment; "
            "check_config({'features': {'stride': 4}, 'train': {'augment': {}}}); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
