"""DINOv3 features of a 3D volume from orthogonal 2D planes, on the label grid.

For each requested plane (``xy``: slices along z, ``xz``: along y, ``yz``: along x):

1. the raw slices are taken at raw resolution (raw may be finer than the output grid),
   intensity-scaled with statistics of the whole volume (never per slice), resampled
   to square pixels (anisotropic voxels, e.g. 40×4×4 nm, become isotropic in-plane),
   padded to a multiple of the patch size and normalised with ImageNet mean/std;
2. the backbone turns each batch of slices into a token grid; with a ``stride``
   smaller than the patch size the image is run at every sub-patch shift and the
   token grids are interleaved (a sliding window);
3. the token grid is resampled bilinearly onto the output grid's in-plane voxel
   centres (geometry in nm, so any raw:output ratio works);
4. along the slicing axis, all raw slices whose centres lie inside an output voxel
   are averaged (anti-aliasing); an output voxel with no raw slice centre inside it
   takes the nearest raw slice.

Every plane streams straight into one float32 accumulator of shape (C, z, y, x) on the
backbone's device, channels fastest in memory like the chunks of feature stores (steps 3
and 4 run there too: the token grids of the raw slices in one output slice are combined
first, then resampled once, separably), already divided by the number of
planes, so the result is the mean of the planes with no full-size copy per plane and one
device-to-host copy per volume (or per block, :func:`extract_features_blockwise`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dinopipe import __version__
from dinopipe.backbone import IMAGENET_MEAN, IMAGENET_STD, TINY_BACKBONES, Backbone
from dinopipe.geometry import (
    Geometry,
    blocks,
    check_ratio,
    grow_window,
    inner_window,
    patch_alignment,
    raw_window,
    slice_weights,
    sub_geometry,
)
from dinopipe.ngff import FEATURE_ORDER
from dinopipe.runtime import autocast_context, autocast_mode, compute_precision
from dinopipe.sources import intensity_range

logger = logging.getLogger(__name__)

#: Plane name -> (slicing axis, in-plane axes) in (z, y, x) axis numbers.
PLANES: dict[str, tuple[int, tuple[int, int]]] = {"xy": (0, (1, 2)), "xz": (1, (0, 2)), "yz": (2, (0, 1))}

#: Default in-plane context around the output grid, in backbone patches (``features.context_nm: null``).
CONTEXT_PATCHES = 4

#: A guided upsampler: (tokens (B, C, h, w), images (B, 3, H, W)) -> (B, C, H', W').
Upsampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class FeatureParams:
    """Parameters of feature extraction (config section ``features``).

    Attributes:
        backbone: "tiny-vit", "tiny-convnext", a hub id or a local snapshot directory.
        revision: Hub revision, or None.
        planes: Subset of "xy", "xz", "yz".
        stride: Token stride in pixels; None means the patch size. Must divide it.
        batch_size: Slices per backbone call.
        intensity: "percentile" (scale ``low``..``high`` percentiles of the volume to
            0..1) or "dtype" (the integer dtype's range).
        low: Lower percentile (percentile mode).
        high: Upper percentile (percentile mode).
        max_slice_size: Cap on the longer side of a slice fed to the backbone, pixels.
        device: "auto", "cpu" or "cuda".
        autocast: Mixed precision on CUDA (:data:`dinopipe.runtime.AUTOCAST`; true means bf16,
            false none); CPU always runs float32.
        seed: Seed of the random weights of the tiny backbones.
        block_shape: Process the volume in blocks of this many output voxels (z, y, x);
            None: the whole volume at once unless its float32 accumulator would exceed
            ``max_memory_mb``, in which case cubic blocks that fit are chosen.
        block_halo: Context (output voxels) added around each block.
        max_memory_mb: Accumulator size (MB) above which blocks are used automatically.
        upsampler: A guided upsampler, ``"path/to/file.py:factory"`` (see
            :func:`load_upsampler`); None: the token grid is resampled bilinearly.
        context_nm: In-plane raw context (nm) read around the output grid on every side
            where the raw extends beyond it, so the backbone does not see padding at the
            faces of a crop (labels covering part of the raw, an ROI, a block); None:
            :data:`CONTEXT_PATCHES` patches of the backbone at the raw's in-plane voxel size
            (e.g. 64 raw pixels for a ViT with 16-pixel patches); 0: none.

        shard_shape: Storage layout of the written store (runtime-only, never the values):
            spatial shard edge in output voxels, rounded up to whole
            :data:`dinopipe.io.FEATURE_CHUNK` chunks (:func:`dinopipe.io.shard_shape`), for a
            sharded Zarr v3 / OME-NGFF 0.5 store; None: Zarr v2, one file per chunk.
    """

    backbone: str = "tiny-vit"
    revision: str | None = None
    planes: list[str] = field(default_factory=lambda: ["xy", "xz", "yz"])
    stride: int | None = None
    batch_size: int = 16
    intensity: str = "percentile"
    low: float = 0.5
    high: float = 99.5
    max_slice_size: int = 1024
    device: str = "auto"
    autocast: bool | str = True
    seed: int = 0
    block_shape: list[int] | None = None
    block_halo: int = 16
    max_memory_mb: float = 8192.0
    upsampler: str | None = None
    context_nm: float | None = None
    shard_shape: int | None = None

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> FeatureParams:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"unknown key(s) in config section 'features': {unknown}; allowed: {sorted(known)}")
        params = cls(**dict(section))
        params.validate()
        return params

    def validate(self) -> None:
        bad = [p for p in self.planes if p not in PLANES]
        if bad or not self.planes or len(set(self.planes)) != len(self.planes):
            raise ValueError(f"features.planes must be a non-empty subset of {list(PLANES)}, got {self.planes}")
        if self.intensity not in ("percentile", "dtype"):
            raise ValueError(f"features.intensity must be 'percentile' or 'dtype', got {self.intensity!r}")
        if not 0 <= self.low < self.high <= 100:
            raise ValueError(f"features.low/high must satisfy 0 <= low < high <= 100, got {self.low}, {self.high}")
        if self.batch_size < 1:
            raise ValueError(f"features.batch_size must be >= 1, got {self.batch_size}")
        autocast_mode(self.autocast, "features.autocast")
        if self.context_nm is not None and not self.context_nm >= 0:
            raise ValueError(f"features.context_nm must be >= 0 nm or null, got {self.context_nm}")
        if self.shard_shape is not None and (isinstance(self.shard_shape, bool) or not isinstance(self.shard_shape, int)
                                             or self.shard_shape < 1):
            raise ValueError(f"features.shard_shape must be a positive integer (voxels) or null, got {self.shard_shape!r}")
        if self.block_shape is not None and (len(self.block_shape) != 3 or min(self.block_shape) < 1):
            raise ValueError(f"features.block_shape must be 3 positive voxel counts (z, y, x), got {self.block_shape}")

    def context_pixels(self, patch_size: int, raw_voxel_nm: float) -> int:
        """The in-plane context in raw pixels along an axis of ``raw_voxel_nm`` nm voxels."""
        if self.context_nm is None:
            return CONTEXT_PATCHES * int(patch_size)
        return int(math.ceil(float(self.context_nm) / float(raw_voxel_nm) - 1e-9))

    def blocking(self, channels: int, shape: Sequence[int]) -> list[int] | None:
        """The block shape to use for an output grid of ``shape`` (None: whole volume)."""
        if self.block_shape is not None:
            return list(self.block_shape)
        need_mb = channels * float(np.prod(shape)) * 4 / 2**20
        if need_mb <= self.max_memory_mb:
            return None
        # cubic blocks whose grown accumulator fits in the budget
        side = int((self.max_memory_mb * 2**20 / (channels * 4)) ** (1 / 3)) - 2 * self.block_halo
        side = max(side, 16)
        return [min(side, s) for s in shape]


@dataclass
class PlaneTimings:
    prepare_s: float = 0.0
    backbone_s: float = 0.0
    resample_s: float = 0.0
    slices: int = 0
    image_size: tuple[int, int] = (0, 0)


def _token_coords(
    out_centres_nm: np.ndarray, begin_nm: float, pixel_nm: float, patch: float, stride: float
) -> np.ndarray:
    """Token coordinates (token k at k) of output voxel centres along one in-plane axis.

    Token k of a sliding window with ``stride`` covers pixels [k*stride, k*stride+patch),
    centre at pixel coordinate k*stride + patch/2 (in units where pixel m spans [m, m+1)).
    """
    pix = (out_centres_nm - begin_nm) / pixel_nm
    return (pix - patch / 2) / stride


@dataclass(frozen=True)
class _Taps:
    """Bilinear interpolation along one axis: output element o = lerp(map[lo[o]], map[hi[o]], frac[o]).

    Coordinates beyond the first or last map element take that element (grid_sample's
    ``padding_mode="border"`` with ``align_corners=True``).
    """

    lo: torch.Tensor
    hi: torch.Tensor
    frac: torch.Tensor
    #: (lo, hi, first, stop): the runs of consecutive output elements between the same two map
    #: elements (coordinates increase with the output index, so each pair is one run)
    runs: tuple[tuple[int, int, int, int], ...]

    @classmethod
    def of(cls, coords: np.ndarray, n: int, device: torch.device | str) -> _Taps:
        p = np.clip(np.asarray(coords, dtype=np.float64), 0, n - 1)
        lo = np.clip(np.floor(p), 0, max(n - 2, 0)).astype(np.int64)
        hi = np.minimum(lo + 1, n - 1)
        starts = [0, *(np.flatnonzero(np.diff(lo)) + 1).tolist(), len(lo)]
        runs = tuple((int(lo[a]), int(hi[a]), a, b) for a, b in zip(starts[:-1], starts[1:]) if b > a)
        return cls(torch.as_tensor(lo, device=device), torch.as_tensor(hi, device=device),
                   torch.as_tensor(p - lo, dtype=torch.float32, device=device), runs)


class _Plane:
    """Geometry of one plane: which raw slices, their in-plane crop and image size."""

    def __init__(self, name: str, raw_geom: Geometry, out_geom: Geometry, backbone: Backbone, params: FeatureParams):
        self.name = name
        self.axis, (self.b, self.c) = PLANES[name]
        rv, ov = np.asarray(raw_geom.voxel_size), np.asarray(out_geom.voxel_size)
        rt, ot = np.asarray(raw_geom.translation), np.asarray(out_geom.translation)
        a, b, c = self.axis, self.b, self.c
        self.contributions = slice_weights(rt[a], rv[a], raw_geom.shape[a], ot[a], ov[a], out_geom.shape[a])
        # in-plane raw extent: the raw voxels overlapping the output grid, grown by the context
        # where the raw extends beyond it, the start then moved down onto the patch grid of
        # the raw array (so tokens sit where they sit for the whole array)
        context = [0 if ax == a else params.context_pixels(backbone.patch_size, rv[ax]) for ax in range(3)]
        window, _ = raw_window(raw_geom, out_geom, context, align=backbone.patch_size)
        self.crop: list[slice] = [window[b], window[c]]
        begins = [raw_geom.begin_nm[ax] + window[ax].start * rv[ax] for ax in (b, c)]
        extent = [(s.stop - s.start) * rv[ax] for s, ax in zip(self.crop, (b, c))]
        pixel = min(rv[b], rv[c])  # square pixels at the finer in-plane resolution
        longest = max(extent) / pixel
        if longest > params.max_slice_size:
            pixel *= longest / params.max_slice_size
        self.size = tuple(max(1, int(round(e / pixel))) for e in extent)
        # the exact pixel size per axis after rounding the image size
        self.pixel_nm = [e / n for e, n in zip(extent, self.size)]
        p = self.patch = backbone.patch_size
        self.stride = params.stride or p
        self.shifts = p // self.stride
        self.padded = tuple(int(math.ceil(n / p)) * p for n in self.size)
        self.tokens_shape = tuple(self.padded[i] // p * self.shifts for i in range(2))
        self._centres = [ot[ax] + ov[ax] * np.arange(out_geom.shape[ax]) for ax in (b, c)]
        self._begins = begins
        self._taps: dict[tuple[int, int, str], tuple[_Taps, _Taps]] = {}

    def taps_for(self, shape: Sequence[int], device: torch.device | str = "cpu") -> tuple[_Taps, _Taps]:
        """Bilinear taps of the output voxels in a feature map of ``shape`` (rows, columns).

        Rows and columns are the plane's in-plane axes in (z, y, x) order; the taps run over
        the output grid's voxels along them. Cached per map shape and device.

        A map of the token grid's shape has the backbone's patch/stride geometry; any
        other shape (a guided upsampler's output) is taken as a uniform grid over the
        padded image, each element covering ``padded / shape`` pixels.
        """
        key = (int(shape[0]), int(shape[1]), str(device))
        if key not in self._taps:
            taps = []
            for i in range(2):
                if key[:2] == self.tokens_shape:
                    patch, stride = float(self.patch), float(self.stride)
                else:
                    patch = stride = self.padded[i] / key[i]
                coords = _token_coords(self._centres[i], self._begins[i], self.pixel_nm[i], patch, stride)
                taps.append(_Taps.of(coords, key[i], device))
            self._taps[key] = (taps[0], taps[1])
        return self._taps[key]

    def batches(self, batch_size: int) -> list[list[tuple[int, list[tuple[int, float]]]]]:
        """The raw slices in backbone batches: per batch, (raw index along the slicing axis,
        [(output index, weight), ...]) per slice, in increasing raw index."""
        order = self.contributions
        return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]

    def take(self, raw: np.ndarray, indices: Sequence[int]) -> np.ndarray:
        """Raw slices (B, H, W) at ``indices`` along the slicing axis, cropped in-plane."""
        index: list[Any] = [slice(None)] * 3
        index[self.axis] = list(indices)
        index[self.b], index[self.c] = self.crop
        block = np.asarray(raw[tuple(index)])
        return np.moveaxis(block, self.axis, 0)


def _prepare(
    slices: np.ndarray, plane: _Plane, lo: float, hi: float, device: torch.device
) -> torch.Tensor:
    """Scale, resize to square pixels, pad and ImageNet-normalise a batch of slices."""
    x = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32)).to(device)
    x = ((x - lo) / (hi - lo)).clamp_(0, 1)[:, None]
    if tuple(x.shape[-2:]) != plane.size:
        shrinking = any(s > t for s, t in zip(x.shape[-2:], plane.size))
        x = F.interpolate(x, size=plane.size, mode="bilinear", align_corners=False, antialias=shrinking)
    pad_h, pad_w = plane.padded[0] - plane.size[0], plane.padded[1] - plane.size[1]
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std


def _tokens_sliding(backbone: Backbone, images: torch.Tensor, plane: _Plane, autocast: bool | str) -> torch.Tensor:
    """Token grid (B, C, h*shifts, w*shifts) with the plane's stride."""
    n, s = plane.shifts, plane.stride
    with autocast_context(images.device, autocast):
        if n == 1:
            return backbone.tokens(images)
        grids = {}
        for u in range(n):
            for v in range(n):
                shifted = images[:, :, u * s :, v * s :]
                shifted = F.pad(shifted, (0, v * s, 0, u * s), mode="replicate")
                grids[u, v] = backbone.tokens(shifted)
    b, ch, gh, gw = grids[0, 0].shape
    fine = images.new_empty((b, ch, gh * n, gw * n), dtype=torch.float32)
    for (u, v), g in grids.items():
        fine[:, :, u::n, v::n] = g
    return fine


def load_upsampler(spec: str, device: torch.device) -> Upsampler:
    """Load a guided upsampler from a local Python file: ``"path/to/file.py:factory"``.

    ``factory(device)`` is called once and must return a callable (e.g. an
    ``nn.Module``) taking ``tokens`` (B, C, h, w), the backbone's token grid, and
    ``images`` (B, 3, H, W), the normalised images fed to the backbone, and returning
    (B, C, H', W') features covering the same (padded) image extent uniformly —
    typically H' = H, W' = W. dinopipe then resamples that map onto the output grid
    bilinearly. The file loads its own weights from local paths: nothing is fetched.
    """
    path, _, factory_name = spec.rpartition(":")
    if not path or not factory_name:
        raise ValueError(f"features.upsampler must be 'path/to/file.py:factory', got {spec!r}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"features.upsampler: no such file {path}")
    module_spec = importlib.util.spec_from_file_location(f"dinopipe_upsampler_{Path(path).stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"features.upsampler: cannot import {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ValueError(f"features.upsampler: {path} has no callable {factory_name!r}")
    upsampler = factory(device)

    def upsample(tokens: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = upsampler(tokens, images)
        if out.ndim != 4 or out.shape[:2] != tokens.shape[:2]:
            raise ValueError(f"upsampler {spec} returned shape {tuple(out.shape)} for tokens {tuple(tokens.shape)}")
        return out

    return upsample


#: Upper bound on the bytes of column-resampled feature maps held at once (output slices of a
#: batch are resampled together up to it).
RESAMPLE_CHUNK_BYTES = 32 * 2**20


def _accumulate(
    acc: torch.Tensor, tokens: torch.Tensor, plane: _Plane, batch: Sequence[tuple[int, list[tuple[int, float]]]],
    scale: float, fresh: set[int] | None = None,
) -> None:
    """Resample a batch's token grids onto the output plane and add them into ``acc``.

    Everything runs on ``acc``'s device (the backbone's): nothing goes to the host.

    Resampling and the average along the slicing axis are both linear, so the token
    grids of the raw slices that fall into one output slice are first combined with
    their weights (times ``scale``), and each output slice's combined grid is resampled
    once (with a raw:output ratio of 2 along the slicing axis, half the resampling of
    doing it per raw slice). Bilinear resampling is separable: along the columns on the
    small maps, then along the rows straight into the accumulator, one run of output rows
    between the same two map rows at a time (channels fastest, as in the accumulator:
    :func:`extract_features`), so no resampled slice is ever held whole. Consecutive
    output slices of the batch go together (up to :data:`RESAMPLE_CHUNK_BYTES` of
    column-resampled maps), so the number of tensor operations does not grow with the
    number of slices. The result equals ``F.grid_sample(..., mode="bilinear",
    padding_mode="border", align_corners=True)`` at the output voxel centres up to float
    rounding.

    Args:
        acc: The (C, z, y, x) float32 accumulator on the output grid (output voxels).
        tokens: The batch's feature maps (B, C, h, w), on ``acc``'s device.
        plane: The plane the batch was sliced along.
        batch: (raw slice index, [(output slice index, weight), ...]) per map in ``tokens``.
        scale: Factor on every weight (1 / number of planes).
        fresh: Output slice indices (along the plane's slicing axis) not yet written: the
            first contribution to one of them is copied in rather than added to whatever
            ``acc`` holds there, and the index is removed. None: add everywhere.
    """
    rows, cols = plane.taps_for(tokens.shape[-2:], tokens.device)
    outs = sorted({i for _, targets in batch for i, _ in targets})
    pos = {i: n for n, i in enumerate(outs)}
    combined = tokens.new_empty((len(outs), *tokens.shape[1:]))  # per output slice: its raw slices' weighted sum
    started: set[int] = set()
    for k, (_, targets) in enumerate(batch):
        for i, w in targets:
            if i in started:
                combined[pos[i]].add_(tokens[k], alpha=w * scale)
            else:
                torch.mul(tokens[k], w * scale, out=combined[pos[i]])
                started.add(i)
    # groups of consecutive output slices, all fresh or none, within the byte bound
    limit = max(1, RESAMPLE_CHUNK_BYTES // (len(cols.lo) * tokens.shape[2] * tokens.shape[1] * 4))
    groups: list[list[Any]] = []
    for i in outs:
        first = fresh is not None and i in fresh
        g = groups[-1] if groups else None
        if g is not None and i == g[1] and first == g[2] and g[1] - g[0] < limit:
            g[1] += 1
        else:
            groups.append([i, i + 1, first])
    row_frac = rows.frac.view(1, 1, -1, 1)
    for i0, i1, first in groups:
        maps = combined[pos[i0] : pos[i0] + i1 - i0]  # (n, C, h, w)
        m = maps.permute(0, 3, 2, 1).contiguous()  # (n, w, h, C)
        m = m.index_select(1, cols.lo).lerp_(m.index_select(1, cols.hi), cols.frac.view(1, -1, 1, 1))  # (n, Wo, h, C)
        steps = m[:, :, 1:] - m[:, :, :-1]  # map row k + 1 minus row k
        # (n, Wo, Ho, C) view of the output slices i0..i1
        target = acc.narrow(1 + plane.axis, i0, i1 - i0).permute(1 + plane.axis, 1 + plane.c, 1 + plane.b, 0)
        # along the rows, one run of output rows between map rows lo and hi at a time:
        # lo + frac * (hi - lo) straight into the accumulator, no full-size temporary
        for lo, hi, a, b in rows.runs:
            base = m[:, :, lo : lo + 1]
            if hi == lo:  # maps of one row
                step, frac = base, row_frac[:, :, a:b] * 0
            else:
                step, frac = steps[:, :, lo : lo + 1], row_frac[:, :, a:b]
            if first:
                torch.addcmul(base, frac, step, out=target[:, :, a:b])
            else:
                target[:, :, a:b].add_(base).addcmul_(frac, step)
        if first:
            fresh.difference_update(range(i0, i1))  # type: ignore[union-attr]


def extract_features(
    raw: np.ndarray,
    raw_geom: Geometry,
    out_geom: Geometry,
    backbone: Backbone,
    params: FeatureParams,
    *,
    volume: str = "volume",
    upsampler: Upsampler | None = None,
    progress: Callable[[int], None] | None = None,
    intensity: tuple[float, float] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Compute the plane-averaged DINOv3 features of a volume on the output grid.

    Args:
        raw: Raw intensities (z, y, x) on ``raw_geom`` (any array supporting numpy
            indexing, e.g. a zarr array).
        raw_geom: Geometry of ``raw`` (nm).
        out_geom: The output (label) grid (nm); must lie inside the raw extent.
        backbone: The loaded backbone.
        params: Feature parameters.
        volume: Volume name for error messages.
        upsampler: Optional guided upsampler applied to each token grid before the
            bilinear resampling to the output grid (see :data:`Upsampler`).
        progress: Called with the number of slices processed after each batch.
        intensity: The (lo, hi) intensity range mapped to 0..1; default: computed from
            ``raw`` (pass the whole volume's range when ``raw`` is one block of it).

    Returns:
        (features (C, z, y, x) float32, info) where info holds the intensity range,
        the image size per plane and a timing breakdown in seconds. The features are in
        the memory order feature stores keep in their chunks (:data:`dinopipe.ngff.FEATURE_ORDER`:
        Fortran order, channels fastest).
    """
    params.validate()
    check_ratio(raw_geom.voxel_size, out_geom.voxel_size, volume)
    if raw.ndim != 3:
        raise ValueError(f"volume {volume!r}: raw must be 3D (z, y, x), got shape {raw.shape}")
    if np.any(out_geom.begin_nm < raw_geom.begin_nm - 1e-6) or np.any(out_geom.end_nm > raw_geom.end_nm + 1e-6):
        raise ValueError(
            f"volume {volume!r}: output grid {out_geom.begin_nm.tolist()}–{out_geom.end_nm.tolist()} nm "
            f"is not inside the raw extent {raw_geom.begin_nm.tolist()}–{raw_geom.end_nm.tolist()} nm"
        )
    if params.stride is not None and (params.stride < 1 or backbone.patch_size % params.stride):
        raise ValueError(f"features.stride {params.stride} must divide the patch size {backbone.patch_size}")
    try:
        lo, hi = intensity or intensity_range(raw, params.intensity, params.low, params.high)
    except ValueError as exc:
        raise ValueError(f"volume {volume!r}: {exc}") from exc
    # the accumulator lives on the backbone's device: resampling and accumulating run there,
    # and the host gets one copy at the end; the first plane copies into every output slice
    # (each has at least one raw slice) rather than adding into zeros
    # channels fastest in memory when feature stores keep that order inside their chunks
    # (FEATURE_ORDER "F"): the float16 write then copies runs instead of transposing the
    # whole volume, and every plane's output slice has the same (channel-fastest) layout
    shape = (backbone.channels, *out_geom.shape)
    if FEATURE_ORDER == "F":
        acc = torch.empty(shape[::-1], dtype=torch.float32, device=backbone.device).permute(3, 2, 1, 0)
    else:
        acc = torch.empty(shape, dtype=torch.float32, device=backbone.device)
    timings: dict[str, Any] = {}
    sizes: dict[str, list[int]] = {}
    scale = 1.0 / len(params.planes)
    for n, name in enumerate(params.planes):
        plane = _Plane(name, raw_geom, out_geom, backbone, params)
        fresh = set(range(out_geom.shape[plane.axis])) if n == 0 else None
        t = PlaneTimings(image_size=plane.padded)
        sizes[name] = list(plane.padded)
        for batch in plane.batches(params.batch_size):
            t0 = time.perf_counter()
            images = _prepare(plane.take(raw, [j for j, _ in batch]), plane, lo, hi, backbone.device)
            t1 = time.perf_counter()
            tokens = _tokens_sliding(backbone, images, plane, params.autocast)
            if upsampler is not None:
                tokens = upsampler(tokens, images).float()
            t2 = time.perf_counter()
            _accumulate(acc, tokens, plane, batch, scale, fresh)
            t3 = time.perf_counter()
            t.prepare_s += t1 - t0
            t.backbone_s += t2 - t1
            t.resample_s += t3 - t2
            t.slices += len(batch)
            if progress is not None:
                progress(len(batch))
        if fresh:
            raise RuntimeError(f"volume {volume!r} plane {name}: output slices {sorted(fresh)[:5]} got no raw slice")
        timings[name] = asdict(t)
        logger.info(
            "volume %s plane %s: %d slices of %s px, backbone %.2fs, prepare %.2fs, resample %.2fs",
            volume, name, t.slices, plane.padded, t.backbone_s, t.prepare_s, t.resample_s,
        )
    info = {"intensity_range": [lo, hi], "image_size": sizes, "timings": timings}
    return acc.cpu().numpy(), info


def context_raw_window(
    raw_geom: Geometry, out_geom: Geometry, params: FeatureParams, patch_size: int,
) -> tuple[tuple[slice, slice, slice], Geometry]:
    """The raw a feature computation of ``out_geom`` reads: the raw under it plus
    ``params``' context (:meth:`FeatureParams.context_pixels`) on every side where the raw
    extends, the start on the patch grid of the whole raw (see :func:`raw_window`)."""
    context = [params.context_pixels(patch_size, v) for v in raw_geom.voxel_size]
    return raw_window(raw_geom, out_geom, context, align=patch_size)


@dataclass(frozen=True)
class BlockWindow:
    """One block of a blockwise feature computation.

    Attributes:
        core: The block's core in output voxels (z, y, x): what it writes.
        grown: The core grown by the halo, start on the patch grid (output voxels): what it computes.
        raw: The raw window read for it, in raw voxels (z, y, x): ``grown``'s raw plus the context.
        raw_geom: Geometry (nm) of that raw window.
        out_geom: Geometry (nm) of ``grown``.
    """

    core: tuple[slice, slice, slice]
    grown: tuple[slice, slice, slice]
    raw: tuple[slice, slice, slice]
    raw_geom: Geometry
    out_geom: Geometry


def block_windows(
    raw_geom: Geometry, out_geom: Geometry, params: FeatureParams, patch_size: int,
    block_shape: Sequence[int], halo: Sequence[int] | int,
) -> list[BlockWindow]:
    """The blocks :func:`extract_features_blockwise` computes, in order.

    Every grown block's start is aligned to the whole volume's patch grid (in output voxels,
    where one patch of raw voxels is a whole number of them) so tokens sit where they would
    sit for the whole volume.
    """
    align = patch_alignment(patch_size, raw_geom.voxel_size, out_geom.voxel_size)
    out = []
    for core in blocks(out_geom.shape, block_shape):
        grown = grow_window(core, halo, out_geom.shape, align)
        sub_out = sub_geometry(out_geom, grown)
        window, sub_raw = context_raw_window(raw_geom, sub_out, params, patch_size)
        out.append(BlockWindow(core, grown, window, sub_raw, sub_out))  # type: ignore[arg-type]
    return out


def extract_features_blockwise(
    raw: np.ndarray,
    raw_geom: Geometry,
    out_geom: Geometry,
    backbone: Backbone,
    params: FeatureParams,
    write: Callable[[tuple[slice, slice, slice], np.ndarray], None],
    *,
    block_shape: Sequence[int],
    halo: Sequence[int] | int = 8,
    volume: str = "volume",
    upsampler: Upsampler | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Features of a volume too large for memory, block by block with a halo.

    Each block's features are computed from the raw under the block grown by ``halo``
    output voxels on every side (clipped to the volume; the start moved down onto the
    volume's patch grid), so the backbone sees context across block faces and its
    tokens sit where they would for the whole volume; only the core is written. The intensity range is the
    whole volume's. Memory is bounded by one grown block's accumulator and raw.

    Slices are independent, so along a plane's slicing axis blocking changes nothing;
    within a slice, a ViT attends over the whole (cropped) slice, so cores differ
    slightly from whole-volume features: the halo keeps seams small.

    Args:
        raw, raw_geom, out_geom, backbone, params, volume, upsampler, progress: as in
            :func:`extract_features`.
        write: Called with (core window in output voxels, features (C, ...) float32).
        block_shape: Core block shape in output voxels (z, y, x).
        halo: Context in output voxels added on each side (one value or per axis).

    Returns:
        Info as :func:`extract_features` returns, with timings summed over blocks.
    """
    try:
        lo, hi = intensity_range(raw, params.intensity, params.low, params.high)
    except ValueError as exc:
        raise ValueError(f"volume {volume!r}: {exc}") from exc
    info: dict[str, Any] = {"intensity_range": [lo, hi], "timings": {}, "blocks": 0}
    for block in block_windows(raw_geom, out_geom, params, backbone.patch_size, block_shape, halo):
        feats, block_info = extract_features(
            np.asarray(raw[block.raw]), block.raw_geom, block.out_geom, backbone, params, volume=volume,
            upsampler=upsampler, progress=progress, intensity=(lo, hi),
        )
        write(block.core, feats[(slice(None), *inner_window(block.core, block.grown))])  # type: ignore[arg-type]
        info["blocks"] += 1
        info["image_size"] = block_info["image_size"]
        for plane, t in block_info["timings"].items():
            total = info["timings"].setdefault(plane, {k: 0 for k in t if k != "image_size"})
            for k in total:
                total[k] += t[k]
    return info


def signature(backbone: Backbone, params: FeatureParams, raw_geom: Geometry, out_geom: Geometry,
              intensity: Sequence[float], image_size: Mapping[str, Sequence[int]]) -> dict[str, Any]:
    """What produced a feature volume; stored with it and checked when it is read."""
    return {
        "model_id": backbone.name,
        "revision": backbone.revision,
        "weights_hash": backbone.weights_hash,
        "architecture": backbone.architecture,
        "patch_size": backbone.patch_size,
        "channels": backbone.channels,
        "planes": list(params.planes),
        "stride": params.stride or backbone.patch_size,
        "image_size": {k: list(v) for k, v in image_size.items()},
        "max_slice_size": params.max_slice_size,
        "context_nm": params.context_nm,
        # what the backbone computed in: "bf16"/"fp16" (CUDA autocast) or "fp32"
        "precision": compute_precision(backbone.device, params.autocast),
        "normalisation": {
            "intensity": params.intensity,
            "low": params.low,
            "high": params.high,
            "range": [float(v) for v in intensity],
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
        },
        "raw_voxel_size": list(raw_geom.voxel_size),
        "voxel_size": list(out_geom.voxel_size),
        # how the token grid reached the image grid: None (bilinear) or the guided upsampler's
        # spec and the SHA-256 of its file
        "upsampler": params.upsampler,
        "upsampler_sha256": _file_sha256(params.upsampler.rsplit(":", 1)[0]) if params.upsampler else None,
        "dinopipe_version": __version__,
    }


def _file_sha256(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def expected_signature(params: FeatureParams) -> dict[str, Any]:
    """The part of a signature that follows from the configuration alone."""
    expected = {
        "model_id": params.backbone,
        "revision": params.revision if params.backbone not in TINY_BACKBONES else None,
        "planes": list(params.planes),
        "normalisation.intensity": params.intensity,
        "normalisation.low": params.low,
        "normalisation.high": params.high,
        "max_slice_size": params.max_slice_size,
        "upsampler": params.upsampler,
        "context_nm": params.context_nm,
        "dinopipe_version": __version__,
    }
    if params.stride is not None:
        expected["stride"] = params.stride
    return expected


#: Signature keys that must agree between feature volumes used by one model: what
#: defines the feature space. (Per-volume keys such as the intensity range, raw voxel
#: size and image size may differ.)
MODEL_KEYS = (
    "model_id",
    "revision",
    "weights_hash",
    "architecture",
    "patch_size",
    "channels",
    "planes",
    "stride",
    "max_slice_size",
    "upsampler",
    "upsampler_sha256",
    "voxel_size",
    "normalisation.intensity",
    "normalisation.low",
    "normalisation.high",
)


def check_compatible(sig: Mapping[str, Any], reference: Mapping[str, Any], where: str, reference_where: str) -> None:
    """Raise ValueError naming the first :data:`MODEL_KEYS` entry where two signatures differ."""
    for key in MODEL_KEYS:
        a, b = _lookup(sig, key), _lookup(reference, key)
        if a != b:
            raise ValueError(
                f"features at {where} and {reference_where} differ in signature key {key!r}: {a!r} vs {b!r}; "
                f"they were not produced by the same model and settings"
            )


def _lookup(sig: Mapping[str, Any], dotted: str) -> Any:
    value: Any = sig
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return "<missing>"
        value = value[part]
    return value


def check_signature(stored: Mapping[str, Any], expected: Mapping[str, Any], where: str) -> None:
    """Raise ValueError naming the first key whose stored value differs from ``expected``.

    Args:
        stored: Signature read from a feature store.
        expected: Expected values, keyed by dotted paths into the signature
            (e.g. "normalisation.low").
        where: The store's path, for the message.
    """
    for key, want in expected.items():
        have = _lookup(stored, key)
        if have != want:
            raise ValueError(
                f"features at {where} do not match the configuration: signature key {key!r} is "
                f"{have!r} in the store but {want!r} in the config; recompute them "
                f"(e.g. `snakemake {where} --force`)"
            )
