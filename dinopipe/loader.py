"""Random training crops from cached feature and target volumes, read with tensorstore.

Each volume's arrays are opened once (:func:`open_volume`), memory-mapped
(tensorstore's ``file_io_mode: memmap``: chunks are copied straight from the page cache);
crops are read with ``TensorStore.read()``, all arrays of a crop concurrently.

Features, ~97 % of the bytes, take a faster path (measured in ``benchmarks/loader.py``):
each crop is written by tensorstore straight into its slot of a reused batch buffer
(:class:`BufferPool`; fresh 200 MB arrays cost as much in page faults as the copy itself)
whose element order matches the store's chunks (channel-fastest, :data:`dinopipe.io.FEATURE_ORDER`),
so the copy runs in long contiguous runs. They are handed over untransformed with the
crop's augmentation as ``transforms``; :func:`to_device` makes them contiguous float32 and
applies the flips and transposes on the device. A batch is a pure function of
``(seed, step)`` (:meth:`CropSampler.batch`): its crops, their positions and their
augmentations come from ``np.random.default_rng([seed, 0, step, item])``, so batches can
be prepared in any order by any thread (:class:`Prefetcher`) and a resumed run draws
exactly the batches an uninterrupted run would have.

Crops are drawn where the mask has labels: a volume with probability proportional to its
labelled voxels, then a labelled voxel (from a coarse per-block count of the mask, read
once at opening), then a crop around it, redrawn while less than ``min_mask_fraction`` of
the crop is labelled. With ``boundary_fraction`` (``train.sample_boundary``) that fraction
of the crops is instead centred (up to the same jitter) on a boundary voxel drawn uniformly
from all boundary voxels of the volume (:func:`dinopipe.targets.boundary_voxels`: a
6-neighbour of another label, both inside the mask; counted per block at opening). Features stay float16 until :func:`to_device` moves them.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts
import torch
import zarr

from dinopipe.augment import (
    apply_spatial,
    apply_spatial_torch,
    check_offsets_closed,
    transform_affinities,
    transform_group,
    transform_lsds,
)
from dinopipe.features import check_compatible
from dinopipe.ngff import chunk_order, open_tensorstore, read_image, read_into
from dinopipe.targets import NUM_LSD_CHANNELS, boundary_voxels

logger = logging.getLogger(__name__)

MAX_CROP_TRIES = 100
"""Positions tried per crop before taking the best one seen (with a warning)."""
COARSE_BLOCK = 8
"""Edge (voxels) of the blocks in which the mask's labelled voxels are counted at opening."""
TARGET_TYPES = ("affinities", "semantic")


def open_array(path: str | Path) -> ts.TensorStore:
    """Open one Zarr v2 or v3 (sharded) array read-only, memory-mapped (once per volume and array)."""
    return open_tensorstore(path)


def empty_features(shape: Sequence[int], order: str) -> np.ndarray:
    """An uninitialised float16 batch (B, C, z, y, x) whose items are laid out like ``order`` chunks.

    ``"F"``: each item is channel-fastest (memory order x, y, z, c), the layout of
    F-ordered chunks; ``"C"``: C-contiguous.
    """
    b, c, z, y, x = (int(v) for v in shape)
    if order == "F":
        return np.empty((b, x, y, z, c), dtype=np.float16).transpose(0, 4, 3, 2, 1)
    return np.empty((b, c, z, y, x), dtype=np.float16)


class BufferPool:
    """Feature batch buffers handed out by :meth:`take` and given back with :meth:`give`.

    Reusing a buffer saves the page faults of a fresh 200 MB allocation on every batch.
    A buffer must be given back only once nothing reads it any more (:func:`to_device` has
    copied it); one never given back is simply garbage collected.
    """

    def __init__(self, keep: int = 8) -> None:
        self.keep = keep
        self.free: list[np.ndarray] = []
        self.lock = threading.Lock()

    def take(self, shape: Sequence[int], order: str) -> np.ndarray:
        shape = tuple(int(v) for v in shape)
        c, z, y, x = shape[1:]  # byte strides (c, z, y, x) of one float16 item, as empty_features lays it out
        layout = (2, 2 * c, 2 * c * z, 2 * c * z * y) if order == "F" else (2 * z * y * x, 2 * y * x, 2 * x, 2)
        with self.lock:
            for i, buf in enumerate(self.free):
                if buf.shape == shape and buf.strides[1:] == layout:
                    return self.free.pop(i)
        return empty_features(shape, order)

    def give(self, array: np.ndarray) -> None:
        with self.lock:
            if len(self.free) < self.keep and all(a is not array for a in self.free):
                self.free.append(array)


