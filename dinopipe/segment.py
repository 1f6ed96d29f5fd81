"""Segmentation of affinities into label volumes.

Affinities are float arrays of shape (n_offsets, z, y, x) in [0, 1]: ``aff[k, p]`` is
the probability that voxel ``p`` and voxel ``p + offsets[k]`` (offsets in voxels,
(z, y, x)) belong to the same object; it is stored at ``p``. Edges whose second voxel
lies outside the volume are ignored. Short-range offsets are those whose largest
absolute component is 1; all others are long-range.

The segmentation functions (:func:`mutex_watershed`, :func:`threshold_components`,
:func:`agglomerate`, :func:`segment`) return uint64 labels of shape (z, y, x) numbered
consecutively from 1; 0 marks only voxels removed as small fragments.

Memory: segmenting a volume in one piece needs about :func:`bytes_per_voxel` bytes per
voxel (affinities as float32 and float64 edge weights, labels and relabelling
temporaries): about 110 bytes with 6 offsets, so 16 GB hold about 140 million voxels
(520^3). Larger volumes go through :func:`segment_blockwise`: each block is split on its
own into fragments (in context; named by their seeds where the method's fragments have
seeds, so that a fragment cut by block faces is one fragment), the fragments are merged on
the region graph of the whole volume (agglomeration, mutex watershed) or across block
faces (threshold components), then small objects are removed and ids made consecutive;
memory is then bounded by one block plus the region graph.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import mwatershed
import numpy as np
from scipy import sparse
from scipy.sparse import csgraph

from dinopipe.geometry import blocks, grow_window, inner_window, superblock_factors
from dinopipe.linkage import hierarchical_mean_linkage, mean_linkage

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
    # Offsets at least as long as the volume along an axis have no edges (and crash mwatershed).
    inside = [k for k, o in enumerate(offsets_t) if all(abs(v) < n for v, n in zip(o, affinities.shape[1:]))]
    if len(inside) < len(offsets_t):
        weights = weights[inside]
        offsets_t = [offsets_t[k] for k in inside]
        strides_list = [strides_list[k] for k in inside] if strides_list is not None else None
    if not offsets_t:
        labels = np.zeros(affinities.shape[1:], dtype=np.uint64)
    else:
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


def agglomerate(
    affinities: np.ndarray,
    offsets: Sequence[Sequence[int]],
    threshold: float = 0.5,
    fragments_low: float = 0.0001,
    fragments_high: float = 0.9999,
    scoring_function: str = "OneMinus<MeanAffinity<RegionGraphType, ScoreValue>>",
    fragments: str = "waterz",
    seed_threshold: float = 0.5,
    min_size: int = 0,
) -> np.ndarray:
    """Watershed fragments, then hierarchical agglomeration (``waterz``).

    Uses the three short-range offsets (one per axis, +1 or -1; long-range ones are
    ignored). waterz builds fragments by a watershed on the affinity graph
    (``fragments_low``/``fragments_high`` are its affinity thresholds), then merges
    adjacent regions in order of their score, by default one minus the mean affinity
    on their common boundary, while the score is below ``1 - threshold``: regions
    merge while their mean boundary affinity exceeds ``threshold``.

    Args:
        affinities: (n_offsets, z, y, x) floats in [0, 1].
        offsets: One (dz, dy, dx) offset in voxels per affinity channel; must include
            (+-1, 0, 0), (0, +-1, 0) and (0, 0, +-1).
        threshold: Mean boundary affinity above which regions merge, in [0, 1].
        fragments_low, fragments_high: waterz's watershed thresholds (0 <= low < high <= 1).
        scoring_function: waterz scoring function (a C++ type; precompiled ones are fast).
        fragments: "waterz" (its own watershed on the affinity graph, with ``fragments_low``
            and ``fragments_high``) or "distance" (the lsd pipeline's fragments,
            :func:`distance_fragments`: seeds at the maxima of the distance to the boundary,
            voxels with a short-range edge below ``seed_threshold``, grown by a watershed of
            the boundary map). "distance" is the workflow's default (``segment.fragments``,
            :data:`dinopipe.stages.DEFAULT_SEGMENT`): it lowered the VOI on gala by 0.4 or
            more (docs/quality.md).
        seed_threshold: For ``fragments="distance"``: affinity below which an edge makes
            its voxels boundary, in (0, 1).
        min_size: Fragments with fewer voxels than this become 0 (>= 0).

    Returns:
        uint64 labels (z, y, x), consecutive from 1; 0 only where a small fragment was removed.

    Raises:
        ImportError: waterz is not installed (with the command to install it).
        ValueError: Invalid inputs, or a short-range offset missing.
    """
    offsets_t = _check_inputs(affinities, offsets)
    _check_min_size(min_size)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold!r}")
    if not 0.0 <= fragments_low < fragments_high <= 1.0:
        raise ValueError(f"need 0 <= fragments_low < fragments_high <= 1, got {fragments_low}, {fragments_high}")
    if fragments not in FRAGMENTS:
        raise ValueError(f"fragments must be one of {list(FRAGMENTS)}, got {fragments!r}")
    try:
        import waterz
    except ImportError as exc:
        raise ImportError(
            "segment method 'agglomeration' needs the waterz package: `pip install waterz` "
            "(prebuilt wheels for Linux; other scoring functions compile with a C++ compiler and boost headers, "
            f"e.g. `apt-get install g++ libboost-dev`): {exc}"
        ) from exc
    affs = _waterz_affinities(affinities, offsets_t, "agglomeration")
    seeds = None
    if fragments == "distance":
        # waterz's channel d at p is the edge p <-> p - e_d: its mean is the same boundary map
        seeds = distance_fragments(affs, seed_threshold)
    with _quiet_stdout():
        labels = next(iter(waterz.agglomerate(
            affs, [1.0 - float(threshold)], fragments=seeds, aff_threshold_low=float(fragments_low),
            aff_threshold_high=float(fragments_high), scoring_function=scoring_function,
        )))
    labels = np.asarray(labels, dtype=np.uint64)
    unassigned = labels == 0  # voxels without any edge above fragments_low: single-voxel fragments
    n_single = int(unassigned.sum())
    if n_single:
        start = int(labels.max()) + 1
        labels[unassigned] = np.arange(start, start + n_single, dtype=np.uint64)
    labels = filter_small_fragments(labels, min_size)
    return relabel_consecutive(labels)


FRAGMENTS = ("waterz", "distance")
"""Fragment sources of :func:`agglomerate`."""


def _waterz_affinities(affinities: np.ndarray, offsets: Sequence[tuple[int, int, int]], method: str) -> np.ndarray:
    """The three short-range channels in waterz's convention: (3, z, y, x) float32, channel d at
    voxel p the edge between p and p - e_d (0 where p - e_d is outside).

    Raises:
        ValueError: No short-range offset along an axis (naming ``method``, which needs them).
    """
    shape = affinities.shape[1:]
    # waterz stores the edge p <-> p - e_d at p (channel d); ours p <-> p + o at p.
    affs = np.zeros((3, *shape), dtype=np.float32)
    for axis in range(3):
        k = _axis_offset(offsets, axis)
        if k is None:
            raise ValueError(f"{method} needs a short-range offset along axis {'zyx'[axis]}, got {list(offsets)}")
        sign = offsets[k][axis]
        dst = [slice(None)] * 3
        src = [slice(None)] * 3
        if sign > 0:  # ours at p is waterz's at p + e_d
            dst[axis], src[axis] = slice(1, None), slice(0, -1)
        affs[(axis, *dst)] = affinities[(k, *src)]
    return affs


def distance_fragments(short_affinities: np.ndarray, seed_threshold: float = 0.5) -> np.ndarray:
    """Watershed fragments seeded at the maxima of the distance to the boundary (lsd pipeline).

    A voxel's affinity is the lowest of its six short-range edges (edges leaving the volume
    do not count); voxels where it is below ``seed_threshold`` are boundary. The Euclidean
    distance transform of the rest peaks in object centres; its local maxima (3 x 3 x 3
    neighbourhood; a plateau gives one seed) seed a watershed of one minus that affinity over
    the whole volume. Fragments follow the boundary map, not single strong edges as waterz's
    own watershed does. The minimum over the edges (rather than the mean of
    the lsd pipeline) also marks boundaries between touching objects without membrane
    voxels, on both sides; on gala it gave a lower VOI (docs/quality.md).
    Objects with no voxel off the boundary (at most about 2 voxels thick) get no seed of
    their own and go to a neighbour's fragment, and where objects touch without membrane
    voxels the voxels right at the contact may go to the fragment across it (the flood is
    by voxel, not by edge); "waterz" fragments keep both exact. Where membranes are labelled
    0 and left out of the scores (EM neuron labels), neither matters.

    Args:
        short_affinities: (3, z, y, x) floats in [0, 1]; channel d at voxel p is the edge
            between p and p - e_d (waterz's convention).
        seed_threshold: Affinity below which a voxel is boundary, in (0, 1).

    Returns:
        uint64 fragments (z, y, x), ids from 1, every voxel assigned.

    Raises:
        ValueError: Wrong shape or a threshold outside (0, 1).
    """
    from skimage.segmentation import watershed

    lowest, seeds, n = _distance_seeds(short_affinities, seed_threshold)
    if not n:
        return np.ones(lowest.shape, dtype=np.uint64)
    labels = watershed(1.0 - lowest, seeds)
    logger.debug("distance fragments: %d seeds", n)
    return labels.astype(np.uint64)


def _distance_seeds(short_affinities: np.ndarray, seed_threshold: float) -> tuple[np.ndarray, np.ndarray, int]:
    """The boundary map and seeds of :func:`distance_fragments`: each voxel's lowest short-range
    affinity (z, y, x) float32, the seeds labelled 1..n (int32, 0 elsewhere; numbered in C order of
    their first voxel, as :func:`scipy.ndimage.label` does) and n."""
    from scipy import ndimage

    if short_affinities.ndim != 4 or short_affinities.shape[0] != 3:
        raise ValueError(f"short_affinities must be (3, z, y, x), got shape {short_affinities.shape}")
    if not 0.0 < seed_threshold < 1.0:
        raise ValueError(f"seed_threshold must lie in (0, 1), got {seed_threshold!r}")
    lowest = _lowest_affinity(short_affinities)
    inside = lowest >= seed_threshold
    if not inside.any():
        return lowest, np.zeros(lowest.shape, dtype=np.int32), 0
    distance = ndimage.distance_transform_edt(inside)
    maxima = (distance == ndimage.maximum_filter(distance, size=3)) & inside
    seeds, n = ndimage.label(maxima)
    return lowest, seeds, int(n)


def _lowest_affinity(short_affinities: np.ndarray) -> np.ndarray:
    """Each voxel's lowest short-range affinity (z, y, x) float32, over its edges inside the
    array (waterz's convention: channel d at p is the edge p <-> p - e_d; plane 0 is unused)."""
    lowest = np.ones(short_affinities.shape[1:], dtype=np.float32)
    for axis in range(3):
        later = [slice(None)] * 3
        earlier = [slice(None)] * 3
        later[axis], earlier[axis] = slice(1, None), slice(0, -1)
        edges = short_affinities[(axis, *later)]  # edge between p (later) and p - e_d (earlier)
        np.minimum(lowest[tuple(later)], edges, out=lowest[tuple(later)])
        np.minimum(lowest[tuple(earlier)], edges, out=lowest[tuple(earlier)])
    return lowest


def _edge_flood(short_affinities: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Seeded watershed on the edges: every voxel joins the seed it reaches along the path whose
    weakest edge is strongest (a maximum spanning forest rooted at the seeds).

    Unlike the flood of :func:`distance_fragments` by voxel (where both voxels at a contact
    without membrane are equally low and either side may take them), a voxel is taken across
    its strongest edge to a flooded neighbour, so fragments never cross a contact whose edges
    are weaker than those around it. Runs :func:`skimage.segmentation.watershed` on a grid of
    twice the resolution holding the voxels (cost 0) and the edges between them (cost one
    minus the affinity; the other grid points are masked out): 8 grid points per voxel, about
    170 bytes per voxel of the window and 4-7 microseconds per voxel on the demo volume (the
    voxel flood: 0.4).

    Args:
        short_affinities: (3, z, y, x) in waterz's convention (channel d at p: p <-> p - e_d).
        seeds: (z, y, x) int seed labels, 0 elsewhere.

    Returns:
        int labels (z, y, x), each voxel its seed's (0 only where no seed is connected).
    """
    from skimage.segmentation import watershed

    z, y, x = seeds.shape
    cost = np.full((2 * z - 1, 2 * y - 1, 2 * x - 1), 2.0, dtype=np.float32)  # 2: not a voxel or an edge
    cost[::2, ::2, ::2] = 0.0
    cost[1::2, ::2, ::2] = 1.0 - short_affinities[0, 1:]
    cost[::2, 1::2, ::2] = 1.0 - short_affinities[1, :, 1:]
    cost[::2, ::2, 1::2] = 1.0 - short_affinities[2, :, :, 1:]
    markers = np.zeros(cost.shape, dtype=np.int32)
    markers[::2, ::2, ::2] = seeds
    return watershed(cost, markers, connectivity=1, mask=cost < 1.5)[::2, ::2, ::2]


def _seed_seedless_components(short_affinities: np.ndarray, seeds: np.ndarray, n: int,
                              threshold: float) -> tuple[np.ndarray, int]:
    """Seeds plus one seed per connected component of the edges at or above ``threshold`` that
    holds no seed: objects too thin for an off-boundary voxel (at most about 2 voxels thick,
    e.g. one section of an anisotropic volume), and pieces of objects whose seed lies beyond the
    window, would otherwise be flooded from a neighbour's seed across a weak edge.

    A component cut by the window's faces may hold a seed beyond them: a window that sees it
    whole names it by that seed, one that does not by its own first voxel, so its pieces are
    separate fragments there (joined again by the global merge across their strong edges).
    Boundary voxels whose edges are all weak are such components of one voxel: on the demo
    volume they were 95 % of the 148,000 fragments of 590,000 voxels, and the graph mutex
    watershed needs them (seeding only components of 2 voxels or more: 0.21 bits VOI against
    the truth instead of 0.072).

    Returns:
        The seeds (int32, the new ones numbered n + 1, ...) and their number.
    """
    shape = seeds.shape
    size = int(np.prod(shape))
    index = np.arange(size, dtype=np.int64).reshape(shape)
    src, dst = [], []
    for axis in range(3):
        later = [slice(None)] * 3
        earlier = [slice(None)] * 3
        later[axis], earlier[axis] = slice(1, None), slice(0, -1)
        strong = short_affinities[(axis, *later)] >= threshold
        src.append(index[tuple(later)][strong])
        dst.append(index[tuple(earlier)][strong])
    s, d = np.concatenate(src), np.concatenate(dst)
    graph = sparse.coo_array((np.ones(s.size, dtype=np.int8), (s, d)), shape=(size, size)).tocsr()
    count, component = csgraph.connected_components(graph, directed=False)
    component = component.reshape(shape)
    seeded = np.zeros(count, dtype=bool)
    seeded[component[seeds > 0]] = True
    new = np.flatnonzero(~seeded)
    if not len(new):
        return seeds, n
    number = np.zeros(count, dtype=np.int32)
    number[new] = np.arange(n + 1, n + 1 + len(new), dtype=np.int32)
    seeds = np.where(seeds > 0, seeds, number[component]).astype(np.int32)
    logger.debug("%d seedless components seeded", len(new))
    return seeds, n + len(new)


FLOODS = ("voxel", "edge")
"""Floods of :func:`seeded_fragments`."""


def seeded_fragments(affinities: np.ndarray, offsets: Sequence[Sequence[int]], window: Sequence[slice],
                     grown: Sequence[slice], shape: Sequence[int], seed_threshold: float = 0.5,
                     flood: str = "voxel") -> np.ndarray:
    """:func:`distance_fragments` of a block computed in context, each fragment named by its seed.

    The fragments are computed on ``affinities`` (those of the window ``grown``, which holds the
    block ``window`` and the context around it) and cropped to the block. Each fragment's id is
    one plus the C-order index, in the whole volume of ``shape``, of the first voxel of its seed
    (the seed may lie in the context). Two blocks that see the same seed name its fragment alike,
    so a fragment cut by a block face keeps one id on both sides: the fragments of all blocks
    are those of the whole volume (up to ties of the flooding, and seeds whose plateau the
    context cuts), and a global merge on them sees the region graph of the one-piece
    segmentation, whatever the block size. A block whose context holds no seed is one fragment,
    named by the block's first voxel (no seed can lie there with ``context`` >= 1: a core voxel
    has all its edges in every window around it).

    Args:
        affinities: (n_offsets, z, y, x) floats in [0, 1] of the window ``grown``.
        offsets: Their offsets (dz, dy, dx) in voxels, with a short-range one along each axis.
        window: The block, in voxels of the volume (z, y, x).
        grown: The window read (the block and its context), in voxels of the volume.
        shape: The volume's shape (z, y, x) in voxels.
        seed_threshold: Affinity below which an edge makes its voxels boundary, in (0, 1).
        flood: "voxel": the seeds flood the boundary map by voxel, as :func:`distance_fragments`
            does; "edge": by edge (:func:`_edge_flood`, exact at contacts without membrane
            voxels, about 16 times slower), and every component of the edges at or above
            ``seed_threshold`` without a seed (an object too thin for one) is a seed too
            (:func:`_seed_seedless_components`; named by its first voxel).

    Returns:
        uint64 fragment ids of the block (z, y, x), every voxel assigned (ids >= 1).
    """
    from skimage.segmentation import watershed

    if flood not in FLOODS:
        raise ValueError(f"flood must be one of {list(FLOODS)}, got {flood!r}")
    offsets_t = _check_inputs(affinities, offsets)
    short = _waterz_affinities(affinities, offsets_t, "blockwise seeded fragments")
    lowest, seeds, n = _distance_seeds(short, seed_threshold)
    if flood == "edge":
        seeds, n = _seed_seedless_components(short, seeds, n, seed_threshold)
    core = inner_window(window, grown)
    origin = np.array([g.start for g in grown])
    if not n:
        first = np.ravel_multi_index(tuple(int(w.start) for w in window), tuple(shape))
        return np.full(tuple(w.stop - w.start for w in window), first + 1, dtype=np.uint64)
    flat = np.flatnonzero(seeds)
    _, first = np.unique(seeds.ravel()[flat], return_index=True)  # each seed's first voxel in the window
    where = np.unravel_index(flat[first], seeds.shape)
    keys = np.ravel_multi_index(tuple(w + o for w, o in zip(where, origin)), tuple(shape)).astype(np.uint64) + 1
    labels = (watershed(1.0 - lowest, seeds) if flood == "voxel" else _edge_flood(short, seeds))[core]
    logger.debug("seeded fragments: %d seeds in %s (%s flood)", n, tuple(grown), flood)
    return np.concatenate([np.zeros(1, np.uint64), keys])[labels]


def _axis_offset(offsets: Sequence[tuple[int, int, int]], axis: int) -> int | None:
    """Index of the offset +e_axis (preferred) or -e_axis, or None."""
    for sign in (1, -1):
        want = tuple(sign if a == axis else 0 for a in range(3))
        if want in offsets:
            return list(offsets).index(want)
    return None


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Send C-level stdout (waterz's progress prints) to the log at debug level instead."""
    sys.stdout.flush()
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # no real stdout (e.g. captured): nothing to redirect
        yield
        return
    saved = os.dup(fd)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace").strip()
            if text:
                logger.debug("waterz: %s", text[-2000:])


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
    "agglomeration": agglomerate,
}


def method_parameters(method: str) -> set[str]:
    """The keyword parameters of a segmentation method of :data:`METHODS` (``min_size`` included).

    Raises:
        ValueError: If the method is unknown.
    """
    if method not in METHODS:
        raise ValueError(f"unknown segmentation method {method!r}; allowed: {sorted(METHODS)}")
    return set(inspect.signature(METHODS[method]).parameters) - {"affinities", "offsets"}


def sanity_warnings(n_segments: int, n_voxels: int) -> list[str]:
    """Warnings about a segmentation that is almost certainly wrong, for the log and the report.

    One segment (or none) for the whole volume means everything merged; more segments than
    ``n_voxels / 100`` (objects of fewer than 100 voxels on average) means it shattered.
    Either way the affinities or the segment parameters need a look.
    """
    out = []
    if n_segments <= 1:
        out.append(f"{n_segments} segment(s) for {n_voxels} voxels: everything merged")
    if n_segments > n_voxels / 100:
        out.append(f"{n_segments} segments for {n_voxels} voxels (more than voxels/100): over-segmented")
    return out


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
            ``"threshold_components"``, ``"agglomeration"``).
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


