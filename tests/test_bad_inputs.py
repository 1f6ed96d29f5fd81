"""The catalogue of bad input: every case is a real Snakemake run on a tiny project that
must fail with a non-zero exit status, a message naming the volume / key / path and what
was expected, and no partial output left behind.

Everything that the stores' metadata or the configuration reveal fails when the workflow
starts (``dinopipe.checks``), before any job, with every problem listed: the volumes of
``START_CASES`` share one dry run, the config combinations of ``CONFIG_CASES`` another.
Cases that need the data (NaN, all-zero labels, negative ids, missing chunks, an empty mask)
fail inside their job and share one ``--keep-going`` run (one bad volume each, so one
failure cannot hide another); cases that need a global setting (backbone, config key,
output folder) or earlier results (signature, checkpoint) get their own run.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
import zarr

from dinopipe import io
from test_workflow import snakemake, tiny_config

pytestmark = [pytest.mark.workflow, pytest.mark.slow]

HEADER = ["name", "raw", "labels", "role", "roi", "voxel_size"]
GOOD = ("good", "data/good.zarr/raw", "data/good.zarr/labels", "train", "", "")


def _labels(shape=(8, 16, 16)) -> np.ndarray:
    labels = np.zeros(shape, np.uint32)
    labels[:, : shape[1] // 2] = 1
    labels[:, shape[1] // 2 :, : shape[2] // 2] = 2
    labels[:, shape[1] // 2 :, shape[2] // 2 :] = 3
    labels[:, shape[1] // 2] = 0  # a membrane
    return labels


def _raw(shape=(16, 32, 32), dtype=np.uint8) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, shape).astype(dtype)


def write_inputs(data: Path) -> None:
    """A good volume (raw 8 nm, labels 16 nm, both from 0 nm) and one broken copy per case."""
    data.mkdir(parents=True, exist_ok=True)

    def image(store: str, raw: np.ndarray | None = None, labels: np.ndarray | None = None,
              label_voxel: float = 16.0, label_corner: float = 0.0) -> None:
        zarr.open_group(str(data / store), mode="w", zarr_format=2)
        if raw is not None:
            io.write_image(data / store / "raw", raw, (8, 8, 8), (4, 4, 4))
        if labels is not None:
            c = label_corner + label_voxel / 2
            io.write_image(data / store / "labels", labels, (label_voxel,) * 3, (c, c, c))

    image("good.zarr", _raw(), _labels())
    image("float_labels.zarr", _raw(), _labels().astype(np.float32))
    image("far_labels.zarr", _raw(), _labels(), label_corner=10_000)
    image("coarse_labels.zarr", _raw(), _labels((1, 2, 2)), label_voxel=160)
    image("zero_labels.zarr", _raw(), np.zeros((8, 16, 16), np.uint32))
    nan = _raw(dtype=np.float32)
    nan[3, 4, 5] = np.nan
    image("nan_raw.zarr", nan, _labels())
    image("lost_scale.zarr", _raw(), _labels())
    ms = zarr.open_group(str(data / "lost_scale.zarr/raw"), mode="a")
    attrs = ms.attrs["multiscales"]
    attrs[0]["datasets"][0]["path"] = "s9"  # listed, but never written
    ms.attrs["multiscales"] = attrs
    flat = zarr.open_array(str(data / "flat.zarr"), mode="w", zarr_format=2, shape=(32, 32), dtype="u1")
    flat[...] = 1
    plain = zarr.open_array(str(data / "plain.zarr"), mode="w", zarr_format=2, shape=(16, 32, 32), dtype="u1")
    plain[...] = _raw()
    with h5py.File(data / "vol.h5", "w") as f:
        f["volumes/raw"] = _raw()
    signed = _labels().astype(np.int32)
    signed[:2] = -1  # "not annotated" in a signed volume
    image("signed_labels.zarr", _raw(), signed)
    image("unlabelled.zarr", _raw(), np.full((8, 16, 16), 9, np.uint32))  # 9 is in unlabelled_ids
    image("small.zarr", _raw((8, 16, 16)), _labels((4, 8, 8)))  # smaller than train.crop_shape
    zarr.open_group(str(data / "holes.zarr"), mode="w", zarr_format=2)
    io.write_image(data / "holes.zarr" / "raw", _raw(), (8, 8, 8), (4, 4, 4), chunks=(8, 16, 16))
    io.write_image(data / "holes.zarr" / "labels", _labels(), (16, 16, 16), (8, 8, 8))
    (data / "holes.zarr" / "raw" / "s0" / "1" / "0" / "1").unlink()  # an incomplete copy
    sparse = np.full((8, 16, 16), 9, np.uint32)  # 9 is in unlabelled_ids: 32 annotated voxels only
    sparse[:, :2, :2] = 1
    image("sparse.zarr", _raw(), sparse)
    plain_labels = zarr.open_array(str(data / "plain_labels.zarr"), mode="w", zarr_format=2, shape=(8, 16, 16),
                                   dtype="u4")
    plain_labels[...] = _labels()  # at 16 nm, but the sheet does not say so


#: name -> (sheet row without the name, expected message regex): refused when the workflow starts
START_CASES: dict[str, tuple[tuple[str, ...], str]] = {
    "missing_dataset": (("data/vol.h5:/volumes/nope", "", "predict", "", "8,8,8"),
                        r"volume 'missing_dataset': raw: data/vol.h5:/volumes/nope: no dataset '/volumes/nope' in "
                        r"data/vol.h5; datasets there: \['/volumes/raw'\]"),
    "missing_scale": (("data/lost_scale.zarr/raw", "", "predict", "", ""),
                      r"volume 'missing_scale': raw: data/lost_scale.zarr/raw: scale 's9' is listed in "
                      r"'multiscales' but data/lost_scale.zarr/raw/s9 does not exist"),
    "float_labels": (("data/float_labels.zarr/raw", "data/float_labels.zarr/labels", "train", "", ""),
                     r"volume 'float_labels': labels data/float_labels.zarr/labels must be integer "
                     r"\(instance ids\), got float32"),
    "flat_raw": (("data/flat.zarr", "", "predict", "", "8,8,8"),
                 r"volume 'flat_raw': raw data/flat.zarr must be 3D \(z, y, x\), got shape \(32, 32\)"),
    "no_overlap": (("data/far_labels.zarr/raw", "data/far_labels.zarr/labels", "train", "", ""),
                   r"volume 'no_overlap': raw and labels do not overlap: raw data/far_labels.zarr/raw covers "
                   r"\[0:128, 0:256, 0:256\] nm, labels data/far_labels.zarr/labels cover \[10000:10128"),
    "bad_ratio": (("data/coarse_labels.zarr/raw", "data/coarse_labels.zarr/labels", "train", "", ""),
                  r"volume 'bad_ratio': raw voxel size 8.0 nm vs output \(label\) voxel size 160.0 nm on axis z "
                  r"\(ratio 0.05\) is outside the supported 0.1–16"),
    "roi_outside": (("data/good.zarr/raw", "data/good.zarr/labels", "train", "5000:6000,0:100,0:100", ""),
                    r"volume 'roi_outside': roi 5000:6000,0:100,0:100 nm lies outside the data "
                    r"\(raw data/good.zarr/raw covers \[0:128, 0:256, 0:256\] nm, labels data/good.zarr/labels "
                    r"cover \[0:128, 0:256, 0:256\] nm\)"),
    "no_voxel_size": (("data/plain.zarr", "", "predict", "", ""),
                      r"volume 'no_voxel_size': raw data/plain.zarr is a plain zarr array, which carries no voxel "
                      r"size: give it in the sheet column 'voxel_size' \(nm, 'z,y,x'\)"),
    "ngff_voxel_size": (("data/good.zarr/raw", "", "predict", "", "8,8,8"),
                        r"volume 'ngff_voxel_size': raw data/good.zarr/raw is an OME-NGFF multiscale group, which "
                        r"states its own voxel size and offset: leave the sheet columns 'voxel_size' and 'offset' "
                        r"empty"),
    "plain_labels": (("data/plain.zarr", "data/plain_labels.zarr", "train", "", "8,8,8"),
                     r"volume 'plain_labels': labels data/plain_labels.zarr are a plain zarr array without "
                     r"labels_voxel_size and their shape \[8, 16, 16\] differs from the raw's \[16, 32, 32\]"),
    "small_train": (("data/small.zarr/raw", "data/small.zarr/labels", "validate", "", ""),
                    r"volume 'small_train' \(validate\): its grid \[4, 8, 8\] \(z, y, x voxels\) is smaller than "
                    r"train.crop_shape \[8, 16, 16\]"),
    "other_grid": (("data/good.zarr/raw", "", "predict", "", ""),
                   r"volume 'other_grid' \(predict\): grid voxel size \[8.0, 8.0, 8.0\] nm differs from train "
                   r"volume 'good''s \[16.0, 16.0, 16.0\] nm"),
}


#: name -> (sheet row without the name, rule that fails, expected message regex): need the data
JOB_CASES: dict[str, tuple[tuple[str, ...], str, str]] = {
    "zero_labels": (("data/zero_labels.zarr/raw", "data/zero_labels.zarr/labels", "train", "", ""), "targets",
                    r"volume 'zero_labels': labels data/zero_labels.zarr/labels are all zero inside the processed "
                    r"region"),
    "nan_raw": (("data/nan_raw.zarr/raw", "data/nan_raw.zarr/labels", "train", "", ""), "features",
                r"volume 'nan_raw': raw data/nan_raw.zarr/raw holds 1\+ NaN or infinite values \(first at voxel "
                r"\[3, 4, 5\]\); raw must be finite"),
    "signed_labels": (("data/signed_labels.zarr/raw", "data/signed_labels.zarr/labels", "train", "", ""), "targets",
                      r"volume 'signed_labels': labels data/signed_labels.zarr/labels contains negative ids \(-1\); "
                      r"label ids must be >= 0, except ids listed in unlabelled_ids"),
    "unlabelled": (("data/unlabelled.zarr/raw", "data/unlabelled.zarr/labels", "train", "", ""), "targets",
                   r"volume 'unlabelled': labels data/unlabelled.zarr/labels: the mask is all zero \(no annotated "
                   r"voxel\) inside the processed region: every label id is in targets.unlabelled_ids \[9\]"),
    "missing_chunk": (("data/holes.zarr/raw", "data/holes.zarr/labels", "train", "", ""), "features",
                      r"volume 'missing_chunk': raw data/holes.zarr/raw/s0: 1 of 8 chunks are not stored \(first "
                      r"missing: 1/0/1\); they would read as the fill value 0, a hole in the data.*"
                      r"data.missing_chunks: fill"),
}


def catalogue_config() -> dict:
    """The tiny workflow config with a crop that fits the good volume's 8 x 16 x 16 grid."""
    config = tiny_config()
    config["train"]["crop_shape"] = [8, 16, 16]
    return config


