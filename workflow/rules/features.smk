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
        features=config["features"],
        data=config["data"],
    threads: 2
    resources:
        mem_mb=16000,
        runtime=120,
    conda:
        "../envs/dinopipe.yaml"
    script:
        "../scripts/features.py"
