"""Opening a volume's raw and labels, choosing scales, and the output (label) grid.

Raw and labels are OME-NGFF 0.4/0.5 multiscale groups, plain Zarr/N5 arrays or HDF5
datasets (see :func:`dinopipe.io.open_source`; plain arrays take their voxel size and
offset from the sheet). The raw scale is the finest one not finer than
``min_raw_voxel_size`` on any axis; the label scale is the finest one, or the one
matching ``label_voxel_size`` when given. The output grid is the label grid restricted
to the raw extent and the volume's ROI (labels covering only a crop of the raw set the
processed region); volumes without labels use the raw extent at ``output_voxel_size``.

Every error names the volume, what (raw / labels / roi) and the path.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dinopipe.chunks import count_chunks
from dinopipe.geometry import Geometry, centre_window, check_ratio, raw_window, slice_weights, sub_geometry
from dinopipe.inputs import child_images, open_source, source_levels, source_store
from dinopipe.ngff import Image
from dinopipe.sheet import Volume

logger = logging.getLogger(__name__)

@dataclass
class Sources:
    """A volume's opened inputs and the grid its outputs live on."""

    volume: Volume
    raw: Image
    labels: Image | None
    grid: Geometry
    #: (z, y, x) slices of the label array that cover ``grid`` (None without labels).
    label_window: tuple[slice, slice, slice] | None

    def provenance(self) -> dict[str, object]:
        """Where the inputs came from: paths, formats, chosen scales, geometry, ROI, grid."""

        def describe(image: Image | None) -> dict[str, object] | None:
            if image is None:
                return None
            return {"path": image.path, "format": image.format, "scale": image.scale, "dtype": str(image.array.dtype),
                    **image.geometry.to_dict()}

        return {"raw": describe(self.raw), "labels": describe(self.labels),
                "roi_nm": [list(b) for b in self.volume.roi] if self.volume.roi else None,
                "grid": self.grid.to_dict()}


def check_paths(volume: Volume, generated: Sequence[str] = ()) -> None:
    """Raise if the file or folder holding a volume's raw or labels does not exist
    (cheap: one ``stat`` each; run when the workflow is parsed).

    Args:
        volume: The sheet row.
        generated: Path prefixes that a workflow rule creates (skipped).
    """
    for what, path in (("raw", volume.raw), ("labels", volume.labels)):
        if not path:
            continue
        store = source_store(path)
        if any(store.startswith(prefix) for prefix in generated):
            continue
        if not Path(store).exists():
            raise FileNotFoundError(
                f"volume {volume.name!r}: {what} not found: {path} ({store} does not exist; expected an OME-NGFF "
                f"group, a Zarr/N5 array or 'file.h5:/dataset')"
            )


def choose_scale(
    path: str, levels: Sequence[tuple[str, tuple[float, float, float]]], *,
    min_voxel_size: Sequence[float] | None = None, exact: Sequence[float] | None = None, what: str,
) -> str:
    """Pick a scale of a multiscale group by voxel size (nm)."""
    if exact is not None:
        for name, vs in levels:
            if np.allclose(vs, exact):
                return name
        raise ValueError(f"{what} {path}: no scale with voxel size {list(exact)} nm; available: {levels}")
    if min_voxel_size is None:
        return levels[0][0]
    ok = [(name, vs) for name, vs in levels if all(v >= m - 1e-6 for v, m in zip(vs, min_voxel_size))]
    if not ok:
        raise ValueError(
            f"{what} {path}: every scale is finer than min_raw_voxel_size {list(min_voxel_size)} nm; "
            f"available: {levels}"
        )
    return min(ok, key=lambda item: float(np.prod(item[1])))[0]


#: Values of the config key ``data.missing_chunks``.
MISSING_CHUNKS = ("error", "fill_labels", "fill")


