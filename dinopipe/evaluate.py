"""Comparing a segmentation with ground truth: variation of information and Rand scores.

Both volumes are integer label arrays of the same shape, any axis order (usually
(z, y, x)). Voxels whose *truth* label is in ``ignore_labels`` are excluded; every
other voxel counts, and a test label of 0 is an ordinary segment (unsegmented voxels
count as one object). Ids may be any non-negative integers up to 2**64 - 1; they are
never cast to a narrower type.

Conventions (those of funlib.evaluate ``rand_voi`` and scikit-image), with
``n_ij`` the number of evaluated voxels with truth id i and test id j, ``a_i`` and
``b_j`` the truth and test segment sizes and ``n`` the number of evaluated voxels:

- ``voi_split`` = H(test | truth), ``voi_merge`` = H(truth | test), in bits; their sum
  is the variation of information.
- ``rand_split`` = sum n_ij^2 / sum a_i^2 and ``rand_merge`` = sum n_ij^2 / sum b_j^2
  (pairs counted with order and with self-pairs, as funlib.evaluate); 1 is perfect,
  splits lower ``rand_split``, merges lower ``rand_merge``.
- adapted Rand (SNEMI3D; scikit-image's ``adapted_rand_error``): pairs of distinct
  voxels, i.e. each sum of squares minus n. ``adapted_rand_precision`` = pairs
  together in both / pairs together in test (lowered by merges),
  ``adapted_rand_recall`` = pairs together in both / pairs together in truth
  (lowered by splits), ``adapted_rand_error`` = 1 - F-score. scikit-image (0.26)
  returns these two in the opposite order to its own docstring
  (scikit-image issue #6485); here they follow the docstring and SNEMI3D.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

#: Metric keys returned by :func:`evaluate_segmentation`, in output column order.
METRIC_KEYS: tuple[str, ...] = (
    "voi_split",
    "voi_merge",
    "voi_sum",
    "rand_split",
    "rand_merge",
    "adapted_rand_error",
    "adapted_rand_precision",
    "adapted_rand_recall",
    "n_voxels",
    "n_truth_ids",
    "n_test_ids",
)


def evaluate_segmentation(
    truth: np.ndarray, test: np.ndarray, ignore_labels: Sequence[int] = (0,)
) -> dict[str, float]:
    """Compare a segmentation with ground truth.

    Args:
        truth: Ground-truth integer labels.
        test: Integer labels to evaluate, same shape as ``truth``.
        ignore_labels: Truth ids whose voxels are left out (default: background 0).

    Returns:
        A dict with the keys of :data:`METRIC_KEYS` (see the module docstring for
        definitions): VOI in bits; Rand scores in [0, 1]; the counts are ints:
        ``n_voxels`` the number of evaluated voxels; ``n_truth_ids`` the number of truth ids and
        ``n_test_ids`` the number of non-zero test ids on evaluated voxels. When
        no pair of distinct voxels shares an id in either volume, the adapted
        Rand precision and recall are 1 and the error 0.

    Raises:
        ValueError: If the arrays are not integer arrays of the same shape, hold
            negative ids, or no voxel is left to evaluate.
    """
    for name, arr in (("truth", truth), ("test", test)):
        if not isinstance(arr, np.ndarray) or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(
                f"{name} must be an integer numpy array, got {getattr(arr, 'dtype', type(arr).__name__)}"
            )
        if arr.size and np.issubdtype(arr.dtype, np.signedinteger) and arr.min() < 0:
            raise ValueError(f"{name} holds negative ids (minimum {arr.min()}); ids must be >= 0")
    if truth.shape != test.shape:
        raise ValueError(f"truth shape {truth.shape} differs from test shape {test.shape}")

    truth_flat = truth.reshape(-1)
    test_flat = test.reshape(-1)
    ignore = [int(v) for v in ignore_labels]
    # Compare in truth's own dtype (mixing int64 and uint64 would go through float64).
    info = np.iinfo(truth.dtype)
    representable = [v for v in ignore if info.min <= v <= info.max]
    if representable:
        keep = ~np.isin(truth_flat, np.asarray(representable, dtype=truth.dtype))
        truth_flat = truth_flat[keep]
        test_flat = test_flat[keep]
    n = truth_flat.size
    if n == 0:
        raise ValueError(
            f"no voxels to evaluate: all {truth.size} truth voxels are in ignore_labels {ignore}"
        )

    # Sparse contingency table: compact ids per volume, then unique (row, col) pairs.
    truth_ids, truth_idx = np.unique(truth_flat, return_inverse=True)
    test_ids, test_idx = np.unique(test_flat, return_inverse=True)
    a = np.bincount(truth_idx, minlength=truth_ids.size).astype(np.float64)
    b = np.bincount(test_idx, minlength=test_ids.size).astype(np.float64)
    if truth_ids.size * test_ids.size < 2**62:
        pair = truth_idx.astype(np.int64) * np.int64(test_ids.size) + test_idx.astype(np.int64)
        pair_codes, n_ij = np.unique(pair, return_counts=True)
        row = pair_codes // test_ids.size
        col = pair_codes % test_ids.size
    else:  # codes would overflow int64: unique rows instead (slower)
        pairs, n_ij = np.unique(np.stack([truth_idx, test_idx], axis=1), axis=0, return_counts=True)
        row, col = pairs[:, 0], pairs[:, 1]
    n_ij = n_ij.astype(np.float64)

    # VOI: H(test | truth) = -sum p_ij log2(p_ij / p_i), H(truth | test) likewise.
    # Every term is >= 0 (n_ij <= a_i, b_j); "+ 0.0" turns -0.0 into 0.0.
    voi_split = float(np.sum(n_ij * np.log2(a[row] / n_ij)) / n) + 0.0
    voi_merge = float(np.sum(n_ij * np.log2(b[col] / n_ij)) / n) + 0.0

    sum_ij = float(n_ij @ n_ij)
    sum_a = float(a @ a)
    sum_b = float(b @ b)
    pairs_both, pairs_truth, pairs_test = sum_ij - n, sum_a - n, sum_b - n
    precision = pairs_both / pairs_test if pairs_test > 0 else 1.0
    recall = pairs_both / pairs_truth if pairs_truth > 0 else 1.0
    if pairs_truth + pairs_test > 0:
        are = 1.0 - 2.0 * pairs_both / (pairs_truth + pairs_test)
    else:
        are = 0.0

    return {
        "voi_split": voi_split,
        "voi_merge": voi_merge,
        "voi_sum": voi_split + voi_merge,
        "rand_split": sum_ij / sum_a,
        "rand_merge": sum_ij / sum_b,
        "adapted_rand_error": are,
        "adapted_rand_precision": precision,
        "adapted_rand_recall": recall,
        "n_voxels": int(n),
        "n_truth_ids": int(truth_ids.size),
        "n_test_ids": int(np.count_nonzero(test_ids)),
    }


def confusion_counts(predicted: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Per-channel confusion counts of boolean predictions against boolean truth.

    Args:
        predicted: (C, ...) booleans (e.g. predicted affinity > 0.5), channels first.
        truth: (C, ...) booleans of the same shape (e.g. target affinity == 1).
        mask: Optional boolean array broadcastable to the spatial shape ``predicted.shape[1:]``:
            only its True elements count.

    Returns:
        int64 array (C, 4): TP, FP, FN, TN per channel (positive = True).
    """
    if predicted.shape != truth.shape:
        raise ValueError(f"predicted shape {predicted.shape} differs from truth shape {truth.shape}")
    p = predicted.astype(bool).reshape(predicted.shape[0], -1)
    t = truth.astype(bool).reshape(truth.shape[0], -1)
    if mask is None:
        m = np.ones(p.shape[1], dtype=bool)
    else:
        m = np.broadcast_to(np.asarray(mask, dtype=bool), predicted.shape[1:]).reshape(-1)
    pm, tm = p & m, t & m
    tp = np.count_nonzero(pm & tm, axis=1)
    fp = np.count_nonzero(pm & ~t & m, axis=1)
    fn = np.count_nonzero(~p & tm, axis=1)
    tn = np.count_nonzero(~p & ~t & m, axis=1)
    return np.stack([tp, fp, fn, tn], axis=1).astype(np.int64)


