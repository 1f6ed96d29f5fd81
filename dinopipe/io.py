"""Reading input volumes, writing OME-NGFF (0.4, Zarr v2) images, and atomic outputs.

Inputs (:func:`open_source`) may be OME-NGFF 0.4 (Zarr v2) or 0.5 (Zarr v3) multiscale
groups, plain Zarr v2/v3 or N5 arrays (read through tensorstore), or HDF5 datasets
(``file.h5:/dataset``, read through h5py). Plain arrays carry no geometry: their voxel
size and offset come from the volume sheet.

Conventions used throughout dinopipe:

* Axis order is (z, y, x); arrays with channels are (c, z, y, x).
* ``voxel_size`` is in nanometres per voxel, (z, y, x).
* ``translation`` is the physical position in nanometres of the *centre* of voxel
  index (0, 0, 0), as in OME-NGFF coordinate transformations. Voxel ``i`` along an
  axis therefore has its centre at ``translation + i * voxel_size`` and covers
  ``[translation + (i - 0.5) * voxel_size, translation + (i + 0.5) * voxel_size)``.

Every image dinopipe writes is an OME-NGFF multiscale group holding one scale, ``s0``,
so napari (napari-ome-zarr) and neuroglancer open it directly with the right voxel
size and offset. A store with several images (the training targets) is a plain group of
such image groups.

Outputs are written under a temporary name beside their final path and renamed into
place when complete (:func:`atomic_output`), so a killed job never leaves an output that
looks complete.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import math
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts
import zarr
from numcodecs import Blosc

logger = logging.getLogger(__name__)

# Snakemake marks directory outputs with a `.snakemake_timestamp` file, which zarr
# reports as an unknown object whenever the group is listed.
warnings.filterwarnings("ignore", message=r".*\.snakemake_timestamp.*")

SPATIAL_AXES = ("z", "y", "x")
_COMPRESSOR = Blosc(cname="zstd", clevel=3, shuffle=Blosc.BITSHUFFLE)

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


@dataclass(frozen=True)
class Geometry:
    """Where a (z, y, x) grid lies in physical space.

    Attributes:
        shape: Grid shape in voxels, (z, y, x).
        voxel_size: Voxel size in nm, (z, y, x).
        translation: Centre of voxel (0, 0, 0) in nm, (z, y, x).
    """

    shape: tuple[int, int, int]
    voxel_size: tuple[float, float, float]
    translation: tuple[float, float, float]

    @property
    def begin_nm(self) -> np.ndarray:
        """Physical start (corner) of the grid in nm, (z, y, x)."""
        return np.asarray(self.translation) - 0.5 * np.asarray(self.voxel_size)

    @property
    def end_nm(self) -> np.ndarray:
        """Physical end (far corner) of the grid in nm, (z, y, x)."""
        return self.begin_nm + np.asarray(self.shape) * np.asarray(self.voxel_size)

    def to_dict(self) -> dict[str, list[float] | list[int]]:
        return {
            "shape": list(self.shape),
            "voxel_size": list(self.voxel_size),
            "translation": list(self.translation),
        }


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


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


#: Free space (bytes) below which a failed write is reported as a full disk, whatever the
#: writer raised (torch.save says "unexpected pos", zarr may wrap the OSError).
NEARLY_FULL_BYTES = 1 << 20


def _bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _write_fault(exc: BaseException, final: Path, tmp: Path, what: str | None, expected_bytes: int | None) -> OSError | None:
    """A readable error for a write that failed for lack of space or an I/O error (None
    for any other failure): names the output, what it is and the space involved."""
    code = exc.errno if isinstance(exc, OSError) else None
    try:
        free = shutil.disk_usage(final.parent).free
    except OSError:
        free = None
    full = code in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < NEARLY_FULL_BYTES)
    if not full and code not in (errno.EIO, errno.EROFS):
        return None
    try:
        written = directory_size(tmp) if tmp.exists() else 0
    except OSError:
        written = 0
    label = f"{what} ({final})" if what else str(final)
    if full:
        need = (f"about {_bytes(expected_bytes)} needed for the whole output" if expected_bytes
                else "the whole output needs more")
        message = (f"{label}: no space left on the device holding {final.parent} ({_bytes(written)} written before "
                   f"the failure, {_bytes(free) if free is not None else 'unknown'} free, {need}); nothing was left "
                   f"at {final}. Free space or point the workflow at a larger disk, then rerun. ({type(exc).__name__}: "
                   f"{exc})")
        return OSError(errno.ENOSPC, message)
    return OSError(code, f"{label}: I/O error while writing under {final.parent} ({type(exc).__name__}: {exc}); "
                         f"nothing was left at {final}")


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike[str], *, what: str | None = None, expected_bytes: int | None = None
) -> Iterator[Path]:
    """Yield a temporary path to write into; move it to ``path`` only on success.

    An existing output at ``path`` is replaced. On any exception the temporary
    output is removed and ``path`` is left as it was, so a failed or killed job
    never leaves an output that looks complete (a SIGKILL leaves only a hidden
    ``.NAME.tmp-*`` sibling, which the next write of ``path`` removes). A full disk
    (ENOSPC, a quota, or any failure with less than :data:`NEARLY_FULL_BYTES` free) or an
    I/O error becomes an ``OSError`` naming the output, ``what`` and the space involved.

    Args:
        path: Final path of the output (a directory store or a file).
        what: What the output is, for error messages (e.g. "features of volume 'v'").
        expected_bytes: Roughly how large the output will be, for error messages.
    """
    final = Path(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PermissionError(f"cannot create the output folder {final.parent} for {final}: {exc}") from exc
    if not os.access(final.parent, os.W_OK):
        raise PermissionError(f"output folder is not writable: {final.parent}")
    for stale in final.parent.glob(f".{glob_escape(final.name)}.tmp-*"):
        # left by a killed job: the output path belongs to this job now
        logger.info("removing stale temporary output %s", stale)
        _remove(stale)
    tmp = _tmp_sibling(final)
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"nothing was written for {final}")
        _remove(final)
        os.replace(tmp, final)
    except Exception as exc:
        fault = _write_fault(exc, final, tmp, what, expected_bytes)
        _remove(tmp)
        if fault is not None:
            raise fault from exc
        raise
    except BaseException:
        _remove(tmp)
        raise


def new_store_id() -> str:
    """A fresh identity for a store being written (its ``store_id`` attribute): it
    changes whenever the store is rewritten, so whatever was derived from the old content
    (a training run to resume) can tell (see :meth:`dinopipe.loader.Volume.identity`)."""
    return uuid.uuid4().hex


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters escaped."""
    import glob

    return glob.escape(name)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in JSON")


