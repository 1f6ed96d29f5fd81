"""Tests for dinopipe.segment."""

from __future__ import annotations

import itertools

import mwatershed
import numpy as np
import pytest

from dinopipe.segment import (
    filter_small_fragments,
    mutex_watershed,
    relabel_consecutive,
    segment,
    threshold_components,
)

SHORT = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
LONG = SHORT + [[3, 0, 0], [0, 3, 0], [0, 0, 3]]


def affinities_from_labels(labels: np.ndarray, offsets: list[list[int]]) -> np.ndarray:
    """aff[k, p] = 1 iff p + offsets[k] is inside and labels[p] == labels[p + o] != 0."""
    aff = np.zeros((len(offsets), *labels.shape), dtype=np.float32)
    for k, offset in enumerate(offsets):
        for p in itertools.product(*(range(n) for n in labels.shape)):
            q = tuple(pi + oi for pi, oi in zip(p, offset))
            if all(0 <= qi < n for qi, n in zip(q, labels.shape)):
                aff[(k, *p)] = float(labels[p] == labels[q] != 0)
    return aff


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True if a and b are equal up to a one-to-one relabelling."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def blocks_truth() -> np.ndarray:
    """8x9x10 volume tiled by 8 boxes plus an L-shaped (non-convex) cell, no background."""
    labels = np.zeros((8, 9, 10), dtype=np.uint64)
    labels[:4, :5, :6] = 1
    labels[:4, :5, 6:] = 2
    labels[:4, 5:, :3] = 3
    labels[:4, 5:, 3:] = 4
    labels[4:, :4, :] = 5
    labels[4:, 4:, :5] = 6
    labels[4:, 4:, 5:] = 7
    labels[6:, 7:, 2:8] = 8
    labels[4:6, 7:, 2:8] = 6  # L-shaped piece of 6 wrapping around 8
    return labels


# --- mwatershed conventions this module relies on -------------------------------------


def test_mwatershed_offset_convention_is_p_to_p_plus_offset() -> None:
    # One attractive edge stored at x=1 with offset +1 joins voxels 1 and 2.
    w = -np.ones((1, 1, 1, 5))
    w[0, 0, 0, 1] = 1.0
    out = mwatershed.agglom(w, [[0, 0, 1]])[0, 0]
    assert out[1] == out[2] != 0
    assert out[0] != out[1] and out[3] != out[1]
    # Offset +2: voxel 1 joins voxel 3, not voxel 2.
    w = -np.ones((1, 1, 1, 6))
    w[0, 0, 0, 1] = 1.0
    out = mwatershed.agglom(w, [[0, 0, 2]])[0, 0]
    assert out[1] == out[3] != 0 and out[2] != out[1]
    # Voxels merged with nothing come back as 0 (mutex_watershed gives them ids).
    assert out[0] == out[2] == 0


def test_mwatershed_long_range_mutex_splits() -> None:
    # Chain 0-1-2 attracts weakly (0.4); a strong repulsive long edge 0<->2 wins.
    w = np.zeros((2, 1, 1, 3))
    w[0] = 0.4
    w[1, 0, 0, 0] = -0.9
    out = mwatershed.agglom(w, [[0, 0, 1], [0, 0, 2]])[0, 0]
    assert out[0] != out[2]


# --- segmentation of ideal affinities ---------------------------------------------------


@pytest.mark.parametrize("method", ["mutex_watershed", "threshold_components"])
def test_ideal_affinities_give_back_truth(method: str) -> None:
    truth = blocks_truth()
    offsets = LONG if method == "mutex_watershed" else SHORT
    aff = affinities_from_labels(truth, offsets)
    labels = segment(aff, offsets, method=method)
    assert labels.dtype == np.uint64 and labels.shape == truth.shape
    assert same_partition(labels, truth)
    assert np.array_equal(np.unique(labels), np.arange(1, len(np.unique(truth)) + 1))


def test_mutex_watershed_on_demo_labels() -> None:
    from dinopipe.demo import make_demo_volume
    from dinopipe.evaluate import evaluate_segmentation

    _, truth = make_demo_volume(3, label_shape=(12, 16, 16), mean_cell_diameter_vox=6.0)
    aff = affinities_from_labels(truth, LONG)
    labels = mutex_watershed(aff, LONG)
    # Membrane voxels have no attractive edge: single-voxel fragments of their own.
    cells = truth > 0
    assert same_partition(labels[cells], truth[cells])
    m = evaluate_segmentation(truth, labels)
    assert m["voi_split"] == pytest.approx(0.0, abs=1e-12)
    assert m["voi_merge"] == pytest.approx(0.0, abs=1e-12)
    assert m["adapted_rand_error"] == pytest.approx(0.0, abs=1e-12)
    # min_size drops those single-voxel fragments to 0, and nothing else.
    filtered = mutex_watershed(aff, LONG, min_size=2)
    assert np.array_equal(filtered == 0, truth == 0)
    assert same_partition(filtered, truth)


