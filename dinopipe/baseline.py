"""The classical baseline: seeded watershed on the smoothed raw image.

What a user would try before any learning: smooth the raw with a Gaussian, take the
h-maxima of the smoothed intensity as seeds (one seed per cell interior), and flood the
inverted intensity from them (membranes are ridges). In EM with dark membranes (heavy
metal stain, the usual FIB-SEM contrast) cell interiors are bright; ``membrane="bright"``
inverts that. Its two parameters are tuned on labelled volumes by a small grid
(:func:`tune_baseline`), scored by VOI sum (:func:`dinopipe.evaluate.evaluate_segmentation`).

Pure array functions: raw (z, y, x) floats scaled to 0..1 (as the targets store's
``raw``), labels (z, y, x) integers; lengths in voxels.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from dinopipe.evaluate import evaluate_segmentation
from dinopipe.segment import filter_small_fragments, relabel_consecutive

logger = logging.getLogger(__name__)

#: Default grid of :func:`tune_baseline`: Gaussian sigma in voxels and seed height h in raw units (0..1).
DEFAULT_GRID: dict[str, list[float]] = {
    "sigma": [0.5, 1.0, 2.0],
    "h": [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
}
MEMBRANES = ("dark", "bright")


def watershed_baseline(
    raw: np.ndarray, sigma: float = 2.0, h: float = 0.05, membrane: str = "dark", min_size: int = 0,
) -> np.ndarray:
    """Watershed of the smoothed raw from its h-maxima (seeds in cell interiors).

    Args:
        raw: (z, y, x) intensities, scaled to about 0..1.
        sigma: Gaussian smoothing in voxels (> 0; 0 smooths nothing).
        h: Seed height: a local maximum of the smoothed (membrane-dark) intensity seeds a
            segment only where it rises at least ``h`` above its surroundings (raw units).
        membrane: "dark" (membranes darker than cytoplasm) or "bright".
        min_size: Segments with fewer voxels become 0 (>= 0).

    Returns:
        uint64 labels (z, y, x), consecutive from 1 (0 only where a small segment was removed).

    Raises:
        ValueError: raw not 3D, non-finite raw, or a bad parameter (named).
    """
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    raw = np.asarray(raw)
    if raw.ndim != 3:
        raise ValueError(f"baseline raw must be 3D (z, y, x), got shape {raw.shape}")
    if not np.all(np.isfinite(raw)):
        raise ValueError("baseline raw holds NaN or infinite values")
    if not (np.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"baseline sigma must be a number >= 0 (voxels), got {sigma!r}")
    if not (np.isfinite(h) and h > 0):
        raise ValueError(f"baseline h must be a number > 0 (raw units), got {h!r}")
    if membrane not in MEMBRANES:
        raise ValueError(f"baseline membrane must be one of {list(MEMBRANES)}, got {membrane!r}")
    smooth = ndimage.gaussian_filter(raw.astype(np.float64), sigma) if sigma > 0 else raw.astype(np.float64)
    if membrane == "bright":
        smooth = -smooth
    seeds, n = ndimage.label(h_maxima(smooth, h))
    if n == 0:  # a flat image: one segment
        return np.ones(raw.shape, dtype=np.uint64)
    labels = watershed(-smooth, seeds)
    labels = filter_small_fragments(labels.astype(np.uint64), min_size)
    logger.debug("baseline watershed: sigma %g, h %g: %d seeds", sigma, h, n)
    return relabel_consecutive(labels)


def tune_baseline(
    volumes: Sequence[tuple[np.ndarray, np.ndarray]],
    grid: Mapping[str, Sequence[float]] | None = None,
    membrane: str = "dark",
    ignore_labels: Sequence[int] = (0,),
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Pick the baseline parameters with the lowest mean VOI sum on labelled volumes.

    Args:
        volumes: (raw, labels) pairs, each (z, y, x); raw scaled to about 0..1.
        grid: Values to try per parameter (``sigma``, ``h``); default :data:`DEFAULT_GRID`.
        membrane: As :func:`watershed_baseline`.
        ignore_labels: Truth labels left out of the scores.

    Returns:
        (best parameters ``{"sigma", "h", "membrane"}``, one row per grid point with its
        parameters and mean ``voi_split``, ``voi_merge``, ``voi_sum``, ``adapted_rand_error``).

    Raises:
        ValueError: No volumes, an unknown grid key, an empty grid, or raw and labels of
            different shapes.
    """
    if not volumes:
        raise ValueError("tune_baseline needs at least one (raw, labels) volume")
    grid = dict(DEFAULT_GRID if grid is None else grid)
    unknown = sorted(set(grid) - set(DEFAULT_GRID))
    if unknown or any(len(v) == 0 for v in grid.values()):
        raise ValueError(f"baseline grid must map {sorted(DEFAULT_GRID)} to non-empty lists, got {grid!r}")
    grid = {**DEFAULT_GRID, **grid}
    for i, (raw, labels) in enumerate(volumes):
        if np.shape(raw) != np.shape(labels):
            raise ValueError(f"baseline volume #{i}: raw {np.shape(raw)} and labels {np.shape(labels)} differ in shape")
    rows = []
    for sigma, h in itertools.product(grid["sigma"], grid["h"]):
        scores = [
            evaluate_segmentation(labels, watershed_baseline(raw, sigma, h, membrane), ignore_labels=ignore_labels)
            for raw, labels in volumes
        ]
        row: dict[str, Any] = {"sigma": float(sigma), "h": float(h)}
        for key in ("voi_split", "voi_merge", "voi_sum", "adapted_rand_error"):
            row[key] = float(np.mean([s[key] for s in scores]))
        rows.append(row)
        logger.debug("baseline sigma %g h %g: VOI sum %.3f", sigma, h, row["voi_sum"])
    best = min(rows, key=lambda r: r["voi_sum"])
    logger.info("baseline tuned on %d volume(s): sigma %g, h %g (VOI sum %.3f)", len(volumes), best["sigma"],
                best["h"], best["voi_sum"])
    return {"sigma": best["sigma"], "h": best["h"], "membrane": membrane}, rows