def check_chunks(image: Image, what: str, volume: str, policy: str = "error") -> None:
    """Refuse an input array some of whose chunks are not stored (an incomplete copy reads
    as holes of the fill value), unless ``policy`` (config key ``data.missing_chunks``)
    declares the fill value meaningful: ``"fill"`` for raw and labels, ``"fill_labels"`` for
    labels only (writers skip chunks equal to the fill value, typically background 0).
    Lists chunk files only (:func:`dinopipe.io.count_chunks`); reads no data.

    Raises:
        ValueError: Naming the volume, the array, how many chunks are missing and the key.
    """
    if policy not in MISSING_CHUNKS:
        raise ValueError(f"data.missing_chunks must be one of {list(MISSING_CHUNKS)}, got {policy!r}")
    where = f"{image.path}/{image.scale}" if image.scale else image.path
    try:
        count = count_chunks(image.path, image.scale)
    except ValueError as err:  # a shard too short for its index
        raise ValueError(f"volume {volume!r}: {what} {where}: {err}") from err
    if count.complete:
        return
    text = (f"volume {volume!r}: {what} {where}: {count.expected - count.present} of {count.expected} chunks are "
            f"not stored (first missing: {', '.join(count.missing)}); they would read as the fill value "
            f"{count.fill_value!r}")
    if policy == "fill" or (policy == "fill_labels" and what == "labels"):
        logger.warning("%s (data.missing_chunks: %s)", text, policy)
        return
    raise ValueError(
        f"{text}, a hole in the data. An incomplete copy? Copy the store again; or, if the writer skipped chunks "
        f"equal to the fill value (zarr-python 3 and tensorstore do), declare it meaningful with the config key "
        f"data.missing_chunks: {'fill_labels' if what == 'labels' else 'fill'}"
    )