def write_project(directory: Path, rows: list[tuple[str, ...]], config: dict | None = None) -> dict:
    config = config or catalogue_config()
    (directory / "config").mkdir(parents=True, exist_ok=True)
    (directory / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    lines = ["\t".join(HEADER), *("\t".join(r) for r in rows)]
    (directory / "config" / "volumes.tsv").write_text("\n".join(lines) + "\n")
    if not (directory / "data").exists():
        write_inputs(directory / "data")
    return config


def failed(proc) -> str:
    """The run failed; return its combined output."""
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"expected a failure, got exit status 0:\n{out}"
    return out


def leftovers(directory: Path) -> list[str]:
    """Temporary outputs left behind anywhere in the project."""
    return [str(p) for p in directory.rglob(".*.tmp-*")]


@pytest.fixture(scope="module")
def at_start(tmp_path_factory):
    """One dry run over a sheet holding the good volume plus one bad volume per start-up case."""
    directory = tmp_path_factory.mktemp("bad_start")
    write_project(directory, [GOOD, *((name, *row) for name, (row, _) in START_CASES.items())])
    return directory, snakemake(directory, "-n", check=False)


@pytest.mark.parametrize("name", sorted(START_CASES))
def test_bad_volume_fails_when_the_workflow_starts(at_start, name):
    """Found from the stores' metadata before any job runs; every bad volume is listed."""
    directory, proc = at_start
    out = failed(proc)
    assert f"{len(START_CASES)} problem(s) found before running any job" in out, out[-3000:]
    assert re.search(START_CASES[name][1], out), out[-3000:]
    assert not (directory / "results").exists() and not (directory / "logs").exists()


#: config section -> overrides, and the message each must produce (all in one dry run)
BAD_CONFIG = {
    "features": {"device": "gpu", "stride": 6, "low": 99.5, "high": 0.5},
    "targets": {"offsets": [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0], [0, 0, 3]]},
    "train": {"device": "cuda:x", "unet": {"levels": 5, "base_channels": 4}},
    "predict": {"device": "GPU"},
}
CONFIG_CASES = {
    "device_features": "features.device is 'gpu'; allowed: 'auto', 'cpu', 'cuda' or 'cuda:N'",
    "device_train": "train.device is 'cuda:x'",
    "device_predict": "predict.device is 'GPU'",
    "stride": "features.stride 6 does not divide the patch size 16 of backbone 'tiny-vit'; allowed: [1, 2, 4, 8, 16]",
    "low_high": "features.low (99.5) must be below features.high (0.5)",
    "zero_offset": "targets.offsets: [0, 0, 0] links a voxel to itself",
    "levels": "train.crop_shape [8, 16, 16] is not divisible by 2**train.unet.levels = 32",
    "augmentation": "affinity offset [0, 0, 3] becomes [0, 3, 0] under an augmentation",
}


