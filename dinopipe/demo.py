"""Deterministic synthetic EM-like volumes for demos and tests.

Pure array functions, no file I/O. Axis order is (z, y, x). Sizes here are in
voxels of the *label* grid unless stated otherwise: the volume has no physical voxel
size of its own; the caller chooses one (the raw grid is ``raw_factor`` times finer).

Geometry: cells are the Voronoi cells of random, roughly evenly spaced seeds in a
smoothly warped space (so that cell boundaries are curved). Every quantity is an
analytic function of continuous label-grid coordinates, evaluated at label-voxel
centres for the labels and at raw-voxel centres for the raw, so both grids agree.
Label voxel ``i`` (centre at coordinate ``i``) covers raw voxels
``[i * f, (i + 1) * f)`` along an axis with factor ``f``; raw voxel ``j`` has its
centre at label coordinate ``(j + 0.5) / f - 0.5``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage, special
from scipy.spatial import cKDTree

logger = logging.getLogger(__name__)

#: Connected pieces of a cell smaller than this many label voxels become membrane (0).
_MIN_PIECE_VOXELS = 4


def make_demo_volume(
    seed: int,
    label_shape: tuple[int, int, int] = (32, 48, 48),
    raw_factor: tuple[int, int, int] = (2, 2, 2),
    mean_cell_diameter_vox: float = 12.0,
    membrane_width_vox: float = 1.0,
    organelles_per_cell: float = 0.5,
    blur_sigma_vox: float = 0.4,
    noise_level: float = 1.0,
    organelle_classes: bool = False,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Make a synthetic FIB-SEM-like raw volume and its cell segmentation.

    Densely packed cells with dark membranes, textured interiors with a per-cell mean
    intensity, a few dark and bright organelles inside cells (they are part of the
    cell's label), Gaussian blur and Poisson (shot) plus Gaussian (read) noise.

    Args:
        seed: Seed of the random generator (non-negative int). The same seed and
            arguments give bit-identical outputs.
        label_shape: Shape (z, y, x) of the label volume, label voxels; each >= 4.
        raw_factor: Raw voxels per label voxel along (z, y, x); positive ints. The
            raw has shape ``label_shape * raw_factor``; its origin is the label
            grid's corner.
        mean_cell_diameter_vox: Mean equivalent-sphere diameter of a cell, label
            voxels; > 2.
        membrane_width_vox: Width of the dark membrane band, label voxels, in
            [0.5, 4]. Label voxels whose centre lies in the band are 0.
        organelles_per_cell: Mean number of organelles per cell (>= 0).
        blur_sigma_vox: Sigma of the Gaussian point-spread function, label voxels
            (>= 0).
        noise_level: Scale of the shot and read noise (>= 0; 0 gives no noise).
        organelle_classes: Also return the organelles' class image (raw and labels are
            the same either way).

    Returns:
        ``(raw, labels)``: raw is uint8 of shape ``label_shape * raw_factor``
        (z, y, x); labels is uint64 of shape ``label_shape`` with cells numbered
        consecutively from 1 and 0 on membranes. Distinct cells never touch along an
        axis (6-neighbourhood); every cell is 6-connected. With ``organelle_classes``
        also ``organelles``: uint8 of shape ``label_shape``, 1 where a label-voxel centre
        lies inside a dark organelle, 2 inside a bright one, 0 elsewhere.

    Raises:
        ValueError: If an argument is out of range.
    """
    label_shape = _check_triple("label_shape", label_shape, minimum=4)
    raw_factor = _check_triple("raw_factor", raw_factor, minimum=1)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    _check_range("mean_cell_diameter_vox", mean_cell_diameter_vox, low=2.0, low_open=True)
    _check_range("membrane_width_vox", membrane_width_vox, low=0.5, high=4.0)
    _check_range("organelles_per_cell", organelles_per_cell, low=0.0)
    _check_range("blur_sigma_vox", blur_sigma_vox, low=0.0)
    _check_range("noise_level", noise_level, low=0.0)

    rng = np.random.default_rng(seed)
    diameter = float(mean_cell_diameter_vox)
    shape = np.asarray(label_shape)
    factor = np.asarray(raw_factor)

    seeds = _cell_seeds(rng, shape, diameter)
    warp = _WarpField(rng, diameter)
    tree = cKDTree(seeds)
    half_width = 0.5 * float(membrane_width_vox)

    # --- labels, at label-voxel centres
    label_axes = _grid_axes(shape, np.ones(3, dtype=np.int64))
    cell, dist = _nearest_cell(tree, seeds, warp.on_grid(label_axes))
    cell = cell.reshape(label_shape)
    dist = dist.reshape(label_shape)
    labels = np.where(dist < half_width, 0, cell + 1)
    _separate_touching(labels, dist)
    labels = _split_pieces(labels)
    logger.debug("demo volume seed=%d: %d seeds, %d cells", seed, len(seeds), int(labels.max()))

    # --- raw, at raw-voxel centres
    raw_shape = tuple(int(n) for n in shape * factor)
    raw_cell, raw_dist = _nearest_cell(tree, seeds, warp.on_grid(_grid_axes(shape, factor)))
    raw_cell = raw_cell.reshape(raw_shape)
    raw_dist = raw_dist.reshape(raw_shape)

    cell_mean = rng.uniform(125.0, 195.0, size=len(seeds))
    texture = rng.standard_normal(raw_shape)
    texture = ndimage.gaussian_filter(texture, sigma=1.0 * factor, mode="reflect")
    texture *= 10.0 / max(float(texture.std()), 1e-12)
    image = cell_mean[raw_cell] + texture

    # Dark membranes: a soft band of the given width around the cell boundaries.
    membrane = special.expit((half_width - raw_dist) / 0.15)
    image = image * (1.0 - membrane) + rng.uniform(35.0, 55.0) * membrane

    organelles = np.zeros(label_shape, dtype=np.uint8) if organelle_classes else None
    _add_organelles(rng, image, tree, seeds, warp, shape, factor, diameter, organelles_per_cell, organelles)

    if blur_sigma_vox > 0:
        image = ndimage.gaussian_filter(image, sigma=float(blur_sigma_vox) * factor, mode="reflect")
    if noise_level > 0:
        photons = np.clip(image, 0.0, None)
        shot = rng.poisson(photons) - photons
        read = rng.normal(0.0, 4.0, size=raw_shape)
        image = image + float(noise_level) * (shot + read)
    raw = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    if organelles is not None:
        return raw, labels.astype(np.uint64), organelles
    return raw, labels.astype(np.uint64)


