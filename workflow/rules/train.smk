rule train:
    input:
        train_features=lambda w: expand("results/features/{volume}.zarr", volume=train_volumes(w)),
        train_targets=lambda w: expand("results/targets/{volume}.zarr", volume=train_volumes(w)),
        validate_features=expand("results/features/{volume}.zarr", volume=VALIDATE),
        validate_targets=expand("results/targets/{volume}.zarr", volume=VALIDATE),
    output:
        checkpoint="results/model/checkpoint.pt",
        model_config="results/model/model_config.json",
        curve="results/model/loss_curve.tsv",
        curve_png="results/model/loss_curve.png",
    log:
        "logs/train.log",
    benchmark:
        "results/benchmarks/train.tsv"
    params:
        train=config["train"],
        features=config["features"],
        # Resumable state (latest.pt: model, optimiser, scheduler, RNG, step) deliberately
        # outside the outputs, which Snakemake deletes before rerunning the job.
        state_dir="results/model/state",
    threads: 2
    resources:
        mem_mb=16000,
        runtime=720,
    conda:
        "../envs/dinopipe.yaml"
    script:
        "../scripts/train.py"
