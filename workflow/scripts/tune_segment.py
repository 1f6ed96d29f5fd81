"""Pick the segment parameters on the validate volumes (grid of the chosen method, by VOI sum)."""

from dinopipe.logs import logged
from dinopipe.stages import run_tune_segment

with logged(snakemake.log[0]):  # noqa: F821
    inp, out = snakemake.input, snakemake.output  # noqa: F821
    run_tune_segment(
        list(zip(snakemake.params.volumes, inp.predictions, inp.targets)),  # noqa: F821
        out.table,
        out.choice,
        out.figure,
        snakemake.params.segment,  # noqa: F821
        ignore_labels=snakemake.params.evaluate["ignore_labels"],  # noqa: F821
    )
