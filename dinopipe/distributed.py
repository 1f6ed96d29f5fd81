"""One volume's prediction spread over many cluster jobs: the block plan, the record of finished parts.

A volume is cut into the blocks of :func:`dinopipe.predict.block_layout` (core shape in
label voxels, (z, y, x)) and the blocks into *parts*, one cluster job each, by the rule of
:class:`dinopipe.parts.BlockPlan` (blocks in C order, consecutive blocks per part), with
``predict.distributed.blocks_per_job`` blocks per part (:func:`blocks_per_part`). Three rules use this module
(``workflow/rules/predict.smk``):

* ``predict_create`` writes the plan (``results/predictions/{volume}.parts/plan.json``) and
  the empty output store with its full shape and chunks (one chunk per block and image),
  under the staging path ``results/predictions/{volume}.parts/staging.zarr``;
* ``predict_part`` (one job per part) predicts its blocks into the staging store, each
  from its own input window with halo, then writes the part's marker
  ``results/predictions/{volume}.parts/{part}.done``. Markers are the record of finished
  parts: a job killed mid-write leaves none, so Snakemake reruns exactly the missing parts;
* ``predict_finish`` checks that every part's marker belongs to this plan and that every
  chunk of every image is stored, writes the root attrs and renames the staging store to
  ``results/predictions/{volume}.zarr``: downstream rules see one store, laid out exactly
  as a single job writes it.

Blocks never share a chunk, so parts write concurrently without locks. Each block's
result depends only on its own input window; parts start at multiples of
``predict.batch_size``, so the forward passes see the same batches as a single-job run,
and the distributed prediction equals it (bitwise on CPU; ``tests/test_distributed.py``).

This module loads no torch: Snakemake imports it when it parses the workflow (the plan
tells it the parts). The jobs themselves are :func:`dinopipe.stages.run_predict_create`,
:func:`~dinopipe.stages.run_predict_part` and :func:`~dinopipe.stages.run_predict_finish`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from dinopipe.atomic import move_into_place, remove_partial_writes, write_json
from dinopipe.chunks import count_chunks
from dinopipe.parts import BlockPlan

logger = logging.getLogger(__name__)

#: Version of the plan's JSON layout.
PLAN_FORMAT = 1


def blocks_per_part(setting: Mapping[str, Any], shape: Sequence[int], num_blocks: int, batch_size: int = 1,
                    flag: bool | None = None) -> int:
    """Blocks per part from the ``predict.distributed`` setting.

    ``blocks_per_job`` is rounded up to a multiple of ``batch_size``, so that every part
    starts a new forward batch where a single-job run would (the batches, and with them
    the results, stay the same). A volume with fewer voxels than ``min_voxels`` is one part,
    unless the sheet's ``distributed`` column (``flag``) says otherwise.

    Args:
        setting: ``{"blocks_per_job": int, "min_voxels": int}``.
        shape: The label grid (z, y, x), voxels.
        num_blocks: Blocks tiling the volume.
        batch_size: ``predict.batch_size``.
        flag: The volume's ``distributed`` column: True: parts of ``blocks_per_job``
            whatever the size; False: one part; None: by ``min_voxels``.
    """
    per_job = int(setting.get("blocks_per_job", 64))
    if per_job < 1 or batch_size < 1:
        raise ValueError(f"predict.distributed.blocks_per_job and predict.batch_size must be >= 1, got "
                         f"{per_job} and {batch_size}")
    small = math.prod(shape) < int(setting.get("min_voxels") or 0)
    if flag is False or (flag is None and small):
        return max(1, num_blocks)
    return -(-per_job // batch_size) * batch_size


# --------------------------------------------------------------------------- the plan on disk


def write_plan(path: str | os.PathLike[str], plan: BlockPlan, *, volume: str, plan_id: str,
               extra: Mapping[str, Any]) -> None:
    """Write the plan (atomically) with what the part jobs and the finish job need (``extra``:
    the store's root attrs, measured intensity ranges, the staging path...)."""
    write_json(path, {
        "format": PLAN_FORMAT, "volume": volume, "plan_id": plan_id,
        "shape": list(plan.shape), "block": list(plan.block), "blocks_per_part": plan.blocks_per_part,
        "num_blocks": plan.num_blocks, "num_parts": plan.num_parts, **extra,
    })


_PLANS: dict[str, tuple[float, dict[str, Any]]] = {}


def read_plan(path: str | os.PathLike[str]) -> tuple[BlockPlan, dict[str, Any]]:
    """The plan and its whole JSON record (cached per file modification time: Snakemake asks
    once per part while it builds the DAG).

    Raises:
        FileNotFoundError, ValueError: no plan, or one of another format (names the path).
    """
    key = str(path)
    try:
        mtime = os.stat(key).st_mtime_ns
    except FileNotFoundError:
        raise FileNotFoundError(f"no prediction plan at {key}: rule predict_create writes it") from None
    cached = _PLANS.get(key)
    if cached is None or cached[0] != mtime:
        record = json.loads(Path(key).read_text())
        if record.get("format") != PLAN_FORMAT:
            raise ValueError(f"{key}: plan format {record.get('format')!r}, expected {PLAN_FORMAT}; rerun "
                             "predict_create (snakemake --forcerun predict_create)")
        cached = (mtime, record)
        _PLANS[key] = cached
    record = cached[1]
    return plan_of(record), record


def plan_of(record: Mapping[str, Any]) -> BlockPlan:
    """The block plan of a plan's JSON record."""
    return BlockPlan(tuple(record["shape"]), tuple(record["block"]), int(record["blocks_per_part"]))  # type: ignore[arg-type]


def part_names(plan_path: str | os.PathLike[str]) -> list[str]:
    """The part wildcards of a plan: ``"0"``, ``"1"``, ..."""
    plan, _ = read_plan(plan_path)
    return [str(p) for p in range(plan.num_parts)]


def describe_part(plan_path: str | os.PathLike[str], part: str | int) -> str:
    """What one part job predicts (for Snakemake's job message); before the plan exists, says so."""
    try:
        plan, record = read_plan(plan_path)
    except FileNotFoundError:
        return "blocks known once predict_create has written the plan"
    return f"part {part} of {plan.num_parts} of {record['volume']}: {plan.describe(int(part))}"


# --------------------------------------------------------------------------- markers and the finish


def write_marker(path: str | os.PathLike[str], record: Mapping[str, Any], part: int,
                 stats: Mapping[str, Any]) -> None:
    """Record a finished part (atomically, after all its blocks were written)."""
    blocks = plan_of(record).part_blocks(part)
    write_json(path, {"plan_id": record["plan_id"], "volume": record["volume"], "part": part,
                      "blocks": [blocks.start, blocks.stop], **stats})


def check_parts(plan_path: str | os.PathLike[str], markers: Sequence[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """The markers of every part of a plan, checked: one per part, each written for this plan.

    Raises:
        ValueError: a part without a marker or with one of an older plan (names the parts
            and the command that recomputes them).
    """
    plan, record = read_plan(plan_path)
    found: dict[int, dict[str, Any]] = {}
    stale: list[str] = []
    for marker in markers:
        data = json.loads(Path(marker).read_text())
        if data.get("plan_id") != record["plan_id"]:
            stale.append(str(marker))
            continue
        found[int(data["part"])] = data
    missing = [p for p in range(plan.num_parts) if p not in found]
    if stale or missing:
        raise ValueError(
            f"volume {record['volume']!r}: {len(missing)} of {plan.num_parts} parts of {plan_path} are not finished "
            f"(first: {missing[:5]}); markers of another plan: {stale[:5]}. Recompute them with snakemake "
            f"{Path(plan_path).parent}/PART.done (or rerun the workflow)"
        )
    return [found[p] for p in range(plan.num_parts)]


def check_blocks_stored(staging: str | os.PathLike[str], images: Sequence[str], volume: str) -> None:
    """Every chunk of every image of the staging store is stored (each block writes its chunks).

    Raises:
        ValueError: naming the volume, the image and a few missing chunks.
    """
    for name in images:
        count = count_chunks(str(Path(staging) / name), "s0")
        if not count.complete:
            raise ValueError(
                f"volume {volume!r}: {Path(staging) / name}: {count.expected - count.present} of {count.expected} "
                f"blocks are not stored (first missing chunk: {', '.join(count.missing)}) although every part "
                f"is marked done; predict the volume again: snakemake results/predictions/{volume}.zarr --forcerun predict_create"
            )


def finish_store(plan_path: str | os.PathLike[str], staging: str | os.PathLike[str],
                 markers: Sequence[str | os.PathLike[str]], out_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check the parts, write the root attrs, and rename the staging store to ``out_path``.

    The root ``dinopipe`` attrs are those of a single-job prediction, with the timings
    summed over the parts (seconds of all jobs together) and ``distributed`` (parts,
    blocks per part, precision of each part). An existing ``out_path`` is replaced.

    Returns:
        The summed timings.
    """
    plan, record = read_plan(plan_path)
    parts = check_parts(plan_path, markers)
    staging, out_path = Path(staging), Path(out_path)
    root = zarr.open_group(str(staging), mode="r+")
    if (root.attrs.get("dinopipe") or {}).get("plan_id") != record["plan_id"]:
        raise ValueError(f"volume {record['volume']!r}: staging store {staging} was not created for plan {plan_path}; "
                         f"predict the volume again: snakemake results/predictions/{record['volume']}.zarr "
                         "--forcerun predict_create")
    check_blocks_stored(staging, record["images"], record["volume"])
    keys = ("read_s", "wait_s", "forward_s", "write_s", "total_s")
    timings = {k: float(sum(p.get("timings", {}).get(k, 0.0) for p in parts)) for k in keys}
    precisions = sorted({p.get("precision", "none") for p in parts})
    if len(precisions) > 1:
        logger.warning("volume %s: parts ran with different precisions %s (CPU and GPU jobs mixed)",
                       record["volume"], precisions)
    attrs = {**record["attrs"], "precision": precisions[0] if len(precisions) == 1 else precisions,
             "timings": timings,
             "distributed": {"parts": plan.num_parts, "blocks_per_part": plan.blocks_per_part,
                             "blocks": plan.num_blocks}}
    root.attrs["dinopipe"] = attrs  # replaces the staging mark {"plan_id": ...}
    remove_partial_writes(staging)
    move_into_place(staging, out_path)
    logger.info("wrote %s: %d blocks from %d parts (jobs' seconds together: network %.1f, total %.1f)", out_path,
                plan.num_blocks, plan.num_parts, timings["forward_s"], timings["total_s"])
    return timings


# --------------------------------------------------------------------------- one block again


def batch_of(plan: BlockPlan, index: int, batch_size: int) -> range:
    """The blocks of the forward batch that holds block ``index``.

    A part predicts its blocks in batches of ``batch_size`` from its first block, so the
    batch is ``batch_size`` consecutive blocks of the part (fewer at its end). Predicting
    this batch again gives block ``index`` bit for bit (the network's output for a block
    depends on the batch it is in, in the last bit).
    """
    if batch_size < 1:
        raise ValueError(f"predict.batch_size must be >= 1, got {batch_size}")
    part = plan.part_blocks(plan.part_of_block(index))
    first = part.start + (index - part.start) // batch_size * batch_size
    return range(first, min(first + batch_size, part.stop))


_METADATA = (".zarray", ".zattrs", ".zgroup", "zarr.json")


def replace_block(array_path: str | os.PathLike[str], plan: BlockPlan, index: int, values: np.ndarray) -> bool:
    """Write block ``index`` of one image (C, z, y, x; one chunk per block) atomically.

    The block is encoded into a scratch copy of the array (same metadata, beside the store),
    and its chunk file is renamed over the stored one: a reader, or a job killed meanwhile,
    sees the old chunk or the new one, never half of one.

    Args:
        array_path: The image's array (``{store}/{image}/s0``).
        plan: The volume's blocks; the array's shape and chunks must be the plan's.
        index: The block (C order).
        values: The block's values (C, z, y, x), the block's window of :meth:`BlockPlan.window`.

    Returns:
        Whether the stored block differed (or could not be read: missing or corrupt chunk).

    Raises:
        ValueError: The array's shape or chunks are not those of the plan (names the path).
    """
    path = Path(array_path)
    array = zarr.open_array(str(path), mode="r")
    if tuple(array.shape[1:]) != plan.shape or tuple(array.chunks[1:]) != plan.block or array.chunks[0] != array.shape[0]:
        raise ValueError(f"{path}: shape {list(array.shape)} and chunks {list(array.chunks)} are not those of the plan "
                         f"(grid {list(plan.shape)}, one chunk per block of {list(plan.block)})")
    where = (slice(None), *plan.window(index))
    try:
        changed = not np.array_equal(array[where], values)
    except Exception as exc:  # a missing or truncated chunk reads as fill value or fails to decode
        logger.warning("%s: block %d could not be read (%s): it is replaced", path, index, exc)
        changed = True
    scratch = Path(tempfile.mkdtemp(prefix=f".block-{index}-", dir=path.parent.parent.parent))
    try:
        for name in _METADATA:
            if (path / name).exists():
                shutil.copy2(path / name, scratch / name)
        zarr.open_array(str(scratch), mode="r+", config={"write_empty_chunks": True})[where] = values
        chunks = [p for p in scratch.rglob("*") if p.is_file() and p.name not in _METADATA]
        if len(chunks) != 1:
            raise RuntimeError(f"{path}: block {index} encoded into {len(chunks)} chunk files, expected one")
        target = path / chunks[0].relative_to(scratch)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(chunks[0], target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return changed


def record_block(store: str | os.PathLike[str], record_path: str | os.PathLike[str], entry: Mapping[str, Any]) -> None:
    """The provenance of a block predicted again: appended to the store's root attrs
    (``dinopipe.recomputed_blocks``) and written to ``record_path``.

    When the block changed, the store's modification time is set to now (its directory and
    Snakemake's ``.snakemake_timestamp`` inside it, which Snakemake reads as a directory
    output's time), so Snakemake reruns what was computed from the old block (the
    segmentation); an unchanged block leaves the store's time as it was.
    """
    store = Path(store)
    stamp = store / ".snakemake_timestamp"
    times = {p: os.stat(p) for p in (store, stamp) if p.exists()}
    root = zarr.open_group(str(store), mode="r+")
    attrs = dict(root.attrs.get("dinopipe") or {})
    attrs["recomputed_blocks"] = [*attrs.get("recomputed_blocks", []), dict(entry)]
    root.attrs["dinopipe"] = attrs
    for p, st in times.items():
        if entry.get("changed"):
            os.utime(p)
        else:
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    write_json(record_path, entry)
