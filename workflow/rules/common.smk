# Config validation, the volume sheet and input functions. Logic lives in dinopipe.

from snakemake.logging import logger
from snakemake.utils import validate

from dinopipe.config import result_params, volume_params
from dinopipe.distributed import describe_part, part_names
from dinopipe.io import source_store
from dinopipe.sheet import by_role, lookup, read_sheet
from dinopipe.checks import check_workflow
from dinopipe.tune import resolve_grid

validate(config, workflow.source_path("../schemas/config.schema.yaml"))

VOLUMES = {v.name: v for v in read_sheet(config["volumes"])}
TRAIN = [v.name for v in by_role(VOLUMES.values(), "train")]
VALIDATE = [v.name for v in by_role(VOLUMES.values(), "validate")]
PREDICT = [v.name for v in by_role(VOLUMES.values(), *config["predict"]["roles"])]
LABELLED = [v for v in VOLUMES if VOLUMES[v].labels]
SCORED = [v for v in PREDICT if VOLUMES[v].labels]
# labelled validate volumes: the segment parameters are picked on them (rule tune_segment)
TUNING = [v for v in VALIDATE if VOLUMES[v].labels]
# a class model (targets.classes, train.target semantic): class segmentation, per-class scores
CLASSES = config["targets"]["classes"] is not None
# segment.jobs: the blockwise segmentation of every predicted volume as this many jobs per step
# (dinopipe.segment_parts); a class model's segmentation stays one job per volume
SEGMENT_JOBS = None if CLASSES else config["segment"].get("jobs")
# tune unless segment.tune is false or segment.grid is {} (resolve_grid also checks the grid now);
# a class segmentation has no parameters to tune
TUNE = bool(resolve_grid(config["segment"])) and bool(TUNING) and not CLASSES
if resolve_grid(config["segment"]) and not TUNING and not CLASSES:
    logger.warning("segment.tune: no labelled validate volume to tune on; segmenting with the fixed "
                   "parameters of the segment section")
# predicted volumes with a figure in the report (the first report.volume_figures; null: all)
FIGURES = PREDICT[: config["report"]["volume_figures"]]

# paths, stores' metadata (formats, scales, dtypes, grids) and config combinations, before any job
check_workflow(config, VOLUMES.values(), generated=["resources/demo/"])


# Any name the sheet allows (dinopipe.sheet), except the literal results/report/loss_curve.png.
# Not the alternation of all sheet names: Snakemake inlines the constraint into every path
# pattern, which made `snakemake -n` quadratic in the number of volumes (benchmarks/dag.py).
# A well-formed name that is not in the sheet is caught by sheet_row in the input functions.
wildcard_constraints:
    volume=r"(?!loss_curve\.png$)[A-Za-z0-9][A-Za-z0-9_.-]*",

# What each job needs, whatever the site: rules declare threads, memory (MB, multiplied by the
# attempt number on retries), walltime and GPUs; profiles/ add only site settings (project,
# queues), so a per-run --set-resources changes one value without dropping the others.
# Locally threads are capped at --cores and unlisted resources (gpu, bookkeeping) are unlimited.
GPU = {
    "gpu": 1,  # SLURM: sbatch --gpus=1
    "lsf_extra": '-gpu "num=1"',  # LSF: the plugin has no GPU resource; appended to bsub
}

def per_attempt(mb):
    """mem_mb growing with the attempt: mb, 2 mb, 3 mb on Snakemake's retries."""
    return lambda wildcards, attempt: mb * attempt

def sheet_row(wildcards):
    """The sheet row of the {volume} wildcard; a clear error naming the sheet for a target
    such as results/features/nosuchvolume.zarr."""
    return lookup(VOLUMES, wildcards.volume, config["volumes"])

def volume_record(wildcards):
    """The sheet row of a volume without its role, canonical (a param: a changed row reruns
    its jobs; a changed role alone reruns none of the per-volume stages that ignore it)."""
    return volume_params(sheet_row(wildcards).to_record())

def volume_record_for_plan(wildcards):
    """The sheet row of a volume with its `distributed` column (predict_create: it decides the
    parts; no other job's params carry it, so setting it reruns nothing else)."""
    return volume_params(sheet_row(wildcards).to_record(), distributed=True)

def volume_record_with_role(wildcards):
    """The sheet row of a volume with its role (for jobs that record it)."""
    return volume_params(sheet_row(wildcards).to_record(), role=True)

def settings(section):
    """The result-changing keys of a config section, canonical (dinopipe.config): a rule's
    params rerun its jobs only when a value that can change their outputs changes; the job
    reads the runtime-only keys (batch sizes, devices, threads...) from the config."""
    return result_params(config, section)

def volume_inputs(wildcards):
    """The files or folders holding a volume's raw and labels (`a.zarr/raw` -> `a.zarr`,
    `b.n5/raw/s0` -> `b.n5`, `c.h5:/stack` -> `c.h5`): real data, or what demo_data writes."""
    v = sheet_row(wildcards)
    return sorted({source_store(p) for p in (v.raw, v.labels) if p})

def prediction_features(wildcards):
    """A volume's cached features when prediction reads them (predict.source features)."""
    return [] if config["predict"]["source"] == "raw" else [f"results/features/{wildcards.volume}.zarr"]

def prediction_parts(wildcards):
    """The markers of every part of a distributed prediction (from the plan predict_create writes)."""
    plan = checkpoints.predict_create.get(volume=wildcards.volume).output.plan
    return expand("results/predictions/{volume}.parts/{part}.done", volume=wildcards.volume, part=part_names(plan))

def prediction_part_blocks(wildcards):
    """Which blocks a part job predicts (its message; dinopipe.distributed.describe_part)."""
    return describe_part(f"results/predictions/{wildcards.volume}.parts/plan.json", wildcards.part)

def train_volumes(wildcards):
    """The train volumes: an error only for jobs that need them (training and what needs the
    model), so `snakemake results/features/x.zarr` works with a sheet without train volumes."""
    if not TRAIN:
        raise ValueError(f"{config['volumes']}: no volume has role 'train'; training needs at least one")
    return TRAIN

def volume_targets(wildcards):
    """A labelled volume's targets store; nothing for an unlabelled one."""
    return ["results/targets/{volume}.zarr"] if sheet_row(wildcards).labels else []

def tuned_segment_parameters(wildcards):
    """The tune_segment rule's picked parameters, when the segment parameters are tuned."""
    return ["results/tune/segment.json"] if TUNE else []

def unscored_segmentations(wildcards):
    """Segmentations of predicted volumes without labels (their method and warnings go in the summary)."""
    return expand("results/segmentations/{volume}.zarr", volume=[v for v in PREDICT if v not in SCORED])

def all_outputs():
    return [
        *expand("results/metadata/{volume}.json", volume=sorted(VOLUMES)),
        # every predicted volume's segmentation, labelled or not (not only those with a figure)
        *expand("results/segmentations/{volume}.zarr", volume=PREDICT),
        "results/evaluation/summary.tsv",
        # the report's figures, so that a plain `snakemake` makes everything `--report` shows
        *expand("results/report/{volume}.png", volume=FIGURES),
        "results/report/loss_curve.png",
        # the tuning table and figure (the report shows them)
        *(["results/tune/segment.tsv", "results/tune/segment.png"] if TUNE else []),
    ]