@pytest.fixture(scope="module")
def bad_config(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bad_config")
    config = catalogue_config()
    for section, values in BAD_CONFIG.items():
        config[section].update(values)
    write_project(directory, [GOOD], config)
    return directory, snakemake(directory, "-n", "results/features/good.zarr", check=False)


@pytest.mark.parametrize("name", sorted(CONFIG_CASES))
def test_bad_config_combination_fails_when_the_workflow_starts(bad_config, name):
    """Even for a target that needs none of the bad keys: nothing runs with a broken config."""
    directory, proc = bad_config
    out = failed(proc)
    assert f"{len(CONFIG_CASES)} problem(s) found before running any job" in out, out[-3000:]
    assert CONFIG_CASES[name] in out, out[-3000:]
    assert not (directory / "results").exists()


@pytest.fixture(scope="module")
def keep_going(tmp_path_factory):
    """One run over a sheet holding the good volume plus one bad volume per job-level case."""
    directory = tmp_path_factory.mktemp("bad_jobs")
    rows = [GOOD, *((name, *row) for name, (row, _, _) in JOB_CASES.items())]
    config = catalogue_config()
    config["targets"]["unlabelled_ids"] = [9]
    write_project(directory, rows, config)
    targets = [f"results/{rule}/{name}.zarr" for name, (_, rule, _) in JOB_CASES.items()]
    proc = snakemake(directory, "--keep-going", *targets, check=False)
    return directory, proc


@pytest.mark.parametrize("name", sorted(JOB_CASES))
def test_bad_volume_fails_its_job_with_a_clear_message(keep_going, name):
    directory, proc = keep_going
    out = failed(proc)
    _, rule, message = JOB_CASES[name]
    assert re.search(rf"Error in rule {rule}:\n(    .*\n)*?    output: results/{rule}/{name}.zarr\n", out), out[-3000:]
    log = (directory / "logs" / rule / f"{name}.log").read_text()
    assert re.search(message, log), log
    assert re.search(message, out)  # also in what the user sees
    assert not (directory / "results" / rule / f"{name}.zarr").exists()
    assert not [p for p in leftovers(directory) if name in p]


def test_missing_path_fails_when_the_workflow_is_parsed(tmp_path):
    write_project(tmp_path, [GOOD, ("lost", "data/nowhere.zarr/raw", "", "predict", "", "8,8,8")])
    out = failed(snakemake(tmp_path, "-n", check=False))
    assert "volume 'lost': raw not found: data/nowhere.zarr/raw (data/nowhere.zarr does not exist" in out
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("target", ["results/features/good_0.zarr", "results/metadata/nosuchvolume.json",
                                    "results/evaluation/nosuchvolume.json"])
def test_unknown_volume_as_target(tmp_path, target):
    write_project(tmp_path, [GOOD, ("good_1", *GOOD[1:])])
    name = Path(target).stem.removesuffix(".zarr")
    out = failed(snakemake(tmp_path, "-n", target, check=False))
    message = (rf"volume '{name}' is not in the volume sheet config/volumes.tsv \(config key 'volumes'\); "
               + (r"did you mean 'good_1', 'good'\? " if name == "good_0" else "")
               + r"known volumes: good, good_1\n")
    assert re.search(message, out), out[-2000:]
    assert "KeyError" not in out
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    "header, rows, message",
    [
        (HEADER, [GOOD, GOOD], r"volumes.tsv line 3: duplicate volume name 'good'"),
        (["name", "raw", "labels", "role", "colour"], [GOOD[:4] + ("red",)],
         r"volumes.tsv: unknown column\(s\) \['colour'\]; allowed: \['name', 'raw', 'labels', 'role', 'roi', "
         r"'voxel_size', 'offset', 'labels_voxel_size', 'labels_offset', 'distributed'\]"),
        (HEADER, [("loss_curve", *GOOD[1:])],
         r"volumes.tsv line 2: volume name 'loss_curve' is reserved \(results/report/loss_curve.png is another "
         r"output\)"),
    ],
    ids=["duplicate_name", "unknown_column", "reserved_name"],
)
def test_bad_sheet_fails_when_the_workflow_is_parsed(tmp_path, header, rows, message):
    write_project(tmp_path, [])
    lines = ["\t".join(header), *("\t".join(r) for r in rows)]
    (tmp_path / "config" / "volumes.tsv").write_text("\n".join(lines) + "\n")
    out = failed(snakemake(tmp_path, "-n", check=False))
    assert re.search(message, out), out[-2000:]
    assert not (tmp_path / "results").exists()


