"""GPU readiness in one command: features bf16 vs fp32, training speed and data-wait, prediction speed.

Run on a CUDA machine from the repository root: ``.venv/bin/python benchmarks/gpu.py`` (a few
minutes; needs ~4 GB of free disk under the temporary folder and ~16 GB of host memory). On a
machine without CUDA it logs that it needs CUDA and prints ``{"benchmark": "gpu", "skipped":
"needs CUDA", ...}``, exiting 0.

Figures (all on ``--device``, default ``cuda``):

* ``features``: the features stage's extraction (``dinopipe.features.extract_features``) of a
  volume of 512-px slices (raw ``RAW_SHAPE`` at 8 nm onto a 16 nm label grid, xy plane, ViT-S/16
  architecture with seeded random weights) once with bf16 autocast and once in fp32. Per
  output channel, the cosine similarity between the two feature volumes (over all voxels):
  minimum and mean (goal: minimum >= 0.99); slices per second of each (after a warm-up pass).
* ``training``: ``dinopipe.train.train`` on a cached store of ``CHANNELS``-channel float16
  features (Gaussian noise) with real targets, batch 2 of 64^3 crops, the demo's UNet
  (2 levels, 8 base channels): steps per second and the share of step time spent waiting for
  the loader (goal <= 0.1) at the device's real step speed.
* ``prediction``: ``dinopipe.predict.predict_volume`` of the whole feature store with the
  model just trained, the default block shape: output voxels per second.

The last line is one JSON object with the figures and a "goals" key.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinopipe import io  # noqa: E402
from dinopipe.backbone import Backbone, load_backbone, weights_hash  # noqa: E402
from dinopipe.features import FeatureParams, extract_features  # noqa: E402
from dinopipe.geometry import Geometry  # noqa: E402

logger = logging.getLogger("benchmarks.gpu")

#: Raw volume (z, y, x) voxels at 8 nm for the features figure: 512-px xy slices.
RAW_SHAPE = (64, 512, 512)
CHANNELS = 384
#: Feature store (z, y, x) label voxels for training and prediction.
STORE_SHAPE = (128, 128, 128)
CROP = (64, 64, 64)
BATCH = 2
UNET = {"levels": 2, "base_channels": 8}
BACKBONE = "vit-s16"
OFFSETS = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [3, 0, 0], [0, 3, 0], [0, 0, 3]]
GOALS = {"features_cosine_min": ">= 0.99", "data_wait_fraction": "<= 0.1"}


def make_backbone(kind: str, device: str) -> Backbone:
    """``"vit-s16"``: the ViT-S/16 architecture (384 channels, 12 layers) with seeded random
    weights; anything else is passed to :func:`dinopipe.backbone.load_backbone` (e.g. ``"tiny-vit"``)."""
    if kind != "vit-s16":
        return load_backbone(kind, device=device)
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    model = DINOv3ViTModel(DINOv3ViTConfig(num_register_tokens=4)).eval().to(device)
    return Backbone(model, "vit-s16-random", None, "vit", 16, 384, 5, weights_hash(model), torch.device(device))


def channel_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity per channel of two (C, ...) arrays, over all other axes (float64)."""
    a2 = a.reshape(len(a), -1).astype(np.float64)
    b2 = b.reshape(len(b), -1).astype(np.float64)
    norms = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
    dots = (a2 * b2).sum(axis=1)
    return np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 1.0)


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def features_precision(device: str, backbone: str = "vit-s16", raw_shape: tuple[int, int, int] = RAW_SHAPE,
                       batch_size: int = 16) -> dict[str, Any]:
    """Extract xy features of a random raw volume with bf16 autocast and in fp32; compare them.

    Args:
        device: Torch device ("cuda", "cpu"); autocast only takes effect on CUDA.
        backbone: See :func:`make_backbone`.
        raw_shape: Raw voxels (z, y, x) at 8 nm; the output grid has half as many voxels per axis
            (16 nm), so every axis must be even.
        batch_size: Slices per backbone call.

    Returns:
        ``cosine_min``/``cosine_mean`` over channels, ``slices_per_s_bf16``/``_fp32``, ``slices``,
        ``image_size`` (px).
    """
    if any(s % 2 for s in raw_shape):
        raise ValueError(f"raw_shape must be even along every axis, got {raw_shape}")
    bb = make_backbone(backbone, device)
    raw = np.random.default_rng(0).integers(0, 255, raw_shape).astype(np.uint8)
    raw_geom = Geometry(raw_shape, (8.0,) * 3, (4.0,) * 3)
    out_geom = Geometry(tuple(s // 2 for s in raw_shape), (16.0,) * 3, (8.0,) * 3)
    results: dict[str, np.ndarray] = {}
    rates: dict[str, float] = {}
    for name, autocast in (("bf16", True), ("fp32", False)):
        params = FeatureParams(planes=["xy"], batch_size=batch_size, autocast=autocast, intensity="dtype",
                               device=device)
        warm = Geometry((2, *out_geom.shape[1:]), out_geom.voxel_size, out_geom.translation)
        extract_features(raw[:4], Geometry((4, *raw_shape[1:]), raw_geom.voxel_size, raw_geom.translation), warm,
                         bb, params)
        _synchronize(device)
        t0 = time.perf_counter()
        feats, info = extract_features(raw, raw_geom, out_geom, bb, params)
        _synchronize(device)
        seconds = time.perf_counter() - t0
        results[name] = feats
        rates[name] = info["timings"]["xy"]["slices"] / seconds
        logger.info("features %s: %d slices of %s px in %.2f s", name, info["timings"]["xy"]["slices"],
                    info["image_size"]["xy"], seconds)
    cos = channel_cosine(results["bf16"], results["fp32"])
    return {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
            "slices_per_s_bf16": rates["bf16"], "slices_per_s_fp32": rates["fp32"], "slices": int(raw_shape[0]),
            "image_size": info["image_size"]["xy"]}


def write_store(root: Path, shape: tuple[int, int, int] = STORE_SHAPE, channels: int = CHANNELS,
                seed: int = 0) -> tuple[str, str]:
    """A cached feature store (float16 noise, written as the features stage writes it) and its
    targets (random blocky labels with their affinities, LSDs, weights, mask) under ``root``.

    Returns:
        (features path, targets path)
    """
    from dinopipe.targets import compute_affinities, compute_lsds

    voxel = (16.0, 16.0, 16.0)
    rng = np.random.default_rng(seed)
    features = root / "features.zarr"
    chunks = io.default_chunks((channels, *shape), channel_axis=True, spatial=io.FEATURE_CHUNK)
    arr = io.create_image(features, (channels, *shape), np.float16, voxel, (8.0, 8.0, 8.0), channel_axis=True,
                          chunks=chunks, compress=False, order=io.FEATURE_ORDER)
    step = 16
    for z0 in range(0, shape[0], step):
        z1 = min(z0 + step, shape[0])
        arr[:, z0:z1] = rng.standard_normal((channels, z1 - z0, *shape[1:]), dtype=np.float32).astype(np.float16)
    cells = [max(1, s // 8) for s in shape]
    labels = rng.integers(1, 50, size=cells).astype(np.uint64)
    for axis, s in enumerate(shape):
        labels = np.repeat(labels, 8, axis=axis)[tuple(slice(0, s) if a == axis else slice(None) for a in range(3))]
    targets = root / "targets.zarr"
    import zarr

    group = zarr.open_group(str(targets), mode="w", zarr_format=2)
    group.attrs["dinopipe"] = {"offsets": OFFSETS}
    for key, data, channel_axis in (
        ("labels", labels, False),
        ("affinities", compute_affinities(labels, OFFSETS).astype(np.uint8), True),
        ("lsds", compute_lsds(labels, 32.0, voxel).astype(np.float16), True),
        ("boundary_weights", np.ones(shape, np.float32), False),
        ("mask", np.ones(shape, np.uint8), False),
        ("raw", rng.uniform(0, 1, size=shape).astype(np.float32), False),
    ):
        io.write_image(targets / key, data, voxel, (8.0, 8.0, 8.0), channel_axis=channel_axis)
    return str(features), str(targets)


def training_speed(root: Path, store: tuple[str, str], device: str, steps: int = 40,
                   crop: tuple[int, int, int] = CROP, batch_size: int = 2,
                   unet: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train on ``store`` for ``steps`` steps on ``device``; steps/s and the loader's data-wait share.

    Returns:
        ``steps_per_s`` (the first step, with its warm-up, included), ``data_wait_fraction``,
        ``seconds``, and ``model_dir`` (the trained model, for :func:`prediction_speed`).
    """
    from dinopipe.train import train

    model_dir = root / "model"
    summary = train([store], [], model_dir, {
        "steps": steps, "batch_size": batch_size, "crop_shape": list(crop), "validate_every": steps,
        "unet": unet or {"levels": 2, "base_channels": 8}, "tensorboard": False, "device": device,
        "resume": False,
    })
    return {"steps_per_s": steps / summary["seconds"], "data_wait_fraction": summary["data_wait_fraction"],
            "seconds": summary["seconds"], "model_dir": str(model_dir)}


def prediction_speed(root: Path, features: str, model_dir: str, device: str,
                     block_shape: tuple[int, int, int] | None = None) -> dict[str, Any]:
    """Predict the whole feature store blockwise on ``device``; output voxels per second.

    ``block_shape`` None: :func:`dinopipe.predict.predict_volume`'s default.
    """
    from dinopipe.predict import predict_volume

    kwargs = {} if block_shape is None else {"block_shape": block_shape}
    stats = predict_volume(features, model_dir, root / "prediction.zarr", device=device, **kwargs)
    shape = io.read_image(features).geometry.shape
    voxels = int(np.prod(shape))
    return {"voxels_per_s": voxels / stats["total_s"], "voxels": voxels, "blocks": stats["blocks"],
            "seconds": stats["total_s"]}


def skipped(reason: str) -> dict[str, Any]:
    """The JSON line of a run that measured nothing."""
    return {"benchmark": "gpu", "skipped": reason, "goals": GOALS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument("--steps", type=int, default=40, help="training steps")
    parser.add_argument("--dir", default=None, help="folder for the stores (default: a temporary one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("benchmarks/gpu.py needs CUDA (torch.cuda.is_available() is False): nothing measured")
        print(json.dumps(skipped("needs CUDA")))
        return 0
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    logger.info("device %s (%s)", args.device, name)
    feats = features_precision(args.device, BACKBONE, RAW_SHAPE)
    logger.info("features: bf16 vs fp32 cosine per channel min %.5f mean %.5f; slices/s bf16 %.1f fp32 %.1f",
                feats["cosine_min"], feats["cosine_mean"], feats["slices_per_s_bf16"], feats["slices_per_s_fp32"])
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        store = write_store(root, STORE_SHAPE, CHANNELS)
        training = training_speed(root, store, args.device, args.steps, CROP, BATCH, UNET)
        logger.info("training: %.2f steps/s, data wait %.1f %% of step time", training["steps_per_s"],
                    100 * training["data_wait_fraction"])
        prediction = prediction_speed(root, store[0], training.pop("model_dir"), args.device)
        logger.info("prediction: %.3g voxels/s (%d blocks)", prediction["voxels_per_s"], prediction["blocks"])
    print(json.dumps({
        "benchmark": "gpu",
        "device": name,
        "features": {k: (round(v, 5) if isinstance(v, float) else v) for k, v in feats.items()},
        "training": {k: round(v, 4) for k, v in training.items()},
        "prediction": {k: (round(v, 1) if isinstance(v, float) else v) for k, v in prediction.items()},
        "features_cosine_min": round(feats["cosine_min"], 5),
        "data_wait_fraction": round(training["data_wait_fraction"], 4),
        "goals": GOALS,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