def bytes_per_voxel(num_offsets: int) -> int:
    """Estimated peak bytes per voxel of segmenting a volume in one piece.

    float32 affinities (4 per offset), float64 edge weights (8 per offset), uint64
    labels and the int64 temporaries of relabelling (about 32).
    """
    return 12 * int(num_offsets) + 40


def segment_blockwise(
    affinities: Any,
    offsets: Sequence[Sequence[int]],
    out: Any,
    block_shape: Sequence[int],
    method: str = "mutex_watershed",
    merge_threshold: float = 0.5,
    min_size: int = 0,
    context: int | Sequence[int] = 0,
    relabel_into: Any | None = None,
    merge_levels: Sequence[int | Sequence[int]] | None = None,
    **params: object,
) -> int:
    """Segment a volume too large for memory block by block: fragments per block, a global merge.

    The extract-fragments -> agglomerate -> relabel design of the lsd pipeline, in four steps
    that any job can run (:mod:`dinopipe.segment_parts` runs them as cluster jobs, with the
    same result):

    1. :func:`fragment_block` splits each block into fragments with globally unique ids,
       written to ``out``. For ``agglomeration`` these are the method's fragments only (no
       merging inside the block), for ``mutex_watershed`` seeded fragments with an edge flood
       (:func:`seeded_fragments`), for ``threshold_components`` the block's segmentation.
    2. :func:`block_graph` collects the region graph: for each pair of touching fragments, the
       sum and count of the short-range affinities between them, across the faces between a
       block and its predecessors and, for :data:`GRAPH_METHODS`, inside blocks too; for
       ``mutex_watershed`` also the long-range affinities between fragments
       (:func:`block_long_edges`).
    3. :func:`merge_fragments` merges on that graph. ``agglomeration`` (:func:`merge_table`):
       hierarchically, regions joining while the mean affinity on their whole common boundary
       exceeds the method's ``threshold`` (waterz's mean-affinity agglomeration on the global
       graph). ``mutex_watershed`` (:func:`mutex_table`): the mutex watershed of the graph,
       mean short-range affinities plus ``bias_short`` attracting, mean long-range affinities
       plus ``bias_long`` repelling where negative. With seeded fragments (agglomeration with
       ``fragments="distance"``, mutex watershed) a fragment cut by block faces keeps its
       seed's id on every side, so the graph is that of one block and the result does not
       depend on the block size (given ``context`` of about an object radius; bounds in
       tests/test_segment.py); with waterz's fragments cut fragments are separate nodes and
       change the merge order. ``threshold_components``: pairs facing each other across a
       block face join when their mean affinity over the face exceeds ``merge_threshold`` (the
       segmentation within a block is final). Objects smaller than ``min_size`` voxels are
       dropped and ids made consecutive in the order of their first fragment.
    4. :func:`relabel_block` rewrites ``out`` through that table.

    Args:
        affinities: (n_offsets, z, y, x) array-like in [0, 1] (e.g. a zarr array),
            read one block at a time.
        offsets: One (dz, dy, dx) offset in voxels per channel; must include a
            short-range offset along each axis that is cut into blocks.
        out: Writable (z, y, x) uint64 array-like of the same spatial shape (e.g. a
            zarr array whose chunks divide ``block_shape``).
        block_shape: Block shape (z, y, x) in voxels.
        method: A method of :data:`METHODS`.
        merge_threshold: Mean face affinity above which two fragments merge
            (``threshold_components``).
        min_size: Objects (after merging) with fewer voxels than this become 0.
        context: Voxels read around each block to compute its fragments (see
            :func:`fragment_block`).
        relabel_into: Where step 4 writes the final ids (same shape), instead of back into
            ``out`` (which then holds the fragments): e.g. a sharded zarr array, written
            one whole shard at a time (its ``shards``), while ``out`` is an unsharded
            scratch array that steps 1 and 2 write and read block by block.
        merge_levels: ``agglomeration`` only: merge hierarchically, in super-blocks of this
            many blocks (an int or (z, y, x)) per level, then the whole graph
            (:func:`fragment_superblocks`, ``merge_table``'s ``levels``); None: the whole
            graph at once.
        **params: Parameters of ``method``.

    Returns:
        The number of segments written.
    """
    shape = tuple(int(s) for s in affinities.shape[1:])
    if tuple(out.shape) != shape:
        raise ValueError(f"output shape {tuple(out.shape)} differs from the affinities' {shape}")
    offsets_t, block = check_blockwise(shape, offsets, block_shape, method, min_size, merge_levels)
    windows = blocks(shape, block)
    found = [fragment_block(affinities, offsets_t, out, window, index, block, method, context, **params)
             for index, window in enumerate(windows)]
    graphs = [block_graph(affinities, offsets_t, out, window, method, params) for window in windows]
    fragments = concat_fragments(found)
    levels = None if merge_levels is None else fragment_superblocks(fragments[0], shape, block, merge_levels,
                                                                     block_seeds(method, params) is not None)
    edges, long_edges = concat_edges([g[0] for g in graphs]), concat_edges([g[1] for g in graphs])
    del graphs  # the blocks' copies
    keys, values = merge_fragments(method, fragments, edges, long_edges, min_size, merge_threshold, params, levels)
    target = out if relabel_into is None else relabel_into
    if tuple(target.shape) != shape:
        raise ValueError(f"relabel_into shape {tuple(target.shape)} differs from the affinities' {shape}")
    shards = getattr(target, "shards", None)  # a sharded target: whole shards, each written once
    for window in blocks(shape, tuple(shards)) if shards else windows:
        relabel_block(out, target, window, keys, values)
    n = int(values.max()) if len(values) else 0
    logger.info("blockwise %s: %d blocks, %d fragments, %d segments", method, len(windows), len(keys), n)
    return n


