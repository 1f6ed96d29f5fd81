"""The volume sheet: parsing and every kind of bad row."""

from __future__ import annotations

import pytest

from dinopipe.sheet import by_role, parse_roi, read_sheet

HEADER = "name\traw\tlabels\trole\troi\n"


def _sheet(tmp_path, text):
    p = tmp_path / "volumes.tsv"
    p.write_text(text)
    return p


def test_reads_rows(tmp_path):
    p = _sheet(tmp_path, HEADER + "a\tr.zarr/raw\tr.zarr/labels\ttrain\t0:100,0:50,10:20\nb\tq.zarr/raw\t\tpredict\t\n")
    vols = read_sheet(p)
    assert [v.name for v in vols] == ["a", "b"]
    assert vols[0].roi == ((0, 100), (0, 50), (10, 20))
    assert vols[1].labels is None and vols[1].roi is None
    assert [v.name for v in by_role(vols, "predict")] == ["b"]


@pytest.mark.parametrize(
    "text, message",
    [
        (HEADER + "a\tr\t\ttrain\t\na\tr\t\ttrain\t\n", "line 3: duplicate volume name 'a'"),
        ("name\traw\trole\tcolour\na\tr\ttrain\tred\n", r"unknown column\(s\) \['colour'\]"),
        ("name\traw\na\tr\n", r"missing required column\(s\) \['role'\]"),
        (HEADER + "a\tr\t\ttest\t\n", "role 'test'; allowed"),
        (HEADER + "a b\tr\t\ttrain\t\n", "volume name 'a b'"),
        (HEADER + "a\tr\t\ttrain\t0:1,0:1\n", "roi '0:1,0:1'"),
        (HEADER + "a\t\t\ttrain\t\n", "column 'raw' is empty"),
        (HEADER, "no volumes"),
    ],
)
def test_bad_sheets(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        read_sheet(_sheet(tmp_path, text))


def test_missing_sheet(tmp_path):
    with pytest.raises(FileNotFoundError, match="volume sheet not found"):
        read_sheet(tmp_path / "nope.tsv")


def test_parse_roi_rejects_reversed_bounds():
    with pytest.raises(ValueError, match="z0 < z1"):
        parse_roi("10:0,0:1,0:1", "here")
    assert parse_roi("  ", "here") is None