def test_misspelled_config_key(tmp_path):
    config = catalogue_config()
    config["features"]["strde"] = 8
    write_project(tmp_path, [GOOD], config)
    out = failed(snakemake(tmp_path, "-n", check=False))
    assert re.search(r"Additional properties are not allowed \('strde' was unexpected\)", out), out[-2000:]
    assert "features" in out
    assert not (tmp_path / "results").exists()


def test_unknown_backbone_offline(tmp_path, monkeypatch):
    config = catalogue_config()
    config["features"]["backbone"] = "nobody/dinov3-does-not-exist"
    write_project(tmp_path, [GOOD], config)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = failed(snakemake(tmp_path, "results/features/good.zarr", check=False))
    assert "could not load backbone 'nobody/dinov3-does-not-exist'" in out
    assert "not available offline" in out
    assert not (tmp_path / "results" / "features" / "good.zarr").exists() and not leftovers(tmp_path)


def test_results_folder_not_writable(tmp_path):
    write_project(tmp_path, [GOOD])
    if os.geteuid() == 0:  # root writes anywhere: block the folder with a file instead
        (tmp_path / "results").mkdir()
        (tmp_path / "results" / "features").write_text("not a folder")
    else:
        (tmp_path / "results").mkdir(mode=0o555)
    try:
        out = failed(snakemake(tmp_path, "results/features/good.zarr", check=False))
    finally:
        (tmp_path / "results").chmod(0o755)
    assert "results/features" in out, out[-2000:]
    assert not (tmp_path / "results" / "features" / "good.zarr").exists() and not leftovers(tmp_path)