#: Block shape (z, y, x) voxels of a blockwise segmentation when ``segment.block_shape`` is null.
DEFAULT_BLOCK = (128, 256, 256)


def block_for(block_shape: Sequence[int] | None, shape: Sequence[int]) -> list[int]:
    """The blocks (z, y, x voxels) a volume of ``shape`` is segmented in: ``block_shape``
    (default :data:`DEFAULT_BLOCK`) capped at the volume."""
    return [min(int(b), int(n)) for b, n in zip(block_shape or DEFAULT_BLOCK, shape)]


def check_blockwise(shape: Sequence[int], offsets: Sequence[Sequence[int]], block_shape: Sequence[int], method: str,
                    min_size: int, merge_levels: Sequence[int | Sequence[int]] | None = None
                    ) -> tuple[list[tuple[int, int, int]], tuple[int, int, int]]:
    """Validate blockwise segmentation arguments; return the offsets and block shape as int tuples.

    Raises:
        ValueError: a block shape that is not three positive voxel counts, a negative
            ``min_size``, an unknown method, no short-range offset along an axis that
            is cut into blocks (fragments could not be joined across its faces), or
            ``merge_levels`` (:func:`dinopipe.geometry.superblock_factors`) that are invalid or set for a
            method other than agglomeration.
    """
    if len(block_shape) != 3 or any(int(b) < 1 for b in block_shape):
        raise ValueError(f"block_shape must be three positive integers (z, y, x), got {block_shape!r}")
    _check_min_size(min_size)
    if method not in METHODS:
        raise ValueError(f"unknown segmentation method {method!r}; allowed: {sorted(METHODS)}")
    offsets_t = [tuple(int(v) for v in o) for o in offsets]
    block = tuple(int(b) for b in block_shape)
    if merge_levels is not None:
        if method != "agglomeration":
            raise ValueError(f"segment.merge_levels applies to the agglomeration method only (a hierarchical mean "
                             f"linkage), not {method!r}: set it to null")
        superblock_factors(merge_levels)
    needed = range(3) if method in GRAPH_METHODS else [a for a in range(3) if shape[a] > block[a]]
    for a in needed:
        if _axis_offset(offsets_t, a) is None:
            raise ValueError(f"blockwise segmentation needs a short-range offset along axis {'zyx'[a]}, got {offsets_t}")
    return offsets_t, block  # type: ignore[return-value]


