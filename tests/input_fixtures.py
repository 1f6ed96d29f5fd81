"""Writers for small input fixtures in formats dinopipe only reads (OME-NGFF 0.5, N5)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorstore as ts
import zarr


def write_ngff_v05(
    path: Path, scales: Sequence[np.ndarray], voxel_sizes: Sequence[Sequence[float]],
    translations: Sequence[Sequence[float]],
) -> None:
    """An OME-NGFF 0.5 multiscale image (Zarr v3, attributes under ``ome``) with scales s0, s1, ..."""
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    datasets = []
    for i, (data, vs, tr) in enumerate(zip(scales, voxel_sizes, translations)):
        group.create_array(f"s{i}", data=data, chunks=tuple(min(s, 4) for s in data.shape))
        datasets.append({"path": f"s{i}", "coordinateTransformations": [
            {"type": "scale", "scale": [float(v) for v in vs]},
            {"type": "translation", "translation": [float(t) for t in tr]}]})
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "name": path.name,
        "axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"],
        "datasets": datasets,
    }]}


def write_n5(container: Path, dataset: str, data: np.ndarray) -> None:
    """An N5 array (dimensions listed x, y, z in attributes.json, as Java and z5py write them)."""
    store = ts.open({
        "driver": "n5", "kvstore": {"driver": "file", "path": str(container / dataset)},
        "metadata": {"dimensions": list(data.shape[::-1]), "blockSize": [4, 4, 4],
                     "dataType": str(data.dtype), "compression": {"type": "gzip"}},
        "create": True, "delete_existing": True,
    }).result()
    store.T[...] = data
    (container / "attributes.json").write_text('{"n5": "2.0.0"}')
