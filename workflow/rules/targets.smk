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
        targets=config["targets"],
        data=config["data"],
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        "../envs/dinopipe.yaml"
    script:
        "../scripts/targets.py"
