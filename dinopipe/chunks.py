"""Stored chunks: an incomplete copy of a Zarr or N5 store reads as the fill value.

:func:`count_chunks` counts the chunk files (and, for sharded Zarr v3, the inner chunks
recorded in each shard's index) against the array's shape, without reading any data.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dinopipe.inputs import split_hdf5

logger = logging.getLogger(__name__)


#: Names of the metadata files of Zarr v2/v3 and N5 arrays and groups (not chunks).
METADATA_FILES = {".zarray", ".zattrs", ".zgroup", ".zmetadata", "zarr.json", "attributes.json"}


@dataclass(frozen=True)
class ChunkCount:
    """How many of an array's chunks are stored.

    Attributes:
        expected: Chunks in the array's chunk grid (inner chunks, for sharded Zarr v3).
        present: Chunk files (or allocated HDF5 chunks, or inner chunks a shard's index
            lists) found.
        missing: A few missing chunk keys as stored (e.g. ``"0.1.0"``, ``"c/0/1/0"``; for a
            shard, ``"c/0/1/0 inner chunk [1, 0, 1]"``), or chunk indices for HDF5; empty when
            none is missing or they were not listed.
        fill_value: What a missing chunk reads as.
    """

    expected: int
    present: int
    missing: tuple[str, ...] = ()
    fill_value: Any = 0

    @property
    def complete(self) -> bool:
        return self.present >= self.expected


def _chunk_layout(p: Path) -> tuple[list[int], list[int], str, str, Any, bool]:
    """(shape, chunk shape, separator, key prefix, fill value, reversed) of a Zarr v2/v3 or N5
    array folder, from its metadata file alone (for sharded Zarr v3 the chunk shape is the
    shard shape: the stored objects)."""
    if (p / ".zarray").is_file():
        meta = json.loads((p / ".zarray").read_text())
        return meta["shape"], meta["chunks"], meta.get("dimension_separator") or ".", "", meta.get("fill_value"), False
    if (p / "zarr.json").is_file():
        meta = json.loads((p / "zarr.json").read_text())
        encoding = meta.get("chunk_key_encoding") or {"name": "default"}
        default = encoding.get("name", "default") == "default"
        separator = (encoding.get("configuration") or {}).get("separator") or ("/" if default else ".")
        chunks = meta["chunk_grid"]["configuration"]["chunk_shape"]
        return meta["shape"], chunks, separator, "c" if default else "", meta.get("fill_value"), False
    meta = json.loads((p / "attributes.json").read_text())
    return meta["dimensions"], meta["blockSize"], "/", "", 0, True


#: A shard index entry of an inner chunk that is not stored (offset and length both 2**64 - 1).
_EMPTY_SHARD_ENTRY = 2**64 - 1


@dataclass(frozen=True)
class _ShardIndex:
    """Where a Zarr v3 shard keeps the table of its inner chunks: ``inner`` chunk shape
    (voxels, array axis order), index at the ``start`` or end of the shard file, its byte
    order and whether a 4-byte CRC32C checksum follows it."""

    inner: tuple[int, ...]
    start: bool
    byteorder: str
    checksum: bool

    def stored(self, shard: Path, per_shard: Sequence[int]) -> np.ndarray:
        """Boolean array (inner chunk grid of one shard) of the inner chunks stored in ``shard``;
        reads the index only (16 bytes per inner chunk), no chunk data."""
        n = math.prod(per_shard)
        size = 16 * n + (4 if self.checksum else 0)
        with open(shard, "rb") as f:
            if not self.start:
                f.seek(max(0, os.fstat(f.fileno()).st_size - size))
            raw = f.read(size)
        if len(raw) != size:
            raise ValueError(f"shard {shard}: {len(raw)} bytes, too short for its index of {n} inner chunks "
                             "(a truncated file?)")
        table = np.frombuffer(raw[: 16 * n], dtype=f"{self.byteorder}u8").reshape(*per_shard, 2)
        return ~((table[..., 0] == _EMPTY_SHARD_ENTRY) & (table[..., 1] == _EMPTY_SHARD_ENTRY))


def _shard_index(p: Path) -> _ShardIndex | None:
    """The shard index layout of a sharded Zarr v3 array folder, None when it is not sharded
    or its index is encoded in a way this reader does not decode (then shards are counted as
    whole objects only)."""
    if not (p / "zarr.json").is_file():
        return None
    meta = json.loads((p / "zarr.json").read_text())
    codecs = meta.get("codecs") or []
    if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        return None
    config = codecs[0].get("configuration") or {}
    index_codecs = [c.get("name") for c in config.get("index_codecs") or [{"name": "bytes"}]]
    if index_codecs not in (["bytes"], ["bytes", "crc32c"]):
        logger.debug("%s: shard index codecs %s are not decoded; counting whole shards only", p, index_codecs)
        return None
    endian = ((config.get("index_codecs") or [{}])[0].get("configuration") or {}).get("endian", "little")
    return _ShardIndex(tuple(int(c) for c in config["chunk_shape"]), config.get("index_location", "end") == "start",
                       "<" if endian == "little" else ">", index_codecs[-1] == "crc32c")


def count_chunks(path: str, scale: str | None = None, *, examples: int = 3) -> ChunkCount:
    """Count an input array's stored chunks against its chunk grid, from the file listing
    (no chunk is read): Zarr v2/v3 and N5 folders, HDF5 datasets (allocated chunks); in a
    sharded Zarr v3 array each shard's index (its table of inner chunks) is read as well.

    A chunk that is not stored reads as the fill value: legitimately so when the writer
    skipped chunks equal to it (zarr-python 3 and tensorstore do by default), wrongly when
    a copy is incomplete. Cost: one directory walk of the array folder (a 1024³ array in
    64³ chunks: 4,096 names).

    Args:
        path: As in the sheet (OME-NGFF group, plain array or ``file.h5:/dataset``).
        scale: The dataset inside an OME-NGFF group.
        examples: How many missing keys to list when some are missing.
    """
    h5 = split_hdf5(path)
    if h5 is not None:
        import h5py

        with h5py.File(h5[0], "r") as f:
            ds = f[h5[1]]
            fill = ds.fillvalue.item() if isinstance(ds.fillvalue, np.generic) else ds.fillvalue
            if ds.chunks is None:  # contiguous: one block, allocated or not
                stored = ds.id.get_storage_size() > 0 or ds.size == 0
                return ChunkCount(1, int(stored), () if stored else ("contiguous data (never written)",), fill)
            grid = [math.ceil(s / c) for s, c in zip(ds.shape, ds.chunks)]
            expected, present = math.prod(grid), int(ds.id.get_num_chunks())
            missing: list[str] = []
            if present < expected:
                stored = {tuple(int(o) // c for o, c in zip(ds.id.get_chunk_info(i).chunk_offset, ds.chunks))
                          for i in range(present)}
                for index in itertools.product(*(range(g) for g in grid)):
                    if index not in stored:
                        missing.append(str(list(index)))
                        if len(missing) >= examples:
                            break
            return ChunkCount(expected, present, tuple(missing), fill)
    p = Path(path) / scale if scale else Path(path)
    shape, chunks, separator, prefix, fill, reverse = _chunk_layout(p)
    grid = [math.ceil(int(s) / int(c)) if int(c) > 0 else 0 for s, c in zip(shape, chunks)]
    expected = math.prod(grid) if grid else 1

    def key_of(index: tuple[int, ...]) -> str:
        key = separator.join(str(i) for i in (reversed(index) if reverse else index))
        return f"{prefix}{separator}{key}" if prefix else key

    def stored_files() -> Iterator[tuple[tuple[int, ...], str]]:
        """(grid index in the order stored, file path) of every chunk file."""
        for root, _, files in os.walk(p):
            rel_root = os.path.relpath(root, p)
            for name in files:
                if name in METADATA_FILES or name.startswith("."):
                    continue
                rel = name if rel_root == "." else f"{rel_root}/{name}"
                parts = rel.replace(os.sep, "/").split("/") if separator == "/" else rel.split(separator)
                if prefix:
                    if parts[0] != prefix:
                        continue
                    parts = parts[1:]
                if len(parts) == len(grid) and all(q.isdigit() for q in parts):
                    index = tuple(int(q) for q in (reversed(parts) if reverse else parts))
                    if all(i < g for i, g in zip(index, grid[::-1] if reverse else grid)):
                        yield index, os.path.join(root, name)

    stored = dict(stored_files())
    sharding = _shard_index(p)
    if sharding is not None:
        return _count_inner_chunks(sharding, [int(s) for s in shape], [int(c) for c in chunks], grid, stored,
                                   key_of, examples, fill)
    present = len(stored)
    missing = []
    if present < expected:
        dims = grid[::-1] if reverse else grid
        for index in itertools.product(*(range(g) for g in dims)):
            if index not in stored:
                missing.append(key_of(index))
                if len(missing) >= examples:
                    break
    return ChunkCount(expected, present, tuple(missing), fill)


def _count_inner_chunks(
    sharding: _ShardIndex, shape: list[int], shard_shape: list[int], shard_grid: list[int],
    stored: dict[tuple[int, ...], str], key_of: Callable[[tuple[int, ...]], str], examples: int, fill: Any,
) -> ChunkCount:
    """:class:`ChunkCount` of a sharded Zarr v3 array in inner chunks: a missing shard file
    misses all its inner chunks, a stored shard those its index marks empty (read from the
    index alone). Inner chunks past the array's edge (in edge shards) are not counted."""
    inner = list(sharding.inner)
    if any(s % c for s, c in zip(shard_shape, inner)):
        raise ValueError(f"shard shape {shard_shape} is not a multiple of the inner chunk shape {inner}")
    per_shard = [s // c for s, c in zip(shard_shape, inner)]
    inner_grid = [math.ceil(s / c) for s, c in zip(shape, inner)]
    expected, present, missing = math.prod(inner_grid), 0, []
    for shard in itertools.product(*(range(g) for g in shard_grid)):
        # inner chunks of this shard that lie inside the array
        extent = tuple(min(n, g - i * n) for i, n, g in zip(shard, per_shard, inner_grid))
        if shard not in stored:
            if len(missing) < examples:
                missing.append(key_of(shard))
            continue
        inside = sharding.stored(Path(stored[shard]), per_shard)[tuple(slice(0, e) for e in extent)]
        present += int(inside.sum())
        for local in np.argwhere(~inside)[: max(0, examples - len(missing))]:
            missing.append(f"{key_of(shard)} inner chunk {[int(i) for i in local]}")
    return ChunkCount(expected, present, tuple(missing), fill)
