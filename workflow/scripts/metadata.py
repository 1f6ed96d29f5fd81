"""Provenance, shapes, label statistics, timings and sizes of one volume."""

from dinopipe.logs import logged
from dinopipe.stages import run_metadata, volume_from_dict

with logged(snakemake.log[0]):  # noqa: F821
    run_metadata(
        volume_from_dict(snakemake.params.volume),  # noqa: F821
        snakemake.input.features,  # noqa: F821
        snakemake.input.targets[0] if snakemake.input.targets else None,  # noqa: F821
        snakemake.output[0],  # noqa: F821
        snakemake.config,  # noqa: F821
    )