def _multiscales(
    name: str, voxel_size: Sequence[float], translation: Sequence[float], channel_axis: bool
) -> list[dict[str, Any]]:
    axes = [{"name": a, "type": "space", "unit": "nanometer"} for a in SPATIAL_AXES]
    scale = [float(v) for v in voxel_size]
    trans = [float(t) for t in translation]
    if channel_axis:
        axes = [{"name": "c", "type": "channel"}, *axes]
        scale = [1.0, *scale]
        trans = [0.0, *trans]
    return [
        {
            "version": "0.4",
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
) -> Any:
    """Create an empty OME-NGFF 0.4 image group with a single scale ``s0``; return ``s0``.

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
            :data:`FEATURE_ORDER`). The array's axes are (c, z, y, x) either way.

    Returns:
        The writable zarr array ``s0`` (filled with zeros until written).
    """
    ndim = 4 if channel_axis else 3
    if order not in ("C", "F"):
        raise ValueError(f"{path}: chunk order must be 'C' or 'F', got {order!r}")
    if len(shape) != ndim:
        raise ValueError(f"{path}: expected a {ndim}D array, got shape {tuple(shape)}")
    if len(voxel_size) != 3 or len(translation) != 3:
        raise ValueError(f"{path}: voxel_size and translation need 3 values (z, y, x)")
    path = Path(path)
    group = zarr.open_group(str(path), mode="w-", zarr_format=2)
    group.attrs["multiscales"] = _multiscales(name or path.name, voxel_size, translation, channel_axis)
    if attrs:
        group.attrs["dinopipe"] = json.loads(json.dumps(dict(attrs), default=_json_default))
    return group.create_array(
        "s0",
        shape=tuple(int(s) for s in shape),
        dtype=dtype,
        chunks=tuple(chunks) if chunks else default_chunks(shape, channel_axis),
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
) -> None:
    """Write one array as an OME-NGFF 0.4 image group (see :func:`create_image`)."""
    arr = create_image(
        path, data.shape, data.dtype, voxel_size, translation,
        channel_axis=channel_axis, chunks=chunks, attrs=attrs, name=name, compress=compress, order=order,
    )
    arr[...] = data


def set_attrs(path: str | os.PathLike[str], attrs: Mapping[str, Any]) -> None:
    """Store ``attrs`` under the ``"dinopipe"`` key of the group at ``path`` (JSON-safe)."""
    group = zarr.open_group(str(path), mode="a")
    group.attrs["dinopipe"] = json.loads(json.dumps(dict(attrs), default=_json_default))


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


def multiscale_levels(path: str | os.PathLike[str]) -> list[tuple[str, tuple[float, float, float]]]:
    """List (dataset path, voxel size in nm) for every scale of a multiscale group."""
    attrs, _ = _group_attrs(Path(path))
    _, ms = ngff_multiscale(attrs, str(path))
    return [(name, vs) for name, vs, _ in ngff_levels(ms, str(path))]  # type: ignore[misc]


# --- input volumes: OME-NGFF groups, plain Zarr / N5 arrays, HDF5 datasets -------------

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
MEMMAP_CONTEXT = {"file_io_mode": {"mode": "memmap"}}


def open_tensorstore(path: str | os.PathLike[str], zarr_format: int = 2) -> ts.TensorStore:
    """Open a local Zarr v2 or v3 array read-only with tensorstore, memory-mapped.

    Raises:
        ValueError: tensorstore cannot open it (not an array, unsupported codec, ...).
    """
    spec = {
        "driver": "zarr" if zarr_format == 2 else "zarr3",
        "kvstore": {"driver": "file", "path": str(Path(path).resolve())},
        "context": MEMMAP_CONTEXT,
    }
    return ts.open(spec, read=True).result()


def read_into(store: ts.TensorStore, index: tuple[Any, ...], out: np.ndarray) -> Any:
    """Start copying ``store[index]`` into ``out`` (a writable numpy array or view of that
    shape, any strides: a layout matching the chunks copies in long runs); returns the
    write future."""
    source = store[index].translate_to[(0,) * store.rank]
    return ts.array(out, copy=False, write=True).write(source)


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


def directory_size(path: str | os.PathLike[str]) -> int:
    """Total size in bytes of the files under ``path`` (or of the file itself)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


# --- stored chunks: an incomplete copy reads as the fill value ------------------------------

#: Metadata files inside an array folder (not chunks).
_METADATA_FILES = {".zarray", ".zattrs", ".zgroup", ".zmetadata", "zarr.json", "attributes.json"}


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
                if name in _METADATA_FILES or name.startswith("."):
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
