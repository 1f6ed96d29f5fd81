rule targets:
    input:
        volume_inputs,
    output:
        directory("results/targets/{volume}.zarr"),
    log:
        "logs/targets/{volume}.log",
    benchmark:
        "results/benchmarks/targets/{volume}.tsv"
    params:
        volume=volume_record,
        targets=settings("targets"),
        data=settings("data"),
    threads: 4
    resources:
        mem_mb=per_attempt(32000),  # MB x attempt: labels, affinities, LSDs, weights in memory
        runtime=240,  # minutes
    conda:
        "../envs/dinopipe.yaml"
    script:
        "../scripts/targets.py"