@pytest.fixture(scope="module")
def computed(tmp_path_factory):
    """A project whose good volume has features and targets."""
    directory = tmp_path_factory.mktemp("computed")
    write_project(directory, [GOOD])
    snakemake(directory, "results/features/good.zarr", "results/targets/good.zarr")
    return directory


def test_features_whose_signature_differs_from_the_config(computed):
    # features computed with all three planes; the config now asks for xy only, and the
    # user runs with mtime triggers so the cached features are not recomputed
    config = catalogue_config()
    config["features"]["planes"] = ["xy"]
    (computed / "xy.yaml").write_text(yaml.safe_dump(config))
    out = failed(snakemake(computed, "results/model/checkpoint.pt", "--configfile", str(computed / "xy.yaml"),
                           "--rerun-triggers", "mtime", check=False))
    assert "results/features/good.zarr" in out and "'planes'" in out, out[-3000:]
    assert re.search(r"Error in rule train", out)
    assert not (computed / "results" / "model" / "checkpoint.pt").exists() and not leftovers(computed)


def test_checkpoint_with_the_wrong_channel_count(computed):
    import torch

    from dinopipe.unet import UNet3D, UNetConfig

    model_dir = computed / "results" / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    unet = UNetConfig(in_channels=7, out_channels=6, levels=2, base_channels=4)
    torch.save({"model": UNet3D(unet).state_dict()}, model_dir / "checkpoint.pt")
    offsets = tiny_config()["targets"]["offsets"]
    (model_dir / "model_config.json").write_text(json.dumps({"unet": unet.to_dict(), "offsets": offsets}))
    (model_dir / "loss_curve.tsv").write_text("step\ttrain_loss\tval_loss\n")
    out = failed(snakemake(computed, "results/predictions/good.zarr", "--rerun-triggers", "mtime",
                           "--allowed-rules", "predict", check=False))
    assert re.search(r"features results/features/good.zarr have 32 channels but the model in results/model "
                     r"expects 7", out), out[-3000:]
    assert not (computed / "results" / "predictions" / "good.zarr").exists() and not leftovers(computed)


