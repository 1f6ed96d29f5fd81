"""The global merge of a blockwise segmentation (rule segment_merge): memory and time per edge.

The merge holds the whole region graph (fragments, and per pair of touching fragments the sum
and count of the affinities between them) and agglomerates it by mean linkage. Its inputs are
synthetic region graphs shaped like the real ones: fragments on a 3-D grid, each joined to
its 6 face neighbours and 8 of its 12 edge-diagonal ones (7 edges per fragment, as between
watershed fragments), ``OBJECT``^3 neighbouring fragments forming one object (mean boundary affinity
0.75 +- 0.15 inside an object, 0.3 +- 0.15 between objects; 1-199 voxel pairs per edge),
merged at threshold 0.5. Two sizes, ~10^5 and ~10^6 edges (``GRAPHS``).

Each measurement runs in a fresh child process that loads the graph (numpy arrays), records
its RSS, resets the peak (``/proc/self/clear_refs``), runs, and reports the peak RSS above
that RSS (``VmHWM - VmRSS``: what the merge itself allocated) per edge, and the CPU time
(user + system) per edge: on a shared machine wall time follows the other load (2-6x here),
CPU time far less. Side by side, alternately, the fastest of ``REPEATS`` runs each:

* ``dict``: the dict-of-lists mean linkage the merge used before (:func:`dict_mean_linkage`,
  kept here as the reference; tests/test_linkage.py checks the new one against it);
* ``flat``: :func:`dinopipe.linkage.mean_linkage` (flat arrays); the ratios flat / dict of
  bytes and seconds per edge are the goals (<= 0.5 and <= 1), and both must give the same
  representatives;
* ``job``: what the segment_merge job does after loading its inputs: the edges of ``PARTS``
  parts (uint64 fragment id pairs, float64 sums, int64 counts: 32 bytes per edge, loaded
  before the measurement starts) joined by :func:`dinopipe.segment.concat_edges`, then
  :func:`dinopipe.segment.merge_table` with mean linkage (id lookup, linkage, numbering);
  goal <= 150 bytes per edge above the loaded edges (docs/cluster.md section 8 scales it);
* ``single``: the same with single linkage (the other methods' merge: connected components
  of the edges above the threshold, scipy);
* ``hierarchical``: the same with one level of super-blocks of ``SUPER``^3 fragments
  (``merge_table``'s ``levels``: :func:`dinopipe.linkage.hierarchical_mean_linkage` in one
  process); also reported: the contracted graph left for the top level (edges and regions
  over the input's) and the VOI in bits between its partition of the fragments and the
  global one (each fragment weighted by one). On these graphs, whose objects are cubes of
  fragments with noisy edges, it is large (~0.3 bits); the bound that matters is measured on
  the demo volume:
* ``demo``: the demo volume (64 x 96 x 96 labels, noisy affinities, distance fragments of
  16 x 24 x 24 blocks): VOI of the hierarchical merge with super-blocks of 2 x 2 x 2 blocks
  (and others, ``DEMO_LEVELS``) from the global merge (goal <= 0.05 bits) and from the truth.

The last line is one JSON object with the figures and a "goals" key.

Run: .venv/bin/python benchmarks/merge.py (about 5 minutes on 2 quiet cores, 10 under load).
"""

from __future__ import annotations

import heapq
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GRAPHS = {"1e5": (24, 24, 24), "1e6": (52, 52, 52)}  # fragments along (z, y, x): ~0.1 and ~0.96 million edges
OBJECT = 4  # fragments per object along each axis
SUPER = 13  # fragments per super-block along each axis (hierarchical)
THRESHOLD = 0.5
REPEATS = int(os.environ.get("BENCH_REPEATS", "2"))
#: Edge directions between grid fragments: 3 faces and 4 diagonals (each edge once).
DIRECTIONS = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 1, 1), (1, 0, 1), (1, -1, 0)]
KINDS = ["dict", "flat", "job", "single", "hierarchical"]
DEMO_SHAPE = (64, 96, 96)  # label voxels of the demo volume (z, y, x)
PARTS = 16  # edge files the merge job reads (segment.jobs)


