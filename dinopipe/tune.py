"""Choosing the segmentation parameters on the validate volumes (the ``tune_segment`` rule).

The chosen ``segment.method`` is run on the predicted affinities of every labelled
validate volume for each combination of a small grid of its parameters (a mapping of
parameter name to a list of values, e.g. ``{"bias_short": [-0.7, -0.5], "bias_long":
[-0.7, -0.5]}``); each segmentation is scored against the volume's labels (VOI, adapted
Rand, :func:`dinopipe.evaluate.evaluate_segmentation`), and the combination with the
smallest VOI sum, averaged over the validate volumes, is picked (ties: the first in grid
order). The segment rule then uses it for every predicted volume.

Parameters not in the grid keep their value from the ``segment`` config section. Any
keyword parameter of the method may be swept (``min_size`` too), so a parameter a method
gains later needs no change here.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dinopipe.evaluate import evaluate_segmentation
from dinopipe.segment import METHODS, method_parameters, sanity_warnings, segment

logger = logging.getLogger(__name__)

#: The grid swept when ``segment.grid`` is null, per method: small enough for a CPU
#: (9, 7 and 5 segmentations per validate volume), around each method's neutral point.
DEFAULT_GRIDS: dict[str, dict[str, list[Any]]] = {
    "mutex_watershed": {"bias_short": [-0.7, -0.5, -0.3], "bias_long": [-0.9, -0.7, -0.5]},
    # the seed threshold follows the model's calibration (docs/quality.md: 3.2 vs 0.86 VOI)
    "agglomeration": {"threshold": [0.2, 0.35, 0.5, 0.65, 0.8], "seed_threshold": [0.5, 0.7, 0.9]},
    "threshold_components": {"threshold": [0.3, 0.5, 0.7, 0.8, 0.9]},
}

#: Per-candidate score columns of the tuning table (besides ``volume`` and the swept parameters).
SCORE_COLUMNS: tuple[str, ...] = ("voi_split", "voi_merge", "voi_sum", "adapted_rand_error", "n_segments")


def resolve_grid(segment_config: Mapping[str, Any]) -> dict[str, list[Any]]:
    """The grid to sweep for a ``segment`` config section.

    ``grid`` null (or absent) is :data:`DEFAULT_GRIDS` for the method; a mapping is used as
    given; ``tune: false`` or an empty mapping means no tuning (an empty dict is returned).

    Raises:
        ValueError: A grid key that is not a parameter of the method, or a value list that
            is empty or not a list (naming ``segment.grid`` and what is allowed).
    """
    method = segment_config.get("method", "mutex_watershed")
    if method not in METHODS:
        raise ValueError(f"segment.method {method!r} is unknown; allowed: {sorted(METHODS)}")
    if not segment_config.get("tune", True):
        return {}
    grid = segment_config.get("grid")
    if grid is None:
        grid = DEFAULT_GRIDS.get(method, {})
    allowed = method_parameters(method)
    unknown = sorted(set(grid) - allowed)
    if unknown:
        raise ValueError(f"segment.grid: {unknown} are not parameters of method {method!r}; allowed: {sorted(allowed)}")
    for key, values in grid.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"segment.grid.{key} must be a non-empty list of values, got {values!r}")
    return {str(k): list(v) for k, v in grid.items()}


def candidates(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values (the last key varies fastest); ``[{}]`` for an empty grid."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def fixed_parameters(segment_config: Mapping[str, Any]) -> dict[str, Any]:
    """The method's parameters set in the ``segment`` section (``min_size`` included, None values dropped)."""
    allowed = method_parameters(segment_config.get("method", "mutex_watershed"))
    return {k: v for k, v in segment_config.items() if k in allowed and v is not None}


@dataclass
class TuneResult:
    """The outcome of :func:`tune_segmentation`.

    Attributes:
        method: The segmentation method.
        grid: The swept grid (parameter -> values).
        rows: One row per (candidate, volume): ``candidate`` (index), ``volume``, the swept
            parameters, :data:`SCORE_COLUMNS` and ``warnings``.
        mean_voi_sum: Mean VOI sum over the volumes, per candidate (grid order).
        best: Index of the picked candidate.
        parameters: The picked parameters: fixed ones from the config, overridden by the
            picked grid values (what the segment rule uses).
    """

    method: str
    grid: dict[str, list[Any]]
    rows: list[dict[str, Any]]
    mean_voi_sum: list[float]
    best: int
    parameters: dict[str, Any] = field(default_factory=dict)

    def best_rows(self) -> list[dict[str, Any]]:
        """The per-volume rows of the picked candidate."""
        return [r for r in self.rows if r["candidate"] == self.best]


