"""Segment one volume's predicted affinities (with the tuned parameters when tune_segment ran)."""

from dinopipe.config import job_settings
from dinopipe.logs import logged
from dinopipe.stages import run_segment

with logged(snakemake.log[0]):  # noqa: F821
    inp = snakemake.input  # noqa: F821
    run_segment(inp.predictions, snakemake.output[0],
                job_settings(snakemake.params.segment, snakemake.config, "segment"),  # noqa: F821
                tuned=inp.tuned[0] if inp.tuned else None)
