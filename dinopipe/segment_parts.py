"""Blockwise segmentation of one volume as many cluster jobs (``segment.jobs``).

The steps of :func:`dinopipe.segment.segment_blockwise`, each a Snakemake rule, so that a
volume too large for one job's walltime or memory is segmented by ``jobs`` jobs per step;
the result equals the one-job blockwise segmentation bitwise (same blocks, same merges,
same numbering):

1. :func:`run_plan` (rule ``segment_plan``, one job): the block grid, the settings, and
   two empty stores under ``results/segmentations/{volume}.parts/``: ``fragments.zarr`` and
   the staging ``segmentation.zarr`` (uint64, chunks = blocks, so jobs never share a chunk).
2. :func:`run_fragments` (rule ``segment_fragments``, one job per part): segments the
   part's blocks into fragments with globally unique ids (the block index numbers them),
   writes them to ``fragments.zarr`` and their ids and sizes to ``fragments/{part}.npz``.
3. :func:`run_faces` (rule ``segment_faces``, one job per part, after every part's
   fragments): the region graph's edges of the part's blocks (across the faces with their
   predecessors, and inside them for agglomeration and mutex watershed; for mutex watershed
   the long-range edges too), in ``faces/{part}.npz``.
4. :func:`run_merge` (rule ``segment_merge``, one job): the merge on the whole graph
   (:func:`dinopipe.segment.merge_fragments`), ``min_size``, consecutive ids; ``table.npz``
   maps every fragment to its segment.
5. :func:`run_relabel` (rule ``segment_relabel``, one job per part): writes the part's blocks
   of the staging store through the table.
6. :func:`run_finish` (rule ``segment_finish``, one job): checks every part, writes the
   attrs of :func:`dinopipe.stages.run_segment`'s blockwise output, deletes the fragments and
   renames the staging store to ``results/segmentations/{volume}.zarr``.

The blocks are split into ``jobs`` parts by the rule every stage uses
(:class:`dinopipe.parts.BlockPlan`, :meth:`~dinopipe.parts.BlockPlan.in_jobs`): blocks in C
order, part ``p`` takes the consecutive blocks ``p * n ... p * n + n - 1`` for
``n = ceil(blocks / jobs)`` (trailing parts may have none). The number of jobs is fixed by
the config, not by the volume's size, so the workflow knows its jobs before any prediction
exists. The per-part
files are Snakemake temporary outputs: a killed job leaves its part missing and only that
part is redone; once the volume is finished they are deleted.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from dinopipe import io
from dinopipe.atomic import remove_partial_writes
from dinopipe.geometry import Window
from dinopipe.parts import BlockPlan
from dinopipe.segment import (
    block_for,
    block_graph,
    block_seeds,
    check_blockwise,
    concat_edges,
    concat_fragments,
    fragment_block,
    fragment_superblocks,
    merge_fragments,
    relabel_block,
    sanity_warnings,
)

logger = logging.getLogger(__name__)

def parts_dir(out_path: str | Path) -> Path:
    """The work directory of a segmentation output: ``{volume}.zarr`` -> ``{volume}.parts``."""
    out = Path(out_path)
    return out.with_name(out.name.removesuffix(".zarr") + ".parts")


def _writable(path: Path) -> Any:
    """The finest scale of an OME-NGFF image opened for writing."""
    return zarr.open_group(str(path), mode="r+")[io.read_image(path).scale]


def _read_plan(work: Path) -> dict[str, Any]:
    path = work / "plan.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the segment_plan rule of this volume first")
    return json.loads(path.read_text())


def block_plan(plan: Mapping[str, Any]) -> BlockPlan:
    """The blocks of a segmentation plan and their ``jobs`` parts."""
    return BlockPlan.in_jobs(plan["shape"], plan["block_shape"], int(plan["jobs"]))


def _windows(plan: Mapping[str, Any], part: int) -> list[tuple[int, Window]]:
    """The blocks (index, window) of ``part``."""
    blocks = block_plan(plan)
    if not 0 <= part < blocks.num_parts:
        raise ValueError(f"part {part} outside 0..{blocks.num_parts - 1} (segment.jobs is {plan['jobs']})")
    return [(i, blocks.window(i)) for i in blocks.part_blocks(part)]


def run_plan(predictions_path: str | Path, out_path: str | Path, settings: Mapping[str, Any], jobs: int,
             plan_json: str | Path) -> dict[str, Any]:
    """Plan the blockwise segmentation of one volume across ``jobs`` jobs; create its stores.

    Args:
        predictions_path: The prediction store (``affinities`` and the offsets in its attrs).
        out_path: The final segmentation path ``results/segmentations/{volume}.zarr``; the
            work directory is :func:`parts_dir` of it.
        settings: The resolved segment settings of :func:`dinopipe.stages.segment_settings`
            (method, its parameters, ``min_size``, ``merge_threshold``, ``block_shape``).
        jobs: Jobs per step (``segment.jobs``).
        plan_json: Where the plan is written (inside the work directory).

    Returns:
        The plan: shape, block shape, number of blocks, jobs, settings, offsets, geometry.
    """
    if int(jobs) < 1:
        raise ValueError(f"segment.jobs must be >= 1, got {jobs}")
    affs = io.read_image(Path(predictions_path) / "affinities")
    offsets = zarr.open_group(str(predictions_path), mode="r").attrs["dinopipe"]["offsets"]
    g = affs.geometry
    block = block_for(settings["block_shape"], g.shape)
    check_blockwise(g.shape, offsets, block, settings["method"], int(settings["min_size"]),
                    settings.get("merge_levels"))
    work = parts_dir(out_path)
    work.mkdir(parents=True, exist_ok=True)
    for name in ("fragments.zarr", "segmentation.zarr"):
        target = work / name
        if target.exists():
            shutil.rmtree(target)
        io.create_image(target, g.shape, np.uint64, g.voxel_size, g.translation, chunks=block,
                        name="fragments" if name == "fragments.zarr" else "segmentation")
    parts = BlockPlan.in_jobs(g.shape, block, int(jobs))
    plan = {"predictions": str(predictions_path), "shape": list(g.shape), "block_shape": block,
            "blocks": parts.num_blocks, "jobs": int(jobs), "blocks_per_part": parts.blocks_per_part,
            "offsets": offsets, "settings": dict(settings), "started": time.time()}
    io.write_json(plan_json, plan)
    logger.info("segmentation of %s: %d blocks of %s in %d jobs per step (%d consecutive blocks each)",
                predictions_path, parts.num_blocks, block, jobs, parts.blocks_per_part)
    return plan


def run_fragments(out_path: str | Path, part: int, out_npz: str | Path) -> int:
    """Fragments of the blocks of one part (step 2); returns the number of fragments."""
    work = parts_dir(out_path)
    plan = _read_plan(work)
    s = plan["settings"]
    affs = io.read_image(Path(plan["predictions"]) / "affinities").array
    fragments = _writable(work / "fragments.zarr")
    t = time.perf_counter()
    windows = _windows(plan, part)
    all_ids, sizes = concat_fragments([
        fragment_block(affs, plan["offsets"], fragments, window, i, plan["block_shape"], s["method"],
                       s["block_context"], **s["parameters"])
        for i, window in windows
    ])
    with io.atomic_output(out_npz) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, ids=all_ids, sizes=sizes)
    logger.info("part %d: %d blocks, %d fragments in %.1fs", part, len(windows), len(all_ids), time.perf_counter() - t)
    return len(all_ids)


def run_faces(out_path: str | Path, part: int, out_npz: str | Path) -> int:
    """The region graph's edges of one part's blocks (step 3, :func:`dinopipe.segment.block_graph`);
    returns their number."""
    work = parts_dir(out_path)
    plan = _read_plan(work)
    affs = io.read_image(Path(plan["predictions"]) / "affinities").array
    fragments = io.read_image(work / "fragments.zarr").array
    s = plan["settings"]
    graphs = [block_graph(affs, plan["offsets"], fragments, window, s["method"], s["parameters"])
              for _, window in _windows(plan, part)]
    pairs, sums, counts = concat_edges([g[0] for g in graphs])
    long_pairs, long_sums, long_counts = concat_edges([g[1] for g in graphs])  # mutex watershed's; else none
    with io.atomic_output(out_npz) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, pairs=pairs, sums=sums, counts=counts, long_pairs=long_pairs, long_sums=long_sums,
                     long_counts=long_counts)
    logger.info("part %d: %d region graph edges", part, pairs.shape[1])
    return int(pairs.shape[1])


def run_merge(plan_json: str | Path, fragment_npzs: list[str], face_npzs: list[str], out_npz: str | Path) -> int:
    """The table fragment id -> segment id of the whole volume (step 4); returns the segment count."""
    plan = json.loads(Path(plan_json).read_text())
    s = plan["settings"]
    found, edges, long_edges = [], [], []
    for path in fragment_npzs:
        with np.load(path) as data:
            found.append((data["ids"], data["sizes"]))
    for path in face_npzs:
        with np.load(path) as data:
            edges.append((data["pairs"], data["sums"], data["counts"]))
            long_edges.append((data["long_pairs"], data["long_sums"], data["long_counts"]))
    t = time.perf_counter()
    fragments = concat_fragments(found)
    factors = s.get("merge_levels")
    levels = None if factors is None else fragment_superblocks(fragments[0], plan["shape"], plan["block_shape"],
                                                               factors, block_seeds(s["method"], s["parameters"]) is not None)
    graph, long_graph = concat_edges(edges), concat_edges(long_edges)
    del edges, long_edges  # the parts' copies: 32 bytes per edge less while merging
    keys, values = merge_fragments(s["method"], fragments, graph, long_graph, int(s["min_size"]), s["merge_threshold"],
                                   s["parameters"], levels)
    n = int(values.max()) if len(values) else 0
    with io.atomic_output(out_npz) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, keys=keys, values=values)
    logger.info("%d fragments -> %d segments in %.1fs", len(keys), n, time.perf_counter() - t)
    return n


def run_relabel(out_path: str | Path, part: int, table_npz: str | Path, done: str | Path) -> None:
    """Write one part's blocks of the staging segmentation through the table (step 5)."""
    work = parts_dir(out_path)
    plan = _read_plan(work)
    fragments = io.read_image(work / "fragments.zarr").array
    staging = _writable(work / "segmentation.zarr")
    with np.load(table_npz) as data:
        keys, values = data["keys"], data["values"]
    windows = _windows(plan, part)
    for _, window in windows:
        relabel_block(fragments, staging, window, keys, values)
    io.write_json(done, {"part": part, "blocks": [i for i, _ in windows]})


