"""Labels as classes: the class list, per-class instances and scores, on toy volumes by hand."""

from __future__ import annotations

import numpy as np
import pytest

from dinopipe.classes import (
    class_scores,
    instance_scores,
    instances_of,
    overlapping_unlabelled,
    parse_classes,
    segment_classes,
)
from dinopipe.targets import compute_mask, compute_semantic_targets

CLASSES = [{"name": "mito", "ids": [3, 4], "instance": True}, {"name": "er", "ids": [7]}]


def test_parse_classes_maps_ids_and_names() -> None:
    spec = parse_classes(CLASSES)
    assert spec is not None
    assert spec.names == ["background", "mito", "er"]
    assert spec.num_classes == 3
    assert spec.class_map() == {3: 1, 4: 1, 7: 2}
    assert spec.instance_classes() == [(1, "mito")]
    assert parse_classes(None) is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([], "non-empty list"),
        ([{"name": "mito", "ids": [1]}, {"name": "mito", "ids": [2]}], "listed twice"),
        ([{"name": "background", "ids": [1]}], "not 'background'"),
        ([{"name": "2mito", "ids": [1]}], "expected a letter"),
        ([{"name": "mito", "ids": []}], r"targets.classes\[0\].ids"),
        ([{"name": "mito", "ids": [1.5]}], "integer label ids"),
        ([{"name": "mito", "ids": [1]}, {"name": "er", "ids": [1]}], "exclusive"),
        ([{"name": "mito", "ids": [1], "instance": "yes"}], "true or false"),
        ([{"name": "mito", "ids": [1], "colour": "red"}], "unknown key"),
    ],
)
def test_parse_classes_errors(value, message) -> None:
    with pytest.raises(ValueError, match=message):
        parse_classes(value)


def test_unannotated_ids_are_masked_not_background() -> None:
    """An unlabelled id (CellMap: the dtype's maximum) is mask 0, whatever class it maps to."""
    labels = np.array([[[0, 3, 4, 7, 255, 9]]], dtype=np.uint8)
    spec = parse_classes(CLASSES)
    mask = compute_mask(labels, [255])
    classes, _ = compute_semantic_targets(labels, spec.class_map(), spec.num_classes, mask)
    assert classes.tolist() == [[[0, 1, 1, 2, 0, 0]]]  # 9 is in no class: background
    assert mask.tolist() == [[[1, 1, 1, 1, 0, 1]]]
    assert overlapping_unlabelled(spec, [255, 7]) == [7]


def test_instances_of_splits_components_and_touching_ids() -> None:
    labels = np.array([[[5, 5, 0, 5, 6, 6]]], dtype=np.uint64)
    out = instances_of(labels, labels > 0)
    # two components of id 5, and 6 touching 5 stays separate
    assert out.tolist() == [[[1, 1, 0, 2, 3, 3]]]
    assert instances_of(labels, labels > 0, min_size=2).tolist() == [[[1, 1, 0, 0, 2, 2]]]
    assert not instances_of(labels, np.zeros_like(labels, dtype=bool)).any()


def test_segment_classes_argmax_and_instances() -> None:
    spec = parse_classes(CLASSES)
    probs = np.zeros((3, 1, 1, 5), dtype=np.float32)
    probs[0] = 0.5
    probs[1, 0, 0, [0, 1, 3]] = 0.9  # mito at 0, 1 and 3: two objects
    probs[2, 0, 0, 4] = 0.8
    image, instances = segment_classes(probs, spec)
    assert image.tolist() == [[[1, 1, 0, 1, 2]]]
    assert list(instances) == ["mito"]
    assert instances["mito"].tolist() == [[[1, 1, 0, 2, 0]]]
    with pytest.raises(ValueError, match="expected \\(3, z, y, x\\)"):
        segment_classes(probs[:2], spec)


def test_class_scores_by_hand() -> None:
    truth = np.array([[[0, 1, 1, 1, 2, 2]]])
    pred = np.array([[[1, 1, 1, 0, 2, 0]]])
    s = class_scores(truth, pred, ["background", "a", "b"])
    # class a: tp 2, fp 1 (voxel 0), fn 1 (voxel 3)
    assert s["a"]["iou"] == pytest.approx(2 / 4)
    assert s["a"]["dice"] == pytest.approx(4 / 6)
    assert s["a"]["precision"] == pytest.approx(2 / 3)
    assert s["a"]["recall"] == pytest.approx(2 / 3)
    # class b: tp 1, fp 0, fn 1
    assert s["b"]["iou"] == pytest.approx(1 / 2) and s["b"]["precision"] == 1.0
    # masking voxel 3 removes a's false negative there
    mask = np.array([[[1, 1, 1, 0, 1, 1]]])
    assert class_scores(truth, pred, ["background", "a", "b"], mask)["a"]["iou"] == pytest.approx(2 / 3)
    # a class in neither truth nor prediction has no score
    assert class_scores(truth, pred, ["background", "a", "b", "c"])["c"]["iou"] is None


def test_instance_scores_by_hand() -> None:
    truth = np.zeros((1, 1, 12), dtype=np.uint64)
    truth[0, 0, 0:4] = 1  # matched exactly
    truth[0, 0, 5:9] = 2  # predicted object overlaps 2 of 4 (+1 outside): IoU 2/5 < 0.5, no match
    pred = np.zeros_like(truth)
    pred[0, 0, 0:4] = 7
    pred[0, 0, 7:10] = 8
    pred[0, 0, 11] = 9  # false positive
    s = instance_scores(truth, pred, voxel_size_nm=(8, 8, 8))
    assert (s["tp"], s["fp"], s["fn"]) == (1, 2, 1)
    assert s["f1"] == pytest.approx(2 / (2 + 2 + 1))
    assert s["precision"] == pytest.approx(1 / 3) and s["recall"] == pytest.approx(1 / 2)
    assert s["hausdorff_nm"] == 0.0 and s["mean_matched_iou"] == 1.0
    # lowering the threshold to 0.4 matches object 2 as well
    assert instance_scores(truth, pred, iou_threshold=0.4)["tp"] == 2


def test_hausdorff_in_nm() -> None:
    truth = np.zeros((1, 1, 10), dtype=np.uint64)
    pred = np.zeros_like(truth)
    truth[0, 0, 2:6] = 1
    pred[0, 0, 2:8] = 1  # IoU 4/6; farthest predicted voxel 2 voxels from truth
    s = instance_scores(truth, pred, voxel_size_nm=(4, 4, 10))
    assert s["tp"] == 1 and s["hausdorff_nm"] == pytest.approx(20.0)


def test_instance_scores_empty() -> None:
    empty = np.zeros((2, 2, 2), dtype=np.uint64)
    s = instance_scores(empty, empty)
    assert s["f1"] is None and s["tp"] == 0
