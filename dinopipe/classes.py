"""Labels as classes (organelles): the class list, class images, per-class instances and scores.

A class list (config key ``targets.classes``) names the classes a volume's labels hold and
which label ids belong to each::

    targets:
      classes:
        - {name: mito, ids: [3, 4, 5], instance: true}
        - {name: er, ids: [16, 17]}

Class 0 is ``background``: every known voxel whose id is in no class. Ids listed in
``targets.unlabelled_ids`` are "not annotated" (mask 0; CellMap marks them with the dtype's
maximum). Classes are exclusive (one class per voxel, softmax + cross-entropy): an id may
belong to one class only. Instance classes (``instance: true``) are also segmented into
objects: connected components of the class (optionally split where they touch,
:func:`split_touching`), and scored per object.

With ``targets.classes_overlap: true`` classes may overlap (a parent class such as ``mito``
containing ``mito_mem``): an id or array may belong to several classes, there is no
background channel, and each class is a channel of its own (one sigmoid per class). The
targets are then one 0/1 image per class and one annotation mask per class
(:func:`overlapping_class_targets`, :func:`combine_class_arrays_overlap`), prediction is
thresholded per class (:func:`segment_overlapping`) and each class is scored within its own
annotation mask (:func:`evaluate_overlapping`).

CellMap crops hold one array per class instead (``labels/groundtruth/crop1/{mito,er}``):
then every class names its ``array`` and :func:`combine_class_arrays` builds the class image;
a crop without a class's array leaves that class not annotated.

Pure array functions here, no file I/O; axis order (z, y, x), channels first.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "ClassSpec",
    "Classes",
    "check_class_loss",
    "class_scores",
    "class_thresholds",
    "combine_class_arrays_overlap",
    "evaluate_overlapping",
    "instance_scores",
    "instances_of",
    "overlapping_class_targets",
    "parse_classes",
    "segment_classes",
    "segment_overlapping",
]

#: Class names: used in store paths and summary columns.
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
#: The implicit class 0.
BACKGROUND = "background"


@dataclass(frozen=True)
class ClassSpec:
    """One class: its name, the label ids that belong to it, whether it has instances."""

    name: str
    ids: tuple[int, ...] = ()
    instance: bool = False
    #: Name of the class's own array inside the labels group (CellMap crops), instead of ids.
    array: str | None = None


@dataclass(frozen=True)
class Classes:
    """The class list. Exclusive classes: class ``i + 1`` is ``classes[i]``, class 0 is
    background. Overlapping classes (``overlap``): channel ``i`` is ``classes[i]``, no background."""

    classes: tuple[ClassSpec, ...]
    #: One sigmoid per class (classes may overlap) instead of one softmax over background + classes.
    overlap: bool = False

    @property
    def names(self) -> list[str]:
        """Class names by class id (channel): ``background`` first for exclusive classes."""
        own = [c.name for c in self.classes]
        return own if self.overlap else [BACKGROUND, *own]

    @property
    def num_classes(self) -> int:
        """Number of channels: classes including background, or the classes alone when they overlap."""
        return len(self.classes) + (0 if self.overlap else 1)

    @property
    def from_arrays(self) -> bool:
        """Whether each class has its own array in the labels group (CellMap crops)."""
        return any(c.array is not None for c in self.classes)

    def class_map(self) -> dict[int, int]:
        """Label id -> class id (ids in no class are background, 0); exclusive classes only."""
        if self.overlap:
            raise ValueError("overlapping classes have no single class per label id; use memberships()")
        return {i: k + 1 for k, c in enumerate(self.classes) for i in c.ids}

    def memberships(self) -> dict[int, list[int]]:
        """Label id -> the channels (class indices) it belongs to; for overlapping classes."""
        out: dict[int, list[int]] = {}
        for k, c in enumerate(self.classes):
            for i in c.ids:
                out.setdefault(i, []).append(k if self.overlap else k + 1)
        return out

    def instance_classes(self) -> list[tuple[int, str]]:
        """``(class id, name)`` of the instance classes (the class id is the channel index)."""
        first = 0 if self.overlap else 1
        return [(k + first, c.name) for k, c in enumerate(self.classes) if c.instance]

    def to_attrs(self) -> dict[str, Any]:
        """What stores and model configs record (``class_names``, ``instance_classes``, and
        ``classes_overlap: true`` for overlapping classes; exclusive classes record no such key,
        so stores written before overlapping classes existed keep their attrs)."""
        attrs: dict[str, Any] = {"class_names": self.names,
                                 "instance_classes": [n for _, n in self.instance_classes()]}
        if self.overlap:
            attrs["classes_overlap"] = True
        return attrs

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any], where: str) -> Classes:
        """The class list recorded by :meth:`to_attrs` (ids are not recorded: empty)."""
        names = attrs.get("class_names")
        overlap = bool(attrs.get("classes_overlap", False))
        if not names or (not overlap and names[0] != BACKGROUND):
            raise ValueError(f"{where} records no class names ('class_names' starting with 'background', or "
                             f"with 'classes_overlap: true' the overlapping classes)")
        inst = set(attrs.get("instance_classes") or [])
        return cls(tuple(ClassSpec(n, (), n in inst) for n in (names if overlap else names[1:])), overlap)


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def parse_classes(value: Any, key: str = "targets.classes", overlap: Any = False) -> Classes | None:
    """Check a class list from the config and return it (``None`` when not configured).

    Args:
        value: ``None`` or a list of ``{name, ids, instance}`` mappings, or of
            ``{name, array, instance}`` when every class has its own array in the labels
            group (CellMap crops: ``labels/groundtruth/crop1/{mito,er}``).
        key: The config key, for error messages.
        overlap: ``targets.classes_overlap``: classes may overlap (an id or an array may
            belong to several classes; one sigmoid per class).

    Raises:
        ValueError: Not a list of mappings, a bad or duplicate name (``background`` is
            reserved), a class without ids, a non-integer id, an id or array in two classes
            while classes are exclusive, more than 255 classes, an unknown key in an entry,
            or ``overlap`` not a boolean.
    """
    if not isinstance(overlap, bool):
        raise ValueError(f"targets.classes_overlap must be true or false, got {overlap!r}")
    if value is None:
        return None
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise ValueError(f"{key} must be null or a non-empty list of classes {{name, ids, instance}}, got {value!r}")
    if len(value) > 255:
        raise ValueError(f"{key} lists {len(value)} classes; at most 255 (+ background) fit the uint8 class image")
    specs: list[ClassSpec] = []
    owner: dict[int, str] = {}
    for i, entry in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where} must be a mapping {{name, ids, instance}}, got {entry!r}")
        unknown = sorted(set(entry) - {"name", "ids", "array", "instance"})
        if unknown:
            raise ValueError(f"{where} has unknown key(s) {unknown}; allowed: name, ids or array, instance")
        name = entry.get("name")
        if not isinstance(name, str) or not NAME.match(name) or name == BACKGROUND:
            raise ValueError(f"{where}.name is {name!r}; expected a letter then letters, digits or '_', "
                             f"not {BACKGROUND!r} (class 0)")
        if any(s.name == name for s in specs):
            raise ValueError(f"{where}.name {name!r} is listed twice")
        array = entry.get("array")
        if ("ids" in entry) == (array is not None):
            raise ValueError(f"{where} (class {name!r}) needs either 'ids' (label ids in one labels array) or "
                             f"'array' (the class's own array in the labels group), not both or neither")
        if array is not None:
            if not isinstance(array, str) or not re.match(r"^[A-Za-z0-9_.-]+$", array):
                raise ValueError(f"{where}.array (class {name!r}) must be an array name such as 'mito', got {array!r}")
            if specs and specs[0].array is None:
                raise ValueError(f"{where} (class {name!r}) gives an 'array' but {specs[0].name!r} gives 'ids'; "
                                 f"all classes come from ids of one labels array or each from its own array")
            if not overlap and any(s.array == array for s in specs):
                raise ValueError(f"{where}.array {array!r} is used by two classes; classes are exclusive "
                                 f"(set targets.classes_overlap: true for classes that overlap)")
            specs.append(ClassSpec(name, (), _instance(entry, where, name), array))
            continue
        if specs and specs[0].array is not None:
            raise ValueError(f"{where} (class {name!r}) gives 'ids' but {specs[0].name!r} gives an 'array'; "
                             f"all classes come from ids of one labels array or each from its own array")
        ids = entry.get("ids")
        if not isinstance(ids, Sequence) or isinstance(ids, str) or not ids or not all(_is_int(v) for v in ids):
            raise ValueError(f"{where}.ids (class {name!r}) must be a non-empty list of integer label ids, got {ids!r}")
        for v in ids:
            if int(v) in owner and not overlap:
                raise ValueError(f"label id {v} is in classes {owner[int(v)]!r} and {name!r} ({key}); classes are "
                                 f"exclusive: an id belongs to one class (set targets.classes_overlap: true for "
                                 f"classes that overlap, such as a parent class containing another)")
            if int(v) in owner and owner[int(v)] == name:
                raise ValueError(f"{where}.ids (class {name!r}) lists id {v} twice")
            owner[int(v)] = name
        specs.append(ClassSpec(name, tuple(int(v) for v in ids), _instance(entry, where, name)))
    return Classes(tuple(specs), overlap)


def check_class_loss(loss: str, overlap: bool, where: str = "targets.classes_overlap") -> None:
    """``train.loss`` against the kind of classes: exclusive classes (one softmax) are learnt
    by ``cross_entropy``, overlapping classes (one sigmoid per class) by a per-class loss
    (``dinopipe.losses.LOSSES``: bce, focal, dice, tversky, bce_dice; the names are checked
    by :func:`dinopipe.train_params.resolve_train_params`). Torch-free: checked when the
    workflow starts.

    Raises:
        ValueError: Naming ``train.loss`` and ``where`` (the overlap's source) and the losses allowed.
    """
    if overlap and loss == "cross_entropy":
        raise ValueError(f"train.loss is 'cross_entropy' but the classes overlap ({where} is true): overlapping "
                         f"classes are learnt one sigmoid per class; use bce, focal, dice, tversky or bce_dice")
    if not overlap and loss != "cross_entropy":
        raise ValueError(f"train.loss is {loss!r} but the classes are exclusive ({where} is false): exclusive "
                         f"classes are learnt by one softmax with train.loss: cross_entropy (set "
                         f"targets.classes_overlap: true for one sigmoid per class)")


def _instance(entry: Mapping[str, Any], where: str, name: str) -> bool:
    instance = entry.get("instance", False)
    if not isinstance(instance, bool):
        raise ValueError(f"{where}.instance (class {name!r}) must be true or false, got {instance!r}")
    return instance


def overlapping_unlabelled(classes: Classes, unlabelled_ids: Sequence[int]) -> list[int]:
    """Ids listed both in a class and as unlabelled (a config error)."""
    mapped = classes.memberships()
    return sorted({int(v) for v in unlabelled_ids if int(v) in mapped})


def combine_class_arrays(
    arrays: Mapping[str, np.ndarray | None], classes: Classes, unlabelled_ids: Sequence[int] = (),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class image, mask and instance labels from one array per class (a CellMap crop).

    In class ``c``'s array, a value in ``unlabelled_ids`` is "not annotated", 0 is "not
    ``c``", anything else is ``c`` (instance ids for instance classes, 1 for semantic ones).
    A class whose array is missing (``None``: the crop does not annotate it) is unannotated
    everywhere. A voxel is

    * class ``c`` when ``c``'s array claims it (the first listed class when two do: classes
      are exclusive), known;
    * background (0), known, when no array claims it and every class's array is present and
      annotated there;
    * unknown (mask 0) otherwise: some class might be there.

    For overlapping classes only ``labels`` is used (the objects behind the targets'
    affinities); their classes come from :func:`combine_class_arrays_overlap`.

    Args:
        arrays: Class name -> (z, y, x) integer array or None, for every class of ``classes``.
        classes: The class list (with ``array`` names).
        unlabelled_ids: Values meaning "not annotated" (CellMap: the dtype's maximum);
            values that do not fit an array's dtype are ignored for it.

    Returns:
        ``(class_image, mask, labels)``: uint8 classes, uint8 mask (1 known), and uint64
        instance labels (each class's non-zero values offset so ids of different classes
        never coincide; 0 elsewhere).

    Raises:
        ValueError: Arrays of different shapes, a non-integer array, or no array at all.
    """
    shape = _arrays_shape(arrays, classes)
    image = np.zeros(shape, dtype=np.uint8)
    claimed = np.zeros(shape, dtype=bool)
    annotated_all = np.ones(shape, dtype=bool)
    labels = np.zeros(shape, dtype=np.uint64)
    offset = 0
    overlap = 0
    for k, spec in enumerate(classes.classes, start=1):
        a = arrays.get(spec.name)
        if a is None:
            annotated_all[:] = False
            continue
        mine, unknown = _class_array_parts(a, spec, unlabelled_ids)
        annotated_all &= ~unknown
        overlap += int((mine & claimed).sum())
        new = mine & ~claimed
        image[new] = k
        claimed |= new
        if new.any():
            ids, inverse = np.unique(a[new], return_inverse=True)
            labels[new] = (offset + 1 + inverse.reshape(-1)).astype(np.uint64)
            offset += len(ids)
    if overlap and not classes.overlap:
        logger.warning("%d voxels are claimed by two class arrays; the first listed class keeps them", overlap)
    mask = (claimed | annotated_all).astype(np.uint8)
    return image, mask, labels


def _arrays_shape(arrays: Mapping[str, np.ndarray | None], classes: Classes) -> tuple[int, ...]:
    """The common shape of the present class arrays (an error when none is present or shapes differ)."""
    present = {n: a for n, a in arrays.items() if a is not None}
    if not present:
        raise ValueError(f"none of the class arrays {[c.array for c in classes.classes]} is present")
    shapes = {n: a.shape for n, a in present.items()}
    shape = next(iter(shapes.values()))
    if any(s != shape for s in shapes.values()):
        raise ValueError(f"class arrays differ in shape: {shapes}")
    return tuple(shape)


def _class_array_parts(a: np.ndarray, spec: ClassSpec, unlabelled_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(mine, unknown)`` of one class's array: voxels of the class, and voxels not annotated
    (values in ``unlabelled_ids`` that fit the dtype)."""
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"class array {spec.array!r} must be integer, got {a.dtype}")
    info = np.iinfo(a.dtype)
    unknown_values = [int(v) for v in unlabelled_ids if info.min <= int(v) <= info.max]
    unknown = np.isin(a, np.asarray(unknown_values, dtype=a.dtype)) if unknown_values else np.zeros(a.shape, bool)
    return (a != 0) & ~unknown, unknown


def overlapping_class_targets(
    labels: np.ndarray, classes: Classes, mask: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Per-class 0/1 targets and annotation masks of overlapping classes from one labels array.

    Voxel ``v`` is in class ``c`` when its label id is one of ``c``'s ids (an id may be in
    several classes); every class is annotated wherever ``mask`` is (ids in
    ``targets.unlabelled_ids`` have mask 0 there).

    Args:
        labels: Label ids (z, y, x), any integer dtype.
        classes: Overlapping classes with ``ids`` (``classes.overlap``).
        mask: (z, y, x), nonzero where the labels are annotated.

    Returns:
        ``(targets, annotated, objects)``: uint8 (C, z, y, x), C the number of classes
        (targets are 0 where not annotated), and per instance class its objects (uint64
        (z, y, x), :func:`instances_of` the labels within the class).
    """
    if not classes.overlap or classes.from_arrays:
        raise ValueError("overlapping_class_targets needs overlapping classes with label ids")
    known = np.asarray(mask, dtype=bool)
    if known.shape != labels.shape:
        raise ValueError(f"labels {labels.shape} and mask {known.shape} differ in shape")
    targets = np.zeros((classes.num_classes, *labels.shape), dtype=np.uint8)
    for k, spec in enumerate(classes.classes):
        targets[k] = np.isin(labels, np.asarray(spec.ids)) & known
    annotated = np.broadcast_to(known.astype(np.uint8), targets.shape).copy()
    objects = {name: instances_of(labels, targets[k] > 0) for k, name in classes.instance_classes()}
    return targets, annotated, objects


def combine_class_arrays_overlap(
    arrays: Mapping[str, np.ndarray | None], classes: Classes, unlabelled_ids: Sequence[int] = (),
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Per-class targets, per-class annotation masks and per-class objects of overlapping
    classes, one array per class (a CellMap crop).

    In class ``c``'s array a value in ``unlabelled_ids`` is "not annotated" (CellMap: the
    dtype's maximum), 0 "not ``c``", anything else ``c`` (instance ids for instance classes).
    Unlike exclusive classes, each class keeps its own annotation: ``c`` is annotated where its
    array is present and annotated, whatever the other classes say; a class whose array is
    missing (``None``) is unannotated everywhere (never "absent").

    Args:
        arrays: Class name -> (z, y, x) integer array or None, for every class.
        classes: Overlapping classes with ``array`` names.
        unlabelled_ids: Values meaning "not annotated" (those that fit an array's dtype).

    Returns:
        ``(targets, annotated, objects)``: uint8 (C, z, y, x) 0/1 per class (0 where not
        annotated), uint8 (C, z, y, x) 1 where class ``c`` is annotated, and per instance
        class its objects (uint64 (z, y, x): the array's ids within the class, numbered
        1..n by :func:`instances_of`).
    """
    if not classes.overlap or not classes.from_arrays:
        raise ValueError("combine_class_arrays_overlap needs overlapping classes with an array each")
    shape = _arrays_shape(arrays, classes)
    targets = np.zeros((classes.num_classes, *shape), dtype=np.uint8)
    annotated = np.zeros_like(targets)
    objects: dict[str, np.ndarray] = {}
    for k, spec in enumerate(classes.classes):
        a = arrays.get(spec.name)
        if a is None:
            if spec.instance:
                objects[spec.name] = np.zeros(shape, dtype=np.uint64)
            continue
        mine, unknown = _class_array_parts(a, spec, unlabelled_ids)
        targets[k] = mine
        annotated[k] = ~unknown
        if spec.instance:
            objects[spec.name] = instances_of(a, mine)
    return targets, annotated, objects


# --------------------------------------------------------------------------------------------
# instances
# --------------------------------------------------------------------------------------------


def instances_of(labels: np.ndarray, region: np.ndarray, min_size: int = 0) -> np.ndarray:
    """Objects of one class: the 6-connected components of ``region``, also split where
    ``labels`` changes id (two touching instances with different ids stay two objects).

    Args:
        labels: Label ids (z, y, x), any integer dtype; pass ``region`` itself for a
            binary class image.
        region: Boolean (z, y, x), the voxels of the class.
        min_size: Objects with fewer voxels become 0.

    Returns:
        uint64 (z, y, x), objects numbered 1..n in scan order, 0 outside.
    """
    from scipy import ndimage  # heavy: imported by the jobs that use it (not every stage's)

    region = np.asarray(region, dtype=bool)
    components, n = ndimage.label(region)
    out = np.zeros(region.shape, dtype=np.uint64)
    if n == 0:
        return out
    inside = components[region]
    pairs = np.stack([inside.astype(np.int64), np.asarray(labels)[region].astype(np.int64)], axis=1)
    _, first, inverse = np.unique(pairs, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    counts = np.bincount(inverse)
    # number objects by their first voxel in scan order
    order = np.argsort(first, kind="stable")
    keep = counts[order] >= max(int(min_size), 1)
    new_id = np.zeros(len(first), dtype=np.uint64)
    new_id[order[keep]] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint64)
    out[region] = new_id[inverse]
    return out


def split_touching(objects: np.ndarray, voxel_size_nm: Sequence[float], h_nm: float) -> np.ndarray:
    """Split touching objects: a watershed of each object's distance transform (nm, to the
    nearest voxel outside any object) from its h-maxima, so two blobs joined by a neck become
    two objects when each centre lies at least ``h_nm`` deeper than the neck.

    Args:
        objects: Object ids (z, y, x), 0 outside.
        voxel_size_nm: Voxel size (z, y, x), nm.
        h_nm: Seed depth in nm (> 0); larger splits less.

    Returns:
        uint64 (z, y, x) objects 1..n (an object without a seed keeps its voxels as one object).
    """
    from scipy import ndimage
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    if not h_nm > 0:
        raise ValueError(f"split_touching_nm must be > 0 (nm), got {h_nm!r}")
    region = objects > 0
    if not region.any():
        return np.zeros(objects.shape, dtype=np.uint64)
    dist = ndimage.distance_transform_edt(region, sampling=tuple(float(v) for v in voxel_size_nm))
    seeds, n = ndimage.label(h_maxima(dist, h_nm))
    split = watershed(-dist, seeds, mask=region).astype(np.int64) if n else np.zeros(objects.shape, np.int64)
    # a watershed basin never crosses objects (mask), but keep different ids apart anyway
    unseeded = region & (split == 0)
    split[unseeded] = n + 1 + objects[unseeded].astype(np.int64)
    return instances_of(split, region)


def segment_classes(
    probabilities: np.ndarray, classes: Classes, min_size: int = 0,
    split_touching_nm: float | None = None, voxel_size_nm: Sequence[float] = (1.0, 1.0, 1.0),
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Class image and per-class instances from predicted class probabilities.

    Args:
        probabilities: (num_classes, z, y, x) softmax probabilities, class 0 background.
        classes: The class list (its length must match the channels).
        min_size: Objects of instance classes with fewer voxels become 0 (their voxels
            keep their class in the class image).
        split_touching_nm: If given, touching objects are split (:func:`split_touching`
            with this seed depth in nm) before ``min_size`` applies; None: connected
            components only.
        voxel_size_nm: Voxel size (z, y, x), nm (for the split).

    Returns:
        ``(class_image, instances)``: uint8 (z, y, x) argmax classes, and for each instance
        class its objects (uint64 (z, y, x), connected components of the class, 1..n).
    """
    if probabilities.ndim != 4 or probabilities.shape[0] != classes.num_classes:
        raise ValueError(f"class probabilities have shape {probabilities.shape}; expected ({classes.num_classes}, "
                         f"z, y, x) for classes {classes.names}")
    if classes.overlap:
        raise ValueError("overlapping classes have no argmax class image; use segment_overlapping")
    image = np.argmax(probabilities, axis=0).astype(np.uint8)
    instances = {name: class_objects(image == k, min_size, split_touching_nm, voxel_size_nm)
                 for k, name in classes.instance_classes()}
    return image, instances


def class_objects(region: np.ndarray, min_size: int = 0, split_touching_nm: float | None = None,
                  voxel_size_nm: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Objects of one predicted class: 6-connected components of ``region`` (z, y, x), split
    where they touch when ``split_touching_nm`` (nm) is given (:func:`split_touching`), then
    objects under ``min_size`` voxels dropped; uint64, numbered 1..n."""
    objects = instances_of(region, region)
    if split_touching_nm is not None:
        objects = split_touching(objects, voxel_size_nm, split_touching_nm)
    return instances_of(objects, objects > 0, min_size)


#: Probability above which a voxel is in an overlapping class (``segment.class_threshold``).
DEFAULT_CLASS_THRESHOLD = 0.5


def class_thresholds(value: Any, classes: Classes, key: str = "segment.class_threshold") -> list[float]:
    """One probability threshold per channel of overlapping classes.

    Args:
        value: A number in (0, 1) for every class, or a mapping class name -> number (classes
            not listed take :data:`DEFAULT_CLASS_THRESHOLD`), or None for the default.
        classes: The class list.
        key: The config key, for error messages.

    Raises:
        ValueError: A number outside (0, 1), or a name that is not a class (naming the key).
    """
    def number(v: Any, where: str) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float | np.integer | np.floating) or not 0 < v < 1:
            raise ValueError(f"{where} must be a probability in (0, 1), got {v!r}")
        return float(v)

    if value is None:
        return [DEFAULT_CLASS_THRESHOLD] * classes.num_classes
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(classes.names))
        if unknown:
            raise ValueError(f"{key} names {unknown}, which are not classes; classes: {classes.names}")
        return [number(value[n], f"{key}.{n}") if n in value else DEFAULT_CLASS_THRESHOLD for n in classes.names]
    return [number(value, key)] * classes.num_classes


def segment_overlapping(
    probabilities: np.ndarray, classes: Classes, thresholds: Sequence[float] | None = None, min_size: int = 0,
    split_touching_nm: float | None = None, voxel_size_nm: Sequence[float] = (1.0, 1.0, 1.0),
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Binary class masks and per-class instances from per-class sigmoid probabilities.

    Args:
        probabilities: (C, z, y, x) per-class probabilities of overlapping classes.
        classes: The class list (``overlap``; its length must match the channels).
        thresholds: Per class: a voxel is in the class where its probability exceeds this
            (default 0.5 for every class; :func:`class_thresholds`).
        min_size, split_touching_nm, voxel_size_nm: As in :func:`segment_classes`.

    Returns:
        ``(masks, instances)``: uint8 (C, z, y, x) 0/1 per class, and for each instance class
        its objects (uint64 (z, y, x), 1..n).
    """
    if not classes.overlap:
        raise ValueError("segment_overlapping needs overlapping classes; exclusive ones use segment_classes")
    if probabilities.ndim != 4 or probabilities.shape[0] != classes.num_classes:
        raise ValueError(f"class probabilities have shape {probabilities.shape}; expected ({classes.num_classes}, "
                         f"z, y, x) for classes {classes.names}")
    thresholds = [DEFAULT_CLASS_THRESHOLD] * classes.num_classes if thresholds is None else list(thresholds)
    if len(thresholds) != classes.num_classes:
        raise ValueError(f"{len(thresholds)} thresholds for {classes.num_classes} classes {classes.names}")
    masks = np.stack([probabilities[k] > t for k, t in enumerate(thresholds)]).astype(np.uint8)
    instances = {name: class_objects(masks[k] > 0, min_size, split_touching_nm, voxel_size_nm)
                 for k, name in classes.instance_classes()}
    return masks, instances


# --------------------------------------------------------------------------------------------
# scores
# --------------------------------------------------------------------------------------------


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def class_scores(
    truth: np.ndarray, prediction: np.ndarray, names: Sequence[str], mask: np.ndarray | None = None,
) -> dict[str, dict[str, Any]]:
    """Per-class voxel scores of a class image against the truth (background included).

    For class ``c`` with ``tp``, ``fp``, ``fn`` counted over the known voxels (``mask``):
    IoU ``tp / (tp + fp + fn)``, Dice ``2 tp / (2 tp + fp + fn)``, precision
    ``tp / (tp + fp)``, recall ``tp / (tp + fn)``; a ratio with a zero denominator is
    ``None`` (a class absent from both truth and prediction has no score).

    Args:
        truth, prediction: Class ids (z, y, x), same shape.
        names: Class names by id (``Classes.names``).
        mask: Optional (z, y, x), nonzero where the truth is known.

    Returns:
        ``{name: {"iou", "dice", "precision", "recall", "truth_voxels", "predicted_voxels"}}``.
    """
    if truth.shape != prediction.shape:
        raise ValueError(f"truth {truth.shape} and prediction {prediction.shape} differ in shape")
    known = np.ones(truth.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    t, p = truth[known].astype(np.int64), prediction[known].astype(np.int64)
    n = len(names)
    if t.size and max(int(t.max()), int(p.max())) >= n:
        raise ValueError(f"class ids up to {max(int(t.max()), int(p.max()))} but only {n} class names {list(names)}")
    confusion = np.bincount(t * n + p, minlength=n * n).reshape(n, n)
    out: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(names):
        tp = float(confusion[c, c])
        fn = float(confusion[c].sum()) - tp
        fp = float(confusion[:, c].sum()) - tp
        out[name] = {"iou": _ratio(tp, tp + fp + fn), "dice": _ratio(2 * tp, 2 * tp + fp + fn),
                     "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn),
                     "truth_voxels": int(tp + fn), "predicted_voxels": int(tp + fp)}
    return out


def max_distance_nm(shape: Sequence[int], voxel_size_nm: Sequence[float]) -> float:
    """The Hausdorff distance given to an unmatched object: half the volume's smallest extent (nm),
    as the CellMap Segmentation Challenge's evaluation does."""
    return float(min(float(v) * int(n) / 2 for v, n in zip(voxel_size_nm, shape)))


def normalized_distance(distance_nm: float, voxel_size_nm: Sequence[float]) -> float:
    """A distance mapped to (0, 1] as the CellMap challenge does: ``1.01 ** (-d / |voxel_size|)``
    (1 for d = 0; |voxel_size| the Euclidean norm of the voxel size in nm)."""
    return float(1.01 ** (-float(distance_nm) / float(np.linalg.norm(np.asarray(voxel_size_nm, dtype=float)))))


def instance_scores(
    truth: np.ndarray, prediction: np.ndarray, iou_threshold: float = 0.5,
    voxel_size_nm: Sequence[float] = (1.0, 1.0, 1.0),
) -> dict[str, Any]:
    """Object scores of one instance class: one-to-one matching by overlap, F1, Hausdorff.

    Truth and predicted objects are matched one to one (maximum total IoU, Hungarian);
    a match counts when its IoU is at least ``iou_threshold``. ``f1 = 2 tp / (2 tp + fp + fn)``;
    with neither truth nor predicted objects the ratios are ``None``.

    Hausdorff distances as the CellMap Segmentation Challenge scores instances: each matched
    pair gets the symmetric Hausdorff distance (nm) between its voxel centres, each unmatched
    truth or predicted object :func:`max_distance_nm`; ``hausdorff_nm`` is the mean over the
    matched pairs, ``normalized_hausdorff`` the mean of :func:`normalized_distance` over all
    of them (matched and unmatched), and ``combined_score = sqrt(f1 * normalized_hausdorff)``.

    Args:
        truth, prediction: Object ids (z, y, x), 0 = no object.
        iou_threshold: Minimum IoU of a match, in (0, 1].
        voxel_size_nm: Voxel size in nm (z, y, x), for the Hausdorff distance.

    Returns:
        ``{"tp", "fp", "fn", "precision", "recall", "f1", "mean_matched_iou", "hausdorff_nm",
        "normalized_hausdorff", "combined_score", "n_truth", "n_predicted"}``.
    """
    if truth.shape != prediction.shape:
        raise ValueError(f"truth {truth.shape} and prediction {prediction.shape} differ in shape")
    if not 0 < iou_threshold <= 1:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold!r}")
    t_ids, t_inv = np.unique(truth, return_inverse=True)
    p_ids, p_inv = np.unique(prediction, return_inverse=True)
    t_inv, p_inv = t_inv.reshape(-1), p_inv.reshape(-1)
    overlap = np.zeros((len(t_ids), len(p_ids)), dtype=np.int64)
    np.add.at(overlap, (t_inv, p_inv), 1)
    t_size, p_size = overlap.sum(axis=1), overlap.sum(axis=0)
    t_obj = np.flatnonzero(t_ids != 0)
    p_obj = np.flatnonzero(p_ids != 0)
    inter = overlap[np.ix_(t_obj, p_obj)].astype(np.float64)
    union = t_size[t_obj][:, None] + p_size[p_obj][None, :] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    matches: list[tuple[int, int, float]] = []
    if iou.size:
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(-iou)
        matches = [(int(r), int(c), float(iou[r, c])) for r, c in zip(rows, cols) if iou[r, c] >= iou_threshold]
    tp, n_t, n_p = len(matches), len(t_obj), len(p_obj)
    fp, fn = n_p - tp, n_t - tp
    dists = [_hausdorff(truth == t_ids[t_obj[r]], prediction == p_ids[p_obj[c]], voxel_size_nm)
             for r, c, _ in matches]
    unmatched = normalized_distance(max_distance_nm(truth.shape, voxel_size_nm), voxel_size_nm)
    normalized = [normalized_distance(d, voxel_size_nm) for d in dists] + [unmatched] * (fp + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    norm_h = float(np.mean(normalized)) if normalized else None
    return {"tp": tp, "fp": fp, "fn": fn, "precision": _ratio(tp, n_p), "recall": _ratio(tp, n_t), "f1": f1,
            "mean_matched_iou": float(np.mean([m[2] for m in matches])) if matches else None,
            "hausdorff_nm": float(np.mean(dists)) if dists else None, "normalized_hausdorff": norm_h,
            "combined_score": float(np.sqrt(f1 * norm_h)) if f1 is not None and norm_h is not None else None,
            "n_truth": n_t, "n_predicted": n_p}


def _hausdorff(a: np.ndarray, b: np.ndarray, voxel_size_nm: Sequence[float]) -> float:
    """Symmetric Hausdorff distance (nm) between two non-empty voxel sets (voxel centres)."""
    from scipy import ndimage

    sampling = tuple(float(v) for v in voxel_size_nm)
    to_b = ndimage.distance_transform_edt(~b, sampling=sampling)
    to_a = ndimage.distance_transform_edt(~a, sampling=sampling)
    return float(max(to_b[a].max(), to_a[b].max()))


def mean_score(per_class: Mapping[str, Mapping[str, Any]], key: str, skip: Sequence[str] = (BACKGROUND,)) -> float | None:
    """Mean of ``key`` over the classes that have a score (background left out)."""
    values = [v[key] for n, v in per_class.items() if n not in skip and v.get(key) is not None]
    return float(np.mean(values)) if values else None



def evaluate_classes(
    truth_classes: np.ndarray, truth_labels: np.ndarray, mask: np.ndarray | None, predicted: np.ndarray,
    instances: Mapping[str, np.ndarray], classes: Classes, voxel_size_nm: Sequence[float],
    iou_threshold: float = 0.5,
) -> dict[str, Any]:
    """Every score of a class segmentation against the truth, within the known voxels.

    Per class: :func:`class_scores` (IoU, Dice, precision, recall); per instance class also
    :func:`instance_scores` under ``instances``, the truth objects being
    :func:`instances_of` the truth labels within the class. Outside ``mask`` both truth
    and prediction are cleared first. Summaries (background left out): ``mean_iou``,
    ``mean_dice``, and the CellMap-style ``semantic_score`` (mean IoU of the classes that
    are not instance classes), ``instance_score`` (mean ``combined_score`` of the instance
    classes) and ``overall_score`` (their geometric mean, or the one present).

    Args:
        truth_classes: Class ids (z, y, x), uint8 (the targets' ``semantic``).
        truth_labels: The labels the classes come from (z, y, x) (the targets' ``labels``).
        mask: Known voxels (z, y, x) or None.
        predicted: Predicted class ids (z, y, x).
        instances: Predicted objects per instance class name (z, y, x).
        classes: The class list (:meth:`Classes.from_attrs` suffices).
        voxel_size_nm: Voxel size (z, y, x), nm.
        iou_threshold: Minimum IoU of a matched object.
    """
    known = np.ones(truth_classes.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    per_class: dict[str, dict[str, Any]] = class_scores(truth_classes, predicted, classes.names, known)
    for k, name in classes.instance_classes():
        if name not in instances:
            raise ValueError(f"the segmentation holds no objects of instance class {name!r}")
        truth_objects = instances_of(truth_labels, (truth_classes == k) & known)
        pred_objects = np.where(known, instances[name], 0)
        per_class[name]["instances"] = instance_scores(truth_objects, pred_objects, iou_threshold, voxel_size_nm)
    return _summarise(per_class, classes)


def _summarise(per_class: dict[str, dict[str, Any]], classes: Classes) -> dict[str, Any]:
    """Per-class scores with the volume's summaries (background left out): ``mean_iou``,
    ``mean_dice``, ``semantic_score``, ``instance_score``, ``overall_score``."""
    instance_names = [n for _, n in classes.instance_classes()]
    semantic_names = [n for n in classes.names if n != BACKGROUND and n not in instance_names]
    semantic = mean_score({n: per_class[n] for n in semantic_names}, "iou")
    combined = [per_class[n]["instances"]["combined_score"] for n in instance_names
                if per_class[n]["instances"]["combined_score"] is not None]
    instance = float(np.mean(combined)) if combined else None
    present = [v for v in (semantic, instance) if v is not None]
    overall = float(np.prod(present) ** (1 / len(present))) if present else None
    return {"classes": per_class, "mean_iou": mean_score(per_class, "iou"), "mean_dice": mean_score(per_class, "dice"),
            "semantic_score": semantic, "instance_score": instance, "overall_score": overall}


def evaluate_overlapping(
    truth: np.ndarray, annotated: np.ndarray, truth_objects: Mapping[str, np.ndarray], predicted: np.ndarray,
    instances: Mapping[str, np.ndarray], classes: Classes, voxel_size_nm: Sequence[float],
    iou_threshold: float = 0.5,
) -> dict[str, Any]:
    """Every score of a segmentation of overlapping classes, each class within its own
    annotation mask.

    Class ``c`` is scored as a binary class image (:func:`class_scores`: IoU, Dice,
    precision, recall) over the voxels where ``c`` is annotated (a crop without ``c``'s array
    gives ``c`` no score: ``None``); an instance class also gets :func:`instance_scores` of
    its predicted objects against the truth objects, both cleared outside the annotation.
    Summaries as :func:`evaluate_classes` (``mean_iou``, ``mean_dice``, ``semantic_score``,
    ``instance_score``, ``overall_score``; there is no background).

    Args:
        truth: (C, z, y, x) 0/1 per class (the targets' ``classes``).
        annotated: (C, z, y, x) nonzero where class ``c`` is annotated (``class_mask``).
        truth_objects: Per instance class name, truth objects (z, y, x) (``class_objects/{name}``).
        predicted: (C, z, y, x) 0/1 predicted masks (:func:`segment_overlapping`).
        instances: Per instance class name, predicted objects (z, y, x).
        classes: The class list (``overlap``; :meth:`Classes.from_attrs` suffices).
        voxel_size_nm: Voxel size (z, y, x), nm.
        iou_threshold: Minimum IoU of a matched object.
    """
    expected = (classes.num_classes, *truth.shape[1:])
    for what, array in (("truth", truth), ("annotation mask", annotated), ("prediction", predicted)):
        if array.ndim != 4 or array.shape != expected:
            raise ValueError(f"{what} has shape {array.shape}; expected {expected} for classes {classes.names}")
    per_class: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(classes.names):
        known = np.asarray(annotated[k], dtype=bool)
        scores = class_scores((truth[k] > 0).astype(np.uint8), (predicted[k] > 0).astype(np.uint8),
                              [f"not_{name}", name], known)[name]
        per_class[name] = {**scores, "annotated_voxels": int(known.sum())}
    for k, name in classes.instance_classes():
        if name not in instances or name not in truth_objects:
            raise ValueError(f"no objects of instance class {name!r} in the "
                             f"{'segmentation' if name not in instances else 'truth'}")
        known = np.asarray(annotated[k], dtype=bool)
        truth_k = instances_of(truth_objects[name], (truth[k] > 0) & known)
        pred_k = np.where(known, instances[name], 0)
        per_class[name]["instances"] = instance_scores(truth_k, pred_k, iou_threshold, voxel_size_nm)
    return _summarise(per_class, classes)


def summary_columns(result: Mapping[str, Any]) -> dict[str, Any]:
    """Flat per-class columns of :func:`evaluate_classes` for the summary table:
    ``iou_{class}`` for every class but background and ``f1_{class}``, ``hausdorff_nm_{class}``
    for instance classes."""
    out: dict[str, Any] = {}
    for name, scores in result["classes"].items():
        if name == BACKGROUND:
            continue
        out[f"iou_{name}"] = scores["iou"]
        if "instances" in scores:
            out[f"f1_{name}"] = scores["instances"]["f1"]
            out[f"hausdorff_nm_{name}"] = scores["instances"]["hausdorff_nm"]
    return out
