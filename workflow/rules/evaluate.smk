rule baseline:
    input:
        targets=expand("results/targets/{volume}.zarr", volume=TRAIN),
    output:
        "results/evaluation/baseline.json",
    log:
        "logs/baseline.log",
    params:
        evaluate=settings("evaluate"),
    threads: 1
    resources:
        mem_mb=per_attempt(8000),  # MB x attempt: the train volumes' raw and labels, one watershed at a time
        runtime=60,  # minutes
    conda:
        "../envs/dinopipe.yaml"
    script:
        "../scripts/baseline.py"


rule evaluate:
    input:
        segmentation="results/segmentations/{volume}.zarr",
        targets="results/targets/{volume}.zarr",
        predictions="results/predictions/{volume}.zarr",
        # the classical baseline is an instance segmentation: not for class models
        baseline=["results/evaluation/baseline.json"] if config["evaluate"]["baseline"] and not CLASSES else [],
    output:
        "results/evaluation/{volume}.json",
    log:
        "logs/evaluate/{volume}.log",
    params:
        evaluate=settings("evaluate"),
    threads: 1
    resources:
        mem_mb=per_attempt(16000),  # MB x attempt: two label volumes, contingency table
        runtime=60,  # minutes
    conda:
        "../envs/dinopipe.yaml"
    script:
        "../scripts/evaluate.py"


rule evaluation_summary:
    input:
        evaluations=expand("results/evaluation/{volume}.json", volume=SCORED),
        tuned=tuned_segment_parameters,
        unscored=unscored_segmentations,
    output:
        summary=report(
            "results/evaluation/summary.tsv",
            caption="../report/summary.rst",
            category="Evaluation",
        ),
        # the front page's narrow table (workflow.rst)
        brief="results/evaluation/summary_brief.tsv",
    log:
        "logs/evaluation_summary.log",
    params:
        unscored=[v for v in PREDICT if v not in SCORED],
    localrule: True
    conda:
        "../envs/dinopipe.yaml"
    script:
        "../scripts/evaluation_summary.py"


# the report figure's panels: a class model shows class probabilities and the class image
SLICE_FIGURE = "raw | class probabilities | classes" if CLASSES else "raw | affinities | segmentation"


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
            labels={"volume": "{volume}", "figure": SLICE_FIGURE},
        ),
    log:
        "logs/report_slices/{volume}.log",
    params:
        volume=volume_record,
        data=settings("data"),
    threads: 1
    resources:
        mem_mb=per_attempt(4000),  # MB x attempt: a few slices
        runtime=15,  # minutes
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
