"""The volume sheet: which volumes to process, where their data is, and their role.

A tab-separated file with a header row. Columns:

* ``name`` (required): unique volume name, used in every output path.
* ``raw`` (required): the raw image: an OME-NGFF 0.4/0.5 multiscale group (e.g.
  ``data/vol.zarr/raw``), a plain Zarr or N5 array (``data/vol.n5/raw/s0``) or an HDF5
  dataset (``data/vol.h5:/raw``). Relative paths are relative to the working directory.
* ``labels`` (optional, may be empty): instance labels, in any of the same forms. Labels
  may cover only part of the raw (a crop); the processed region is where they are.
* ``role`` (required): ``train``, ``validate`` or ``predict``.
* ``roi`` (optional, may be empty): region of interest in nm, ``z0:z1,y0:y1,x0:x1``.
* ``voxel_size``, ``offset`` (optional): for a *plain* raw array (Zarr, N5, HDF5), which
  carries no geometry: nm per voxel and the position in nm of the *corner* of voxel
  (0, 0, 0) (where the array begins; NGFF's translation is the voxel *centre*, i.e.
  ``offset + voxel_size / 2``), each ``z,y,x``. ``voxel_size`` is required for plain
  arrays, ``offset`` defaults to ``0,0,0``; both must be empty for OME-NGFF groups.
* ``labels_voxel_size``, ``labels_offset`` (optional): the same for a plain labels
  array; default: the raw's ``voxel_size`` / ``offset``.
* ``distributed`` (optional, may be empty): ``true`` or ``false``: whether the volume is
  predicted as many part jobs (``true``) or as one part (``false``) when
  ``predict.distributed`` is set, whatever its size; empty: by size
  (``predict.distributed.min_voxels``). ``true`` needs ``predict.distributed`` set.
"""

from __future__ import annotations

import csv
import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dinopipe.inputs import child_images

ROLES = ("train", "validate", "predict")
COLUMNS = ("name", "raw", "labels", "role", "roi", "voxel_size", "offset", "labels_voxel_size", "labels_offset",
           "distributed")
#: Optional geometry columns (plain arrays only); omitted from records when empty.
GEOMETRY_COLUMNS = ("voxel_size", "offset", "labels_voxel_size", "labels_offset")
REQUIRED = ("name", "raw", "role")
#: Values of the ``distributed`` column (case-insensitive); empty: decided by size.
FLAGS = {"true": True, "false": False}
#: Names that would collide with other outputs (``results/report/loss_curve.png`` is the
#: loss curve, not a volume's figure).
RESERVED_NAMES = ("loss_curve",)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Volume:
    """One row of the volume sheet.

    Attributes:
        name: Unique name (letters, digits, '_', '.', '-').
        raw: Path of the raw image group.
        labels: Path of the label image group, or None.
        role: "train", "validate" or "predict"; None in a job that does not use it
            (features and targets are computed alike for every role).
        roi: ((z0, z1), (y0, y1), (x0, x1)) in nm, or None for everything.
        voxel_size: nm per voxel (z, y, x) of a plain raw array, else None.
        offset: Corner of raw voxel (0, 0, 0) in nm (z, y, x) for a plain array, else None.
        labels_voxel_size: As ``voxel_size``, for a plain labels array (None: the raw's).
        labels_offset: As ``offset``, for a plain labels array (None: the raw's).
        distributed: Predicted as many part jobs (True) or one (False) under
            ``predict.distributed``; None: by size (``min_voxels``).
    """

    name: str
    raw: str
    labels: str | None
    role: str | None
    roi: tuple[tuple[float, float], tuple[float, float], tuple[float, float]] | None = None
    voxel_size: tuple[float, float, float] | None = None
    offset: tuple[float, float, float] | None = None
    labels_voxel_size: tuple[float, float, float] | None = None
    labels_offset: tuple[float, float, float] | None = None
    distributed: bool | None = None

    def to_record(self) -> dict[str, Any]:
        """A JSON-able dict (a Snakemake param); empty geometry and ``distributed`` columns
        are left out, so sheets without them give the same record as before they existed."""
        rec: dict[str, Any] = {"name": self.name, "raw": self.raw, "labels": self.labels, "role": self.role,
                               "roi": [list(b) for b in self.roi] if self.roi else None}
        for col in GEOMETRY_COLUMNS:
            value = getattr(self, col)
            if value is not None:
                rec[col] = list(value)
        if self.distributed is not None:
            rec["distributed"] = self.distributed
        return rec

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Volume:
        """Inverse of :meth:`to_record`."""
        roi = record.get("roi")
        geometry = {c: tuple(float(v) for v in record[c]) for c in GEOMETRY_COLUMNS if record.get(c) is not None}
        return cls(
            name=record["name"], raw=record["raw"], labels=record.get("labels") or None, role=record.get("role"),
            roi=tuple(tuple(float(v) for v in b) for b in roi) if roi else None,  # type: ignore[arg-type]
            distributed=record.get("distributed"), **geometry,  # type: ignore[arg-type]
        )


