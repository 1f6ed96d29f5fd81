rule segment:
    input:
        predictions="results/predictions/{volume}.zarr",
        tuned=tuned_segment_parameters,
    output:
        directory("results/segmentations/{volume}.zarr"),
    log:
        "logs/segment/{volume}.log",
    benchmark:
        "results/benchmarks/segment/{volume}.tsv"
    params:
        segment=config["segment"],
    threads: 1
    resources:
        mem_mb=16000,
        runtime=60,
    conda:
        "../envs/dinopipe.yaml"
    script:
        "../scripts/segment.py"