def test_mutex_watershed_bias_and_noise() -> None:
    truth = blocks_truth()
    aff = affinities_from_labels(truth, LONG)
    rng = np.random.default_rng(0)
    noisy = np.clip(aff * 0.8 + 0.1 + rng.normal(0, 0.05, aff.shape), 0, 1)
    assert same_partition(mutex_watershed(noisy, LONG), truth)
    # A strongly attractive bias merges everything.
    merged = mutex_watershed(noisy, LONG, bias_short=0.5, bias_long=0.5)
    assert np.all(merged == 1)
    # Strongly repulsive: every voxel its own segment.
    split = mutex_watershed(noisy, LONG, bias_short=-1.5, bias_long=-1.5)
    assert split.max() == split.size and np.all(split > 0)


def test_mutex_watershed_strides() -> None:
    truth = blocks_truth()
    aff = affinities_from_labels(truth, LONG)
    strides = [[1, 1, 1]] * 3 + [[2, 2, 2]] * 3
    assert same_partition(mutex_watershed(aff, LONG, strides=strides), truth)
    with pytest.raises(ValueError, match="strides"):
        mutex_watershed(aff, LONG, strides=[[1, 1, 1]])


def test_threshold_components_threshold_and_long_range_ignored() -> None:
    truth = blocks_truth()
    aff = affinities_from_labels(truth, LONG) * 0.6
    assert same_partition(threshold_components(aff, LONG, threshold=0.5), truth)
    # Above every affinity: each voxel alone.
    alone = threshold_components(aff, LONG, threshold=0.7)
    assert alone.max() == truth.size
    # Negative offsets work the same way (edge p <-> p - 1 stored at p).
    neg = [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]
    assert same_partition(threshold_components(affinities_from_labels(truth, neg), neg), truth)
    with pytest.raises(ValueError, match="short-range"):
        threshold_components(aff[3:], LONG[3:])


def test_threshold_components_min_size() -> None:
    truth = blocks_truth()
    aff = affinities_from_labels(truth, SHORT)
    sizes = dict(zip(*np.unique(truth, return_counts=True)))
    min_size = int(sorted(sizes.values())[2])
    labels = threshold_components(aff, SHORT, min_size=min_size)
    small = [i for i, s in sizes.items() if s < min_size]
    assert small
    assert np.array_equal(labels == 0, np.isin(truth, small))
    assert labels.max() == len(sizes) - len(small)
    assert set(np.unique(labels[labels > 0])) == set(range(1, int(labels.max()) + 1))


# --- helpers -----------------------------------------------------------------------------


def test_filter_small_fragments() -> None:
    labels = np.array([[0, 5, 5, 5], [7, 7, 9, 0], [0, 0, 0, 0]], dtype=np.int32)
    out = filter_small_fragments(labels, 3)
    assert out.dtype == np.int32
    assert np.array_equal(out, np.array([[0, 5, 5, 5], [0, 0, 0, 0], [0, 0, 0, 0]]))
    assert np.array_equal(filter_small_fragments(labels, 0), labels)
    assert np.array_equal(labels[1], [7, 7, 9, 0])  # input untouched
    with pytest.raises(ValueError, match="min_size"):
        filter_small_fragments(labels, -1)
    with pytest.raises(ValueError, match="integer"):
        filter_small_fragments(labels.astype(float), 2)


def test_relabel_consecutive() -> None:
    big = np.uint64(2**63 + 5)
    labels = np.array([[0, big, 3], [3, 0, 2**40]], dtype=np.uint64)
    out = relabel_consecutive(labels)
    assert out.dtype == np.uint64
    assert np.array_equal(out, np.array([[0, 3, 1], [1, 0, 2]]))
    no_background = relabel_consecutive(np.array([4, 9, 4], dtype=np.int16))
    assert no_background.dtype == np.uint64 and no_background.tolist() == [1, 2, 1]
    with pytest.raises(ValueError, match="non-negative"):
        relabel_consecutive(np.array([-1, 2]))


def test_bad_inputs() -> None:
    aff = np.full((3, 2, 3, 4), 0.7)
    with pytest.raises(ValueError, match="allowed: \\['agglomeration', 'mutex_watershed', 'threshold_components'\\]"):
        segment(aff, SHORT, method="watershed")
    with pytest.raises(ValueError, match="threshold"):
        segment(aff, SHORT, method="mutex_watershed", threshold=0.5)
    with pytest.raises(ValueError, match="3 affinity channels"):
        mutex_watershed(aff, LONG)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mutex_watershed(aff * 2, SHORT)
    with pytest.raises(ValueError, match="4D"):
        threshold_components(aff[0], SHORT)
    with pytest.raises(ValueError, match="offsets"):
        mutex_watershed(aff, [[1, 0], [0, 1], [1, 1]])
    with pytest.raises(ValueError, match="min_size"):
        segment(aff, SHORT, method="threshold_components", min_size=-3)


