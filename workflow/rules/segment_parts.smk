# The blockwise segmentation of each predicted volume as segment.jobs jobs per step
# (dinopipe.segment_parts): plan -> fragments (per part) -> faces (per part) -> merge ->
# relabel (per part) -> finish. Every file under {volume}.parts/ is temporary: a killed part is
# redone on the rerun, and once the volume's segmentation is in place they are deleted.

PARTS = "results/segmentations/{volume}.parts"


def all_parts(kind):
    """The per-part files of one step for every part of a volume."""
    return expand(f"{PARTS}/{kind}/{{part}}.{'json' if kind == 'relabelled' else 'npz'}", part=range(SEGMENT_JOBS),
                  allow_missing=True)


rule segment_plan:
    input:
        predictions="results/predictions/{volume}.zarr",
        tuned=tuned_segment_parameters,
    output:
        temp(f"{PARTS}/plan.json"),
    log:
        "logs/segment/{volume}.plan.log",
    params:
        segment=settings("segment"),
    localrule: True  # reads metadata, creates two empty stores
    conda:
        "../envs/dinopipe.yaml"
    script:
        "../scripts/segment_parts.py"


rule segment_fragments:
    input:
        plan=f"{PARTS}/plan.json",
        predictions="results/predictions/{volume}.zarr",
    output:
        temp(f"{PARTS}/fragments/{{part}}.npz"),
    log:
        "logs/segment/{volume}.fragments.{part}.log",
    wildcard_constraints:
        part=r"\d+",
    threads: 1
    resources:
        mem_mb=per_attempt(8000),  # MB x attempt: one block's affinities and watershed (128 x 256 x 256: ~1 GB)
        runtime=240,  # minutes
    conda:
        "../envs/dinopipe.yaml"
    script:
        "../scripts/segment_parts.py"


rule segment_faces:
    input:
        plan=f"{PARTS}/plan.json",
        predictions="results/predictions/{volume}.zarr",
        fragments=all_parts("fragments"),  # the fragments store is complete
    output:
        temp(f"{PARTS}/faces/{{part}}.npz"),
    log:
        "logs/segment/{volume}.faces.{part}.log",
    wildcard_constraints:
        part=r"\d+",
    threads: 1
    resources:
        mem_mb=per_attempt(4000),  # MB x attempt: one block of affinities and fragments (grown by the longest offset for mutex watershed)
        runtime=60,  # minutes
    conda:
        "../envs/dinopipe.yaml"
    script:
        "../scripts/segment_parts.py"


rule segment_merge:
    input:
        plan=f"{PARTS}/plan.json",
        fragments=all_parts("fragments"),
        faces=all_parts("faces"),
    output:
        temp(f"{PARTS}/table.npz"),
    log:
        "logs/segment/{volume}.merge.log",
    threads: 1
    resources:
        mem_mb=per_attempt(16000),  # MB x attempt: ~165 bytes per region-graph edge (docs/cluster.md section 8)
        runtime=60,  # minutes
    conda:
        "../envs/dinopipe.yaml"
    script:
        "../scripts/segment_parts.py"


rule segment_relabel:
    input:
        plan=f"{PARTS}/plan.json",
        table=f"{PARTS}/table.npz",
    output:
        temp(f"{PARTS}/relabelled/{{part}}.json"),
    log:
        "logs/segment/{volume}.relabel.{part}.log",
    wildcard_constraints:
        part=r"\d+",
    threads: 1
    resources:
        mem_mb=per_attempt(16000),  # MB x attempt: the table plus one block
        runtime=60,  # minutes
    conda:
        "../envs/dinopipe.yaml"
    script:
        "../scripts/segment_parts.py"


rule segment_finish:
    input:
        plan=f"{PARTS}/plan.json",
        table=f"{PARTS}/table.npz",
        done=all_parts("relabelled"),
    output:
        directory("results/segmentations/{volume}.zarr"),
    log:
        "logs/segment/{volume}.log",
    localrule: True  # checks the parts, renames the staging store
    conda:
        "../envs/dinopipe.yaml"
    script:
        "../scripts/segment_parts.py"