def _open(
    path: str, what: str, volume: str, voxel_size: Sequence[float] | None, offset: Sequence[float] | None,
    default_voxel_size: Sequence[float] | None = None, default_offset: Sequence[float] | None = None,
    metadata_only: bool = False, **choose: object,
) -> Image:
    prefix = f"volume {volume!r}: {what}"
    try:
        fmt, levels = source_levels(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{prefix} not found: {path} ({exc})") from exc
    except ValueError as exc:
        raise ValueError(f"{prefix}: {exc}") from exc
    column = "voxel_size" if what == "raw" else "labels_voxel_size"
    if fmt.startswith("ome-ngff"):
        if voxel_size is not None or offset is not None:
            raise ValueError(
                f"{prefix} {path} is an OME-NGFF multiscale group, which states its own voxel size and offset: "
                f"leave the sheet columns {column!r} and {column.replace('voxel_size', 'offset')!r} empty"
            )
    else:
        if voxel_size is None:  # a plain labels array defaults to the raw's geometry
            voxel_size, offset = default_voxel_size, offset if offset is not None else default_offset
        if voxel_size is None:
            raise ValueError(f"{prefix} {path} is a plain {fmt} array, which carries no voxel size: give it in "
                             f"the sheet column {column!r} (nm, 'z,y,x')")
        levels = [(None, tuple(float(v) for v in voxel_size))]
    scale = choose_scale(path, levels, what=prefix, **choose)  # type: ignore[arg-type]
    try:
        image = open_source(path, scale, voxel_size=voxel_size, offset=offset, metadata_only=metadata_only)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{prefix}: {exc}") from exc
    except ValueError as exc:
        raise ValueError(f"{prefix}: {exc}") from exc
    if hasattr(image.array, "where"):  # read errors (a truncated chunk, ...) name the volume
        image.array.where = f"{prefix} {image.array.where}"
    if image.array.ndim != 3:
        where = f"{path}/{scale}" if scale else path
        raise ValueError(f"{prefix} {where} must be 3D (z, y, x), got shape {image.array.shape}")
    return image


def check_plain_labels_geometry(volume: Volume, raw: Image, labels: Image) -> None:
    """A plain labels array without ``labels_voxel_size`` takes the raw's voxel size and
    offset. That is only safe when it has the raw's shape; otherwise (labels at another
    resolution, or a crop) the assumption must be stated in the sheet.

    Raises:
        ValueError: The shapes differ and the sheet gives no ``labels_voxel_size``.
    """
    if labels.format.startswith("ome-ngff") or volume.labels_voxel_size is not None:
        return
    if tuple(labels.geometry.shape) != tuple(raw.geometry.shape):
        raise ValueError(
            f"volume {volume.name!r}: labels {volume.labels} are a plain {labels.format} array without "
            f"labels_voxel_size and their shape {list(labels.geometry.shape)} differs from the raw's "
            f"{list(raw.geometry.shape)}: taking the raw's voxel size {list(raw.geometry.voxel_size)} nm would make "
            f"them cover {_extent(labels.geometry)} of the raw's {_extent(raw.geometry)}. Give the sheet column "
            f"'labels_voxel_size' (nm, 'z,y,x'; and 'labels_offset' if they do not begin where the raw does), "
            f"even when it equals the raw's"
        )
    logger.warning("volume %s: plain labels %s have no labels_voxel_size; taking the raw's voxel size %s nm and "
                   "offset (same shape %s)", volume.name, volume.labels, list(raw.geometry.voxel_size),
                   list(raw.geometry.shape))


def check_finite(raw: Image, volume: str, grid: Geometry | None = None, slab_voxels: int = 2**24) -> None:
    """Raise if a floating-point raw image holds NaN or infinite values under ``grid``
    (default: anywhere), read in z-slabs."""
    if not np.issubdtype(raw.array.dtype, np.floating):
        return
    if grid is None:
        window = tuple(slice(0, n) for n in raw.array.shape)
    else:
        window, _ = raw_window(raw.geometry, grid)
    (z0, z1), ys, xs = ((window[0].start, window[0].stop), window[1], window[2])
    step = max(1, slab_voxels // max(1, (ys.stop - ys.start) * (xs.stop - xs.start)))
    for z in range(z0, z1, step):
        slab = np.asarray(raw.array[z : min(z + step, z1), ys, xs])
        bad = ~np.isfinite(slab)
        if bad.any():
            first = np.argwhere(bad)[0] + (z, ys.start, xs.start)
            raise ValueError(
                f"volume {volume!r}: raw {raw.path} holds {int(bad.sum())}+ NaN or infinite values (first at voxel "
                f"{first.tolist()}); raw must be finite"
            )


def _extent(geom: Geometry) -> str:
    return "[" + ", ".join(f"{a:g}:{b:g}" for a, b in zip(geom.begin_nm, geom.end_nm)) + "] nm"


def _roi_text(roi: object) -> str:
    return "none" if roi is None else ",".join(f"{a:g}:{b:g}" for a, b in roi)  # type: ignore[attr-defined]


def class_image_path(volume: Volume) -> str:
    """The labels path whose image sets a volume's label grid: the labels themselves, or, when
    they are a group of one image per class (a CellMap crop, ``crop1/{mito,er}``; see
    :mod:`dinopipe.classes`), its first class image (all of them must share its grid)."""
    assert volume.labels
    children = child_images(volume.labels)
    if not children:
        return volume.labels
    return f"{volume.labels.rstrip('/')}/{children[0]}"


def open_class_array(volume: Volume, array: str, grid_image: Image, window: Sequence[slice],
                     label_voxel_size: Sequence[float] | None = None) -> np.ndarray | None:
    """Read one class's array of a labels group (a CellMap crop) over ``window`` of the label
    grid; None when the group has no such array (the class is not annotated in this crop).

    Raises:
        ValueError: Its scale's geometry differs from ``grid_image``'s (the first class image).
    """
    assert volume.labels
    path = f"{volume.labels.rstrip('/')}/{array}"
    if not Path(path).exists():
        return None
    image = _open(path, f"labels (class array {array!r})", volume.name, None, None,
                  exact=label_voxel_size if label_voxel_size is not None else grid_image.geometry.voxel_size)
    if image.geometry != grid_image.geometry:
        raise ValueError(f"volume {volume.name!r}: class array {path} has geometry {image.geometry}, but the "
                         f"labels group's first class image has {grid_image.geometry}; class arrays of one crop "
                         f"must share one grid")
    return np.asarray(image.array[tuple(window)])


def open_sources(
    volume: Volume,
    *,
    min_raw_voxel_size: Sequence[float] | None = None,
    label_voxel_size: Sequence[float] | None = None,
    output_voxel_size: Sequence[float] | None = None,
    missing_chunks: str = "error",
    metadata_only: bool = False,
    check_data: bool = True,
) -> Sources:
    """Open raw and labels of ``volume`` and compute its output grid.

    Args:
        volume: The sheet row.
        min_raw_voxel_size: Finest raw voxel size (nm) to use; None: the finest scale.
        label_voxel_size: Label scale to use (nm); None: the finest.
        output_voxel_size: Output voxel size (nm) for volumes without labels; None:
            the raw voxel size.
        missing_chunks: ``data.missing_chunks``: whether chunks that are not stored are an
            error (``"error"``) or read as the fill value (``"fill_labels"``: in labels only;
            ``"fill"``); see :func:`check_chunks`.
        metadata_only: Open the arrays from their metadata files alone and skip the
            checks that list chunks or read data (the workflow's start-up checks, see
            :mod:`dinopipe.checks`): everything else (formats, scales, dtypes, geometry,
            overlap, ROI, grid) is checked the same way.
        check_data: False skips the checks that list chunks or read data but opens the
            arrays readable: for the many jobs of a distributed prediction, whose first
            job checked the volume (each check costs a pass over the whole volume).
    """
    raw = _open(volume.raw, "raw", volume.name, volume.voxel_size, volume.offset, metadata_only=metadata_only,
                min_voxel_size=min_raw_voxel_size)
    if not np.issubdtype(raw.array.dtype, np.number) or np.issubdtype(raw.array.dtype, np.complexfloating):
        raise ValueError(f"volume {volume.name!r}: raw {volume.raw} has dtype {raw.array.dtype}; expected integers "
                         f"or floats")
    labels = None
    rg = raw.geometry
    lo, hi = rg.begin_nm.copy(), rg.end_nm.copy()
    roi = np.asarray(volume.roi, dtype=float) if volume.roi is not None else None
    extents = f"raw {volume.raw} covers {_extent(rg)}"
    if volume.labels:
        labels = _open(class_image_path(volume), "labels", volume.name, volume.labels_voxel_size,
                       volume.labels_offset, volume.voxel_size, volume.offset, metadata_only=metadata_only,
                       exact=label_voxel_size)
        if not np.issubdtype(labels.array.dtype, np.integer):
            raise ValueError(
                f"volume {volume.name!r}: labels {volume.labels} must be integer (instance ids), got "
                f"{labels.array.dtype}"
            )
        lg = labels.geometry
        check_plain_labels_geometry(volume, raw, labels)
        check_ratio(rg.voxel_size, lg.voxel_size, volume.name)
        extents += f", labels {volume.labels} cover {_extent(lg)}"
        # label voxels whose whole extent lies inside the raw
        inner = centre_window(lg, rg.begin_nm + np.asarray(lg.voxel_size) / 2,
                              rg.end_nm - np.asarray(lg.voxel_size) / 2 + 1e-6)
        if min(s.stop - s.start for s in inner) < 1:
            raise ValueError(f"volume {volume.name!r}: raw and labels do not overlap: {extents} "
                             f"(no label voxel lies wholly inside the raw)")
        window = centre_window(lg, lo if roi is None else np.maximum(lo, roi[:, 0]),
                               hi if roi is None else np.minimum(hi, roi[:, 1]))
        window = tuple(slice(max(a.start, b.start), max(a.start, b.start, min(a.stop, b.stop)))
                       for a, b in zip(window, inner))
        grid = sub_geometry(lg, window)
    else:
        if roi is not None:
            lo, hi = np.maximum(lo, roi[:, 0]), np.minimum(hi, roi[:, 1])
        vs = tuple(float(v) for v in (output_voxel_size or rg.voxel_size))
        check_ratio(rg.voxel_size, vs, volume.name)
        shape = tuple(max(0, int(math.floor((h - l) / v + 1e-9))) for l, h, v in zip(lo, hi, vs))
        translation = tuple(float(l + v / 2) for l, v in zip(lo, vs))
        grid = Geometry(shape, vs, translation)  # type: ignore[arg-type]
        window = None
    if min(grid.shape) < 1:
        raise ValueError(
            f"volume {volume.name!r}: roi {_roi_text(volume.roi)} nm lies outside the data ({extents}); "
            f"no output voxel remains"
        )
    if missing_chunks not in MISSING_CHUNKS:
        raise ValueError(f"data.missing_chunks must be one of {list(MISSING_CHUNKS)}, got {missing_chunks!r}")
    if not metadata_only and check_data:
        check_chunks(raw, "raw", volume.name, missing_chunks)
        if labels is not None:
            check_chunks(labels, "labels", volume.name, missing_chunks)
        check_finite(raw, volume.name, grid)
    logger.info("volume %s: raw %s (%s, scale %s) %s, output grid %s", volume.name, volume.raw, raw.format,
                raw.scale, rg, grid)
    return Sources(volume, raw, labels, grid, window)  # type: ignore[arg-type]


def source_args(data: Mapping[str, Any] | None) -> dict[str, Any]:
    """The keyword arguments of :func:`open_sources` from the ``data`` config section."""
    data = data or {}
    return {
        "min_raw_voxel_size": data.get("min_raw_voxel_size"),
        "label_voxel_size": data.get("label_voxel_size"),
        "output_voxel_size": data.get("output_voxel_size"),
        "missing_chunks": data.get("missing_chunks") or "error",
    }


def resample_to_grid(data: np.ndarray, src: Geometry, dst: Geometry) -> np.ndarray:
    """Area-average (or nearest, where ``src`` is coarser) a (z, y, x) array onto ``dst``.

    Uses the same slice weighting as the feature planes along each axis.
    """
    out = np.asarray(data, dtype=np.float32)
    for axis in range(3):
        contributions = slice_weights(
            src.translation[axis], src.voxel_size[axis], src.shape[axis],
            dst.translation[axis], dst.voxel_size[axis], dst.shape[axis],
        )
        matrix = np.zeros((dst.shape[axis], src.shape[axis]), dtype=np.float32)
        for j, targets in contributions:
            for i, w in targets:
                matrix[i, j] = w
        out = np.moveaxis(np.tensordot(matrix, out, axes=([1], [axis])), 0, axis)
    return out


#: Percentiles of the raw mapped to 0 and 1 for the raw input channel (``train.input_raw``) and
#: the targets' ``raw`` image.
RAW_PERCENTILES = (0.5, 99.5)


def intensity_range(raw: np.ndarray, method: str, low: float, high: float) -> tuple[float, float]:
    """Per-volume intensity range mapped to 0..1.

    ``"percentile"``: the ``low`` and ``high`` percentiles, taken on at most about a million
    voxels sampled on a regular stride (deterministic); ``"dtype"``: the integer dtype's range.
    Returns (lo, hi) with hi > lo.
    """
    if method == "dtype":
        if not np.issubdtype(raw.dtype, np.integer):
            raise ValueError(f"intensity 'dtype' needs integer raw data, got {raw.dtype}")
        info = np.iinfo(raw.dtype)
        return float(info.min), float(info.max)
    step = max(1, int(math.ceil((raw.size / 1e6) ** (1 / 3))))
    sample = np.asarray(raw[::step, ::step, ::step], dtype=np.float64)
    if not np.all(np.isfinite(sample)):
        raise ValueError("raw contains NaN or infinite values")
    lo, hi = np.percentile(sample, [low, high])
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


class RawOnGridReader:
    """One channel: raw scaled to 0..1 by the volume's :data:`RAW_PERCENTILES`, area-averaged
    onto the label grid; each window computed from only the raw voxels under it.

    The one implementation of "the raw on the label grid": the targets' ``raw`` image
    (:func:`raw_on_grid`), the raw input channel of prediction and the report's slices.

    Args:
        raw: Raw image (z, y, x), e.g. a zarr array, on ``raw_geom``.
        raw_geom, grid: Raw geometry and the label (output) grid, nm.
        intensity: The volume's (lo, hi) at :data:`RAW_PERCENTILES` when already known
            (a sampled pass over the whole volume otherwise).
    """

    channels = 1
    dtype = np.dtype(np.float32)

    def __init__(self, raw: Any, raw_geom: Geometry, grid: Geometry,
                 intensity: Sequence[float] | None = None) -> None:
        self.raw, self.raw_geom, self.grid = raw, raw_geom, grid
        if intensity is None:
            self.lo, self.hi = intensity_range(raw, "percentile", *RAW_PERCENTILES)
        else:
            self.lo, self.hi = float(intensity[0]), float(intensity[1])

    def read(self, window: Sequence[slice]) -> np.ndarray:
        """(1, z, y, x) float32 of ``window`` (label voxels)."""
        sub_out = sub_geometry(self.grid, window)
        raw_win, sub_raw = raw_window(self.raw_geom, sub_out)
        scaled = np.clip((np.asarray(self.raw[raw_win], dtype=np.float32) - self.lo) / (self.hi - self.lo), 0, 1)
        return resample_to_grid(scaled, sub_raw, sub_out)[None].astype(np.float32)

    def read_into(self, window: Sequence[slice], out: np.ndarray) -> None:
        out[...] = self.read(window)


def raw_on_grid(src: Sources) -> np.ndarray:
    """A volume's whole raw on its output grid (z, y, x) float32, 0..1 (see :class:`RawOnGridReader`)."""
    reader = RawOnGridReader(src.raw.array, src.raw.geometry, src.grid)
    return reader.read(tuple(slice(0, n) for n in src.grid.shape))[0]