# --- agglomeration, ground truth round trips, blockwise ---------------------------------


def test_agglomeration_thresholds() -> None:
    from dinopipe.segment import agglomerate

    truth = blocks_truth()
    aff = affinities_from_labels(truth, LONG) * 0.6 + 0.2  # inside 0.8, across boundaries 0.2
    assert same_partition(agglomerate(aff, LONG, threshold=0.5), truth)
    assert np.all(agglomerate(aff, LONG, threshold=0.1) == 1)  # every boundary is above 0.1: one object
    neg = [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]
    assert same_partition(agglomerate(affinities_from_labels(truth, neg), neg), truth)
    with pytest.raises(ValueError, match="axis x"):
        agglomerate(aff[:2], LONG[:2])
    with pytest.raises(ValueError, match="threshold"):
        segment(aff, LONG, method="agglomeration", threshold=1.5)


def test_distance_fragments_find_thin_boundaries() -> None:
    from dinopipe.segment import agglomerate, distance_fragments

    # two cells touching at x = 9 | 10 without membrane voxels: only the x edges across have a
    # low affinity (0.2), every other edge 0.9; waterz convention: channel d at p is p <-> p - e_d
    truth = np.ones((8, 12, 20), dtype=np.uint64)
    truth[:, :, 10:] = 2
    waterz_affs = np.full((3, *truth.shape), 0.9, dtype=np.float32)
    waterz_affs[2, :, :, 10] = 0.2
    fragments = distance_fragments(waterz_affs)
    assert fragments.dtype == np.uint64 and fragments.min() >= 1
    # the voxels on both sides of the boundary are boundary (their lowest edge is 0.2): no
    # fragment holds voxels of both cells
    pairs = np.unique(np.stack([fragments.ravel(), truth.ravel()]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1]
    # the mean of the three channels (0.67 at x = 10) would not see this boundary at all
    assert waterz_affs.mean(axis=0).min() > 0.5
    ours = np.full((3, *truth.shape), 0.9, dtype=np.float32)  # ours: p <-> p + e_d at p
    ours[2, :, :, 9] = 0.2
    assert same_partition(agglomerate(ours, SHORT, threshold=0.5, fragments="distance"), truth)
    with pytest.raises(ValueError, match="fragments"):
        agglomerate(ours, SHORT, fragments="voronoi")
    with pytest.raises(ValueError, match="seed_threshold"):
        distance_fragments(waterz_affs, seed_threshold=1.0)
    # no voxel above the threshold: one fragment
    assert np.all(distance_fragments(np.zeros((3, 4, 4, 4), dtype=np.float32)) == 1)


def test_agglomeration_without_waterz_says_how_to_install(monkeypatch) -> None:
    import sys

    from dinopipe.segment import agglomerate

    monkeypatch.setitem(sys.modules, "waterz", None)
    with pytest.raises(ImportError, match="pip install waterz"):
        agglomerate(affinities_from_labels(blocks_truth(), SHORT), SHORT)


METHOD_PARAMS = {
    "mutex_watershed": {},
    "threshold_components": {"threshold": 0.5},
    "agglomeration": {"threshold": 0.5},
}


@pytest.fixture(scope="module")
def cremi_crop(request):
    """Real CREMI neuron labels (40x4x4 nm), a crop, and their affinities."""
    from pathlib import Path

    from dinopipe.targets import compute_affinities

    data = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cremi_labels" / "cremi.npz"
    if not data.is_file():
        pytest.skip(f"real test data not present at {data}")
    from skimage.measure import label

    # Ids cut into disconnected pieces by the crop count as separate objects.
    labels = label(np.load(data)["labels"][:12, :96, :96].astype(np.int64) + 1, background=0, connectivity=1)
    labels = relabel_consecutive(labels)
    return labels, compute_affinities(labels, LONG).astype(np.float32)


@pytest.mark.parametrize("method", sorted(METHOD_PARAMS))
def test_ground_truth_affinities_segment_back_to_ground_truth(cremi_crop, method) -> None:
    from dinopipe.evaluate import evaluate_segmentation

    truth, aff = cremi_crop
    labels = segment(aff, LONG, method=method, **METHOD_PARAMS[method])
    m = evaluate_segmentation(truth, labels)
    assert m["voi_split"] == pytest.approx(0, abs=1e-9) and m["voi_merge"] == pytest.approx(0, abs=1e-9)
    assert m["adapted_rand_error"] == pytest.approx(0, abs=1e-9)


@pytest.mark.parametrize("method", sorted(METHOD_PARAMS))
def test_blockwise_ground_truth_round_trip(cremi_crop, method) -> None:
    from dinopipe.evaluate import evaluate_segmentation
    from dinopipe.segment import segment_blockwise

    truth, aff = cremi_crop
    out = np.zeros(truth.shape, dtype=np.uint64)
    n = segment_blockwise(aff, LONG, out, (5, 40, 32), method=method, **METHOD_PARAMS[method])
    m = evaluate_segmentation(truth, out)
    assert m["voi_sum"] == pytest.approx(0, abs=1e-9) and m["adapted_rand_error"] == pytest.approx(0, abs=1e-9)
    assert n == len(np.unique(truth)) and set(np.unique(out)) == set(range(1, n + 1))


def test_blockwise_min_size_counts_merged_objects() -> None:
    from dinopipe.segment import segment_blockwise

    truth = blocks_truth()
    aff = affinities_from_labels(truth, LONG)
    sizes = dict(zip(*np.unique(truth, return_counts=True)))
    min_size = int(sorted(sizes.values())[2])
    out = np.zeros(truth.shape, dtype=np.uint64)
    # 3x3x3 blocks cut every object into many block-sized pieces: sizes are those of the merged objects.
    n = segment_blockwise(aff, LONG, out, (3, 3, 3), method="mutex_watershed", min_size=min_size)
    small = [i for i, s in sizes.items() if s < min_size]
    assert n == len(sizes) - len(small)
    assert np.array_equal(out == 0, np.isin(truth, small))
    assert same_partition(out[out > 0], truth[out > 0])
    with pytest.raises(ValueError, match="differs"):
        segment_blockwise(aff, LONG, np.zeros((2, 2, 2), np.uint64), (3, 3, 3))


def test_merge_table_by_hand() -> None:
    """Fragments 1..3 of block 0 and 11, 12 of block 1 (ids from fragment_id_base with 10-voxel
    blocks). Edges (mean affinity): 2-11 0.8, 11-12 0.6, 1-2 0.3, 3-12 0.55 (2 voxel pairs at
    0.5 and 0.6). Single linkage at 0.5 joins {2, 11, 12, 3} and leaves {1}."""
    from dinopipe.segment import fragment_id_base, merge_table

    assert fragment_id_base(0, (1, 2, 5)) == 0 and fragment_id_base(1, (1, 2, 5)) == 10
    ids = np.array([12, 1, 11, 3, 2], dtype=np.uint64)  # any order
    sizes = np.array([3, 4, 1, 1, 2])
    edges = (np.array([[2, 11, 1, 3], [11, 12, 2, 12]], dtype=np.uint64), np.array([0.8, 1.2, 0.3, 1.1]),
             np.array([1, 2, 1, 2]))
    keys, values = merge_table(ids, sizes, edges, min_size=0)
    assert keys.tolist() == [1, 2, 3, 11, 12] and values.tolist() == [1, 2, 2, 2, 2]
    _, values = merge_table(ids, sizes, edges, min_size=5)  # {1} (4 voxels) goes; {2, 3, 11, 12} has 7
    assert values.tolist() == [0, 1, 1, 1, 1]
    _, values = merge_table(ids, sizes, edges, min_size=0, threshold=0.7)  # only 2-11 joins
    assert values.tolist() == [1, 2, 3, 2, 4]
    with pytest.raises(ValueError, match="not in the fragment list"):
        merge_table(ids, sizes, (np.array([[1], [99]], dtype=np.uint64), np.ones(1), np.ones(1)), min_size=0)
    with pytest.raises(ValueError, match="not unique"):
        merge_table(np.array([1, 1], dtype=np.uint64), np.array([1, 1]), (np.zeros((2, 0)), [], []), min_size=0)


def test_mean_linkage_joins_by_the_mean_of_the_whole_boundary() -> None:
    """A chain a - b - c. Edges: a-b mean 0.9 (1 pair), b-c mean 0.7 (1 pair), a-c mean 0.2 (3 pairs).
    At threshold 0.5: a and b join first (0.9); the boundary of {a, b} with c is then
    (0.7 + 3 x 0.2) / 4 = 0.325 < 0.5, so c stays apart - single linkage would take it (0.7)."""
    from dinopipe.segment import merge_table

    ids = np.array([1, 2, 3], dtype=np.uint64)
    edges = (np.array([[1, 2, 1], [2, 3, 3]], dtype=np.uint64), np.array([0.9, 0.7, 0.6]), np.array([1, 1, 3]))
    _, mean = merge_table(ids, np.ones(3), edges, 0, linkage="mean", threshold=0.5)
    _, single = merge_table(ids, np.ones(3), edges, 0, linkage="single", threshold=0.5)
    assert mean.tolist() == [1, 1, 2] and single.tolist() == [1, 1, 1]
    # at 0.3 the joined boundary (0.325) still merges
    assert merge_table(ids, np.ones(3), edges, 0, linkage="mean", threshold=0.3)[1].tolist() == [1, 1, 1]


@pytest.mark.parametrize(("method", "fragments"),
                         [("mutex_watershed", None), ("agglomeration", "waterz"), ("agglomeration", "distance")])
def test_blockwise_steps_in_any_order_give_the_one_job_result(method, fragments) -> None:
    """The steps of segment_blockwise run by separate "jobs" - blocks fragmented in reverse order,
    the edges of each block found alone, the table built from the parts - give its output exactly."""
    from dinopipe.geometry import blocks
    from dinopipe.segment import (
        block_graph,
        concat_edges,
        concat_fragments,
        fragment_block,
        merge_fragments,
        relabel_block,
        segment_blockwise,
    )

    truth = blocks_truth()
    aff = affinities_from_labels(truth, LONG)
    rng = np.random.default_rng(3)
    aff = np.clip(aff + rng.normal(0, 0.2, aff.shape), 0, 1).astype(np.float32)
    block = (3, 4, 5)
    params = {**METHOD_PARAMS[method], **({"fragments": fragments} if fragments else {})}
    one_job = np.zeros(truth.shape, dtype=np.uint64)
    n = segment_blockwise(aff, LONG, one_job, block, method=method, min_size=3, **params)
    windows = blocks(truth.shape, block)
    fragments = np.zeros(truth.shape, dtype=np.uint64)
    parts = [fragment_block(aff, LONG, fragments, windows[i], i, block, method, **params)
             for i in reversed(range(len(windows)))]
    graphs = [block_graph(aff, LONG, fragments, w, method, params) for w in windows[::-1]]
    keys, values = merge_fragments(method, concat_fragments(parts), concat_edges([g[0] for g in graphs]),
                                   concat_edges([g[1] for g in graphs]), 3, 0.5, params)
    out = np.zeros(truth.shape, dtype=np.uint64)
    for w in windows:
        relabel_block(fragments, out, w, keys, values)
    assert n > 1 and np.array_equal(out, one_job)


def noisy_demo(seed: int, label_shape: tuple[int, int, int]) -> tuple[np.ndarray, list[list[int]], np.ndarray]:
    """A demo volume's labels (cells ~12 voxels across), the offsets of the workflow's demo, and
    noisy affinities (smooth Gaussian noise, as predictions have)."""
    from scipy import ndimage

    from dinopipe.demo import make_demo_volume
    from dinopipe.targets import compute_affinities

    _, truth = make_demo_volume(seed, label_shape=label_shape)
    offsets = [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [-3, 0, 0], [0, -9, 0], [0, 0, -9]]
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(0, 1, (6, *truth.shape)), (0, 1, 2, 2))
    aff = np.clip(compute_affinities(truth, offsets) * 0.8 + 0.1 + 0.2 * noise / noise.std(), 0, 1).astype(np.float32)
    return truth, offsets, aff