def parse_roi(text: str, where: str) -> tuple[tuple[float, float], ...] | None:
    """Parse ``z0:z1,y0:y1,x0:x1`` (nm) into ((z0, z1), (y0, y1), (x0, x1))."""
    text = text.strip()
    if not text:
        return None
    parts = text.split(",")
    try:
        bounds = tuple(tuple(float(v) for v in p.split(":")) for p in parts)
    except ValueError:
        bounds = ()
    if len(bounds) != 3 or any(len(b) != 2 or b[1] <= b[0] for b in bounds):
        raise ValueError(f"{where}: roi {text!r} is not 'z0:z1,y0:y1,x0:x1' in nm with z0 < z1 etc.")
    return bounds  # type: ignore[return-value]


def parse_vec3(text: str, where: str, column: str, *, positive: bool) -> tuple[float, float, float] | None:
    """Parse ``z,y,x`` (nm) into three floats; empty -> None."""
    text = text.strip()
    if not text:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(np.isfinite(values)) or (positive and min(values) <= 0):
        kind = "three positive numbers" if positive else "three numbers"
        raise ValueError(f"{where}: {column} {text!r} is not 'z,y,x' in nm ({kind})")
    return values  # type: ignore[return-value]


def parse_flag(text: str, where: str, column: str) -> bool | None:
    """Parse ``true`` / ``false`` (any case); empty -> None."""
    text = text.strip()
    if not text:
        return None
    if text.lower() not in FLAGS:
        raise ValueError(f"{where}: column {column!r} is {text!r}; allowed: true, false, or empty (decided by "
                         f"predict.distributed.min_voxels)")
    return FLAGS[text.lower()]


def read_sheet(path: str | Path) -> list[Volume]:
    """Read and validate the volume sheet.

    Raises:
        FileNotFoundError: The sheet does not exist.
        ValueError: Unknown or missing columns, a duplicate or malformed name, an
            unknown role, or a bad ROI; the message names the row and column.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"volume sheet not found: {path}")
    # utf-8-sig: a byte-order mark (as spreadsheet programs write) is not part of the first column's name
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f, delimiter="\t") if r and not r[0].startswith("#")]
    if not rows:
        raise ValueError(f"{path}: the volume sheet is empty")
    header = [h.strip() for h in rows[0]]
    unknown = [h for h in header if h not in COLUMNS]
    if unknown:
        raise ValueError(f"{path}: unknown column(s) {unknown}; allowed: {list(COLUMNS)}")
    duplicated = sorted({h for h in header if header.count(h) > 1})
    if duplicated:
        raise ValueError(f"{path}: column(s) {duplicated} appear more than once in the header")
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise ValueError(f"{path}: missing required column(s) {missing}")
    volumes: list[Volume] = []
    seen: set[str] = set()
    for lineno, row in enumerate(rows[1:], start=2):
        where = f"{path} line {lineno}"
        if len(row) > len(header):
            raise ValueError(f"{where}: {len(row)} fields but the header has {len(header)}")
        rec = {h: (row[i].strip() if i < len(row) else "") for i, h in enumerate(header)}
        for col in REQUIRED:
            if not rec.get(col):
                raise ValueError(f"{where}: column {col!r} is empty")
        name = rec["name"]
        if not _NAME.match(name):
            raise ValueError(f"{where}: volume name {name!r} may only contain letters, digits, '_', '.', '-'")
        if name in RESERVED_NAMES:
            raise ValueError(f"{where}: volume name {name!r} is reserved (results/report/{name}.png is another "
                             f"output); choose another name")
        if name in seen:
            raise ValueError(f"{where}: duplicate volume name {name!r}")
        seen.add(name)
        if rec["role"] not in ROLES:
            raise ValueError(f"{where}: volume {name!r} has role {rec['role']!r}; allowed: {list(ROLES)}")
        vwhere = f"{where} (volume {name!r})"
        labels = rec.get("labels") or None
        if labels is None and (rec.get("labels_voxel_size") or rec.get("labels_offset")):
            raise ValueError(f"{vwhere}: labels_voxel_size / labels_offset given but no labels")
        volumes.append(
            Volume(
                name=name,
                raw=rec["raw"],
                labels=labels,
                role=rec["role"],
                roi=parse_roi(rec.get("roi", ""), vwhere),  # type: ignore[arg-type]
                **{c: parse_vec3(rec.get(c, ""), vwhere, c, positive=c.endswith("voxel_size"))  # type: ignore[arg-type]
                   for c in GEOMETRY_COLUMNS},
                distributed=parse_flag(rec.get("distributed", ""), vwhere, "distributed"),
            )
        )
    if not volumes:
        raise ValueError(f"{path}: the volume sheet has a header but no volumes")
    return volumes


def by_role(volumes: Sequence[Volume], *roles: str) -> list[Volume]:
    """The volumes whose role is one of ``roles``."""
    return [v for v in volumes if v.role in roles]


def lookup(volumes: Mapping[str, Volume], name: str, sheet: str | Path, *, shown: int = 5) -> Volume:
    """The sheet row named ``name`` (e.g. a Snakemake ``{volume}`` wildcard).

    Raises:
        ValueError: ``name`` is not in the sheet; the message names the volume, the sheet
            (config key ``volumes``), the closest names and the first ``shown`` names.
    """
    volume = volumes.get(name)
    if volume is not None:
        return volume
    close = difflib.get_close_matches(name, list(volumes), n=3)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    first = sorted(volumes)[:shown]
    more = f", ... ({len(volumes)} in all)" if len(volumes) > shown else ""
    raise ValueError(
        f"volume {name!r} is not in the volume sheet {sheet} (config key 'volumes'); {hint}"
        f"known volumes: {', '.join(first)}{more}"
    )


def _natural_key(name: str) -> list[Any]:
    """Sort key putting crop2 before crop10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def cellmap_crops(crops_dir: str | Path) -> list[str]:
    """The crops of a CellMap-style tree: the groups directly inside ``crops_dir`` that hold
    at least one OME-NGFF image (one per class, e.g. ``groundtruth/crop1/{mito,er}``),
    in natural order (crop2 before crop10).

    Raises:
        FileNotFoundError: ``crops_dir`` does not exist.
        ValueError: It holds no crop.
    """
    folder = Path(crops_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"crops folder not found: {folder}")
    crops = [c.name for c in folder.iterdir() if c.is_dir() and child_images(str(c))]
    if not crops:
        raise ValueError(f"{folder}: no crop found (a crop is a group holding one OME-NGFF image per class)")
    return sorted(crops, key=_natural_key)


