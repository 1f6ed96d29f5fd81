"""The volume sheet: which volumes to process, where their data is, and their role.

A tab-separated file with a header row. Columns:

* ``name`` (required): unique volume name, used in every output path.
* ``raw`` (required): the raw image, an OME-NGFF multiscale group (e.g.
  ``data/vol.zarr/raw``). Relative paths are relative to the working directory.
* ``labels`` (optional, may be empty): instance labels, an OME-NGFF multiscale group.
* ``role`` (required): ``train``, ``validate`` or ``predict``.
* ``roi`` (optional, may be empty): region of interest in nm, ``z0:z1,y0:y1,x0:x1``.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROLES = ("train", "validate", "predict")
COLUMNS = ("name", "raw", "labels", "role", "roi")
REQUIRED = ("name", "raw", "role")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Volume:
    """One row of the volume sheet.

    Attributes:
        name: Unique name (letters, digits, '_', '.', '-').
        raw: Path of the raw image group.
        labels: Path of the label image group, or None.
        role: "train", "validate" or "predict".
        roi: ((z0, z1), (y0, y1), (x0, x1)) in nm, or None for everything.
    """

    name: str
    raw: str
    labels: str | None
    role: str
    roi: tuple[tuple[float, float], tuple[float, float], tuple[float, float]] | None = None


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
    with path.open(newline="") as f:
        rows = [r for r in csv.reader(f, delimiter="\t") if r and not r[0].startswith("#")]
    if not rows:
        raise ValueError(f"{path}: the volume sheet is empty")
    header = [h.strip() for h in rows[0]]
    unknown = [h for h in header if h not in COLUMNS]
    if unknown:
        raise ValueError(f"{path}: unknown column(s) {unknown}; allowed: {list(COLUMNS)}")
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
        if name in seen:
            raise ValueError(f"{where}: duplicate volume name {name!r}")
        seen.add(name)
        if rec["role"] not in ROLES:
            raise ValueError(f"{where}: volume {name!r} has role {rec['role']!r}; allowed: {list(ROLES)}")
        volumes.append(
            Volume(
                name=name,
                raw=rec["raw"],
                labels=rec.get("labels") or None,
                role=rec["role"],
                roi=parse_roi(rec.get("roi", ""), f"{where} (volume {name!r})"),  # type: ignore[arg-type]
            )
        )
    if not volumes:
        raise ValueError(f"{path}: the volume sheet has a header but no volumes")
    return volumes


def by_role(volumes: Sequence[Volume], *roles: str) -> list[Volume]:
    """The volumes whose role is one of ``roles``."""
    return [v for v in volumes if v.role in roles]