def test_seeded_fragments_keep_their_id_across_block_faces() -> None:
    """Blocks of 8 x 12 x 5 voxels cut two cells (touching at x = 9 | 10) into 4 pieces each: with
    enough context every block names each piece by its cell's seed, so the blocks' fragments are
    the whole volume's, ids included (one plus the C-order index of the seed's first voxel)."""
    from dinopipe.geometry import blocks, grow_window
    from dinopipe.segment import concat_fragments, distance_fragments, fragment_block, seeded_fragments

    shape = (8, 12, 20)
    aff = np.full((3, *shape), 0.9, dtype=np.float32)  # offsets -e_d: waterz's convention
    aff[2, :, :, 10] = 0.2
    neg = [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]
    whole = distance_fragments(aff)
    params = {"fragments": "distance", "threshold": 0.5}
    out = np.zeros(shape, np.uint64)
    found = [fragment_block(aff, neg, out, w, i, (8, 12, 5), "agglomeration", 16, **params)
             for i, w in enumerate(blocks(shape, (8, 12, 5)))]
    assert same_partition(out, whole)
    ids, sizes = concat_fragments(found)
    assert ids.tolist() == np.unique(out).tolist() and sizes.tolist() == np.bincount(
        np.unique(out, return_inverse=True)[1].ravel()).tolist() and sizes.sum() == out.size
    assert sum(len(f[0]) for f in found) > len(ids)  # pieces of one fragment in several blocks, one id
    for f in np.unique(whole):  # each id names a voxel of its fragment
        z, y, x = np.unravel_index(int(out[whole == f][0]) - 1, shape)
        assert whole[z, y, x] == f
    # no seed in a block's context: the block is one fragment named by its first voxel
    window = (slice(0, 8), slice(0, 12), slice(5, 10))
    flat = seeded_fragments(np.zeros((3, *shape), np.float32), neg, window, grow_window(window, 2, shape), shape)
    assert np.all(flat == 5 + 1)


