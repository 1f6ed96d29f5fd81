rule metadata:
    input:
        features="results/features/{volume}.zarr",
        targets=volume_targets,
    output:
        "results/metadata/{volume}.json",
    log:
        "logs/metadata/{volume}.log",
    params:
        volume=volume_record_with_role,
    threads: 1
    resources:
        mem_mb=per_attempt(8000),  # MB x attempt: np.unique over the uint64 labels
        runtime=15,  # minutes
        bookkeeping=1,  # one of the 4 places of a bookkeeping group job (profiles/lsf)
    conda:
        "../envs/dinopipe.yaml"
    script:
        "../scripts/metadata.py"
