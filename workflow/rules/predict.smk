rule predict:
    input:
        features="results/features/{volume}.zarr",
        checkpoint="results/model/checkpoint.pt",
        model_config="results/model/model_config.json",
    output:
        directory("results/predictions/{volume}.zarr"),
    log:
        "logs/predict/{volume}.log",
    params:
        predict=config["predict"],
    threads: 2
    resources:
        mem_mb=16000,
        runtime=120,
    conda:
        "../envs/dinopipe.yaml"
    script:
        "../scripts/predict.py"
