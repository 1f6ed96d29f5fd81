"""Figures for the Snakemake report: example slices per predicted volume.

Panels are composed from arrays with Pillow (raw, affinities, labels side by side). The loss
curve figure is :func:`dinopipe.curves.plot_curve_file`.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import zarr
from PIL import Image

from dinopipe import io
from dinopipe.geometry import Geometry
from dinopipe.sources import RawOnGridReader, open_sources, source_args

logger = logging.getLogger(__name__)

_PANEL = 256  # minimum panel side in pixels (small volumes are upscaled, nearest neighbour)


def _to_uint8(a: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(a, dtype=np.float32) * 255), 0, 255).astype(np.uint8)


def label_colours(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """A fixed random RGB colour per label id (0 black), (y, x, 3) uint8."""
    ids, inverse = np.unique(labels, return_inverse=True)
    rng = np.random.default_rng(seed)
    palette = rng.integers(40, 256, size=(len(ids), 3), dtype=np.uint8)
    palette[ids == 0] = 0
    return palette[inverse.reshape(labels.shape)]


#: Colours of classes 1, 2, ... in class figures (class 0, background, is not drawn).
CLASS_COLOURS = np.array([(0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180),
                          (245, 130, 48), (70, 240, 240), (240, 50, 230)], dtype=np.uint8)


def class_colours(classes: np.ndarray) -> np.ndarray:
    """:data:`CLASS_COLOURS` of a class image (classes beyond the table repeat it), (y, x, 3) uint8."""
    index = np.where(classes > 0, (classes.astype(np.int64) - 1) % (len(CLASS_COLOURS) - 1) + 1, 0)
    return CLASS_COLOURS[index]


def slice_panels(raw: np.ndarray, affinities: np.ndarray, labels: np.ndarray | None, alpha: float = 0.45,
                 classes: bool = False) -> Image.Image:
    """Raw | predicted affinities | segmentation overlay, side by side, for one (y, x) slice.

    Args:
        raw: (y, x) floats in [0, 1].
        affinities: (c, y, x) floats in [0, 1]; the first three channels (z, y, x
            neighbours, or the probabilities of classes 1-3) are shown as RGB, or their
            mean when fewer.
        labels: (y, x) integer labels or None (panel omitted).
        alpha: Opacity of the label colours over the raw.
        classes: ``labels`` are class ids: fixed colours per class (:data:`CLASS_COLOURS`).
    """
    grey = np.repeat(_to_uint8(raw)[..., None], 3, axis=-1)
    if affinities.shape[0] >= 3:
        aff = _to_uint8(np.moveaxis(affinities[:3], 0, -1))
    else:
        aff = np.repeat(_to_uint8(affinities.mean(axis=0))[..., None], 3, axis=-1)
    panels = [grey, aff]
    if labels is not None:
        colours = (class_colours(labels) if classes else label_colours(labels)).astype(np.float32)
        overlay = np.where(labels[..., None] > 0, (1 - alpha) * grey + alpha * colours, grey)
        panels.append(np.clip(overlay, 0, 255).astype(np.uint8))
    h, w = raw.shape
    scale = max(1, math.ceil(_PANEL / max(h, w)))
    gap = 4
    canvas = Image.new("RGB", (len(panels) * (w * scale + gap) - gap, h * scale), "white")
    for i, p in enumerate(panels):
        img = Image.fromarray(p).resize((w * scale, h * scale), Image.NEAREST)
        canvas.paste(img, (i * (w * scale + gap), 0))
    return canvas


def write_slices(
    raw: np.ndarray, predictions_path: str | os.PathLike[str], segmentation_path: str | os.PathLike[str] | None,
    out_png: str | os.PathLike[str], z: int | None = None,
) -> int:
    """Write the example slice figure of one volume (the middle z slice by default).

    For a class model (``classes`` in the predictions): raw | probabilities of classes 1-3
    as RGB | the class image over the raw in :data:`CLASS_COLOURS`. Overlapping classes:
    probabilities of classes 0-2, and each voxel coloured by the last listed class it is in.

    Args:
        raw: (z, y, x) raw in [0, 1] on the label grid, or a callable ``z -> (y, x)``.
        predictions_path: Prediction store (``affinities`` or ``classes`` image inside).
        segmentation_path: Segmentation image, or None.
        out_png: Output PNG (written atomically).
        z: Slice index; default the middle one.

    Returns:
        The slice index shown.
    """
    classes = (Path(predictions_path) / "classes").exists()
    affs = io.read_image(Path(predictions_path) / ("classes" if classes else "affinities"))
    depth = affs.geometry.shape[0]
    z = depth // 2 if z is None else int(z)
    if not 0 <= z < depth:
        raise ValueError(f"slice z={z} outside the volume's {depth} slices ({predictions_path})")
    raw_slice = raw(z) if callable(raw) else np.asarray(raw[z])
    aff_slice = np.asarray(affs.array[:, z])
    overlap = classes and bool(zarr.open_group(str(predictions_path), mode="r").attrs.get("dinopipe", {}).get(
        "classes_overlap"))
    if classes:  # the foreground classes' probabilities (background left out), three at most
        fg = aff_slice[0:3] if overlap else aff_slice[1:4]
        aff_slice = np.concatenate([fg, np.zeros((3 - len(fg), *fg.shape[1:]), fg.dtype)]) if len(fg) > 1 else fg
    labels = None
    if segmentation_path:
        seg = io.read_image(segmentation_path)
        if seg.channel_axis:  # overlapping classes, (C, z, y, x) 0/1: the last listed class on top
            masks = np.asarray(seg.array[:, z])
            labels = np.max(masks.astype(np.uint16) * np.arange(1, len(masks) + 1, dtype=np.uint16)[:, None, None],
                            axis=0).astype(np.uint8)
        else:
            labels = np.asarray(seg.array[z])
    figure = slice_panels(raw_slice, aff_slice, labels, classes=classes)
    with io.atomic_output(out_png) as tmp:
        figure.save(tmp, format="PNG")
    return z


def raw_slice_reader(volume: object, data: dict | None, grid: Geometry) -> object:
    """A callable ``z -> (y, x)`` raw slice on ``grid`` (0..1), read from the volume's raw."""
    src = open_sources(volume, **source_args(data))  # type: ignore[arg-type]
    reader = RawOnGridReader(src.raw.array, src.raw.geometry, src.grid)
    if src.grid.shape != grid.shape:
        raise ValueError(f"volume {volume.name!r}: output grid {src.grid.shape} differs from the prediction's {grid.shape}")  # type: ignore[attr-defined]

    def read(z: int) -> np.ndarray:
        return reader.read((slice(z, z + 1), slice(0, grid.shape[1]), slice(0, grid.shape[2])))[0, 0]

    return read


def run_report_slices(
    volume: object, predictions_path: str | os.PathLike[str], segmentation_path: str | os.PathLike[str] | None,
    out_png: str | os.PathLike[str], data: dict | None = None,
) -> int:
    """The report figure of one volume, with raw read from the volume's sources (see :func:`write_slices`)."""
    image = "classes" if (Path(predictions_path) / "classes").exists() else "affinities"
    grid = io.read_image(Path(predictions_path) / image).geometry
    return write_slices(raw_slice_reader(volume, data, grid), predictions_path, segmentation_path, out_png)
