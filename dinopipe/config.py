"""Which config keys change results: the one classification behind rule params, reruns and resuming.

Every key of the configuration (``workflow/schemas/config.schema.yaml``) is one of:

* **result-changing**: another value can change an output. Rules carry these as params, so
  Snakemake reruns exactly the jobs whose result-changing settings changed, and training
  resumes only when they are unchanged (except ``train.steps``, see :data:`RESUME_FREE`).
* **runtime-only** (:data:`RUNTIME_KEYS`): how fast or where a job runs, never what it
  writes — the outputs are identical whatever the value (bitwise on CPU; tested in
  ``tests/test_rerun.py``). Jobs read them from the config, outside the params, so changing
  them reruns nothing. A key that switches between two computations with different
  results (``features.max_memory_mb`` chooses blockwise extraction, which differs from the
  whole-volume extraction for ViTs; ``segment.max_voxels`` chooses blockwise segmentation)
  is result-changing even if it reads like a memory setting, and so are ``predict.batch_size``
  (torch's CPU convolutions pick another kernel for two blocks at once than for one, and the
  affinities differ in the last bits) and ``features.batch_size`` (the backbone's forward of a
  short last batch, one slice in particular, differs in the last float32 bit from the same
  slice in a full batch; after the float16 cast this usually vanishes but not always).
* **selection** (:data:`SELECTION_KEYS`): which jobs exist (``predict.roles``,
  ``report.volume_figures``), not what a job computes; never a param.

* **optional** (:data:`OPTIONAL_KEYS`): keys that a feature added later (``targets.classes``),
  left out of the params while they hold their "off" value, so projects that do not use the
  feature keep their params and rerun nothing.

Params are canonical (:func:`canonical`): mappings with sorted keys, so moving a key to
another line of the config file reruns nothing (Snakemake compares the ``repr`` of params).
Settings a job does not use are left out of its params: the other segment methods'
parameters, the features section of a prediction from cached features.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

#: The workflow's config schema, shipped inside the package (a link to
#: ``workflow/schemas/config.schema.yaml`` in a source checkout, a copy in a wheel).
SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "config.schema.yaml"

#: Per config section, the keys that never change an output (bitwise on CPU).
RUNTIME_KEYS: Mapping[str, frozenset[str]] = {
    # a check's policy: an error, or a warning and the same output
    "data": frozenset({"missing_chunks"}),
    # shard_shape: the storage layout (files per chunk or per shard), never the values
    "features": frozenset({"device", "shard_shape"}),
    "train": frozenset({"device", "num_threads", "loader_workers", "prefetch", "resume", "tensorboard"}),
    "predict": frozenset({"device", "shard_shape"}),
    "segment": frozenset({"shard_shape"}),
}

#: Per config section, the keys that choose which jobs run rather than what a job computes.
SELECTION_KEYS: Mapping[str, frozenset[str]] = {
    "predict": frozenset({"roles"}),
    "report": frozenset({"volume_figures"}),
}

#: Per config section, keys added after projects existed, with the value that turns them off:
#: left out of the params while off, so that existing projects' params (and outputs) stay
#: unchanged and nothing reruns when dinopipe gains the key. (``segment.block_context`` is left
#: out at its default: it only acts on blockwise segmentations; ``features.batch_size``, once
#: runtime-only, at its default, so that projects made before it became a param rerun nothing.)
OPTIONAL_KEYS: Mapping[str, Mapping[str, Any]] = {
    "features": {"batch_size": 16},
    "targets": {"classes": None, "classes_overlap": False},
    "demo": {"organelles": None},
    "segment": {"split_touching_nm": None, "class_threshold": None, "jobs": None, "block_context": 16,
                "merge_levels": None},
    "predict": {"distributed": None},
}

#: Train keys that may differ between an interrupted run and its continuation: the
#: runtime-only ones, and ``steps`` (raising it continues the same run).
RESUME_FREE: frozenset[str] = RUNTIME_KEYS["train"] | {"steps"}


@functools.cache
def load_schema() -> dict[str, Any]:
    """The workflow's config schema (JSON Schema as a mapping), read once.

    Raises:
        FileNotFoundError: the package was installed without its schema (names the path).
    """
    if not SCHEMA_PATH.is_file():
        raise FileNotFoundError(
            f"the config schema {SCHEMA_PATH} is missing from the installed dinopipe package; "
            "reinstall it (pip install dinopipe, or pip install -e . in a checkout)"
        )
    return yaml.safe_load(SCHEMA_PATH.read_text())


def schema_defaults(section: str, *path: str) -> dict[str, Any]:
    """The schema's default of every key of one config section (or a nested mapping in it).

    ``schema_defaults("train", "augment")`` gives the defaults of ``train.augment``. Keys
    without a default are left out.

    Raises:
        KeyError: no such section or nested mapping in the schema (names it).
    """
    node = load_schema()
    for name in (section, *path):
        try:
            node = node["properties"][name]
        except KeyError:
            raise KeyError(f"the config schema has no section {'.'.join((section, *path))!r}") from None
    return {k: v["default"] for k, v in node.get("properties", {}).items() if "default" in v}


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Validate a config against the schema as the workflow does, filling in its defaults (in place)."""
    try:
        from snakemake.utils import validate  # the workflow's own validator: an optional dependency
    except ImportError as exc:
        raise ImportError("validating a config needs Snakemake: pip install 'dinopipe[workflow]'") from exc
    validate(config, str(SCHEMA_PATH))
    return config


