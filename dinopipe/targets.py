"""Training targets for 3D EM segmentation: affinities, LSDs, boundary weights, masks, classes.

Every function here is a pure array function: numpy arrays in, numpy arrays out, no file I/O.
Axis order is (z, y, x); multi-channel outputs are channels first, (c, z, y, x). Physical
quantities (voxel sizes, sigmas, distances) are in nanometres unless a name says ``voxels``.

Label ids are kept in their own integer dtype (``uint64`` is typical) end to end: nothing here
casts a label volume to a narrower type. Where an algorithm needs small consecutive ids (the
per-label bounding boxes of :func:`compute_lsds`), labels are relabelled losslessly with
``np.unique(..., return_inverse=True)`` and the original ids are only ever compared, never
converted. Signed label volumes are accepted but must not contain negative ids, except ids
listed as unlabelled: :func:`label_ids` maps those to 0 (and :func:`compute_mask` marks
them unknown) before anything else sees the labels.

Storage:
    The dtypes in which the targets are meant to be written to disk (the functions return the
    dtype stated in their docstrings, which may be wider):

    - affinities: ``uint8`` (0 or 1), :data:`AFFINITY_DTYPE`;
    - LSDs: ``float16`` (:data:`LSD_DTYPE`). :func:`compute_lsds` returns ``float32``; values
      lie in [0, 1], where float16 has an absolute resolution of at most 2**-11 ≈ 4.9e-4, far
      below the noise of a network's prediction;
    - boundary weights: ``float32``, :data:`BOUNDARY_WEIGHT_DTYPE`;
    - mask: ``uint8`` (0 or 1), :data:`MASK_DTYPE`;
    - semantic classes: ``uint8`` (so at most 256 classes), :data:`SEMANTIC_DTYPE`;
      class weights: ``float32``, :data:`CLASS_WEIGHT_DTYPE`;
    - instance labels: ``uint64``, :data:`LABEL_DTYPE`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import edt
import numpy as np
from scipy.ndimage import find_objects, gaussian_filter1d

from dinopipe.runtime import allotted_cpus

logger = logging.getLogger(__name__)

__all__ = [
    "AFFINITY_DTYPE",
    "BOUNDARY_WEIGHT_DTYPE",
    "CLASS_WEIGHT_DTYPE",
    "LABEL_DTYPE",
    "LSD_CHANNELS",
    "NUM_LSD_CHANNELS",
    "LSD_DTYPE",
    "LSD_TRUNCATE",
    "MASK_DTYPE",
    "SEMANTIC_DTYPE",
    "compute_affinities",
    "compute_boundary_weights",
    "compute_lsds",
    "compute_mask",
    "compute_semantic_targets",
]

AFFINITY_DTYPE = np.dtype(np.uint8)
"""Storage dtype of affinities (0 or 1)."""
LSD_DTYPE = np.dtype(np.float16)
"""Storage dtype of LSDs (values in [0, 1]); :func:`compute_lsds` itself returns float32."""
BOUNDARY_WEIGHT_DTYPE = np.dtype(np.float32)
"""Storage dtype of boundary weights."""
MASK_DTYPE = np.dtype(np.uint8)
"""Storage dtype of the known-label mask (0 or 1)."""
SEMANTIC_DTYPE = np.dtype(np.uint8)
"""Storage dtype of per-voxel semantic classes (0 = background)."""
CLASS_WEIGHT_DTYPE = np.dtype(np.float32)
"""Dtype of the per-class weights of :func:`compute_semantic_targets`."""
LABEL_DTYPE = np.dtype(np.uint64)
"""Storage dtype of instance labels."""

LSD_CHANNELS: tuple[str, ...] = (
    "mean_offset_z",
    "mean_offset_y",
    "mean_offset_x",
    "variance_zz",
    "variance_yy",
    "variance_xx",
    "pearson_zy",
    "pearson_zx",
    "pearson_yx",
    "size",
)
"""Names of the 10 LSD channels, in output order (lsd-lite's ``use_paper_ordering=True``)."""

NUM_LSD_CHANNELS = len(LSD_CHANNELS)
"""Number of local shape descriptor channels (3 mean offset, 6 covariance, 1 size)."""

LSD_TRUNCATE = 3.0
"""Gaussian support of the LSDs in standard deviations (as lsd-lite and scipy's ``truncate``)."""

# Covariance entries (i, j) in lsd-lite's order: the diagonal first, then the upper triangle
# sorted as lsd-lite sorts it (zy, yx, zx), then reordered to the paper order (zy, zx, yx).
_DIAGONAL = ((0, 0), (1, 1), (2, 2))
_OFF_DIAGONAL = ((0, 1), (0, 2), (1, 2))


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------


def _check_labels(labels: np.ndarray, name: str = "labels", allowed_negative: Sequence[int] = ()) -> np.ndarray:
    """Checks that ``labels`` is a 3D array of non-negative integer ids (or negative ids in
    ``allowed_negative``) and returns it."""
    if not isinstance(labels, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(labels).__name__}")
    if labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(
            f"{name} must have an integer dtype (uint64 typical), got {labels.dtype}"
        )
    if labels.ndim != 3:
        raise ValueError(
            f"{name} must be 3D (z, y, x), got shape {labels.shape} ({labels.ndim}D)"
        )
    if np.issubdtype(labels.dtype, np.signedinteger) and labels.size and labels.min() < 0:
        negative = np.unique(labels[labels < 0])
        unlisted = negative[~np.isin(negative, np.asarray(list(allowed_negative), dtype=np.int64))]
        if unlisted.size:
            shown = ", ".join(str(int(v)) for v in unlisted[:5]) + (", ..." if unlisted.size > 5 else "")
            raise ValueError(
                f"{name} contains negative ids ({shown}); label ids must be >= 0, except ids listed in "
                f"unlabelled_ids (config key targets.unlabelled_ids, e.g. [-1]), which mean 'not annotated'"
            )
    return labels


def label_ids(labels: np.ndarray, unlabelled_ids: Sequence[int] = (), name: str = "labels") -> np.ndarray:
    """Instance labels as :data:`LABEL_DTYPE` (uint64), the dtype every target is computed from.

    Negative ids listed in ``unlabelled_ids`` (e.g. -1 for "not annotated") become 0; compute
    the mask from the original ``labels`` with :func:`compute_mask`, which marks them unknown.
    Any other negative id is an error (a plain cast would turn -1 into 2**64 - 1, one big object).

    Args:
        labels: Instance labels, shape (z, y, x), any integer dtype.
        unlabelled_ids: Ids meaning "not annotated"; only the negative ones matter here.
        name: What ``labels`` are, for error messages (e.g. the volume and path).

    Returns:
        uint64 array of shape (z, y, x) (``labels`` itself when it is uint64 already).

    Raises:
        TypeError: ``labels`` is not an integer array.
        ValueError: ``labels`` is not 3D or holds a negative id not in ``unlabelled_ids``.
    """
    negative = [int(v) for v in unlabelled_ids if int(v) < 0]
    labels = _check_labels(labels, name, allowed_negative=negative)
    if not np.issubdtype(labels.dtype, np.signedinteger) or not negative:
        return labels.astype(LABEL_DTYPE, copy=False)
    return np.where(labels < 0, 0, labels).astype(LABEL_DTYPE, copy=False)


def _check_triple(
    values: float | Sequence[float], name: str, *, positive: bool = True
) -> tuple[float, float, float]:
    """Returns ``values`` as three finite Python floats (a scalar is repeated)."""
    if np.isscalar(values):
        values = (values,) * 3  # type: ignore[assignment]
    try:
        triple = tuple(float(v) for v in values)  # type: ignore[union-attr]
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a number or 3 numbers (z, y, x), got {values!r}") from err
    if len(triple) != 3:
        raise ValueError(f"{name} must have 3 entries (z, y, x), got {values!r}")
    if not all(math.isfinite(v) for v in triple) or (positive and min(triple) <= 0):
        raise ValueError(f"{name} must be finite and > 0 in every axis, got {values!r}")
    return triple  # type: ignore[return-value]


def _check_mask(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """Returns ``mask`` as a boolean array of ``shape`` (nonzero = inside), or None."""
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"mask has shape {mask.shape}, but labels have shape {shape}")
    return mask.astype(bool, copy=False)


def _check_ids(ids: Sequence[int], dtype: np.dtype, name: str) -> np.ndarray:
    """Returns label ids as an array of ``dtype``, refusing ids that do not fit losslessly."""
    info = np.iinfo(dtype)
    out = []
    for v in ids:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{name} must contain integer label ids, got {v!r}")
        if not info.min <= int(v) <= info.max:
            raise ValueError(f"{name} contains id {v}, outside the range of labels' {dtype}")
        out.append(int(v))
    return np.array(out, dtype=dtype)


# --------------------------------------------------------------------------------------------
# affinities
# --------------------------------------------------------------------------------------------


def compute_affinities(labels: np.ndarray, offsets: Sequence[Sequence[int]]) -> np.ndarray:
    """Computes binary affinities of a label volume for arbitrary voxel offsets.

    Storage convention: the affinity of the edge between voxels ``p`` and ``p + o`` is stored
    at ``p``, for positive and negative offsets alike::

        aff[k, p] = 1  iff  p + o_k is inside the volume and labels[p] == labels[p + o_k] != 0

    and 0 otherwise (so 0 wherever either voxel is background, and in the last ``|o|`` planes
    along an axis with a positive offset, or the first ``|o|`` with a negative one). This is
    bit-for-bit lsd-lite's ``get_affs(labels, offsets, dist="equality-no-bg")`` (its default
    ``pad=True``) and gunpowder's ``seg_to_affgraph``, and it is the convention mwatershed
    expects (affinity at ``p`` with offset ``o`` is the edge ``p <-> p + o``): nothing differs.

    Args:
        labels: Instance labels, shape (z, y, x), any non-negative integer dtype (uint64
            typical); 0 is background.
        offsets: Voxel offsets (dz, dy, dx), each any sign and length (e.g. the 1/3/9-voxel
            long-range sets); an offset longer than the volume gives an all-zero channel.

    Returns:
        uint8 array of shape (len(offsets), z, y, x) holding 0 or 1.

    Raises:
        TypeError: If ``labels`` is not an integer array.
        ValueError: If ``labels`` is not 3D or has negative ids, or an offset is not three
            integers.
    """
    labels = _check_labels(labels)
    offs = []
    for k, offset in enumerate(offsets):
        try:
            o = tuple(int(v) for v in offset)
            ok = len(o) == 3 and all(int(v) == v for v in offset)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"offsets[{k}] must be three integers (dz, dy, dx), got {offset!r}")
        offs.append(o)

    affs = np.zeros((len(offs),) + labels.shape, dtype=AFFINITY_DTYPE)
    for k, o in enumerate(offs):
        src, dst = [], []
        for n, d in zip(labels.shape, o):
            lo, hi = max(0, -d), min(n, n - d)  # p with 0 <= p + d < n
            if hi <= lo:
                break
            src.append(slice(lo, hi))
            dst.append(slice(lo + d, hi + d))
        else:
            a, b = labels[tuple(src)], labels[tuple(dst)]
            out = affs[k][tuple(src)].view(np.bool_)
            np.equal(a, b, out=out)
            np.logical_and(out, a != 0, out=out)
    return affs