def test_sheet_without_train_volumes_blocks_only_training(tmp_path):
    """Per-volume preprocessing needs no train volume; training (and `snakemake`) names the sheet."""
    write_project(tmp_path, [("good", *GOOD[1:3], "predict", "", "")])
    snakemake(tmp_path, "-n", "results/features/good.zarr", "results/targets/good.zarr")
    out = failed(snakemake(tmp_path, "-n", check=False))
    assert "config/volumes.tsv: no volume has role 'train'; training needs at least one" in out, out[-2000:]
    assert not (tmp_path / "results").exists()


def test_sheet_with_a_byte_order_mark(tmp_path):
    """A sheet saved by a spreadsheet program (UTF-8 with BOM, CRLF) reads as any other."""
    write_project(tmp_path, [GOOD])
    sheet = tmp_path / "config" / "volumes.tsv"
    sheet.write_bytes(b"\xef\xbb\xbf" + sheet.read_bytes().replace(b"\n", b"\r\n"))
    out = snakemake(tmp_path, "-n", "results/features/good.zarr").stdout
    assert "features" in out


def test_nearly_empty_mask_is_refused_before_training(tmp_path):
    """A validate volume with 32 annotated voxels: its targets are made, but training refuses
    it by name instead of training "successfully" on nothing (loss 0, F1 nan)."""
    config = catalogue_config()
    config["targets"]["unlabelled_ids"] = [9]
    write_project(tmp_path, [GOOD, ("sparse", "data/sparse.zarr/raw", "data/sparse.zarr/labels", "validate", "", "")],
                  config)
    out = failed(snakemake(tmp_path, "results/model/checkpoint.pt", check=False))
    assert re.search(r"validate volume\(s\) with an empty or nearly empty mask \(sparse: 32 labelled voxel\(s\) in "
                     r"results/targets/sparse.zarr/mask\); a crop of \[8, 16, 16\] voxels needs at least 205", out), \
        out[-3000:]
    assert re.search(r"Error in rule train", out)
    assert not (tmp_path / "results" / "model" / "checkpoint.pt").exists() and not leftovers(tmp_path)
