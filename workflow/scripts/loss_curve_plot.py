"""Plot the training loss curve for the report."""

from dinopipe.logs import logged
from dinopipe.curves import plot_curve_file

with logged(snakemake.log[0]):  # noqa: F821
    plot_curve_file(snakemake.input[0], snakemake.output[0])  # noqa: F821
