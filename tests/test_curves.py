"""dinopipe.curves: the one writer, reader and plot of loss_curve.tsv."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dinopipe.curves import CURVE_COLUMNS, channel_names, curve_rows, plot_curve_file, read_curve, write_curve


def test_channel_names():
    assert channel_names([[1, 0, 0], [0, -3, 0]]) == ["1_0_0", "0_-3_0"]
    assert channel_names([[1, 0, 0]], num_classes=3) == ["class0", "class1", "class2"]
    assert channel_names([[1, 0, 0]], 3, ["background", "mito", "er"]) == ["background", "mito", "er"]


def test_write_read_round_trip(tmp_path):
    rows = [
        (1, 0.9, None, None, 1e-3, None),
        (2, 0.8, 0.85, 0.61, 5e-4, (0.6, 0.62)),
        (3, 0.7, None, None, 1e-4, None),
    ]
    path = tmp_path / "loss_curve.tsv"
    write_curve(path, rows, ["1_0_0", "0_1_0"])
    text = path.read_text().splitlines()
    assert text[0].split("\t") == [*CURVE_COLUMNS, "val_bacc_1_0_0", "val_bacc_0_1_0"]
    dicts = read_curve(path)
    assert [d["step"] for d in dicts] == ["1", "2", "3"]
    assert dicts[0]["val_loss"] == "" and float(dicts[1]["val_loss"]) == 0.85
    assert curve_rows(path) == rows


def test_read_curve_refuses_other_files(tmp_path):
    path = tmp_path / "summary.tsv"
    path.write_text("volume\tvoi_sum\nv\t1.0\n")
    with pytest.raises(ValueError, match=r"summary\.tsv: expected a TSV with the columns \['step'"):
        read_curve(path)


def test_plot_curve_file_draws_the_losses(tmp_path):
    rows = [(s, 1.0 / s, (1.2 / s if s % 10 == 0 else None), (0.7 if s % 10 == 0 else None), 1e-3, None)
            for s in range(1, 101)]
    write_curve(tmp_path / "c.tsv", rows)
    plot_curve_file(tmp_path / "c.tsv", tmp_path / "c.png")
    image = np.asarray(Image.open(tmp_path / "c.png").convert("RGB")).astype(int)
    assert image.shape == (400, 1000, 3)  # two panels, 10 x 4 inches at 100 dpi
    # matplotlib's C0 (blue: train) and C1 (orange: validation) lines are drawn
    for colour in ((31, 119, 180), (255, 127, 14)):
        assert (np.abs(image - colour).sum(axis=-1) < 30).sum() > 50, colour


def test_plot_curve_file_without_values(tmp_path):
    write_curve(tmp_path / "c.tsv", [])
    plot_curve_file(tmp_path / "c.tsv", tmp_path / "c.png")
    assert Image.open(tmp_path / "c.png").size == (1000, 400)