def _check_triple(name: str, value: Sequence[int], minimum: int) -> tuple[int, int, int]:
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be three ints (z, y, x), got {value!r}") from None
    if len(items) != 3 or any(
        isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum for v in items
    ):
        raise ValueError(f"{name} must be three ints (z, y, x), each >= {minimum}, got {value!r}")
    return (int(items[0]), int(items[1]), int(items[2]))


def _check_range(
    name: str, value: float, low: float, high: float | None = None, low_open: bool = False
) -> None:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and (value > low if low_open else value >= low)
    ok = ok and (high is None or value <= high)
    if not ok:
        allowed = f"{'>' if low_open else '>='} {low}" + ("" if high is None else f" and <= {high}")
        raise ValueError(f"{name} must be a finite number {allowed}, got {value!r}")


def _grid_axes(shape: np.ndarray, factor: np.ndarray) -> list[np.ndarray]:
    """Voxel-centre coordinates (label units) of a grid ``factor`` times finer.

    Returns one coordinate vector per axis (z, y, x) of a grid of ``shape * factor``.
    """
    return [(np.arange(n * f) + 0.5) / f - 0.5 for n, f in zip(shape, factor)]


def _cell_seeds(rng: np.random.Generator, shape: np.ndarray, diameter: float) -> np.ndarray:
    """Roughly evenly spaced seeds (random sequential addition) covering a padded box."""
    low = -0.5 * diameter
    high = shape - 1 + 0.5 * diameter
    cell_volume = math.pi / 6.0 * diameter**3
    n_target = max(2, round(float(np.prod(high - low)) / cell_volume))
    candidates = rng.uniform(low, high, size=(50 * n_target, 3))
    min_dist2 = (0.6 * diameter) ** 2
    accepted = np.empty((n_target, 3))
    n = 0
    for point in candidates:
        if n and np.min(np.sum((accepted[:n] - point) ** 2, axis=1)) < min_dist2:
            continue
        accepted[n] = point
        n += 1
        if n == n_target:
            break
    return accepted[:n]


class _WarpField:
    """A smooth random displacement of space: a few random Fourier modes per axis."""

    def __init__(self, rng: np.random.Generator, diameter: float, n_modes: int = 4) -> None:
        wavelength = rng.uniform(1.5, 3.0, size=(3, n_modes)) * diameter
        direction = rng.standard_normal((3, n_modes, 3))
        direction /= np.linalg.norm(direction, axis=2, keepdims=True)
        self.k = direction * (2.0 * math.pi / wavelength)[..., None]
        self.phase = rng.uniform(0.0, 2.0 * math.pi, size=(3, n_modes))
        self.amplitude = 0.12 * diameter / math.sqrt(n_modes)

    def on_grid(self, axes: Sequence[np.ndarray]) -> np.ndarray:
        """Warped coordinates of the grid ``axes`` (z, y, x coordinate vectors).

        Returns an (N, 3) array in C order of the grid. Uses
        sin(k.x + phase) = Im(e^{i phase} e^{i kz z} e^{i ky y} e^{i kx x}), which is
        separable, so the cost is one complex product per mode and grid point.
        """
        zz, yy, xx = np.meshgrid(*axes, indexing="ij")
        out = np.stack([zz.ravel(), yy.ravel(), xx.ravel()], axis=1)
        for axis in range(3):
            total = np.zeros(out.shape[0])
            for k, phase in zip(self.k[axis], self.phase[axis]):
                ez, ey, ex = (np.exp(1j * kc * c) for kc, c in zip(k, axes))
                mode = (np.exp(1j * phase) * ez)[:, None, None] * (ey[:, None] * ex[None, :])[None]
                total += mode.imag.ravel()
            out[:, axis] += self.amplitude * total
        return out

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """Warped coordinates of scattered (N, 3) points."""
        out = points.copy()
        for axis in range(3):
            out[:, axis] += self.amplitude * np.sin(points @ self.k[axis].T + self.phase[axis]).sum(axis=1)
        return out


