rule tune_segment:
    input:
        predictions=expand("results/predictions/{volume}.zarr", volume=TUNING),
        targets=expand("results/targets/{volume}.zarr", volume=TUNING),
    output:
        table=report(
            "results/tune/segment.tsv",
            caption="../report/tune_table.rst",
            category="Segmentation tuning",
            labels={"figure": "table"},
        ),
        choice="results/tune/segment.json",
        figure=report(
            "results/tune/segment.png",
            caption="../report/tune_figure.rst",
            category="Segmentation tuning",
            labels={"figure": "VOI per parameter set"},
        ),
    log:
        "logs/tune_segment.log",
    benchmark:
        "results/benchmarks/tune_segment.tsv"
    params:
        volumes=TUNING,
        segment=settings("segment"),
        evaluate=settings("evaluate"),
    threads: 1
    resources:
        mem_mb=per_attempt(16000),  # MB x attempt: one validate volume's affinities, segmented per candidate
        runtime=120,  # minutes
    conda:
        "../envs/dinopipe.yaml"
    script:
        "../scripts/tune_segment.py"
