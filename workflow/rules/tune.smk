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
        segment=config["segment"],
        evaluate=config["evaluate"],
    threads: 1
    resources:
        mem_mb=16000,
        runtime=120,
    conda:
        "../envs/dinopipe.yaml"
    script:
        "../scripts/tune_segment.py"