def _nearest_cell(tree: cKDTree, seeds: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest seed of each (warped) point and its distance to the cell boundary.

    The boundary distance is the distance to the bisector plane of the two nearest
    seeds, in label voxels (exact for a Voronoi face, approximate near edges).
    """
    d, idx = tree.query(points, k=2, workers=-1)
    gap = np.linalg.norm(seeds[idx[:, 0]] - seeds[idx[:, 1]], axis=1)
    dist = (d[:, 1] ** 2 - d[:, 0] ** 2) / (2.0 * gap)
    return idx[:, 0], dist


def _separate_touching(labels: np.ndarray, dist: np.ndarray) -> None:
    """Close membranes in place.

    Where two cells touch along an axis, the voxel nearer the boundary becomes 0.
    """
    for axis in range(3):
        a = [slice(None)] * 3
        b = [slice(None)] * 3
        a[axis] = slice(None, -1)
        b[axis] = slice(1, None)
        la, lb = labels[tuple(a)], labels[tuple(b)]
        touching = (la != lb) & (la != 0) & (lb != 0)
        first_nearer = dist[tuple(a)] <= dist[tuple(b)]
        la[touching & first_nearer] = 0
        lb[touching & ~first_nearer] = 0


def _split_pieces(labels: np.ndarray) -> np.ndarray:
    """Give every 6-connected piece of a cell its own id; drop tiny pieces."""
    pieces, n = ndimage.label(labels > 0)
    sizes = np.bincount(pieces.ravel(), minlength=n + 1)
    keep = sizes >= _MIN_PIECE_VOXELS
    keep[0] = False
    new_ids = np.zeros(n + 1, dtype=np.int64)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1)
    return new_ids[pieces]


def _add_organelles(
    rng: np.random.Generator,
    image: np.ndarray,
    tree: cKDTree,
    seeds: np.ndarray,
    warp: _WarpField,
    shape: np.ndarray,
    factor: np.ndarray,
    diameter: float,
    per_cell: float,
    classes: np.ndarray | None = None,
) -> None:
    """Draw dark and bright ellipsoidal blobs well inside cells (in place, raw grid); mark
    them in ``classes`` (label grid: 1 dark, 2 bright) when given. Draws the same random
    numbers either way."""
    # Seeds cover the box padded by about one diameter; count only cells inside.
    inside_fraction = float(np.prod(shape)) / float(np.prod(shape + diameter))
    n_organelles = int(rng.poisson(per_cell * len(seeds) * inside_fraction))
    if n_organelles == 0:
        return
    max_radius = max(1.0, 0.15 * diameter)
    n_candidates = 40 * n_organelles
    centres = rng.uniform(0.0, shape - 1, size=(n_candidates, 3))
    radii = rng.uniform(1.0, max_radius, size=(n_candidates, 3))
    _, margin = _nearest_cell(tree, seeds, warp(centres))
    inside = np.flatnonzero(margin > 1.3 * radii.max(axis=1) + 1.0)[:n_organelles]
    raw_shape = shape * factor
    for i in inside:
        contrast = rng.choice([-70.0, 45.0])
        # Raw-voxel index range covering the ellipsoid (label coords -> raw index).
        lo = np.maximum(np.floor((centres[i] - radii[i] - 1 + 0.5) * factor).astype(int), 0)
        hi = np.minimum(np.ceil((centres[i] + radii[i] + 1 + 0.5) * factor).astype(int), raw_shape)
        axes = [(np.arange(a, b) + 0.5) / f - 0.5 for a, b, f in zip(lo, hi, factor)]
        zz, yy, xx = np.meshgrid(*axes, indexing="ij")
        r2 = (
            ((zz - centres[i, 0]) / radii[i, 0]) ** 2
            + ((yy - centres[i, 1]) / radii[i, 1]) ** 2
            + ((xx - centres[i, 2]) / radii[i, 2]) ** 2
        )
        blob = special.expit((1.0 - np.sqrt(r2)) / 0.1)
        image[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] += contrast * blob
        if classes is not None:  # label-voxel centres inside the ellipsoid
            clo = np.maximum(np.floor(centres[i] - radii[i]).astype(int), 0)
            chi = np.minimum(np.ceil(centres[i] + radii[i]).astype(int) + 1, shape)
            cz, cy, cx = np.meshgrid(*(np.arange(a, b) for a, b in zip(clo, chi)), indexing="ij")
            inside_blob = (((cz - centres[i, 0]) / radii[i, 0]) ** 2 + ((cy - centres[i, 1]) / radii[i, 1]) ** 2
                           + ((cx - centres[i, 2]) / radii[i, 2]) ** 2) < 1.0
            view = classes[clo[0] : chi[0], clo[1] : chi[1], clo[2] : chi[2]]
            view[inside_blob] = 1 if contrast < 0 else 2
