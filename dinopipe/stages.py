"""One function per workflow stage: read inputs, call the library, write outputs atomically.

The Snakemake scripts in ``workflow/scripts/`` are thin wrappers around these, so every
stage can be run and tested without Snakemake. All paths are plain paths; every
function writes its output under a temporary name and moves it into place at the end.
Modules that load torch or compiled segmentation libraries are imported inside the stage
that needs them, so that a job loads only its own stage's dependencies.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import shutil
import socket
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from dinopipe import __version__, io
from dinopipe.classes import (
    Classes,
    class_thresholds,
    combine_class_arrays,
    combine_class_arrays_overlap,
    evaluate_classes,
    evaluate_overlapping,
    overlapping_class_targets,
    parse_classes,
    segment_classes,
    segment_overlapping,
    summary_columns,
)
from dinopipe.config import OPTIONAL_KEYS
from dinopipe.inputs import child_images
from dinopipe.logs import Progress
from dinopipe.runtime import allotted_cpus, peak_resident_mb
from dinopipe.sheet import Volume
from dinopipe.sources import intensity_range, open_class_array, open_sources, raw_on_grid, source_args

logger = logging.getLogger(__name__)


def volume_from_dict(record: Mapping[str, Any]) -> Volume:
    """Rebuild a :class:`Volume` from the dict Snakemake passes as a param
    (:meth:`Volume.to_record`)."""
    return Volume.from_record(record)




def demo_seed(name: str, seed: int) -> int:
    """A stable per-volume seed from the volume name and the demo seed."""
    return (zlib.crc32(name.encode()) + 7919 * int(seed)) % (2**31)


def run_demo_data(
    name: str, out_path: str | Path, *, seed: int, label_shape: Sequence[int],
    label_voxel_size: Sequence[float], raw_factor: Sequence[int], organelles: Mapping[str, Any] | None = None,
) -> None:
    """Write one synthetic demo volume as OME-NGFF: ``raw`` (s0 fine, s1 at the label
    voxel size) and ``labels`` (s0), in one store ``out_path``.

    The raw grid's corner coincides with the label grid's corner: raw voxel size is
    ``label_voxel_size / raw_factor``. With ``organelles`` (the ``demo.organelles`` config:
    ``per_cell``, ``cell_diameter_vox``) the cells hold that many organelles on average and
    the store also gets ``organelles`` (uint8 class ids on the label grid: 1 dark, 2 bright,
    0 elsewhere; :func:`dinopipe.demo.make_demo_volume`).
    """
    from dinopipe.demo import make_demo_volume

    extra: dict[str, Any] = {}
    if organelles is not None:
        extra = {"organelle_classes": True, "organelles_per_cell": float(organelles.get("per_cell", 2.0)),
                 "mean_cell_diameter_vox": float(organelles.get("cell_diameter_vox", 20.0))}
    made = make_demo_volume(demo_seed(name, seed), label_shape=tuple(label_shape), raw_factor=tuple(raw_factor),
                            **extra)
    raw, labels = made[0], made[1]
    lvs = np.asarray(label_voxel_size, dtype=float)
    rvs = lvs / np.asarray(raw_factor)
    with io.atomic_output(out_path) as tmp:
        zarr.open_group(str(tmp), mode="w", zarr_format=2)
        io.write_image(tmp / "raw", raw, rvs.tolist(), (rvs / 2).tolist(), name="raw")
        io.write_image(tmp / "labels", labels, lvs.tolist(), (lvs / 2).tolist(), name="labels")
        if organelles is not None:
            io.write_image(tmp / "organelles", made[2], lvs.tolist(), (lvs / 2).tolist(), name="organelles")
        _add_scale(tmp / "raw", raw, raw_factor, rvs)
    logger.info("demo volume %s: raw %s, labels %s (%d ids)", name, raw.shape, labels.shape, len(np.unique(labels)) - 1)


def _add_scale(group_path: Path, raw: np.ndarray, factor: Sequence[int], rvs: np.ndarray) -> None:
    """Add a 2x... mean-downsampled scale ``s1`` to an image group written by io.write_image."""
    f = tuple(int(v) for v in factor)
    shape = tuple(s // k for s, k in zip(raw.shape, f))
    view = raw[: shape[0] * f[0], : shape[1] * f[1], : shape[2] * f[2]].astype(np.float32)
    coarse = view.reshape(shape[0], f[0], shape[1], f[1], shape[2], f[2]).mean(axis=(1, 3, 5))
    group = zarr.open_group(str(group_path), mode="a")
    group.create_array("s1", data=np.rint(coarse).astype(raw.dtype), chunks=io.default_chunks(shape, False),
                       chunk_key_encoding={"name": "v2", "separator": "/"}, config={"write_empty_chunks": True})
    ms = group.attrs["multiscales"]
    cvs = (rvs * np.asarray(f)).tolist()
    ms[0]["datasets"].append({
        "path": "s1",
        "coordinateTransformations": [
            {"type": "scale", "scale": cvs},
            {"type": "translation", "translation": (np.asarray(cvs) / 2).tolist()},
        ],
    })
    group.attrs["multiscales"] = ms


def run_features(
    volume: Volume, out_path: str | Path, features: Mapping[str, Any], data: Mapping[str, Any],
    *, threads: int | None = None,
) -> dict[str, Any]:
    """Compute a volume's DINOv3 features on its output grid and store them.

    Writes an OME-NGFF image ``out_path`` with ``s0`` (C, z, y, x) float16 and the
    signature, intensity range, image sizes and timings under the ``dinopipe`` attrs.
    Memory: the float32 accumulator of the whole output grid, or of one grown block when it
    would exceed ``features.max_memory_mb``, plus the model and one batch; the float16 cast
    is written piece by piece (:func:`dinopipe.io.write_cast`). ``timings.write_s`` is the
    write of the whole-volume path (the blockwise path writes inside ``extract_s``).
    """
    import torch

    from dinopipe.backbone import load_backbone
    from dinopipe.features import (
        FeatureParams,
        context_raw_window,
        extract_features,
        extract_features_blockwise,
        load_upsampler,
        signature,
    )

    torch.set_num_threads(allotted_cpus(threads))
    params = FeatureParams.from_config(features)
    t0 = time.perf_counter()
    src = open_sources(volume, **source_args(data))
    backbone = load_backbone(params.backbone, params.revision, seed=params.seed, device=params.device)
    upsampler = load_upsampler(params.upsampler, backbone.device) if params.upsampler else None
    t_load = time.perf_counter() - t0
    blocking = params.blocking(backbone.channels, src.grid.shape)
    attrs: dict[str, Any] = {
        "volume": volume.name,
        "store_id": io.new_store_id(),
        "raw": {"path": volume.raw, "scale": src.raw.scale, **src.raw.geometry.to_dict()},
        "sources": src.provenance(),
    }
    g = src.grid
    chunks = io.default_chunks((backbone.channels, *g.shape), channel_axis=True, spatial=io.FEATURE_CHUNK)
    shards = io.shard_shape((backbone.channels, *g.shape), chunks, params.shard_shape, channel_axis=True,
                            key="features.shard_shape")
    size = backbone.channels * int(np.prod(g.shape)) * np.dtype(np.float16).itemsize
    with io.atomic_output(out_path, what=f"features of volume {volume.name!r}", expected_bytes=size) as tmp, \
            Progress(None, f"features {volume.name}", "slice") as bar:
        out = io.create_image(tmp, (backbone.channels, *g.shape), np.float16, g.voxel_size, g.translation,
                              channel_axis=True, name=f"{volume.name} DINOv3 features", chunks=chunks,
                              compress=False, order=io.FEATURE_ORDER, shards=shards)
        if blocking is None:
            # raw is small next to the feature accumulator: read it once rather than
            # decompressing chunks again for every batch of xz / yz slices; only the raw under
            # the grid plus the context (features.context_nm) around it, intensity range from the whole raw
            window, sub_raw = context_raw_window(src.raw.geometry, g, params, backbone.patch_size)
            try:
                intensity = intensity_range(src.raw.array, params.intensity, params.low, params.high)
            except ValueError as exc:
                raise ValueError(f"volume {volume.name!r}: {exc}") from exc
            feats, info = extract_features(
                np.asarray(src.raw.array[window]), sub_raw, g, backbone, params, volume=volume.name,
                progress=bar.update, upsampler=upsampler, intensity=intensity,
            )
            t1 = time.perf_counter()
            # cast to float16 piece by piece (shard by shard when sharded): no float16 copy of the
            # whole beside the accumulator
            io.write_cast(out, feats)
            del feats
        else:
            logger.info("volume %s: blockwise features, blocks of %s voxels, halo %d", volume.name, blocking,
                        params.block_halo)
            if shards is not None and any(b % s and b < n for b, s, n in zip(blocking, shards[1:], g.shape)):
                logger.info("volume %s: blocks %s are not whole shards %s (features.block_shape vs "
                            "features.shard_shape): shards on block faces are buffered until complete",
                            volume.name, blocking, list(shards[1:]))

            with io.ShardWriter(out) as writer:
                def write(core: tuple[slice, ...], block: np.ndarray) -> None:
                    if writer.shards is None:  # cast piece by piece into the store
                        io.write_cast(out, block, (0, *(s.start for s in core)))
                    else:  # cast into the shard buffers, each shard written once complete
                        writer[(slice(None), *core)] = block

                info = extract_features_blockwise(
                    src.raw.array, src.raw.geometry, g, backbone, params, write, block_shape=blocking,
                    halo=params.block_halo, volume=volume.name, progress=bar.update, upsampler=upsampler,
                )
            if writer.partial_writes:
                logger.warning("volume %s: %d feature shards were written in parts (each part rewrites the "
                               "shard's file): make features.block_shape a multiple of features.shard_shape",
                               volume.name, writer.partial_writes)
            t1 = time.perf_counter()
        attrs["signature"] = signature(backbone, params, src.raw.geometry, g, info["intensity_range"],
                                       info["image_size"])
        attrs["image_size"] = info["image_size"]
        attrs["blocks"] = {"block_shape": blocking, "halo": params.block_halo, "count": info.get("blocks", 1)}
        attrs["timings"] = {"load_s": t_load, "planes": info["timings"], "extract_s": t1 - t0 - t_load,
                            "write_s": time.perf_counter() - t1}
        attrs["peak_rss_mb"] = peak_resident_mb()
        io.set_attrs(tmp, attrs)
    logger.info("features %s: %s in %.1fs, peak RSS %.0f MB", volume.name, (backbone.channels, *g.shape),
                time.perf_counter() - t0, attrs["peak_rss_mb"])
    return attrs


#: Defaults of the ``targets`` config section.
DEFAULT_TARGETS: dict[str, Any] = {
    "offsets": [[1, 0, 0], [0, 1, 0], [0, 0, 1], [3, 0, 0], [0, 3, 0], [0, 0, 3]],
    "lsd_sigma_nm": 64.0,
    "boundary_weight_max": 5.0,
    "boundary_sigma_nm": 32.0,
    "unlabelled_ids": [],
    "mask_erosion_nm": 0.0,
    "classes": None,
    "classes_overlap": False,
}


def run_targets(
    volume: Volume, out_path: str | Path, targets: Mapping[str, Any], data: Mapping[str, Any],
    threads: int | None = None,
) -> dict[str, Any]:
    """Compute a volume's training targets on its output grid and store them.

    ``threads`` (the job's Snakemake threads) bounds the threads of the LSD filters and distance
    transforms, together with the batch system's allotment (:func:`dinopipe.runtime.allotted_cpus`).

    Writes a group ``out_path`` with OME-NGFF images ``labels`` (uint64),
    ``affinities`` (n_offsets, z, y, x) uint8, ``lsds`` (10, z, y, x) float16,
    ``boundary_weights`` float32, ``mask`` uint8 and ``raw`` (float32, 0..1, area-averaged
    onto the label grid); root attrs hold the parameters and timings. With ``classes``
    (:mod:`dinopipe.classes`) also ``semantic`` (uint8 class ids, 0 background) and, in the
    root attrs, ``num_classes``, ``class_names``, ``instance_classes``, ``class_voxels`` (known
    voxels per class) and ``class_weights`` (balanced inverse frequency over the known voxels,
    :func:`dinopipe.targets.compute_semantic_targets`; training pools ``class_voxels`` over
    its volumes instead).
    Classes with an ``array`` each read their own image of the labels group (a CellMap crop,
    :func:`dinopipe.classes.combine_class_arrays`); ``labels`` then holds their objects.

    Overlapping classes (``classes_overlap``) write, instead of ``semantic``, ``classes``
    (C, z, y, x) uint8 0/1 per class, ``class_mask`` (C, z, y, x) uint8, where each class is
    annotated (within ``mask``, their union, eroded as ``mask_erosion_nm`` says), and under
    ``class_objects/{name}`` the truth objects of each instance class (uint64); root attrs
    ``num_classes`` (C), ``class_names``, ``instance_classes``, ``classes_overlap``,
    ``class_voxels`` (voxels in the class) and ``class_annotated_voxels`` per class.
    """
    from dinopipe import targets as tg

    params = {**DEFAULT_TARGETS, **targets}
    unknown = sorted(set(params) - set(DEFAULT_TARGETS))
    if unknown:
        raise ValueError(f"unknown key(s) in config section 'targets': {unknown}; allowed: {sorted(DEFAULT_TARGETS)}")
    src = open_sources(volume, **source_args(data))
    if src.labels is None or src.label_window is None:
        raise ValueError(f"volume {volume.name!r} has no labels: targets need labels (role {volume.role!r})")
    timed = _Timings()
    workers = allotted_cpus(threads)
    vs = src.grid.voxel_size
    classes = parse_classes(params["classes"], overlap=params["classes_overlap"])
    found = _read_label_targets(volume, src, params, classes, data, timed, workers)
    class_attrs = _class_targets(volume, found, classes, timed)
    labels = found.labels
    affs = timed("affinities_s", tg.compute_affinities, labels, params["offsets"])
    lsds = timed("lsds_s", tg.compute_lsds, labels, params["lsd_sigma_nm"], vs, num_workers=workers)
    weights = timed(
        "boundary_weights_s", tg.compute_boundary_weights, labels, vs,
        params["boundary_weight_max"], params["boundary_sigma_nm"], found.mask, num_workers=workers,
    )
    raw = timed("raw_s", raw_on_grid, src)
    images: dict[str, tuple[np.ndarray, bool]] = {  # name -> (array as stored, channel axis)
        "labels": (labels, False), "affinities": (affs.astype(np.uint8, copy=False), True),
        "lsds": (lsds.astype(np.float16, copy=False), True),
        "boundary_weights": (weights.astype(np.float32, copy=False), False),
        "mask": (found.mask.astype(np.uint8, copy=False), False),
        "raw": (raw, False),
    }
    del affs, lsds, weights
    if found.semantic is not None:
        images["semantic"] = (found.semantic, False)
    if found.class_targets is not None and found.class_mask is not None:
        images["classes"] = (found.class_targets, True)
        images["class_mask"] = (found.class_mask, True)
    # optional keys only when on: targets of projects without classes keep their attrs
    off = OPTIONAL_KEYS["targets"]
    stored = {k: v for k, v in params.items() if not (k in off and v == off[k])}
    attrs = {"volume": volume.name, **stored, **class_attrs, "grid": src.grid.to_dict(), "sources": src.provenance(),
             "timings": timed.seconds, "store_id": io.new_store_id()}
    _write_targets(out_path, volume, src.grid, images, found.class_objects, attrs, timed)
    logger.info("targets %s: %s, %.1fs", volume.name, labels.shape, sum(timed.seconds.values()))
    return attrs


class _Timings:
    """Seconds per named step of a stage: ``timed("mask_s", fn, *args)`` calls ``fn`` and records its time."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, key: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        result = fn(*args, **kwargs)
        self.seconds[key] = time.perf_counter() - t
        return result


@dataclass
class _LabelTargets:
    """What a volume's labels give, on the label grid (z, y, x): ids, the mask and the class targets.

    Attributes:
        labels: Object ids (uint64), 0 unlabelled.
        mask: 1 where annotated (uint8), eroded as ``targets.mask_erosion_nm`` says.
        semantic: Class ids (uint8, 0 background) of exclusive classes read from class arrays,
            else None (computed from ``labels`` by :func:`_class_targets`).
        class_targets: Overlapping classes: (C, z, y, x) 0/1 per class, else None.
        class_mask: Overlapping classes: (C, z, y, x) where each class is annotated, else None.
        class_objects: Overlapping classes: the truth objects (uint64) of each instance class.
    """

    labels: np.ndarray
    mask: np.ndarray
    semantic: np.ndarray | None = None
    class_targets: np.ndarray | None = None
    class_mask: np.ndarray | None = None
    class_objects: dict[str, np.ndarray] = field(default_factory=dict)


def _read_label_targets(volume: Volume, src: Any, params: Mapping[str, Any], classes: Classes | None,
                        data: Mapping[str, Any], timed: _Timings, workers: int) -> _LabelTargets:
    """Read a volume's labels (one id image, or a CellMap group of class arrays) and its mask.

    Raises:
        ValueError: labels that do not fit ``targets.classes``, all-zero labels, or a mask
            with no annotated voxel (naming the volume and its labels path).
    """
    from dinopipe import targets as tg

    vs = src.grid.voxel_size
    where = f"volume {volume.name!r}: labels {volume.labels}"
    overlap = classes is not None and classes.overlap
    class_group = bool(child_images(volume.labels))
    if class_group and (classes is None or not classes.from_arrays):
        raise ValueError(f"{where} are a group of class images (a CellMap crop), which needs targets.classes with "
                         f"an 'array' per class (e.g. {{name: mito, array: mito}})")
    if classes is not None and classes.from_arrays and not class_group:
        raise ValueError(f"{where}: targets.classes names class arrays, so labels must be a group holding one "
                         f"OME-NGFF image per class (a CellMap crop such as labels/groundtruth/crop1)")
    semantic = None
    class_targets: np.ndarray | None = None
    class_mask: np.ndarray | None = None
    class_objects: dict[str, np.ndarray] = {}
    if classes is not None and classes.from_arrays:
        arrays = timed("read_labels_s", lambda: {c.name: open_class_array(
            volume, str(c.array), src.labels, src.label_window, data.get("label_voxel_size"))
            for c in classes.classes})
        missing = [c.array for c in classes.classes if arrays[c.name] is None]
        if missing:
            logger.warning("%s: no class array %s: those classes are not annotated in this crop", where, missing)
        semantic, known, labels = timed("semantic_s", combine_class_arrays, arrays, classes,
                                        params["unlabelled_ids"])
        if overlap:  # each class keeps its own annotation; the mask is their union
            class_targets, class_mask, class_objects = timed(
                "classes_s", combine_class_arrays_overlap, arrays, classes, params["unlabelled_ids"])
            semantic, known = None, class_mask.any(axis=0).astype(np.uint8)
        del arrays
        # erosion of the known region as for id labels: unknown voxels are id 1 here
        mask = timed("mask_s", tg.compute_mask, (known == 0).view(np.uint8), [1], params["mask_erosion_nm"],
                     vs, num_workers=workers)
    else:
        native = timed("read_labels_s", lambda: np.asarray(src.labels.array[src.label_window]))
        # negative ids listed in unlabelled_ids become 0 here (mask 0 there); any other negative id
        # is an error, not 2**64 - 1 (one big object) as a plain cast would make it
        labels = tg.label_ids(native, params["unlabelled_ids"], where)
        if not labels.any() and classes is None:
            raise ValueError(f"{where} are all zero inside the processed region")
        mask = timed("mask_s", tg.compute_mask, native, params["unlabelled_ids"], params["mask_erosion_nm"],
                     vs, num_workers=workers)
        del native
    if not mask.any():
        raise ValueError(
            f"{where}: the mask is all zero (no annotated voxel) inside the processed region: every label id "
            f"is in targets.unlabelled_ids {list(params['unlabelled_ids'])}"
            + (f" or eroded away by targets.mask_erosion_nm {params['mask_erosion_nm']}" if params["mask_erosion_nm"]
               else "")
        )
    return _LabelTargets(labels, mask, semantic, class_targets, class_mask, class_objects)


def _class_targets(volume: Volume, found: _LabelTargets, classes: Classes | None, timed: _Timings) -> dict[str, Any]:
    """Complete ``found``'s class targets within its mask; the root attrs describing them (none without classes)."""
    from dinopipe import targets as tg

    mask, labels = found.mask, found.labels
    if classes is None:
        return {}
    if classes.overlap:
        if found.class_targets is None or found.class_mask is None:
            found.class_targets, found.class_mask, found.class_objects = timed(
                "classes_s", overlapping_class_targets, labels, classes, mask)
        found.class_mask &= mask.astype(np.uint8)[None]  # the union mask, eroded
        found.class_targets &= found.class_mask
        for objects in found.class_objects.values():
            objects[mask == 0] = 0
        positives = found.class_targets.reshape(classes.num_classes, -1).sum(axis=1)
        annotated = found.class_mask.reshape(classes.num_classes, -1).sum(axis=1)
        logger.info("volume %s: voxels per class %s of annotated %s", volume.name,
                    dict(zip(classes.names, positives.tolist())), dict(zip(classes.names, annotated.tolist())))
        return {"num_classes": classes.num_classes, "class_voxels": positives.tolist(),
                "class_annotated_voxels": annotated.tolist(), **classes.to_attrs()}
    if found.semantic is None:
        found.semantic, class_weights = timed("semantic_s", tg.compute_semantic_targets, labels,
                                              classes.class_map(), classes.num_classes, mask)
    else:
        found.semantic[mask == 0] = 0
        _, class_weights = tg.compute_semantic_targets(found.semantic, None, classes.num_classes, mask)
    counts = np.bincount(found.semantic[mask.astype(bool)], minlength=classes.num_classes)
    logger.info("volume %s: known voxels per class %s", volume.name, dict(zip(classes.names, counts.tolist())))
    return {"num_classes": classes.num_classes, "class_weights": class_weights.tolist(),
            "class_voxels": counts.tolist(), **classes.to_attrs()}


def _write_targets(out_path: str | Path, volume: Volume, grid: Any, images: Mapping[str, tuple[np.ndarray, bool]],
                   class_objects: Mapping[str, np.ndarray], attrs: dict[str, Any], timed: _Timings) -> None:
    """Write the targets group atomically: each image (name -> (array, channel axis)), the truth
    objects of each instance class under ``class_objects/{name}``, then the root attrs (``attrs``,
    whose ``timings`` gain ``write_s``)."""
    t = time.perf_counter()
    size = sum(a.nbytes for a, _ in images.values()) + sum(a.nbytes for a in class_objects.values())
    with io.atomic_output(out_path, what=f"targets of volume {volume.name!r}", expected_bytes=size) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        for name, (array, channels) in images.items():
            io.write_image(tmp / name, array, grid.voxel_size, grid.translation, channel_axis=channels)
        for name, objects in class_objects.items():
            io.write_image(tmp / "class_objects" / name, objects, grid.voxel_size, grid.translation, name=name)
        timed.seconds["write_s"] = time.perf_counter() - t
        root.attrs["dinopipe"] = json.loads(json.dumps(attrs))


def config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 of the effective configuration (canonical JSON)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for pkg in ("dinopipe", "torch", "transformers", "snakemake", "numpy", "zarr", "tensorstore", "edt", "mwatershed"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def run_metadata(
    volume: Volume, features_path: str | Path, targets_path: str | Path | None, out_path: str | Path,
    config: Mapping[str, Any],
) -> dict[str, Any]:
    """Write a volume's metadata JSON: provenance, shapes, label statistics, timings, sizes."""
    t0 = time.perf_counter()
    feats = io.read_image(features_path)
    sources = (feats.attrs or {}).get("sources") or {}
    meta: dict[str, Any] = {
        "volume": volume.name,
        "role": volume.role,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        # paths, formats, chosen scales, geometry and ROI as the features stage opened them
        "sources": {"raw": sources.get("raw") or {"path": volume.raw},
                    "labels": sources.get("labels") or ({"path": volume.labels} if volume.labels else None),
                    "roi_nm": [list(b) for b in volume.roi] if volume.roi else None,
                    "grid": sources.get("grid")},
        "config_sha256": config_hash(config),
        "config": dict(config),
        "versions": package_versions(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "features": {
            "path": str(features_path),
            "shape": list(feats.array.shape),
            "dtype": str(feats.array.dtype),
            "grid": feats.geometry.to_dict(),
            "signature": feats.attrs.get("signature") if feats.attrs else None,
            "raw": feats.attrs.get("raw") if feats.attrs else None,
            "timings": feats.attrs.get("timings") if feats.attrs else None,
            "peak_rss_mb": feats.attrs.get("peak_rss_mb") if feats.attrs else None,
            "blocks": feats.attrs.get("blocks") if feats.attrs else None,
            "store_id": feats.attrs.get("store_id") if feats.attrs else None,
            "bytes": io.directory_size(features_path),
        },
    }
    if targets_path is not None:
        root = zarr.open_group(str(targets_path), mode="r")
        labels = io.read_image(Path(targets_path) / "labels").read()
        mask = io.read_image(Path(targets_path) / "mask").read()
        ids, counts = np.unique(labels, return_counts=True)
        fg = ids != 0
        meta["targets"] = {
            "path": str(targets_path),
            "arrays": {k: {"shape": list(root[k]["s0"].shape), "dtype": str(root[k]["s0"].dtype)} for k in root.group_keys()},
            "parameters": {k: v for k, v in dict(root.attrs["dinopipe"]).items()
                           if k not in ("timings", "grid", "sources", "store_id")},
            "store_id": dict(root.attrs["dinopipe"]).get("store_id"),
            "timings": dict(root.attrs["dinopipe"]).get("timings"),
            "bytes": io.directory_size(targets_path),
        }
        meta["labels"] = {
            "n_ids": int(fg.sum()),
            "background_fraction": float(counts[~fg].sum() / labels.size),
            "mask_fraction": float(mask.mean()),
            "voxels_per_id": {
                "min": int(counts[fg].min()) if fg.any() else 0,
                "median": float(np.median(counts[fg])) if fg.any() else 0.0,
                "max": int(counts[fg].max()) if fg.any() else 0,
            },
        }
    meta["dinopipe_version"] = __version__
    meta["metadata_s"] = time.perf_counter() - t0
    io.write_json(out_path, meta)
    return meta


#: Defaults of the ``segment`` config section (method parameters are picked by name).
DEFAULT_SEGMENT: dict[str, Any] = {
    "method": "agglomeration",
    "fragments": "distance",  # agglomeration's fragments (the function's own default is "waterz")
    "min_size": 0,
    "max_voxels": 100_000_000,
    "block_shape": None,
    "block_context": 16,
    "merge_threshold": 0.5,
    "merge_levels": None,
    "shard_shape": None,
}


def segment_settings(predictions_path: str | Path, params: Mapping[str, Any],
                     tuned: str | Path | None = None) -> dict[str, Any]:
    """The segmentation of one volume, resolved from the ``segment`` config section.

    ``tuned`` is the JSON of the tune_segment rule (:func:`run_tune_segment`): its picked
    parameters replace the config's. Returns ``method``, ``parameters`` (the method's own,
    keys of other methods left out), ``min_size``, ``merge_threshold``, ``block_shape``
    (null or (z, y, x) voxels), ``block_context`` (voxels), ``merge_levels`` (null or blocks per
    super-block per level, agglomeration's hierarchical merge), ``max_voxels``, ``tuned`` (bool) and
    ``shard_shape`` (the output's storage layout, runtime-only; not used by ``segment.jobs``,
    whose parts write blocks of one store concurrently and so never share a shard).
    """
    from dinopipe.segment import METHODS, method_parameters
    from dinopipe.tune import read_choice

    config = {**DEFAULT_SEGMENT, **params}
    method = config["method"]
    if method not in METHODS:
        raise ValueError(f"segment.method {method!r} is unknown; allowed: {sorted(METHODS)}")
    if tuned is not None:
        config.update(read_choice(tuned, method))
    accepted = method_parameters(method) - {"min_size"}
    return {"method": method, "parameters": {k: v for k, v in config.items() if k in accepted and v is not None},
            "min_size": int(config["min_size"]), "merge_threshold": float(config["merge_threshold"]),
            "block_shape": config["block_shape"], "block_context": int(config["block_context"]),
            "max_voxels": int(config["max_voxels"]), "tuned": tuned is not None,
            "shard_shape": config["shard_shape"], "merge_levels": config["merge_levels"]}


def run_segment(
    predictions_path: str | Path, out_path: str | Path, params: Mapping[str, Any],
    tuned: str | Path | None = None,
) -> dict[str, Any]:
    """Segment predicted affinities and write uint64 labels as OME-NGFF.

    ``params`` is the ``segment`` config section: ``method``, ``min_size``, the
    method's own parameters (keys of other methods are ignored), and the blocking:
    volumes of more than ``max_voxels`` voxels, or any volume when ``block_shape`` is
    set, are segmented blockwise (:func:`dinopipe.segment.segment_blockwise`: fragments
    per block, merged on the whole region graph); ``block_shape`` null then means
    128 x 256 x 256. The default ``max_voxels`` (1e8, about 11 GB with 6 offsets, see
    :func:`dinopipe.segment.bytes_per_voxel`) suits the rule's 16 GB. With ``segment.jobs``
    the workflow runs the blockwise steps as many jobs instead (:mod:`dinopipe.segment_parts`),
    with the same result.

    ``tuned``: see :func:`segment_settings`. Predictions of a class model (``classes``) are
    segmented by :func:`run_segment_classes` instead. A segmentation with one segment, or with more than one
    segment per 100 voxels, logs a warning, also stored in the attrs (``warnings``).
    """
    from dinopipe.segment import block_for, bytes_per_voxel, sanity_warnings, segment, segment_blockwise

    if (Path(predictions_path) / "classes").exists():
        return run_segment_classes(predictions_path, out_path, params)
    settings = segment_settings(predictions_path, params, tuned)
    method, method_params = settings["method"], settings["parameters"]
    affs_img = io.read_image(Path(predictions_path) / "affinities")
    offsets = zarr.open_group(str(predictions_path), mode="r").attrs["dinopipe"]["offsets"]
    g = affs_img.geometry
    voxels = int(np.prod(g.shape))
    blockwise = settings["block_shape"] is not None or voxels > settings["max_voxels"]
    block = block_for(settings["block_shape"], g.shape)
    t = time.perf_counter()
    attrs: dict[str, Any] = {"method": method, "parameters": method_params, "min_size": settings["min_size"],
                             "blockwise": blockwise, "tuned": settings["tuned"]}
    with io.atomic_output(out_path, what=f"segmentation of {predictions_path}", expected_bytes=8 * voxels) as tmp:
        if blockwise:
            logger.info("segmenting %s blockwise (%d voxels, max_voxels %d): blocks of %s", predictions_path,
                        voxels, settings["max_voxels"], block)
            shards = io.shard_shape(g.shape, block, settings["shard_shape"], channel_axis=False,
                                    key="segment.shard_shape")
            out = io.create_image(tmp, g.shape, np.uint64, g.voxel_size, g.translation, chunks=block,
                                  name="segmentation", shards=shards)
            # sharded: the fragments go to an unsharded scratch array read back block by block,
            # the final ids into the output one whole shard at a time
            scratch = None if shards is None else io.create_image(
                tmp / "fragments", g.shape, np.uint64, g.voxel_size, g.translation, chunks=block)
            n = segment_blockwise(affs_img.array, offsets, out if scratch is None else scratch, block, method=method,
                                  merge_threshold=settings["merge_threshold"], min_size=settings["min_size"],
                                  context=settings["block_context"], relabel_into=None if scratch is None else out,
                                  merge_levels=settings["merge_levels"], **method_params)
            if scratch is not None:
                shutil.rmtree(tmp / "fragments")
            attrs.update(block_shape=block, block_context=settings["block_context"],
                         merge_threshold=settings["merge_threshold"])
            if settings["merge_levels"] is not None:
                attrs["merge_levels"] = settings["merge_levels"]
        else:
            logger.info("segmenting %s in memory (%d voxels, about %.1f GB)", predictions_path, voxels,
                        voxels * bytes_per_voxel(len(offsets)) / 1e9)
            labels = segment(affs_img.read().astype(np.float32), offsets, method=method,
                             min_size=settings["min_size"], **method_params)
            n = int(labels.max())
            chunks = io.default_chunks(g.shape, channel_axis=False)
            io.write_image(tmp, labels.astype(np.uint64), g.voxel_size, g.translation, name="segmentation",
                           chunks=chunks, shards=io.shard_shape(g.shape, chunks, settings["shard_shape"],
                                                                channel_axis=False, key="segment.shard_shape"))
        warnings = sanity_warnings(n, voxels)
        for w in warnings:
            logger.warning("segmentation %s: %s (method %s, %s)", out_path, w, method, method_params)
        attrs.update(segments=n, seconds=time.perf_counter() - t, warnings=warnings)
        io.set_attrs(tmp, attrs)
    logger.info("segmentation %s: %d segments in %.1fs (%s %s)", out_path, n, attrs["seconds"], method, method_params)
    return attrs


def run_segment_classes(predictions_path: str | Path, out_path: str | Path, params: Mapping[str, Any]) -> dict[str, Any]:
    """Segment predicted class probabilities (:func:`dinopipe.classes.segment_classes`).

    Writes ``out_path`` as an OME-NGFF image of the class ids (uint8, argmax of the
    probabilities, 0 background) with, under ``labels/``, one OME-NGFF label image per
    instance class (uint64 objects: connected components of the class, split where they touch
    when ``segment.split_touching_nm`` is set, fewer than ``segment.min_size`` voxels dropped),
    so napari and neuroglancer open both. Root attrs:
    ``method`` "classes", ``class_names``, ``instance_classes``, ``min_size`` and the object
    count per instance class (``segments``). The volume is segmented in memory.

    Overlapping classes (``classes_overlap`` in the predictions' attrs) cannot share one argmax
    image: each class is its probability above ``segment.class_threshold``
    (:func:`dinopipe.classes.segment_overlapping`), the image is (C, z, y, x) uint8 0/1, and
    ``labels/`` holds one label image per class (objects, uint64, for instance classes; the
    0/1 mask, uint8, for the others); the thresholds are recorded under ``parameters``.
    """
    probs_img = io.read_image(Path(predictions_path) / "classes")
    pred_attrs = dict(zarr.open_group(str(predictions_path), mode="r").attrs.get("dinopipe", {}))
    classes = Classes.from_attrs(pred_attrs, f"predictions {predictions_path}")
    min_size = int({**DEFAULT_SEGMENT, **params}["min_size"])
    split = params.get("split_touching_nm")
    g = probs_img.geometry
    t = time.perf_counter()
    parameters: dict[str, Any] = {} if split is None else {"split_touching_nm": split}
    if classes.overlap:
        thresholds = class_thresholds(params.get("class_threshold"), classes)
        image, instances = segment_overlapping(probs_img.read(), classes, thresholds, min_size, split, g.voxel_size)
        parameters["class_threshold"] = dict(zip(classes.names, thresholds))
        class_voxels = dict(zip(classes.names, image.reshape(classes.num_classes, -1).sum(axis=1).tolist()))
        # one label image per class: objects of instance classes, the class mask of the others
        label_images: dict[str, np.ndarray] = {n: instances.get(n, image[k]) for k, n in enumerate(classes.names)}
    else:
        image, instances = segment_classes(probs_img.read(), classes, min_size, split, g.voxel_size)
        class_voxels = dict(zip(classes.names, np.bincount(image.ravel(), minlength=classes.num_classes).tolist()))
        label_images = dict(instances)
    counts = {name: int(objects.max()) for name, objects in instances.items()}
    attrs: dict[str, Any] = {"method": "classes", "parameters": parameters,
                             "min_size": min_size, **classes.to_attrs(),
                             "segments": counts, "seconds": time.perf_counter() - t, "class_voxels": class_voxels}
    size = int(image.size) + 8 * int(np.prod(g.shape)) * len(label_images)
    with io.atomic_output(out_path, what=f"class segmentation of {predictions_path}", expected_bytes=size) as tmp:
        io.write_image(tmp, image, g.voxel_size, g.translation, name="classes", channel_axis=classes.overlap)
        if label_images:
            labels = zarr.open_group(str(tmp / "labels"), mode="w", zarr_format=2)
            labels.attrs["labels"] = list(label_images)
            for name, objects in label_images.items():
                io.write_image(tmp / "labels" / name, objects, g.voxel_size, g.translation, name=name)
                zarr.open_group(str(tmp / "labels" / name), mode="a").attrs["image-label"] = {
                    "version": "0.4", "source": {"image": "../../"}}
        io.set_attrs(tmp, attrs)
    logger.info("class segmentation %s: voxels per class %s, objects %s", out_path, attrs["class_voxels"], counts)
    return attrs


def describe_segmentation(method: str, parameters: Mapping[str, Any]) -> str:
    """``method`` and its parameters as one short string for tables, e.g.
    ``mutex_watershed bias_long=-0.5 bias_short=-0.3 min_size=10``."""
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return " ".join([method, *(f"{k}={fmt(v)}" for k, v in sorted(parameters.items()))])


def prediction_scores(predictions_path: str | Path, targets_path: str | Path) -> dict[str, Any]:
    """Predicted affinities against a volume's target affinities, within its mask, per offset
    (:func:`dinopipe.evaluate.affinity_scores`: balanced accuracy, boundary recall/precision).

    Raises:
        ValueError: Predictions and targets with different offsets or grids (naming both paths).
    """
    from dinopipe.evaluate import affinity_scores

    offsets = zarr.open_group(str(predictions_path), mode="r").attrs["dinopipe"]["offsets"]
    target_offsets = zarr.open_group(str(targets_path), mode="r").attrs["dinopipe"]["offsets"]
    if [list(o) for o in offsets] != [list(o) for o in target_offsets]:
        raise ValueError(f"offsets of the predictions {predictions_path} ({offsets}) differ from those of the "
                         f"targets {targets_path} ({target_offsets})")
    pred = io.read_image(Path(predictions_path) / "affinities").read()
    target = io.read_image(Path(targets_path) / "affinities").read()
    mask = io.read_image(Path(targets_path) / "mask").read()
    if pred.shape != target.shape:
        raise ValueError(f"predicted affinities {predictions_path} {pred.shape} and target affinities "
                         f"{targets_path} {target.shape} differ in shape")
    return affinity_scores(pred, target, offsets, mask)


#: Scores of the classical baseline copied into a volume's evaluation (prefixed ``baseline_``).
BASELINE_KEYS = ("voi_split", "voi_merge", "voi_sum", "adapted_rand_error")


def run_evaluate(
    volume: str, segmentation_path: str | Path, targets_path: str | Path, out_path: str | Path,
    ignore_labels: Sequence[int] = (0,), predictions_path: str | Path | None = None,
    baseline_path: str | Path | None = None,
) -> dict[str, Any]:
    """Score a segmentation against the volume's labels (VOI, adapted Rand) into a JSON.

    The JSON also records which method and parameters made the segmentation (``segment``),
    its sanity warnings (``warning``) and, given ``predictions_path``, how the predicted
    affinities score against the targets (``affinity_bacc``, ``affinities`` per offset).
    With ``baseline_path`` (the JSON of :func:`run_baseline`), the classical baseline
    (:func:`dinopipe.baseline.watershed_baseline` on the targets' ``raw`` with the tuned
    parameters) is scored on the same volume too: keys ``baseline_voi_split``,
    ``baseline_voi_merge``, ``baseline_voi_sum``, ``baseline_adapted_rand_error`` and
    ``voi_sum_vs_baseline`` (dinopipe's VOI sum / the baseline's; below 1: dinopipe is better).
    """
    from dinopipe.baseline import watershed_baseline
    from dinopipe.evaluate import evaluate_segmentation

    if (io.read_image(segmentation_path).attrs or {}).get("method") == "classes":
        return run_evaluate_classes(volume, segmentation_path, targets_path, out_path)
    seg_img = io.read_image(segmentation_path)
    test = seg_img.read()
    truth = io.read_image(Path(targets_path) / "labels").read()
    scores = evaluate_segmentation(truth, test, ignore_labels=tuple(ignore_labels))
    result: dict[str, Any] = {"volume": volume, **scores}
    seg_attrs = seg_img.attrs or {}
    if "method" in seg_attrs:
        result["segment"] = describe_segmentation(
            seg_attrs["method"], {**seg_attrs.get("parameters", {}), "min_size": seg_attrs.get("min_size", 0)})
    if seg_attrs.get("warnings"):
        result["warning"] = "; ".join(seg_attrs["warnings"])
    if predictions_path is not None:
        aff = prediction_scores(predictions_path, targets_path)
        result["affinity_bacc"] = aff["affinity_balanced_accuracy"]
        result["affinities"] = aff["per_offset"]
    if baseline_path is not None:
        params = json.loads(Path(baseline_path).read_text())["parameters"]
        raw = io.read_image(Path(targets_path) / "raw").read()
        base = evaluate_segmentation(truth, watershed_baseline(raw, **params), ignore_labels=tuple(ignore_labels))
        result.update({f"baseline_{k}": base[k] for k in BASELINE_KEYS})
        result["voi_sum_vs_baseline"] = scores["voi_sum"] / base["voi_sum"] if base["voi_sum"] > 0 else None
        logger.info("volume %s: VOI sum %.3f, classical baseline %.3f", volume, scores["voi_sum"], base["voi_sum"])
    io.write_json(out_path, result)
    return result


def run_evaluate_classes(volume: str, segmentation_path: str | Path, targets_path: str | Path,
                         out_path: str | Path) -> dict[str, Any]:
    """Score a class segmentation (:func:`run_segment_classes`) against the targets' ``semantic``,
    ``labels`` and ``mask`` (:func:`dinopipe.classes.evaluate_classes`) into a JSON: per class
    IoU, Dice, precision, recall and, for instance classes, matched objects, F1 at IoU 0.5 and
    Hausdorff distances (nm), plus the flat summary columns (``iou_{class}``, ``f1_{class}``, ...).
    Overlapping classes are scored each within its own annotation (the targets' ``classes``,
    ``class_mask`` and ``class_objects``, :func:`dinopipe.classes.evaluate_overlapping`)."""
    seg = io.read_image(segmentation_path)
    classes = Classes.from_attrs(seg.attrs or {}, f"segmentation {segmentation_path}")
    target_attrs = dict(zarr.open_group(str(targets_path), mode="r").attrs.get("dinopipe", {}))
    if target_attrs.get("class_names") != classes.names or bool(target_attrs.get("classes_overlap")) != classes.overlap:
        raise ValueError(f"volume {volume!r}: the classes of segmentation {segmentation_path} ({classes.names}, "
                         f"overlapping: {classes.overlap}) differ from those of its targets {targets_path} "
                         f"({target_attrs.get('class_names')}, overlapping: {bool(target_attrs.get('classes_overlap'))})")
    instances = {n: io.read_image(Path(segmentation_path) / "labels" / n).read() for _, n in classes.instance_classes()}
    if classes.overlap:
        truth_objects = {n: io.read_image(Path(targets_path) / "class_objects" / n).read()
                         for _, n in classes.instance_classes()}
        scores = evaluate_overlapping(
            io.read_image(Path(targets_path) / "classes").read(), io.read_image(Path(targets_path) / "class_mask").read(),
            truth_objects, seg.read(), instances, classes, seg.geometry.voxel_size)
    else:
        truth = io.read_image(Path(targets_path) / "semantic").read()
        labels = io.read_image(Path(targets_path) / "labels").read()
        mask = io.read_image(Path(targets_path) / "mask").read()
        scores = evaluate_classes(truth, labels, mask, seg.read(), instances, classes, seg.geometry.voxel_size)
    result = {"volume": volume, "mean_iou": scores["mean_iou"], "mean_dice": scores["mean_dice"],
              "overall_score": scores["overall_score"], "semantic_score": scores["semantic_score"],
              "instance_score": scores["instance_score"], **summary_columns(scores),
              "segment": describe_segmentation("classes", {"min_size": (seg.attrs or {}).get("min_size", 0)}),
              "classes": scores["classes"]}
    logger.info("volume %s: mean IoU %s, per class %s", volume, scores["mean_iou"],
                {n: v["iou"] for n, v in scores["classes"].items()})
    io.write_json(out_path, result)
    return result


def run_baseline(targets_paths: Sequence[str | Path], out_path: str | Path, ignore_labels: Sequence[int] = (0,)) -> dict[str, Any]:
    """Tune the classical baseline (:func:`dinopipe.baseline.tune_baseline`, its default grid) on
    labelled volumes' targets (``raw`` and ``labels``; the train volumes in the workflow) and
    write ``{"parameters": {...}, "grid": [rows], "volumes": [...]}`` as JSON."""
    from dinopipe.baseline import tune_baseline

    if not targets_paths:
        raise ValueError("the classical baseline is tuned on labelled volumes, but no targets were given")
    volumes = [(io.read_image(Path(p) / "raw").read(), io.read_image(Path(p) / "labels").read()) for p in targets_paths]
    params, rows = tune_baseline(volumes, ignore_labels=tuple(ignore_labels))
    result = {"parameters": params, "grid": rows, "volumes": [str(p) for p in targets_paths]}
    io.write_json(out_path, result)
    return result


#: Columns of summary.tsv, in order (any other scalar key of the rows follows, sorted); the
#: per-volume JSONs hold the rest (Rand split/merge, adapted Rand precision/recall, per offset scores).
SUMMARY_COLUMNS: tuple[str, ...] = (
    "volume", "role", "voi_split", "voi_merge", "voi_sum", "adapted_rand_error", "n_truth_ids", "n_test_ids",
    "affinity_bacc", "segment", "warning", "note",
)


#: The report's front-page table (the prose column beside the workflow graph is about 500 px
#: wide): key -> header; headers with spaces so that they wrap.
BRIEF_COLUMNS: dict[str, str] = {
    "volume": "volume", "role": "role", "voi_split": "VOI split", "voi_merge": "VOI merge", "voi_sum": "VOI sum",
    "adapted_rand_error": "adapted Rand error", "affinity_bacc": "affinity bal. acc.", "warning": "warning",
    "note": "note",
}


#: Leading columns of summary.tsv for class models (then the per-class columns, sorted:
#: ``iou_{class}``, ``f1_{class}``, ``hausdorff_nm_{class}``).
CLASS_SUMMARY_COLUMNS: tuple[str, ...] = (
    "volume", "role", "mean_iou", "mean_dice", "semantic_score", "instance_score", "overall_score", "segment",
    "warning", "note",
)

#: The front-page table of class models: key -> header (then ``IoU {class}`` per class).
CLASS_BRIEF_COLUMNS: dict[str, str] = {
    "volume": "volume", "role": "role", "mean_iou": "mean IoU", "overall_score": "overall score",
    "warning": "warning", "note": "note",
}


def run_summary(
    evaluation_jsons: Sequence[str | Path], out_path: str | Path, unscored: Sequence[str] = (),
    tuned: str | Path | None = None, unscored_segmentations: Sequence[str | Path] = (),
    brief_path: str | Path | None = None,
) -> None:
    """Collect per-volume evaluation JSONs into one TSV (one row per volume), figures rounded
    to 4 significant digits so that the report's table stays narrow (columns: :data:`SUMMARY_COLUMNS`,
    ``warning`` and ``note`` only when a row has one).

    Volumes in ``unscored`` (predicted, but without labels) get a row with empty
    metrics and the note "no labels: not evaluated" (plus the method and sanity warnings of
    their segmentation from ``unscored_segmentations``, in the same order, when given).
    ``tuned`` (the tune_segment JSON) adds one row per validate volume (role
    ``validate``): its scores with the picked parameters and how its predicted affinities
    score against the targets. ``brief_path``: the same rows with the columns of
    :data:`BRIEF_COLUMNS` only (human headers), narrow enough for the report's front page.
    Evaluations of a class model (:func:`run_evaluate_classes`) lead with
    :data:`CLASS_SUMMARY_COLUMNS` and :data:`CLASS_BRIEF_COLUMNS` (plus IoU per class) instead.
    """
    from dinopipe.evaluate import write_summary_tsv

    rows = [{"role": "predict", **json.loads(Path(p).read_text())} for p in evaluation_jsons]
    seg_paths = list(unscored_segmentations) or [None] * len(unscored)
    for name, seg in zip(unscored, seg_paths):
        logger.warning("volume %s has no labels: not evaluated", name)
        row: dict[str, Any] = {"volume": name, "role": "predict", "note": "no labels: not evaluated"}
        attrs = (io.read_image(seg).attrs or {}) if seg is not None else {}
        if "method" in attrs:
            row["segment"] = describe_segmentation(attrs["method"], {**attrs.get("parameters", {}),
                                                                     "min_size": attrs.get("min_size", 0)})
        if attrs.get("warnings"):
            row["warning"] = "; ".join(attrs["warnings"])
        rows.append(row)
    if tuned is not None:
        choice = json.loads(Path(tuned).read_text())
        names = {r["volume"] for r in rows}
        for v in choice.get("volumes", []):
            if v["volume"] not in names:  # a validate volume also predicted has its own row already
                rows.append({**v, "role": "validate"})
    for r in rows:
        if r.get("warning"):
            logger.warning("volume %s: %s", r["volume"], r["warning"])
    rows = [{k: v for k, v in r.items() if not isinstance(v, Mapping)} for r in rows]
    class_rows = any("mean_iou" in r for r in rows)  # a class model's evaluations (run_evaluate_classes)
    leading, brief = (CLASS_SUMMARY_COLUMNS, dict(CLASS_BRIEF_COLUMNS)) if class_rows else (SUMMARY_COLUMNS,
                                                                                             BRIEF_COLUMNS)
    if class_rows:
        brief.update({k: f"IoU {k[4:]}" for k in sorted({k for r in rows for k in r if k.startswith("iou_")})})
    # the optional text columns only when some row has one (the table must fit the report's page)
    columns = [c for c in leading if c not in ("warning", "note") or any(r.get(c) for r in rows)]
    with io.atomic_output(out_path) as tmp:
        write_summary_tsv(rows, tmp, columns=columns, significant=4)
    if brief_path is not None:
        keys = [k for k in brief if k in columns or k.startswith("iou_")]
        with io.atomic_output(brief_path) as tmp:
            write_summary_tsv([{brief[k]: r.get(k) for k in keys} for r in rows], tmp,
                              columns=[brief[k] for k in keys], significant=4)


def run_tune_segment(
    volumes: Sequence[tuple[str, str | Path, str | Path]], table_path: str | Path, choice_path: str | Path,
    figure_path: str | Path, segment: Mapping[str, Any], ignore_labels: Sequence[int] = (0,),
) -> dict[str, Any]:
    """Pick the segment parameters on the validate volumes (:mod:`dinopipe.tune`).

    Args:
        volumes: ``(name, predictions store, targets store)`` per labelled validate volume.
        table_path: TSV of every candidate's scores per volume (:func:`dinopipe.tune.write_table`).
        choice_path: JSON of the picked parameters (read by :func:`run_segment`), with per
            validate volume its scores at the pick and its predicted affinities' scores
            against the targets (``affinity_bacc``, ``affinities`` per offset).
        figure_path: PNG of the candidates' VOI (:func:`dinopipe.tune.plot`).
        segment: The ``segment`` config section (``method``, fixed parameters, ``tune``, ``grid``).
        ignore_labels: Truth ids left out of the scores (``evaluate.ignore_labels``).

    Each volume is segmented in memory: a validate volume of more than ``segment.max_voxels``
    voxels is an error naming it (give it an ROI).
    """
    from dinopipe import tune

    config = {**DEFAULT_SEGMENT, **segment}
    grid = tune.resolve_grid(config)
    loaded, offsets, affinity = [], None, {}
    for name, pred, targets in volumes:
        img = io.read_image(Path(pred) / "affinities")
        if int(np.prod(img.geometry.shape)) > int(config["max_voxels"]):
            raise ValueError(f"validate volume {name!r}: {img.geometry.shape} voxels exceed segment.max_voxels "
                             f"({config['max_voxels']}); tuning segments in memory: give it a smaller roi")
        offsets = zarr.open_group(str(pred), mode="r").attrs["dinopipe"]["offsets"]
        labels = io.read_image(Path(targets) / "labels").read()
        loaded.append((name, img.read().astype(np.float32), labels))
        affinity[name] = prediction_scores(pred, targets)
    result = tune.tune_segmentation(loaded, offsets or [], config, grid, ignore_labels)
    description = describe_segmentation(result.method, result.parameters)
    per_volume = []
    for r in result.best_rows():
        a = affinity[r["volume"]]
        per_volume.append({"volume": r["volume"], **{k: r[k] for k in tune.SCORE_COLUMNS if k != "n_segments"},
                           "n_truth_ids": r["n_truth_ids"], "n_test_ids": r["n_segments"], "segment": description,
                           "affinity_bacc": a["affinity_balanced_accuracy"], "affinities": a["per_offset"],
                           **({"warning": r["warnings"]} if r["warnings"] else {})})
        if r["warnings"]:
            logger.warning("validate volume %s with the picked parameters: %s", r["volume"], r["warnings"])
    with io.atomic_output(table_path) as tmp:
        tune.write_table(result, tmp)
    with io.atomic_output(figure_path) as tmp:
        tune.plot(result, tmp)
    with io.atomic_output(choice_path) as tmp:
        tune.write_choice(result, tmp, {"segment": description, "volumes": per_volume})
    return {"method": result.method, "parameters": result.parameters, "volumes": per_volume}


def check_feature_signatures(features_paths: Sequence[str | Path], features: Mapping[str, Any]) -> None:
    """Refuse cached features that the current ``features`` config would not produce,
    and feature volumes that disagree with each other (e.g. different weights)."""
    from dinopipe.features import FeatureParams, check_compatible, check_signature, expected_signature

    expected = expected_signature(FeatureParams.from_config(features))
    first: tuple[str, Mapping[str, Any]] | None = None
    for path in features_paths:
        sig = (io.read_image(path).attrs or {}).get("signature")
        if sig is None:
            raise ValueError(f"features at {path} carry no signature: recompute them")
        check_signature(sig, expected, str(path))
        if first is None:
            first = (str(path), sig)
        else:
            check_compatible(sig, first[1], str(path), first[0])


def run_train(
    train_volumes: Sequence[tuple[str, str]], validate_volumes: Sequence[tuple[str, str]],
    out_dir: str | Path, params: Mapping[str, Any], features: Mapping[str, Any], *, threads: int | None = None,
    state_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Check the cached features' signatures, then train (see :func:`dinopipe.train.train`).

    ``state_dir`` holds the resumable state (default ``out_dir/state``); a rerun continues
    from it.
    """
    from dinopipe.train import train

    check_feature_signatures([f for f, _ in [*train_volumes, *validate_volumes]], features)
    params = dict(params)
    if params.get("num_threads") is None:
        params["num_threads"] = allotted_cpus(threads)
    return train(train_volumes, validate_volumes, out_dir, params, state_dir=state_dir)


#: Defaults of the ``predict`` config section (``roles`` selects jobs and is not read here).
DEFAULT_PREDICT: dict[str, Any] = {
    "source": "features",
    "block_shape": [32, 64, 64],
    "batch_size": 1,
    "feature_halo": None,
    "device": "auto",
    "autocast": "bf16",
    "shard_shape": None,
    "distributed": None,
}


def run_predict(
    features_path: str | Path | None, checkpoint_dir: str | Path, out_path: str | Path, params: Mapping[str, Any],
    *, threads: int | None = None, volume: Volume | None = None, features: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Blockwise prediction of one volume from its cached features or, with
    ``params["source"] == "raw"``, end to end from raw (see :mod:`dinopipe.predict`).

    ``volume`` and ``data`` are needed from raw and for models trained with
    ``input_raw``; ``features`` (the features config section) from raw.
    """
    import torch

    from dinopipe.predict import predict_from_raw, predict_volume

    torch.set_num_threads(allotted_cpus(threads))
    params = {**DEFAULT_PREDICT, **params}
    common = {
        "block_shape": tuple(params["block_shape"]),
        "device": params["device"],
        "batch_size": int(params["batch_size"]),
        "autocast": params["autocast"],
        "shard_shape": params["shard_shape"],
    }
    source = params["source"]
    if source == "raw":
        if volume is None or features is None:
            raise ValueError("predict.source 'raw' needs the volume and the features config section")
        return predict_from_raw(volume, checkpoint_dir, out_path, features, data, **common,
                                feature_halo=params["feature_halo"])
    if source != "features":
        raise ValueError(f"predict.source must be 'features' or 'raw', got {source!r}")
    if features_path is None:
        raise ValueError("predict.source 'features' needs the features path")
    return predict_volume(features_path, checkpoint_dir, out_path, **common, volume=volume, data=data)


# --------------------------------------------------------------------------- distributed prediction


def _prediction_inputs(features_path: str | Path | None, checkpoint_dir: str | Path, params: Mapping[str, Any], *,
                       volume: Volume | None, features: Mapping[str, Any] | None, data: Mapping[str, Any] | None,
                       known: Mapping[str, Any] | None = None) -> Any:
    """The :class:`dinopipe.predict.PredictionInputs` of one volume, from cached features or raw
    (``params["source"]``), as :func:`run_predict` reads them."""
    from dinopipe.predict import feature_inputs, raw_inputs

    source = params["source"]
    if source == "raw":
        if volume is None or features is None:
            raise ValueError("predict.source 'raw' needs the volume and the features config section")
        return raw_inputs(volume, checkpoint_dir, features, data, params["feature_halo"], known=known)
    if source != "features":
        raise ValueError(f"predict.source must be 'features' or 'raw', got {source!r}")
    if features_path is None:
        raise ValueError("predict.source 'features' needs the features path")
    return feature_inputs(features_path, checkpoint_dir, volume=volume, data=data, known=known)


def _distributed_setting(params: Mapping[str, Any], volume: Volume | None) -> Mapping[str, Any]:
    setting = params.get("distributed")
    if not isinstance(setting, Mapping):
        where = f" (volume {volume.name!r})" if volume is not None else ""
        raise ValueError(f"predict.distributed is {setting!r}{where}: the predict_create / predict_part / "
                         "predict_finish jobs need a mapping such as {blocks_per_job: 64}")
    return setting


def run_predict_create(
    features_path: str | Path | None, checkpoint_dir: str | Path, staging: str | Path, plan_path: str | Path,
    params: Mapping[str, Any], *, threads: int | None = None, volume: Volume | None = None,
    features: Mapping[str, Any] | None = None, data: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """First job of a distributed prediction (:mod:`dinopipe.distributed`): check the inputs as
    a single-job prediction does, measure what needs the whole volume (intensity ranges),
    create the empty staging store (full shape, one chunk per block) and write the plan.

    Returns:
        The plan's record (as written to ``plan_path``).
    """
    import torch

    from dinopipe.distributed import BlockPlan, blocks_per_part, read_plan, write_plan
    from dinopipe.predict import _check_block_args, block_layout, create_outputs, output_attrs

    torch.set_num_threads(allotted_cpus(threads))
    params = {**DEFAULT_PREDICT, **params}
    setting = _distributed_setting(params, volume)
    _check_block_args(tuple(params["block_shape"]), int(params["batch_size"]))
    if params.get("shard_shape") is not None:
        logger.warning("predict.shard_shape %s: a distributed prediction writes an unsharded store (Zarr v2, one "
                       "file per block and image; the values are the same)", params["shard_shape"])
    inputs = _prediction_inputs(features_path, checkpoint_dir, params, volume=volume, features=features, data=data)
    layout = block_layout(inputs.model, inputs.config, inputs.grid.shape, tuple(params["block_shape"]))
    plan = BlockPlan(layout.shape, layout.block,  # type: ignore[arg-type]
                     blocks_per_part(setting, layout.shape, layout.num_blocks, int(params["batch_size"]),
                                     flag=volume.distributed if volume is not None else None))
    plan_id = io.new_store_id()
    name = volume.name if volume is not None else Path(plan_path).parent.name.removesuffix(".parts")
    with io.atomic_output(staging, what=f"predictions of volume {name!r} (staging)",
                          expected_bytes=layout.nbytes) as tmp:
        create_outputs(tmp, layout, inputs.grid)
        zarr.open_group(str(tmp), mode="r+").attrs["dinopipe"] = {"plan_id": plan_id}
    write_plan(plan_path, plan, volume=name, plan_id=plan_id, extra={
        "images": [n for n, _ in layout.images], "halo": layout.halo, "staging": str(staging),
        "batch_size": int(params["batch_size"]), "known": inputs.known,
        "attrs": output_attrs(layout, inputs.config, "none", {}, inputs.attrs),
    })
    logger.info("volume %s: %d blocks of %s in %d parts of %d blocks; staging store %s", name, plan.num_blocks,
                list(plan.block), plan.num_parts, plan.blocks_per_part, staging)
    return read_plan(plan_path)[1]


def _planned_job(
    features_path: str | Path | None, checkpoint_dir: str | Path, plan_path: str | Path, params: Mapping[str, Any],
    *, threads: int | None, volume: Volume | None, features: Mapping[str, Any] | None,
    data: Mapping[str, Any] | None,
) -> tuple[Any, dict[str, Any], Any, Any, Any, str]:
    """What a job of a planned (distributed) prediction needs: the plan and its record, the
    inputs, the block layout (checked against the plan), the device (model moved to it) and
    the autocast mode."""
    import torch

    from dinopipe.distributed import read_plan
    from dinopipe.predict import block_layout
    from dinopipe.runtime import autocast_mode, resolve_device

    torch.set_num_threads(allotted_cpus(threads))
    plan, record = read_plan(plan_path)
    inputs = _prediction_inputs(features_path, checkpoint_dir, params, volume=volume, features=features, data=data,
                                known=record["known"])
    layout = block_layout(inputs.model, inputs.config, inputs.grid.shape, tuple(params["block_shape"]))
    if layout.shape != plan.shape or layout.block != plan.block or layout.halo != record["halo"]:
        raise ValueError(
            f"volume {record['volume']!r}: the plan {plan_path} has shape {list(plan.shape)}, blocks "
            f"{list(plan.block)} and halo {record['halo']}, but this job computes {list(layout.shape)}, "
            f"{list(layout.block)} and {layout.halo}: rerun predict_create (snakemake results/predictions/{record['volume']}.zarr --forcerun predict_create)"
        )
    dev = resolve_device(params["device"], "predict.device")
    mode = autocast_mode(params["autocast"], "predict.autocast")
    inputs.model.to(dev)
    return plan, record, inputs, layout, dev, mode


def run_predict_part(
    features_path: str | Path | None, checkpoint_dir: str | Path, plan_path: str | Path, staging: str | Path,
    marker: str | Path, part: int, params: Mapping[str, Any], *, threads: int | None = None,
    volume: Volume | None = None, features: Mapping[str, Any] | None = None, data: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One job of a distributed prediction: predict the blocks of ``part`` into the staging
    store, then write its marker (the record that the part is done).

    Reads only its blocks' input windows with their halos: no pass over the whole volume
    (the create job measured what needs one and recorded it in the plan).

    Returns:
        The part's statistics (``timings`` in seconds, ``precision``), as in its marker.
    """
    from dinopipe.distributed import read_plan, write_marker
    from dinopipe.predict import predict_into

    t_start = time.perf_counter()
    params = {**DEFAULT_PREDICT, **params}
    read_plan(plan_path)[0].part_blocks(int(part))  # a part the plan does not have fails here, before the model loads
    plan, record, inputs, layout, dev, mode = _planned_job(features_path, checkpoint_dir, plan_path, params,
                                                           threads=threads, volume=volume, features=features, data=data)
    starts = plan.part_starts(int(part))
    outputs = [zarr.open_array(str(Path(staging) / n / "s0"), mode="r+") for n in record["images"]]
    logger.info("volume %s, part %s: %s + halo %d, device %s", record["volume"], part, plan.describe(int(part)),
                layout.halo, dev)
    timings = predict_into(inputs.readers, layout, inputs.model, outputs, starts, device=dev, mode=mode,
                           batch_size=int(params["batch_size"]), label=f"predict {record['volume']} part {part}")
    timings["total_s"] = time.perf_counter() - t_start
    stats = {"timings": timings, "precision": mode if dev.type == "cuda" else "none",
             "peak_rss_mb": peak_resident_mb()}
    write_marker(marker, record, int(part), stats)
    return stats


def run_predict_block(
    features_path: str | Path | None, checkpoint_dir: str | Path, plan_path: str | Path, store: str | Path,
    record_path: str | Path, index: int, params: Mapping[str, Any], *, threads: int | None = None,
    volume: Volume | None = None, features: Mapping[str, Any] | None = None, data: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Predict block ``index`` (C order of the plan) of a finished distributed prediction again
    and write it into ``store`` in place (rule ``predict_block``).

    The block's forward batch (:func:`dinopipe.distributed.batch_of`) is predicted as its part
    job predicted it, so an intact block is rewritten with the same bits; only block ``index``
    is written, chunk by chunk atomically (:func:`~dinopipe.distributed.replace_block`). The
    provenance (block, first voxel, whether it changed, time, device) goes into the store's
    root attrs and ``record_path`` (:func:`~dinopipe.distributed.record_block`); a changed
    block makes the store newer, so Snakemake reruns what reads it.

    Returns:
        The provenance record.
    """
    from dinopipe.distributed import batch_of, read_plan, record_block, replace_block
    from dinopipe.predict import predict_into

    t_start = time.perf_counter()
    params = {**DEFAULT_PREDICT, **params}
    plan, record = read_plan(plan_path)
    plan.block_start(int(index))  # a block the plan does not have fails here, before the model loads
    if not Path(store).is_dir():
        raise FileNotFoundError(f"volume {record['volume']!r}: no finished prediction at {store} to write block {index} "
                                f"into; a part not yet finished is recomputed by snakemake {Path(plan_path).parent}/PART.done")
    plan, record, inputs, layout, dev, mode = _planned_job(features_path, checkpoint_dir, plan_path, params,
                                                           threads=threads, volume=volume, features=features, data=data)
    batch = batch_of(plan, int(index), int(params["batch_size"]))
    scratch = [zarr.create_array(zarr.storage.MemoryStore(), shape=a.shape, chunks=a.shape[:1] + plan.block,
                                 dtype=a.dtype, fill_value=0)
               for a in (zarr.open_array(str(Path(store) / n / "s0"), mode="r") for n in record["images"])]
    logger.info("volume %s: block %d (first voxel (z, y, x) %s) predicted again in its batch of blocks %d-%d, "
                "device %s", record["volume"], index, list(plan.block_start(int(index))), batch.start, batch.stop - 1, dev)
    timings = predict_into(inputs.readers, layout, inputs.model, scratch, [plan.block_start(i) for i in batch],
                           device=dev, mode=mode, batch_size=len(batch), label=f"predict {record['volume']} block {index}")
    where = (slice(None), *plan.window(int(index)))
    changed = {n: replace_block(Path(store) / n / "s0", plan, int(index), a[where])
               for n, a in zip(record["images"], scratch, strict=True)}
    entry = {"block": int(index), "first_voxel": list(plan.block_start(int(index))), "batch": [batch.start, batch.stop],
             "changed": any(changed.values()), "changed_images": [n for n, c in changed.items() if c],
             "precision": mode if dev.type == "cuda" else "none", "device": str(dev),
             "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "dinopipe_version": __version__,
             "seconds": time.perf_counter() - t_start, "forward_s": timings["forward_s"]}
    record_block(store, record_path, entry)
    logger.info("volume %s: block %d %s", record["volume"], index,
                f"differed from the stored one in {entry['changed_images']}: rewritten" if entry["changed"]
                else "equals the stored one bit for bit")
    return entry


def run_predict_finish(plan_path: str | Path, staging: str | Path, markers: Sequence[str | Path],
                       out_path: str | Path) -> dict[str, Any]:
    """Last job of a distributed prediction: check that every part and block is done and move
    the staging store to ``out_path`` (:func:`dinopipe.distributed.finish_store`)."""
    from dinopipe.distributed import finish_store

    return finish_store(plan_path, staging, markers, out_path)
