"""One tiny real workflow run, then: the HTML report opened in headless Chromium, every Zarr
output validated as OME-NGFF by an independent reader, and the `dinopipe` CLI on the demo."""

from __future__ import annotations

import csv
import html.parser
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from dinopipe import io
from dinopipe.evaluate import evaluate_segmentation
from dinopipe.segment import segment
from test_workflow import VOLUMES, snakemake

pytestmark = [pytest.mark.workflow, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
LABEL_VOXEL = (16.0, 16.0, 16.0)  # the tiny demo's label grid: 16 nm voxels, corner at 0
LABEL_TRANSLATION = (8.0, 8.0, 8.0)


class _Tables(html.parser.HTMLParser):
    """Collect the cells of rendered <table class="... dinopipe-summary ..."> elements (not script text)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[str]] = []
        self._in: bool = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table" and "dinopipe-summary" in (dict(attrs).get("class") or ""):
            self._in = True
            self.tables.append([])
        elif self._in and tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in = False
        elif tag in ("td", "th") and self._cell is not None:
            self.tables[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install -y chromium)")
def test_report_shows_summary_table_in_headless_chromium(project):
    snakemake(project, "--report", "report.html")
    report = project / "report.html"
    assert report.stat().st_size > 0
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
             "--virtual-time-budget=10000", "--dump-dom", report.as_uri()],
            capture_output=True, text=True, timeout=120,
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    parser = _Tables()
    parser.feed(proc.stdout)
    assert parser.tables, "no rendered summary table in the report's DOM"
    cells = parser.tables[0]
    # the front page's narrow table (results/evaluation/summary_brief.tsv)
    assert {"volume", "role", "VOI split", "VOI merge", "VOI sum", "adapted Rand error", "affinity bal. acc."} <= set(cells)
    assert "predict_0" in cells and "validate_0" in cells
    # figures rounded: no cell holds a number with more than 4 significant digits
    numbers = [c for c in cells if _is_float(c)]
    assert numbers and all(len(c.lstrip("-0.").replace(".", "").split("e")[0]) <= 4 for c in numbers), numbers


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


_MEASURE = """<script>
window.addEventListener("load", () => setTimeout(() => {
  const out = document.createElement("pre"); out.id = "dinopipe-measure";
  const box = e => { const r = e.getBoundingClientRect(); return {left: r.left, right: r.right}; };
  const graph = document.querySelector("canvas");
  out.textContent = JSON.stringify({viewport: document.documentElement.clientWidth,
    graph: graph ? box(graph) : null,
    tables: [...document.querySelectorAll("table.dinopipe-summary")].map(t => ({...box(t),
      width: t.getBoundingClientRect().width, scroll: t.scrollWidth,
      column: box(t.closest(".prose") || t.parentElement)}))});
  document.body.appendChild(out);
}, 3000));
</script>"""


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install -y chromium)")
@pytest.mark.parametrize("width", [1400, 1920])
def test_report_summary_table_fits_the_page_in_headless_chromium(project, tmp_path, width):
    report = project / "report.html"
    if not report.exists():
        snakemake(project, "--report", "report.html")
    text = report.read_text()
    # measure the rendered table from inside the page, once the report's scripts have run
    measured = tmp_path / "report.html"
    head, body_end, tail = text.rpartition("</body>")  # the last one: the report embeds HTML in its scripts too
    measured.write_text(head + _MEASURE + body_end + tail if body_end else text + _MEASURE)
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
             f"--window-size={width},1000", "--virtual-time-budget=15000", "--dump-dom", measured.as_uri()],
            capture_output=True, text=True, timeout=120,
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    start = proc.stdout.find('id="dinopipe-measure">')
    assert start >= 0, "the measuring script did not run"
    body = proc.stdout[start + len('id="dinopipe-measure">'):]
    result = json.loads(html.unescape(body[: body.index("</pre>")]))
    assert result["tables"], "no rendered summary table"
    for table in result["tables"]:
        # inside its text column, so not under the workflow graph beside it, and not clipped
        assert table["right"] <= table["column"]["right"] + 1 and table["scroll"] <= table["width"] + 1, result
        if result["graph"] and result["graph"]["left"] > table["left"]:
            assert table["right"] <= result["graph"]["left"], (width, result)
    # The figures are in the report too (embedded as data URIs).
    text = report.read_text()
    for name in ("predict_0.png", "loss_curve.png", "summary.tsv", "segment.png", "segment.tsv"):
        assert name in text


def test_segment_parameters_are_tuned_on_the_validate_volume(project):
    results = project / "results"
    choice = json.loads((results / "tune" / "segment.json").read_text())
    with open(results / "tune" / "segment.tsv", newline="") as f:
        table = list(csv.DictReader(f, delimiter="\t"))
    means = [r for r in table if r["volume"] == "mean"]
    assert choice["method"] == "agglomeration"  # the demo's method
    assert len(means) == 15  # its default grid: 5 thresholds x 3 seed thresholds
    picked = [r for r in means if r["picked"] == "yes"]
    assert len(picked) == 1 and float(picked[0]["voi_sum"]) == min(float(r["voi_sum"]) for r in means)
    params = choice["parameters"]
    assert (float(picked[0]["threshold"]), float(picked[0]["seed_threshold"])) == (params["threshold"],
                                                                                  params["seed_threshold"])
    # rescore the pick on the validate volume independently of the tuning code
    affs = io.read_image(results / "predictions" / "validate_0.zarr" / "affinities").read()
    offsets = zarr.open_group(str(results / "predictions" / "validate_0.zarr"), mode="r").attrs["dinopipe"]["offsets"]
    truth = io.read_image(results / "targets" / "validate_0.zarr" / "labels").read()
    labels = segment(affs.astype(np.float32), offsets, method="agglomeration", **params)
    voi = evaluate_segmentation(truth, labels)["voi_sum"]
    assert float(picked[0]["voi_sum"]) == pytest.approx(voi, rel=1e-3)
    # every predicted volume is segmented with the pick, and the summary says so
    seg = io.read_image(results / "segmentations" / "predict_0.zarr")
    assert seg.attrs["tuned"] and seg.attrs["parameters"] == {k: v for k, v in params.items() if k != "min_size"}
    with open(results / "evaluation" / "summary.tsv", newline="") as f:
        rows = {r["volume"]: r for r in csv.DictReader(f, delimiter="\t")}
    assert rows["predict_0"]["segment"] == rows["validate_0"]["segment"] == choice["segment"]
    assert rows["validate_0"]["role"] == "validate" and float(rows["validate_0"]["voi_sum"]) == pytest.approx(voi, rel=1e-3)
    assert 0 <= float(rows["validate_0"]["affinity_bacc"]) <= 1
    with Image.open(results / "tune" / "segment.png") as img:
        assert img.format == "PNG"


def test_report_figures(project):
    for name in ("predict_0", "loss_curve"):
        with Image.open(project / "results" / "report" / f"{name}.png") as img:
            assert img.format == "PNG" and min(img.size) >= 200
            assert len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)) > 10  # not blank


def _validate(group_path: Path, channel_axis: bool) -> None:
    from ome_zarr_models.v04 import Image

    image = Image.from_zarr(zarr.open_group(str(group_path), mode="r"))
    ms = image.attributes.multiscales[0]
    scale, translation = ms.datasets[0].coordinateTransformations
    spatial = 1 if channel_axis else 0
    assert [a.name for a in ms.axes] == (["c"] if channel_axis else []) + ["z", "y", "x"]
    assert all(a.unit == "nanometer" for a in ms.axes[spatial:])
    assert tuple(scale.scale[spatial:]) == LABEL_VOXEL, group_path
    assert tuple(translation.translation[spatial:]) == LABEL_TRANSLATION, group_path


def test_every_zarr_output_is_valid_ome_ngff(project):
    results = project / "results"
    for name in VOLUMES:
        _validate(results / "features" / f"{name}.zarr", channel_axis=True)
        for image, channels in (("labels", False), ("affinities", True), ("lsds", True),
                                ("boundary_weights", False), ("mask", False), ("raw", False)):
            _validate(results / "targets" / f"{name}.zarr" / image, channel_axis=channels)
    for name in ("predict_0",):
        _validate(results / "predictions" / f"{name}.zarr" / "affinities", channel_axis=True)
        _validate(results / "predictions" / f"{name}.zarr" / "lsds", channel_axis=True)
        _validate(results / "segmentations" / f"{name}.zarr", channel_axis=False)
        seg = io.read_image(results / "segmentations" / f"{name}.zarr")
        assert seg.array.dtype == np.uint64


def _cli() -> list[str]:
    exe = Path(sys.executable).parent / "dinopipe"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dinopipe.cli"]


def test_cli_runs_on_the_demo(project, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    base = [*_cli(), "run", "--checkpoint", "results/model", "--config", "config/config.yaml"]
    proc = subprocess.run([*base, "--features", "results/features/predict_0.zarr", "--out", str(tmp_path / "a"),
                           "--block-shape", "8", "16", "16"], cwd=project, capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Same library calls as the rules: the CLI's prediction equals the workflow's (other blocks, same result).
    ours = io.read_image(tmp_path / "a" / "predictions.zarr" / "affinities").read()
    rule = io.read_image(project / "results" / "predictions" / "predict_0.zarr" / "affinities").read()
    np.testing.assert_allclose(ours, rule, atol=1e-5)
    seg = io.read_image(tmp_path / "a" / "segmentation.zarr")
    assert seg.array.dtype == np.uint64 and seg.geometry.shape == tuple(rule.shape[1:])
    # End to end from raw, on the model's training grid; and segment alone with waterz.
    proc = subprocess.run([*base, "--raw", "resources/demo/predict_0.zarr/raw", "--out", str(tmp_path / "b")],
                          cwd=project, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert io.read_image(tmp_path / "b" / "segmentation.zarr").geometry.voxel_size == LABEL_VOXEL
    proc = subprocess.run([*_cli(), "segment", "--predictions", str(tmp_path / "a" / "predictions.zarr"),
                           "--out", str(tmp_path / "c.zarr"), "--method", "agglomeration"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # A mismatching checkpoint is a clear error, exit status 2.
    proc = subprocess.run([*_cli(), "predict", "--checkpoint", str(tmp_path), "--features",
                           "results/features/predict_0.zarr", "--out", str(tmp_path / "d.zarr")],
                          cwd=project, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "no model_config.json in model folder" in proc.stderr


def test_cli_segments_with_the_workflow_s_picked_parameters(project, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([*_cli(), "segment", "--predictions", "results/predictions/predict_0.zarr",
                           "--out", str(tmp_path / "seg.zarr"), "--config", "config/config.yaml",
                           "--tuned", "results/tune/segment.json"],
                          cwd=project, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = io.read_image(tmp_path / "seg.zarr")
    rule = io.read_image(project / "results" / "segmentations" / "predict_0.zarr")
    assert ours.attrs["tuned"] and ours.attrs["parameters"] == rule.attrs["parameters"]
    assert np.array_equal(ours.read(), rule.read())
