rule features:
    input:
        volume_inputs,
    output:
        directory("results/features/{volume}.zarr"),
    log:
        "logs/features/{volume}.log",
    benchmark:
        "results/benchmarks/features/{volume}.tsv"
    params:
        volume=volume_record,
        features=settings("features"),
        data=settings("data"),
    threads: 8
    resources:
        mem_mb=per_attempt(32000),  # MB x attempt: C x voxels float32 accumulator, model
        runtime=240,  # minutes
        **GPU,
    conda:
        "../envs/dinopipe.yaml"
    script:
        "../scripts/features.py"
