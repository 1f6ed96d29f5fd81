"""benchmarks/merge.py: the whole run at tiny size (its JSON line, goals, same results)."""

from __future__ import annotations

import json

import pytest

from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("merge")


def test_main_prints_every_figure_and_its_goals(bench, monkeypatch, capsys):
    monkeypatch.setattr(bench, "GRAPHS", {"tiny": (6, 6, 7)})
    monkeypatch.setattr(bench, "SUPER", 3)
    monkeypatch.setattr(bench, "REPEATS", 1)
    monkeypatch.setattr(bench, "DEMO_SHAPE", (32, 48, 48))
    bench.main()
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["benchmark"] == "merge" and line["same_result_tiny"] is True
    assert set(line["goals"]) <= set(line)
    for kind in bench.KINDS:
        assert line[f"us_per_edge_{kind}_tiny"] > 0 and line[f"bytes_per_edge_{kind}_tiny"] >= 0
    assert line["edges_tiny"] == 6 * 6 * 7 * 7 - sum(  # 7 directions, less the pairs leaving the grid
        6 * 6 * 7 - (6 - abs(d[0])) * (6 - abs(d[1])) * (7 - abs(d[2])) for d in bench.DIRECTIONS)
    assert 0 < line["top_edges_fraction_tiny"] < 1 and line["hierarchical_voi_bits_tiny"] >= 0
    assert all(line[f"demo_voi_vs_global_{name}"] >= 0 for name in bench.DEMO_LEVELS)


def test_voi_bits_by_hand(bench):
    import numpy as np

    a = np.array([0, 0, 1, 1])
    assert bench.voi_bits(a, a) == 0
    assert bench.voi_bits(a, np.array([0, 1, 2, 3])) == pytest.approx(1.0)  # split each pair: H(b|a) = 1 bit