def tune_segmentation(
    volumes: Sequence[tuple[str, np.ndarray, np.ndarray]],
    offsets: Sequence[Sequence[int]],
    segment_config: Mapping[str, Any],
    grid: Mapping[str, Sequence[Any]],
    ignore_labels: Sequence[int] = (0,),
) -> TuneResult:
    """Segment each volume with every grid candidate and pick the smallest mean VOI sum.

    Args:
        volumes: ``(name, affinities, labels)`` per validate volume: predicted affinities
            (n_offsets, z, y, x) floats in [0, 1] and truth labels (z, y, x) on the same grid.
        offsets: The affinity offsets (dz, dy, dx) in voxels, one per channel.
        segment_config: The ``segment`` config section (``method``, fixed parameters).
        grid: Parameter name -> values (see :func:`resolve_grid`); empty: score the fixed
            parameters only.
        ignore_labels: Truth ids left out of the scores.

    Returns:
        A :class:`TuneResult`.

    Raises:
        ValueError: No volume, or a volume whose affinities and labels disagree in shape.
    """
    if not volumes:
        raise ValueError("tuning the segmentation needs at least one labelled validate volume")
    method = segment_config.get("method", "mutex_watershed")
    fixed = fixed_parameters(segment_config)
    cands = candidates(grid)
    rows: list[dict[str, Any]] = []
    for name, affs, labels in volumes:
        if affs.shape[1:] != labels.shape:
            raise ValueError(f"volume {name!r}: affinities {affs.shape} and labels {labels.shape} differ in shape")
    means: list[float] = []
    for i, cand in enumerate(cands):
        params = {**fixed, **cand}
        sums = []
        for name, affs, labels in volumes:
            seg = segment(np.asarray(affs, dtype=np.float32), offsets, method=method, **params)
            scores = evaluate_segmentation(labels, seg, ignore_labels=tuple(ignore_labels))
            n_segments = int(seg.max())
            row = {"candidate": i, "volume": name, **cand, **{k: scores[k] for k in SCORE_COLUMNS if k in scores},
                   "n_segments": n_segments, "n_truth_ids": scores["n_truth_ids"],
                   "warnings": "; ".join(sanity_warnings(n_segments, seg.size))}
            rows.append(row)
            sums.append(scores["voi_sum"])
        means.append(float(np.mean(sums)))
        logger.info("tune %s %s: mean VOI sum %.4f over %d volume(s)", method, cand or fixed, means[-1], len(volumes))
    finite = [m if math.isfinite(m) else math.inf for m in means]
    best = int(np.argmin(finite))
    parameters = {**fixed, **cands[best]}
    logger.info("tune %s: picked %s (mean VOI sum %.4f; grid of %d)", method, cands[best] or parameters, means[best],
                len(cands))
    return TuneResult(method, {k: list(v) for k, v in grid.items()}, rows, means, best, parameters)


def write_table(result: TuneResult, path: str | os.PathLike[str]) -> None:
    """Write the tuning table as TSV: one row per (candidate, volume) plus one ``mean`` row per
    candidate; columns ``candidate``, ``volume``, the swept parameters, :data:`SCORE_COLUMNS`,
    ``picked`` (``yes`` on the picked candidate's rows) and ``warnings``."""
    columns = ["candidate", "volume", *result.grid, *SCORE_COLUMNS, "picked", "warnings"]
    lines: list[dict[str, Any]] = []
    for i in range(len(result.mean_voi_sum)):
        own = [r for r in result.rows if r["candidate"] == i]
        lines.extend(own)
        mean = {"candidate": i, "volume": "mean", **{k: own[0][k] for k in result.grid},
                **{k: float(np.mean([r[k] for r in own])) for k in SCORE_COLUMNS}}
        lines.append(mean)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(columns)
        for r in lines:
            picked = "yes" if r["candidate"] == result.best else ""
            writer.writerow([_fmt(r.get(c)) if c != "picked" else picked for c in columns])


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}"
    return str(value)


def plot(result: TuneResult, path: str | os.PathLike[str]) -> None:
    """Bar chart of each candidate's mean VOI split and merge (stacked: their sum is the VOI
    sum), the picked candidate highlighted; written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(result.mean_voi_sum)
    labels, split, merge = [], [], []
    for i in range(n):
        own = [r for r in result.rows if r["candidate"] == i]
        labels.append(", ".join(f"{k}={own[0][k]:g}" if isinstance(own[0][k], (int, float)) else f"{k}={own[0][k]}"
                                 for k in result.grid) or "fixed")
        split.append(float(np.mean([r["voi_split"] for r in own])))
        merge.append(float(np.mean([r["voi_merge"] for r in own])))
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.35 * n))
    y = np.arange(n)
    ax.barh(y, split, color="C0", label="VOI split")
    ax.barh(y, merge, left=split, color="C1", label="VOI merge")
    ax.set_yticks(y, labels)
    ax.get_yticklabels()[result.best].set_fontweight("bold")
    ax.plot([split[result.best] + merge[result.best]], [result.best], "k*", markersize=12, label="picked")
    ax.invert_yaxis()
    ax.set(xlabel="mean VOI (bits) over the validate volumes", title=f"{result.method}: parameters tried")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def write_choice(result: TuneResult, path: str | os.PathLike[str], extra: Mapping[str, Any] | None = None) -> None:
    """Write the picked parameters as JSON: ``method``, ``parameters`` (what the segment rule
    uses), ``grid``, ``mean_voi_sum`` of the pick, and ``extra`` (e.g. per-volume scores)."""
    record = {"method": result.method, "parameters": result.parameters, "grid": result.grid,
              "mean_voi_sum": result.mean_voi_sum[result.best], **(extra or {})}
    with open(path, "w") as f:
        json.dump(record, f, indent=2, sort_keys=True, default=float)
        f.write("\n")


def read_choice(path: str | os.PathLike[str], method: str) -> dict[str, Any]:
    """The picked parameters from a :func:`write_choice` JSON.

    Raises:
        ValueError: The JSON was tuned for another method than ``method`` (the config changed
            since: rerun the tune_segment rule).
    """
    with open(path) as f:
        record = json.load(f)
    if record.get("method") != method:
        raise ValueError(f"{path}: parameters were tuned for segment.method {record.get('method')!r}, "
                         f"the config asks for {method!r}; rerun the tune_segment rule")
    return dict(record["parameters"])