def canonical(value: Any) -> Any:
    """``value`` with every mapping's keys sorted (recursively) and tuples as lists, so
    that two configs that differ only in key order give equal ``repr``."""
    if isinstance(value, Mapping):
        return {str(k): canonical(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    return value


def _segment_unused(section: Mapping[str, Any]) -> set[str]:
    """The ``segment`` keys that are parameters of a method other than the chosen one."""
    from dinopipe.segment import METHODS, method_parameters  # mwatershed: only where needed

    own = method_parameters(section.get("method", "mutex_watershed"))
    return set().union(*(method_parameters(m) for m in METHODS)) - own


def result_params(config: Mapping[str, Any], section: str) -> dict[str, Any]:
    """The result-changing keys of one config section, canonical: what a rule carries as
    params so that Snakemake reruns its jobs exactly when their results may change.

    Args:
        config: The whole configuration (schema defaults filled in).
        section: A top-level section name, e.g. ``"features"``.
    """
    values = config.get(section) or {}
    drop = set(RUNTIME_KEYS.get(section, ())) | set(SELECTION_KEYS.get(section, ()))
    if section == "segment":
        drop |= _segment_unused(values)
    drop |= {k for k, off in OPTIONAL_KEYS.get(section, {}).items() if k in values and values[k] == off}
    return canonical({k: v for k, v in values.items() if k not in drop})


def runtime_settings(config: Mapping[str, Any], section: str) -> dict[str, Any]:
    """The runtime-only keys of one config section (read by the job, never params)."""
    values = config.get(section) or {}
    return {k: v for k, v in values.items() if k in RUNTIME_KEYS.get(section, ())}


def job_settings(params: Mapping[str, Any], config: Mapping[str, Any], section: str) -> dict[str, Any]:
    """What a job runs with: its result-changing params plus the section's runtime-only
    keys from the config (``snakemake.params.<section>`` and ``snakemake.config``)."""
    return {**params, **runtime_settings(config, section)}


def volume_params(record: Mapping[str, Any], *, role: bool = False, distributed: bool = False) -> dict[str, Any]:
    """A sheet row as a canonical param; without the role unless the job uses it (the
    role decides what a volume is used for, not what its features or targets hold), and
    without the ``distributed`` column unless the job plans the parts (it decides how many
    jobs predict the volume, not what any output holds)."""
    dropped = {k for k, keep in (("role", role), ("distributed", distributed)) if not keep}
    return canonical({k: v for k, v in record.items() if k not in dropped})
