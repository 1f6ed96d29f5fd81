"""Example slices of one predicted volume for the report: raw | affinities | segmentation overlay."""

from dinopipe.config import job_settings
from dinopipe.logs import logged
from dinopipe.report import run_report_slices
from dinopipe.stages import volume_from_dict

with logged(snakemake.log[0]):  # noqa: F821
    run_report_slices(
        volume_from_dict(snakemake.params.volume),  # noqa: F821
        snakemake.input.predictions,  # noqa: F821
        snakemake.input.segmentation,  # noqa: F821
        snakemake.output[0],  # noqa: F821
        data=job_settings(snakemake.params.data, snakemake.config, "data"),  # noqa: F821
    )