@dataclass
class VolumeStores:
    """One volume's feature and target arrays, opened once.

    Attributes:
        name: Volume name (the feature store's name without ``.zarr``).
        features_path, targets_path: Where the stores are.
        arrays: ``features`` (C, z, y, x) float16 and the target arrays by name
            (``affinities``, ``lsds``, ``boundary_weights``, ``mask``, ``raw``,
            ``labels``, ``semantic`` or ``classes`` and ``class_mask`` as present and needed).
        offsets: Affinity offsets (z, y, x) of the affinity channels.
        signature: The features' signature (or None).
        shape: Spatial shape (z, y, x) in voxels.
        voxel_size: nm, (z, y, x).
        attrs: The targets store's ``dinopipe`` root attributes (``store_id`` among them).
        coarse: Labelled-voxel counts of the mask per :data:`COARSE_BLOCK`³ block.
        coarse_boundary: Boundary-voxel counts per block (empty unless opened with
            ``boundary=True``).
        features_id: The feature store's ``store_id`` attribute (None for stores
            written before ids existed).
    """

    name: str
    features_path: str
    targets_path: str
    arrays: dict[str, ts.TensorStore]
    offsets: list[list[int]]
    signature: Mapping[str, Any] | None
    shape: tuple[int, int, int]
    voxel_size: tuple[float, float, float]
    attrs: dict[str, Any]
    coarse: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0)))
    coarse_boundary: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0)))
    warned: bool = False
    features_id: str | None = None

    @property
    def channels(self) -> int:
        return int(self.arrays["features"].shape[0])

    @property
    def labelled(self) -> int:
        return int(self.coarse.sum())

    def identity(self) -> dict[str, Any]:
        """What this volume's inputs hold, for the resume fingerprint: the stores' paths,
        the features' signature, the targets' parameters (their attributes without
        timings) and each store's id, written anew whenever the store is rewritten."""
        return {
            "features": self.features_path,
            "targets": self.targets_path,
            "features_id": self.features_id,
            "features_signature": dict(self.signature) if self.signature is not None else None,
            "targets_attrs": {k: v for k, v in self.attrs.items() if k != "timings"},
        }

    def read(self, key: str, start: Sequence[int], shape: Sequence[int]) -> ts.Future:
        """Start reading ``shape`` voxels at ``start`` of array ``key`` (all channels)."""
        array = self.arrays[key]
        index = tuple(slice(int(s), int(s) + int(n)) for s, n in zip(start, shape, strict=True))
        if array.rank == 4:
            index = (slice(None), *index)
        return array[index].read()

    def read_into(self, key: str, start: Sequence[int], out: np.ndarray) -> ts.WriteFutures:
        """Start reading the crop of array ``key`` at ``start`` (all channels) into ``out``
        (a writable numpy view of the crop's shape, any strides)."""
        index = tuple(slice(int(s), int(s) + int(n)) for s, n in zip(start, out.shape[-3:], strict=True))
        array = self.arrays[key]
        return read_into(array, (slice(None), *index) if array.rank == 4 else index, out)

    def read_padded(self, key: str, start: Sequence[int], shape: Sequence[int], margin: int) -> np.ndarray:
        """Read a crop grown by ``margin`` on every side, 0 outside the volume."""
        lo = [int(s) - margin for s in start]
        hi = [int(s) + int(n) + margin for s, n in zip(start, shape, strict=True)]
        inner_lo = [max(a, 0) for a in lo]
        inner_hi = [min(b, n) for b, n in zip(hi, self.shape, strict=True)]
        data = self.read(key, inner_lo, [b - a for a, b in zip(inner_lo, inner_hi, strict=True)]).result()
        if inner_lo == lo and inner_hi == hi:
            return data
        array = self.arrays[key]
        out = np.zeros((*array.shape[:-3], *(b - a for a, b in zip(lo, hi, strict=True))), dtype=data.dtype)
        place = tuple(slice(a - l, b - l) for a, b, l in zip(inner_lo, inner_hi, lo, strict=True))
        out[(..., *place)] = data
        return out


