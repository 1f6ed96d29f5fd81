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
        predict=config["predict"],
        features=config["features"],
        data=config["data"],
    threads: 2
    resources:
        mem_mb=16000,
        runtime=120,
    conda:
        "../envs/dinopipe.yaml"
    script:
        "../scripts/predict.py"
