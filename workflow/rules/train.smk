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
        train=settings("train"),
        features=settings("features"),
        # which volume is on which side: Snakemake compares the set of input files only, so
        # moving a volume from train to validate would otherwise rerun nothing
        roles={"train": TRAIN, "validate": VALIDATE},
        # Resumable state (latest.pt: model, optimiser, scheduler, RNG, step) deliberately
        # outside the outputs, which Snakemake deletes before rerunning the job.
        state_dir="results/model/state",
    threads: 8
    resources:
        mem_mb=per_attempt(64000),  # MB x attempt: crops in flight, model, optimiser
        runtime=1440,  # minutes
        **GPU,
    conda:
        "../envs/dinopipe.yaml"
    script:
        "../scripts/train.py"