def test_blockwise_seeded_in_one_block_is_the_one_piece_graph_merge() -> None:
    """One block: the seed-named fragments give bitwise the segmentation of the mean-linkage merge
    of the whole volume's distance fragments (the names keep the fragments' order)."""
    from dinopipe.segment import block_edges, distance_fragments, merge_table, relabel_block, segment_blockwise

    truth, offsets, aff = noisy_demo(2, (16, 32, 32))
    window = tuple(slice(0, n) for n in truth.shape)
    fragments = distance_fragments(aff[:3])  # offsets -e_d: waterz's convention
    ids, sizes = np.unique(fragments, return_counts=True)
    keys, values = merge_table(ids, sizes, block_edges(aff, offsets, fragments, window, True), 8, linkage="mean",
                               threshold=0.5)
    expected = np.zeros(truth.shape, np.uint64)
    relabel_block(fragments, expected, window, keys, values)
    out = np.zeros(truth.shape, np.uint64)
    n = segment_blockwise(aff, offsets, out, truth.shape, method="agglomeration", min_size=8, context=16,
                          threshold=0.5, fragments="distance")
    assert n > 10 and np.array_equal(out, expected)


def test_edge_flood_keeps_membraneless_contacts_and_thin_objects() -> None:
    """Two boxes touching without membrane (only the edges across x = 9 | 10 are weak) and a slab
    one voxel thick between two cells (z = 4): the voxel flood of the distance fragments gives
    contact voxels to the box across and the slab (no seed: every voxel is boundary) to a
    neighbour; the edge flood with seeded strong components keeps all exact."""
    from dinopipe.segment import seeded_fragments

    truth = np.ones((9, 12, 20), dtype=np.uint64)
    truth[:, :, 10:] = 2
    truth[4] = 3
    truth[5:] += 3
    aff = affinities_from_labels(truth, LONG) * 0.8 + 0.1
    whole = tuple(slice(0, n) for n in truth.shape)
    edge = seeded_fragments(aff, LONG, whole, whole, truth.shape, 0.5, flood="edge")
    voxel = seeded_fragments(aff, LONG, whole, whole, truth.shape, 0.5, flood="voxel")
    assert same_partition(edge, truth)
    assert not same_partition(voxel, truth)
    with pytest.raises(ValueError, match="flood"):
        seeded_fragments(aff, LONG, whole, whole, truth.shape, flood="basin")


