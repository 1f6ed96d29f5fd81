"""Agglomeration of a region graph by mean linkage, in one piece or hierarchically in groups.

A region graph has ``n`` nodes (fragments, indices 0..n-1) and ``m`` undirected edges
``u[i] - v[i]``, each with the sum of the short-range affinities across that boundary
(``sums[i]``, float64) and their number (``counts[i]``, voxel pairs, int64). Mean linkage
(waterz's ``MeanAffinity``) repeatedly joins the two adjacent regions with the highest mean
boundary affinity ``sum / count`` (the boundary of a joined region being the union of its
parts') while that mean exceeds a threshold.

:func:`mean_linkage` is the whole graph in one process, held in flat arrays (about 105 bytes
and 7 us of CPU per edge, a quarter of the memory and half the time of the dict-based
implementation it replaced; benchmarks/merge.py); :func:`grouped_mean_linkage`,
:func:`contract` and :func:`hierarchical_mean_linkage` split a graph too large for one job:
groups of nodes (super-blocks of blocks) are agglomerated independently on the edges inside
them, the graph is contracted to their regions, and the (much smaller) contracted graph is
agglomerated once more. That is exact inside each group's own order of merges but not the
global order: a region joining a neighbour across a group border first could have changed
its later merges inside the group. tests/test_linkage.py bounds the difference.
"""

from __future__ import annotations

import heapq
import logging
import struct
from array import array
from bisect import bisect_left
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)

_SIGN = 1 << 63
_MASK64 = (1 << 64) - 1
_PACK = struct.Struct("<d").pack


def _rank(mean: float) -> int:
    """A 64-bit int ascending as ``mean`` descends (floats' order, -0.0 as 0.0; no NaN)."""
    bits = int.from_bytes(_PACK(mean + 0.0), "little")
    return _MASK64 ^ (bits ^ _SIGN if bits < _SIGN else bits ^ _MASK64)


def _ranks(means: np.ndarray) -> np.ndarray:
    """:func:`_rank` of a float64 array, as uint64."""
    bits = (np.asarray(means, dtype=np.float64) + 0.0).view(np.uint64)
    sign = np.uint64(_SIGN)
    return ~np.where(bits < sign, bits ^ sign, ~bits)


