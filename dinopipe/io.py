"""Storage in one import: the public names of the four storage modules, for ``from dinopipe import io``.

* :mod:`dinopipe.atomic` — outputs written under a temporary name and renamed into place
  (a killed job never leaves an output that looks complete), write faults that name the
  output, JSON files, store ids.
* :mod:`dinopipe.ngff` — the OME-NGFF writer (one scale ``s0``: 0.4 on Zarr v2, or 0.5 on
  sharded Zarr v3) and reader of both, memory-mapped tensorstore access.
* :mod:`dinopipe.inputs` — input volumes as users bring them: OME-NGFF 0.4/0.5 groups,
  plain Zarr/N5 arrays, HDF5 datasets.
* :mod:`dinopipe.chunks` — counting stored chunks (an incomplete copy reads as zeros).

Conventions used throughout dinopipe: axis order (z, y, x), with channels (c, z, y, x);
``voxel_size`` in nm per voxel; ``translation`` is the centre of voxel (0, 0, 0) in nm, as in
OME-NGFF coordinate transformations (:class:`dinopipe.geometry.Geometry`).
"""

from __future__ import annotations

from dinopipe.atomic import (
    NEARLY_FULL_BYTES,
    atomic_output,
    directory_size,
    glob_escape,
    json_default,
    move_into_place,
    new_store_id,
    write_json,
)
from dinopipe.chunks import ChunkCount, count_chunks
from dinopipe.geometry import Geometry
from dinopipe.inputs import (
    SourceArray,
    child_images,
    metadata_cache,
    multiscale_levels,
    open_source,
    source_levels,
    source_store,
    split_hdf5,
)
from dinopipe.ngff import (
    FEATURE_CHUNK,
    FEATURE_ORDER,
    MEMMAP_CONTEXT,
    SHARD_BUFFER_BYTES,
    SHARDED_NGFF_VERSION,
    SPATIAL_AXES,
    UNITS_NM,
    Image,
    ShardWriter,
    chunk_order,
    create_image,
    default_chunks,
    ngff_levels,
    ngff_multiscale,
    open_tensorstore,
    read_image,
    read_into,
    set_attrs,
    shard_major,
    shard_shape,
    write_cast,
    write_image,
    zarr_format_of,
)

__all__ = [
    "NEARLY_FULL_BYTES", "atomic_output", "directory_size", "glob_escape", "json_default", "move_into_place", "new_store_id",
    "write_json", "ChunkCount", "count_chunks", "Geometry", "SourceArray", "child_images", "metadata_cache", "multiscale_levels",
    "open_source", "source_levels", "source_store", "split_hdf5", "FEATURE_CHUNK", "FEATURE_ORDER",
    "MEMMAP_CONTEXT", "SHARD_BUFFER_BYTES", "SHARDED_NGFF_VERSION", "SPATIAL_AXES", "UNITS_NM", "Image",
    "ShardWriter", "chunk_order", "create_image",
    "default_chunks", "ngff_levels", "ngff_multiscale", "open_tensorstore", "read_image", "read_into", "set_attrs",
    "shard_major", "shard_shape", "write_cast", "write_image", "zarr_format_of",
]
