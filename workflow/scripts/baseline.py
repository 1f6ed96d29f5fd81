"""Tune the classical baseline (watershed of the smoothed raw) on the train volumes' targets."""

from dinopipe.logs import logged
from dinopipe.stages import run_baseline

with logged(snakemake.log[0]):  # noqa: F821
    run_baseline(
        snakemake.input.targets,  # noqa: F821
        snakemake.output[0],  # noqa: F821
        ignore_labels=snakemake.params.evaluate["ignore_labels"],  # noqa: F821
    )