# --------------------------------------------------------------------------------------------
# local shape descriptors
# --------------------------------------------------------------------------------------------


#: Filter only the non-zero lines of an axis when at most this fraction of them is non-zero.
_SPARSE_LINES = 0.8


def _gaussian_skipping_zero_lines(a: np.ndarray, sigma_vox: Sequence[float]) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter(a, sigma_vox, mode="constant", truncate=LSD_TRUNCATE)``,
    bit for bit, without filtering lines that are all zero.

    The separable filter runs one axis after another (as scipy does, storing each pass in
    ``a``'s dtype), and every 1D line is filtered independently of the others, so a line of
    zeros stays zeros and the others can be filtered on their own, gathered into a 2D array.
    A label that fills part of its box leaves many lines of its masked inputs zero.
    """
    out = a
    for axis, sd in enumerate(sigma_vox):
        if sd <= 1e-15:  # as scipy: such an axis is not filtered
            continue
        moved = np.moveaxis(out, axis, -1)
        live = moved.any(axis=-1)
        if live.mean() > _SPARSE_LINES:
            out = gaussian_filter1d(out, sd, axis=axis, mode="constant", cval=0.0, truncate=LSD_TRUNCATE)
            continue
        result = np.zeros_like(moved)
        if live.any():
            result[live] = gaussian_filter1d(moved[live], sd, axis=-1, mode="constant", cval=0.0,
                                             truncate=LSD_TRUNCATE)
        out = np.moveaxis(result, -1, axis)
    return np.ascontiguousarray(out) if out is not a else out.copy()


def _lsd_crop(
    inside: np.ndarray,
    origin: tuple[int, int, int],
    sub_voxel_nm: tuple[float, float, float],
    sigma_nm: tuple[float, float, float],
) -> np.ndarray:
    """LSDs of one label on a crop, with exactly lsd-lite's arithmetic (float32 throughout).

    Args:
        inside: Boolean (z, y, x) crop, True on the label (at the computation resolution).
        origin: Index of the crop's first voxel in the (possibly downsampled) volume.
        sub_voxel_nm: Voxel size of the computation resolution in nm, (z, y, x).
        sigma_nm: Gaussian sigma in nm, (z, y, x).

    Returns:
        float32 (10, z, y, x) descriptors on the crop, clipped to [0, 1].
    """
    sigma_vox = tuple(s / v for s, v in zip(sigma_nm, sub_voxel_nm))

    def aggregate(a: np.ndarray) -> np.ndarray:
        return _gaussian_skipping_zero_lines(a, sigma_vox)

    shape = inside.shape
    # absolute physical coordinates as lsd-lite builds them: index * voxel size, as float32
    coords = [
        (np.arange(o, o + n, dtype=np.float64) * v).astype(np.float32).reshape(
            [n if a == d else 1 for a in range(3)]
        )
        for d, (o, n, v) in enumerate(zip(origin, shape, sub_voxel_nm))
    ]
    masked = [c * inside for c in coords]  # float32, full crop shape

    mass = aggregate(inside.astype(np.float32))
    mass_zero = mass == 0
    mass[mass_zero] = 1

    com = [aggregate(masked[d]) / mass for d in range(3)]
    max_distance = np.array(sigma_nm, dtype=np.float32)

    desc = np.empty((NUM_LSD_CHANNELS,) + shape, dtype=np.float32)
    for d in range(3):
        desc[d] = (com[d] - coords[d]) / max_distance[d] * 0.5 + 0.5

    covariance = []
    for i, j in _DIAGONAL + _OFF_DIAGONAL:
        cov = aggregate(masked[i] * masked[j]) / mass
        cov -= com[i] * com[j]
        covariance.append(cov)
    variance = [np.maximum(c, 1e-3) for c in covariance[:3]]
    for k, (i, j) in enumerate(_OFF_DIAGONAL):
        pearson = covariance[3 + k]
        pearson /= 2 * np.sqrt(variance[i] * variance[j])
        pearson += 0.5
        desc[6 + k] = pearson
    for d in range(3):
        variance[d] /= sigma_nm[d] ** 2
        desc[3 + d] = variance[d]
    desc[9] = mass * ~mass_zero
    np.clip(desc, 0.0, 1.0, out=desc)
    return desc


def compute_lsds(
    labels: np.ndarray,
    sigma_nm: float | Sequence[float],
    voxel_size_nm: Sequence[float],
    labels_to_skip: Sequence[int] = (0,),
    *,
    label_ids: Sequence[int] | None = None,
    downsample: int = 1,
    num_workers: int | None = None,
) -> np.ndarray:
    """Computes local shape descriptors (LSDs), exactly as lsd-lite's ``get_lsds``, but fast.

    For each label, a Gaussian (sigma ``sigma_nm``, truncated at :data:`LSD_TRUNCATE` = 3
    sigma, zero outside the volume) aggregates the label's mask and physical coordinates;
    every voxel of the label receives the statistics of the label's Gaussian-weighted
    neighbourhood. The 10 channels (see :data:`LSD_CHANNELS`), all float32 in [0, 1]:

    - 0-2 mean offset (z, y, x): (centre of mass - voxel position) / sigma_nm * 0.5 + 0.5;
    - 3-5 variance (zz, yy, xx): max(var, 1e-3 nm^2) / sigma_nm**2;
    - 6-8 Pearson correlation (zy, zx, yx): cov_ij / (2 sqrt(var_i var_j)) + 0.5;
    - 9 size: the Gaussian-filtered label mask (the label's Gaussian-weighted volume fraction).

    All values are clipped to [0, 1]. Voxels of skipped labels (by default background 0) are
    0 in every channel, as lsd-lite leaves them; other labels' descriptors ignore skipped
    voxels (they count as "not this label"). Coordinates are absolute ``index * voxel size``
    in nm, in float32, as in lsd-lite, so results match lsd-lite bit for bit, not just within
    a tolerance (tested on CREMI and gala crops; float32 cancellation in ``E[x^2] - E[x]^2``
    is lsd-lite's and is reproduced, not corrected).

    Speed: each label is computed only on its bounding box. The Gaussian of a function that is
    zero outside a box, evaluated inside the box, only reads values inside the box, and scipy's
    separable filter with ``mode="constant"`` pads with exact zeros, so no margin is needed
    and the output inside the label is identical to filtering the whole volume. Each 1D pass
    skips the lines that are all zero (:func:`_gaussian_skipping_zero_lines`). Labels are
    spread over ``num_workers`` threads (scipy releases the GIL). On a 128^3 volume of 200
    Voronoi cells (2 cores) this is well over 10x faster than lsd-lite at sigma 5 and 20
    voxels, and over 10x on dense neuron labels (gala, CREMI, neurons spanning the volume)
    at 64 nm; see ``benchmarks/targets.py``.

    ``downsample=f > 1`` reproduces lsd-lite's ``downsample``: descriptors are computed on
    ``labels[::f, ::f, ::f]`` with voxel size ``f * voxel_size_nm`` and repeated back to full
    resolution (each voxel takes the value of the sampled voxel at ``index // f``); it is an
    approximation for large sigma, bit-exact with lsd-lite's own ``downsample``. Measured on
    the 128^3 Voronoi benchmark (200 cells) at sigma 20 voxels, ``f = 2`` is ~5x faster
    than exact and differs from it by max |diff| 0.034, mean |diff| 5.1e-3, 99th percentile
    0.025 (``benchmarks/targets.py`` prints the current numbers).

    Args:
        labels: Instance labels, shape (z, y, x), non-negative integer dtype (uint64 typical).
        sigma_nm: Gaussian standard deviation in nm, one value or one per axis (z, y, x).
            lsd-lite takes sigma in the same physical units; in voxels it is
            ``sigma_nm / voxel_size_nm``.
        voxel_size_nm: Voxel size in nm, (z, y, x). Unlike lsd-lite, which truncates voxel
            sizes to integers, fractional sizes are used as given.
        labels_to_skip: Label ids that get no descriptors (0 in all channels). Default: (0,),
            background, as lsd-lite.
        label_ids: If given, compute descriptors only for these labels (lsd-lite's
            ``labels``); all other voxels are 0. Ids absent from the volume are ignored.
        downsample: Integer factor for the approximate downsampled mode; every dimension of
            ``labels`` must be divisible by it. 1 (default) is exact.
        num_workers: Threads to use; None: the CPUs this job may use
            (:func:`dinopipe.runtime.allotted_cpus`).

    Returns:
        float32 array of shape (10, z, y, x).

    Raises:
        TypeError: If ``labels`` is not an integer array.
        ValueError: If ``labels`` is not 3D or has negative ids, if ``sigma_nm`` or
            ``voxel_size_nm`` are not positive finite numbers (one or three), if ``downsample``
            is not a positive integer dividing the shape, or if ``num_workers`` < 1.
    """
    labels = _check_labels(labels)
    sigma = _check_triple(sigma_nm, "sigma_nm")
    voxel = _check_triple(voxel_size_nm, "voxel_size_nm")
    if (
        isinstance(downsample, bool)
        or not isinstance(downsample, (int, np.integer))
        or downsample < 1
    ):
        raise ValueError(f"downsample must be a positive integer, got {downsample!r}")
    df = int(downsample)
    if any(n % df for n in labels.shape):
        raise ValueError(
            f"labels shape {labels.shape} must be divisible by downsample factor {df} in every axis"
        )
    workers = allotted_cpus(num_workers)

    skip = _check_ids(labels_to_skip, labels.dtype, "labels_to_skip")
    lsds = np.zeros((NUM_LSD_CHANNELS,) + labels.shape, dtype=np.float32)
    if labels.size == 0:
        return lsds

    # lossless relabelling to 1..n for find_objects; original ids are only compared
    ids, inverse = np.unique(labels, return_inverse=True)
    index_dtype = np.int32 if len(ids) < 2**31 - 1 else np.int64
    compact = (inverse.reshape(labels.shape) + 1).astype(index_dtype, copy=False)
    del inverse
    wanted = ~np.isin(ids, skip)
    if label_ids is not None:
        wanted &= np.isin(ids, _check_ids(label_ids, labels.dtype, "label_ids"))
    todo = (np.flatnonzero(wanted) + 1).tolist()
    logger.debug(
        "LSDs for %d of %d labels, shape %s, sigma %s nm, voxel %s nm, downsample %d",
        len(todo), len(ids), labels.shape, sigma, voxel, df,
    )
    if not todo:
        return lsds

    boxes = find_objects(compact)
    sub_voxel = tuple(v * df for v in voxel)
    sub_compact = compact[::df, ::df, ::df] if df > 1 else compact

    def one_label(index: int) -> None:
        box = boxes[index - 1]
        # crop at computation resolution: the sampled voxels that the label's full-resolution
        # voxels read from (index // df); it contains every sampled voxel of the label
        lo = [s.start // df for s in box]
        hi = [(s.stop - 1) // df + 1 for s in box]
        crop = tuple(slice(a, b) for a, b in zip(lo, hi))
        desc = _lsd_crop(sub_compact[crop] == index, tuple(lo), sub_voxel, sigma)
        inside = compact[box] == index
        target = lsds[(slice(None),) + box]
        if df == 1:
            target[:, inside] = desc[:, inside]
        else:
            full = np.nonzero(inside)
            sub = tuple((f + s.start) // df - a for f, s, a in zip(full, box, lo))
            target[(slice(None),) + full] = desc[(slice(None),) + sub]

    if workers == 1 or len(todo) == 1:
        for index in todo:
            one_label(index)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(one_label, todo):
                pass
    return lsds


# --------------------------------------------------------------------------------------------
# boundary weights, mask, semantic targets
# --------------------------------------------------------------------------------------------


def boundary_voxels(labels: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Voxels (inside ``mask``) with a 6-neighbour (inside ``mask``) of a different label."""
    boundary = np.zeros(labels.shape, dtype=bool)
    for axis in range(3):
        n = labels.shape[axis]
        if n < 2:
            continue
        lower = tuple(slice(0, n - 1) if a == axis else slice(None) for a in range(3))
        upper = tuple(slice(1, n) if a == axis else slice(None) for a in range(3))
        edge = labels[lower] != labels[upper]
        if mask is not None:
            edge &= mask[lower] & mask[upper]
        boundary[lower] |= edge
        boundary[upper] |= edge
    return boundary


def compute_boundary_weights(
    labels: np.ndarray,
    voxel_size_nm: Sequence[float],
    w_max: float,
    sigma_nm: float,
    mask: np.ndarray | None = None,
    num_workers: int | None = None,
) -> np.ndarray:
    """Computes per-voxel loss weights that emphasise label boundaries.

    ``w = 1 + (w_max - 1) * exp(-d**2 / (2 * sigma_nm**2))``, where ``d`` is the Euclidean
    distance in nm (anisotropic, via ``edt``) from the voxel centre to the centre of the
    nearest boundary voxel. A boundary voxel is one with a 6-neighbour of a different label
    (background 0 counts as a label, so object/membrane borders are boundaries); boundary
    voxels themselves have ``d = 0`` and weight ``w_max``. Without any boundary the weight
    is 1 everywhere.

    With a ``mask``, only pairs of voxels that are both inside it make boundaries (an edge
    against unknown labels is not a real boundary), and voxels outside the mask get weight 0,
    so the result can multiply a per-voxel loss directly and already excludes unknown voxels.

    Args:
        labels: Instance labels, shape (z, y, x), non-negative integer dtype.
        voxel_size_nm: Voxel size in nm, (z, y, x).
        w_max: Weight at the boundary; >= 1 (1 gives weight 1 everywhere).
        sigma_nm: Width of the Gaussian fall-off in nm; > 0.
        mask: Optional (z, y, x) array, nonzero where labels are known (see
            :func:`compute_mask`).
        num_workers: Threads for the distance transform; None: the CPUs this job may use
            (:func:`dinopipe.runtime.allotted_cpus`).

    Returns:
        float32 array of shape (z, y, x).

    Raises:
        TypeError: If ``labels`` is not an integer array.
        ValueError: If ``labels`` is not 3D or has negative ids, if the voxel size, ``w_max`` or
            ``sigma_nm`` are out of range, or if ``mask`` has a different shape.
    """
    labels = _check_labels(labels)
    voxel = _check_triple(voxel_size_nm, "voxel_size_nm")
    if not (math.isfinite(w_max) and w_max >= 1):
        raise ValueError(f"w_max must be a finite number >= 1, got {w_max!r}")
    if not (math.isfinite(sigma_nm) and sigma_nm > 0):
        raise ValueError(f"sigma_nm must be a finite number > 0, got {sigma_nm!r}")
    inside = _check_mask(mask, labels.shape)

    boundary = boundary_voxels(labels, inside)
    if boundary.any():
        dist = edt.edt(
            (~boundary).view(np.uint8),
            anisotropy=voxel,
            black_border=False,
            parallel=allotted_cpus(num_workers),
        )
        weights = np.exp(-np.square(dist, dtype=np.float32) / np.float32(2 * sigma_nm**2))
        weights *= np.float32(w_max - 1)
        weights += np.float32(1)
        weights = weights.astype(BOUNDARY_WEIGHT_DTYPE, copy=False)
    else:
        weights = np.ones(labels.shape, dtype=BOUNDARY_WEIGHT_DTYPE)
    if inside is not None:
        weights[~inside] = 0
    return weights


def compute_mask(
    labels: np.ndarray,
    unlabelled_ids: Sequence[int] = (),
    erosion_nm: float = 0.0,
    voxel_size_nm: Sequence[float] = (1, 1, 1),
    num_workers: int | None = None,
) -> np.ndarray:
    """Computes the mask of voxels whose label is known.

    A voxel is known (1) unless its id is in ``unlabelled_ids``. Background 0 (membrane,
    extracellular space) IS a known label and is 1 by default; pass 0 in ``unlabelled_ids``
    only for volumes where 0 means "not annotated".

    With ``erosion_nm > 0`` the known region is eroded by a ball of that radius in nm: a known
    voxel stays 1 only if the nearest unknown voxel centre is more than ``erosion_nm`` away
    (anisotropic Euclidean distance, via ``edt``). The volume border does not count as
    unknown. Without unknown voxels, erosion changes nothing.

    Args:
        labels: Instance labels, shape (z, y, x), integer dtype; negative ids only where
            listed in ``unlabelled_ids`` (e.g. -1 in signed volumes).
        unlabelled_ids: Ids that mark unknown (not annotated) voxels; negative ids are
            ignored for unsigned labels, where they cannot occur.
        erosion_nm: Erosion radius in nm, >= 0.
        voxel_size_nm: Voxel size in nm, (z, y, x); only used for the erosion.
        num_workers: Threads for the erosion's distance transform; None: the CPUs this job may
            use (:func:`dinopipe.runtime.allotted_cpus`).

    Returns:
        uint8 array of shape (z, y, x), 1 where known.

    Raises:
        TypeError: If ``labels`` is not an integer array.
        ValueError: If ``labels`` is not 3D or has negative ids not in ``unlabelled_ids``,
            if an id in ``unlabelled_ids`` does not fit labels' dtype, or if ``erosion_nm``
            or the voxel size are out of range.
    """
    negative = [v for v in unlabelled_ids if isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v < 0]
    if np.issubdtype(np.asarray(labels).dtype, np.unsignedinteger):
        # negative ids cannot occur in unsigned labels (one config serves signed and unsigned volumes)
        unlabelled_ids = [v for v in unlabelled_ids if not any(v is n for n in negative)]
    labels = _check_labels(labels, allowed_negative=negative)
    voxel = _check_triple(voxel_size_nm, "voxel_size_nm")
    if not (math.isfinite(erosion_nm) and erosion_nm >= 0):
        raise ValueError(f"erosion_nm must be a finite number >= 0, got {erosion_nm!r}")
    unknown_ids = _check_ids(unlabelled_ids, labels.dtype, "unlabelled_ids")
    known = ~np.isin(labels, unknown_ids)
    if erosion_nm > 0 and not known.all():
        dist = edt.edt(
            known.view(np.uint8), anisotropy=voxel, black_border=False, parallel=allotted_cpus(num_workers)
        )
        known &= dist > erosion_nm
    return known.view(MASK_DTYPE)


def compute_semantic_targets(
    labels: np.ndarray,
    class_map: Mapping[int, int] | None,
    num_classes: int,
    mask: np.ndarray | None = None,
    max_weight: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Computes per-voxel organelle classes and per-class loss weights from the data.

    Classes: with a ``class_map``, voxel class = ``class_map[label id]``, and ids missing from
    the map are class 0 (background). Without one (``None``), ``labels`` already hold class
    ids, which must be < ``num_classes``.

    Weights ("balanced" inverse frequency): with ``N`` counted voxels (inside ``mask`` if
    given), ``n_c`` voxels of class ``c`` and ``K`` classes present (``n_c > 0``),
    ``w_c = N / (K * n_c)`` for present classes and 0 for absent ones. Normalised so the mean
    weight over the counted voxels is 1 (``sum_c n_c w_c = N``); with equally frequent
    classes every weight is 1. ``max_weight`` then clips very rare classes (after which the
    mean is no longer exactly 1). An empty mask gives all-zero weights.

    Args:
        labels: Label volume, shape (z, y, x), non-negative integer dtype (instance ids with a
            ``class_map``, class ids without).
        class_map: Mapping label id -> class in [0, num_classes), or None.
        num_classes: Number of classes including background 0; 1..256 (uint8 storage).
        mask: Optional (z, y, x) array, nonzero where voxels count for the weights.
        max_weight: Optional upper bound for the weights, > 0.

    Returns:
        ``(classes, weights)``: uint8 (z, y, x) classes and float32 (num_classes,) weights.

    Raises:
        TypeError: If ``labels`` is not an integer array.
        ValueError: If ``num_classes`` is outside 1..256, a class is out of range, or
            ``mask``/``max_weight`` are invalid.
    """
    labels = _check_labels(labels)
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or not (
        1 <= num_classes <= 256
    ):
        raise ValueError(f"num_classes must be an integer in 1..256 (uint8), got {num_classes!r}")
    if max_weight is not None and not (math.isfinite(max_weight) and max_weight > 0):
        raise ValueError(f"max_weight must be a finite number > 0 or None, got {max_weight!r}")
    inside = _check_mask(mask, labels.shape)

    ids, inverse = np.unique(labels, return_inverse=True)
    if class_map is None:
        too_big = ids[ids >= num_classes]
        if too_big.size:
            raise ValueError(
                f"labels hold class ids {too_big[:5].tolist()} >= num_classes={num_classes} "
                "(class_map is None, so labels must already be class ids)"
            )
        lut = ids.astype(SEMANTIC_DTYPE)
    else:
        for key, cls in class_map.items():
            if isinstance(cls, bool) or not isinstance(cls, (int, np.integer)) or not (
                0 <= cls < num_classes
            ):
                raise ValueError(
                    f"class_map[{key!r}] = {cls!r} is not a class in 0..{num_classes - 1}"
                )
        lut = np.array([class_map.get(i, 0) for i in ids.tolist()], dtype=SEMANTIC_DTYPE)
    classes = lut[inverse.reshape(labels.shape)]

    counted = classes if inside is None else classes[inside]
    counts = np.bincount(counted.ravel(), minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes, dtype=np.float64)
    if present.any():
        weights[present] = counts.sum() / (present.sum() * counts[present])
        if max_weight is not None:
            np.minimum(weights, max_weight, out=weights)
    else:
        logger.warning("compute_semantic_targets: no voxels inside the mask; weights are all 0")
    return classes, weights.astype(CLASS_WEIGHT_DTYPE)
