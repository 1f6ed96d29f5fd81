"""Blockwise prediction of affinities and LSDs for one volume."""

from pathlib import Path

from dinopipe.logs import logged
from dinopipe.stages import run_predict

with logged(snakemake.log[0]):  # noqa: F821
    run_predict(
        snakemake.input.features,  # noqa: F821
        Path(snakemake.input.checkpoint).parent,  # noqa: F821
        snakemake.output[0],  # noqa: F821
        snakemake.params.predict,  # noqa: F821
        threads=snakemake.threads,  # noqa: F821
    )
