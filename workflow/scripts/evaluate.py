"""Score one volume's segmentation (and predicted affinities) against its labels."""

from dinopipe.logs import logged
from dinopipe.stages import run_evaluate

with logged(snakemake.log[0]):  # noqa: F821
    run_evaluate(
        snakemake.wildcards.volume,  # noqa: F821
        snakemake.input.segmentation,  # noqa: F821
        snakemake.input.targets,  # noqa: F821
        snakemake.output[0],  # noqa: F821
        ignore_labels=snakemake.params.evaluate["ignore_labels"],  # noqa: F821
        predictions_path=snakemake.input.predictions,  # noqa: F821
        baseline_path=snakemake.input.baseline[0] if snakemake.input.baseline else None,  # noqa: F821
    )
