"""OME-NGFF images: the writer (one scale ``s0``; 0.4 on Zarr v2, or 0.5 on sharded Zarr v3)
and the reader.

Every image dinopipe writes is an OME-NGFF multiscale group holding one scale, ``s0``,
so napari (napari-ome-zarr) and neuroglancer open it directly with the right voxel
size and offset. Unsharded images are OME-NGFF 0.4 on Zarr v2, one file per chunk; with
``shards`` they are OME-NGFF 0.5 on Zarr v3 with the sharding codec: many chunks in one
file (``docs/storage.md``). Every reader here reads both layouts. A store with several images (the training targets) is a plain group of
such image groups. Axis order is (z, y, x), with channels (c, z, y, x); ``voxel_size`` in
nm; ``translation`` is the centre of voxel (0, 0, 0) in nm (:class:`dinopipe.geometry.Geometry`).
Local arrays are read memory-mapped through tensorstore (:func:`open_tensorstore`).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts
import zarr
from numcodecs import Blosc
from zarr.codecs import BloscCodec, TransposeCodec

from dinopipe.atomic import json_default
from dinopipe.geometry import Geometry

logger = logging.getLogger(__name__)


# Snakemake marks directory outputs with a `.snakemake_timestamp` file, which zarr
# reports as an unknown object whenever the group is listed.
warnings.filterwarnings("ignore", message=r".*\.snakemake_timestamp.*")

SPATIAL_AXES = ("z", "y", "x")
_COMPRESSOR = Blosc(cname="zstd", clevel=3, shuffle=Blosc.BITSHUFFLE)
#: The same compression as a Zarr v3 codec (sharded images compress each inner chunk).
_COMPRESSOR_V3 = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")

#: Spatial chunk edge (voxels) of feature stores, which are stored uncompressed with all
#: channels in a chunk: the training loader reads random crops of every channel, zstd
#: saves only ~6 % on float16 features, and 32^3 chunks read 3.6x faster than zstd 64^3
#: ones in benchmarks/loader.py (less read amplification, no decompression). 16^3
#: (3 MB chunks of 384 channels) read random 64^3 crops ~1.7x faster again than 32^3 with
#: channel-fastest chunks (0.59-0.62 vs 0.30-0.36 of raw-file speed in two runs): a crop
#: at a voxel-aligned start touches ~2x its bytes in 16^3 chunks, ~3.4x in 32^3 ones.
#: The price is 8x more chunk files (262,144 for a 1024^3 volume).
FEATURE_CHUNK = 16
#: Element order inside feature chunks. ``"F"`` (zarr v2 ``order``) stores the channel axis
#: fastest, so a crop of all channels is a few long runs per chunk instead of short x
#: rows: the loader copies it into an F-ordered buffer at near page-cache speed (~5x the
#: C-order rate in benchmarks/loader.py). Readers (zarr, tensorstore, neuroglancer, napari)
#: honour the ``order`` key; :func:`read_image` callers see ordinary (c, z, y, x) arrays.
FEATURE_ORDER = "F"

#: OME-NGFF version of sharded images (Zarr v3); unsharded images are 0.4 on Zarr v2.
SHARDED_NGFF_VERSION = "0.5"


@dataclass
class Image:
    """An image read from disk, lazily.

    Attributes:
        array: The array (a zarr array or an in-memory numpy array); channels first
            when ``channel_axis`` is True.
        geometry: Spatial geometry of the last three axes.
        path: Where it came from (for error messages and provenance).
        scale: The multiscale dataset path chosen inside the group ("s0", ...), or None
            for a plain array.
        attrs: The group's attributes (for dinopipe's own metadata).
        format: "ome-ngff 0.4", "ome-ngff 0.5", "zarr", "zarr3", "n5" or "hdf5".
    """

    array: Any
    geometry: Geometry
    path: str
    scale: str | None = None
    attrs: Mapping[str, Any] | None = None
    format: str = "ome-ngff 0.4"

    @property
    def channel_axis(self) -> bool:
        return len(self.array.shape) == 4

    def read(self) -> np.ndarray:
        """Load the whole array into memory."""
        return np.asarray(self.array[...])

def _multiscales(
    name: str, voxel_size: Sequence[float], translation: Sequence[float], channel_axis: bool,
    version: str | None = "0.4",
) -> list[dict[str, Any]]:
    """The ``multiscales`` list of one image; ``version`` None leaves the per-entry version
    out (OME-NGFF 0.5 keeps it under ``ome``)."""
    axes = [{"name": a, "type": "space", "unit": "nanometer"} for a in SPATIAL_AXES]
    scale = [float(v) for v in voxel_size]
    trans = [float(t) for t in translation]
    if channel_axis:
        axes = [{"name": "c", "type": "channel"}, *axes]
        scale = [1.0, *scale]
        trans = [0.0, *trans]
    return [
        {
            **({"version": version} if version else {}),
            "name": name,
            "axes": axes,
            "datasets": [
                {
                    "path": "s0",
                    "coordinateTransformations": [
                        {"type": "scale", "scale": scale},
                        {"type": "translation", "translation": trans},
                    ],
                }
            ],
        }
    ]


def default_chunks(shape: Sequence[int], channel_axis: bool, spatial: int = 64) -> tuple[int, ...]:
    """Chunk shape: all channels in one chunk, ``spatial`` voxels per spatial axis."""
    spatial_shape = shape[1:] if channel_axis else shape
    chunks = tuple(min(int(s), spatial) for s in spatial_shape)
    return (int(shape[0]), *chunks) if channel_axis else chunks


def shard_shape(
    shape: Sequence[int], chunks: Sequence[int], edge: int | None, channel_axis: bool, key: str = "shards"
) -> tuple[int, ...] | None:
    """Shard shape of a sharded image: ``edge`` voxels per spatial axis, rounded up to a
    whole number of chunks and capped at the chunks covering the array; all channels of
    the chunk (the channel axis whole) when ``channel_axis``.

    Args:
        shape: Array shape, (z, y, x) or (c, z, y, x).
        chunks: Chunk shape (the inner chunks of a shard), same axes.
        edge: Spatial shard edge in voxels; None: unsharded (returns None).
        channel_axis: Whether the first axis is channels.
        key: Where ``edge`` came from, for errors (a config key such as ``features.shard_shape``).

    Raises:
        ValueError: ``edge`` is not a positive integer (names ``key``).
    """
    if edge is None:
        return None
    if isinstance(edge, bool) or not isinstance(edge, int | np.integer) or edge < 1:
        raise ValueError(f"{key} must be a positive integer (spatial shard edge in voxels) or null, got {edge!r}")
    spatial = slice(1, None) if channel_axis else slice(None)
    out = tuple(
        min(-(-int(edge) // int(c)) * int(c), -(-int(s) // int(c)) * int(c))
        for s, c in zip(shape[spatial], chunks[spatial], strict=True)
    )
    return (int(chunks[0]), *out) if channel_axis else out


def _transpose_codecs(order: str, ndim: int) -> list[Any]:
    """Zarr v3 array-to-array codecs storing a chunk's elements in ``order`` (``"F"``: the
    transpose codec with all axes reversed, byte for byte the Zarr v2 ``order: F`` layout)."""
    return [TransposeCodec(order=tuple(range(ndim - 1, -1, -1)))] if order == "F" else []


def create_image(
    path: str | os.PathLike[str],
    shape: Sequence[int],
    dtype: Any,
    voxel_size: Sequence[float],
    translation: Sequence[float],
    *,
    channel_axis: bool = False,
    chunks: Sequence[int] | None = None,
    attrs: Mapping[str, Any] | None = None,
    name: str | None = None,
    compress: bool = True,
    order: str = "C",
    shards: Sequence[int] | None = None,
) -> Any:
    """Create an empty OME-NGFF image group with a single scale ``s0``; return ``s0``.

    Unsharded (``shards`` None): OME-NGFF 0.4 on Zarr v2, one file per chunk. Sharded:
    OME-NGFF 0.5 on Zarr v3, the ``sharding_indexed`` codec storing every shard (a whole
    number of chunks) in one file with an index of its chunks; same values, geometry and
    attributes, far fewer files (``docs/storage.md``). Write sharded arrays in whole
    shards where possible: a partial write reads and rewrites the shard's file.

    This writes in place: wrap it in :func:`atomic_output` (on the whole store) to
    make the output appear atomically.

    Args:
        path: Group path to create (must not exist).
        shape: (z, y, x), or (c, z, y, x) when ``channel_axis``.
        dtype: Array dtype.
        voxel_size: nm per voxel, (z, y, x).
        translation: Centre of voxel 0 in nm, (z, y, x).
        channel_axis: Whether the first axis is channels.
        chunks: Chunk shape; default from :func:`default_chunks`.
        attrs: Extra attributes stored under the group's ``"dinopipe"`` key.
        name: Image name stored in the multiscales metadata (default: folder name).
        compress: Blosc-zstd compression (True) or raw chunks (False).
        order: Element order inside each chunk, ``"C"`` or ``"F"`` (zarr v2 ``order``; see
            :data:`FEATURE_ORDER`; on Zarr v3 a transpose codec). The array's axes are
            (c, z, y, x) either way.
        shards: Shard shape, same axes as ``shape``, a multiple of the chunk shape
            (:func:`shard_shape`); None: unsharded.

    Returns:
        The writable zarr array ``s0`` (filled with zeros until written).
    """
    ndim = 4 if channel_axis else 3
    if order not in ("C", "F"):
        raise ValueError(f"{path}: chunk order must be 'C' or 'F', got {order!r}")
    chunk_shape = tuple(int(c) for c in chunks) if chunks else default_chunks(shape, channel_axis)
    if shards is not None:
        shards = tuple(int(s) for s in shards)
        if len(shards) != len(chunk_shape) or any(s < 1 or s % c for s, c in zip(shards, chunk_shape)):
            raise ValueError(f"{path}: shard shape {shards} must be a whole number of chunks {chunk_shape} per axis")
    if len(shape) != ndim:
        raise ValueError(f"{path}: expected a {ndim}D array, got shape {tuple(shape)}")
    if len(voxel_size) != 3 or len(translation) != 3:
        raise ValueError(f"{path}: voxel_size and translation need 3 values (z, y, x)")
    path = Path(path)
    extra = {"dinopipe": json.loads(json.dumps(dict(attrs), default=json_default))} if attrs else {}
    if shards is not None:
        group = zarr.open_group(str(path), mode="w-", zarr_format=3)
        group.attrs.update({"ome": {"version": SHARDED_NGFF_VERSION, "multiscales": _multiscales(
            name or path.name, voxel_size, translation, channel_axis, version=None)}, **extra})
        return group.create_array(
            "s0",
            shape=tuple(int(s) for s in shape),
            dtype=dtype,
            chunks=chunk_shape,
            shards=shards,
            filters=_transpose_codecs(order, ndim),
            compressors=_COMPRESSOR_V3 if compress else None,
            fill_value=0,
            dimension_names=(["c"] if channel_axis else []) + list(SPATIAL_AXES),
            config={"write_empty_chunks": True},
        )
    group = zarr.open_group(str(path), mode="w-", zarr_format=2)
    group.attrs.update({"multiscales": _multiscales(name or path.name, voxel_size, translation, channel_axis),
                        **extra})
    return group.create_array(
        "s0",
        shape=tuple(int(s) for s in shape),
        dtype=dtype,
        chunks=chunk_shape,
        compressors=_COMPRESSOR if compress else None,
        chunk_key_encoding={"name": "v2", "separator": "/"},
        fill_value=0,
        order=order,
        # every chunk stored, even all-zero ones: a missing chunk then always means an
        # incomplete store (see count_chunks)
        config={"write_empty_chunks": True},
    )


def write_image(
    path: str | os.PathLike[str],
    data: np.ndarray,
    voxel_size: Sequence[float],
    translation: Sequence[float],
    *,
    channel_axis: bool = False,
    chunks: Sequence[int] | None = None,
    attrs: Mapping[str, Any] | None = None,
    name: str | None = None,
    compress: bool = True,
    order: str = "C",
    shards: Sequence[int] | None = None,
) -> None:
    """Write one array as an OME-NGFF image group (see :func:`create_image`; sharded
    OME-NGFF 0.5 with ``shards``, written whole)."""
    arr = create_image(
        path, data.shape, data.dtype, voxel_size, translation,
        channel_axis=channel_axis, chunks=chunks, attrs=attrs, name=name, compress=compress, order=order,
        shards=shards,
    )
    arr[...] = data


#: Bytes of partly written shards that :class:`ShardWriter` holds before it writes them
#: out partly (each such write reads and rewrites the shard's file).
SHARD_BUFFER_BYTES = 1 << 30


class ShardWriter:
    """Writes windows of a zarr array so that a sharded array's shards are written whole.

    A write into part of a shard reads, decodes, re-encodes and rewrites the shard's whole
    file, so writing a shard block by block costs as many rewrites as it has blocks. This
    writer copies each window into a buffer per shard and writes a shard once all its
    voxels have arrived. Windows must tile the array without overlap (as blocks do). When
    the partly written shards exceed ``max_bytes``, the oldest are written out as far as
    they are (correct, but those shards are rewritten later): write in shard order (all
    blocks of a shard one after another, :func:`shard_major`) and this never happens.
    Unsharded arrays are written through directly. Use as a context manager: leaving it
    writes what is still buffered (on success only).

    Args:
        array: A writable zarr array (``.shards`` None when unsharded).
        max_bytes: Bound on buffered bytes before partial shards are written out.
    """

    def __init__(self, array: Any, max_bytes: int = SHARD_BUFFER_BYTES) -> None:
        self.array = array
        self.shards: tuple[int, ...] | None = tuple(array.shards) if getattr(array, "shards", None) else None
        self.max_bytes = int(max_bytes)
        self.partial_writes = 0  # shards written out before they were complete
        self._open: dict[tuple[int, ...], tuple[np.ndarray, list[tuple[slice, ...]], list[int]]] = {}

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def _shard_window(self, index: tuple[int, ...]) -> tuple[slice, ...]:
        assert self.shards is not None
        return tuple(slice(i * s, min((i + 1) * s, n)) for i, s, n in zip(index, self.shards, self.array.shape))

    def __setitem__(self, key: tuple[slice, ...], data: np.ndarray) -> None:
        """Write ``data`` into ``array[key]`` (``key``: one slice with explicit bounds per
        axis, or fewer, the rest whole)."""
        window = tuple(key) + (slice(None),) * (len(self.shape) - len(key))
        window = tuple(slice(*w.indices(n)[:2]) for w, n in zip(window, self.shape))
        if self.shards is None:
            self.array[window] = data
            return
        data = np.broadcast_to(data, tuple(w.stop - w.start for w in window))
        ranges = [range(w.start // s, -(-w.stop // s)) for w, s in zip(window, self.shards)]
        for index in itertools.product(*ranges):
            shard = self._shard_window(index)
            part = tuple(slice(max(w.start, t.start), min(w.stop, t.stop)) for w, t in zip(window, shard))
            if any(p.start >= p.stop for p in part):
                continue
            if index not in self._open:
                extent = tuple(t.stop - t.start for t in shard)
                self._open[index] = (np.zeros(extent, dtype=self.array.dtype), [], [0])
            buffer, parts, filled = self._open[index]
            local = tuple(slice(p.start - t.start, p.stop - t.start) for p, t in zip(part, shard))
            buffer[local] = data[tuple(slice(p.start - w.start, p.stop - w.start) for p, w in zip(part, window))]
            parts.append(part)
            filled[0] += math.prod(p.stop - p.start for p in part)
            if filled[0] >= buffer.size:
                self.array[shard] = buffer
                del self._open[index]
        while self._open and sum(b.nbytes for b, _, _ in self._open.values()) > self.max_bytes:
            self._write_partial(next(iter(self._open)))

    def _write_partial(self, index: tuple[int, ...]) -> None:
        """Write the parts of one buffered shard that have arrived, and forget it."""
        buffer, parts, _ = self._open.pop(index)
        shard = self._shard_window(index)
        for part in parts:
            self.array[part] = buffer[tuple(slice(p.start - t.start, p.stop - t.start) for p, t in zip(part, shard))]
        self.partial_writes += 1

    def flush(self) -> None:
        """Write every buffered shard as far as it is written."""
        for index in list(self._open):
            self._write_partial(index)
        if self.partial_writes:
            logger.info("%d shard(s) of %s were written in parts (windows not in shard order)",
                        self.partial_writes, getattr(self.array, "name", "an array"))

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.flush()


def shard_major(starts: Sequence[tuple[int, ...]], shards: Sequence[int] | None) -> list[tuple[int, ...]]:
    """Block starts (z, y, x voxels) reordered so that the blocks of each shard come one after
    another (shards in C order, blocks within a shard in their given order); unchanged when
    ``shards`` (spatial shard shape, voxels) is None."""
    starts = list(starts)
    if shards is None:
        return starts
    rank = {start: i for i, start in enumerate(starts)}
    return sorted(starts, key=lambda st: (tuple(v // s for v, s in zip(st, shards)), rank[st]))


#: Upper bound (bytes) on the cast copy :func:`write_cast` holds at once (one chunk at least).
WRITE_PIECE_BYTES = 32 * 2**20


def write_cast(
    array: Any, data: np.ndarray, start: Sequence[int] | None = None, *, max_bytes: int = WRITE_PIECE_BYTES,
) -> int:
    """Write ``data`` into ``array`` at ``start``, piece by piece, each piece cast to the array's dtype.

    Writing a float32 accumulator into a float16 store this way never holds a float16 copy
    of the whole: the pieces follow the array's chunk grid (its shard grid when it has
    ``shards``; one chunk deep along every axis
    but the last, as many chunks as fit in ``max_bytes`` along the last), so no chunk is
    written twice and at most about ``max(max_bytes, one chunk)`` bytes of cast copy exist
    at once.

    Args:
        array: A writable array with ``chunks``, ``dtype`` and ``shape`` (e.g. the zarr array
            :func:`create_image` returns), axes as stored ((c, z, y, x) for features).
        data: The values, same number of axes as ``array``, in ``array``'s axis order.
        start: Index in ``array`` (voxels, one per axis) where ``data[0, ...]`` goes;
            default the origin.
        max_bytes: Bound on the bytes of one cast piece.

    Returns:
        The number of pieces written.
    """
    start = tuple(int(v) for v in (start if start is not None else (0,) * data.ndim))
    if data.ndim != len(array.shape) or len(start) != data.ndim:
        raise ValueError(f"write_cast: data of shape {data.shape} at {start} does not match an array of shape "
                         f"{tuple(array.shape)}")
    # a sharded array's shards (rewritten whole by any partial write) are its write unit
    chunks = [int(c) for c in (getattr(array, "shards", None) or array.chunks)]
    chunk_bytes = int(np.prod(chunks)) * np.dtype(array.dtype).itemsize
    steps = [*chunks[:-1], chunks[-1] * max(1, int(max_bytes) // chunk_bytes)]
    ranges = []
    for lo, n, step in zip(start, data.shape, steps):
        edges = [lo, *range((lo // step + 1) * step, lo + n, step), lo + n]
        ranges.append([(a - lo, b - lo) for a, b in zip(edges[:-1], edges[1:]) if b > a])
    pieces = 0
    for piece in itertools.product(*ranges):
        local = tuple(slice(a, b) for a, b in piece)
        target = tuple(slice(o + a, o + b) for o, (a, b) in zip(start, piece))
        array[target] = data[local].astype(array.dtype)
        pieces += 1
    return pieces


def set_attrs(path: str | os.PathLike[str], attrs: Mapping[str, Any]) -> None:
    """Store ``attrs`` under the ``"dinopipe"`` key of the group at ``path`` (JSON-safe)."""
    group = zarr.open_group(str(path), mode="a")
    group.attrs["dinopipe"] = json.loads(json.dumps(dict(attrs), default=json_default))


#: Length units of OME-NGFF axes, in nm (a missing unit is taken as nm).
UNITS_NM = {
    None: 1.0, "": 1.0, "nanometer": 1.0, "nm": 1.0, "micrometer": 1e3, "um": 1e3, "angstrom": 0.1,
    "picometer": 1e-3, "millimeter": 1e6,
}


def _transforms(dataset: Mapping[str, Any], ndim: int, where: str) -> tuple[list[float], list[float]]:
    scale = [1.0] * ndim
    trans = [0.0] * ndim
    for t in dataset.get("coordinateTransformations", []) or []:
        if t.get("type") == "scale":
            scale = [float(v) for v in t["scale"]]
        elif t.get("type") == "translation":
            trans = [float(v) for v in t["translation"]]
    if len(scale) != ndim or len(trans) != ndim:
        raise ValueError(f"{where}: coordinate transformations do not match the array's {ndim} axes")
    return scale, trans


def ngff_multiscale(attrs: Mapping[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    """The first ``multiscales`` entry of OME-NGFF 0.4 (top level) or 0.5 (under ``ome``)
    group attributes, and the version ("0.4" or "0.5").

    Raises:
        ValueError: There is no ``multiscales`` entry.
    """
    ome = attrs.get("ome")
    if isinstance(ome, Mapping) and ome.get("multiscales"):
        return str(ome.get("version", "0.5")), dict(ome["multiscales"][0])
    if attrs.get("multiscales"):
        ms = dict(attrs["multiscales"][0])
        return str(ms.get("version", "0.4")), ms
    raise ValueError(f"{where}: no OME-NGFF 'multiscales' attribute")


def ngff_levels(multiscale: Mapping[str, Any], where: str) -> list[tuple[str, Geometry | None, tuple[float, ...]]]:
    """Every scale of a multiscale entry: (dataset path, voxel size in nm, translation in nm),
    for the last three (spatial) axes, with the multiscale-level transforms and axis
    units applied."""
    axes = multiscale.get("axes") or [{"name": a, "type": "space"} for a in SPATIAL_AXES]
    ndim = len(axes)
    spatial = [i for i, a in enumerate(axes) if (a.get("type") if isinstance(a, Mapping) else None) in ("space", None)]
    if len(spatial) != 3 or spatial != list(range(ndim - 3, ndim)):
        names = [a.get("name") if isinstance(a, Mapping) else a for a in axes]
        raise ValueError(f"{where}: expected three spatial axes (z, y, x) last, got axes {names}")
    units = []
    for i in spatial:
        unit = axes[i].get("unit") if isinstance(axes[i], Mapping) else None
        if unit not in UNITS_NM:
            raise ValueError(f"{where}: axis {axes[i].get('name')!r} has unit {unit!r}; allowed: "
                             f"{sorted(u for u in UNITS_NM if u)}")
        units.append(UNITS_NM[unit])
    outer_scale, outer_trans = _transforms(multiscale, ndim, where)
    levels = []
    for d in multiscale["datasets"]:
        sc, tr = _transforms(d, ndim, f"{where}/{d['path']}")
        vs = tuple(sc[i] * outer_scale[i] * u for i, u in zip(spatial, units))
        trans = tuple((tr[i] * outer_scale[i] + outer_trans[i]) * u for i, u in zip(spatial, units))
        levels.append((str(d["path"]), vs, trans))
    return levels  # type: ignore[return-value]


def read_image(path: str | os.PathLike[str], scale: str | None = None) -> Image:
    """Open an OME-NGFF image group written by :func:`write_image` (or any 0.4/0.5 multiscale)
    with zarr-python.

    Args:
        path: The image group.
        scale: Dataset path inside the group (default: the first, finest scale).

    Returns:
        The image with its geometry in nm.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not an OME-NGFF multiscale image, or ``scale`` is unknown.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such image: {p}")
    try:
        group = zarr.open_group(str(p), mode="r")
    except Exception as exc:  # zarr raises several types for "not a group"
        raise ValueError(f"{p}: not a Zarr group ({exc})") from exc
    attrs = dict(group.attrs)
    version, ms = ngff_multiscale(attrs, str(p))
    levels = ngff_levels(ms, str(p))
    names = [name for name, _, _ in levels]
    chosen = scale or names[0]
    if chosen not in names:
        raise ValueError(f"{p}: scale {chosen!r} not found; available: {names}")
    _, vs, trans = levels[names.index(chosen)]
    arr = group[chosen]
    geometry = Geometry(
        shape=tuple(int(s) for s in arr.shape[-3:]),  # type: ignore[arg-type]
        voxel_size=tuple(vs),  # type: ignore[arg-type]
        translation=tuple(trans),  # type: ignore[arg-type]
    )
    return Image(array=arr, geometry=geometry, path=str(p), scale=chosen, attrs=attrs.get("dinopipe", {}),
                 format=f"ome-ngff {version}")


