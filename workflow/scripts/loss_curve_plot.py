"""Plot the training loss curve for the report."""

from dinopipe.logs import logged
from dinopipe.report import plot_loss_curve

with logged(snakemake.log[0]):  # noqa: F821
    plot_loss_curve(snakemake.input[0], snakemake.output[0])  # noqa: F821