def dict_mean_linkage(n: int, u: np.ndarray, v: np.ndarray, sums: np.ndarray, counts: np.ndarray,
                      threshold: float) -> np.ndarray:
    """The dict-based mean linkage ``dinopipe.segment`` used before ``dinopipe.linkage``: each
    region's neighbours in a dict of shared [sum, count] lists, a heap of (-mean, a, b)
    tuples. The reference for the merges, their order and the ties."""
    adj: list[dict[int, list[float]] | None] = [{} for _ in range(n)]
    heap = []
    for a, b, s, c in zip(u.tolist(), v.tolist(), sums.tolist(), counts.tolist()):
        e = [s, c]
        adj[a][b] = e  # type: ignore[index]
        adj[b][a] = e  # type: ignore[index]
        heap.append((-s / c, a, b))
    heapq.heapify(heap)
    parent = np.arange(n)
    while heap:
        neg, a, b = heapq.heappop(heap)
        if -neg <= threshold:
            break
        ea, eb = adj[a], adj[b]
        if ea is None or eb is None or b not in ea or ea[b][0] / ea[b][1] != -neg:
            continue  # a region already joined, or a mean since changed
        if len(ea) < len(eb):
            a, b, ea, eb = b, a, eb, ea
        parent[b] = a
        del ea[b]
        for w, e in eb.items():  # b's boundary becomes a's
            if w == a:
                continue
            ew = adj[w]
            del ew[b]  # type: ignore[union-attr]
            joined = ea.get(w)
            if joined is None:
                ea[w] = ew[a] = joined = e  # type: ignore[index]
            else:
                joined[0] += e[0]
                joined[1] += e[1]
            heapq.heappush(heap, (-joined[0] / joined[1], a, w))
        adj[b] = None
    while True:
        up = parent[parent]
        if np.array_equal(up, parent):
            return parent
        parent = up