def volume_name(features_path: str | Path) -> str:
    name = Path(features_path).name
    return name[: -len(".zarr")] if name.endswith(".zarr") else name


def open_volume(
    features_path: str | Path,
    targets_path: str | Path,
    *,
    lsds: bool = True,
    raw: bool = False,
    target: str = "affinities",
    extra: Sequence[str] = (),
    boundary: bool = False,
) -> VolumeStores:
    """Open a volume's features and targets, check that they share the label grid.

    Args:
        features_path: Feature store (OME-NGFF image, (C, z, y, x) float16).
        targets_path: Targets store (group of OME-NGFF images).
        lsds: Open the LSDs.
        raw: Open ``raw`` (the raw image on the label grid).
        target: ``"affinities"`` or ``"semantic"`` (opens ``semantic`` instead, or for
            overlapping classes, ``classes_overlap`` in the targets' attrs, ``classes`` and
            ``class_mask``, (C, z, y, x) each).
        extra: Further target images to open when present (e.g. ``"labels"`` and ``"raw"``
            for image summaries).
        boundary: Open ``labels`` and count the boundary voxels per block
            (:attr:`VolumeStores.coarse_boundary`, for boundary-centred crops).

    Raises:
        FileNotFoundError: A store or image is missing.
        ValueError: Shapes, grids, channel counts or offsets that do not fit (named).
    """
    features_path, targets_path = str(features_path), str(targets_path)
    name = volume_name(features_path)
    features = read_image(features_path)
    if not features.channel_axis:
        raise ValueError(f"volume {name}: features {features_path} must be (C, z, y, x), got shape {features.array.shape}")
    if not Path(targets_path).exists():
        raise FileNotFoundError(f"volume {name}: no targets at {targets_path}")
    attrs = dict(dict(zarr.open_group(targets_path, mode="r").attrs).get("dinopipe", {}))
    offsets = [[int(o) for o in off] for off in attrs.get("offsets") or []]
    if target == "affinities" and not offsets:
        raise ValueError(f"volume {name}: targets {targets_path} have no 'offsets' in their 'dinopipe' attributes")
    g = features.geometry

    def target_image(key: str, channels: int | None) -> ts.TensorStore:
        image = read_image(Path(targets_path) / key)
        where = f"volume {name}: target {targets_path}/{key}"
        if image.geometry.shape != g.shape:
            raise ValueError(
                f"{where} has spatial shape {image.geometry.shape} but features {features_path} have "
                f"{g.shape}; both must be on the same label grid"
            )
        if not np.allclose(image.geometry.voxel_size, g.voxel_size) or not np.allclose(
            image.geometry.translation, g.translation
        ):
            raise ValueError(
                f"{where} has voxel size {image.geometry.voxel_size} nm / translation {image.geometry.translation} nm "
                f"but features {features_path} have {g.voxel_size} / {g.translation}; both must be on the label grid"
            )
        actual = image.array.shape[0] if image.channel_axis else None
        if actual != channels:
            raise ValueError(f"{where} has shape {image.array.shape}; expected {channels} channels first")
        return open_array(Path(image.path) / (image.scale or "s0"))

    arrays = {"features": open_array(Path(features.path) / (features.scale or "s0"))}
    wanted: dict[str, int | None] = {"mask": None}
    if target == "affinities":
        wanted.update({"affinities": len(offsets), "boundary_weights": None})
        if lsds:
            wanted["lsds"] = NUM_LSD_CHANNELS
    elif attrs.get("classes_overlap"):  # overlapping classes: 0/1 per class, each with its annotation
        num = attrs.get("num_classes")
        if not isinstance(num, int) or num < 1:
            raise ValueError(f"volume {name}: targets {targets_path} record overlapping classes but no "
                             f"'num_classes' in their 'dinopipe' attributes; recompute the targets")
        wanted.update({"classes": num, "class_mask": num})
    else:
        wanted["semantic"] = None
    if raw:
        wanted["raw"] = None
    if boundary:
        if not (Path(targets_path) / "labels").exists():
            raise FileNotFoundError(
                f"volume {name}: train.sample_boundary needs the labels in {targets_path}/labels, which is missing"
            )
        wanted["labels"] = None
    for key in extra:
        if (Path(targets_path) / key).exists():
            wanted.setdefault(key, None)
    for key, channels in wanted.items():
        arrays[key] = target_image(key, channels)
    volume = VolumeStores(
        name=name, features_path=features_path, targets_path=targets_path, arrays=arrays, offsets=offsets,
        signature=(features.attrs or {}).get("signature"), shape=g.shape, voxel_size=g.voxel_size, attrs=attrs,
        features_id=(features.attrs or {}).get("store_id"),
    )
    volume.coarse = _coarse_mask(arrays["mask"], g.shape)
    if boundary:
        volume.coarse_boundary = _coarse_counts(
            lambda z0, z1: _boundary_region(arrays["labels"], arrays["mask"], (z0, 0, 0), (z1, *g.shape[1:])),
            g.shape,
        )
    return volume


