"""Opening a volume's raw and labels, choosing scales, and the output (label) grid.

Raw and labels are OME-NGFF multiscale groups. The raw scale is the finest one not
finer than ``min_raw_voxel_size`` on any axis; the label scale is the finest one, or
the one matching ``label_voxel_size`` when given. The output grid is the label grid
restricted to the raw extent and the volume's ROI; volumes without labels use the raw
extent at ``output_voxel_size``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dinopipe.io import Geometry, Image, multiscale_levels, read_image
from dinopipe.sheet import Volume

logger = logging.getLogger(__name__)


@dataclass
class Sources:
    """A volume's opened inputs and the grid its outputs live on."""

    volume: Volume
    raw: Image
    labels: Image | None
    grid: Geometry
    #: (z, y, x) slices of the label array that cover ``grid`` (None without labels).
    label_window: tuple[slice, slice, slice] | None


def choose_scale(
    path: str, levels: Sequence[tuple[str, tuple[float, float, float]]], *,
    min_voxel_size: Sequence[float] | None = None, exact: Sequence[float] | None = None, what: str,
) -> str:
    """Pick a scale of a multiscale group by voxel size (nm)."""
    if exact is not None:
        for name, vs in levels:
            if np.allclose(vs, exact):
                return name
        raise ValueError(f"{what} {path}: no scale with voxel size {list(exact)} nm; available: {levels}")
    if min_voxel_size is None:
        return levels[0][0]
    ok = [(name, vs) for name, vs in levels if all(v >= m - 1e-6 for v, m in zip(vs, min_voxel_size))]
    if not ok:
        raise ValueError(
            f"{what} {path}: every scale is finer than min_raw_voxel_size {list(min_voxel_size)} nm; "
            f"available: {levels}"
        )
    return min(ok, key=lambda item: float(np.prod(item[1])))[0]


def _open(path: str, what: str, volume: str, **choose: object) -> Image:
    try:
        levels = multiscale_levels(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"volume {volume!r}: {what} not found: {path}") from exc
    except Exception as exc:
        import os

        if not os.path.exists(path):
            raise FileNotFoundError(f"volume {volume!r}: {what} not found: {path}") from exc
        raise ValueError(f"volume {volume!r}: {what} {path} is not an OME-NGFF multiscale group ({exc})") from exc
    scale = choose_scale(path, levels, what=f"volume {volume!r}: {what}", **choose)  # type: ignore[arg-type]
    image = read_image(path, scale)
    if image.array.ndim != 3:
        raise ValueError(f"volume {volume!r}: {what} {path}/{scale} must be 3D (z, y, x), got shape {image.array.shape}")
    return image


def _window(geom: Geometry, lo_nm: np.ndarray, hi_nm: np.ndarray) -> tuple[slice, ...]:
    """Voxels of ``geom`` whose centres lie in [lo_nm, hi_nm)."""
    t, v = np.asarray(geom.translation), np.asarray(geom.voxel_size)
    first = np.maximum(np.ceil((lo_nm - t) / v - 1e-9), 0).astype(int)
    last = np.minimum(np.ceil((hi_nm - t) / v - 1e-9), geom.shape).astype(int)
    return tuple(slice(int(a), int(b)) for a, b in zip(first, last))


def open_sources(
    volume: Volume,
    *,
    min_raw_voxel_size: Sequence[float] | None = None,
    label_voxel_size: Sequence[float] | None = None,
    output_voxel_size: Sequence[float] | None = None,
) -> Sources:
    """Open raw and labels of ``volume`` and compute its output grid.

    Args:
        volume: The sheet row.
        min_raw_voxel_size: Finest raw voxel size (nm) to use; None: the finest scale.
        label_voxel_size: Label scale to use (nm); None: the finest.
        output_voxel_size: Output voxel size (nm) for volumes without labels; None:
            the raw voxel size.
    """
    raw = _open(volume.raw, "raw", volume.name, min_voxel_size=min_raw_voxel_size)
    if not np.issubdtype(raw.array.dtype, np.number):
        raise ValueError(f"volume {volume.name!r}: raw {volume.raw} has non-numeric dtype {raw.array.dtype}")
    labels = None
    rg = raw.geometry
    lo, hi = rg.begin_nm.copy(), rg.end_nm.copy()
    if volume.roi is not None:
        roi = np.asarray(volume.roi, dtype=float)
        lo, hi = np.maximum(lo, roi[:, 0]), np.minimum(hi, roi[:, 1])
    if volume.labels:
        labels = _open(volume.labels, "labels", volume.name, exact=label_voxel_size)
        if not np.issubdtype(labels.array.dtype, np.integer):
            raise ValueError(
                f"volume {volume.name!r}: labels {volume.labels} must be integer, got {labels.array.dtype}"
            )
        lg = labels.geometry
        window = _window(lg, lo, hi)
        shape = tuple(s.stop - s.start for s in window)
        translation = tuple(float(t + s.start * v) for t, s, v in zip(lg.translation, window, lg.voxel_size))
        grid = Geometry(shape, lg.voxel_size, translation)  # type: ignore[arg-type]
        # keep only label voxels whose whole extent lies inside the raw
        if np.any(grid.begin_nm < rg.begin_nm - 1e-6) or np.any(grid.end_nm > rg.end_nm + 1e-6):
            inner = _window(lg, rg.begin_nm + np.asarray(lg.voxel_size) / 2, rg.end_nm - np.asarray(lg.voxel_size) / 2 + 1e-6)
            window = tuple(slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(window, inner))
            shape = tuple(s.stop - s.start for s in window)
            translation = tuple(float(t + s.start * v) for t, s, v in zip(lg.translation, window, lg.voxel_size))
            grid = Geometry(shape, lg.voxel_size, translation)  # type: ignore[arg-type]
    else:
        vs = tuple(float(v) for v in (output_voxel_size or rg.voxel_size))
        shape = tuple(max(0, int(math.floor((h - l) / v + 1e-9))) for l, h, v in zip(lo, hi, vs))
        translation = tuple(float(l + v / 2) for l, v in zip(lo, vs))
        grid = Geometry(shape, vs, translation)  # type: ignore[arg-type]
        window = None
    if min(grid.shape) < 1:
        raise ValueError(
            f"volume {volume.name!r}: raw, labels and roi do not overlap (raw {rg.begin_nm.tolist()}–"
            f"{rg.end_nm.tolist()} nm, roi {volume.roi})"
        )
    logger.info("volume %s: raw %s/%s %s, output grid %s", volume.name, volume.raw, raw.scale, rg, grid)
    return Sources(volume, raw, labels, grid, window)  # type: ignore[arg-type]


def resample_to_grid(data: np.ndarray, src: Geometry, dst: Geometry) -> np.ndarray:
    """Area-average (or nearest, where ``src`` is coarser) a (z, y, x) array onto ``dst``.

    Uses the same slice weighting as the feature planes along each axis.
    """
    from dinopipe.features import slice_weights

    out = np.asarray(data, dtype=np.float32)
    for axis in range(3):
        contributions = slice_weights(
            src.translation[axis], src.voxel_size[axis], src.shape[axis],
            dst.translation[axis], dst.voxel_size[axis], dst.shape[axis],
        )
        matrix = np.zeros((dst.shape[axis], src.shape[axis]), dtype=np.float32)
        for j, targets in contributions:
            for i, w in targets:
                matrix[i, j] = w
        out = np.moveaxis(np.tensordot(matrix, out, axes=([1], [axis])), 0, axis)
    return out
