# Config validation, the volume sheet and input functions. Logic lives in dinopipe.

from dataclasses import asdict

from snakemake.utils import validate

from dinopipe.sheet import by_role, read_sheet

validate(config, workflow.source_path("../schemas/config.schema.yaml"))

VOLUMES = {v.name: v for v in read_sheet(config["volumes"])}
TRAIN = [v.name for v in by_role(VOLUMES.values(), "train")]
VALIDATE = [v.name for v in by_role(VOLUMES.values(), "validate")]
PREDICT = [v.name for v in by_role(VOLUMES.values(), *config["predict"]["roles"])]
LABELLED = [v for v in VOLUMES if VOLUMES[v].labels]
SCORED = [v for v in PREDICT if VOLUMES[v].labels]

if not TRAIN:
    raise ValueError(f"{config['volumes']}: no volume has role 'train'")

wildcard_constraints:
    volume="|".join(sorted(VOLUMES)) or "NO_VOLUMES",

def volume_record(wildcards):
    """The sheet row of a volume as a dict (a param, so a changed row reruns its jobs)."""
    return asdict(VOLUMES[wildcards.volume])

def store_root(path):
    """The Zarr store holding an image group (`a/b.zarr/raw` -> `a/b.zarr`)."""
    return path.split(".zarr")[0] + ".zarr" if ".zarr" in path else path

def volume_inputs(wildcards):
    """The raw (and labels) stores of a volume: real data, or what demo_data writes."""
    v = VOLUMES[wildcards.volume]
    return sorted({store_root(p) for p in (v.raw, v.labels) if p})

def all_outputs():
    return [
        *expand("results/metadata/{volume}.json", volume=sorted(VOLUMES)),
        "results/evaluation/summary.tsv",
    ]
