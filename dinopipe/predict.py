"""Blockwise prediction of affinities and LSDs, from cached features or from raw.

The label grid is cut into blocks (z, y, x); each block is read with a halo of context
on every side (from :func:`dinopipe.unet.receptive_field_halo`, rounded up to a
multiple of ``2**levels``), the part of the halo outside the volume is filled by
reflection at the volume's faces, the network runs on block + halo, and only the
block (the core) is written. Halo and block shape are multiples of ``2**levels``,
so every block sees the pooling grid at the same phase: with batch norm (in eval
mode) or no normalisation the result does not depend on the block shape, and equals
a prediction of the whole volume as one block. Group and instance norm use
statistics over the whole block, so with them blocks show seams.

The network input of a block comes from a *reader*:

* cached features (:func:`predict_volume`): ``results/features/{volume}.zarr``;
* raw (:func:`predict_from_raw`): DINOv3 features of the block + UNet halo are computed
  from the raw under that window grown by a further feature halo (aligned to the
  patch grid, as :func:`dinopipe.features.extract_features_blockwise` does), so the
  backbone also sees context across block faces;
* for models trained with ``"input_raw": true`` in ``model_config.json``, the raw image
  on the label grid (0..1, area-averaged, the volume's 0.5–99.5 percentile range) is
  appended as the last input channel.

A background thread reads the next batch of blocks while the network runs on the
current one (:class:`_BlockStager`). Memory is bounded by one batch of blocks with
halos as read (channels fastest, in the features' dtype), the network's float32 input
of the same size (on the device), the network's activations and, from raw, one grown
block of raw and features; the buffers are allocated once, and memory does not grow
with the volume (``benchmarks/predict.py`` measures it).

Output store (written atomically): OME-NGFF 0.4 images on Zarr v2 chunked by block, or
with ``shard_shape`` OME-NGFF 0.5 on Zarr v3 shards of whole blocks; the blocks are then
taken shard by shard (:func:`dinopipe.io.shard_major`) and each shard is written once
(:class:`dinopipe.io.ShardWriter`). Every forward pass has the full batch size, so the
values do not depend on the block order: sharded and unsharded outputs are bitwise equal.

* ``affinities``: image (n_offsets, z, y, x) float32, sigmoid probabilities in [0, 1].
* ``lsds``: image (10, z, y, x) float32 in [0, 1] (only for models that predict LSDs).
* class models (``target: semantic``, :mod:`dinopipe.classes`) write ``classes`` instead:
  image (num_classes, z, y, x) float32, softmax probabilities (class 0 background); for
  overlapping classes (``classes_overlap`` in ``model_config.json``) one sigmoid
  probability per class (no background channel), blockwise as well.
* root attrs ``["dinopipe"]``: ``target``, ``offsets`` (and for class models
  ``class_names``, ``instance_classes``, ``classes_overlap``) and provenance (source, checkpoint, block shape,
  halo, feature signature, timings).

Both images carry the label grid's voxel size and translation (nm).
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import zarr

from dinopipe.atomic import atomic_output
from dinopipe.backbone import load_backbone
from dinopipe.checkpoint import load_model, takes_features, takes_raw
from dinopipe.features import (
    FeatureParams,
    check_compatible,
    context_raw_window,
    extract_features,
    load_upsampler,
    signature,
)
from dinopipe.geometry import Geometry, blocks, grow_window, inner_window, patch_alignment, sub_geometry
from dinopipe.logs import Progress
from dinopipe.ngff import ShardWriter, create_image, open_tensorstore, read_image, read_into, shard_major
from dinopipe.ngff import shard_shape as round_shard_shape
from dinopipe.runtime import autocast_context, autocast_mode, release_freed_memory, resolve_device
from dinopipe.sources import RawOnGridReader, intensity_range, open_sources, source_args
from dinopipe.targets import NUM_LSD_CHANNELS
from dinopipe.unet import UNet3D, receptive_field_halo, split_output

logger = logging.getLogger(__name__)

def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _block_starts(shape: Sequence[int], block: Sequence[int]) -> Iterator[tuple[int, ...]]:
    """The start (z, y, x) of every block tiling ``shape``, in C order (:func:`dinopipe.geometry.blocks`)."""
    for window in blocks(shape, block):
        yield tuple(s.start for s in window)


# --------------------------------------------------------------------------- readers


def _open_tensorstore(image: Any) -> Any | None:
    """A read-only tensorstore handle on a local Zarr image's array, read through memory
    maps (no copy out of the page cache); None when the array is not a local Zarr array."""
    zarr_format = getattr(getattr(image.array, "metadata", None), "zarr_format", None)
    path = Path(image.path) / image.scale if image.scale else Path(image.path)
    if zarr_format not in (2, 3) or not path.is_dir():
        return None
    try:
        return open_tensorstore(path, zarr_format)
    except ValueError as exc:  # tensorstore's error for what it cannot open; zarr-python reads it
        logger.info("reading %s with zarr-python (tensorstore: %s)", path, exc)
        return None


class FeatureReader:
    """Network input from a cached feature image (C, z, y, x).

    Local Zarr arrays are read with tensorstore straight into the caller's buffer, in
    whatever memory layout it has: a channel-fastest buffer matches feature chunks stored
    in order "F" (:data:`dinopipe.io.FEATURE_ORDER`), so a read is a few long copies
    per chunk.
    """

    def __init__(self, image: Any) -> None:
        self.array = image.array
        self.channels = int(image.array.shape[0])
        self.dtype = np.dtype(image.array.dtype) if np.dtype(image.array.dtype).itemsize <= 4 else np.dtype(np.float32)
        self.store = _open_tensorstore(image)

    def read(self, window: Sequence[slice]) -> np.ndarray:
        return np.asarray(self.array[(slice(None), *window)], dtype=self.dtype)

    def read_into(self, window: Sequence[slice], out: np.ndarray) -> None:
        """Read ``window`` (all channels) into ``out`` (C, z, y, x), in one read."""
        if self.store is None or not np.can_cast(self.array.dtype, out.dtype, "safe"):
            out[...] = self.array[(slice(None), *window)]
            return
        read_into(self.store, (slice(None), *window), out).result()


class RawFeatureReader:
    """Network input computed from raw: DINOv3 features of a window, with their own halo.

    Args:
        raw: Raw image (z, y, x) (e.g. a zarr array) on ``raw_geom``.
        raw_geom, grid: Raw geometry and the label (output) grid, nm.
        backbone, params: As for :func:`dinopipe.features.extract_features`.
        halo: Feature context in label voxels added around each window (clipped to the
            volume, start aligned to the patch grid).
        intensity: The whole volume's intensity range (lo, hi).
        volume: Name for messages.
        upsampler: Optional guided upsampler.
    """

    def __init__(
        self, raw: Any, raw_geom: Geometry, grid: Geometry, backbone: Any, params: Any, *, halo: int,
        intensity: tuple[float, float], volume: str = "volume", upsampler: Any = None,
    ) -> None:
        self.raw, self.raw_geom, self.grid = raw, raw_geom, grid
        self.backbone, self.params, self.halo = backbone, params, int(halo)
        self.intensity, self.volume, self.upsampler = intensity, volume, upsampler
        self.channels = int(backbone.channels)
        self.dtype = np.dtype(np.float32)
        self.align = patch_alignment(backbone.patch_size, raw_geom.voxel_size, grid.voxel_size)
        self.image_size: dict[str, Any] = {}

    def read(self, window: Sequence[slice]) -> np.ndarray:
        grown = grow_window(window, self.halo, self.grid.shape, self.align)
        sub_out = sub_geometry(self.grid, grown)
        raw_win, sub_raw = context_raw_window(self.raw_geom, sub_out, self.params, self.backbone.patch_size)
        feats, info = extract_features(
            np.asarray(self.raw[raw_win]), sub_raw, sub_out, self.backbone, self.params, volume=self.volume,
            upsampler=self.upsampler, intensity=self.intensity,
        )
        self.image_size = info["image_size"]
        return feats[(slice(None), *inner_window(window, grown))]

    def read_into(self, window: Sequence[slice], out: np.ndarray) -> None:
        out[...] = self.read(window)


def _reflect_index(lo: int, hi: int, start: int, n: int) -> np.ndarray:
    """Indices into a read part [start, start + n) for positions lo..hi-1, mirrored at its faces
    (numpy's "reflect": the edge voxel is not repeated; repeated for pads longer than the part)."""
    pos = np.arange(lo, hi) - start
    if n == 1:
        return np.zeros_like(pos)
    period = 2 * (n - 1)
    m = np.mod(pos, period)
    return np.where(m >= n, period - m, m)


def _read_block(readers: Sequence[Any], shape: Sequence[int], start: Sequence[int], block: Sequence[int],
                halo: int, out: np.ndarray | None = None, scratch: np.ndarray | None = None) -> np.ndarray:
    """Read (C, block + 2 halo) around ``start`` from every reader (channels concatenated,
    in the readers' dtype); outside the volume, reflect at its faces.

    The padded block goes into ``out`` (any memory layout; allocated C-ordered when None)
    and is returned; each reader fills its channels of the in-volume part, then the
    margins are mirrored in place axis by axis (reflection is separable). ``scratch``
    (1D, ``out``'s dtype, :func:`_max_plane` elements) is a reusable buffer for
    mirroring strided planes; allocated when needed if None.
    """
    lo = [s - halo for s in start]
    hi = [s + b + halo for s, b in zip(start, block, strict=True)]
    src = tuple(slice(max(a, 0), min(b, n)) for a, b, n in zip(lo, hi, shape, strict=True))
    inner = tuple(slice(s.start - a, s.stop - a) for s, a in zip(src, lo, strict=True))
    padded = (sum(r.channels for r in readers), *(b - a for a, b in zip(lo, hi, strict=True)))
    if out is None:
        out = np.empty(padded, dtype=np.result_type(*[r.dtype for r in readers]))
    elif out.shape != padded:
        raise ValueError(f"block buffer has shape {out.shape}, expected {padded}")
    c = 0
    for r in readers:
        r.read_into(src, out[c : c + r.channels][(slice(None), *inner)])
        c += r.channels
    for axis, (s, a) in enumerate(zip(src, lo, strict=True)):
        n, size = s.stop - s.start, out.shape[1 + axis]
        b0, e0 = s.start - a, s.stop - a  # the valid part along this axis

        def at(sl: slice | int) -> tuple[slice | int, ...]:
            return (slice(None),) * (1 + axis) + (sl,)

        # plane by plane, from the valid part. numpy copies between parts of one buffer whose
        # address ranges interleave (strided planes) through a fresh temporary: go through
        # ``scratch`` instead, so reading allocates nothing while the network runs
        index = _reflect_index(a, a + size, s.start, n) + b0
        for i in [*range(0, b0), *range(e0, size)]:
            dst, plane = out[at(i)], out[at(int(index[i]))]
            if np.may_share_memory(dst, plane):
                if scratch is None or scratch.size < plane.size:
                    scratch = np.empty(_max_plane(out.shape), dtype=out.dtype)
                order = np.argsort([-abs(stride) for stride in plane.strides])  # plane's layout, slowest first
                staged = scratch[: plane.size].reshape([plane.shape[k] for k in order]).transpose(np.argsort(order))
                staged[...] = plane
                plane = staged
            dst[...] = plane
    return out


def _max_plane(shape: Sequence[int]) -> int:
    """Elements of the largest plane (all channels) across the spatial axes of a (C, z, y, x) block."""
    return max(math.prod(shape) // n for n in shape[1:])


class _BlockStager:
    """Padded input blocks, read by a background thread one batch ahead of the network.

    Iterating yields the block starts of each batch once its blocks are read; then
    :meth:`to_device` returns them as a float32 (batch, C, z, y, x) tensor on the device.
    The thread reads the next batch (in the readers, and mirroring halos) while the
    network runs on the current one: behind a GPU the reading is hidden; on a CPU whose
    cores the network keeps busy it takes its share of them.

    Buffers are allocated once, for ``batch_size`` padded blocks, so memory does not
    depend on the volume:

    * ``gather`` (batch, z, y, x, C) in the readers' dtype (float16 for cached features):
      the readers fill it and the halo is mirrored in it. Channels fastest is the layout
      of feature chunks (order "F", :data:`dinopipe.io.FEATURE_ORDER`), so a read is a
      few long copies per chunk;
    * with ``convert_on_host`` (default: on the CPU), ``inputs`` (batch, C, z, y, x)
      float32, the network's input: :meth:`to_device` converts ``gather`` into it tile by
      tile (dtype and layout in one pass, as fast as a plain float16 to float32 copy into
      fresh memory). Otherwise ``gather`` is copied to the device as it is and converted
      there.

    The thread overwrites ``gather`` only after :meth:`to_device` has copied it out; it
    stops when the context exits, also on errors, and its errors are raised in the
    iterating thread.
    """

    #: Bytes of ``gather`` per conversion tile (y rows of one z plane). Each tile is one
    #: multi-threaded torch copy: tiles much smaller (2 MiB: ~190 copies per 64 x 96 x 96
    #: block of 384 channels) convert ~30 % faster on an idle CPU but ~4x slower when other
    #: processes compete for the cores (every copy waits for all its threads).
    TILE_BYTES = 8 << 20

    def __init__(self, readers: Sequence[Any], shape: Sequence[int], block: Sequence[int], halo: int,
                 batch_size: int, device: torch.device, convert_on_host: bool | None = None,
                 starts: Sequence[tuple[int, ...]] | None = None) -> None:
        self.readers, self.shape, self.block, self.halo = readers, tuple(shape), tuple(block), halo
        self.starts = list(_block_starts(shape, block)) if starts is None else list(starts)
        self.batch_size, self.device = batch_size, device
        channels = sum(r.channels for r in readers)
        dtype = np.result_type(*[r.dtype for r in readers])
        padded = tuple(b + 2 * halo for b in block)
        self.gather = np.zeros((batch_size, *padded, channels), dtype=dtype)
        self.scratch = np.empty(_max_plane((channels, *padded)), dtype=dtype)  # for mirroring, see _read_block
        self.convert_on_host = device.type == "cpu" if convert_on_host is None else convert_on_host
        self.inputs = (torch.empty((batch_size, channels, *padded), dtype=torch.float32) if self.convert_on_host
                       else None)
        self.read_s = self.wait_s = 0.0
        self._free = threading.Semaphore(1)  # held by whoever may write ``gather``
        self._ready: queue.Queue[Any] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="predict-reader", daemon=True)

    def __enter__(self) -> _BlockStager:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._free.release()  # wake the thread if it waits for the buffer
        self._thread.join()

    def _batches(self) -> Iterator[list[tuple[int, ...]]]:
        starts = iter(self.starts)
        while batch := list(islice(starts, self.batch_size)):
            yield batch

    def _run(self) -> None:
        try:
            for batch in self._batches():
                self._free.acquire()
                if self._stop.is_set():
                    return
                t0 = time.perf_counter()
                for i, start in enumerate(batch):
                    out = self.gather[i].transpose(3, 0, 1, 2)
                    _read_block(self.readers, self.shape, start, self.block, self.halo, out=out, scratch=self.scratch)
                self.read_s += time.perf_counter() - t0
                self._ready.put(batch)
        except BaseException as exc:  # re-raised by the iterating thread
            self._ready.put(exc)
        self._ready.put(None)

    def __iter__(self) -> Iterator[list[tuple[int, ...]]]:
        while True:
            t0 = time.perf_counter()
            item = self._ready.get()
            self.wait_s += time.perf_counter() - t0
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def to_device(self) -> torch.Tensor:
        """The batch as float32 (batch, C, z, y, x) on the device; lets the thread read the next.

        Always ``batch_size`` blocks: a last, shorter batch is filled up with the blocks of
        the batch before (whose outputs the caller drops), so every block goes through the
        network in a batch of the same size, and its output does not depend on which blocks
        share its batch (torch's CPU kernels depend on the batch size) nor on the block
        order (shard by shard for sharded outputs). On the host path the tensor is a view
        of ``inputs``, valid until the next call.
        """
        gather = torch.from_numpy(self.gather)
        try:
            if self.inputs is not None:
                inputs = self.inputs
                _, _, rows, cols, channels = gather.shape
                step = max(1, self.TILE_BYTES // (cols * channels * gather.element_size()))
                for b in range(gather.shape[0]):
                    for z in range(gather.shape[1]):
                        for y in range(0, rows, step):
                            inputs[b, :, z, y : y + step].copy_(gather[b, z, y : y + step].permute(2, 0, 1))
                return inputs
            x = gather.to(self.device, copy=True)
        finally:
            self._free.release()
        return x.permute(0, 4, 1, 2, 3).to(torch.float32, memory_format=torch.contiguous_format)


def _empty_image(path: Path, channels: int, grid: Geometry, chunks: Sequence[int], attrs: Mapping[str, Any],
                 shards: Sequence[int] | None = None) -> Any:
    """Create a float32 (channels, z, y, x) image on ``grid`` (sharded by ``shards``, spatial
    voxels, when given); return its writable array."""
    return create_image(
        path, (channels, *grid.shape), np.float32, grid.voxel_size, grid.translation,
        channel_axis=True, chunks=(channels, *chunks), attrs=attrs,
        shards=None if shards is None else (channels, *shards),
    )


def _check_block_args(block_shape: Sequence[int], batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if len(block_shape) != 3 or any(
        isinstance(b, bool) or not isinstance(b, int | np.integer) or b < 1 for b in block_shape
    ):
        raise ValueError(f"block_shape must be three positive integers (z, y, x), got {block_shape!r}")


def _check_channels(model: UNet3D, config: Mapping[str, Any], feature_channels: int, where: str,
                    checkpoint_dir: str) -> None:
    if not takes_features(config):  # a UNet on the raw alone
        if model.config.in_channels != 1:
            raise ValueError(f"the model in {checkpoint_dir} takes no features but has {model.config.in_channels} "
                             "input channels (expected 1: the raw)")
        return
    extra = 1 if takes_raw(config) else 0
    if feature_channels + extra != model.config.in_channels:
        raw_note = " (+1 raw channel: the model has input_raw)" if extra else ""
        raise ValueError(
            f"features {where} have {feature_channels} channels{raw_note} but the model in {checkpoint_dir} "
            f"expects {model.config.in_channels - extra}"
        )


def _check_signature(features_sig: Mapping[str, Any] | None, config: Mapping[str, Any], where: str,
                     checkpoint_dir: str) -> None:
    model_sig = config.get("feature_signature")
    if features_sig is not None and model_sig is not None:
        check_compatible(features_sig, model_sig, where, f"the training features of {checkpoint_dir}")
    elif features_sig is not None or model_sig is not None:
        logger.warning("cannot check that features %s match model %s: only one records a signature",
                       where, checkpoint_dir)


class BlockLayout(NamedTuple):
    """How a volume is cut into blocks and what the prediction store holds (from the model).

    Attributes:
        shape: The label grid (z, y, x), voxels.
        block: Core block shape (z, y, x), voxels: multiples of ``2**levels``, capped at the
            rounded-up volume shape.
        halo: Context (voxels) read around every block on every side.
        chunks: Output chunk shape (z, y, x): the block, capped at the volume.
        num_blocks: Blocks tiling the volume.
        semantic: A class model (writes ``classes``) rather than affinities.
        head: Channels of the first output image (offsets, or classes).
        lsds: Whether ``lsds`` is written.
        offsets: The affinity offsets (voxels, z, y, x).
        class_attrs: ``class_names``, ``instance_classes`` (and ``classes_overlap``) of a
            class model, else empty.
        shards: Spatial shard shape (z, y, x voxels, whole blocks) of a sharded Zarr v3
            output, or None (Zarr v2, one chunk file per block and image).
        overlap: A class model with overlapping classes (one sigmoid per class).
    """

    shape: tuple[int, ...]
    block: tuple[int, ...]
    halo: int
    chunks: tuple[int, ...]
    num_blocks: int
    semantic: bool
    head: int
    lsds: bool
    offsets: list[Any]
    class_attrs: dict[str, Any]
    shards: tuple[int, ...] | None = None
    overlap: bool = False

    @property
    def images(self) -> list[tuple[str, int]]:
        """(name, channels) of every image of the store, in the order they are written."""
        first = ("classes" if self.semantic else "affinities", self.head)
        return [first, *([("lsds", NUM_LSD_CHANNELS)] if self.lsds else [])]

    @property
    def nbytes(self) -> int:
        """Bytes of the predictions uncompressed (float32)."""
        return sum(c for _, c in self.images) * math.prod(self.shape) * 4


def block_layout(model: UNet3D, config: Mapping[str, Any], shape: Sequence[int],
                 block_shape: Sequence[int], shard_shape: int | None = None) -> BlockLayout:
    """The block grid and output images of a prediction of ``shape`` (z, y, x voxels) with
    ``model`` (its ``config`` from :func:`load_model`) in blocks of ``block_shape`` voxels
    (``shard_shape``: see :func:`predict_blocks`)."""
    offsets = config["offsets"]
    semantic = config.get("target", "affinities") == "semantic"
    lsds = not semantic and model.config.out_channels == len(offsets) + NUM_LSD_CHANNELS
    divisor = model.config.divisor
    halo = _round_up(receptive_field_halo(model.config), divisor)
    shape = tuple(int(s) for s in shape)
    block = tuple(
        min(_round_up(int(b), divisor), _round_up(s, divisor)) for b, s in zip(block_shape, shape, strict=True)
    )
    if block != tuple(block_shape):
        logger.info("block shape %s adjusted to %s (multiples of %d, at most the volume)", block_shape, block, divisor)
    chunks = tuple(min(b, s) for b, s in zip(block, shape, strict=True))
    shards = round_shard_shape(shape, chunks, shard_shape, channel_axis=False, key="predict.shard_shape")
    overlap = semantic and bool(config.get("classes_overlap", False))  # one sigmoid per class
    class_attrs = {k: config.get(k) for k in ("class_names", "instance_classes")} if semantic else {}
    if overlap:
        class_attrs["classes_overlap"] = True
    return BlockLayout(
        shape=shape, block=block, halo=halo, chunks=chunks,
        num_blocks=math.prod(-(-s // b) for s, b in zip(shape, block, strict=True)), semantic=semantic,
        head=model.config.out_channels if semantic else len(offsets), lsds=lsds, offsets=offsets,
        class_attrs=class_attrs, shards=None if shards is None else tuple(shards), overlap=overlap,
    )


def create_outputs(path: Path, layout: BlockLayout, grid: Geometry) -> list[Any]:
    """Create the empty prediction store at ``path`` (a new folder: write it under
    :func:`atomic_output`; Zarr v3 when sharded); return its writable arrays in the order of
    ``layout.images``."""
    zarr.open_group(str(path), mode="w", zarr_format=2 if layout.shards is None else 3)
    image_attrs = {"classes": layout.class_attrs, "affinities": {"offsets": layout.offsets}, "lsds": {}}
    return [_empty_image(path / name, channels, grid, layout.chunks, image_attrs[name], layout.shards)
            for name, channels in layout.images]


def output_attrs(layout: BlockLayout, config: Mapping[str, Any], precision: str, timings: Mapping[str, float],
                 attrs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The prediction store's root ``dinopipe`` attrs (JSON-ready; see the module docstring)."""
    return json.loads(json.dumps({
        **({"target": "semantic", **layout.class_attrs} if layout.semantic else {}),
        "offsets": layout.offsets,
        "lsds": layout.lsds,
        "input_raw": takes_raw(config),
        "block_shape": list(layout.block),
        "halo": layout.halo,
        "precision": precision,
        "feature_signature": config.get("feature_signature"),
        "timings": dict(timings),
        **(attrs or {}),
    }, default=str))


def predict_into(
    readers: Sequence[Any],
    layout: BlockLayout,
    model: UNet3D,
    outputs: Sequence[Any],
    starts: Sequence[Sequence[int]] | None = None,
    *,
    device: torch.device,
    mode: str,
    batch_size: int = 1,
    label: str = "predict",
) -> dict[str, Any]:
    """Predict blocks and write their cores into existing arrays: the loop of
    :func:`predict_blocks`, also run by one job of a distributed prediction
    (:mod:`dinopipe.distributed`).

    Each block's output depends only on its own input window and on how the blocks are
    batched: with ``batch_size`` 1, or batches made of the same blocks, a block computed
    here equals the same block computed in a whole-volume run (bitwise on CPU).

    Args:
        readers: As for :func:`predict_blocks`.
        layout: From :func:`block_layout`.
        model: The network (moved to ``device`` by the caller).
        outputs: Writable arrays (C, z, y, x) on the layout's grid, in the order of
            ``layout.images`` (each written through a :class:`dinopipe.io.ShardWriter`: a
            sharded array's shards are written whole, so ``starts`` must cover whole shards).
        starts: Block starts (z, y, x voxels, multiples of ``layout.block``), in the order
            predicted; None: every block, shard by shard (:func:`dinopipe.io.shard_major`).
        device, mode: Torch device and autocast mode (:func:`dinopipe.runtime.autocast_mode`).
        batch_size: Blocks per forward pass.
        label: Name for progress messages.

    Returns:
        Seconds: ``read_s``, ``wait_s``, ``forward_s``, ``write_s`` (see :func:`predict_blocks`).
    """
    shape, block, halo = layout.shape, layout.block, layout.halo
    count = layout.num_blocks if starts is None else len(starts)
    stats = {"read_s": 0.0, "wait_s": 0.0, "forward_s": 0.0, "write_s": 0.0}
    if count == 0:
        return stats
    num_offsets = len(layout.offsets)
    if starts is None:
        starts = shard_major(list(_block_starts(shape, block)), layout.shards)
    writers = [ShardWriter(array) for array in outputs]
    stager = _BlockStager(readers, shape, block, halo, min(batch_size, count), device, starts=starts)
    with stager, Progress(count, label, "block") as progress:
        for batch_starts in stager:  # read by the stager's thread while the network ran on the batch before
            t1 = time.perf_counter()
            x = stager.to_device()
            with torch.no_grad(), autocast_context(device, mode):
                output = model(x)
            del x
            if layout.overlap:
                aff, lsd = torch.sigmoid(output.float()).cpu().numpy(), None
            elif layout.semantic:
                aff, lsd = torch.softmax(output.float(), dim=1).cpu().numpy(), None
            else:
                aff_logits, lsd = split_output(output.float(), num_offsets)
                aff = torch.sigmoid(aff_logits).cpu().numpy()
                del aff_logits
            lsd_np = lsd.cpu().numpy() if lsd is not None else None
            del output, lsd
            t2 = time.perf_counter()
            for i, start in enumerate(batch_starts):
                core = [min(b, s - st) for b, s, st in zip(block, shape, start, strict=True)]
                src = (slice(None), *(slice(halo, halo + c) for c in core))
                dst = (slice(None), *(slice(st, st + c) for st, c in zip(start, core, strict=True)))
                writers[0][dst] = aff[i][src]
                if len(writers) > 1 and lsd_np is not None:
                    writers[1][dst] = lsd_np[i][src]
            del aff, lsd_np
            if device.type == "cpu":  # the network's intermediates are host memory
                release_freed_memory()
            t3 = time.perf_counter()
            stats["forward_s"] += t2 - t1
            stats["write_s"] += t3 - t2
            progress.update(len(batch_starts))
        t3 = time.perf_counter()
        for writer in writers:
            writer.flush()  # nothing left when blocks came shard by shard
        stats["write_s"] += time.perf_counter() - t3
    stats["read_s"], stats["wait_s"] = stager.read_s, stager.wait_s
    return stats


def predict_blocks(
    readers: Sequence[Any],
    grid: Geometry,
    model: UNet3D,
    config: Mapping[str, Any],
    out_path: str | os.PathLike[str],
    *,
    block_shape: Sequence[int] = (32, 64, 64),
    device: str = "auto",
    batch_size: int = 1,
    autocast: bool | str = "bf16",
    attrs: Mapping[str, Any] | None = None,
    shard_shape: int | None = None,
) -> dict[str, Any]:
    """Predict affinities (and LSDs), or class probabilities, on ``grid`` block by block; write the
    output store atomically (see the module docstring for its layout).

    Args:
        readers: Objects with ``channels``, ``dtype`` and ``read_into(window, out)`` filling
            ``out`` (C, z, y, x; a strided view of a channel-fastest buffer) for in-volume
            windows of ``grid`` (see :class:`FeatureReader`); called from a background
            thread; their channels are concatenated in order.
        grid: The label grid (shape, voxel size and translation of the outputs).
        model, config: From :func:`load_model`.
        out_path: Output store.
        block_shape: Core block shape (z, y, x) in label voxels; rounded up to multiples
            of ``2**levels`` and capped at the (rounded-up) volume shape. Also the
            output chunk shape.
        device: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N".
        batch_size: Blocks per forward pass.
        autocast: Mixed precision on CUDA (:data:`dinopipe.runtime.AUTOCAST`); CPU always runs
            float32. Recorded as ``precision`` in the output's attrs.
        attrs: Extra provenance stored in the root attrs.
        shard_shape: Spatial shard edge (voxels) of a sharded Zarr v3 / OME-NGFF 0.5 output,
            rounded up to whole blocks (:func:`dinopipe.io.shard_shape`); the blocks are then
            predicted shard by shard and each shard is written once. None: Zarr v2, one file
            per block. The values are the same either way.

    Returns:
        Statistics: ``blocks``, ``block_shape``, ``halo`` and seconds: reading and
        staging inputs (``read_s``, in a background thread while the network runs),
        the network waiting for its input (``wait_s``), in the network including the
        input's copy to the device (``forward_s``), writing (``write_s``) and in total
        (``total_s``).
    """
    _check_block_args(block_shape, batch_size)
    t_start = time.perf_counter()
    layout = block_layout(model, config, grid.shape, block_shape, shard_shape)
    dev = resolve_device(device, "predict.device")
    mode = autocast_mode(autocast, "predict.autocast")  # an unknown mode fails before any block
    precision = mode if dev.type == "cuda" else "none"
    model.to(dev)
    logger.info("predicting %s: %d blocks of %s + halo %d, device %s", layout.shape, layout.num_blocks, layout.block,
                layout.halo, dev)
    stats: dict[str, Any] = {"blocks": layout.num_blocks, "block_shape": list(layout.block), "halo": layout.halo}
    with atomic_output(out_path, what=f"predictions {Path(out_path).name}", expected_bytes=layout.nbytes) as tmp:
        outputs = create_outputs(tmp, layout, grid)
        stats.update(predict_into(readers, layout, model, outputs, device=dev, mode=mode, batch_size=batch_size,
                                  label=f"predict {Path(out_path).name}"))
        stats["total_s"] = time.perf_counter() - t_start
        timings = {k: stats[k] for k in ("read_s", "wait_s", "forward_s", "write_s", "total_s")}
        zarr.open_group(str(tmp), mode="r+").attrs["dinopipe"] = output_attrs(layout, config, precision, timings, attrs)
    logger.info("wrote %s: %d blocks, read %.1fs (the network waited %.1fs for it), network %.1fs, write %.1fs, "
                "total %.1fs", out_path, layout.num_blocks, stats["read_s"], stats["wait_s"], stats["forward_s"],
                stats["write_s"], stats["total_s"])
    return stats


def _raw_reader_for(volume: Any, data: Mapping[str, Any] | None, grid: Geometry, checkpoint_dir: str,
                    known: Mapping[str, Any] | None = None) -> RawOnGridReader:
    """The raw channel of an ``input_raw`` model, on ``grid`` (the features' grid, nm).

    A sheet row with labels must give exactly that grid (its output grid); a raw-only volume
    (``dinopipe predict --features F --raw R``) must cover it. ``known``: see
    :func:`feature_inputs`.
    """
    if volume is None:
        raise ValueError(
            f"the model in {checkpoint_dir} takes the raw image as an extra input channel (input_raw): "
            "pass the volume (its sheet row; on the command line --raw beside --features) so the raw can be read"
        )
    src = open_sources(volume, **source_args(data), check_data=known is None)
    if volume.labels and (src.grid.shape != grid.shape or not np.allclose(src.grid.translation, grid.translation)
                          or not np.allclose(src.grid.voxel_size, grid.voxel_size)):
        raise ValueError(
            f"volume {volume.name!r}: its output grid {src.grid} differs from the features' grid {grid}"
        )
    raw_geom = src.raw.geometry
    tol = 1e-6 * np.asarray(grid.voxel_size)
    if np.any(grid.begin_nm < raw_geom.begin_nm - tol) or np.any(grid.end_nm > raw_geom.end_nm + tol):
        raise ValueError(
            f"volume {volume.name!r}: raw {volume.raw} covers {raw_geom.begin_nm.tolist()}–{raw_geom.end_nm.tolist()} "
            f"nm (z, y, x) but the features' grid spans {grid.begin_nm.tolist()}–{grid.end_nm.tolist()} nm: "
            "the raw channel must come from the raw the features were computed from"
        )
    return RawOnGridReader(src.raw.array, raw_geom, grid, intensity=(known or {}).get("raw_intensity"))


class PredictionInputs(NamedTuple):
    """Everything a prediction reads: the readers of its network input, the label grid, the
    model, and provenance for the output's attrs (see :func:`feature_inputs`, :func:`raw_inputs`).

    ``known`` holds what was measured over the whole volume (intensity ranges) so that the
    jobs of a distributed prediction (:mod:`dinopipe.distributed`) need not measure it again.
    """

    readers: list[Any]
    grid: Geometry
    model: UNet3D
    config: dict[str, Any]
    attrs: dict[str, Any]
    known: dict[str, Any]


def feature_inputs(
    features_path: str | os.PathLike[str],
    checkpoint_dir: str | os.PathLike[str],
    *,
    volume: Any = None,
    data: Mapping[str, Any] | None = None,
    known: Mapping[str, Any] | None = None,
) -> PredictionInputs:
    """The inputs of a prediction from cached features (see :func:`predict_volume`).

    Args:
        features_path, checkpoint_dir, volume, data: As for :func:`predict_volume`.
        known: The ``known`` of an earlier call on the same volume: skips the passes over
            the whole volume (checks of the raw, its intensity range) that call made.

    Raises:
        ValueError: The features' channel count differs from the model's, or signatures differ.
    """
    features_path, checkpoint_dir = str(features_path), str(checkpoint_dir)
    model, config = load_model(checkpoint_dir)
    features = read_image(features_path)
    if not features.channel_axis:
        raise ValueError(f"features {features_path} must be (C, z, y, x), got shape {features.array.shape}")
    _check_channels(model, config, int(features.array.shape[0]), features_path, checkpoint_dir)
    _check_signature((features.attrs or {}).get("signature"), config, features_path, checkpoint_dir)
    readers: list[Any] = [FeatureReader(features)] if takes_features(config) else []
    found: dict[str, Any] = {}
    if takes_raw(config):
        raw_reader = _raw_reader_for(volume, data, features.geometry, checkpoint_dir, known)
        readers.append(raw_reader)
        found["raw_intensity"] = [raw_reader.lo, raw_reader.hi]
    return PredictionInputs(readers, features.geometry, model, config,
                            {"source": "features", "features": features_path, "checkpoint": checkpoint_dir}, found)


def raw_inputs(
    volume: Any,
    checkpoint_dir: str | os.PathLike[str],
    features: Mapping[str, Any],
    data: Mapping[str, Any] | None = None,
    feature_halo: int | None = None,
    *,
    known: Mapping[str, Any] | None = None,
) -> PredictionInputs:
    """The inputs of a prediction end to end from raw (see :func:`predict_from_raw`).

    Args:
        volume, checkpoint_dir, features, data, feature_halo: As for :func:`predict_from_raw`.
        known: As for :func:`feature_inputs`.
    """
    checkpoint_dir = str(checkpoint_dir)
    model, config = load_model(checkpoint_dir)
    params = FeatureParams.from_config(features)
    src = open_sources(volume, **source_args(data), check_data=known is None)
    known = known or {}
    provenance = {"source": "raw", "volume": volume.name, "raw": volume.raw, "checkpoint": checkpoint_dir}
    if not takes_features(config):  # a UNet on the raw alone: no backbone needed
        reader = RawOnGridReader(src.raw.array, src.raw.geometry, src.grid, intensity=known.get("raw_intensity"))
        return PredictionInputs([reader], src.grid, model, config, provenance,
                                {"raw_intensity": [reader.lo, reader.hi]})
    backbone = load_backbone(params.backbone, params.revision, seed=params.seed, device=params.device)
    where = f"volume {volume.name!r} (features from raw with {params.backbone})"
    _check_channels(model, config, int(backbone.channels), where, checkpoint_dir)
    intensity = (tuple(known["intensity"]) if "intensity" in known
                 else intensity_range(src.raw.array, params.intensity, params.low, params.high))
    sig = signature(backbone, params, src.raw.geometry, src.grid, intensity, {})
    _check_signature(sig, config, where, checkpoint_dir)
    upsampler = load_upsampler(params.upsampler, backbone.device) if params.upsampler else None
    halo = params.block_halo if feature_halo is None else int(feature_halo)
    readers: list[Any] = [RawFeatureReader(
        src.raw.array, src.raw.geometry, src.grid, backbone, params, halo=halo, intensity=intensity,
        volume=volume.name, upsampler=upsampler,
    )]
    found: dict[str, Any] = {"intensity": list(intensity)}
    if takes_raw(config):
        readers.append(RawOnGridReader(src.raw.array, src.raw.geometry, src.grid,
                                       intensity=known.get("raw_intensity")))
        found["raw_intensity"] = [readers[-1].lo, readers[-1].hi]
    return PredictionInputs(readers, src.grid, model, config,
                            {**provenance, "feature_halo": halo, "computed_feature_signature": sig}, found)


def predict_volume(
    features_path: str | os.PathLike[str],
    checkpoint_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    block_shape: Sequence[int] = (32, 64, 64),
    device: str = "auto",
    batch_size: int = 1,
    autocast: bool | str = "bf16",
    *,
    volume: Any = None,
    data: Mapping[str, Any] | None = None,
    shard_shape: int | None = None,
) -> dict[str, Any]:
    """Predict affinities (and LSDs) for a whole cached feature volume, block by block.

    Args:
        features_path: Feature image (C, z, y, x), e.g. ``results/features/{volume}.zarr``.
        checkpoint_dir: Training output folder (``model_config.json`` + ``checkpoint.pt``).
        out_path: Output store, e.g. ``results/predictions/{volume}.zarr``.
        block_shape, device, batch_size, autocast, shard_shape: See :func:`predict_blocks`.
        volume: The volume's sheet row (:class:`dinopipe.sheet.Volume`); needed only for
            models with ``input_raw``, to read the raw.
        data: The ``data`` config section (scale choice) for reading that raw.

    Returns:
        The statistics of :func:`predict_blocks`.

    Raises:
        ValueError: The features' channel count differs from the model's, signatures
            differ, or a bad ``block_shape`` / ``batch_size``.
    """
    _check_block_args(block_shape, batch_size)
    inputs = feature_inputs(features_path, checkpoint_dir, volume=volume, data=data)
    return predict_blocks(
        inputs.readers, inputs.grid, inputs.model, inputs.config, out_path, block_shape=block_shape, device=device,
        batch_size=batch_size, autocast=autocast, attrs=inputs.attrs, shard_shape=shard_shape,
    )


def predict_from_raw(
    volume: Any,
    checkpoint_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    features: Mapping[str, Any],
    data: Mapping[str, Any] | None = None,
    block_shape: Sequence[int] = (32, 64, 64),
    device: str = "auto",
    batch_size: int = 1,
    autocast: bool | str = "bf16",
    feature_halo: int | None = None,
    shard_shape: int | None = None,
) -> dict[str, Any]:
    """Predict end to end from raw: features are computed per block (with their own halo), never cached.

    Args:
        volume: The sheet row (:class:`dinopipe.sheet.Volume`).
        checkpoint_dir: Training output folder.
        out_path: Output store.
        features: The ``features`` config section (must match the model's training features).
        data: The ``data`` config section (scale choice, output grid).
        block_shape, device, batch_size, autocast, shard_shape: See :func:`predict_blocks`.
        feature_halo: Backbone context in label voxels around each block + UNet halo;
            default ``features.block_halo``.

    Returns:
        The statistics of :func:`predict_blocks`.
    """
    _check_block_args(block_shape, batch_size)
    inputs = raw_inputs(volume, checkpoint_dir, features, data, feature_halo)
    return predict_blocks(
        inputs.readers, inputs.grid, inputs.model, inputs.config, out_path, block_shape=block_shape, device=device,
        batch_size=batch_size, autocast=autocast, attrs=inputs.attrs, shard_shape=shard_shape,
    )
