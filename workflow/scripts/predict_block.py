"""Distributed prediction, one block again: predict it in its batch, rewrite it in the finished store, record it."""

from pathlib import Path

from dinopipe.config import job_settings
from dinopipe.logs import logged
from dinopipe.runtime import one_job_gc
from dinopipe.stages import run_predict_block, volume_from_dict

with logged(snakemake.log[0]):  # noqa: F821
    one_job_gc()  # the process runs this one job: cheaper start and exit
    run_predict_block(
        snakemake.input.features[0] if snakemake.input.features else None,  # noqa: F821
        Path(snakemake.input.checkpoint).parent,  # noqa: F821
        snakemake.input.plan,  # noqa: F821
        snakemake.input.predictions,  # noqa: F821
        snakemake.output[0],  # noqa: F821
        int(snakemake.wildcards.index),  # noqa: F821
        job_settings(snakemake.params.predict, snakemake.config, "predict"),  # noqa: F821
        threads=snakemake.threads,  # noqa: F821
        volume=volume_from_dict(snakemake.params.volume),  # noqa: F821
        features=job_settings(snakemake.params.features, snakemake.config, "features"),  # noqa: F821
        data=job_settings(snakemake.params.data, snakemake.config, "data"),  # noqa: F821
    )
