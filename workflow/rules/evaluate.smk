rule baseline:
    input:
        targets=expand("results/targets/{volume}.zarr", volume=TRAIN),
    output:
        "results/evaluation/baseline.json",
    log:
        "logs/baseline.log",
    params:
        evaluate=config["evaluate"],
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        "../envs/dinopipe.yaml"
    script:
        "../scripts/baseline.py"


rule evaluate:
    input:
        segmentation="results/segmentations/{volume}.zarr",
        targets="results/targets/{volume}.zarr",
        baseline=["results/evaluation/baseline.json"] if config["evaluate"]["baseline"] else [],
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
        evaluations=expand("results/evaluation/{volume}.json", volume=SCORED),
    output:
        report(
            "results/evaluation/summary.tsv",
            caption="../report/summary.rst",
            category="Evaluation",
        ),
    log:
        "logs/evaluation_summary.log",
    params:
        unscored=[v for v in PREDICT if v not in SCORED],
    localrule: True
    conda:
        "../envs/dinopipe.yaml"
    script:
        "../scripts/evaluation_summary.py"


rule report_slices:
    input:
        predictions="results/predictions/{volume}.zarr",
        segmentation="results/segmentations/{volume}.zarr",
        sources=volume_inputs,
    output:
        report(
            "results/report/{volume}.png",
            caption="../report/slices.rst",
            category="Predictions",
            labels={"volume": "{volume}", "figure": "raw | affinities | segmentation"},
        ),
    log:
        "logs/report_slices/{volume}.log",
    params:
        volume=volume_record,
        data=config["data"],
    resources:
        mem_mb=4000,
        runtime=10,
    conda:
        "../envs/dinopipe.yaml"
    script:
        "../scripts/report_slices.py"


rule loss_curve_plot:
    input:
        "results/model/loss_curve.tsv",
    output:
        report(
            "results/report/loss_curve.png",
            caption="../report/loss_curve.rst",
            category="Training",
            labels={"figure": "loss curve"},
        ),
    log:
        "logs/loss_curve_plot.log",
    localrule: True
    conda:
        "../envs/dinopipe.yaml"
    script:
        "../scripts/loss_curve_plot.py"
