"""Training targets of one volume (labels, affinities, LSDs, weights, mask, raw)."""

from dinopipe.config import job_settings
from dinopipe.logs import logged
from dinopipe.stages import run_targets, volume_from_dict

with logged(snakemake.log[0]):  # noqa: F821
    run_targets(
        volume_from_dict(snakemake.params.volume),  # noqa: F821
        snakemake.output[0],  # noqa: F821
        snakemake.params.targets,  # noqa: F821
        job_settings(snakemake.params.data, snakemake.config, "data"),  # noqa: F821
        threads=snakemake.threads,  # noqa: F821
    )