def graph_merge(method: str, merge_threshold: float, params: Mapping[str, object]) -> dict[str, Any]:
    """How :func:`merge_table` merges the region graph of ``method``'s blocks.

    ``agglomeration``: mean linkage at the method's ``threshold`` (default 0.5);
    ``threshold_components``: single linkage of face pairs at ``merge_threshold``
    (``mutex_watershed`` merges by :func:`mutex_table` instead, see :func:`merge_fragments`).
    """
    if method == "agglomeration":
        return {"linkage": "mean", "threshold": float(params.get("threshold", 0.5))}  # type: ignore[arg-type]
    return {"linkage": "single", "threshold": float(merge_threshold)}


def fragment_id_base(index: int, block_shape: Sequence[int]) -> int:
    """The id before the first fragment of block ``index`` (C order in :func:`dinopipe.geometry.blocks`).

    A block of ``prod(block_shape)`` voxels holds at most that many fragments, so blocks
    number their fragments independently (in any job, in any order) without collisions,
    and ascending ids follow the blocks' order.
    """
    return int(index) * int(np.prod([int(b) for b in block_shape]))


#: Methods whose blockwise segmentation merges fragments on the whole region graph (edges inside
#: blocks too), not finished block segmentations across faces only.
GRAPH_METHODS = ("agglomeration", "mutex_watershed")