MEMMAP_CONTEXT = {"file_io_mode": {"mode": "memmap"}}


def zarr_format_of(path: str | os.PathLike[str]) -> int:
    """2 or 3: the Zarr format of the local array or group at ``path`` (v3 has ``zarr.json``)."""
    return 3 if (Path(path) / "zarr.json").is_file() else 2


def open_tensorstore(path: str | os.PathLike[str], zarr_format: int | None = None) -> ts.TensorStore:
    """Open a local Zarr v2 or v3 array (sharded or not) read-only with tensorstore, memory-mapped.

    Args:
        path: The array folder (e.g. ``image.zarr/s0``).
        zarr_format: 2 or 3; None: from the folder (:func:`zarr_format_of`).

    Raises:
        ValueError: tensorstore cannot open it (not an array, unsupported codec, ...).
    """
    zarr_format = zarr_format or zarr_format_of(path)
    spec = {
        "driver": "zarr" if zarr_format == 2 else "zarr3",
        "kvstore": {"driver": "file", "path": str(Path(path).resolve())},
        "context": MEMMAP_CONTEXT,
    }
    return ts.open(spec, read=True).result()


def chunk_order(array: ts.TensorStore) -> str:
    """Element order inside an array's chunks, ``"C"`` or ``"F"``: Zarr v2 ``order``, or on
    Zarr v3 a transpose codec reversing all axes (inside the sharding codec when sharded)."""
    metadata = array.spec().to_json().get("metadata", {})
    if "codecs" not in metadata:
        return str(metadata.get("order", "C"))
    codecs = list(metadata["codecs"])
    if codecs and codecs[0].get("name") == "sharding_indexed":
        codecs = list(codecs[0].get("configuration", {}).get("codecs", []))
    reverse = list(range(array.rank - 1, -1, -1))
    for codec in codecs:
        if codec.get("name") == "transpose":
            return "F" if list(codec.get("configuration", {}).get("order", [])) == reverse else "C"
    return "C"


def read_into(store: ts.TensorStore, index: tuple[Any, ...], out: np.ndarray) -> Any:
    """Start copying ``store[index]`` into ``out`` (a writable numpy array or view of that
    shape, any strides: a layout matching the chunks copies in long runs); returns the
    write future."""
    source = store[index].translate_to[(0,) * store.rank]
    return ts.array(out, copy=False, write=True).write(source)
