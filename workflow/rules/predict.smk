if config["predict"]["distributed"] is None:

    rule predict:
        input:
            features=prediction_features,
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

else:
    # One volume over many jobs (predict.distributed, dinopipe.distributed): the plan and an
    # empty staging store, one job per part of the blocks, then the check and the move.

    checkpoint predict_create:
        input:
            features=prediction_features,
            sources=volume_inputs,
            checkpoint="results/model/checkpoint.pt",
            model_config="results/model/model_config.json",
        output:
            plan="results/predictions/{volume}.parts/plan.json",
            staging=directory("results/predictions/{volume}.parts/staging.zarr"),
        log:
            "logs/predict_create/{volume}.log",
        params:
            volume=volume_record_for_plan,
            predict=settings("predict"),
            features=settings("features") if config["predict"]["source"] == "raw" else {},
            data=settings("data"),
        threads: 1
        resources:
            mem_mb=per_attempt(8000),  # MB x attempt: the model, a sample of the raw, the store's metadata
            runtime=60,  # minutes: the input checks read the whole raw once
        conda:
            "../envs/dinopipe.yaml"
        script:
            "../scripts/predict_create.py"

    rule predict_part:
        input:
            features=prediction_features,
            sources=volume_inputs,
            checkpoint="results/model/checkpoint.pt",
            model_config="results/model/model_config.json",
            plan="results/predictions/{volume}.parts/plan.json",
            # written into by every part: its date must not rerun the others
            staging=ancient("results/predictions/{volume}.parts/staging.zarr"),
        output:
            "results/predictions/{volume}.parts/{part}.done",
        log:
            "logs/predict_part/{volume}/{part}.log",
        benchmark:
            "results/benchmarks/predict_part/{volume}/{part}.tsv"
        message:
            "predict {wildcards.volume}: {params.blocks}"
        wildcard_constraints:
            part=r"\d+",
        params:
            volume=volume_record,
            predict=settings("predict"),
            features=settings("features") if config["predict"]["source"] == "raw" else {},
            data=settings("data"),
            blocks=prediction_part_blocks,
        threads: 8
        resources:
            mem_mb=per_attempt(32000),  # MB x attempt: a few blocks of features and predictions
            runtime=240,  # minutes
            **GPU,
        conda:
            "../envs/dinopipe.yaml"
        script:
            "../scripts/predict_part.py"

    rule predict_finish:
        input:
            markers=prediction_parts,
            plan="results/predictions/{volume}.parts/plan.json",
            staging=ancient("results/predictions/{volume}.parts/staging.zarr"),
        output:
            directory("results/predictions/{volume}.zarr"),
        log:
            "logs/predict_finish/{volume}.log",
        threads: 1
        resources:
            mem_mb=per_attempt(4000),  # MB x attempt: lists the store's chunks
            runtime=60,  # minutes
        conda:
            "../envs/dinopipe.yaml"
        script:
            "../scripts/predict_finish.py"

    # One block of a finished distributed prediction predicted again, by its index (C order of
    # the plan), and rewritten in place; the record names the block and whether it changed.
    rule predict_block:
        input:
            features=prediction_features,
            sources=volume_inputs,
            checkpoint="results/model/checkpoint.pt",
            model_config="results/model/model_config.json",
            plan="results/predictions/{volume}.parts/plan.json",
            # rewritten in place: a changed block makes it newer, so what reads it reruns
            predictions="results/predictions/{volume}.zarr",
        output:
            "results/predictions/{volume}.parts/blocks/{index}.json",
        log:
            "logs/predict_block/{volume}/{index}.log",
        message:
            "predict {wildcards.volume}: block {wildcards.index} again, into results/predictions/{wildcards.volume}.zarr"
        wildcard_constraints:
            index=r"\d+",
        params:
            volume=volume_record,
            predict=settings("predict"),
            features=settings("features") if config["predict"]["source"] == "raw" else {},
            data=settings("data"),
        threads: 8
        resources:
            mem_mb=per_attempt(32000),  # MB x attempt: one batch of blocks, as a part job
            runtime=60,  # minutes
            **GPU,
        conda:
            "../envs/dinopipe.yaml"
        script:
            "../scripts/predict_block.py"
