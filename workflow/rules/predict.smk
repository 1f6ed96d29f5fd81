rule predict:
    input:
        features=lambda w: (
            [] if config["predict"]["source"] == "raw" else [f"results/features/{w.volume}.zarr"]
        ),
        sources=volume_inputs,
        checkpoint="results/model/checkpoint.pt",
        model_config="results/model/model_config.json",
    output:
        directory("results/predictions/{volume}.zarr"),
    log:
        "logs/predict/{volume}.log",
    benchmark:
        "results/benchmarks/predict/{volume}.tsv"
    params:
        volume=volume_record,
        predict=settings("predict"),
        # the features section matters only when features are computed here, from raw
        features=settings("features") if config["predict"]["source"] == "raw" else {},
        data=settings("data"),
    threads: 8
    resources:
        mem_mb=per_attempt(32000),  # MB x attempt: a few blocks of features and predictions
        runtime=240,  # minutes
        **GPU,
    conda:
        "../envs/dinopipe.yaml"
    script:
        "../scripts/predict.py"
