"""benchmarks/distributed.py: its volumes (a demo texture mirrored to size) and its per-block arithmetic, at tiny size."""

from __future__ import annotations

import numpy as np
import pytest

from benchmark_scripts import load_benchmark


@pytest.fixture
def bench(monkeypatch):
    module = load_benchmark("distributed")
    monkeypatch.setattr(module, "BLOCK", [2, 4, 4])  # label voxels; raw 2x finer per axis
    return module


def test_the_volume_is_the_tile_mirrored_at_its_faces_on_the_label_grid_asked_for(bench, tmp_path):
    from dinopipe.sources import open_sources, source_args
    from dinopipe.stages import volume_from_dict

    tile = np.random.default_rng(0).integers(0, 256, size=(4, 8, 8), dtype=np.uint8)
    volume = bench.make_volume(tmp_path, "v", (2, 4, 2), tile)  # raw (8, 32, 16): 2 x 4 x 2 tiles
    src = open_sources(volume_from_dict(volume), **source_args(bench.DATA))
    assert src.grid.shape == (4, 16, 8) and src.grid.voxel_size == (16.0, 16.0, 16.0)
    assert src.raw.geometry.voxel_size == (8.0, 8.0, 8.0)
    raw = np.asarray(src.raw.array[...])
    expected = np.concatenate([tile, tile[::-1]], axis=0)
    expected = np.concatenate([expected, expected[:, ::-1]] * 2, axis=1)
    expected = np.concatenate([expected, expected[:, :, ::-1]], axis=2)
    np.testing.assert_array_equal(raw, expected)


def test_a_volume_that_is_not_a_whole_number_of_tiles_is_refused(bench, tmp_path):
    with pytest.raises(ValueError, match="whole number of tiles"):
        bench.make_volume(tmp_path, "v", (1, 1, 1), np.zeros((3, 8, 8), np.uint8))


def test_dry_run_milliseconds_per_block_beyond_the_one_part_run(bench):
    one, many = {"wall_s": 2.0, "cpu_s": 1.0}, {"wall_s": 2.0 + 4.08, "cpu_s": 1.0 + 8.16}
    assert bench.per_dry_block(many, one, "wall_s") == pytest.approx(1000 * 4.08 / (bench.DRY_BLOCKS - bench.BLOCKS_PER_JOB))
    assert bench.per_dry_block(many, one, "cpu_s") == pytest.approx(2 * bench.per_dry_block(many, one, "wall_s"))
