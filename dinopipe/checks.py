"""Checks run when the workflow starts, before any job: everything that can be known from
the configuration and the input stores' metadata, so that a bad combination fails in
seconds rather than hours later in a job.

:func:`check_workflow` is called once by ``workflow/rules/common.smk``. It reads only
metadata files (``.zattrs`` / ``.zarray`` / ``zarr.json`` / ``attributes.json``, HDF5
headers): no array data, no chunk listing, no torch. What needs data (NaN in the raw,
all-zero labels, missing chunks, an empty mask) is checked by the jobs.

Every problem found is reported at once, one line each, naming the volume or config key
and what is allowed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from dinopipe.augment import check_offsets_closed, resolve_augment_params, transform_group
from dinopipe.backbone_spec import known_patch_size
from dinopipe.classes import check_class_loss, class_thresholds, overlapping_unlabelled, parse_classes
from dinopipe.geometry import Geometry, superblock_factors
from dinopipe.inputs import child_images, metadata_cache, source_store
from dinopipe.runtime import DEVICE_HELP, is_device_name
from dinopipe.sheet import Volume
from dinopipe.sources import check_paths, open_sources, source_args

logger = logging.getLogger(__name__)



def check_config(config: Mapping[str, Any]) -> list[str]:
    """Problems in combinations of config values that the schema cannot express.

    Checks: device names; ``features.low < features.high``; ``features.stride`` divides the
    backbone's patch size (when that is known without loading the model: built-in tiny
    models, local snapshots, hub ids in the local cache); affinity offsets (three integers,
    not ``[0, 0, 0]``, no duplicates); ``train.crop_shape`` divisible by
    ``2**train.unet.levels``; ``targets.classes`` (:func:`dinopipe.classes.parse_classes`),
    set exactly when ``train.target`` is ``semantic``, and disjoint from ``targets.unlabelled_ids``;
    ``segment.merge_levels`` only with agglomeration, each level a multiple of the previous one.
    """
    problems: list[str] = []
    features = config.get("features") or {}
    train = config.get("train") or {}
    for key, section in (("features", features), ("train", train), ("predict", config.get("predict") or {})):
        device = section.get("device", "auto")
        if not is_device_name(device):
            problems.append(f"{key}.device is {device!r}; allowed: {DEVICE_HELP}")
    low, high = features.get("low", 0.5), features.get("high", 99.5)
    if features.get("intensity", "percentile") == "percentile" and not low < high:
        problems.append(f"features.low ({low}) must be below features.high ({high}): they are the percentiles "
                        f"mapped to 0 and 1")
    stride = features.get("stride")
    if stride is not None:
        backbone = str(features.get("backbone", "tiny-vit"))
        patch = known_patch_size(backbone, features.get("revision"))
        if patch is not None and (stride < 1 or patch % stride):
            divisors = [d for d in range(1, patch + 1) if patch % d == 0]
            problems.append(f"features.stride {stride} does not divide the patch size {patch} of backbone "
                            f"{backbone!r}; allowed: {divisors} or null (the patch size)")
    problems += _offset_problems((config.get("targets") or {}).get("offsets"))
    problems += _class_problems(config)
    segment = config.get("segment") or {}
    if segment.get("merge_levels") is not None:
        method = segment.get("method", "agglomeration")
        if method != "agglomeration":
            problems.append(f"segment.merge_levels is set but segment.method is {method!r}: the hierarchical merge is "
                            "agglomeration's (mean linkage); set it to null")
        try:
            superblock_factors(segment["merge_levels"])
        except ValueError as exc:
            problems.append(str(exc))
    crop, levels = train.get("crop_shape"), (train.get("unet") or {}).get("levels", 2)
    if crop is not None and isinstance(levels, int) and levels >= 0:
        divisor = 2**levels
        if any(int(c) % divisor for c in crop):
            problems.append(
                f"train.crop_shape {list(crop)} is not divisible by 2**train.unet.levels = {divisor} on every axis "
                f"(the UNet halves the crop {levels} times); use multiples of {divisor} or fewer levels"
            )
    return problems


def _class_problems(config: Mapping[str, Any]) -> list[str]:
    """``targets.classes`` well formed, not overlapping ``targets.unlabelled_ids``, set
    exactly when ``train.target`` is ``semantic``, learnt by a loss that fits
    ``targets.classes_overlap``, and ``segment.class_threshold`` naming only classes."""
    targets = config.get("targets") or {}
    train = config.get("train") or {}
    target = train.get("target", "affinities")
    try:
        classes = parse_classes(targets.get("classes"), overlap=targets.get("classes_overlap", False))
    except ValueError as exc:
        return [str(exc)]
    if classes is None:
        return ["train.target is 'semantic' but targets.classes is null: list the classes (name, ids) so that "
                "the targets hold a class image"] if target == "semantic" else []
    problems = []
    if target != "semantic":
        problems.append(f"targets.classes is set but train.target is {target!r}; a class model needs "
                        "train.target: semantic (and train.loss: cross_entropy)")
    else:
        try:
            check_class_loss(train.get("loss", "bce"), classes.overlap)
        except ValueError as exc:
            problems.append(str(exc))
    if classes.overlap:
        try:
            class_thresholds((config.get("segment") or {}).get("class_threshold"), classes)
        except ValueError as exc:
            problems.append(str(exc))
    both = overlapping_unlabelled(classes, targets.get("unlabelled_ids") or [])
    if both:
        problems.append(f"label id(s) {both} are in targets.classes and in targets.unlabelled_ids; an id is either "
                        "a class or 'not annotated'")
    return problems


def _offset_problems(offsets: Any) -> list[str]:
    if offsets is None:
        return []
    problems = []
    seen: set[tuple[int, ...]] = set()
    for o in offsets:
        if not (isinstance(o, Sequence) and len(o) == 3 and all(isinstance(v, int) for v in o)):
            problems.append(f"targets.offsets: {o!r} is not three integers (z, y, x) in voxels")
            continue
        key = tuple(o)
        if key == (0, 0, 0):
            problems.append("targets.offsets: [0, 0, 0] links a voxel to itself (its affinity is always 1); "
                            "every offset needs a non-zero component")
        elif key in seen:
            problems.append(f"targets.offsets: {list(o)} is listed twice")
        seen.add(key)
    return problems


def volume_grids(
    volumes: Iterable[Volume], data: Mapping[str, Any], generated: Sequence[str] = ()
) -> tuple[dict[str, Geometry], list[str]]:
    """Each volume's output grid from its stores' metadata (no data read), and the problems
    found on the way (missing paths, formats, scales, dtypes, geometry, overlap, ROI, as
    :func:`dinopipe.sources.open_sources` finds them). Volumes whose data a rule generates
    (paths under a ``generated`` prefix) are skipped."""
    grids: dict[str, Geometry] = {}
    problems: list[str] = []
    args = {**source_args(data), "missing_chunks": "error"}  # chunks are not listed with metadata_only
    with metadata_cache():
        for volume in volumes:
            if any(source_store(p).startswith(tuple(generated)) for p in (volume.raw, volume.labels) if p):
                continue
            try:
                check_paths(volume)
                grids[volume.name] = open_sources(volume, **args, metadata_only=True).grid
            except (ValueError, FileNotFoundError, OSError) as exc:
                problems.append(str(exc))
    return grids, problems


def check_grids(config: Mapping[str, Any], volumes: Sequence[Volume], grids: Mapping[str, Geometry]) -> list[str]:
    """Problems between volumes and the config, from their output grids: a train or validate
    volume smaller than ``train.crop_shape``; volumes whose grid voxel size differs from the
    training volumes' (the model works at one voxel size; predicted volumes included); an
    offset that the enabled augmentations do not map onto the offsets (up to sign)."""
    problems: list[str] = []
    train = config.get("train") or {}
    crop = [int(c) for c in train.get("crop_shape") or ()]
    roles = {"train", "validate", *((config.get("predict") or {}).get("roles") or ())}
    known = [v for v in volumes if v.name in grids and v.role in roles]
    training = [v for v in known if v.role in ("train", "validate")]
    for v in training:
        shape = grids[v.name].shape
        if crop and any(c > s for c, s in zip(crop, shape)):
            problems.append(f"volume {v.name!r} ({v.role}): its grid {list(shape)} (z, y, x voxels) is smaller than "
                            f"train.crop_shape {crop}; use a smaller crop_shape or remove the volume from {v.role}")
    reference = next((v for v in known if v.role == "train"), None)
    if reference is not None:
        vs = grids[reference.name].voxel_size
        for v in known:
            other = grids[v.name].voxel_size
            if not np.allclose(other, vs):
                problems.append(
                    f"volume {v.name!r} ({v.role}): grid voxel size {list(other)} nm differs from train volume "
                    f"{reference.name!r}'s {list(vs)} nm; one model works at one voxel size (choose the scales with "
                    f"data.label_voxel_size / data.output_voxel_size, or resample the volume)"
                )
        offsets = (config.get("targets") or {}).get("offsets")
        augment = train.get("augment")
        if offsets and augment is not None and crop:
            try:
                group = transform_group(resolve_augment_params(augment), vs, crop)
            except ValueError as exc:
                return [*problems, str(exc)]
            problems += _unmapped(offsets, group)
    return problems


def _unmapped(offsets: Sequence[Sequence[int]], group: Sequence[np.ndarray]) -> list[str]:
    try:
        check_offsets_closed(offsets, group)
    except ValueError as exc:
        return [str(exc)]
    return []


def check_class_labels(config: Mapping[str, Any], volumes: Sequence[Volume], generated: Sequence[str] = ()) -> list[str]:
    """Labels that do not fit ``targets.classes``: a group of class images (a CellMap crop)
    needs classes with an ``array`` each, and such classes need labels that are such a group."""
    try:
        targets = config.get("targets") or {}
        classes = parse_classes(targets.get("classes"), overlap=targets.get("classes_overlap", False))
    except ValueError:
        return []  # reported by check_config
    arrays = classes is not None and classes.from_arrays
    problems = []
    for v in volumes:
        if not v.labels or source_store(v.labels).startswith(tuple(generated)):
            continue
        group = bool(child_images(v.labels))
        if group and not arrays:
            problems.append(f"volume {v.name!r}: labels {v.labels} are a group of class images (a CellMap crop); "
                            f"targets.classes needs an 'array' per class (e.g. {{name: mito, array: mito}})")
        elif arrays and not group:
            problems.append(f"volume {v.name!r}: labels {v.labels} are not a group of class images, but "
                            f"targets.classes names class arrays; point the sheet at the crop group")
    return problems


def check_distributed_flags(config: Mapping[str, Any], volumes: Iterable[Volume]) -> list[str]:
    """Volumes whose sheet row says ``distributed: true`` while ``predict.distributed`` is off
    (the column chooses between parts and one part; the parts' size comes from the config)."""
    if (config.get("predict") or {}).get("distributed") is not None:
        return []
    marked = [v.name for v in volumes if v.distributed]
    if not marked:
        return []
    return [f"volume(s) {marked} are marked distributed (column 'distributed' true in the sheet "
            f"{config.get('volumes')}), but predict.distributed is null: set it (e.g. {{blocks_per_job: 64}}) "
            "or clear the column"]


def check_workflow(
    config: Mapping[str, Any], volumes: Iterable[Volume], *, generated: Sequence[str] = (), shown: int = 20
) -> None:
    """Every check that needs no job: config combinations (:func:`check_config`), each
    volume's stores and grid from metadata (:func:`volume_grids`), volumes against the
    config and each other (:func:`check_grids`), and labels against ``targets.classes``
    (:func:`check_class_labels`).

    Args:
        config: The validated config (schema defaults filled in).
        volumes: The sheet's rows.
        generated: Path prefixes that a rule creates (their volumes are not opened).
        shown: At most this many problems are listed (then their count).

    Raises:
        ValueError: Listing the problems found, one per line.
    """
    volumes = list(volumes)
    problems = check_config(config)
    grids, found = volume_grids(volumes, config.get("data") or {}, generated)
    problems += found
    problems += check_grids(config, volumes, grids)
    problems += check_class_labels(config, volumes, generated)
    problems += check_distributed_flags(config, volumes)
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems[:shown])
        if len(problems) > shown:
            listed += f"\n  ... and {len(problems) - shown} more"
        raise ValueError(f"{len(problems)} problem(s) found before running any job:\n{listed}")
