"""What a batch job may use on its compute node: the CPU allotment from LSF or SLURM.

A job submitted with ``bsub -n 8`` (or ``sbatch --cpus-per-task=8``) is allotted 8 slots, but
unless the site binds jobs to cores, ``os.cpu_count()`` still reports the whole node, and a
library that sizes its thread pool from it oversubscribes the node. :func:`allotted_cpus` is the
one place that decides how many threads a stage uses.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

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