def reference_mutex_watershed(n: int, edges: list[tuple[bool, int, int]]) -> list[int]:
    """The graph mutex watershed written out (union-find with mutex sets): edges in the given
    order; an attractive one joins two clusters unless they are mutex, a repulsive one makes them so."""
    parent = list(range(n))
    mutex: list[set[int]] = [set() for _ in range(n)]

    def find(a: int) -> int:
        while parent[a] != a:
            a = parent[a]
        return a

    for attractive, u, v in edges:
        ru, rv = find(u), find(v)
        if ru == rv:
            continue
        if not attractive:
            mutex[ru].add(rv)
            mutex[rv].add(ru)
        elif rv not in mutex[ru]:
            parent[rv] = ru
            for r in mutex[rv]:
                mutex[r].discard(rv)
                mutex[r].add(ru)
            mutex[ru] |= mutex[rv]
    return [find(a) for a in range(n)]


def test_mutex_table_by_hand_and_against_the_reference() -> None:
    """Fragments 1..4 (sizes 1, 1, 5, 5). Short-range means 1-2 0.95, 2-3 0.8, 3-4 0.7, long-range
    1-3 0.1; biases -0.5: weights +0.45, +0.3, +0.2, -0.4. 1-2 join, 1-3 become mutex, 2-3 is
    refused, 3-4 join: {1, 2}, {3, 4}. Then random graphs against the sweep written out."""
    from dinopipe.segment import mutex_table

    ids = np.array([3, 1, 4, 2], dtype=np.uint64)
    sizes = np.array([5, 1, 5, 1])
    short = (np.array([[1, 2, 3], [2, 3, 4]], dtype=np.uint64), np.array([0.95, 1.6, 2.1]), np.array([1, 2, 3]))
    long = (np.array([[1], [3]], dtype=np.uint64), np.array([0.3]), np.array([3]))
    none = (np.zeros((2, 0), np.uint64), np.zeros(0), np.zeros(0, np.int64))
    keys, values = mutex_table(ids, sizes, short, long, 0)
    assert keys.tolist() == [1, 2, 3, 4] and values.tolist() == [1, 1, 2, 2]
    assert mutex_table(ids, sizes, short, none, 0)[1].tolist() == [1, 1, 1, 1]
    assert mutex_table(ids, sizes, short, long, 0, bias_long=-0.05)[1].tolist() == [1, 1, 1, 1]  # 1-3 attracts
    assert mutex_table(ids, sizes, short, long, 3)[1].tolist() == [0, 0, 1, 1]  # {1, 2} has 2 voxels
    with pytest.raises(ValueError, match="not in the fragment list"):
        mutex_table(ids, sizes, short, (np.array([[1], [9]], dtype=np.uint64), np.ones(1), np.ones(1)), 0)
    with pytest.raises(ValueError, match="bias_long"):
        mutex_table(ids, sizes, short, long, 0, bias_long=float("nan"))
    rng = np.random.default_rng(5)
    for _ in range(50):
        n = int(rng.integers(2, 25))
        pairs = np.unique(np.sort(rng.integers(0, n, (2, 40)), axis=0), axis=1)
        pairs = pairs[:, pairs[0] != pairs[1]]
        half = pairs.shape[1] // 2
        mean = rng.random(pairs.shape[1])
        edges = [(pairs[:, :half] + 1).astype(np.uint64), mean[:half], np.ones(half, np.int64)]
        long_edges = [(pairs[:, half:] + 1).astype(np.uint64), mean[half:], np.ones(pairs.shape[1] - half, np.int64)]
        _, values = mutex_table(np.arange(1, n + 1, dtype=np.uint64), np.ones(n), tuple(edges), tuple(long_edges), 0,
                                bias_short=-0.4, bias_long=-0.6)
        weight = mean + np.where(np.arange(pairs.shape[1]) < half, -0.4, -0.6)
        order = sorted(range(len(weight)), key=lambda e: -abs(weight[e]))
        expected = reference_mutex_watershed(n, [(weight[e] > 0, int(pairs[0, e]), int(pairs[1, e])) for e in order])
        assert same_partition(values, np.array(expected))


