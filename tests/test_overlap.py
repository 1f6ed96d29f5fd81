"""Overlapping classes (targets.classes_overlap: one sigmoid per class): the class list, per-class
targets and annotation masks, per-class losses, thresholded segmentation and per-class scores,
on toy volumes by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dinopipe.classes import (
    Classes,
    class_thresholds,
    combine_class_arrays_overlap,
    evaluate_overlapping,
    overlapping_class_targets,
    overlapping_unlabelled,
    parse_classes,
    segment_classes,
    segment_overlapping,
)
from dinopipe.losses import build_loss, per_class_loss
from dinopipe.targets import compute_mask

#: The organelle demo's ids as overlapping classes: a parent class holding both kinds.
OVERLAP = [{"name": "organelle", "ids": [1, 2]}, {"name": "dark", "ids": [1], "instance": True},
           {"name": "bright", "ids": [2]}]


def test_parse_overlapping_classes() -> None:
    spec = parse_classes(OVERLAP, overlap=True)
    assert spec is not None and spec.overlap
    assert spec.names == ["organelle", "dark", "bright"]  # no background channel
    assert spec.num_classes == 3
    assert spec.memberships() == {1: [0, 1], 2: [0, 2]}
    assert spec.instance_classes() == [(1, "dark")]
    assert overlapping_unlabelled(spec, [2, 255]) == [2]
    with pytest.raises(ValueError, match="no single class"):
        spec.class_map()
    # the same list without the flag: exclusive classes, and the error says how to allow overlap
    with pytest.raises(ValueError, match="exclusive.*classes_overlap"):
        parse_classes(OVERLAP)
    with pytest.raises(ValueError, match="classes_overlap must be true or false"):
        parse_classes(OVERLAP, overlap="yes")
    with pytest.raises(ValueError, match="lists id 1 twice"):
        parse_classes([{"name": "a", "ids": [1, 1]}], overlap=True)
    # arrays: two classes may read the same array only when classes overlap
    arrays = [{"name": "mito", "array": "mito"}, {"name": "mito_all", "array": "mito"}]
    assert parse_classes(arrays, overlap=True).names == ["mito", "mito_all"]
    with pytest.raises(ValueError, match="used by two classes"):
        parse_classes(arrays)


def test_attrs_round_trip_records_overlap() -> None:
    spec = parse_classes(OVERLAP, overlap=True)
    attrs = spec.to_attrs()
    assert attrs == {"class_names": ["organelle", "dark", "bright"], "instance_classes": ["dark"],
                     "classes_overlap": True}
    back = Classes.from_attrs(attrs, "here")
    assert back.overlap and back.names == spec.names and back.instance_classes() == [(1, "dark")]
    # exclusive classes record no overlap key (older stores keep their attrs)
    assert "classes_overlap" not in parse_classes(OVERLAP[1:]).to_attrs()


def test_overlapping_targets_from_ids() -> None:
    """An id is in every class that lists it; unlabelled ids are unannotated for every class."""
    labels = np.array([[[0, 1, 2, 255, 1]]], dtype=np.uint8)
    spec = parse_classes(OVERLAP, overlap=True)
    mask = compute_mask(labels, [255])
    targets, annotated, objects = overlapping_class_targets(labels, spec, mask)
    assert targets.shape == (3, 1, 1, 5) and targets.dtype == np.uint8
    assert targets[:, 0, 0].tolist() == [[0, 1, 1, 0, 1], [0, 1, 0, 0, 1], [0, 0, 1, 0, 0]]
    assert annotated[:, 0, 0].tolist() == [[1, 1, 1, 0, 1]] * 3
    assert objects["dark"][0, 0].tolist() == [0, 1, 0, 0, 2]  # two separate dark voxels: two objects
    assert set(objects) == {"dark"}


def test_overlapping_targets_from_class_arrays_keep_each_class_annotation() -> None:
    """CellMap crop: each class is annotated where its own array is (dtype max = unannotated);
    a missing array leaves its class unannotated, not absent; a voxel may be in two classes."""
    spec = parse_classes([{"name": "mito", "array": "mito", "instance": True},
                          {"name": "mito_mem", "array": "mito_mem"}, {"name": "er", "array": "er"}], overlap=True)
    mito = np.array([[[0, 3, 3, 255, 0, 4]]], dtype=np.uint8)
    mem = np.array([[[0, 0, 1, 0, 0, 255]]], dtype=np.uint8)
    targets, annotated, objects = combine_class_arrays_overlap({"mito": mito, "mito_mem": mem, "er": None}, spec,
                                                               [255])
    assert targets[:, 0, 0].tolist() == [[0, 1, 1, 0, 0, 1], [0, 0, 1, 0, 0, 0], [0] * 6]
    assert annotated[:, 0, 0].tolist() == [[1, 1, 1, 0, 1, 1], [1, 1, 1, 1, 1, 0], [0] * 6]
    assert objects["mito"][0, 0].tolist() == [0, 1, 1, 0, 0, 2]  # ids 3 and 4: two objects
    with pytest.raises(ValueError, match="differ in shape"):
        combine_class_arrays_overlap({"mito": mito, "mito_mem": mem[..., :3], "er": None}, spec)
    with pytest.raises(ValueError, match="none of the class arrays"):
        combine_class_arrays_overlap({"mito": None, "mito_mem": None, "er": None}, spec)


def test_class_thresholds() -> None:
    spec = parse_classes(OVERLAP, overlap=True)
    assert class_thresholds(None, spec) == [0.5, 0.5, 0.5]
    assert class_thresholds(0.3, spec) == [0.3, 0.3, 0.3]
    assert class_thresholds({"dark": 0.7}, spec) == [0.5, 0.7, 0.5]
    with pytest.raises(ValueError, match=r"segment.class_threshold names \['mito'\]"):
        class_thresholds({"mito": 0.7}, spec)
    with pytest.raises(ValueError, match=r"segment.class_threshold.dark must be a probability"):
        class_thresholds({"dark": 1.5}, spec)
    with pytest.raises(ValueError, match="probability in"):
        class_thresholds(0, spec)


def test_segment_overlapping_thresholds_each_class() -> None:
    spec = parse_classes(OVERLAP, overlap=True)
    probs = np.zeros((3, 1, 1, 6), dtype=np.float32)
    probs[0, 0, 0] = [0.9, 0.9, 0.6, 0.4, 0.9, 0.1]  # organelle
    probs[1, 0, 0] = [0.8, 0.7, 0.1, 0.1, 0.6, 0.9]  # dark: voxels 0-1 and 4-5 (two objects)
    probs[2, 0, 0] = [0.1, 0.6, 0.6, 0.1, 0.1, 0.1]  # bright
    masks, instances = segment_overlapping(probs, spec)
    assert masks.dtype == np.uint8
    assert masks[:, 0, 0].tolist() == [[1, 1, 1, 0, 1, 0], [1, 1, 0, 0, 1, 1], [0, 1, 1, 0, 0, 0]]
    assert instances["dark"][0, 0].tolist() == [1, 1, 0, 0, 2, 2]
    masks, instances = segment_overlapping(probs, spec, [0.5, 0.75, 0.5], min_size=2)
    assert masks[1, 0, 0].tolist() == [1, 0, 0, 0, 0, 1]
    assert instances["dark"][0, 0].tolist() == [0, 0, 0, 0, 0, 0]  # both objects under min_size 2
    with pytest.raises(ValueError, match="expected \\(3, z, y, x\\)"):
        segment_overlapping(probs[:2], spec)
    with pytest.raises(ValueError, match="segment_overlapping"):
        segment_classes(probs, spec)


def test_evaluate_overlapping_scores_each_class_within_its_annotation() -> None:
    spec = parse_classes([{"name": "a", "ids": [1], "instance": True}, {"name": "b", "ids": [2]}], overlap=True)
    truth = np.zeros((2, 1, 1, 6), np.uint8)
    truth[0, 0, 0] = [1, 1, 0, 0, 1, 1]
    truth[1, 0, 0] = [0, 1, 1, 0, 0, 0]
    annotated = np.zeros_like(truth)
    annotated[0, 0, 0] = [1, 1, 1, 1, 0, 0]  # a: only the first four voxels are annotated
    # b: not annotated at all (a crop without b's array): no score, never "absent"
    predicted = np.zeros_like(truth)
    predicted[0, 0, 0] = [1, 0, 0, 1, 1, 1]
    predicted[1, 0, 0] = [1, 1, 1, 1, 1, 1]
    truth_objects = {"a": np.array([[[5, 5, 0, 0, 6, 6]]], np.uint64)}
    instances = {"a": np.array([[[1, 0, 0, 2, 3, 3]]], np.uint64)}
    result = evaluate_overlapping(truth, annotated, truth_objects, predicted, instances, spec, (8.0, 8.0, 8.0))
    a = result["classes"]["a"]
    # known voxels 0..3: truth 1 1 0 0, prediction 1 0 0 1: tp 1, fp 1, fn 1
    assert a["iou"] == pytest.approx(1 / 3) and a["dice"] == pytest.approx(0.5)
    assert a["precision"] == pytest.approx(0.5) and a["recall"] == pytest.approx(0.5)
    assert a["annotated_voxels"] == 4
    b = result["classes"]["b"]
    assert b["iou"] is None and b["annotated_voxels"] == 0 and b["truth_voxels"] == 0
    # objects within a's annotation: truth {0, 1}; predicted {0} (IoU 0.5: a match) and {3}
    inst = a["instances"]
    assert (inst["tp"], inst["fp"], inst["fn"]) == (1, 1, 0)
    assert inst["f1"] == pytest.approx(2 / 3)
    assert result["mean_iou"] == pytest.approx(1 / 3)  # b has no score and is left out
    assert result["semantic_score"] is None
    assert result["overall_score"] == pytest.approx(inst["combined_score"])
    with pytest.raises(ValueError, match="prediction has shape"):
        evaluate_overlapping(truth, annotated, truth_objects, predicted[:1], instances, spec, (8.0, 8.0, 8.0))


def test_per_class_loss_by_hand() -> None:
    """Each class is masked by its own annotation and normalised by it; class weights average
    the classes annotated in the batch."""
    bce = build_loss("bce")
    logits = torch.zeros(1, 2, 1, 2, 2)
    logits[:, 1] = 2.0
    target = torch.ones(1, 2, 1, 2, 2)
    mask = torch.ones(1, 2, 1, 2, 2)
    l0, l1 = math.log(2.0), math.log(1 + math.exp(-2.0))
    assert float(per_class_loss(logits, target, mask, bce)) == pytest.approx((l0 + l1) / 2, rel=1e-6)
    weights = torch.tensor([1.0, 3.0])
    assert float(per_class_loss(logits, target, mask, bce, weights)) == pytest.approx((l0 + 3 * l1) / 4, rel=1e-6)
    # class 1 not annotated in this batch: only class 0 counts, whatever its weight
    mask[:, 1] = 0
    assert float(per_class_loss(logits, target, mask, bce, weights)) == pytest.approx(l0, rel=1e-6)
    # class 0 annotated on one voxel only: its mean over that voxel (logit 5, target 0)
    logits[0, 0, 0, 0, 0] = 5.0
    target[0, 0, 0, 0, 0] = 0.0
    mask[:, 0] = 0
    mask[0, 0, 0, 0, 0] = 1
    assert float(per_class_loss(logits, target, mask, bce)) == pytest.approx(math.log(1 + math.exp(5.0)), rel=1e-6)
    mask[:] = 0
    assert float(per_class_loss(logits, target, mask, bce)) == 0.0
    with pytest.raises(ValueError, match="one annotation mask per class"):
        per_class_loss(logits, target, mask[:, :1], bce)


def test_bce_dice_loss_by_hand() -> None:
    """Logits 0 on four voxels of target 1: BCE ln 2; Dice 1 - (2*2 + 1) / (2 + 4 + 1) with
    smooth 1 (sum p = 2, sum t = 4), i.e. 1 - (tp + s) / (tp + fp/2 + fn/2 + s) = 1 - 3/4."""
    logits, target = torch.zeros(1, 1, 1, 2, 2), torch.ones(1, 1, 1, 2, 2)
    assert float(build_loss("bce_dice")(logits, target)) == pytest.approx(math.log(2) + 0.25, rel=1e-6)
    assert float(build_loss("bce_dice", dice_weight=2.0)(logits, target)) == pytest.approx(math.log(2) + 0.5,
                                                                                           rel=1e-6)
    with pytest.raises(ValueError, match="dice_weight"):
        build_loss("bce_dice", dice_weight=-1)
