rule metadata:
    input:
        features="results/features/{volume}.zarr",
        targets=volume_targets,
    output:
        "results/metadata/{volume}.json",
    log:
        "logs/metadata/{volume}.log",
    params:
        volume=volume_record,
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/dinopipe.yaml"
    script:
        "../scripts/metadata.py"
