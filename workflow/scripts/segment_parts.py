"""One step of a volume's blockwise segmentation across jobs (dinopipe.segment_parts), by rule."""

from dinopipe import segment_parts as steps
from dinopipe.logs import logged
from dinopipe.stages import segment_settings

with logged(snakemake.log[0]):  # noqa: F821
    rule, inp, out, wc = snakemake.rule, snakemake.input, snakemake.output, snakemake.wildcards  # noqa: F821
    final = f"results/segmentations/{wc.volume}.zarr"
    if rule == "segment_plan":
        settings = segment_settings(inp.predictions, snakemake.params.segment,  # noqa: F821
                                    tuned=inp.tuned[0] if inp.tuned else None)
        steps.run_plan(inp.predictions, final, settings, snakemake.config["segment"]["jobs"], out[0])  # noqa: F821
    elif rule == "segment_fragments":
        steps.run_fragments(final, int(wc.part), out[0])
    elif rule == "segment_faces":
        steps.run_faces(final, int(wc.part), out[0])
    elif rule == "segment_merge":
        steps.run_merge(inp.plan, list(inp.fragments), list(inp.faces), out[0])
    elif rule == "segment_relabel":
        steps.run_relabel(final, int(wc.part), inp.table, out[0])
    else:
        steps.run_finish(out[0], inp.plan, inp.table, list(inp.done))
