rule evaluate:
    input:
        segmentation="results/segmentations/{volume}.zarr",
        targets="results/targets/{volume}.zarr",
    output:
        "results/evaluation/{volume}.json",
    log:
        "logs/evaluate/{volume}.log",
    params:
        evaluate=config["evaluate"],
    resources:
        mem_mb=8000,
        runtime=30,
    conda:
        "../envs/dinopipe.yaml"
    script:
        "../scripts/evaluate.py"


rule evaluation_summary:
    input:
        expand("results/evaluation/{volume}.json", volume=SCORED),
    output:
        "results/evaluation/summary.tsv",
    log:
        "logs/evaluation_summary.log",
    params:
        unscored=[v for v in PREDICT if v not in SCORED],
    localrule: True
    conda:
        "../envs/dinopipe.yaml"
    script:
        "../scripts/evaluation_summary.py"
