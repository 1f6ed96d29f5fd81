rule demo_data:
    output:
        directory("resources/demo/{demo}.zarr"),
    log:
        "logs/demo_data/{demo}.log",
    params:
        demo=config["demo"],
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/dinopipe.yaml"
    script:
        "../scripts/demo_data.py"
