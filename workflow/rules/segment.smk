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
        segment=settings("segment"),
    threads: 1
    resources:
        mem_mb=per_attempt(64000),  # MB x attempt: affinities plus the watershed's edge lists
        runtime=240,  # minutes
    conda:
        "../envs/dinopipe.yaml"
    script:
        "../scripts/segment.py"
