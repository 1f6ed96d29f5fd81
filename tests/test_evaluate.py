"""Tests for dinopipe.evaluate."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from skimage.metrics import adapted_rand_error, variation_of_information

from dinopipe.evaluate import METRIC_KEYS, evaluate_segmentation, write_summary_tsv

# funlib.evaluate's test vectors (funlib/tests/test_rand_voi.py).
FUNLIB_TRUTH = np.array([1, 1, 2, 2, 2, 3, 3, 3, 3, 4, 4], dtype=np.uint64)
FUNLIB_TEST = np.array([3, 3, 3, 3, 4, 5, 6, 6, 5, 5, 5], dtype=np.uint64)


def test_funlib_reference_vectors() -> None:
    m = evaluate_segmentation(FUNLIB_TRUTH, FUNLIB_TEST)
    assert m["rand_split"] == pytest.approx(0.6363636363636364, abs=1e-6)
    assert m["rand_merge"] == pytest.approx(0.5675675675675675, abs=1e-6)
    assert m["voi_split"] == pytest.approx(0.6140806820148608, abs=1e-6)
    assert m["voi_merge"] == pytest.approx(0.7272727272727271, abs=1e-6)
    assert m["voi_sum"] == pytest.approx(m["voi_split"] + m["voi_merge"])
    assert (m["n_voxels"], m["n_truth_ids"], m["n_test_ids"]) == (11, 4, 4)
    # Swapping roles swaps split and merge.
    r = evaluate_segmentation(FUNLIB_TEST, FUNLIB_TRUTH)
    assert r["rand_split"] == pytest.approx(m["rand_merge"])
    assert r["voi_merge"] == pytest.approx(m["voi_split"])


def test_funlib_pure_merge() -> None:
    truth = np.array([1, 1, 2, 2], dtype=np.uint64)
    test = np.array([2, 2, 2, 2], dtype=np.uint64)
    m = evaluate_segmentation(truth, test)
    assert (m["rand_split"], m["rand_merge"]) == (1.0, 0.5)
    assert (m["voi_split"], m["voi_merge"]) == (0.0, pytest.approx(1.0))
    # Adapted Rand by hand: 4 pairs together in both and in truth, 12 in test.
    assert m["adapted_rand_recall"] == 1.0
    assert m["adapted_rand_precision"] == pytest.approx(4 / 12)
    assert m["adapted_rand_error"] == pytest.approx(1 - 2 * 4 / (4 + 12))


def _compact(a: np.ndarray) -> np.ndarray:
    """Same partition with small ids (scikit-image builds a dense-indexed table)."""
    return np.unique(a, return_inverse=True)[1].reshape(a.shape)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_skimage_on_random_volumes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (9, 11, 13)
    truth = rng.integers(0, 12, size=shape).astype(np.uint64)
    # Test: a noisy copy with some merges and splits, and huge ids (> 2**40).
    test = truth * np.uint64(2**41) + rng.integers(0, 3, size=shape).astype(np.uint64)
    test[rng.random(shape) < 0.2] = np.uint64(2**63 + 7)
    test[truth == 3] = np.uint64(2**62)  # a test 0 is an ordinary segment too
    test[truth == 4] = 0
    m = evaluate_segmentation(truth, test)
    ref_split, ref_merge = variation_of_information(truth, _compact(test), ignore_labels=(0,))
    ref_are, ref_first, ref_second = adapted_rand_error(truth, _compact(test), ignore_labels=(0,))
    assert m["voi_split"] == pytest.approx(ref_split, abs=1e-9)
    assert m["voi_merge"] == pytest.approx(ref_merge, abs=1e-9)
    assert m["adapted_rand_error"] == pytest.approx(ref_are, abs=1e-12)
    # scikit-image returns (error, pairs-in-both / truth pairs, pairs-in-both / test pairs),
    # i.e. recall before precision (scikit-image issue #6485).
    assert m["adapted_rand_recall"] == pytest.approx(ref_first, abs=1e-12)
    assert m["adapted_rand_precision"] == pytest.approx(ref_second, abs=1e-12)
    assert m["n_voxels"] == int(np.count_nonzero(truth))


def test_large_uint64_truth_ids_not_truncated() -> None:
    # Ids that collide if cast to 32 bit (or to float64) must stay distinct.
    truth = np.array([2**40 + 1, 2**40 + 1, 1, 1, 2**63 + 1, 2**63 + 2], dtype=np.uint64)
    test = np.array([5, 5, 6, 6, 7, 8], dtype=np.uint64)
    m = evaluate_segmentation(truth, test)
    assert m["n_truth_ids"] == 4
    assert m["voi_sum"] == 0.0 and m["adapted_rand_error"] == 0.0


def test_perfect_segmentation() -> None:
    rng = np.random.default_rng(5)
    truth = rng.integers(0, 20, size=(6, 7, 8)).astype(np.uint64)
    test = (truth * np.uint64(977) + np.uint64(2**50)).astype(np.uint64)  # a relabelling
    m = evaluate_segmentation(truth, test)
    assert m["voi_split"] == 0.0 and m["voi_merge"] == 0.0
    assert math.copysign(1.0, m["voi_split"]) == 1.0  # not -0.0 in reports
    assert m["adapted_rand_error"] == 0.0
    assert m["rand_split"] == m["rand_merge"] == 1.0
    assert m["adapted_rand_precision"] == m["adapted_rand_recall"] == 1.0
    assert set(m) == set(METRIC_KEYS)


def test_ignore_labels() -> None:
    truth = np.array([0, 0, 0, 1, 1, 2, 2], dtype=np.int32)
    test = np.array([9, 8, 7, 1, 1, 2, 2], dtype=np.int64)
    m = evaluate_segmentation(truth, test)
    assert m["voi_sum"] == 0.0 and m["n_voxels"] == 4 and m["n_test_ids"] == 2
    counted = evaluate_segmentation(truth, test, ignore_labels=())
    assert counted["voi_split"] > 0 and counted["n_voxels"] == 7
    # Ignoring 2 as well; ignore values the dtype cannot hold are harmless.
    only_one = evaluate_segmentation(truth, test, ignore_labels=(0, 2, 2**70))
    assert only_one["n_voxels"] == 2 and only_one["n_truth_ids"] == 1


def test_degenerate_all_singletons() -> None:
    truth = np.arange(1, 6, dtype=np.uint64)
    m = evaluate_segmentation(truth, truth.copy())
    assert m["adapted_rand_error"] == 0.0 and m["voi_sum"] == 0.0
    merged = evaluate_segmentation(truth, np.ones(5, dtype=np.uint64))
    assert merged["adapted_rand_error"] == 1.0 and merged["adapted_rand_recall"] == 1.0


def test_bad_inputs() -> None:
    a = np.zeros((2, 3), dtype=np.uint64)
    with pytest.raises(ValueError, match=r"truth shape \(2, 3\) differs from test shape \(3, 2\)"):
        evaluate_segmentation(a, np.zeros((3, 2), dtype=np.uint64))
    with pytest.raises(ValueError, match="no voxels to evaluate"):
        evaluate_segmentation(a, a)
    with pytest.raises(ValueError, match="integer"):
        evaluate_segmentation(a.astype(float), a)
    with pytest.raises(ValueError, match="negative"):
        evaluate_segmentation(np.array([1, -2]), np.array([1, 1]))


def test_write_summary_tsv(tmp_path) -> None:
    m_b = evaluate_segmentation(FUNLIB_TRUTH, FUNLIB_TEST)
    m_a = evaluate_segmentation(FUNLIB_TRUTH, FUNLIB_TRUTH)
    rows = [{"volume": "vol_b", **m_b}, {"volume": "vol_a", **m_a, "note": "x"}]
    path = tmp_path / "summary.tsv"
    write_summary_tsv(rows, path)
    with open(path, newline="") as f:
        table = list(csv.reader(f, delimiter="\t"))
    assert table[0] == ["volume", *METRIC_KEYS, "note"]
    assert [r[0] for r in table[1:]] == ["vol_a", "vol_b"]
    back = dict(zip(table[0], table[2]))
    assert float(back["voi_split"]) == m_b["voi_split"]  # round-trips exactly
    assert back["n_voxels"] == "11" and back["note"] == ""
    with pytest.raises(ValueError, match="vol_a"):
        write_summary_tsv([rows[1], rows[1]], tmp_path / "dup.tsv")
    with pytest.raises(ValueError, match="no 'volume' key"):
        write_summary_tsv([m_a], tmp_path / "novol.tsv")


def test_confusion_counts_and_balanced_accuracy() -> None:
    from dinopipe.evaluate import balanced_accuracy, confusion_counts

    pred = np.array([[1, 1, 1, 1, 0, 0], [1, 0, 1, 0, 1, 0]], dtype=bool)
    truth = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 1, 1]], dtype=bool)
    counts = confusion_counts(pred, truth)
    assert counts.tolist() == [[4, 0, 1, 1], [2, 1, 2, 1]]
    # row 0: recall of positives 4/5, of negatives 1/1; row 1: 2/4 and 1/2
    np.testing.assert_allclose(balanced_accuracy(counts), [(0.8 + 1) / 2, (0.5 + 0.5) / 2])
    mask = np.array([1, 1, 1, 1, 0, 0], dtype=bool)
    assert confusion_counts(pred, truth, mask).tolist() == [[4, 0, 0, 0], [1, 1, 1, 1]]
    # a row with only positives: the recall of positives; an empty row: NaN
    out = balanced_accuracy(np.array([[3, 0, 1, 0], [0, 0, 0, 0]]))
    assert out[0] == 0.75 and np.isnan(out[1])


def test_affinity_scores_a_constant_prediction_is_chance() -> None:
    from dinopipe.evaluate import affinity_scores

    target = np.ones((2, 4, 4, 4), dtype=np.uint8)
    target[0, :, :, 1] = 0  # one plane of boundary edges in channel 0 (1 of 4 x positions)
    scores = affinity_scores(np.full(target.shape, 0.9, np.float32), target, [[0, 0, 1], [1, 0, 0]])
    # channel 0: all positives found, no boundary found -> 0.5; channel 1 has no boundary edge
    x = scores["per_offset"]["0,0,1"]
    assert (x["balanced_accuracy"], x["boundary_recall"], x["boundary_fraction"]) == (0.5, 0.0, 0.25)
    assert np.isnan(scores["per_offset"]["0,0,1"]["boundary_precision"])  # no edge predicted as boundary
    assert scores["per_offset"]["1,0,0"]["balanced_accuracy"] == 1.0
    assert scores["affinity_balanced_accuracy"] == 0.75
    right = affinity_scores(target.astype(np.float32), target, [[0, 0, 1], [1, 0, 0]])
    assert right["per_offset"]["0,0,1"]["boundary_precision"] == 1.0 and right["affinity_balanced_accuracy"] == 1.0