def test_block_long_edges_of_all_blocks_are_those_of_one_block() -> None:
    """Each long-range voxel pair is counted by the one block holding its first voxel, boundary
    voxels (lowest short-range affinity below the threshold) left out alike in every block."""
    from dinopipe.geometry import blocks
    from dinopipe.segment import block_long_edges, concat_edges

    rng = np.random.default_rng(2)
    shape = (8, 9, 10)
    aff = rng.random((len(LONG), *shape)).astype(np.float32)
    fragments = rng.integers(1, 12, shape).astype(np.uint64)
    whole = tuple(slice(0, n) for n in shape)
    for threshold in (0.0, 0.2):
        one = block_long_edges(aff, LONG, fragments, whole, threshold)
        many = concat_edges([block_long_edges(aff, LONG, fragments, w, threshold) for w in blocks(shape, (3, 4, 5))])
        assert np.array_equal(one[0], many[0]) and np.array_equal(one[2], many[2])
        np.testing.assert_allclose(one[1], many[1])
    assert one[2].sum() < block_long_edges(aff, LONG, fragments, whole, 0.0)[2].sum()  # boundary voxels left out


def test_mutex_table_on_single_voxel_fragments_is_the_mutex_watershed() -> None:
    """With every voxel its own fragment (and no voxel left out as boundary), the graph mutex
    watershed sees every voxel edge once: it is mutex_watershed's segmentation."""
    from dinopipe.segment import block_edges, block_long_edges, mutex_table, relabel_block

    rng = np.random.default_rng(1)
    truth = blocks_truth()
    aff = np.clip(affinities_from_labels(truth, LONG) + rng.normal(0, 0.3, (len(LONG), *truth.shape)), 0, 1)
    aff = aff.astype(np.float32)
    fragments = np.arange(1, truth.size + 1, dtype=np.uint64).reshape(truth.shape)
    window = tuple(slice(0, n) for n in truth.shape)
    keys, values = mutex_table(fragments.ravel(), np.ones(truth.size), block_edges(aff, LONG, fragments, window, True),
                               block_long_edges(aff, LONG, fragments, window, 0.0), 0)
    out = np.zeros(truth.shape, np.uint64)
    relabel_block(fragments, out, window, keys, values)
    expected = mutex_watershed(aff, LONG)
    assert same_partition(out, expected) and 1 < out.max() < truth.size


