"""Collect the per-volume evaluations (and the validate volumes' tuning scores) into results/evaluation/summary.tsv."""

from dinopipe.logs import logged
from dinopipe.stages import run_summary

with logged(snakemake.log[0]):  # noqa: F821
    inp = snakemake.input  # noqa: F821
    run_summary(inp.evaluations, snakemake.output.summary, unscored=snakemake.params.unscored,  # noqa: F821
                tuned=inp.tuned[0] if inp.tuned else None, unscored_segmentations=inp.unscored,
                brief_path=snakemake.output.brief)  # noqa: F821