def grid_graph(shape: tuple[int, int, int], seed: int = 0, object_size: int = OBJECT
               ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A synthetic region graph: ``n`` fragments on a grid of ``shape`` (z, y, x) (see the module
    docstring); returns n, u, v (int64, u < v), sums (float64), counts (int64)."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    index = np.arange(n).reshape(shape)
    coords = np.stack(np.unravel_index(np.arange(n), shape))
    objects = np.ravel_multi_index(tuple(c // object_size for c in coords), tuple(-(-s // object_size) for s in shape))
    us, vs = [], []
    for d in DIRECTIONS:
        src = tuple(slice(max(0, -o), s - max(0, o)) for o, s in zip(d, shape))
        dst = tuple(slice(max(0, o), s - max(0, -o)) for o, s in zip(d, shape))
        us.append(index[src].ravel())
        vs.append(index[dst].ravel())
    a, b = np.concatenate(us), np.concatenate(vs)
    u, v = np.minimum(a, b).astype(np.int64), np.maximum(a, b).astype(np.int64)
    counts = rng.integers(1, 200, len(u))
    mean = np.clip(np.where(objects[u] == objects[v], 0.75, 0.3) + rng.normal(0, 0.15, len(u)), 0, 1)
    return n, u, v, mean * counts, counts.astype(np.int64)


def superblocks(shape: tuple[int, int, int], size: int = SUPER) -> np.ndarray:
    """The super-block (``size``^3 grid fragments) of every fragment of :func:`grid_graph`."""
    coords = np.stack(np.unravel_index(np.arange(int(np.prod(shape))), shape))
    return np.ravel_multi_index(tuple(c // size for c in coords), tuple(-(-s // size) for s in shape))


def _status(key: str) -> int:
    """A /proc/self/status figure in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def run_kind(kind: str, graph: str) -> dict:
    """One measurement in this process (the child): seconds and peak bytes above the loaded graph."""
    from dinopipe.linkage import mean_linkage
    from dinopipe.segment import concat_edges, merge_table

    with np.load(graph) as data:
        n, u, v, sums, counts = int(data["n"]), data["u"], data["v"], data["sums"], data["counts"]
        levels = [data["groups"]]
    if kind in ("job", "single", "hierarchical"):  # the job's inputs: fragment ids and the parts' edges
        ids = np.arange(1, n + 1, dtype=np.uint64)
        sizes = np.ones(n, dtype=np.int64)
        split = np.array_split(np.random.default_rng(0).permutation(len(u)), PARTS)
        parts = [(np.stack([u[p], v[p]]).astype(np.uint64) + np.uint64(1), sums[p], counts[p]) for p in split]
        del u, v, sums, counts, split
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := RSS now
    t = time.process_time()
    if kind == "dict":
        rep = dict_mean_linkage(n, u, v, sums, counts, THRESHOLD)
    elif kind == "flat":
        rep = mean_linkage(n, u, v, sums, counts, THRESHOLD)
    else:
        linkage = {"single": {"linkage": "single"}, "job": {"linkage": "mean"},
                   "hierarchical": {"linkage": "mean", "levels": levels}}[kind]
        edges = concat_edges(parts)
        del parts
        rep = merge_table(ids, sizes, edges, 0, threshold=THRESHOLD, **linkage)[1]
    seconds = time.process_time() - t
    peak = _status("VmHWM") - before
    _, first, inverse = np.unique(rep, return_index=True, return_inverse=True)
    return {"seconds": seconds, "peak_bytes": peak,
            "partition": np.argsort(np.argsort(first))[inverse.ravel()]}  # objects numbered by first fragment


def measure(kind: str, graph: Path, out: Path) -> dict:
    """:func:`run_kind` in a fresh child process."""
    subprocess.run([sys.executable, __file__, "--child", kind, str(graph), str(out)], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    with np.load(out) as data:
        return {"seconds": float(data["seconds"]), "peak_bytes": int(data["peak_bytes"]),
                "partition": data["partition"]}


def voi_bits(a: np.ndarray, b: np.ndarray) -> float:
    """Variation of information (bits) between two partitions of the same items (labels >= 0)."""

    def entropy(*labels: np.ndarray) -> float:
        p = np.unique(np.stack(labels), axis=1, return_counts=True)[1] / len(a)
        return -float(np.sum(p * np.log2(p)))

    return 2 * entropy(a, b) - entropy(a) - entropy(b)


def contracted(n: int, u: np.ndarray, v: np.ndarray, sums: np.ndarray, counts: np.ndarray,
               groups: np.ndarray) -> tuple[int, int]:
    """Regions and edges of the graph the top level of the hierarchical merge agglomerates."""
    from dinopipe.linkage import contract, grouped_mean_linkage

    parent = grouped_mean_linkage(n, u, v, sums, counts, THRESHOLD, groups)
    region, cu, _, _, _ = contract(parent, u, v, sums, counts)
    return int(region.max()) + 1, len(cu)


DEMO_BLOCK = (16, 24, 24)  # voxels: fragments of the demo volume's 4 x 4 x 4 blocks
DEMO_LEVELS = {"2": [2], "2,(2,4,4)": [2, (2, 4, 4)], "(1,2,2)": [(1, 2, 2)], "1": [1]}


def demo_graph(shape: tuple[int, int, int] = (64, 96, 96)) -> dict:
    """The region graph of the demo volume (``dinopipe.demo``, cells ~12 voxels across) with the
    noisy affinities of tests/test_segment.py's block-size test: agglomeration's distance
    fragments of ``DEMO_BLOCK`` blocks (context 16) and their edges. Returns the truth, the
    fragment volume, the block windows, fragment ids and sizes, and the edges."""
    from scipy import ndimage

    from dinopipe.demo import make_demo_volume
    from dinopipe.geometry import blocks
    from dinopipe.segment import block_edges, concat_edges, concat_fragments, fragment_block
    from dinopipe.targets import compute_affinities

    _, truth = make_demo_volume(0, label_shape=shape)
    offsets = [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [-3, 0, 0], [0, -9, 0], [0, 0, -9]]
    rng = np.random.default_rng(0)
    noise = ndimage.gaussian_filter(rng.normal(0, 1, (6, *truth.shape)), (0, 1, 2, 2))
    aff = np.clip(compute_affinities(truth, offsets) * 0.8 + 0.1 + 0.2 * noise / noise.std(), 0, 1).astype(np.float32)
    windows = blocks(truth.shape, DEMO_BLOCK)
    fragments = np.zeros(truth.shape, np.uint64)
    ids, sizes = concat_fragments([fragment_block(aff, offsets, fragments, w, i, DEMO_BLOCK, "agglomeration", 16,
                                                  threshold=0.5, fragments="distance") for i, w in enumerate(windows)])
    edges = concat_edges([block_edges(aff, offsets, fragments, w, True) for w in windows])
    return {"truth": truth, "fragments": fragments, "windows": windows, "ids": ids, "sizes": sizes, "edges": edges}


def demo_segmentation(demo: dict, factors: list | None) -> np.ndarray:
    """The demo volume merged at threshold 0.5, globally (``factors`` None) or in super-blocks."""
    from dinopipe.segment import fragment_superblocks, merge_table, relabel_block

    truth = demo["truth"]
    levels = None if factors is None else fragment_superblocks(demo["ids"], truth.shape, DEMO_BLOCK, factors,
                                                               seeded=True)
    keys, values = merge_table(demo["ids"], demo["sizes"], demo["edges"], 0, linkage="mean", threshold=THRESHOLD,
                               levels=levels)
    out = np.zeros(truth.shape, np.uint64)
    for w in demo["windows"]:
        relabel_block(demo["fragments"], out, w, keys, values)
    return out


def demo_vois(shape: tuple[int, int, int] = (64, 96, 96)) -> dict[str, dict[str, float]]:
    """Per ``DEMO_LEVELS`` entry: VOI (bits) of the hierarchical merge from the global one and from
    the truth; under "global" the global merge's VOI from the truth."""
    from dinopipe.evaluate import evaluate_segmentation

    demo = demo_graph(shape)
    one = demo_segmentation(demo, None)
    out = {"global": {"vs_truth": evaluate_segmentation(demo["truth"], one)["voi_sum"]}}
    for name, factors in DEMO_LEVELS.items():
        seg = demo_segmentation(demo, factors)
        out[name] = {"vs_global": evaluate_segmentation(one, seg)["voi_sum"],
                     "vs_truth": evaluate_segmentation(demo["truth"], seg)["voi_sum"]}
    return out


def main() -> None:
    print(f"global merge of synthetic region graphs; {platform.node()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; fastest of {REPEATS} runs each")
    result: dict = {"benchmark": "merge"}
    with tempfile.TemporaryDirectory(prefix="merge-benchmark-") as tmp:
        for name, shape in GRAPHS.items():
            n, u, v, sums, counts = grid_graph(shape)
            groups = superblocks(shape)
            graph = Path(tmp) / f"{name}.npz"
            np.savez(graph, n=n, u=u, v=v, sums=sums, counts=counts, groups=groups)
            m = len(u)
            runs: dict[str, list[dict]] = {k: [] for k in KINDS}
            for r in range(REPEATS):
                for kind in KINDS:
                    runs[kind].append(measure(kind, graph, Path(tmp) / f"{name}-{kind}-{r}.npz"))
            best = {k: min(rs, key=lambda x: x["seconds"]) for k, rs in runs.items()}
            same = all(np.array_equal(best["dict"]["partition"], x["partition"])
                       for x in runs["flat"] + runs["dict"] + runs["job"])
            regions, top_edges = contracted(n, u, v, sums, counts, groups)
            fig = {k: {"bytes_per_edge": min(x["peak_bytes"] for x in runs[k]) / m,
                       "us_per_edge": 1e6 * best[k]["seconds"] / m} for k in KINDS}
            voi = voi_bits(best["job"]["partition"], best["hierarchical"]["partition"])
            print(f"{name}: {n} fragments, {m} edges, {len(np.unique(best['flat']['partition']))} objects")
            for k in KINDS:
                print(f"  {k:>12}: {fig[k]['bytes_per_edge']:7.1f} bytes/edge, {fig[k]['us_per_edge']:6.2f} us/edge")
            print(f"  flat / dict: memory {fig['flat']['bytes_per_edge'] / fig['dict']['bytes_per_edge']:.3f}, "
                  f"time {fig['flat']['us_per_edge'] / fig['dict']['us_per_edge']:.3f}; same result: {same}")
            print(f"  hierarchical ({SUPER}^3-fragment super-blocks): top level {regions / n:.3f} of the regions, "
                  f"{top_edges / m:.3f} of the edges; VOI vs the global merge {voi:.4f} bits")
            for k in KINDS:
                result[f"bytes_per_edge_{k}_{name}"] = round(fig[k]["bytes_per_edge"], 1)
                result[f"us_per_edge_{k}_{name}"] = round(fig[k]["us_per_edge"], 3)
            result[f"memory_ratio_{name}"] = round(fig["flat"]["bytes_per_edge"] / fig["dict"]["bytes_per_edge"], 4)
            result[f"time_ratio_{name}"] = round(fig["flat"]["us_per_edge"] / fig["dict"]["us_per_edge"], 4)
            result[f"same_result_{name}"] = same
            result[f"top_edges_fraction_{name}"] = round(top_edges / m, 4)
            result[f"top_regions_fraction_{name}"] = round(regions / n, 4)
            result[f"hierarchical_voi_bits_{name}"] = round(voi, 4)
            result[f"edges_{name}"] = m
    vois = demo_vois(DEMO_SHAPE)
    print(f"demo volume {DEMO_SHAPE}, {DEMO_BLOCK} blocks: global merge {vois['global']['vs_truth']:.4f} bits from the "
          "truth; hierarchical (blocks per super-block):")
    for name in DEMO_LEVELS:
        print(f"  {name:>10}: {vois[name]['vs_global']:.4f} bits from the global merge, "
              f"{vois[name]['vs_truth']:.4f} from the truth")
        result[f"demo_voi_vs_global_{name}"] = round(vois[name]["vs_global"], 4)
        result[f"demo_voi_vs_truth_{name}"] = round(vois[name]["vs_truth"], 4)
    result["demo_voi_vs_truth_global"] = round(vois["global"]["vs_truth"], 4)
    big = list(GRAPHS)[-1]
    result["goals"] = {f"memory_ratio_{big}": "<= 0.5", f"time_ratio_{big}": "<= 1.0", f"same_result_{big}": "true",
                       f"bytes_per_edge_job_{big}": "<= 150", "demo_voi_vs_global_2": "<= 0.05"}
    print(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        r = run_kind(sys.argv[2], sys.argv[3])
        np.savez(sys.argv[4], **r)
    else:
        main()
