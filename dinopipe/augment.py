"""Training-time augmentation of cached features and targets (never baked into the cache).

Geometric augmentations are the symmetries of the voxel grid: flips, 90° rotations and
axis permutations. A transform is a signed permutation matrix ``R`` (3 x 3, (z, y, x)):
the voxel at input index ``p`` moves to output index ``q`` with ``q_i = s_i p_{perm[i]}``
(plus ``n_i - 1`` where ``s_i = -1``), so an offset vector ``o`` becomes ``R o``.
Axes are only exchanged when they have the same voxel size (nm) and the same crop size
(voxels), so a transformed crop is a crop of the same physical shape.

The transform is applied to features, targets, weights, mask and raw together
(:func:`apply_spatial`). Targets whose values depend on direction are remapped so that
augmenting the targets equals computing the targets of the augmented labels:

* affinities (:func:`transform_affinities`): the edge ``p <-> p + o`` stored at ``p``
  (see :func:`dinopipe.targets.compute_affinities`) becomes the edge ``q <-> q + R o``.
  When ``R o`` is an offset of the set, the channel moves; when ``-R o`` is, the edge is
  stored at the other end, so the channel also shifts by ``R o``. The crop is read with a
  margin of the largest offset component, so the shifted-in values are the true ones
  (0 outside the volume, as computed).
* LSDs (:func:`transform_lsds`): mean offsets and Pearson correlations change sign (stored
  as ``v`` → ``1 - v``) under flips, and channels follow the permutation.

Feature-space noise and channel dropout (:func:`feature_noise`) and the raw channel's
intensity augmentation (:func:`raw_intensity`: gamma, contrast, brightness, noise; the
raw only, never the features or targets) run on the device, on float32 inputs, with a
seeded ``torch.Generator``.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported where it is used: the workflow's start-up checks use the group only
    import torch

logger = logging.getLogger(__name__)

DEFAULT_AUGMENT_PARAMS: dict[str, Any] = {
    "flip": True,  # mirror along each axis
    "rot90": True,  # 90° rotations in planes of two axes with equal voxel and crop size
    "transpose": True,  # exchange axes with equal voxel size and crop size
    "feature_noise": 0.0,  # std of Gaussian noise added to the features (feature units)
    "channel_dropout": 0.0,  # probability of zeroing each feature channel of a crop
    "raw_gamma": 0.0,  # raw channel: gamma drawn log-uniformly from [1/(1+g), 1+g] per crop; 0: off
    "raw_contrast": 0.0,  # raw channel: (raw - crop mean) scaled by a factor from [1-c, 1+c] per crop
    "raw_brightness": 0.0,  # raw channel: a shift from [-b, b] per crop (raw units, 0..1 scale)
    "raw_noise": 0.0,  # raw channel: std of added Gaussian noise (raw units, 0..1 scale)
}
"""Defaults of ``train.augment``."""

RAW_INTENSITY_KEYS = ("raw_gamma", "raw_contrast", "raw_brightness", "raw_noise")
"""Keys of ``train.augment`` that change the raw channel's intensities (:func:`raw_intensity`)."""

PEARSON_PAIRS = ((0, 1), (0, 2), (1, 2))
"""Axis pairs of LSD channels 6, 7, 8 (zy, zx, yx); see :data:`dinopipe.targets.LSD_CHANNELS`."""


