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
    # CellMap: unmatched objects (2 fp + 1 fn) get half the smallest extent, 8 nm * 1 / 2 = 4 nm
    unmatched = 1.01 ** (-4 / np.sqrt(3 * 64))
    assert s["normalized_hausdorff"] == pytest.approx((1 + 3 * unmatched) / 4)
    assert s["combined_score"] == pytest.approx(np.sqrt(s["f1"] * s["normalized_hausdorff"]))
    # lowering the threshold to 0.4 matches object 2 as well
    assert instance_scores(truth, pred, iou_threshold=0.4)["tp"] == 2


def test_hausdorff_in_nm() -> None:
    truth = np.zeros((1, 1, 10), dtype=np.uint64)
    pred = np.zeros_like(truth)
    truth[0, 0, 2:6] = 1
    pred[0, 0, 2:8] = 1  # IoU 4/6; farthest predicted voxel 2 voxels from truth
    s = instance_scores(truth, pred, voxel_size_nm=(4, 4, 10))
    assert s["tp"] == 1 and s["hausdorff_nm"] == pytest.approx(20.0)
    assert s["normalized_hausdorff"] == pytest.approx(1.01 ** (-20 / np.sqrt(4**2 + 4**2 + 10**2)))
    assert s["combined_score"] == pytest.approx(np.sqrt(1.0 * s["normalized_hausdorff"]))


def test_instance_scores_empty() -> None:
    empty = np.zeros((2, 2, 2), dtype=np.uint64)
    s = instance_scores(empty, empty)
    assert s["f1"] is None and s["tp"] == 0


def test_evaluate_classes_combines_as_cellmap() -> None:
    from dinopipe.classes import evaluate_classes, summary_columns

    spec = parse_classes(CLASSES)
    truth = np.zeros((1, 1, 10), dtype=np.uint8)
    truth[0, 0, 1:4] = 1  # one mito
    truth[0, 0, 6:8] = 2  # er
    labels = truth.astype(np.uint64)
    pred = truth.copy()
    pred[0, 0, 8] = 2  # er: tp 2, fp 1 -> IoU 2/3
    mito = (pred == 1).astype(np.uint64)
    mask = np.ones_like(truth)
    mask[0, 0, 9] = 0
    r = evaluate_classes(truth, labels, mask, pred, {"mito": mito}, spec, (4, 4, 4))
    assert r["classes"]["er"]["iou"] == pytest.approx(2 / 3)
    assert r["classes"]["mito"]["iou"] == 1.0
    assert r["classes"]["mito"]["instances"]["f1"] == 1.0
    assert r["semantic_score"] == pytest.approx(2 / 3)  # er is the only semantic class
    assert r["instance_score"] == pytest.approx(1.0)  # mito found exactly: F1 1, Hausdorff 0
    assert r["overall_score"] == pytest.approx(np.sqrt(2 / 3))
    assert r["mean_iou"] == pytest.approx((1 + 2 / 3) / 2)
    cols = summary_columns(r)
    assert cols == {"iou_mito": 1.0, "f1_mito": 1.0, "hausdorff_nm_mito": 0.0, "iou_er": pytest.approx(2 / 3)}
    with pytest.raises(ValueError, match="no objects of instance class 'mito'"):
        evaluate_classes(truth, labels, mask, pred, {}, spec, (4, 4, 4))


