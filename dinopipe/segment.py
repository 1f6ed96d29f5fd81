"""Segmentation of affinities into label volumes.

Affinities are float arrays of shape (n_offsets, z, y, x) in [0, 1]: ``aff[k, p]`` is
the probability that voxel ``p`` and voxel ``p + offsets[k]`` (offsets in voxels,
(z, y, x)) belong to the same object; it is stored at ``p``. Edges whose second voxel
lies outside the volume are ignored. Short-range offsets are those whose largest
absolute component is 1; all others are long-range.

The segmentation functions (:func:`mutex_watershed`, :func:`threshold_components`,
:func:`segment`) return uint64 labels of shape (z, y, x) numbered consecutively from
1; 0 marks only voxels removed as small fragments.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence

import mwatershed
import numpy as np
from scipy import sparse
from scipy.sparse import csgraph

logger = logging.getLogger(__name__)


def mutex_watershed(
    affinities: np.ndarray,
    offsets: Sequence[Sequence[int]],
    bias_short: float = -0.5,
    bias_long: float = -0.5,
    strides: Sequence[Sequence[int]] | None = None,
    min_size: int = 0,
) -> np.ndarray:
    """Segment affinities with the mutex watershed (``mwatershed.agglom``).

    Each edge gets the weight ``affinity + bias`` (``bias_short`` for short-range,
    ``bias_long`` for long-range offsets); positive weights are attractive,
    negative ones repulsive (mutex), and edges are processed by decreasing
    ``|weight|``. With the default biases, affinities above 0.5 attract. A more
    negative ``bias_long`` than ``bias_short`` favours splits.

    Voxels that end up merged with nothing are single-voxel fragments with their own
    label. Fragments (connected or not) with fewer than ``min_size`` voxels are set
    to 0 — not merged into a neighbour — and the rest are relabelled consecutively.

    Args:
        affinities: (n_offsets, z, y, x) floats in [0, 1].
        offsets: One (dz, dy, dx) offset in voxels per affinity channel.
        bias_short: Added to short-range affinities (max |component| == 1).
        bias_long: Added to long-range affinities.
        strides: Optional (z, y, x) stride per offset, passed to mwatershed: only
            every stride-th edge of that offset is used (typically > 1 for
            long-range offsets to avoid over-splitting).
        min_size: Fragments with fewer voxels than this become 0 (>= 0).

    Returns:
        uint64 labels of shape (z, y, x), consecutive from 1; 0 only where a small
        fragment was removed.

    Raises:
        ValueError: If the affinities, offsets, strides or min_size are invalid.
    """
    offsets_t = _check_inputs(affinities, offsets)
    _check_min_size(min_size)
    for name, bias in (("bias_short", bias_short), ("bias_long", bias_long)):
        if not np.isfinite(bias):
            raise ValueError(f"{name} must be a finite number, got {bias!r}")
    strides_list: list[list[int]] | None = None
    if strides is not None:
        strides_list = [list(s) for s in strides]
        if len(strides_list) != len(offsets_t) or any(
            len(s) != 3 or any(int(v) != v or v < 1 for v in s) for s in strides_list
        ):
            raise ValueError(
                f"strides must hold one (z, y, x) triple of positive ints per offset "
                f"({len(offsets_t)} offsets), got {strides!r}"
            )
        strides_list = [[int(v) for v in s] for s in strides_list]

    short = np.array([_is_short(o) for o in offsets_t])
    bias = np.where(short, float(bias_short), float(bias_long))
    weights = np.ascontiguousarray(affinities, dtype=np.float64) + bias[:, None, None, None]
    # mwatershed: weight w at voxel p for offset o is the edge p <-> p + o; voxels
    # merged with nothing come back as 0 (checked in tests/test_segment.py).
    labels = mwatershed.agglom(weights, [list(o) for o in offsets_t], strides=strides_list)
    labels = np.asarray(labels, dtype=np.uint64)
    singletons = labels == 0
    n_single = int(singletons.sum())
    if n_single:
        start = int(labels.max()) + 1
        labels[singletons] = np.arange(start, start + n_single, dtype=np.uint64)
    labels = filter_small_fragments(labels, min_size)
    labels = relabel_consecutive(labels)
    logger.debug(
        "mutex watershed: %d offsets, %d segments (%d single voxels before filtering)",
        len(offsets_t), int(labels.max()), n_single,
    )
    return labels


def threshold_components(
    affinities: np.ndarray,
    offsets: Sequence[Sequence[int]],
    threshold: float = 0.5,
    min_size: int = 0,
) -> np.ndarray:
    """Label connected components of the graph of short-range edges above a threshold.

    Long-range offsets are ignored. Every voxel is a node, so a voxel without a
    strong edge is a fragment of its own; fragments with fewer than ``min_size``
    voxels are set to 0 (not merged into a neighbour).

    Args:
        affinities: (n_offsets, z, y, x) floats in [0, 1].
        offsets: One (dz, dy, dx) offset in voxels per affinity channel; at least
            one must be short-range (max |component| == 1).
        threshold: Edges with affinity strictly above this join their voxels.
        min_size: Fragments with fewer voxels than this become 0 (>= 0).

    Returns:
        uint64 labels of shape (z, y, x), consecutive from 1; 0 only where a small
        fragment was removed.

    Raises:
        ValueError: If the inputs are invalid or no offset is short-range.
    """
    offsets_t = _check_inputs(affinities, offsets)
    _check_min_size(min_size)
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    short = [k for k, o in enumerate(offsets_t) if _is_short(o)]
    if not short:
        raise ValueError(
            f"threshold_components needs a short-range offset (max |component| == 1), got {offsets_t}"
        )
    shape = affinities.shape[1:]
    n_voxels = int(np.prod(shape))
    index_dtype = np.int32 if n_voxels < 2**31 else np.int64
    index = np.arange(n_voxels, dtype=index_dtype).reshape(shape)
    sources, targets = [], []
    for k in short:
        src_sl, dst_sl = _edge_slices(offsets_t[k], shape)
        strong = affinities[k][src_sl] > threshold
        sources.append(index[src_sl][strong])
        targets.append(index[dst_sl][strong])
    src = np.concatenate(sources)
    dst = np.concatenate(targets)
    graph = sparse.coo_array(
        (np.ones(src.size, dtype=np.int8), (src, dst)), shape=(n_voxels, n_voxels)
    ).tocsr()
    n, components = csgraph.connected_components(graph, directed=False)
    labels = components.reshape(shape).astype(np.uint64) + np.uint64(1)
    labels = filter_small_fragments(labels, min_size)
    labels = relabel_consecutive(labels)
    logger.debug("threshold components at %g: %d components, %d kept", threshold, n, int(labels.max()))
    return labels


def filter_small_fragments(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Set every label with fewer than ``min_size`` voxels to 0.

    Size counts all voxels of a label, connected or not. Label 0 is left alone.
    Removed voxels are not reassigned to a neighbour. Ids are not renumbered (see
    :func:`relabel_consecutive`).

    Args:
        labels: Integer label array, any shape.
        min_size: Minimum size in voxels (>= 0; 0 and 1 keep everything).

    Returns:
        A new array of the same shape and dtype.

    Raises:
        ValueError: If ``labels`` is not an integer array or ``min_size`` < 0.
    """
    _check_labels(labels)
    _check_min_size(min_size)
    out = labels.copy()
    if min_size <= 1 or out.size == 0:
        return out
    ids, inverse, counts = np.unique(out, return_inverse=True, return_counts=True)
    small = (counts < min_size) & (ids != 0)
    if small.any():
        out[small[inverse.reshape(out.shape)]] = 0
        logger.debug("removed %d fragments smaller than %d voxels", int(small.sum()), min_size)
    return out


