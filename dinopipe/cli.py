"""``dinopipe``: predict and segment one volume from a trained checkpoint, outside Snakemake.

The same library calls as the workflow's rules (:func:`dinopipe.stages.run_predict`,
:func:`dinopipe.stages.run_segment`), with the ``predict``, ``segment``, ``features``
and ``data`` sections taken from a workflow config file (``--config``, validated against
the workflow's schema, which ships with the package) and command-line overrides on top.

Examples::

    dinopipe run --checkpoint results/model --features results/features/vol.zarr --out out/vol
    dinopipe run --checkpoint results/model --raw data/vol.zarr/raw --config config/config.yaml --out out/vol
    dinopipe segment --predictions out/vol/predictions.zarr --out out/vol/seg.zarr --method agglomeration
    dinopipe segment --predictions out/vol/predictions.zarr --out out/vol/seg.zarr --config config/config.yaml \
        --tuned results/tune/segment.json      # the parameters the workflow picked on the validate volumes
    dinopipe sheet --raw data/jrc_hela-2.zarr/recon-1/em/fibsem-uint8 \
        --crops data/jrc_hela-2.zarr/recon-1/labels/groundtruth --validate-fraction 0.2 --out config/volumes.tsv
    dinopipe block --plan results/predictions/vol.parts/plan.json --voxel 100 2000 3000   # which block, part, command
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from dinopipe.atomic import atomic_output
from dinopipe.config import validate_config
from dinopipe.sheet import Volume, cellmap_sheet, read_sheet, write_sheet

logger = logging.getLogger("dinopipe")

def load_sections(config_path: str | None) -> dict[str, dict[str, Any]]:
    """The predict/segment/features/data sections of a workflow config (with the schema's defaults)."""
    config: dict[str, Any] = {}
    if config_path:
        path = Path(config_path)
        if not path.is_file():
            raise FileNotFoundError(f"--config {path}: no such file")
        config = yaml.safe_load(path.read_text()) or {}
        if not isinstance(config, dict):
            raise ValueError(f"--config {path}: expected a mapping of config sections")
    config.setdefault("volumes", "")
    validate_config(config)  # as the workflow does: errors name the key, defaults filled in
    return {k: dict(config.get(k) or {}) for k in ("predict", "segment", "features", "data")}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinopipe", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def predict_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--checkpoint", required=True, help="training output folder (model_config.json, checkpoint.pt)")
        p.add_argument("--features", help="cached feature image (C, z, y, x), e.g. results/features/VOL.zarr")
        p.add_argument("--raw", help="raw OME-NGFF multiscale group: alone, compute features per block (needs the "
                                     "model's features config, from --config); beside --features, the raw input "
                                     "channel of a model trained with input_raw")
        p.add_argument("--name", default=None, help="volume name for messages (default: from the path)")
        p.add_argument("--block-shape", type=int, nargs=3, metavar=("Z", "Y", "X"), help="core block, label voxels")
        p.add_argument("--device", help="auto, cpu or cuda")
        p.add_argument("--voxel-size", type=float, nargs=3, metavar=("Z", "Y", "X"),
                       help="with --raw: output voxel size in nm (default: the model's training voxel size)")

    def segment_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--method", choices=["mutex_watershed", "agglomeration", "threshold_components"])
        p.add_argument("--min-size", type=int, help="remove segments smaller than this (voxels)")
        p.add_argument("--tuned", help="the workflow's picked segment parameters (results/tune/segment.json, "
                                       "rule tune_segment): they replace the config's")

    run = sub.add_parser("run", help="predict and segment one volume")
    predict_args(run)
    segment_args(run)
    run.add_argument("--out", required=True, help="output folder: predictions.zarr and segmentation.zarr")
    run.add_argument("--config", help="workflow config file (predict/segment/features/data sections)")

    pred = sub.add_parser("predict", help="predict affinities (and LSDs) of one volume")
    predict_args(pred)
    pred.add_argument("--out", required=True, help="output prediction store (.zarr)")
    pred.add_argument("--config", help="workflow config file")

    seg = sub.add_parser("segment", help="segment a prediction store")
    seg.add_argument("--predictions", required=True, help="prediction store (.zarr) with an affinities image (or the "
                                                          "class probabilities of a class model)")
    segment_args(seg)
    seg.add_argument("--out", required=True, help="output segmentation image (.zarr)")
    seg.add_argument("--config", help="workflow config file")
    sheet = sub.add_parser("sheet", help="write the volume sheet of a CellMap-style tree (one row per crop)")
    sheet.add_argument("--raw", required=True, help="the dataset's raw OME-NGFF multiscale image")
    sheet.add_argument("--crops", required=True, help="folder of crops, each a group with one image per class "
                                                      "(e.g. DATASET.zarr/recon-1/labels/groundtruth)")
    sheet.add_argument("--out", required=True, help="sheet to write (TSV), e.g. config/volumes.tsv")
    sheet.add_argument("--prefix", default="", help="prepended to each crop name (several datasets in one sheet)")
    sheet.add_argument("--validate", default="", help="comma-separated crops with role validate")
    sheet.add_argument("--predict", default="", help="comma-separated crops with role predict")
    sheet.add_argument("--validate-fraction", type=float, default=0.0,
                       help="fraction of the other crops drawn (seeded) for validate")
    sheet.add_argument("--predict-fraction", type=float, default=0.0,
                       help="fraction of the other crops drawn (seeded) for predict")
    sheet.add_argument("--seed", type=int, default=0, help="seed of the random split")
    sheet.add_argument("--append", action="store_true", help="add the rows to an existing sheet")
    block = sub.add_parser("block", help="the block and part of a distributed prediction that hold a voxel, and the "
                                         "command that predicts that block again")
    block.add_argument("--plan", required=True, help="the plan of a distributed prediction, "
                                                     "results/predictions/VOLUME.parts/plan.json")
    block.add_argument("--voxel", required=True, type=int, nargs=3, metavar=("Z", "Y", "X"),
                       help="a voxel of the prediction's grid (label voxels)")
    return parser