def check_graph(n: int, u: np.ndarray, v: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> None:
    """Raise ValueError unless ``u``, ``v``, ``sums``, ``counts`` describe a simple graph of ``n`` nodes:
    equal lengths, node indices in 0..n-1, no self-loops, positive counts, finite sums."""
    m = len(u)
    if not len(v) == len(sums) == len(counts) == m:
        raise ValueError(f"region graph: u, v, sums, counts differ in length ({m}, {len(v)}, {len(sums)}, "
                         f"{len(counts)})")
    if m == 0:
        return
    lo, hi = min(int(u.min()), int(v.min())), max(int(u.max()), int(v.max()))
    if lo < 0 or hi >= n:
        raise ValueError(f"region graph: node indices {lo}..{hi} outside 0..{n - 1}")
    if np.any(u == v):
        raise ValueError(f"region graph: {int(np.sum(u == v))} self-loop edge(s), e.g. node {int(u[u == v][0])}")
    if not np.all(np.asarray(counts) > 0):
        raise ValueError("region graph: every edge needs a positive count of voxel pairs")
    if not np.all(np.isfinite(sums)):
        raise ValueError("region graph: edge sums must be finite")


def mean_linkage(n: int, u: np.ndarray, v: np.ndarray, sums: np.ndarray, counts: np.ndarray,
                 threshold: float) -> np.ndarray:
    """Hierarchical agglomeration of ``n`` regions by mean boundary affinity (waterz's MeanAffinity).

    Repeatedly joins the two adjacent regions with the highest mean affinity on their common
    boundary while it exceeds ``threshold``. Ties go to the smaller ``(a, b)`` of the pair as
    last queued: first the pairs as given (``u[i], v[i]``), after a join ``(survivor,
    neighbour)``; the survivor of a join is the region with more neighbours (the first of
    the pair on a tie). Merges, their order and the ties are those of the dict-based
    implementation this replaced (tests/test_linkage.py keeps it as the reference).

    Memory: per edge its sum and count (16 bytes), its place in the sorted queue of the
    initial pairs (4 bytes), 16 bytes of adjacency (each direction one int64 ``neighbour << k
    | edge``, sorted per node: one ``array`` object per node) and the queue of pairs queued
    again after joins (Python ints, ~50 bytes each), compacted when it doubles; about 105
    bytes per edge at the peak in all (benchmarks/merge.py, ~7 edges per node). Pairs whose
    mean is at most ``threshold`` are never queued.

    Args:
        n: Number of regions.
        u, v: (m,) node indices of each edge (a simple graph: no duplicate pair, no self-loop).
        sums: (m,) float64 sum of the affinities across each boundary.
        counts: (m,) positive voxel-pair counts of each boundary.
        threshold: Mean affinity above which regions join.

    Returns:
        (n,) int64: each region's representative (a node index; equal for joined regions).

    Raises:
        ValueError: An invalid graph (:func:`check_graph`, duplicate pairs) or one too large
            for 63-bit adjacency keys.
    """
    u = np.asarray(u, dtype=np.int64).ravel()
    v = np.asarray(v, dtype=np.int64).ravel()
    sums_np = np.asarray(sums, dtype=np.float64).ravel()
    counts_np = np.asarray(counts, dtype=np.int64).ravel()
    check_graph(n, u, v, sums_np, counts_np)
    m = len(u)
    eb = max(m.bit_length(), 1)  # adjacency entry: neighbour << eb | edge
    nb = max((n - 1).bit_length(), 1)  # queue key: rank << 2 nb | a << nb | b
    if m and (nb + eb > 62 or 2 * nb > 62):
        raise ValueError(f"mean_linkage: {n} nodes and {m} edges exceed 63-bit adjacency keys; split the graph "
                         "(hierarchical_mean_linkage)")
    parent = np.arange(n, dtype=np.int64)
    if m == 0 or n < 2:
        return parent
    emask, nmask = (1 << eb) - 1, (1 << nb) - 1
    limit = _rank(float(threshold))
    first = _initial_queue(u, v, sums_np, counts_np, limit)
    n_first = len(first)
    adj: list[array | None] = _adjacency(n, u, v, nb, eb)  # type: ignore[assignment]

    S = array("d", sums_np.tobytes())
    C = array("q", counts_np.tobytes())
    parents = array("q", parent.tobytes())
    alive = bytearray(b"\x01") * n
    heap: list[int] = []
    heappush, heappop = heapq.heappush, heapq.heappop
    compact_at = max(1 << 16, m // 4)
    i = 0

    def initial(j: int) -> int:
        e = int(first[j])  # its rank from the input: the edge's sum may have grown since
        return (_rank(float(sums_np[e]) / int(counts_np[e])) << 2 * nb) | (int(u[e]) << nb) | int(v[e])

    head = initial(0) if n_first else None
    joins = 0
    while True:
        if head is not None and (not heap or head <= heap[0]):
            key = head
            i += 1
            head = initial(i) if i < n_first else None
        elif heap:
            key = heappop(heap)
        else:
            break
        a = (key >> nb) & nmask
        b = key & nmask
        if not (alive[a] and alive[b]):
            continue  # a region already joined
        A = adj[a]
        k = bisect_left(A, b << eb)  # type: ignore[arg-type]
        if k == len(A) or A[k] >> eb != b:  # type: ignore[index]
            continue  # not adjacent (cannot happen for live pairs; kept for safety)
        e = A[k] & emask  # type: ignore[index]
        if _rank(S[e] / C[e]) != key >> 2 * nb:
            continue  # the mean has changed since
        B = adj[b]
        if len(A) < len(B):  # type: ignore[arg-type]
            a, b, A, B = b, a, B, A
            k = bisect_left(A, b << eb)  # type: ignore[arg-type]
        parents[b] = a
        alive[b] = 0
        joins += 1
        del A[k]  # type: ignore[union-attr]
        for entry in B:  # type: ignore[union-attr]
            w = entry >> eb
            if w == a:
                continue
            e = entry & emask
            W = adj[w]
            del W[bisect_left(W, b << eb)]  # type: ignore[arg-type,union-attr]
            k = bisect_left(A, w << eb)  # type: ignore[arg-type]
            if k < len(A) and A[k] >> eb == w:  # type: ignore[arg-type,index]
                f = A[k] & emask  # type: ignore[index]
                S[f] += S[e]
                C[f] += C[e]
                r = _rank(S[f] / C[f])
            else:  # b's boundary with w becomes a's
                A.insert(k, (w << eb) | e)  # type: ignore[union-attr]
                W.insert(bisect_left(W, a << eb), (a << eb) | e)  # type: ignore[arg-type,union-attr]
                r = _rank(S[e] / C[e])
            if r < limit:
                heappush(heap, (r << 2 * nb) | (a << nb) | w)
        adj[b] = None
        if len(heap) > compact_at:  # drop entries naming a joined region: they never become valid
            heap = [q for q in heap if alive[(q >> nb) & nmask] and alive[q & nmask]]
            heapq.heapify(heap)
            compact_at = max(compact_at, 2 * len(heap))
    logger.debug("mean linkage: %d regions, %d edges, %d joins at %g", n, m, joins, threshold)
    return _representatives(np.frombuffer(parents, dtype=np.int64).copy())


def _initial_queue(u: np.ndarray, v: np.ndarray, sums: np.ndarray, counts: np.ndarray, limit: int) -> np.ndarray:
    """The edges whose mean ranks below ``limit`` (:func:`_rank`: above the threshold), sorted by
    (rank, u, v): the order in which :func:`mean_linkage` first considers them (int32 when it fits)."""
    ranks = _ranks(sums / counts)
    first = np.flatnonzero(ranks < np.uint64(limit))
    return first[np.lexsort((v[first], u[first], ranks[first]))].astype(np.int32 if len(u) < 2**31 else np.int64)


def _adjacency(n: int, u: np.ndarray, v: np.ndarray, nb: int, eb: int) -> list[array]:
    """Per node its sorted adjacency entries ``neighbour << eb | edge`` (both directions of each edge).

    Raises:
        ValueError: the edge list holds a pair twice.
    """
    m = len(u)
    pair = np.concatenate([(u << nb) | v, (v << nb) | u])  # node << nb | neighbour, both directions
    order = np.argsort(pair, kind="stable")
    pair = pair[order]
    if m > 1 and np.any(pair[1:] == pair[:-1]):
        raise ValueError("mean_linkage: the edge list holds a pair twice")
    bounds = np.searchsorted(pair, np.arange(n + 1, dtype=np.int64) << nb).tolist()
    order %= m
    pair &= (1 << nb) - 1
    pair <<= eb
    pair |= order
    del order
    adj: list[array] = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        a = array("q")
        a.frombytes(pair[start:stop].tobytes())
        adj.append(a)
    return adj


def _representatives(parent: np.ndarray) -> np.ndarray:
    """Each node's representative: ``parent`` (a node per node, roots their own) followed to the end."""
    while True:
        up = parent[parent]
        if np.array_equal(up, parent):
            return parent
        parent = up


def contract(parent: np.ndarray, u: np.ndarray, v: np.ndarray, sums: np.ndarray,
             counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The region graph of the regions ``parent`` defines: nodes joined, boundaries summed.

    Args:
        parent: (n,) each node's representative (from :func:`mean_linkage`).
        u, v, sums, counts: The graph's edges (as in :func:`mean_linkage`).

    Returns:
        ``region`` ((n,) int64: each node's region, 0..r-1, in the order of the
        representatives) and the contracted graph's ``u``, ``v`` (smaller region first),
        ``sums``, ``counts``; edges inside a region are dropped. Summation order: the
        edges of each region pair in their order in the input.
    """
    _, region = np.unique(np.asarray(parent), return_inverse=True)
    region = region.ravel().astype(np.int64)
    ru, rv = region[np.asarray(u, dtype=np.int64)], region[np.asarray(v, dtype=np.int64)]
    keep = ru != rv
    lo, hi = np.minimum(ru[keep], rv[keep]), np.maximum(ru[keep], rv[keep])
    r = int(region.max()) + 1 if len(region) else 0
    if not len(lo):
        empty = np.zeros(0, np.int64)
        return region, empty, empty.copy(), np.zeros(0), empty.copy()
    pair, inverse = np.unique(lo * r + hi, return_inverse=True)
    inverse = inverse.ravel()
    s = np.bincount(inverse, weights=np.asarray(sums, dtype=np.float64)[keep], minlength=len(pair))
    c = np.bincount(inverse, weights=np.asarray(counts)[keep], minlength=len(pair)).astype(np.int64)
    return region, pair // r, pair % r, s, c


def grouped_mean_linkage(n: int, u: np.ndarray, v: np.ndarray, sums: np.ndarray, counts: np.ndarray,
                         threshold: float, groups: np.ndarray) -> np.ndarray:
    """:func:`mean_linkage` of each group of nodes on its own edges (both ends in the group).

    What one job per group computes (each needs only its group's edges); edges between
    groups are left for the next level (:func:`contract`).

    Args:
        n, u, v, sums, counts, threshold: As for :func:`mean_linkage`.
        groups: (n,) int group of every node (e.g. its super-block).

    Returns:
        (n,) int64 representatives (each within its node's group).
    """
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups must hold one group per node ({n}), got shape {groups.shape}")
    u = np.asarray(u, dtype=np.int64)
    v = np.asarray(v, dtype=np.int64)
    parent = np.arange(n, dtype=np.int64)
    inside = np.flatnonzero(groups[u] == groups[v])
    if not len(inside):
        return parent
    by_group = inside[np.argsort(groups[u[inside]], kind="stable")]  # edges of a group keep their order
    edge_group = groups[u[by_group]]
    cuts = np.flatnonzero(edge_group[1:] != edge_group[:-1]) + 1
    for edges in np.split(by_group, cuts):
        nodes, local = np.unique(np.concatenate([u[edges], v[edges]]), return_inverse=True)
        local = local.ravel()
        k = len(edges)
        rep = mean_linkage(len(nodes), local[:k], local[k:], np.asarray(sums)[edges], np.asarray(counts)[edges],
                           threshold)
        parent[nodes] = nodes[rep]
    return parent


def hierarchical_mean_linkage(n: int, u: np.ndarray, v: np.ndarray, sums: np.ndarray, counts: np.ndarray,
                              threshold: float, levels: Sequence[np.ndarray]) -> np.ndarray:
    """Mean linkage in levels: groups of nodes first (:func:`grouped_mean_linkage`), then groups
    of their regions, ..., then the whole contracted graph.

    Args:
        n, u, v, sums, counts, threshold: As for :func:`mean_linkage`.
        levels: Per level, (n,) the group of every original node; each level's groups must be
            unions of the previous level's (e.g. super-blocks of 2 x 2 x 2 blocks, then of
            4 x 4 x 4). An empty list is :func:`mean_linkage` of the whole graph.

    Returns:
        (n,) int64 representatives: equal for nodes of one object.
    """
    region = np.arange(n, dtype=np.int64)  # each original node's node in the current graph
    graph = (np.asarray(u, np.int64), np.asarray(v, np.int64), np.asarray(sums, np.float64), np.asarray(counts))
    nodes = n
    for level, groups in enumerate(levels):
        groups = np.asarray(groups)
        if groups.shape != (n,):
            raise ValueError(f"levels[{level}] must hold one group per node ({n}), got shape {groups.shape}")
        current = np.zeros(nodes, dtype=groups.dtype)
        current[region] = groups
        if not np.array_equal(current[region], groups):
            raise ValueError(f"levels[{level}]: a region of the previous level spans several groups")
        parent = grouped_mean_linkage(nodes, *graph, threshold, current)
        step, *graph = contract(parent, *graph)
        region = step[region]
        nodes = int(step.max()) + 1 if len(step) else 0
        logger.info("mean linkage level %d: %d groups -> %d regions, %d edges between them", level,
                    len(np.unique(groups)), nodes, len(graph[0]))
    parent = mean_linkage(nodes, *graph, threshold)
    return parent[region]
