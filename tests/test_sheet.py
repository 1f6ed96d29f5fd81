"""The volume sheet: parsing and every kind of bad row."""

from __future__ import annotations

import pytest

from dinopipe.sheet import Volume, by_role, lookup, parse_roi, read_sheet

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
        (HEADER + "loss_curve\tr\t\tpredict\t\n", "line 2: volume name 'loss_curve' is reserved"),
    ],
)
def test_bad_sheets(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        read_sheet(_sheet(tmp_path, text))


def test_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    """Spreadsheet programs save UTF-8 with a BOM; it is not '\\ufeffname'."""
    p = tmp_path / "volumes.tsv"
    p.write_bytes(("\ufeff" + HEADER + "a\tr.zarr/raw\t\ttrain\t\r\n").encode("utf-8"))
    assert [(v.name, v.raw, v.role) for v in read_sheet(p)] == [("a", "r.zarr/raw", "train")]


def test_missing_sheet(tmp_path):
    with pytest.raises(FileNotFoundError, match="volume sheet not found"):
        read_sheet(tmp_path / "nope.tsv")


def test_parse_roi_rejects_reversed_bounds():
    with pytest.raises(ValueError, match="z0 < z1"):
        parse_roi("10:0,0:1,0:1", "here")
    assert parse_roi("  ", "here") is None


def test_geometry_columns_for_plain_arrays(tmp_path):
    header = "name\traw\tlabels\trole\tvoxel_size\toffset\tlabels_voxel_size\tlabels_offset\n"
    p = _sheet(tmp_path, header + "h\td/i.h5:/stack\td/l.h5:/stack\ttrain\t40,4,4\t0,-2,-2\t\t\n"
                        "n\td/v.n5/raw\td/v.n5/labels\tpredict\t8,8,8\t\t16,16,16\t8,8,8\n")
    h, n = read_sheet(p)
    assert h.voxel_size == (40.0, 4.0, 4.0) and h.offset == (0.0, -2.0, -2.0) and h.labels_voxel_size is None
    assert n.offset is None and n.labels_voxel_size == (16.0, 16.0, 16.0) and n.labels_offset == (8.0, 8.0, 8.0)
    # a record round-trips, and rows without geometry give the same record as before the columns existed
    from dinopipe.sheet import Volume

    assert Volume.from_record(h.to_record()) == h
    old = read_sheet(_sheet(tmp_path, HEADER + "a\tr.zarr/raw\t\ttrain\t0:1,0:2,0:3\n"))[0]
    assert old.to_record() == {"name": "a", "raw": "r.zarr/raw", "labels": None, "role": "train",
                               "roi": [[0, 1], [0, 2], [0, 3]]}


@pytest.mark.parametrize(
    "row, message",
    [
        ("a\tr\t\ttrain\t0,4,4\t\n", r"line 2 \(volume 'a'\): voxel_size '0,4,4' is not 'z,y,x' in nm \(three positive"),
        ("a\tr\t\ttrain\t4,4\t\n", "voxel_size '4,4'"),
        ("a\tr\t\ttrain\t4,4,4\tx,0,0\n", "offset 'x,0,0' is not 'z,y,x' in nm"),
        ("a\tr\t\ttrain\t4,4,4\t0,0,0\t8,8,8\n", "labels_voxel_size / labels_offset given but no labels"),
    ],
)
def test_bad_geometry_columns(tmp_path, row, message):
    header = "name\traw\tlabels\trole\tvoxel_size\toffset\tlabels_voxel_size\n"
    with pytest.raises(ValueError, match=message):
        read_sheet(_sheet(tmp_path, header + row))


def test_duplicate_column(tmp_path):
    with pytest.raises(ValueError, match=r"column\(s\) \['raw'\] appear more than once"):
        read_sheet(_sheet(tmp_path, "name\traw\traw\trole\na\tr\tr\ttrain\n"))


def test_lookup_names_the_unknown_volume_the_sheet_and_known_names():
    volumes = {f"vol_{i:03d}": Volume(f"vol_{i:03d}", "r.zarr/raw", None, "predict") for i in range(12)}
    assert lookup(volumes, "vol_003", "config/volumes.tsv") is volumes["vol_003"]
    with pytest.raises(ValueError) as err:
        lookup(volumes, "vol_3", "config/volumes.tsv")
    message = str(err.value)
    assert message.startswith("volume 'vol_3' is not in the volume sheet config/volumes.tsv (config key 'volumes'); ")
    assert "did you mean 'vol_003'" in message
    assert message.endswith("known volumes: vol_000, vol_001, vol_002, vol_003, vol_004, ... (12 in all)")
    with pytest.raises(ValueError, match=r"'zzz' is not .*; known volumes: vol_000, .*\(12 in all\)$"):
        lookup(volumes, "zzz", "s.tsv")


def test_distributed_column_marks_volumes(tmp_path):
    """The optional `distributed` column: true / false (any case) or empty; kept in the record only
    when set, and only in the record of the job that plans the parts (volume_params)."""
    from dinopipe.config import volume_params

    p = _sheet(tmp_path, "name\traw\trole\tdistributed\na\tr\tpredict\tTRUE\nb\tr\tpredict\tfalse\nc\tr\tpredict\t\n")
    a, b, c = read_sheet(p)
    assert (a.distributed, b.distributed, c.distributed) == (True, False, None)
    assert Volume.from_record(a.to_record()) == a and "distributed" not in c.to_record()
    assert "distributed" not in volume_params(a.to_record())
    assert volume_params(a.to_record(), distributed=True)["distributed"] is True
    assert volume_params(c.to_record(), distributed=True) == volume_params(c.to_record())  # no column: no rerun


def test_bad_distributed_value_names_sheet_row_and_column(tmp_path):
    p = _sheet(tmp_path, "name\traw\trole\tdistributed\na\tr\tpredict\tyes please\n")
    with pytest.raises(ValueError, match=r"volumes.tsv line 2 \(volume 'a'\): column 'distributed' is 'yes please'; "
                                         r"allowed: true, false, or empty"):
        read_sheet(p)


def test_distributed_column_without_predict_distributed_is_a_problem():
    from dinopipe.checks import check_distributed_flags
    from dinopipe.distributed import blocks_per_part

    vols = [Volume("a", "r", None, "predict", distributed=True), Volume("b", "r", None, "predict", distributed=False)]
    (problem,) = check_distributed_flags({"volumes": "config/volumes.tsv", "predict": {"distributed": None}}, vols)
    assert "['a']" in problem and "config/volumes.tsv" in problem and "predict.distributed is null" in problem
    assert check_distributed_flags({"predict": {"distributed": {"blocks_per_job": 4}}}, vols) == []
    # the column overrides min_voxels both ways
    small = {"blocks_per_job": 4, "min_voxels": 10**9}
    assert blocks_per_part(small, (64, 64, 64), 100) == 100
    assert blocks_per_part(small, (64, 64, 64), 100, flag=True) == 4
    assert blocks_per_part({"blocks_per_job": 4}, (64, 64, 64), 100, flag=False) == 100
