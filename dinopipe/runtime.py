"""What a job runs on: its CPU allotment, its torch device, its mixed precision, its memory.

The one place for runtime decisions every stage shares: how many threads (from LSF or SLURM),
which device a config string names, what ``autocast`` means, returning freed memory, and the
garbage collector of a process that runs one job.
torch is imported only inside the functions that need it, so the config checks that run when
Snakemake parses the workflow can use the same vocabulary without loading torch.

A job submitted with ``bsub -n 8`` (or ``sbatch --cpus-per-task=8``) is allotted 8 slots, but
unless the site binds jobs to cores, ``os.cpu_count()`` still reports the whole node, and a
library that sizes its thread pool from it oversubscribes the node. :func:`allotted_cpus` is the
one place that decides how many threads a stage uses.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import gc
import os
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: Environment variables holding the job's CPU allotment, in order of preference.
ALLOTMENT_VARIABLES = ("LSB_DJOB_NUMPROC", "SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE")


def _affinity_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def batch_allotment(environ: Mapping[str, str] | None = None) -> int | None:
    """The CPUs (slots) the batch system allotted to this job, or None outside a batch job.

    Reads ``LSB_DJOB_NUMPROC`` (LSF), else ``SLURM_CPUS_PER_TASK``, else ``SLURM_CPUS_ON_NODE``
    (SLURM).

    Raises:
        ValueError: if the variable is set but is not a positive integer (names it and its value).
    """
    env = os.environ if environ is None else environ
    for name in ALLOTMENT_VARIABLES:
        value = env.get(name, "").strip()
        if not value:
            continue
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"environment variable {name}={value!r}: expected a positive integer")
        return int(value)
    return None


def allotted_cpus(requested: int | None = None, environ: Mapping[str, str] | None = None) -> int:
    """How many CPU threads this process should use.

    The smallest of ``requested`` (e.g. Snakemake's ``threads`` for the job), the batch
    system's allotment (:func:`batch_allotment`) and the CPUs this process may run on
    (``os.sched_getaffinity``, which core binding by LSF or SLURM narrows). Whatever is unknown
    is left out; the result is at least 1.

    Args:
        requested: Threads asked for, or None for "as many as allowed".
        environ: Environment to read instead of ``os.environ`` (for tests).

    Raises:
        ValueError: if ``requested`` is not a positive integer, or an allotment variable is
            malformed.
    """
    if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int)
                                  or requested < 1):
        raise ValueError(f"requested threads must be a positive integer or None, got {requested!r}")
    limits = [_affinity_cpus()]
    allotment = batch_allotment(environ)
    if allotment is not None:
        limits.append(allotment)
    if requested is not None:
        limits.append(requested)
    return max(1, min(limits))


# --------------------------------------------------------------------------- device

#: The device names every stage accepts (``features``, ``train`` and ``predict`` ``device`` keys).
DEVICE_HELP = "'auto', 'cpu', 'cuda' or 'cuda:N'"  # auto: CUDA when available, else CPU
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def is_device_name(device: object) -> bool:
    """Whether ``device`` is a device name the stages accept (see :data:`DEVICE_HELP`)."""
    return isinstance(device, str) and bool(_DEVICE.match(device))


def resolve_device(device: "str | torch.device", key: str = "device") -> "torch.device":
    """The torch device a config string names.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``.
        key: The config key the value came from, named in errors (e.g. ``"train.device"``).

    Raises:
        ValueError: an unknown name, or CUDA requested where it is not available.
    """
    import torch  # heavy: not at import time (the parse-time checks use this module)

    if isinstance(device, torch.device):
        return device
    if not is_device_name(device):
        raise ValueError(f"{key} is {device!r}; allowed: {DEVICE_HELP}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{key} is {device!r} but CUDA is not available here; use 'auto' or 'cpu'")
    return torch.device(device)


# --------------------------------------------------------------------------- precision

#: Mixed-precision modes on CUDA (CPU always runs float32). ``true`` / ``false`` in older
#: configs mean ``"bf16"`` / ``"none"``.
AUTOCAST = ("bf16", "fp16", "none")


def autocast_mode(mode: bool | str, key: str = "autocast") -> str:
    """The canonical autocast mode (one of :data:`AUTOCAST`) for a config value.

    Raises:
        ValueError: a value that is neither a mode nor a boolean, naming ``key``.
    """
    if mode is True or mode is False:
        return "bf16" if mode else "none"
    if mode not in AUTOCAST:
        raise ValueError(f"{key} is {mode!r}; allowed: {list(AUTOCAST)} (or true/false for bf16/none)")
    return str(mode)


def compute_precision(device: "torch.device", mode: bool | str) -> str:
    """The precision a forward pass under :func:`autocast_context` computes in.

    "bf16" or "fp16" on CUDA with that autocast mode, else "fp32" (CPU always runs float32).
    """
    mode = autocast_mode(mode)
    return mode if device.type == "cuda" and mode != "none" else "fp32"


def autocast_context(device: "torch.device", mode: bool | str) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision for a forward pass: bf16 or fp16 autocast on CUDA; a no-op on CPU or for "none"."""
    import torch  # heavy: see resolve_device

    precision = compute_precision(device, mode)
    if precision != "fp32":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- memory


def _libc_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to call
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def release_freed_memory() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    glibc keeps freed blocks below its (adaptive, up to 32 MB) mmap threshold in the heap, and
    a network's intermediate tensors are such blocks: without trimming, the resident memory of a
    blockwise loop creeps up over the first blocks. Takes ~10 ms.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _status_mb(field: str) -> float:
    """A memory field (kB) of ``/proc/self/status`` in MB; NaN where ``/proc`` is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def resident_mb() -> float:
    """This process's resident set size now (``VmRSS``), in MB; NaN where ``/proc`` is missing."""
    return _status_mb("VmRSS")


def peak_resident_mb() -> float:
    """This process's peak resident set size since it started (``VmHWM``), in MB; NaN where
    ``/proc`` is missing.

    Not ``getrusage``'s ``ru_maxrss``: Linux carries a process's high-water mark over
    ``exec``, so a job started by a large process (Snakemake, a benchmark holding arrays;
    Python's ``subprocess`` forks with ``vfork``) reports at least that process's peak.
    """
    return _status_mb("VmHWM")


# --------------------------------------------------------------------------- garbage collection

#: CPython's collector thresholds in a process that runs one job (its defaults: 700, 10, 10).
JOB_GC_THRESHOLDS = (50_000, 20, 20)
_job_gc = False


def one_job_gc() -> None:
    """Set CPython's cyclic garbage collector up for a process that runs one job, then exits.

    For the workflow scripts (each one cluster job) only; tests, notebooks and other long-lived
    processes keep the defaults.

    Importing torch and transformers leaves ~370,000 long-lived objects that CPython's
    collector tracks, and it traverses all of them at every full collection while the imports
    run and again in the collections of the interpreter's shutdown: about 1.5 of the ~5
    CPU-seconds a one-block prediction job took (profiled with ``perf``; see
    docs/distributed.md, "Where a part job's CPU goes"), a fixed cost that
    each of the many part jobs of a distributed prediction pays. Here the young generation is
    collected every 50,000 allocations instead of every 700 (:data:`JOB_GC_THRESHOLDS`: cyclic
    garbage is still collected, later and in bigger batches), and at exit what is still alive
    is frozen (``gc.freeze``) so that the shutdown's collections skip it; the operating system
    takes the process's memory back anyway. Results do not change. Calling it again does nothing.
    """
    global _job_gc
    if _job_gc:
        return
    _job_gc = True
    gc.set_threshold(*JOB_GC_THRESHOLDS)
    atexit.register(gc.freeze)  # atexit runs before the shutdown's collections