@pytest.mark.slow
@pytest.mark.parametrize(("seed", "label_shape"), [(0, (64, 96, 96)), (1, (96, 128, 128))])
def test_blockwise_agglomeration_does_not_depend_on_the_block_size(seed, label_shape) -> None:
    """The stated bound (config/README.md, segment.block_context; docs/cluster.md section 8): with
    distance fragments and the default context (16 voxels), blockwise agglomeration in 2, 8 (2 per
    axis), 16 (4 x 2 x 2) and 64 (4 per axis) blocks is within 0.05 bits VOI of the one-piece
    segmentation (measured 0.0014 on the demo volume, 0.0034 on the larger one; that is the
    difference between waterz's and our mean linkage, the same in one block) and within 0.001
    bits of the one-block blockwise result (measured: identical on the demo volume, 6e-5 bits
    on the larger one, where floods tie differently in a few windows)."""
    from dinopipe.evaluate import evaluate_segmentation
    from dinopipe.segment import segment_blockwise

    truth, offsets, aff = noisy_demo(seed, label_shape)
    params = {"threshold": 0.5, "fragments": "distance"}
    one = segment(aff, offsets, method="agglomeration", **params)
    one_voi = evaluate_segmentation(truth, one)["voi_sum"]
    assert one_voi < 0.5  # a segmentation worth comparing against
    whole = np.zeros(truth.shape, np.uint64)
    segment_blockwise(aff, offsets, whole, truth.shape, method="agglomeration", context=16, **params)
    z, y, x = label_shape
    for block in [(z // 2, y, x), (z // 2, y // 2, x // 2), (z // 4, y // 2, x // 2), (z // 4, y // 4, x // 4)]:
        out = np.zeros(truth.shape, np.uint64)
        segment_blockwise(aff, offsets, out, block, method="agglomeration", context=16, **params)
        assert evaluate_segmentation(one, out)["voi_sum"] <= 0.05, block
        assert evaluate_segmentation(whole, out)["voi_sum"] <= 0.001, block
        assert evaluate_segmentation(truth, out)["voi_sum"] <= one_voi + 0.05, block


@pytest.mark.slow
@pytest.mark.parametrize(("seed", "label_shape", "grids"), [
    (0, (64, 96, 96), [(2, 2, 2), (4, 2, 2)]),
    (1, (96, 128, 128), [(2, 2, 2)]),
])
def test_blockwise_mutex_watershed_does_not_depend_on_the_block_size(seed, label_shape, grids) -> None:
    """The stated bound for mutex watershed (config/README.md, segment.block_context): on the graph
    of seeded fragments, blockwise mutex watershed in 8 (2 per axis) and 16 (4 x 2 x 2) blocks is
    within 0.01 bits VOI of the one-block result (measured 0.0009-0.0034 on the demo volume, also
    with 64 blocks of 16 x 24 x 24; 0.0003-0.0005 on the larger one with 8-64 blocks: pieces of
    strong-edge components whose seed lies beyond a window) and within 0.05 bits of the voxel
    mutex watershed's VOI against the truth (measured 0.073 against 0.054 on the demo, 0.080
    against 0.063 on the larger volume). Small blocks read 16 voxels of context each, so this
    test takes about a minute."""
    from dinopipe.evaluate import evaluate_segmentation
    from dinopipe.segment import segment_blockwise

    truth, offsets, aff = noisy_demo(seed, label_shape)
    voxel_voi = evaluate_segmentation(truth, mutex_watershed(aff, offsets))["voi_sum"]
    assert voxel_voi < 0.2
    whole = np.zeros(truth.shape, np.uint64)
    segment_blockwise(aff, offsets, whole, truth.shape, method="mutex_watershed", context=16)
    assert evaluate_segmentation(truth, whole)["voi_sum"] <= voxel_voi + 0.05
    for grid in grids:
        block = tuple(n // g for n, g in zip(label_shape, grid))
        out = np.zeros(truth.shape, np.uint64)
        segment_blockwise(aff, offsets, out, block, method="mutex_watershed", context=16)
        assert evaluate_segmentation(whole, out)["voi_sum"] <= 0.01, block
        assert evaluate_segmentation(truth, out)["voi_sum"] <= voxel_voi + 0.05, block


@pytest.mark.slow
def test_blockwise_mutex_watershed_on_real_labels_does_not_depend_on_the_block_size(shared_data) -> None:
    """Real neuron morphology (gala FIB-SEM labels, 50 x 100 x 200, membranes labelled 0) with the
    noisy affinities of noisy_demo: blockwise mutex watershed in 8 blocks (2 per axis) is within
    0.01 bits VOI of one block (measured 0.0041; 0.0009 with 16 blocks, 0.0002 with 80) and within
    0.05 bits of the voxel mutex watershed against the truth (measured 0.027 against 0.026; the
    face merge of per-block mutex watershed it replaces gave 0.47 bits in these blocks)."""
    import h5py
    from scipy import ndimage

    from dinopipe.evaluate import evaluate_segmentation
    from dinopipe.segment import segment_blockwise
    from dinopipe.targets import compute_affinities

    with h5py.File(shared_data / "gala" / "train-gt.lzf.h5", "r") as f:
        truth = f["stack"][:].astype(np.uint64)
    offsets = [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [-3, 0, 0], [0, -9, 0], [0, 0, -9]]
    rng = np.random.default_rng(0)
    noise = ndimage.gaussian_filter(rng.normal(0, 1, (6, *truth.shape)), (0, 1, 2, 2))
    aff = np.clip(compute_affinities(truth, offsets) * 0.8 + 0.1 + 0.2 * noise / noise.std(), 0, 1).astype(np.float32)
    voxel_voi = evaluate_segmentation(truth, mutex_watershed(aff, offsets))["voi_sum"]
    whole = np.zeros(truth.shape, np.uint64)
    segment_blockwise(aff, offsets, whole, truth.shape, method="mutex_watershed", context=16)
    out = np.zeros(truth.shape, np.uint64)
    segment_blockwise(aff, offsets, out, (25, 50, 100), method="mutex_watershed", context=16)
    assert evaluate_segmentation(whole, out)["voi_sum"] <= 0.01
    assert evaluate_segmentation(truth, out)["voi_sum"] <= voxel_voi + 0.05