def block_of_voxel(plan_path: str | Path, voxel: Sequence[int]) -> dict[str, Any]:
    """The block and part of a distributed prediction that hold ``voxel`` (z, y, x, label
    voxels), and the Snakemake target that predicts that block again (rule ``predict_block``)."""
    from dinopipe.distributed import read_plan

    plan, record = read_plan(plan_path)
    index = plan.block_index(voxel)
    return {"volume": record["volume"], "voxel": list(voxel), "block": index,
            "first_voxel": list(plan.block_start(index)), "block_shape": list(plan.block),
            "part": plan.part_of_block(index), "parts": plan.num_parts,
            "target": f"{Path(plan_path).parent}/blocks/{index}.json"}


def _sheet(args: argparse.Namespace) -> None:
    split = {"validate": [c for c in args.validate.split(",") if c],
             "predict": [c for c in args.predict.split(",") if c],
             "validate_fraction": args.validate_fraction, "predict_fraction": args.predict_fraction,
             "seed": args.seed}
    volumes = cellmap_sheet(args.raw, args.crops, args.prefix, **split)
    out = Path(args.out)
    if args.append and out.is_file():
        volumes = [*read_sheet(out), *volumes]
    with atomic_output(out) as tmp:
        write_sheet(volumes, tmp)
        # duplicate names (--append without --prefix) are an error naming the line; the sheet stays as it was
        read_sheet(tmp)
    counts = {r: sum(v.role == r for v in volumes) for r in ("train", "validate", "predict")}
    logger.info("wrote %s: %d volumes (%s)", out, len(volumes), counts)


def _predict(args: argparse.Namespace, sections: dict[str, dict[str, Any]], out: Path) -> None:
    from dinopipe.stages import run_predict  # torch: loaded only for the commands that need it

    params = dict(sections["predict"])
    if args.block_shape:
        params["block_shape"] = list(args.block_shape)
    if args.device:
        params["device"] = args.device
    if not (args.raw or args.features):
        raise ValueError("give --features (cached features), --raw (features computed per block), or both "
                         "(cached features and the raw channel of an input_raw model)")
    image = args.raw or args.features
    name = args.name or Path(str(image).split(".zarr")[0]).name
    volume = Volume(name=name, raw=args.raw, labels=None, role="predict") if args.raw else None
    params["source"] = "features" if args.features else "raw"
    data = dict(sections["data"])
    if args.voxel_size:
        data["output_voxel_size"] = list(args.voxel_size)
    elif args.raw and not args.features and data.get("output_voxel_size") is None:  # the grid the model was trained on
        sig = json.loads((Path(args.checkpoint) / "model_config.json").read_text()).get("feature_signature") or {}
        if sig.get("voxel_size"):
            data["output_voxel_size"] = sig["voxel_size"]
            logger.info("predicting on the model's training voxel size %s nm", sig["voxel_size"])
    run_predict(args.features, args.checkpoint, out, params, volume=volume, features=sections["features"],
                data=data)


def _segment(args: argparse.Namespace, sections: dict[str, dict[str, Any]], predictions: Path, out: Path) -> None:
    from dinopipe.stages import run_segment  # see _predict

    params = dict(sections["segment"])
    if args.method:
        params["method"] = args.method
    if args.min_size is not None:
        params["min_size"] = args.min_size
    attrs = run_segment(predictions, out, params, tuned=args.tuned)
    logger.info("%s: %s segments (%s)", out, attrs["segments"], attrs["method"])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dinopipe`` command. Returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "sheet":
            _sheet(args)
            return 0
        if args.command == "block":
            found = block_of_voxel(args.plan, args.voxel)
            print(f"volume {found['volume']}: voxel (z, y, x) {found['voxel']} is in block {found['block']} (first "
                  f"voxel {found['first_voxel']}, blocks of {found['block_shape']}), part {found['part']} of "
                  f"{found['parts']}; predict it again: snakemake {found['target']}")
            return 0
        sections = load_sections(args.config)
        if args.command == "run":
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            _predict(args, sections, out / "predictions.zarr")
            _segment(args, sections, out / "predictions.zarr", out / "segmentation.zarr")
        elif args.command == "predict":
            _predict(args, sections, Path(args.out))
        else:
            _segment(args, sections, Path(args.predictions), Path(args.out))
    except (ValueError, FileNotFoundError, ImportError) as exc:
        logger.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