def assign_roles(
    names: Sequence[str], *, validate: Sequence[str] = (), predict: Sequence[str] = (),
    validate_fraction: float = 0.0, predict_fraction: float = 0.0, seed: int = 0,
) -> dict[str, str]:
    """The role of each crop: by name (``validate``, ``predict``; the others train), or, for
    crops not named, a seeded random split: ``round(fraction * n)`` of them validate or predict.

    Raises:
        ValueError: A named crop that does not exist, a crop named for two roles, fractions
            outside [0, 1] or summing above 1, or no crop left to train on.
    """
    known = set(names)
    for role, chosen in (("validate", validate), ("predict", predict)):
        unknown = [c for c in chosen if c not in known]
        if unknown:
            raise ValueError(f"--{role} names crop(s) {unknown} that are not in the tree; crops: {list(names)}")
    both = sorted(set(validate) & set(predict))
    if both:
        raise ValueError(f"crop(s) {both} are named for both validate and predict")
    if not (0 <= validate_fraction <= 1 and 0 <= predict_fraction <= 1 and validate_fraction + predict_fraction <= 1):
        raise ValueError(f"fractions must lie in [0, 1] and sum to at most 1, got validate {validate_fraction}, "
                         f"predict {predict_fraction}")
    roles = {n: "validate" for n in validate} | {n: "predict" for n in predict}
    rest = [n for n in names if n not in roles]
    order = [rest[i] for i in np.random.default_rng(seed).permutation(len(rest))]
    n_val, n_pred = round(validate_fraction * len(rest)), round(predict_fraction * len(rest))
    roles.update({n: "validate" for n in order[:n_val]})
    roles.update({n: "predict" for n in order[n_val : n_val + n_pred]})
    roles.update({n: "train" for n in order[n_val + n_pred :]})
    if "train" not in roles.values():
        raise ValueError(f"no crop is left to train on ({len(names)} crops); name fewer validate / predict crops "
                         f"or lower the fractions")
    return {n: roles[n] for n in names}


def write_sheet(volumes: Sequence[Volume], path: str | Path) -> None:
    """Write a volume sheet (name, raw, labels, role, roi; the geometry columns are not
    written). The result reads back with :func:`read_sheet`."""
    rows = ["\t".join(("name", "raw", "labels", "role", "roi"))]
    for v in volumes:
        if v.roi is not None:
            roi = ",".join(f"{a:g}:{b:g}" for a, b in v.roi)
        else:
            roi = ""
        rows.append("\t".join((v.name, v.raw, v.labels or "", v.role, roi)))
    Path(path).write_text("\n".join(rows) + "\n")


def cellmap_sheet(
    raw: str, crops_dir: str | Path, prefix: str = "", **roles: Any,
) -> list[Volume]:
    """One sheet row per crop of a CellMap-style tree: ``name`` = ``prefix`` + crop name, the
    dataset's ``raw`` image, ``labels`` = the crop group (one image per class; the classes come
    from ``targets.classes`` with an ``array`` each) and a role from :func:`assign_roles`
    (keyword arguments ``validate``, ``predict``, ``validate_fraction``, ``predict_fraction``,
    ``seed``)."""
    crops = cellmap_crops(crops_dir)
    assigned = assign_roles(crops, **roles)
    volumes = [Volume(f"{prefix}{c}", raw, str(Path(crops_dir) / c), assigned[c]) for c in crops]
    bad = [v.name for v in volumes if not _NAME.match(v.name)]
    if bad:
        raise ValueError(f"volume names {bad} may only contain letters, digits, '_', '.', '-' (check --prefix)")
    return volumes