def _coarse_counts(read: Callable[[int, int], np.ndarray], shape: Sequence[int]) -> np.ndarray:
    """True voxels per COARSE_BLOCK³ block of a boolean volume read as z slabs
    ``read(z0, z1)`` (bounded memory)."""
    b = COARSE_BLOCK
    coarse = np.zeros([math.ceil(s / b) for s in shape], dtype=np.int64)
    slab = b * max(1, 64 // b)
    for z0 in range(0, shape[0], slab):
        data = read(z0, min(z0 + slab, shape[0]))
        padded = np.zeros([math.ceil(data.shape[0] / b) * b, *(c * b for c in coarse.shape[1:])], dtype=bool)
        padded[: data.shape[0], : shape[1], : shape[2]] = data
        counts = padded.reshape(padded.shape[0] // b, b, coarse.shape[1], b, coarse.shape[2], b).sum((1, 3, 5))
        coarse[z0 // b : z0 // b + counts.shape[0]] = counts
    return coarse


def _coarse_mask(mask: ts.TensorStore, shape: Sequence[int]) -> np.ndarray:
    """Labelled voxels per COARSE_BLOCK³ block."""
    return _coarse_counts(lambda z0, z1: mask[z0:z1].read().result() != 0, shape)


def _boundary_region(
    labels: ts.TensorStore, mask: ts.TensorStore, lo: Sequence[int], hi: Sequence[int]
) -> np.ndarray:
    """Boundary voxels (:func:`dinopipe.targets.boundary_voxels`) of the box ``[lo, hi)``
    (z, y, x voxels), judged with the neighbours one voxel outside the box where they exist."""
    shape = labels.shape
    grown_lo = [max(int(a) - 1, 0) for a in lo]
    grown_hi = [min(int(b) + 1, n) for b, n in zip(hi, shape, strict=True)]
    box = tuple(slice(a, b) for a, b in zip(grown_lo, grown_hi, strict=True))
    found = boundary_voxels(labels[box].read().result(), mask[box].read().result() != 0)
    core = tuple(slice(int(a) - g, int(b) - g) for a, b, g in zip(lo, hi, grown_lo, strict=True))
    return found[core]


def check_consistent(volumes: Sequence[VolumeStores]) -> None:
    """Same feature channels and offsets in every volume, and compatible signatures."""
    first = volumes[0]
    for v in volumes[1:]:
        if v.channels != first.channels:
            raise ValueError(
                f"volume {v.name} has {v.channels} feature channels ({v.features_path}) but volume "
                f"{first.name} has {first.channels} ({first.features_path})"
            )
        if v.offsets != first.offsets:
            raise ValueError(
                f"volume {v.name} has affinity offsets {v.offsets} ({v.targets_path}) but volume "
                f"{first.name} has {first.offsets} ({first.targets_path})"
            )
        if first.signature is not None and v.signature is not None:
            check_compatible(v.signature, first.signature, v.features_path, first.features_path)


def _boundary_centre(volume: VolumeStores, cell: Sequence[int], rng: np.random.Generator) -> list[int]:
    """A boundary voxel of block ``cell``, uniformly among the block's boundary voxels."""
    b = COARSE_BLOCK
    lo = [int(c) * b for c in cell]
    hi = [min(a + b, n) for a, n in zip(lo, volume.shape, strict=True)]
    found = np.argwhere(_boundary_region(volume.arrays["labels"], volume.arrays["mask"], lo, hi))
    if not len(found):  # cannot happen when the counts come from the same arrays
        return [int(rng.integers(a, z)) for a, z in zip(lo, hi, strict=True)]
    return [a + int(v) for a, v in zip(lo, found[int(rng.integers(len(found)))], strict=True)]


def sample_start(
    volume: VolumeStores, crop: Sequence[int], rng: np.random.Generator, min_fraction: float, boundary: bool = False
) -> tuple[tuple[int, ...], np.ndarray]:
    """A crop start around a random labelled voxel whose crop mask covers ``min_fraction``.

    With ``boundary`` (and boundary counts from :func:`open_volume`'s ``boundary=True``),
    around a boundary voxel drawn uniformly from all of the volume's boundary voxels instead.

    Returns:
        The start (z, y, x) and the crop's mask (read anyway to check it).
    """
    b = COARSE_BLOCK
    coarse = volume.coarse_boundary if boundary and volume.coarse_boundary.sum() > 0 else volume.coarse
    weights = coarse.ravel().astype(np.float64)
    total = weights.sum()
    best: tuple[float, tuple[int, ...], np.ndarray] = (-1.0, (), np.empty(0))
    for _ in range(MAX_CROP_TRIES):
        if total > 0:
            cell = np.unravel_index(int(rng.choice(weights.size, p=weights / total)), coarse.shape)
            if coarse is volume.coarse_boundary:
                centre = _boundary_centre(volume, cell, rng)
            else:
                centre = [int(c) * b + int(rng.integers(0, b)) for c in cell]
            start = tuple(
                int(np.clip(c - n // 2 + int(rng.integers(-(n // 4), n // 4 + 1)), 0, s - n))
                for c, n, s in zip(centre, crop, volume.shape, strict=True)
            )
        else:
            start = tuple(int(rng.integers(0, s - n + 1)) for s, n in zip(volume.shape, crop, strict=True))
        mask = volume.read("mask", start, crop).result()
        fraction = float(np.count_nonzero(mask)) / mask.size
        if fraction >= min_fraction:
            return start, mask
        if fraction > best[0]:
            best = (fraction, start, mask)
    if not volume.warned:
        logger.warning(
            "volume %s: no crop with >= %.0f%% of its mask set in %d tries; using the best found (%.1f%%)",
            volume.name, 100 * min_fraction, MAX_CROP_TRIES, 100 * best[0],
        )
        volume.warned = True
    return best[1], best[2]


class CropSampler:
    """Batches of (augmented) crops; ``batch(step)`` depends only on ``(seed, step)``.

    Args:
        volumes: Opened volumes (train volumes for training, validate volumes for validation).
        crop: Crop shape (z, y, x) in label voxels.
        batch_size: Crops per batch.
        seed: Base seed.
        min_fraction: Minimum labelled fraction of a crop's mask.
        augment: Resolved ``train.augment`` params, or None for no augmentation.
        lsds, raw, target: What to read (see :func:`open_volume`).
        boundary_fraction: Fraction of crops centred on boundary voxels (volumes opened
            with ``boundary=True``); 0 draws every crop around a labelled voxel.
    """

    def __init__(
        self,
        volumes: Sequence[VolumeStores],
        crop: Sequence[int],
        batch_size: int,
        seed: int,
        min_fraction: float,
        augment: Mapping[str, Any] | None = None,
        *,
        lsds: bool = True,
        raw: bool = False,
        target: str = "affinities",
        boundary_fraction: float = 0.0,
    ) -> None:
        self.volumes = list(volumes)
        self.boundary_fraction = float(boundary_fraction)
        if self.boundary_fraction > 0:
            missing = [v.name for v in self.volumes if "labels" not in v.arrays]
            if missing:
                raise ValueError(f"boundary-centred crops need volumes opened with boundary=True; not {missing}")
        self.crop = [int(c) for c in crop]
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.min_fraction = float(min_fraction)
        self.lsds, self.raw, self.target = lsds, raw, target
        labelled = np.array([max(v.labelled, 1) for v in self.volumes], dtype=np.float64)
        self.volume_p = labelled / labelled.sum()
        first = self.volumes[0]
        self.offsets = first.offsets
        self.group = [np.eye(3, dtype=np.int64)]
        if augment is not None:
            self.group = transform_group(augment, first.voxel_size, self.crop)
            for v in self.volumes[1:]:
                if len(transform_group(augment, v.voxel_size, self.crop)) != len(self.group):
                    raise ValueError(
                        f"volume {v.name} has voxel size {v.voxel_size} nm but volume {first.name} has "
                        f"{first.voxel_size} nm: they allow different axis exchanges"
                    )
            if target == "affinities":
                check_offsets_closed(self.offsets, self.group)
        augmenting = len(self.group) > 1
        self.pool = BufferPool()
        # layout of the feature batch buffers: channel-fastest when every store's chunks are
        self.feature_order = "F" if all(chunk_order(v.arrays["features"]) == "F" for v in self.volumes) else "C"
        self.margin = max((abs(v) for o in self.offsets for v in o), default=0) if augmenting else 0

    def read_crop(
        self, volume: VolumeStores, start: Sequence[int], mask: np.ndarray | None = None, matrix: np.ndarray | None = None,
        features_out: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """Read one crop (all arrays concurrently) and apply ``matrix`` (signed permutation).

        With ``features_out`` (a (C, z, y, x) view), the features are read into it and left
        untransformed (no ``features`` key in the result): the caller applies ``matrix``.
        """
        crop = self.crop
        pending: dict[str, Any] = {}
        into = None
        if features_out is None:
            pending["features"] = volume.read("features", start, crop)
        else:
            into = volume.read_into("features", start, features_out)
        if self.target == "affinities":
            keys = ["boundary_weights", *(["lsds"] if self.lsds else [])]
        else:
            keys = ["classes", "class_mask"] if "classes" in volume.arrays else ["semantic"]
        if self.raw:
            keys.append("raw")
        if mask is None:
            keys.append("mask")
        for key in keys:
            pending[key] = volume.read(key, start, crop)
        out = {}
        if self.target == "affinities":
            out["affinities"] = volume.read_padded("affinities", start, crop, self.margin)
        out.update({key: future.result() for key, future in pending.items()})
        if into is not None:
            into.result()
        if mask is not None:
            out["mask"] = mask
        if "boundary_weights" in out:
            out["weights"] = out.pop("boundary_weights")
        if matrix is None:
            matrix = np.eye(3, dtype=np.int64)
        if self.target == "affinities":
            out["affinities"] = transform_affinities(out["affinities"], self.offsets, matrix, self.margin)
        for key in list(out):
            if key == "affinities":
                continue
            out[key] = transform_lsds(out[key], matrix) if key == "lsds" else apply_spatial(out[key], matrix)
        return out

    def plan(self, rng: np.random.Generator) -> tuple[VolumeStores, tuple[int, ...], np.ndarray, np.ndarray]:
        """Draw one crop: (volume, start, its mask, augmentation matrix)."""
        volume = self.volumes[int(rng.choice(len(self.volumes), p=self.volume_p))]
        # draws nothing extra without boundary sampling: batches stay those of earlier versions
        boundary = self.boundary_fraction > 0 and rng.random() < self.boundary_fraction
        start, mask = sample_start(volume, self.crop, rng, self.min_fraction, boundary)
        matrix = self.group[int(rng.integers(len(self.group)))]
        return volume, start, mask, matrix

    def sample(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """One drawn crop with every array (features included) transformed on the CPU."""
        return self.read_crop(*self.plan(rng))

    def _assemble(self, plans: Sequence[tuple[VolumeStores, Sequence[int], np.ndarray | None, np.ndarray]]
                  ) -> dict[str, np.ndarray]:
        features = self.pool.take((len(plans), plans[0][0].channels, *self.crop), self.feature_order)
        samples = [self.read_crop(v, start, mask, matrix, features_out=features[i])
                   for i, (v, start, mask, matrix) in enumerate(plans)]
        batch = {key: np.stack([s[key] for s in samples]) for key in samples[0]}
        batch["features"] = features
        batch["transforms"] = np.stack([np.asarray(m, dtype=np.int64) for *_, m in plans])
        return batch

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """The batch of training step ``step`` (1-based), stacked.

        ``features`` (B, C, z, y, x) float16 are untransformed, in a buffer of :attr:`pool`
        (give it back with :meth:`recycle`); ``transforms`` (B, 3, 3) are the crops'
        augmentations, applied to ``features`` by :func:`to_device`. All other arrays are
        transformed already.
        """
        rngs = [np.random.default_rng([self.seed, 0, int(step), i]) for i in range(self.batch_size)]
        return self._assemble([self.plan(rng) for rng in rngs])

    def batch_of(self, crops: Sequence[tuple[int, Sequence[int]]]) -> dict[str, np.ndarray]:
        """A stacked batch of given (volume index, start) crops, not augmented (as :meth:`batch`)."""
        eye = np.eye(3, dtype=np.int64)
        return self._assemble([(self.volumes[i], start, None, eye) for i, start in crops])

    def recycle(self, batch: Mapping[str, np.ndarray]) -> None:
        """Give a batch's feature buffer back for reuse, once :func:`to_device` has copied it."""
        self.pool.give(batch["features"])

    def fixed_crops(self, count: int, stream: int = 1) -> list[tuple[int, tuple[int, ...]]]:
        """A fixed, seeded set of (volume index, start) crops, round-robin over the volumes."""
        crops = []
        rng = np.random.default_rng([self.seed, stream])
        for i in range(count):
            index = i % len(self.volumes)
            start, _ = sample_start(self.volumes[index], self.crop, rng, self.min_fraction)
            crops.append((index, start))
        return crops


class Prefetcher:
    """Prepare ``make(step)`` for the next steps in background threads, hand them out in order.

    Attributes:
        wait_seconds: Total time :meth:`get` spent waiting for a batch that was not ready.
    """

    def __init__(self, make: Callable[[int], Any], first: int, last: int, workers: int = 2, depth: int = 4) -> None:
        self.make, self.next_submit, self.last = make, first, last
        self.depth = max(1, depth)
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="dinopipe-loader")
        self.pending: dict[int, Future[Any]] = {}
        self.lock = threading.Lock()
        self.wait_seconds = 0.0
        self._fill(first)

    def _fill(self, step: int) -> None:
        while self.next_submit <= self.last and self.next_submit < step + self.depth:
            self.pending[self.next_submit] = self.pool.submit(self.make, self.next_submit)
            self.next_submit += 1

    def get(self, step: int) -> Any:
        """The result for ``step`` (steps must be asked for in increasing order)."""
        future = self.pending.pop(step, None)
        if future is None:
            future = self.pool.submit(self.make, step)
        self._fill(step + 1)
        t0 = time.perf_counter()
        result = future.result()
        self.wait_seconds += time.perf_counter() - t0
        return result

    def close(self) -> None:
        for future in self.pending.values():
            future.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def to_device(batch: Mapping[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """Move a stacked batch to ``device``; features become float32 only there.

    Features are copied to the device as they are (float16, any layout), then made
    contiguous float32 and transformed by the batch's ``transforms`` there; the host buffer
    is not referenced afterwards (:meth:`CropSampler.recycle` may reuse it).
    ``weights``, ``mask`` and ``raw`` gain a channel axis; ``semantic`` becomes int64, everything
    else (``classes``, ``class_mask`` of overlapping classes included) float32.
    """
    out = {}
    transforms = batch.get("transforms")
    for key, array in batch.items():
        if key == "transforms":
            continue
        if key == "features":
            features = torch.from_numpy(array).to(device).to(torch.float32, memory_format=torch.contiguous_format,
                                                              copy=True)
            if transforms is not None:
                for i, matrix in enumerate(transforms):
                    if not np.array_equal(matrix, np.eye(3)):
                        features[i] = apply_spatial_torch(features[i], matrix)
            out[key] = features
            continue
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if device.type == "cuda":
            tensor = tensor.pin_memory()
        tensor = tensor.to(device, non_blocking=True)
        if key in ("weights", "mask", "raw"):
            tensor = tensor.unsqueeze(1)
        out[key] = tensor.long() if key == "semantic" else tensor.float()
    return out
