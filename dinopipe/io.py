"""Reading and writing volumes as OME-NGFF (0.4, Zarr v2) images, and atomic outputs.

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
import json
import logging
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from numcodecs import Blosc

logger = logging.getLogger(__name__)

# Snakemake marks directory outputs with a `.snakemake_timestamp` file, which zarr
# reports as an unknown object whenever the group is listed.
warnings.filterwarnings("ignore", message=r".*\.snakemake_timestamp.*")

SPATIAL_AXES = ("z", "y", "x")
_COMPRESSOR = Blosc(cname="zstd", clevel=3, shuffle=Blosc.BITSHUFFLE)


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
        scale: The multiscale dataset path chosen inside the group ("s0", ...), or None.
        attrs: The group's attributes (for dinopipe's own metadata).
    """

    array: Any
    geometry: Geometry
    path: str
    scale: str | None = None
    attrs: Mapping[str, Any] | None = None

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


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write into; move it to ``path`` only on success.

    An existing output at ``path`` is replaced. On any exception the temporary
    output is removed and ``path`` is left as it was, so a failed or killed job
    never leaves an output that looks complete (a SIGKILL leaves only a hidden
    ``.NAME.tmp-*`` sibling, which the next run ignores).

    Args:
        path: Final path of the output (a directory store or a file).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(final.parent, os.W_OK):
        raise PermissionError(f"output folder is not writable: {final.parent}")
    tmp = _tmp_sibling(final)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if not tmp.exists():
        raise RuntimeError(f"nothing was written for {final}")
    _remove(final)
    os.replace(tmp, final)


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

    Returns:
        The writable zarr array ``s0`` (filled with zeros until written).
    """
    ndim = 4 if channel_axis else 3
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
        compressors=_COMPRESSOR,
        chunk_key_encoding={"name": "v2", "separator": "/"},
        fill_value=0,
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
) -> None:
    """Write one array as an OME-NGFF 0.4 image group (see :func:`create_image`)."""
    arr = create_image(
        path, data.shape, data.dtype, voxel_size, translation,
        channel_axis=channel_axis, chunks=chunks, attrs=attrs, name=name,
    )
    arr[...] = data


def set_attrs(path: str | os.PathLike[str], attrs: Mapping[str, Any]) -> None:
    """Store ``attrs`` under the ``"dinopipe"`` key of the group at ``path`` (JSON-safe)."""
    group = zarr.open_group(str(path), mode="a")
    group.attrs["dinopipe"] = json.loads(json.dumps(dict(attrs), default=_json_default))


def _transforms(dataset: Mapping[str, Any], ndim: int, where: str) -> tuple[list[float], list[float]]:
    scale = [1.0] * ndim
    trans = [0.0] * ndim
    for t in dataset.get("coordinateTransformations", []):
        if t.get("type") == "scale":
            scale = [float(v) for v in t["scale"]]
        elif t.get("type") == "translation":
            trans = [float(v) for v in t["translation"]]
    if len(scale) != ndim or len(trans) != ndim:
        raise ValueError(f"{where}: coordinate transformations do not match the array's {ndim} axes")
    return scale, trans


def read_image(path: str | os.PathLike[str], scale: str | None = None) -> Image:
    """Open an OME-NGFF image group written by :func:`write_image` (or any 0.4 multiscale).

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
    ms = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    if not ms:
        raise ValueError(f"{p}: no OME-NGFF 'multiscales' attribute")
    datasets = ms[0]["datasets"]
    names = [d["path"] for d in datasets]
    chosen = scale or names[0]
    if chosen not in names:
        raise ValueError(f"{p}: scale {chosen!r} not found; available: {names}")
    dataset = datasets[names.index(chosen)]
    arr = group[chosen]
    sc, tr = _transforms(dataset, arr.ndim, f"{p}/{chosen}")
    geometry = Geometry(
        shape=tuple(int(s) for s in arr.shape[-3:]),  # type: ignore[arg-type]
        voxel_size=tuple(sc[-3:]),  # type: ignore[arg-type]
        translation=tuple(tr[-3:]),  # type: ignore[arg-type]
    )
    return Image(array=arr, geometry=geometry, path=str(p), scale=chosen, attrs=attrs.get("dinopipe", {}))


def multiscale_levels(path: str | os.PathLike[str]) -> list[tuple[str, tuple[float, float, float]]]:
    """List (dataset path, voxel size in nm) for every scale of a multiscale group."""
    group = zarr.open_group(str(path), mode="r")
    ms = group.attrs.get("multiscales")
    if not ms:
        raise ValueError(f"{path}: no OME-NGFF 'multiscales' attribute")
    levels = []
    for d in ms[0]["datasets"]:
        sc, _ = _transforms(d, group[d["path"]].ndim, f"{path}/{d['path']}")
        levels.append((d["path"], tuple(sc[-3:])))
    return levels  # type: ignore[return-value]


def directory_size(path: str | os.PathLike[str]) -> int:
    """Total size in bytes of the files under ``path`` (or of the file itself)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