def test_segment_evaluate_and_summarise_a_class_prediction(tmp_path) -> None:
    """Stages on stores: targets with classes, a made-up prediction, the class segmentation
    (OME-NGFF class image + one label image per instance class), its scores and the summary."""
    import csv
    import json

    import zarr

    from dinopipe import io
    from dinopipe.sheet import Volume
    from dinopipe.stages import run_evaluate, run_segment, run_summary, run_targets

    labels = np.zeros((4, 8, 8), np.uint16)
    labels[:, 1:3, 1:3] = 3  # mito object 1
    labels[:, 5:7, 5:7] = 4  # mito object 2 (id 4 also mito)
    labels[:, :, 7] = 7  # er
    io.write_image(tmp_path / "r.zarr", np.zeros((4, 8, 8), np.uint8) + np.arange(8, dtype=np.uint8), (8, 8, 8),
                   (0, 0, 0))
    io.write_image(tmp_path / "l.zarr", labels, (8, 8, 8), (0, 0, 0))
    vol = Volume("v", str(tmp_path / "r.zarr"), str(tmp_path / "l.zarr"), "predict")
    run_targets(vol, tmp_path / "t.zarr", {"classes": CLASSES}, {})
    # a prediction that finds mito object 1, misses object 2 and gets er right
    semantic = io.read_image(tmp_path / "t.zarr" / "semantic").read()
    guess = semantic.copy()
    guess[:, 5:7, 5:7] = 0
    probs = np.stack([(guess == c).astype(np.float32) * 0.8 + 0.1 for c in range(3)])
    io.write_image(tmp_path / "p.zarr" / "classes", probs, (8, 8, 8), (0, 0, 0), channel_axis=True)
    zarr.open_group(str(tmp_path / "p.zarr"), mode="a").attrs["dinopipe"] = {
        "target": "semantic", "class_names": ["background", "mito", "er"], "instance_classes": ["mito"]}

    attrs = run_segment(tmp_path / "p.zarr", tmp_path / "s.zarr", {"min_size": 2})
    assert attrs["method"] == "classes" and attrs["segments"] == {"mito": 1}
    np.testing.assert_array_equal(io.read_image(tmp_path / "s.zarr").read(), guess)
    mito = io.read_image(tmp_path / "s.zarr" / "labels" / "mito").read()
    assert mito.dtype == np.uint64 and set(np.unique(mito)) == {0, 1}
    assert zarr.open_group(str(tmp_path / "s.zarr" / "labels"), mode="r").attrs["labels"] == ["mito"]

    result = run_evaluate("v", tmp_path / "s.zarr", tmp_path / "t.zarr", tmp_path / "e.json")
    assert result["iou_er"] == 1.0
    assert result["iou_mito"] == pytest.approx(0.5)  # one of two equal objects
    assert result["f1_mito"] == pytest.approx(2 / 3)  # tp 1, fn 1
    assert json.loads((tmp_path / "e.json").read_text())["classes"]["mito"]["instances"]["fn"] == 1

    run_summary([tmp_path / "e.json"], tmp_path / "summary.tsv", brief_path=tmp_path / "brief.tsv")
    with open(tmp_path / "summary.tsv") as f:
        row = next(csv.DictReader(f, delimiter="\t"))
    assert float(row["iou_mito"]) == 0.5 and float(row["f1_mito"]) == pytest.approx(0.6667)
    assert "voi_sum" not in row
    with open(tmp_path / "brief.tsv") as f:
        assert next(csv.DictReader(f, delimiter="\t"))["IoU er"] == "1"

    # the report figure: raw | class probabilities | classes over the raw in fixed colours
    from PIL import Image

    from dinopipe.report import CLASS_COLOURS, write_slices

    write_slices(np.zeros((4, 8, 8)), tmp_path / "p.zarr", tmp_path / "s.zarr", tmp_path / "f.png")
    figure = np.asarray(Image.open(tmp_path / "f.png"))
    scale, third = 32, 2 * (8 * 32 + 4)
    er_pixel = figure[scale // 2, third + 7 * scale + scale // 2]  # y 0, x 7: er over black raw
    np.testing.assert_array_equal(er_pixel, (0.45 * CLASS_COLOURS[2].astype(float)).astype(np.uint8))


ARRAY_CLASSES = [{"name": "mito", "array": "mito", "instance": True}, {"name": "er", "array": "er"}]


def test_class_arrays_config() -> None:
    spec = parse_classes(ARRAY_CLASSES)
    assert spec.from_arrays and [c.array for c in spec.classes] == ["mito", "er"]
    with pytest.raises(ValueError, match="either 'ids' .* or 'array'"):
        parse_classes([{"name": "mito", "ids": [1], "array": "mito"}])
    with pytest.raises(ValueError, match="gives 'ids' but 'mito' gives an 'array'"):
        parse_classes([ARRAY_CLASSES[0], {"name": "er", "ids": [2]}])
    with pytest.raises(ValueError, match="used by two classes"):
        parse_classes([ARRAY_CLASSES[0], {"name": "mito2", "array": "mito"}])


def test_combine_class_arrays_unannotated_and_missing_classes() -> None:
    from dinopipe.classes import combine_class_arrays

    spec = parse_classes(ARRAY_CLASSES)
    mito = np.array([[[0, 5, 5, 6, 0, 255, 0]]], dtype=np.uint8)  # 255: not annotated
    er = np.array([[[0, 0, 0, 0, 1, 0, 1]]], dtype=np.uint8)
    er[0, 0, 3] = 1  # also claimed by mito: the first listed class (mito) keeps it
    image, mask, labels = combine_class_arrays({"mito": mito, "er": er}, spec, [255])
    assert image.tolist() == [[[0, 1, 1, 1, 2, 0, 2]]]
    assert mask.tolist() == [[[1, 1, 1, 1, 1, 0, 1]]]  # voxel 5: mito not annotated there
    assert labels.tolist() == [[[0, 1, 1, 2, 3, 0, 3]]]  # two mito objects, er after them
    # a crop without an er array: only voxels a present class claims are known
    image, mask, _ = combine_class_arrays({"mito": mito, "er": None}, spec, [255])
    assert image.tolist() == [[[0, 1, 1, 1, 0, 0, 0]]]
    assert mask.tolist() == [[[0, 1, 1, 1, 0, 0, 0]]]
    with pytest.raises(ValueError, match="none of the class arrays"):
        combine_class_arrays({"mito": None, "er": None}, spec)


def _cellmap_crop(root, name: str, arrays: dict[str, np.ndarray]) -> str:
    """A CellMap-style crop: a group holding one OME-NGFF image per class (8 nm, offset 0)."""
    import zarr

    from dinopipe import io

    crop = root / "labels" / "groundtruth" / name
    zarr.open_group(str(crop), mode="w", zarr_format=2)
    for cls, data in arrays.items():
        io.write_image(crop / cls, data, (8, 8, 8), (4, 4, 4), name=cls)
    return str(crop)


def test_targets_from_class_arrays_of_cellmap_crops(tmp_path) -> None:
    from dinopipe import io
    from dinopipe.sheet import Volume
    from dinopipe.sources import open_sources
    from dinopipe.stages import run_targets

    io.write_image(tmp_path / "raw", np.arange(4 * 6 * 6, dtype=np.uint8).reshape(4, 6, 6), (8, 8, 8), (4, 4, 4))
    mito = np.zeros((4, 6, 6), np.uint8)
    mito[:, 1:3, 1:3] = 7
    mito[:, 0, 5] = 255  # not annotated
    er = np.zeros((4, 6, 6), np.uint8)
    er[:, 4:, :] = 1
    full = Volume("c1", str(tmp_path / "raw"), _cellmap_crop(tmp_path, "crop1", {"mito": mito, "er": er}), "train")
    params = {"classes": ARRAY_CLASSES, "unlabelled_ids": [255]}
    attrs = run_targets(full, tmp_path / "t1.zarr", params, {})
    semantic = io.read_image(tmp_path / "t1.zarr" / "semantic").read()
    mask = io.read_image(tmp_path / "t1.zarr" / "mask").read()
    assert (semantic[:, 1:3, 1:3] == 1).all() and (semantic[:, 4:] == 2).all() and semantic[:, 0, 0].max() == 0
    assert mask[:, 0, 5].max() == 0 and mask.sum() == mask.size - 4
    assert attrs["class_names"] == ["background", "mito", "er"]
    labels = io.read_image(tmp_path / "t1.zarr" / "labels").read()
    assert set(np.unique(labels[semantic == 1]).tolist()) == {1}  # the mito object, apart from er's id
    # a crop without an er array: er is not annotated there, so only mito voxels are known
    only_mito = Volume("c2", str(tmp_path / "raw"), _cellmap_crop(tmp_path, "crop2", {"mito": mito}), "train")
    assert open_sources(only_mito).grid.shape == (4, 6, 6)
    run_targets(only_mito, tmp_path / "t2.zarr", params, {})
    mask2 = io.read_image(tmp_path / "t2.zarr" / "mask").read()
    assert mask2.sum() == 4 * 4 and (mask2[:, 1:3, 1:3] == 1).all()
    # a class group needs array classes, and array classes need a class group
    with pytest.raises(ValueError, match="group of class images .* needs targets.classes with an 'array'"):
        run_targets(full, tmp_path / "t3.zarr", {"classes": CLASSES}, {})
    plain = Volume("p", str(tmp_path / "raw"), str(tmp_path / "labels" / "groundtruth" / "crop1" / "mito"), "train")
    with pytest.raises(ValueError, match="must be a group holding one OME-NGFF image per class"):
        run_targets(plain, tmp_path / "t4.zarr", params, {})


def test_training_pools_class_counts_over_crops() -> None:
    """A class absent from the first crop keeps its weight (balanced over all train crops)."""
    from types import SimpleNamespace

    from dinopipe.train import _num_classes

    a = SimpleNamespace(name="a", attrs={"num_classes": 3, "class_voxels": [60, 30, 0], "class_weights": [1, 1, 0]})
    b = SimpleNamespace(name="b", attrs={"num_classes": 3, "class_voxels": [20, 10, 40], "class_weights": [1, 1, 1]})
    n, weights = _num_classes([a, b], {"class_weights": None})
    # totals 80, 40, 40 of 160: w_c = 160 / (3 n_c)
    assert n == 3 and weights == pytest.approx([160 / 240, 160 / 120, 160 / 120])
    assert _num_classes([a, b], {"class_weights": [1, 2, 3]})[1] == [1, 2, 3]
    old = SimpleNamespace(name="o", attrs={"num_classes": 3, "class_weights": [0.5, 1, 2]})
    assert _num_classes([old], {"class_weights": None})[1] == [0.5, 1, 2]


def test_split_touching_separates_two_blobs_joined_by_a_neck() -> None:
    from dinopipe.classes import split_touching

    z, y, x = np.mgrid[0:12, 0:12, 0:24]
    blobs = ((z - 6) ** 2 + (y - 6) ** 2 + (x - 6) ** 2 <= 25) | ((z - 6) ** 2 + (y - 6) ** 2 + (x - 17) ** 2 <= 25)
    blobs |= (abs(z - 6) <= 1) & (abs(y - 6) <= 1) & (x >= 6) & (x <= 17)  # a thin neck
    objects = instances_of(blobs, blobs)
    assert objects.max() == 1  # connected components: one object
    split = split_touching(objects, (4, 4, 4), h_nm=4.0)
    assert split.max() == 2 and (split[blobs] > 0).all()
    assert split[6, 6, 6] != split[6, 6, 17]
    # a seed depth larger than the blobs' radius keeps them whole (no seed: one object)
    assert split_touching(objects, (4, 4, 4), h_nm=100.0).max() == 1
