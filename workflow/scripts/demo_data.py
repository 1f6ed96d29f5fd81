"""Write one synthetic demo volume (raw + labels, OME-NGFF)."""

from dinopipe.logs import logged
from dinopipe.stages import run_demo_data

with logged(snakemake.log[0]):  # noqa: F821
    demo = snakemake.params.demo  # noqa: F821
    run_demo_data(
        snakemake.wildcards.demo,  # noqa: F821
        snakemake.output[0],  # noqa: F821
        seed=demo["seed"],
        label_shape=demo["label_shape"],
        label_voxel_size=demo["label_voxel_size"],
        raw_factor=demo["raw_factor"],
        organelles=demo.get("organelles"),
    )
