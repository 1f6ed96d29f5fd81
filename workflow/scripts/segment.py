"""Segment one volume's predicted affinities."""

from dinopipe.logs import logged
from dinopipe.stages import run_segment

with logged(snakemake.log[0]):  # noqa: F821
    run_segment(snakemake.input[0], snakemake.output[0], snakemake.params.segment)  # noqa: F821