def balanced_accuracy(counts: np.ndarray) -> np.ndarray:
    """Balanced accuracy per row of (TP, FP, FN, TN) counts: the mean of the recall of
    positives, TP / (TP + FN), and of negatives, TN / (TN + FP).

    Unlike accuracy or F1 it is not dominated by the more frequent class: for affinities,
    where most edges are positive (inside an object), predicting "same object" everywhere
    scores 0.5, not the fraction of positive edges. A class absent from a row is left out
    of that row's mean; a row with no counted element is NaN.
    """
    c = np.asarray(counts, dtype=np.float64).reshape(-1, 4)
    tp, fp, fn, tn = c.T
    with np.errstate(invalid="ignore", divide="ignore"):
        recall_pos = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
        recall_neg = np.where(tn + fp > 0, tn / (tn + fp), np.nan)
    both = np.stack([recall_pos, recall_neg])
    out = np.full(len(c), np.nan)
    have = ~np.isnan(both).all(axis=0)
    out[have] = np.nanmean(both[:, have], axis=0)
    return out


def affinity_scores(
    predicted: np.ndarray, target: np.ndarray, offsets: Sequence[Sequence[int]], mask: np.ndarray | None = None,
    threshold: float = 0.5,
) -> dict[str, object]:
    """How predicted affinities score against target affinities, per offset.

    Args:
        predicted: (n_offsets, z, y, x) predicted affinities in [0, 1].
        target: (n_offsets, z, y, x) target affinities (1: same object, 0: boundary).
        offsets: One (dz, dy, dx) offset in voxels per channel (for the keys).
        mask: Optional (z, y, x) mask; only voxels where it is non-zero count.
        threshold: Predicted affinities above it count as "same object".

    Returns:
        ``affinity_balanced_accuracy`` (mean over offsets) and per offset ``"dz,dy,dx"``:
        ``balanced_accuracy``, ``boundary_recall`` (boundary edges predicted as boundary,
        TN / (TN + FP)), ``boundary_precision`` (TN / (TN + FN)) and ``boundary_fraction``
        (the share of counted edges that are boundary).
    """
    if len(offsets) != predicted.shape[0]:
        raise ValueError(f"{len(offsets)} offsets for {predicted.shape[0]} affinity channels")
    counts = confusion_counts(predicted > threshold, target > 0.5, None if mask is None else mask > 0)
    bacc = balanced_accuracy(counts)
    per_offset: dict[str, dict[str, float]] = {}
    for o, (tp, fp, fn, tn), b in zip(offsets, counts, bacc):
        total = tp + fp + fn + tn
        per_offset[",".join(str(int(v)) for v in o)] = {
            "balanced_accuracy": float(b),
            "boundary_recall": float(tn / (tn + fp)) if tn + fp else float("nan"),
            "boundary_precision": float(tn / (tn + fn)) if tn + fn else float("nan"),
            "boundary_fraction": float((tn + fp) / total) if total else float("nan"),
        }
    valid = bacc[~np.isnan(bacc)]
    return {"affinity_balanced_accuracy": float(valid.mean()) if valid.size else float("nan"),
            "per_offset": per_offset}