def relabel_consecutive(labels: np.ndarray) -> np.ndarray:
    """Renumber labels to 1..n in increasing order of the original ids; 0 stays 0.

    Args:
        labels: Non-negative integer label array, any shape.

    Returns:
        uint64 array of the same shape.

    Raises:
        ValueError: If ``labels`` is not an integer array or holds negative values.
    """
    _check_labels(labels)
    if labels.size == 0:
        return labels.astype(np.uint64)
    ids, inverse = np.unique(labels, return_inverse=True)
    if ids[0] < 0:
        raise ValueError(f"labels must be non-negative, got minimum {ids[0]}")
    new_ids = np.arange(len(ids), dtype=np.uint64)
    if ids[0] != 0:
        new_ids += np.uint64(1)
    return new_ids[inverse.reshape(labels.shape)]


#: Segmentation methods selectable by name (e.g. from the config).
METHODS: dict[str, Callable[..., np.ndarray]] = {
    "mutex_watershed": mutex_watershed,
    "threshold_components": threshold_components,
}


def segment(
    affinities: np.ndarray,
    offsets: Sequence[Sequence[int]],
    method: str = "mutex_watershed",
    **params: object,
) -> np.ndarray:
    """Segment affinities with the method of that name.

    Args:
        affinities: (n_offsets, z, y, x) floats in [0, 1].
        offsets: One (dz, dy, dx) offset in voxels per affinity channel.
        method: One of :data:`METHODS` (``"mutex_watershed"``,
            ``"threshold_components"``).
        **params: Keyword arguments of that method (e.g. ``min_size``).

    Returns:
        uint64 labels of shape (z, y, x), consecutive from 1.

    Raises:
        ValueError: If the method is unknown, a parameter does not belong to it, or
            the method rejects its inputs.
    """
    if method not in METHODS:
        raise ValueError(f"unknown segmentation method {method!r}; allowed: {sorted(METHODS)}")
    func = METHODS[method]
    allowed = [p for p in inspect.signature(func).parameters if p not in ("affinities", "offsets")]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for method {method!r}; allowed: {allowed}")
    return func(affinities, offsets, **params)


