"""Input volumes in the formats users bring: OME-NGFF multiscale groups, plain arrays, HDF5.

Inputs (:func:`open_source`) may be OME-NGFF 0.4 (Zarr v2) or 0.5 (Zarr v3) multiscale
groups, plain Zarr v2/v3 or N5 arrays (read through tensorstore), or HDF5 datasets
(``file.h5:/dataset``, read through h5py). Plain arrays carry no geometry: their voxel
size and offset come from the volume sheet. Every adapter gives a :class:`SourceArray`
whose read errors name the volume and the chunk.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from dinopipe.geometry import Geometry
from dinopipe.ngff import SPATIAL_AXES, Image, ngff_levels, ngff_multiscale

logger = logging.getLogger(__name__)


_HDF5 = (".h5", ".hdf5", ".hdf", ".he5")


class SourceArray:
    """A read-only array on disk with numpy-style indexing.

    Supports ``.shape``, ``.dtype``, ``.ndim``, ``np.asarray(arr)``, and ``arr[key]`` with
    integers, slices (with steps), ``...`` and one list of indices along one axis
    (outer indexing, as numpy does for a single list); reads return numpy arrays.
    """

    def __init__(self, shape: Sequence[int], dtype: Any, reader: Any, where: str, close: Any = None) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self._reader = reader
        self.where = where
        self._close = close

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        index = self._normalize(key if isinstance(key, tuple) else (key,))
        try:
            return self._reader(index)
        except (OSError, ValueError) as exc:  # a truncated or corrupt chunk, an unreadable file
            kind = OSError if isinstance(exc, OSError) else ValueError
            raise kind(f"{self.where}: cannot read {_index_text(index)} ({exc})") from exc

    def _normalize(self, key: tuple[Any, ...]) -> tuple[Any, ...]:
        """numpy's semantics made explicit: ``...`` expanded, slices clipped to the shape,
        negative indices counted from the end."""
        if any(k is Ellipsis for k in key):
            i = next(j for j, k in enumerate(key) if k is Ellipsis)
            key = (*key[:i], *[slice(None)] * (self.ndim - len(key) + 1), *key[i + 1 :])
        if len(key) > self.ndim:
            raise IndexError(f"{self.where}: {len(key)} indices for a {self.ndim}D array")
        key = (*key, *[slice(None)] * (self.ndim - len(key)))
        out: list[Any] = []
        for k, n in zip(key, self.shape):
            if isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step < 1:
                    raise IndexError(f"{self.where}: negative slice steps are not supported")
                out.append(slice(start, max(start, stop), step))
            elif isinstance(k, (int, np.integer)):
                if not -n <= int(k) < n:
                    raise IndexError(f"{self.where}: index {int(k)} out of range for size {n}")
                out.append(int(k) % n)
            elif isinstance(k, (list, np.ndarray)):
                idx = np.asarray(k, dtype=np.int64)
                if idx.size and (idx.min() < -n or idx.max() >= n):
                    raise IndexError(f"{self.where}: indices out of range for size {n}")
                out.append((idx % n).tolist())
            else:
                raise TypeError(f"{self.where}: unsupported index {k!r}")
        return tuple(out)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        return f"SourceArray({self.where}, shape={self.shape}, dtype={self.dtype})"


def _index_text(index: tuple[Any, ...]) -> str:
    parts = [f"{k.start}:{k.stop}" if isinstance(k, slice) else str(k) for k in index]
    return "[" + ", ".join(parts) + "]"


def _tensorstore_array(spec: dict[str, Any], where: str, transpose: bool = False) -> SourceArray:
    try:
        store = ts.open(spec, open=True, read=True).result()
    except Exception as exc:  # tensorstore raises ValueError with its own status text
        raise ValueError(f"{where}: cannot open as {spec['driver']} array ({exc})") from exc
    if transpose:
        store = store.T

    def read(key: tuple[Any, ...]) -> np.ndarray:
        fancy = any(isinstance(k, (list, np.ndarray)) for k in key)
        view = store.oindex[key] if fancy else store[key]
        return np.asarray(view.read().result())

    return SourceArray(store.shape, store.dtype.numpy_dtype, read, where)


def _hdf5_array(file: Path, dataset: str, where: str) -> SourceArray:
    import h5py

    try:
        handle = h5py.File(file, "r")
    except OSError as exc:
        raise ValueError(f"{where}: cannot open {file} as HDF5 ({exc})") from exc
    if dataset not in handle or not isinstance(handle[dataset], h5py.Dataset):
        found: list[str] = []
        handle.visititems(lambda name, obj: found.append("/" + name) if isinstance(obj, h5py.Dataset) else None)
        handle.close()
        raise ValueError(f"{where}: no dataset {dataset!r} in {file}; datasets there: {found}")
    ds = handle[dataset]

    def read(key: tuple[Any, ...]) -> np.ndarray:
        # h5py wants increasing, unique fancy indices: read those, then reorder
        for axis, k in enumerate(key):
            if isinstance(k, (list, np.ndarray)):
                wanted = np.asarray(k, dtype=np.int64)
                unique, inverse = np.unique(wanted, return_inverse=True)
                inner = list(key)
                inner[axis] = unique.tolist()
                block = np.asarray(ds[tuple(inner)])
                dropped = sum(1 for j in key[:axis] if isinstance(j, (int, np.integer)))
                return np.take(block, inverse, axis=axis - dropped)
        return np.asarray(ds[key])

    return SourceArray(ds.shape, ds.dtype, read, where, close=handle.close)


#: tensorstore context for reading immutable local stores: chunk files are memory-mapped,
#: so reading a chunk is one copy out of the page cache (the loader and predict read this way).
def split_hdf5(path: str) -> tuple[Path, str] | None:
    """``file.h5:/dataset`` -> (file.h5, "/dataset"); None when ``path`` is not HDF5."""
    lower = path.lower()
    for ext in _HDF5:
        i = lower.find(ext + ":")
        if i >= 0:
            return Path(path[: i + len(ext)]), path[i + len(ext) + 1 :] or "/"
        if lower.endswith(ext):
            return Path(path), ""
    return None


def source_store(path: str) -> str:
    """The file or folder on disk that holds an input (for Snakemake inputs):
    ``a.zarr/raw`` -> ``a.zarr``, ``b.n5/raw/s0`` -> ``b.n5``, ``c.h5:/stack`` -> ``c.h5``."""
    h5 = split_hdf5(path)
    if h5 is not None:
        return str(h5[0])
    for ext in (".zarr", ".n5"):
        i = path.find(ext + "/")
        if i >= 0:
            return path[: i + len(ext)]
    return path.rstrip("/")


#: Per-path results of :func:`_group_attrs` while :func:`metadata_cache` is active.
_ATTRS_CACHE: dict[str, tuple[dict[str, Any], str]] | None = None


@contextlib.contextmanager
def metadata_cache() -> Iterator[None]:
    """Within this block, each Zarr/N5 node's attributes are read once (the workflow's
    start-up checks look at every store several times); outside it nothing is cached, so
    a store rewritten later is always read afresh."""
    global _ATTRS_CACHE
    previous, _ATTRS_CACHE = _ATTRS_CACHE, {} if _ATTRS_CACHE is None else _ATTRS_CACHE
    try:
        yield
    finally:
        _ATTRS_CACHE = previous


def _group_attrs(p: Path) -> tuple[dict[str, Any], str]:
    """Attributes and kind of a Zarr v2/v3 or N5 node: kind is one of "zarr-array",
    "zarr-group", "zarr3-array", "zarr3-group", "n5-array", "n5-group"."""
    if _ATTRS_CACHE is None:
        return _read_group_attrs(p)
    key = str(p)
    if key not in _ATTRS_CACHE:
        _ATTRS_CACHE[key] = _read_group_attrs(p)
    attrs, kind = _ATTRS_CACHE[key]
    return dict(attrs), kind


def _read_group_attrs(p: Path) -> tuple[dict[str, Any], str]:
    if not p.exists():
        raise FileNotFoundError(f"no such file or folder: {p}")
    if (p / "zarr.json").is_file():
        meta = json.loads((p / "zarr.json").read_text())
        return dict(meta.get("attributes") or {}), f"zarr3-{meta.get('node_type', 'group')}"
    if (p / ".zarray").is_file():
        attrs = json.loads((p / ".zattrs").read_text()) if (p / ".zattrs").is_file() else {}
        return attrs, "zarr-array"
    if (p / ".zgroup").is_file() or (p / ".zattrs").is_file():
        attrs = json.loads((p / ".zattrs").read_text()) if (p / ".zattrs").is_file() else {}
        return attrs, "zarr-group"
    if (p / "attributes.json").is_file():
        attrs = json.loads((p / "attributes.json").read_text())
        return attrs, "n5-array" if "dimensions" in attrs else "n5-group"
    raise ValueError(f"{p}: not a Zarr (v2 or v3) or N5 array or group (no .zarray, .zgroup, zarr.json "
                     f"or attributes.json)")


def _plain_array(p: Path, kind: str) -> tuple[SourceArray, str]:
    driver = kind.split("-")[0]
    spec = {"driver": driver, "kvstore": {"driver": "file", "path": str(p)}}
    # N5 lists dimensions fastest-first (x, y, z); present them as (z, y, x) like z5py
    return _tensorstore_array(spec, str(p), transpose=driver == "n5"), driver


def source_levels(path: str) -> tuple[str, list[tuple[str | None, tuple[float, ...] | None]]]:
    """The format of an input and its scales as (dataset path, voxel size in nm);
    plain arrays have one level ``(None, None)`` (their geometry comes from the sheet).

    Raises:
        FileNotFoundError: ``path`` (or the HDF5 file) does not exist.
        ValueError: ``path`` is none of the supported formats.
    """
    h5 = split_hdf5(path)
    if h5 is not None:
        if not h5[0].is_file():
            raise FileNotFoundError(f"no such file: {h5[0]}")
        return "hdf5", [(None, None)]
    attrs, kind = _group_attrs(Path(path))
    if kind.endswith("-array"):
        return kind.split("-")[0], [(None, None)]
    try:
        version, ms = ngff_multiscale(attrs, path)
    except ValueError:
        children = sorted(c.name for c in Path(path).iterdir() if c.is_dir())
        raise ValueError(
            f"{path}: a group but not an OME-NGFF multiscale image (no 'multiscales' attribute); "
            f"give an image group or an array inside it (found {children})"
        ) from None
    return f"ome-ngff {version}", [(name, vs) for name, vs, _ in ngff_levels(ms, path)]


def child_images(path: str) -> list[str] | None:
    """The names of the OME-NGFF multiscale images directly inside a group that is not an image
    itself (a CellMap crop: ``crop1/{mito,er}``), sorted; None when ``path`` is an image,
    an array, an HDF5 dataset or missing (metadata only)."""
    if split_hdf5(path) is not None:
        return None
    p = Path(path)
    try:
        attrs, kind = _group_attrs(p)
    except (FileNotFoundError, ValueError):
        return None
    if not kind.endswith("-group") or "multiscales" in attrs or "multiscales" in attrs.get("ome", {}):
        return None
    names = []
    for child in sorted(c for c in p.iterdir() if c.is_dir()):
        try:
            child_attrs, child_kind = _group_attrs(child)
        except (FileNotFoundError, ValueError):
            continue
        if child_kind.endswith("-group") and ("multiscales" in child_attrs or "multiscales" in child_attrs.get("ome", {})):
            names.append(child.name)
    return names


def _metadata_array(p: Path, where: str) -> SourceArray:
    """Shape and dtype of a Zarr v2/v3 or N5 array from its metadata file alone (a few hundred
    bytes of JSON; tensorstore is not opened); reading it raises."""
    try:
        if (p / ".zarray").is_file():
            meta = json.loads((p / ".zarray").read_text())
            shape, dtype = meta["shape"], np.dtype(meta["dtype"])
        elif (p / "zarr.json").is_file():
            meta = json.loads((p / "zarr.json").read_text())
            if meta.get("node_type") != "array":
                raise ValueError("a Zarr v3 group, not an array")
            shape, dtype = meta["shape"], np.dtype(meta["data_type"])
        elif (p / "attributes.json").is_file():
            meta = json.loads((p / "attributes.json").read_text())
            shape, dtype = meta["dimensions"][::-1], np.dtype(meta["dataType"])
        else:
            raise ValueError("no .zarray, zarr.json or attributes.json")
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where}: cannot read the array's metadata ({exc})") from exc

    return _unreadable(shape, dtype, where)


def _unreadable(shape: Sequence[int], dtype: Any, where: str) -> SourceArray:
    def read(key: tuple[Any, ...]) -> np.ndarray:
        raise RuntimeError(f"{where} was opened for its metadata only")

    return SourceArray(shape, dtype, read, where)


def open_source(
    path: str,
    scale: str | None = None,
    *,
    voxel_size: Sequence[float] | None = None,
    offset: Sequence[float] | None = None,
    metadata_only: bool = False,
) -> Image:
    """Open an input volume for reading (lazily, through tensorstore or h5py).

    Args:
        path: An OME-NGFF 0.4/0.5 multiscale group, a Zarr v2/v3 or N5 array folder, or
            an HDF5 dataset ``file.h5:/dataset``.
        scale: For multiscale groups, the dataset path to read (default: the first).
        voxel_size: For plain arrays (required): nm per voxel, (z, y, x).
        offset: For plain arrays: physical position (nm) of the *corner* of voxel
            (0, 0, 0), i.e. where the array begins; default (0, 0, 0).
        metadata_only: Read shape and dtype from the metadata files only (the workflow's
            start-up checks): cheap, but the array cannot be read.

    Returns:
        The image; ``array`` is a :class:`SourceArray`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: Unsupported format, a missing dataset or scale, a voxel size given for
            a multiscale group (which states its own) or missing for a plain array.
    """
    fmt, levels = source_levels(path)
    if fmt.startswith("ome-ngff"):
        if voxel_size is not None or offset is not None:
            raise ValueError(f"{path} is an OME-NGFF multiscale group, which states its own voxel size and "
                             f"offset: leave the sheet's voxel size / offset columns empty for it")
        attrs, kind = _group_attrs(Path(path))
        _, ms = ngff_multiscale(attrs, path)
        full = ngff_levels(ms, path)
        names = [name for name, _, _ in full]
        chosen = scale or names[0]
        if chosen not in names:
            raise ValueError(f"{path}: scale {chosen!r} not found; available: {names}")
        _, vs, trans = full[names.index(chosen)]
        sub = Path(path) / chosen
        if not sub.exists():
            raise FileNotFoundError(f"{path}: scale {chosen!r} is listed in 'multiscales' but {sub} does not exist")
        driver = "zarr3" if kind.startswith("zarr3") else "zarr"
        if metadata_only:
            array = _metadata_array(sub, str(sub))
        else:
            array = _tensorstore_array({"driver": driver, "kvstore": {"driver": "file", "path": str(sub)}}, str(sub))
        if array.ndim != len(ms.get("axes") or SPATIAL_AXES):
            raise ValueError(f"{sub}: array has {array.ndim} axes but 'multiscales' lists {len(ms['axes'])}")
        return Image(array, Geometry(array.shape[-3:], vs, trans), path, chosen,  # type: ignore[arg-type]
                     attrs.get("dinopipe", {}), fmt)
    if voxel_size is None:
        raise ValueError(f"{path} is a plain {fmt} array without a voxel size: give it in the sheet "
                         f"(nm, 'z,y,x')")
    if fmt == "hdf5":
        file, dataset = split_hdf5(path)  # type: ignore[misc]
        if not dataset.strip("/"):
            raise ValueError(f"{path}: name the HDF5 dataset as '{file}:/dataset'")
        array = _hdf5_array(file, dataset, path)
        if metadata_only:
            array._close()
            array = _unreadable(array.shape, array.dtype, path)
    elif metadata_only:
        array = _metadata_array(Path(path), path)
    else:
        array, _ = _plain_array(Path(path), _group_attrs(Path(path))[1])
    if len(voxel_size) != 3 or (offset is not None and len(offset) != 3):
        raise ValueError(f"{path}: voxel size and offset need 3 values (z, y, x)")
    vs = tuple(float(v) for v in voxel_size)
    corner = tuple(float(o) for o in (offset or (0.0, 0.0, 0.0)))
    trans = tuple(c + v / 2 for c, v in zip(corner, vs))
    shape = tuple(array.shape[-3:]) if array.ndim >= 3 else tuple(array.shape)
    return Image(array, Geometry(shape, vs, trans), path, None, {}, fmt)  # type: ignore[arg-type]


def multiscale_levels(path: str | os.PathLike[str]) -> list[tuple[str, tuple[float, float, float]]]:
    """List (dataset path, voxel size in nm) for every scale of a multiscale group."""
    attrs, _ = _group_attrs(Path(path))
    _, ms = ngff_multiscale(attrs, str(path))
    return [(name, vs) for name, vs, _ in ngff_levels(ms, str(path))]  # type: ignore[misc]