def run_finish(out_path: str | Path, plan_json: str | Path, table_npz: str | Path, done: list[str]) -> dict[str, Any]:
    """Check every part, write the attrs and move the staging store into place (step 6).

    The attrs are those of the one-job blockwise segmentation, ``seconds`` being the wall
    time from the plan to now (queue waits included), plus ``jobs``.
    """
    work = parts_dir(out_path)
    plan = json.loads(Path(plan_json).read_text())
    covered = sorted(i for path in done for i in json.loads(Path(path).read_text())["blocks"])
    if covered != list(range(plan["blocks"])):
        missing = sorted(set(range(plan["blocks"])) - set(covered))
        raise RuntimeError(f"segmentation {out_path}: blocks {missing[:10]} of {plan['blocks']} were not relabelled")
    with np.load(table_npz) as data:
        n = int(data["values"].max()) if len(data["values"]) else 0
    s = plan["settings"]
    voxels = int(np.prod(plan["shape"]))
    warnings = sanity_warnings(n, voxels)
    for w in warnings:
        logger.warning("segmentation %s: %s (method %s, %s)", out_path, w, s["method"], s["parameters"])
    attrs = {"method": s["method"], "parameters": s["parameters"], "min_size": s["min_size"], "blockwise": True,
             "tuned": s["tuned"], "block_shape": plan["block_shape"], "block_context": s["block_context"],
             "merge_threshold": float(s["merge_threshold"]),
             "segments": n, "seconds": time.time() - float(plan["started"]), "warnings": warnings, "jobs": plan["jobs"]}
    if s.get("merge_levels") is not None:
        attrs["merge_levels"] = s["merge_levels"]
    io.set_attrs(work / "segmentation.zarr", attrs)
    remove_partial_writes(work / "segmentation.zarr")
    io.move_into_place(work / "segmentation.zarr", out_path)
    shutil.rmtree(work / "fragments.zarr", ignore_errors=True)
    logger.info("segmentation %s: %d segments from %d blocks in %d jobs per step", out_path, n, plan["blocks"],
                plan["jobs"])
    return attrs