def _is_short(offset: tuple[int, int, int]) -> bool:
    return max(abs(v) for v in offset) == 1


def _edge_slices(offset: Sequence[int], shape: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Slices selecting voxels p and p + offset where both lie inside ``shape``."""
    src, dst = [], []
    for o, n in zip(offset, shape):
        if o >= 0:
            src.append(slice(0, max(n - o, 0)))
            dst.append(slice(o, n))
        else:
            src.append(slice(-o, n))
            dst.append(slice(0, max(n + o, 0)))
    return tuple(src), tuple(dst)


def _check_inputs(affinities: np.ndarray, offsets: Sequence[Sequence[int]]) -> list[tuple[int, int, int]]:
    if not isinstance(affinities, np.ndarray) or affinities.ndim != 4:
        raise ValueError(
            "affinities must be a 4D array (n_offsets, z, y, x), got "
            f"{getattr(affinities, 'shape', type(affinities).__name__)}"
        )
    if not np.issubdtype(affinities.dtype, np.floating):
        raise ValueError(f"affinities must be floating point in [0, 1], got dtype {affinities.dtype}")
    try:
        offsets_t = [tuple(int(v) for v in o) for o in offsets]
        exact = all(int(v) == v for o in offsets for v in o)
    except (TypeError, ValueError):
        raise ValueError(f"offsets must be a list of (dz, dy, dx) int triples, got {offsets!r}") from None
    if not exact or any(len(o) != 3 for o in offsets_t) or any(o == (0, 0, 0) for o in offsets_t):
        raise ValueError(f"offsets must be non-zero (dz, dy, dx) int triples, got {offsets!r}")
    if len(offsets_t) != affinities.shape[0]:
        raise ValueError(
            f"got {len(offsets_t)} offsets for {affinities.shape[0]} affinity channels; they must match"
        )
    if affinities.size and not (np.all(affinities >= 0.0) and np.all(affinities <= 1.0)):
        lo, hi = np.nanmin(affinities), np.nanmax(affinities)
        raise ValueError(f"affinities must lie in [0, 1] (no NaN), got range [{lo}, {hi}]")
    return offsets_t  # type: ignore[return-value]


def _check_min_size(min_size: int) -> None:
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise ValueError(f"min_size must be a non-negative int (voxels), got {min_size!r}")


def _check_labels(labels: np.ndarray) -> None:
    if not isinstance(labels, np.ndarray) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be an integer numpy array, got {getattr(labels, 'dtype', type(labels).__name__)}"
        )
