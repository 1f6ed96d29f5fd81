"""Atomic outputs: a killed job never leaves an output that looks complete.

Outputs are written under a temporary name beside the final path and renamed into place when
complete. Write faults (disk full, quota, read-only file system) become errors that name the output,
the volume and the space needed (:func:`atomic_output`). Also: JSON files written the same
way (:func:`write_json`), store ids (:func:`new_store_id`), sizes on disk.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def move_into_place(done: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Rename a finished output (file or directory) to ``final``, replacing what is there."""
    _remove(Path(final))
    os.replace(done, final)


#: Free space (bytes) below which a failed write is reported as a full disk, whatever the
#: writer raised (torch.save says "unexpected pos", zarr may wrap the OSError).
NEARLY_FULL_BYTES = 1 << 20


def _bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _write_fault(exc: BaseException, final: Path, tmp: Path, what: str | None, expected_bytes: int | None) -> OSError | None:
    """A readable error for a write that failed for lack of space or an I/O error (None
    for any other failure): names the output, what it is and the space involved."""
    code = exc.errno if isinstance(exc, OSError) else None
    try:
        free = shutil.disk_usage(final.parent).free
    except OSError:
        free = None
    full = code in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < NEARLY_FULL_BYTES)
    if not full and code not in (errno.EIO, errno.EROFS):
        return None
    try:
        written = directory_size(tmp) if tmp.exists() else 0
    except OSError:
        written = 0
    label = f"{what} ({final})" if what else str(final)
    if full:
        need = (f"about {_bytes(expected_bytes)} needed for the whole output" if expected_bytes
                else "the whole output needs more")
        message = (f"{label}: no space left on the device holding {final.parent} ({_bytes(written)} written before "
                   f"the failure, {_bytes(free) if free is not None else 'unknown'} free, {need}); nothing was left "
                   f"at {final}. Free space or point the workflow at a larger disk, then rerun. ({type(exc).__name__}: "
                   f"{exc})")
        return OSError(errno.ENOSPC, message)
    return OSError(code, f"{label}: I/O error while writing under {final.parent} ({type(exc).__name__}: {exc}); "
                         f"nothing was left at {final}")


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike[str], *, what: str | None = None, expected_bytes: int | None = None
) -> Iterator[Path]:
    """Yield a temporary path to write into; move it to ``path`` only on success.

    An existing output at ``path`` is replaced. On any exception the temporary
    output is removed and ``path`` is left as it was, so a failed or killed job
    never leaves an output that looks complete (a SIGKILL leaves only a hidden
    ``.NAME.tmp-*`` sibling, which the next write of ``path`` removes). A full disk
    (ENOSPC, a quota, or any failure with less than :data:`NEARLY_FULL_BYTES` free) or an
    I/O error becomes an ``OSError`` naming the output, ``what`` and the space involved.

    Args:
        path: Final path of the output (a directory store or a file).
        what: What the output is, for error messages (e.g. "features of volume 'v'").
        expected_bytes: Roughly how large the output will be, for error messages.
    """
    final = Path(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PermissionError(f"cannot create the output folder {final.parent} for {final}: {exc}") from exc
    if not os.access(final.parent, os.W_OK):
        raise PermissionError(f"output folder is not writable: {final.parent}")
    for stale in final.parent.glob(f".{glob_escape(final.name)}.tmp-*"):
        # left by a killed job: the output path belongs to this job now
        logger.info("removing stale temporary output %s", stale)
        _remove(stale)
    tmp = _tmp_sibling(final)
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"nothing was written for {final}")
        move_into_place(tmp, final)
    except Exception as exc:
        fault = _write_fault(exc, final, tmp, what, expected_bytes)
        _remove(tmp)
        if fault is not None:
            raise fault from exc
        raise
    except BaseException:
        _remove(tmp)
        raise


def new_store_id() -> str:
    """A fresh identity for a store being written (its ``store_id`` attribute): it
    changes whenever the store is rewritten, so whatever was derived from the old content
    (a training run to resume) can tell (see :meth:`dinopipe.loader.VolumeStores.identity`)."""
    return uuid.uuid4().hex


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters escaped."""
    return glob.escape(name)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n")


def json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in JSON")



def directory_size(path: str | os.PathLike[str]) -> int:
    """Total size in bytes of the files under ``path`` (or of the file itself)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def remove_partial_writes(store: str | os.PathLike[str]) -> int:
    """Delete the files that killed writers left in a store, before it is moved into place.

    zarr-python writes each chunk to ``{chunk}.{uuid}.partial`` beside it and renames it when
    complete, so a job killed mid-write leaves that file (never half a chunk under the chunk's
    name); the rerun writes the chunk under a new temporary name. Returns how many were removed.
    """
    leftovers = list(Path(store).rglob("*.partial"))
    for path in leftovers:
        path.unlink(missing_ok=True)
    if leftovers:
        logger.info("%s: removed %d partial chunk files left by killed writers (e.g. %s)", store, len(leftovers),
                    leftovers[0])
    return len(leftovers)
