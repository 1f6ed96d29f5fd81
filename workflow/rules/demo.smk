rule demo_data:
    output:
        directory("resources/demo/{demo}.zarr"),
    log:
        "logs/demo_data/{demo}.log",
    params:
        demo=settings("demo"),
    threads: 1
    resources:
        mem_mb=per_attempt(2000),  # MB x attempt: synthetic demo volumes only
        runtime=15,  # minutes
    conda:
        "../envs/dinopipe.yaml"
    script:
        "../scripts/demo_data.py"
