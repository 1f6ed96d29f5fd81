"""Grid geometry: which voxels of one grid lie under another, windows, block tiling (numpy only).

Every grid is a :class:`Geometry`: a (z, y, x) shape in voxels, a voxel size in nm and the
centre of voxel (0, 0, 0) in nm. Windows are tuples of three ``slice`` objects in voxels of
the grid they index. This module imports no torch, so the checks that run when Snakemake
parses the workflow use the same arithmetic as the stages.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Window = tuple[slice, slice, slice]

#: Allowed raw:output voxel-size ratio per axis (raw voxel size / output voxel size).
RATIO_RANGE = (0.1, 16.0)


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


def check_ratio(raw_voxel_size: Sequence[float], out_voxel_size: Sequence[float], volume: str) -> None:
    """Raise if a raw:output voxel-size ratio is outside :data:`RATIO_RANGE` on any axis."""
    for axis, r, o in zip("zyx", raw_voxel_size, out_voxel_size):
        ratio = r / o
        if not RATIO_RANGE[0] <= ratio <= RATIO_RANGE[1]:
            raise ValueError(
                f"volume {volume!r}: raw voxel size {r} nm vs output (label) voxel size {o} nm on axis {axis} "
                f"(ratio {ratio:.3g}) is outside the supported {RATIO_RANGE[0]}–{RATIO_RANGE[1]}"
            )


def slice_weights(
    raw_translation: float, raw_voxel: float, n_raw: int, out_translation: float, out_voxel: float, n_out: int
) -> list[tuple[int, list[tuple[int, float]]]]:
    """Which raw slices average into each output slice along one axis.

    Args:
        raw_translation: Centre of raw voxel 0, nm.
        raw_voxel: Raw voxel size, nm.
        n_raw: Number of raw voxels.
        out_translation: Centre of output voxel 0, nm.
        out_voxel: Output voxel size, nm.
        n_out: Number of output voxels.

    Returns:
        For every raw slice used, in increasing order: (raw index, [(output index,
        weight), ...]); the weights of each output index sum to 1. A raw slice belongs to
        the output voxel its centre lies in; an output voxel without any (raw coarser than
        output) takes the nearest raw slice.
    """
    raw_centres = raw_translation + raw_voxel * np.arange(n_raw)
    out_of_raw = np.floor((raw_centres - (out_translation - out_voxel / 2)) / out_voxel).astype(np.int64)
    members: dict[int, list[int]] = {i: [] for i in range(n_out)}
    for j, i in enumerate(out_of_raw):
        if 0 <= i < n_out:
            members[int(i)].append(j)
    contributions: dict[int, list[tuple[int, float]]] = {}
    for i, js in members.items():
        if not js:  # raw coarser than output: nearest raw slice
            centre = out_translation + i * out_voxel
            js = [int(np.clip(np.rint((centre - raw_translation) / raw_voxel), 0, n_raw - 1))]
        for j in js:
            contributions.setdefault(j, []).append((i, 1.0 / len(js)))
    return sorted(contributions.items())


def centre_window(geom: Geometry, lo_nm: Sequence[float], hi_nm: Sequence[float]) -> Window:
    """The voxels of ``geom`` whose centres lie in [lo_nm, hi_nm) (nm, z, y, x), clipped to the grid."""
    t, v = np.asarray(geom.translation), np.asarray(geom.voxel_size)
    first = np.maximum(np.ceil((np.asarray(lo_nm) - t) / v - 1e-9), 0).astype(int)
    last = np.minimum(np.ceil((np.asarray(hi_nm) - t) / v - 1e-9), geom.shape).astype(int)
    return tuple(slice(int(a), int(b)) for a, b in zip(first, last))  # type: ignore[return-value]


def sub_geometry(geom: Geometry, window: Sequence[slice]) -> Geometry:
    """The geometry of ``geom[window]``."""
    return Geometry(
        tuple(s.stop - s.start for s in window),  # type: ignore[arg-type]
        geom.voxel_size,
        tuple(float(t + s.start * v) for t, s, v in zip(geom.translation, window, geom.voxel_size)),  # type: ignore[arg-type]
    )


def raw_window(
    raw_geom: Geometry, out_geom: Geometry, context: Sequence[int] | None = None, align: int = 1,
) -> tuple[Window, Geometry]:
    """The raw voxels overlapping ``out_geom`` and their geometry.

    Args:
        raw_geom, out_geom: Raw and output geometry (nm).
        context: Raw voxels (z, y, x) added on each side, clipped to the raw. On every axis
            with context the start is then moved down to a multiple of ``align`` raw voxels
            (the backbone's patch grid of the whole raw array), so tokens sit where they sit
            for the whole array.
        align: See ``context``.
    """
    rv = np.asarray(raw_geom.voxel_size)
    lo = np.floor((out_geom.begin_nm - raw_geom.begin_nm) / rv + 1e-6).astype(int)
    hi = np.ceil((out_geom.end_nm - raw_geom.begin_nm) / rv - 1e-6).astype(int)
    if context is not None:
        ctx = np.asarray(context, dtype=int)
        lo = np.where(ctx > 0, (lo - ctx) // int(align) * int(align), lo)
        hi = hi + ctx
    lo, hi = np.maximum(lo, 0), np.minimum(hi, raw_geom.shape)
    window = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    return window, sub_geometry(raw_geom, window)  # type: ignore[return-value]


def blocks(shape: Sequence[int], block_shape: Sequence[int]) -> list[Window]:
    """Core windows tiling a (z, y, x) grid, in C order (the last ones clipped to the grid)."""
    starts = [range(0, s, b) for s, b in zip(shape, block_shape, strict=True)]
    return [
        tuple(slice(o, min(o + b, s)) for o, b, s in zip(origin, block_shape, shape))  # type: ignore[misc]
        for origin in itertools.product(*starts)
    ]


def patch_alignment(patch_size: int, raw_voxel_size: Sequence[float], out_voxel_size: Sequence[float]) -> list[int]:
    """Per axis, the output voxels one backbone patch of raw spans, where that is a whole number
    (>= 1); else 1. A window whose start is a multiple of it starts on the patch grid."""
    unit = patch_size * np.asarray(raw_voxel_size, dtype=float) / np.asarray(out_voxel_size, dtype=float)
    return [int(round(u)) if abs(u - round(u)) < 1e-6 and u >= 1 else 1 for u in unit]


def grow_window(core: Sequence[slice], halo: int | Sequence[int], shape: Sequence[int],
                align: Sequence[int] = (1, 1, 1)) -> Window:
    """``core`` grown by ``halo`` voxels on every side (one value or per axis), clipped to
    ``shape``, the start moved down to a multiple of ``align`` (see :func:`patch_alignment`)."""
    halo3 = np.broadcast_to(np.asarray(halo, dtype=int), (3,))
    return tuple(  # type: ignore[return-value]
        slice(max((s.start - int(h)) // a * a, 0), min(s.stop + int(h), n))
        for s, h, n, a in zip(core, halo3, shape, align, strict=True)
    )


def inner_window(core: Sequence[slice], grown: Sequence[slice]) -> Window:
    """Where ``core`` lies inside ``grown`` (both in voxels of one grid)."""
    return tuple(slice(c.start - g.start, c.stop - g.start) for c, g in zip(core, grown, strict=True))  # type: ignore[return-value]


def superblock_factors(factors: Sequence[int | Sequence[int]]) -> list[np.ndarray]:
    """Super-blocks of a hierarchical merge (``segment.merge_levels``): (z, y, x) blocks per
    super-block at each level, checked (each level's super-blocks unions of the previous level's).

    Raises:
        ValueError: No level, a factor that is not a positive int (or three of them), or a
            level that is not a multiple of the previous one along every axis.
    """
    if isinstance(factors, (str, bytes)) or not isinstance(factors, Sequence) or not factors:
        raise ValueError(f"segment.merge_levels must be a non-empty list of blocks per super-block (an int or "
                         f"[z, y, x]) per level, got {factors!r}")
    out, previous = [], np.ones(3, dtype=np.int64)
    for level, factor in enumerate(factors):
        values = [factor] * 3 if isinstance(factor, (int, np.integer)) else list(factor)  # type: ignore[arg-type]
        if len(values) != 3 or any(isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 1
                                   for x in values):
            raise ValueError(f"segment.merge_levels[{level}] must be a positive int or [z, y, x] of them, "
                             f"got {factor!r}")
        f = np.array(values, dtype=np.int64)
        if np.any(f % previous):
            raise ValueError(f"segment.merge_levels[{level}]: blocks per super-block {f.tolist()} must be "
                             f"multiples of the previous level's {previous.tolist()}")
        out.append(f)
        previous = f
    return out
