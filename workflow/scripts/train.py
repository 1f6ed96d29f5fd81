"""Train the 3D UNet on the cached features and targets of all train/validate volumes."""

from pathlib import Path

from dinopipe.config import job_settings
from dinopipe.logs import logged
from dinopipe.stages import run_train

with logged(snakemake.log[0]):  # noqa: F821
    inp = snakemake.input  # noqa: F821
    run_train(
        list(zip(inp.train_features, inp.train_targets)),
        list(zip(inp.validate_features, inp.validate_targets)),
        Path(snakemake.output.checkpoint).parent,  # noqa: F821
        job_settings(snakemake.params.train, snakemake.config, "train"),  # noqa: F821
        snakemake.params.features,  # noqa: F821
        threads=snakemake.threads,  # noqa: F821
        state_dir=snakemake.params.state_dir,  # noqa: F821
    )