def write_summary_tsv(
    rows: Sequence[Mapping[str, object]], path: str | os.PathLike[str], columns: Sequence[str] | None = None,
    significant: int | None = None,
) -> None:
    """Write one line per volume of metrics to a tab-separated file.

    Columns: ``columns`` when given, else ``volume`` and :data:`METRIC_KEYS`; then any
    other key found in the rows that is neither among them nor in :data:`METRIC_KEYS`,
    sorted by name (metrics left out of ``columns`` stay out). Rows are sorted by volume
    name; missing values are written as empty cells; floats use ``repr`` (round-trip), or
    ``significant`` significant digits when given (e.g. 4 for a table people read).

    Args:
        rows: Mappings with a ``volume`` key (str) and metric values, e.g. the
            output of :func:`evaluate_segmentation` plus the volume name.
        path: Output file; its parent directory must exist.
        columns: The leading columns (must include ``volume``).
        significant: Significant digits of floats; None: full precision.

    Raises:
        ValueError: If a row has no ``volume`` or two rows share a volume name.
    """
    names: list[str] = []
    for i, r in enumerate(rows):
        if "volume" not in r:
            raise ValueError(f"row {i} has no 'volume' key; keys: {sorted(r)}")
        names.append(str(r["volume"]))
    duplicates = sorted({v for v in names if names.count(v) > 1})
    if duplicates:
        raise ValueError(f"volume name(s) {duplicates} appear in more than one row")
    leading = list(columns) if columns is not None else ["volume", *METRIC_KEYS]
    if "volume" not in leading:
        raise ValueError(f"columns {leading} must include 'volume'")
    extra = sorted({str(k) for r in rows for k in r} - set(METRIC_KEYS) - set(leading))
    columns = [*leading, *extra]
    ordered = sorted(rows, key=lambda r: str(r["volume"]))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(columns)
        for r in ordered:
            writer.writerow([_format(r.get(c), significant) for c in columns])
    logger.info("wrote %d rows of metrics to %s", len(ordered), path)


def _format(value: object, significant: int | None = None) -> str:
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return repr(float(value)) if significant is None else f"{float(value):.{significant}g}"
    return str(value)