def block_seeds(method: str, params: Mapping[str, object]) -> tuple[float, str] | None:
    """The ``seed_threshold`` and ``flood`` of the :func:`seeded_fragments` that blockwise
    ``method`` with ``params`` splits blocks into, or None where its blocks are not seeded.

    ``agglomeration`` with ``fragments="distance"``: its ``seed_threshold`` (default 0.5) and
    the voxel flood of :func:`distance_fragments` (so that the fragments are those of the
    one-piece agglomeration). ``mutex_watershed``: ``-bias_short`` (the affinity above which
    its short-range edges attract; default 0.5, kept within [0.01, 0.99]) and the edge flood,
    exact where objects touch without membrane voxels. Otherwise None.
    """
    if method == "agglomeration" and params.get("fragments", "waterz") == "distance":
        return float(params.get("seed_threshold", 0.5)), "voxel"  # type: ignore[arg-type]
    if method == "mutex_watershed":
        return min(max(-float(params.get("bias_short", -0.5)), 0.01), 0.99), "edge"  # type: ignore[arg-type]
    return None


def concat_fragments(parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The fragments of several blocks (ids and sizes in voxels, from :func:`fragment_block`) as
    one list: ids ascending, the sizes of an id found in several blocks (a seeded fragment cut by
    block faces, :func:`seeded_fragments`) summed."""
    ids = np.concatenate([np.zeros(0, np.uint64), *[np.asarray(p[0], np.uint64) for p in parts]])
    sizes = np.concatenate([np.zeros(0, np.int64), *[np.asarray(p[1], np.int64) for p in parts]])
    unique, inverse = np.unique(ids, return_inverse=True)
    return unique, np.bincount(inverse.ravel(), weights=sizes, minlength=len(unique)).astype(np.int64)


def fragment_block(affinities: Any, offsets: Sequence[Sequence[int]], out: Any, window: Sequence[slice],
                   index: int, block_shape: Sequence[int], method: str, context: int | Sequence[int] = 0,
                   **params: object) -> tuple[np.ndarray, np.ndarray]:
    """Split one block into fragments; write them with globally unique ids into ``out``.

    ``agglomeration``: the method's fragments, unmerged (its ``threshold`` applies to the
    global graph, :func:`merge_table`); with ``fragments="distance"`` they are
    :func:`seeded_fragments`, named by their seed, so a fragment cut by a block face has the
    same id in every block it reaches (:func:`concat_fragments` sums its sizes).
    ``mutex_watershed``: seeded fragments too (:func:`block_seeds`), merged by
    :func:`mutex_table` on the global graph. ``threshold_components``: the block's segmentation,
    numbered from :func:`fragment_id_base`. ``min_size`` is left at 0 (it applies to the merged
    objects).

    Args:
        affinities: (n_offsets, z, y, x) array-like; the block's window is read.
        offsets: The affinities' offsets (dz, dy, dx) in voxels.
        out: Writable (z, y, x) uint64 fragment array-like (chunks dividing the block
            shape, so that jobs writing different blocks never share a chunk).
        window: The block's window in voxels (z, y, x), from :func:`dinopipe.geometry.blocks`.
        index: The block's index in that list (numbers its fragments, see :func:`fragment_id_base`).
        block_shape: The block shape (z, y, x) in voxels.
        method: A method of :data:`METHODS`.
        context: Voxels (one value or per axis) read around the block: the block is segmented
            with them and cropped, so that fragments near its faces follow the objects beyond
            (seeds of the distance fragments outside the block, the watershed's flooding).
        **params: Parameters of ``method`` (``fragments`` among them for agglomeration).

    Returns:
        The block's fragment ids (uint64, ascending) and their sizes in voxels (int64).
    """
    window = tuple(window)
    shape = tuple(int(n) for n in affinities.shape[1:])
    grown = grow_window(window, context, shape)
    aff = np.asarray(affinities[(slice(None), *grown)], dtype=np.float32)
    seeds = block_seeds(method, params)
    if seeds is not None:
        labels = seeded_fragments(aff, offsets, window, grown, shape, *seeds)
        ids, counts = np.unique(labels, return_counts=True)
        out[window] = labels
        return ids, counts.astype(np.int64)
    if method == "agglomeration":
        params = {**params, "threshold": 1.0}  # regions merge while their mean affinity exceeds 1: never
    labels = segment(aff, offsets, method=method, min_size=0, **params)
    labels = relabel_consecutive(labels[inner_window(window, grown)])  # ids of the fragments in the core
    n = int(labels.max())
    counts = np.bincount(labels.ravel().astype(np.int64), minlength=n + 1)[1 : n + 1]
    base = fragment_id_base(index, block_shape)
    labels[labels > 0] += np.uint64(base)
    out[window] = labels
    return np.arange(base + 1, base + n + 1, dtype=np.uint64), counts.astype(np.int64)


#: The region graph's edges: fragment pairs (2, m) uint64 (smaller id first), the sum of the
#: short-range affinities between each pair (float64) and their number (int64).
Edges = tuple[np.ndarray, np.ndarray, np.ndarray]


def _aggregate(lo: np.ndarray, hi: np.ndarray, w: np.ndarray) -> Edges:
    """Voxel pairs -> one edge per fragment pair (sum and count of the affinities)."""
    keep = (lo > 0) & (hi > 0) & (lo != hi)
    if not keep.any():
        return np.zeros((2, 0), np.uint64), np.zeros(0), np.zeros(0, np.int64)
    a, b = lo[keep].astype(np.uint64), hi[keep].astype(np.uint64)
    pairs, inverse = np.unique(np.stack([np.minimum(a, b), np.maximum(a, b)]), axis=1, return_inverse=True)
    inverse = inverse.ravel()
    return pairs, np.bincount(inverse, weights=w[keep].astype(np.float64)), np.bincount(inverse).astype(np.int64)


def concat_edges(parts: Sequence[Edges]) -> Edges:
    """Several edge lists as one, sorted by pair; pairs found in several summed (in the order given).

    Memory: the concatenation (32 bytes per edge) plus a sort order and one reordered array at
    a time (24 bytes per edge), no per-pair temporaries.
    """
    pairs = np.concatenate([np.zeros((2, 0), np.uint64), *[p[0] for p in parts]], axis=1).astype(np.uint64)
    sums = np.concatenate([np.zeros(0), *[p[1] for p in parts]]).astype(np.float64)
    counts = np.concatenate([np.zeros(0, np.int64), *[p[2] for p in parts]]).astype(np.int64)
    if not pairs.shape[1]:
        return pairs, sums, counts
    order = np.lexsort((pairs[1], pairs[0]))  # stable: a pair's parts keep their order
    pairs = pairs[:, order]
    sums = sums[order]
    counts = counts[order]
    del order
    start = np.ones(pairs.shape[1], dtype=bool)
    start[1:] = pairs[0, 1:] != pairs[0, :-1]
    start[1:] |= pairs[1, 1:] != pairs[1, :-1]
    if start.all():
        return pairs, sums + 0.0, counts  # + 0.0: as a sum from zero (-0.0 -> 0.0)
    group = np.cumsum(start) - 1  # bincount adds each pair's parts from zero in their order
    return (pairs[:, start], np.bincount(group, weights=sums),
            np.bincount(group, weights=counts).astype(np.int64))


def block_edges(affinities: Any, offsets: Sequence[Sequence[int]], fragments: Any, window: Sequence[slice],
                internal: bool) -> Edges:
    """The region graph's edges of one block: across its faces with its predecessors, and inside it.

    For each axis along which the block does not start at 0, the fragments on either side of
    the face at ``window[a].start`` are paired voxel by voxel with the short-range affinity
    (offset +-1 along the axis) between them; with ``internal``, so are neighbouring voxels of
    different fragments inside the block. Reads the block and the voxel plane before each
    face, so any job can compute a block's edges once its fragments and its predecessors'
    exist. A fragment pair's voxels across one face or inside one block are all seen by one
    block, so the edges of all blocks concatenate without double counting.
    """
    window = tuple(window)
    offsets_t = [tuple(int(v) for v in o) for o in offsets]
    found: list[Edges] = []
    labels = np.asarray(fragments[window]).astype(np.uint64) if internal else None
    for a in range(3):
        k = _axis_offset(offsets_t, a)
        if k is None:
            continue
        forward = offsets_t[k][a] > 0  # the edge p <-> p + e_a is stored at p (else at p + e_a)
        if internal and window[a].stop - window[a].start > 1:
            aff = np.asarray(affinities[(k, *window)], dtype=np.float64)
            lo = np.take(labels, np.arange(labels.shape[a] - 1), axis=a)
            hi = np.take(labels, np.arange(1, labels.shape[a]), axis=a)
            w = np.take(aff, np.arange(aff.shape[a] - 1) if forward else np.arange(1, aff.shape[a]), axis=a)
            found.append(_aggregate(lo, hi, w))
        z0 = window[a].start
        if z0 == 0:
            continue
        face = list(window)
        face[a] = slice(z0 - 1, z0 + 1)
        pair = np.asarray(fragments[tuple(face)]).astype(np.uint64)
        lo, hi = np.take(pair, 0, axis=a), np.take(pair, 1, axis=a)
        at = z0 - 1 if forward else z0
        face[a] = slice(at, at + 1)
        edge = np.take(np.asarray(affinities[(k, *face)], dtype=np.float64), 0, axis=a)
        found.append(_aggregate(lo, hi, edge))
    return concat_edges(found)


def block_long_edges(affinities: Any, offsets: Sequence[Sequence[int]], fragments: Any, window: Sequence[slice],
                     boundary_threshold: float) -> Edges:
    """The long-range edges of the region graph stored in one block (for :func:`mutex_table`).

    For each long-range offset o (largest absolute component > 1), every voxel p of the block
    with p + o inside the volume pairs the fragments at p and p + o with the affinity stored
    at p, unless p or p + o is a boundary voxel: one whose lowest short-range affinity is
    below ``boundary_threshold`` (as for the seeds of :func:`seeded_fragments`). A boundary
    voxel's long-range affinities are low because it lies on a membrane, not because the
    objects on either side differ; the fragments of pieces of strong-edge components cut by a
    window (:func:`_seed_seedless_components`) hold many such voxels. Left out, the result
    depends less on the block size: on the demo volume (tests/test_segment.py) 0.0009-0.0034
    bits VOI from one block with 8-64 blocks, against 0.0063-0.0089 with them counted (VOI
    against the truth 0.072 bits, against 0.066; on voxel-flooded fragments, whose rims are
    boundary voxels, counting them had made fragments of one cell repel: 0.45 against 0.23).

    Reads the block's affinities, grown by the longest offset plus one voxel, and the
    fragments there (in neighbouring blocks too: run after every block's fragments exist).
    Each voxel pair is seen by the one block holding p, and whether a voxel is boundary does
    not depend on the block, so the edges of all blocks concatenate without double counting
    (:func:`concat_edges`) to those of the volume in one block.
    """
    window = tuple(window)
    shape = tuple(int(n) for n in fragments.shape)
    offsets_t = [tuple(int(v) for v in o) for o in offsets]
    long = [k for k, o in enumerate(offsets_t) if not _is_short(o)]
    if not long:
        return concat_edges([])
    reach = [max(abs(offsets_t[k][a]) for k in long) + 1 for a in range(3)]
    grown = grow_window(window, reach, shape)
    labels = np.asarray(fragments[grown]).astype(np.uint64)
    short = np.asarray(affinities[(slice(None), *grown)], dtype=np.float32)
    inside = _lowest_affinity(_waterz_affinities(short, offsets_t, "blockwise mutex_watershed")) >= boundary_threshold
    found: list[Edges] = []
    for k in long:
        offset = offsets_t[k]
        src = tuple(slice(max(w.start, -o), min(w.stop, n - o)) for w, o, n in zip(window, offset, shape))
        if any(s.stop <= s.start for s in src):
            continue
        at = tuple(slice(s.start - g.start, s.stop - g.start) for s, g in zip(src, grown))
        to = tuple(slice(s.start + o, s.stop + o) for s, o in zip(at, offset))
        keep = inside[at] & inside[to]
        found.append(_aggregate(np.where(keep, labels[at], 0), np.where(keep, labels[to], 0),
                                np.asarray(short[(k, *at)], dtype=np.float64)))
    return concat_edges(found)


def mutex_table(ids: np.ndarray, sizes: np.ndarray, edges: Edges, long_edges: Edges, min_size: int,
                bias_short: float = -0.5, bias_long: float = -0.5) -> tuple[np.ndarray, np.ndarray]:
    """Final segment ids of all fragments by the mutex watershed on the region graph.

    Each fragment pair gets the weight ``mean short-range affinity + bias_short`` from
    ``edges`` and ``mean long-range affinity + bias_long`` from ``long_edges`` (a pair may
    have both); positive weights attract, negative ones repel, zero ones are left out. Edges
    are taken by decreasing ``|weight|`` (ties: repulsive first, then by fragment ids): an
    attractive edge joins its two clusters unless a repulsive edge already taken separates
    them, a repulsive edge forbids their joining from then on (the mutex watershed of Wolf et
    al. 2018 on a graph; ``mwatershed.cluster`` runs the sweep). With one-voxel fragments (and
    every long-range edge counted) it is the voxel-grid :func:`mutex_watershed` with the same
    biases (tests/test_segment.py). Objects are numbered and
    filtered like :func:`merge_table` (``min_size`` in voxels; ids in the order of their first
    fragment).

    Args:
        ids: Every fragment id (uint64, unique).
        sizes: Each fragment's size in voxels.
        edges: Short-range edges (:func:`block_edges` with ``internal``, :func:`concat_edges`).
        long_edges: Long-range edges (:func:`block_long_edges`).
        min_size: Smallest object kept, in voxels.
        bias_short, bias_long: Added to the mean short- and long-range affinities (finite).

    Returns:
        ``keys`` (the fragment ids, ascending) and ``values`` (uint64 segment ids), for
        :func:`relabel_block`.
    """
    for name, bias in (("bias_short", bias_short), ("bias_long", bias_long)):
        if not np.isfinite(bias):
            raise ValueError(f"{name} must be a finite number, got {bias!r}")
    keys = np.sort(np.asarray(ids, dtype=np.uint64))
    n = len(keys)
    u, v, w = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0)]
    for (pairs, sums, counts), bias in ((edges, bias_short), (long_edges, bias_long)):
        pairs = np.asarray(pairs, dtype=np.uint64).reshape(2, -1)
        where = np.searchsorted(keys, pairs)
        if pairs.size and (where.max() >= n or not np.array_equal(keys[np.minimum(where, n - 1)], pairs)):
            raise ValueError("mutex_table: an edge names a fragment that is not in the fragment list")
        u.append(where[0])
        v.append(where[1])
        w.append(np.asarray(sums, np.float64) / np.maximum(np.asarray(counts), 1) + float(bias))
    u_all, v_all, w_all = np.concatenate(u), np.concatenate(v), np.concatenate(w)
    order = np.lexsort((v_all, u_all, w_all > 0, -np.abs(w_all)))  # ties: repulsive first
    order = order[w_all[order] != 0]
    clusters = mwatershed.cluster(list(zip((w_all[order] > 0).tolist(), u_all[order].tolist(),
                                           v_all[order].tolist())))
    join = np.array([(a, b) for a, b in clusters if a != b], dtype=np.int64).reshape(-1, 2).T
    n_attract = int((w_all > 0).sum())
    logger.debug("graph mutex watershed: %d fragments, %d attractive and %d repulsive edges", n,
                 n_attract, len(w_all) - n_attract)
    # number and filter the objects like merge_table: each fragment joined to its cluster's
    return merge_table(keys, np.asarray(sizes)[np.argsort(ids, kind="stable")], (
        keys[join], np.ones(join.shape[1]), np.ones(join.shape[1], np.int64)), min_size)


def block_graph(affinities: Any, offsets: Sequence[Sequence[int]], fragments: Any, window: Sequence[slice],
                method: str, params: Mapping[str, object]) -> tuple[Edges, Edges]:
    """The region graph's edges that one block of blockwise ``method`` contributes: short-range
    (:func:`block_edges`, inside the block too for :data:`GRAPH_METHODS`) and long-range
    (:func:`block_long_edges` for ``mutex_watershed``, none for the others)."""
    short = block_edges(affinities, offsets, fragments, window, method in GRAPH_METHODS)
    if method != "mutex_watershed":
        return short, concat_edges([])
    return short, block_long_edges(affinities, offsets, fragments, window,
                                   block_seeds(method, params)[0])  # type: ignore[index]


def merge_fragments(method: str, fragments: tuple[np.ndarray, np.ndarray], edges: Edges, long_edges: Edges,
                    min_size: int, merge_threshold: float, params: Mapping[str, object],
                    levels: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The global merge of blockwise ``method``: :func:`mutex_table` for ``mutex_watershed`` (its
    biases), :func:`merge_table` (:func:`graph_merge`) for the others.

    Args:
        method: A method of :data:`METHODS`.
        fragments: Fragment ids and sizes (voxels), from :func:`concat_fragments`.
        edges: Short-range edges; ``long_edges`` the long-range ones (used by mutex watershed),
            both from :func:`block_graph` and :func:`concat_edges`.
        min_size: Smallest object kept, in voxels.
        merge_threshold: Face merge threshold of ``threshold_components``.
        params: The method's parameters.
        levels: ``agglomeration``'s hierarchical merge (``merge_table``'s ``levels``, from
            :func:`fragment_superblocks`); None: the whole graph at once.
    """
    ids, sizes = fragments
    if levels is not None and method != "agglomeration":
        raise ValueError(f"merge levels apply to the agglomeration method only, not {method!r}")
    if method == "mutex_watershed":
        return mutex_table(ids, sizes, edges, long_edges, min_size, float(params.get("bias_short", -0.5)),  # type: ignore[arg-type]
                           float(params.get("bias_long", -0.5)))  # type: ignore[arg-type]
    return merge_table(ids, sizes, edges, min_size, **graph_merge(method, merge_threshold, params), levels=levels)


def merge_table(ids: np.ndarray, sizes: np.ndarray, edges: Edges, min_size: int, linkage: str = "single",
                threshold: float = 0.5, levels: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Final segment ids of all fragments: the region graph merged, small objects dropped.

    ``linkage`` "single": two fragments join when the mean affinity of their edge exceeds
    ``threshold`` (objects are connected components); "mean": hierarchical agglomeration
    while the mean affinity on a whole common boundary exceeds ``threshold``. An object with
    fewer than ``min_size`` voxels (at least 1) gets id 0; the others are numbered 1, 2, ...
    in the order of their smallest fragment id (blocks in C order).

    Mean linkage is :func:`dinopipe.linkage.mean_linkage` (flat arrays; with the id lookup
    ~130 bytes and ~7 us of CPU per edge above the edges themselves, benchmarks/merge.py);
    with ``levels`` it is
    :func:`dinopipe.linkage.hierarchical_mean_linkage`: groups of fragments (super-blocks)
    agglomerated on their own edges first, then the contracted graph (approximate, see there).
    Single linkage is exact in any split: connected components of the edges above ``threshold``.

    Args:
        ids: Every fragment id (uint64, unique).
        sizes: Each fragment's size in voxels.
        edges: The region graph (:data:`Edges`, from :func:`block_edges` / :func:`concat_edges`).
        min_size: Smallest object kept, in voxels.
        linkage: "single" or "mean".
        threshold: Mean affinity above which regions join, in [0, 1].
        levels: For mean linkage only: per level, the group of every fragment (in the order of
            ``ids``), each level's groups unions of the previous level's
            (:func:`fragment_superblocks`). None: the whole graph at once.

    Returns:
        ``keys`` (the fragment ids, ascending) and ``values`` (uint64 segment ids), for
        :func:`relabel_block`.
    """
    _check_min_size(min_size)
    if linkage not in ("single", "mean"):
        raise ValueError(f"merge_table: linkage must be 'single' or 'mean', got {linkage!r}")
    if levels and linkage != "mean":
        raise ValueError("merge_table: levels (a hierarchical merge) apply to mean linkage only; single linkage "
                         "is exact as connected components")
    order = np.argsort(ids, kind="stable")
    keys = np.asarray(ids, dtype=np.uint64)[order]
    sizes = np.asarray(sizes, dtype=np.int64)[order]
    if len(keys) > 1 and not (keys[1:] > keys[:-1]).all():
        raise ValueError("merge_table: fragment ids are not unique")
    n = len(keys)
    if n == 0:
        return keys, np.zeros(0, dtype=np.uint64)
    pairs, sums, counts = edges
    pairs = np.asarray(pairs, dtype=np.uint64).reshape(2, -1)
    where = np.searchsorted(keys, pairs)
    if pairs.size and (where.max() >= n or not np.array_equal(keys[np.minimum(where, n - 1)], pairs)):
        raise ValueError("merge_table: an edge names a fragment that is not in the fragment list")
    if linkage == "single":
        mean = np.asarray(sums, dtype=np.float64) / np.maximum(np.asarray(counts), 1)
        join = where[:, mean > threshold]
        graph = sparse.coo_matrix((np.ones(join.shape[1], dtype=np.int8), (join[0], join[1])), shape=(n, n))
        component = csgraph.connected_components(graph, directed=False)[1]
    else:
        sums, counts = np.asarray(sums, np.float64), np.asarray(counts)
        if levels:
            component = hierarchical_mean_linkage(n, where[0], where[1], sums, counts, threshold,
                                                  [np.asarray(level)[order] for level in levels])
        else:
            component = mean_linkage(n, where[0], where[1], sums, counts, threshold)
        component = np.unique(component, return_inverse=True)[1].ravel()
    first = np.full(component.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, component, np.arange(n))  # each object's first fragment (ids ascending)
    object_sizes = np.bincount(component, weights=sizes, minlength=len(first))
    kept = object_sizes >= max(min_size, 1)
    rank = np.argsort(first[kept], kind="stable")
    numbered = np.zeros(int(kept.sum()), dtype=np.uint64)
    numbered[rank] = np.arange(1, int(kept.sum()) + 1, dtype=np.uint64)
    final = np.zeros(len(first), dtype=np.uint64)
    final[np.flatnonzero(kept)] = numbered
    return keys, final[component]


def fragment_superblocks(ids: np.ndarray, shape: Sequence[int], block_shape: Sequence[int],
                         factors: Sequence[int | Sequence[int]], seeded: bool = False) -> list[np.ndarray]:
    """The super-block of every fragment at each level of a hierarchical merge (``merge_table``'s ``levels``).

    A fragment's block follows from its id: the block of its seed's voxel for
    :func:`seeded_fragments` (a fragment cut by block faces goes with its seed), else the
    block that numbered it (:func:`fragment_id_base`). Level ``k`` groups ``factors[k]``
    blocks per axis (one int for all three axes, or (z, y, x)), so each level must be a
    multiple of the previous one.

    Args:
        ids: Fragment ids (uint64, from :func:`fragment_block`), any order.
        shape: The volume's shape (z, y, x) in voxels.
        block_shape: The block shape (z, y, x) in voxels.
        factors: Blocks per super-block along (z, y, x) at each level, increasing.
        seeded: Whether the ids name seeds (:func:`block_seeds` is not None for the method).

    Returns:
        Per level, (len(ids),) int64 super-block indices (C order), aligned with ``ids``.

    Raises:
        ValueError: A factor below 1, or a level that is not a multiple of the previous one.
    """
    block = np.array([int(b) for b in block_shape])
    grid = -(-np.array([int(n) for n in shape]) // block)
    index = (np.asarray(ids, dtype=np.uint64) - np.uint64(1)).astype(np.int64)
    if seeded:  # the voxel of the seed, C order in the volume
        coords = np.stack(np.unravel_index(index, tuple(int(n) for n in shape))) // block[:, None]
    else:
        coords = np.stack(np.unravel_index(index // int(np.prod(block)), tuple(grid)))
    return [np.ravel_multi_index(tuple(coords // f[:, None]), tuple(-(-grid // f))).astype(np.int64)
            for f in superblock_factors(factors)]


def relabel_block(fragments: Any, out: Any, window: Sequence[slice], keys: np.ndarray, values: np.ndarray) -> None:
    """Write one block of ``fragments`` to ``out`` with each fragment id replaced by its segment id.

    ``keys``/``values`` from :func:`merge_table`; id 0 stays 0. ``out`` may be ``fragments``.
    """
    window = tuple(window)
    block = np.asarray(fragments[window]).astype(np.uint64)
    result = np.zeros(block.shape, dtype=np.uint64)
    fg = block > 0
    if fg.any():
        where = np.searchsorted(keys, block[fg])
        if where.max() >= len(keys) or not np.array_equal(keys[where], block[fg]):
            raise ValueError(f"relabel_block: fragments in window {window} missing from the merge table")
        result[fg] = values[where]
    out[window] = result


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