def resolve_augment_params(params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Merge ``params`` over :data:`DEFAULT_AUGMENT_PARAMS` and check them.

    Raises:
        ValueError: Unknown key or bad value (named).
    """
    params = dict(params or {})
    unknown = sorted(set(params) - set(DEFAULT_AUGMENT_PARAMS))
    if unknown:
        raise ValueError(f"unknown train.augment parameters {unknown}; allowed: {sorted(DEFAULT_AUGMENT_PARAMS)}")
    p = {**DEFAULT_AUGMENT_PARAMS, **params}
    for key in ("flip", "rot90", "transpose"):
        if not isinstance(p[key], bool):
            raise ValueError(f"train.augment.{key} must be true or false, got {p[key]!r}")
    noise = p["feature_noise"]
    if isinstance(noise, bool) or not isinstance(noise, int | float) or noise < 0:
        raise ValueError(f"train.augment.feature_noise must be a number >= 0, got {noise!r}")
    drop = p["channel_dropout"]
    if isinstance(drop, bool) or not isinstance(drop, int | float) or not 0 <= drop < 1:
        raise ValueError(f"train.augment.channel_dropout must be a number in [0, 1), got {drop!r}")
    p["feature_noise"], p["channel_dropout"] = float(noise), float(drop)
    for key in RAW_INTENSITY_KEYS:
        value = p[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
            raise ValueError(f"train.augment.{key} must be a number in [0, 1), got {value!r}")
        p[key] = float(value)
    return p


def exchangeable_axes(voxel_size: Sequence[float], crop_shape: Sequence[int]) -> list[list[int]]:
    """Groups of axes that may be exchanged: equal voxel size (nm) and equal crop size (voxels)."""
    groups: list[list[int]] = []
    for axis in range(3):
        for group in groups:
            first = group[0]
            if np.isclose(voxel_size[axis], voxel_size[first]) and crop_shape[axis] == crop_shape[first]:
                group.append(axis)
                break
        else:
            groups.append([axis])
    return groups


def transform_group(
    params: Mapping[str, Any], voxel_size: Sequence[float], crop_shape: Sequence[int]
) -> list[np.ndarray]:
    """All signed permutation matrices generated by the enabled augmentations (identity first).

    Generators: a flip of each axis (``flip``), the exchange of two exchangeable axes
    (``transpose``) and the 90° rotation in the plane of two exchangeable axes (``rot90``).
    Sampling uniformly from the returned list samples the group uniformly.
    """
    generators = []
    eye = np.eye(3, dtype=np.int64)
    if params.get("flip"):
        for axis in range(3):
            g = eye.copy()
            g[axis, axis] = -1
            generators.append(g)
    for group in exchangeable_axes(voxel_size, crop_shape):
        for a, b in itertools.combinations(group, 2):
            if params.get("transpose"):
                g = eye.copy()
                g[[a, b]] = g[[b, a]]
                generators.append(g)
            if params.get("rot90"):
                g = eye.copy()
                g[a, a] = g[b, b] = 0
                g[a, b], g[b, a] = 1, -1  # q_a = p_b, q_b = -p_a
                generators.append(g)
    elements = [eye]
    seen = {eye.tobytes()}
    frontier = [eye]
    while frontier:
        new = []
        for element in frontier:
            for g in generators:
                product = g @ element
                key = product.tobytes()
                if key not in seen:
                    seen.add(key)
                    elements.append(product)
                    new.append(product)
        frontier = new
    return elements


def _perm_and_signs(matrix: np.ndarray) -> tuple[list[int], list[int]]:
    perm = [int(np.flatnonzero(row)[0]) for row in matrix]
    signs = [int(matrix[i, perm[i]]) for i in range(3)]
    return perm, signs


def apply_spatial(array: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Transform the last three (z, y, x) axes of ``array`` by the signed permutation ``matrix``.

    Returns a contiguous copy (a view for the identity is returned as is).
    """
    if np.array_equal(matrix, np.eye(3, dtype=matrix.dtype)):
        return array
    lead = array.ndim - 3
    perm, signs = _perm_and_signs(matrix)
    out = np.transpose(array, (*range(lead), *(lead + p for p in perm)))
    flips = tuple(lead + i for i in range(3) if signs[i] < 0)
    if flips:
        out = np.flip(out, axis=flips)
    return np.ascontiguousarray(out)


def apply_spatial_torch(tensor: torch.Tensor, matrix: np.ndarray) -> torch.Tensor:
    """:func:`apply_spatial` for a torch tensor (any device): same values, new memory.

    Used for features, which the loader hands over untransformed so that the flip and
    transpose copies of a 384-channel crop happen on the device, not in the loader.
    """
    import torch

    if np.array_equal(matrix, np.eye(3, dtype=np.asarray(matrix).dtype)):
        return tensor
    lead = tensor.ndim - 3
    perm, signs = _perm_and_signs(np.asarray(matrix))
    out = tensor.permute(*range(lead), *(lead + p for p in perm))
    flips = [lead + i for i in range(3) if signs[i] < 0]
    return torch.flip(out, flips) if flips else out.contiguous()


def check_offsets_closed(offsets: Sequence[Sequence[int]], group: Sequence[np.ndarray]) -> None:
    """Every transformed offset (or its negative) must be an offset of the set.

    Raises:
        ValueError: Naming the offset and the augmentation that leaves the set.
    """
    keys = {tuple(int(v) for v in o) for o in offsets}
    for matrix in group:
        for o in offsets:
            moved = tuple(int(v) for v in matrix @ np.asarray(o))
            if moved not in keys and tuple(-v for v in moved) not in keys:
                raise ValueError(
                    f"affinity offset {list(o)} becomes {list(moved)} under an augmentation "
                    f"(signed permutation {matrix.tolist()}), which is not in the offsets {[list(x) for x in offsets]} "
                    "(nor its negative); add it to targets.offsets or disable train.augment flip/rot90/transpose"
                )


def _shift(array: np.ndarray, offset: Sequence[int]) -> np.ndarray:
    """``out[q] = array[q + offset]`` over the last three axes, 0 where ``q + offset`` is outside."""
    out = np.zeros_like(array)
    src, dst = [], []
    for n, d in zip(array.shape[-3:], offset, strict=True):
        lo, hi = max(0, -d), min(n, n - d)
        if hi <= lo:
            return out
        dst.append(slice(lo, hi))
        src.append(slice(lo + d, hi + d))
    out[(..., *dst)] = array[(..., *src)]
    return out


def transform_affinities(
    padded: np.ndarray, offsets: Sequence[Sequence[int]], matrix: np.ndarray, margin: int
) -> np.ndarray:
    """Augment affinities read with ``margin`` extra voxels on every side; return the core.

    Args:
        padded: (n_offsets, z + 2m, y + 2m, x + 2m) affinities of the crop grown by
            ``margin`` (0 outside the volume), in the storage convention of
            :func:`dinopipe.targets.compute_affinities`.
        offsets: The offsets, in channel order.
        matrix: The signed permutation (see :func:`transform_group`).
        margin: ``m``, at least the largest absolute offset component.

    Returns:
        (n_offsets, z, y, x) affinities of the transformed crop, channel ``k`` for
        ``offsets[k]``: equal to the affinities of the transformed labels.
    """
    index = {tuple(int(v) for v in o): k for k, o in enumerate(offsets)}
    moved = apply_spatial(padded, matrix)
    core = tuple(slice(margin, s - margin) for s in moved.shape[1:])
    out = np.empty((len(offsets), *(s - 2 * margin for s in moved.shape[1:])), dtype=padded.dtype)
    inverse = matrix.T
    for k, o_new in enumerate(offsets):
        o_old = tuple(int(v) for v in inverse @ np.asarray(o_new))
        if o_old in index:
            out[k] = moved[(index[o_old], *core)]
        else:
            j = index.get(tuple(-v for v in o_old))
            if j is None:
                raise ValueError(f"offset {list(o_new)}: neither {list(o_old)} nor its negative is an offset")
            if max(abs(int(v)) for v in o_new) > margin:
                raise ValueError(f"margin {margin} is smaller than offset {list(o_new)}")
            out[k] = _shift(moved[j], [int(v) for v in o_new])[core]
    return out


def transform_lsds(lsds: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Augment (10, z, y, x) LSDs (see :func:`dinopipe.targets.compute_lsds`).

    Channels follow the permutation; under a flip, mean offsets and Pearson correlations
    change sign (stored ``v`` → ``1 - v``) on labelled voxels (size channel > 0; voxels of
    skipped labels stay 0).
    """
    if np.array_equal(matrix, np.eye(3, dtype=matrix.dtype)):
        return lsds
    moved = apply_spatial(lsds, matrix)
    perm, signs = _perm_and_signs(matrix)
    out = np.empty_like(moved)
    labelled = moved[9] > 0
    one = np.asarray(1, dtype=moved.dtype)

    def put(dst: int, src: int, negate: bool) -> None:
        out[dst] = np.where(labelled, one - moved[src], moved[src]) if negate else moved[src]

    for i in range(3):
        put(i, perm[i], signs[i] < 0)
        put(3 + i, 3 + perm[i], False)
    for k, (a, b) in enumerate(PEARSON_PAIRS):
        old = tuple(sorted((perm[a], perm[b])))
        put(6 + k, 6 + PEARSON_PAIRS.index(old), signs[a] * signs[b] < 0)  # type: ignore[arg-type]
    out[9] = moved[9]
    return out


def feature_noise(
    features: torch.Tensor, noise: float, dropout: float, generator: torch.Generator
) -> torch.Tensor:
    """Add Gaussian noise (std ``noise``) and zero whole channels (probability ``dropout``).

    Args:
        features: (B, C, z, y, x) float features on the device.
        noise: Noise std in feature units; 0 for none.
        dropout: Per-crop, per-channel probability of zeroing a channel; 0 for none.
        generator: Seeded generator on the features' device.
    """
    import torch

    if noise > 0:
        features = features + noise * torch.randn(
            features.shape, generator=generator, device=features.device, dtype=features.dtype
        )
    if dropout > 0:
        keep = torch.rand(features.shape[:2], generator=generator, device=features.device) >= dropout
        features = features * keep[:, :, None, None, None].to(features.dtype)
    return features


def raw_intensity(
    raw: torch.Tensor, params: Mapping[str, Any], generator: torch.Generator
) -> torch.Tensor:
    """Augment the raw channel's intensities, per crop: gamma, contrast, brightness, noise.

    In this order, with values drawn independently per crop from ``generator``:
    ``raw = clip(raw, 0, 1) ** gamma`` with ``log(gamma)`` uniform in
    ``[-log(1 + raw_gamma), log(1 + raw_gamma)]``; ``raw = mean + (raw - mean) * c + b``
    with the crop's mean, ``c`` uniform in ``[1 - raw_contrast, 1 + raw_contrast]`` and
    ``b`` uniform in ``[-raw_brightness, raw_brightness]``; plus Gaussian noise of std
    ``raw_noise`` per voxel. A parameter of 0 skips its step (and draws nothing), so with
    all four at 0 the raw comes back unchanged.

    Args:
        raw: (B, 1, z, y, x) float raw on the device, about 0..1 (the targets' ``raw``).
        params: Resolved ``train.augment`` (:func:`resolve_augment_params`).
        generator: Seeded generator on the raw's device.
    """
    import torch

    g, c, b, n = (float(params.get(k, 0.0)) for k in RAW_INTENSITY_KEYS)
    if not (g or c or b or n):
        return raw
    shape = (raw.shape[0],) + (1,) * (raw.dim() - 1)

    def uniform(half_width: float) -> torch.Tensor:
        u = torch.rand(shape, generator=generator, device=raw.device, dtype=raw.dtype)
        return (2 * u - 1) * half_width

    if g:
        raw = raw.clamp(0, 1) ** torch.exp(uniform(math.log1p(g)))
    if c or b:
        mean = raw.mean(dim=tuple(range(1, raw.dim())), keepdim=True)
        raw = mean + (raw - mean) * (1 + uniform(c)) + uniform(b)
    if n:
        raw = raw + n * torch.randn(raw.shape, generator=generator, device=raw.device, dtype=raw.dtype)
    return raw
