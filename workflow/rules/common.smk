# Config validation, the volume sheet and input functions. Logic lives in dinopipe.

from snakemake.utils import validate

from dinopipe.io import source_store
from dinopipe.sheet import by_role, read_sheet
from dinopipe.sources import check_paths

validate(config, workflow.source_path("../schemas/config.schema.yaml"))

VOLUMES = {v.name: v for v in read_sheet(config["volumes"])}
TRAIN = [v.name for v in by_role(VOLUMES.values(), "train")]
VALIDATE = [v.name for v in by_role(VOLUMES.values(), "validate")]
PREDICT = [v.name for v in by_role(VOLUMES.values(), *config["predict"]["roles"])]
LABELLED = [v for v in VOLUMES if VOLUMES[v].labels]
SCORED = [v for v in PREDICT if VOLUMES[v].labels]

for _volume in VOLUMES.values():
    check_paths(_volume, generated=["resources/demo/"])

if not TRAIN:
    raise ValueError(f"{config['volumes']}: no volume has role 'train'")

# Any name the sheet allows (dinopipe.sheet), except the literal results/report/loss_curve.png.
# Not the alternation of all sheet names: Snakemake inlines the constraint into every path
# pattern, which made `snakemake -n` quadratic in the number of volumes (benchmarks/dag.py).
wildcard_constraints:
    volume=r"(?!loss_curve\.png$)[A-Za-z0-9][A-Za-z0-9_.-]*",

def volume_record(wildcards):
    """The sheet row of a volume as a dict (a param, so a changed row reruns its jobs)."""
    return VOLUMES[wildcards.volume].to_record()

def volume_inputs(wildcards):
    """The files or folders holding a volume's raw and labels (`a.zarr/raw` -> `a.zarr`,
    `b.n5/raw/s0` -> `b.n5`, `c.h5:/stack` -> `c.h5`): real data, or what demo_data writes."""
    v = VOLUMES[wildcards.volume]
    return sorted({source_store(p) for p in (v.raw, v.labels) if p})

def all_outputs():
    return [
        *expand("results/metadata/{volume}.json", volume=sorted(VOLUMES)),
        "results/evaluation/summary.tsv",
        # the report's figures, so that a plain `snakemake` makes everything `--report` shows
        *expand("results/report/{volume}.png", volume=PREDICT),
        "results/report/loss_curve.png",
    ]
