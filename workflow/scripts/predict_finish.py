"""Distributed prediction, last job: check every part and block, move the store into place."""

from dinopipe.logs import logged
from dinopipe.runtime import one_job_gc
from dinopipe.stages import run_predict_finish

with logged(snakemake.log[0]):  # noqa: F821
    one_job_gc()  # the process runs this one job: cheaper start and exit
    run_predict_finish(
        snakemake.input.plan,  # noqa: F821
        snakemake.input.staging,  # noqa: F821
        snakemake.input.markers,  # noqa: F821
        snakemake.output[0],  # noqa: F821
    )
