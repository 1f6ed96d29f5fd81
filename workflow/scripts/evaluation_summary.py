"""Collect the per-volume evaluations into results/evaluation/summary.tsv."""

from dinopipe.logs import logged
from dinopipe.stages import run_summary

with logged(snakemake.log[0]):  # noqa: F821
    run_summary(snakemake.input.evaluations, snakemake.output[0], unscored=snakemake.params.unscored)  # noqa: F821
