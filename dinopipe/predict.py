"""Blockwise prediction of affinities and LSDs from a feature volume.

The volume is cut into blocks (z, y, x); each block is read with a halo of context
on every side (from :func:`dinopipe.unet.receptive_field_halo`, rounded up to a
multiple of ``2**levels``), the part of the halo outside the volume is filled by
reflection at the volume's faces, the network runs on block + halo, and only the
block (the core) is written. Halo and block shape are multiples of ``2**levels``,
so every block sees the pooling grid at the same phase: with batch norm (in eval
mode) or no normalisation the result does not depend on the block shape, and equals
a prediction of the whole volume as one block. Group and instance norm use
statistics over the whole block, so with them blocks show seams.

Output store (written atomically):

* ``affinities``: image (n_offsets, z, y, x) float32, sigmoid probabilities in [0, 1].
* ``lsds``: image (10, z, y, x) float32 in [0, 1] (only for models that predict LSDs).
* root attrs ``["dinopipe"]``: ``offsets`` and provenance (features, checkpoint,
  block shape, halo, feature signature).

Both images carry the features' voxel size and translation (nm).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from tqdm import tqdm

from dinopipe.features import check_compatible
from dinopipe.io import atomic_output, create_image, read_image
from dinopipe.train import autocast_context, resolve_device
from dinopipe.unet import NUM_LSD_CHANNELS, UNet3D, UNetConfig, receptive_field_halo, split_output

logger = logging.getLogger(__name__)


def load_model(checkpoint_dir: str | os.PathLike[str]) -> tuple[UNet3D, dict[str, Any]]:
    """Rebuild a trained model from ``model_config.json`` and ``checkpoint.pt``.

    The checkpoint is loaded with ``weights_only=True`` (no pickled objects).

    Args:
        checkpoint_dir: The training output folder (see :func:`dinopipe.train.train`).

    Returns:
        The model on the CPU in eval mode, and the model config dict.

    Raises:
        FileNotFoundError: A file is missing.
        ValueError: The config is malformed or does not match the checkpoint.
    """
    folder = Path(checkpoint_dir)
    config_path, checkpoint_path = folder / "model_config.json", folder / "checkpoint.pt"
    for path in (config_path, checkpoint_path):
        if not path.is_file():
            raise FileNotFoundError(f"no {path.name} in model folder {folder}")
    config = json.loads(config_path.read_text())
    if not isinstance(config, dict) or "unet" not in config or "offsets" not in config:
        raise ValueError(f"{config_path}: expected a dict with 'unet' and 'offsets' entries")
    model = UNet3D(UNetConfig.from_dict(config["unet"]))
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{checkpoint_path}: expected a dict with a 'model' state dict")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ValueError(f"{checkpoint_path} does not match the architecture in {config_path}: {exc}") from exc
    model.eval()
    return model, config


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _block_starts(shape: Sequence[int], block: Sequence[int]) -> Iterator[tuple[int, ...]]:
    yield from product(*(range(0, s, b) for s, b in zip(shape, block, strict=True)))


def _read_block(array: Any, start: Sequence[int], block: Sequence[int], halo: int) -> np.ndarray:
    """Read (C, block + 2 halo) around ``start``; outside the volume, reflect at its faces."""
    shape = array.shape[1:]
    lo = [s - halo for s in start]
    hi = [s + b + halo for s, b in zip(start, block, strict=True)]
    src = tuple(slice(max(a, 0), min(b, n)) for a, b, n in zip(lo, hi, shape, strict=True))
    data = np.asarray(array[(slice(None), *src)])
    pad = [(0, 0)] + [(s.start - a, b - s.stop) for s, a, b in zip(src, lo, hi, strict=True)]
    if any(p for pair in pad for p in pair):
        data = np.pad(data, pad, mode="reflect")
    return data


def _empty_image(path: Path, channels: int, image: Any, chunks: Sequence[int], attrs: Mapping[str, Any]) -> Any:
    """Create a float32 (channels, z, y, x) image on ``image``'s grid; return its writable array."""
    g = image.geometry
    return create_image(
        path, (channels, *g.shape), np.float32, g.voxel_size, g.translation,
        channel_axis=True, chunks=(channels, *chunks), attrs=attrs,
    )


def predict_volume(
    features_path: str | os.PathLike[str],
    checkpoint_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    block_shape: Sequence[int] = (32, 64, 64),
    device: str = "auto",
    batch_size: int = 1,
    autocast: bool = True,
) -> None:
    """Predict affinities (and LSDs) for a whole feature volume, block by block.

    Memory: one batch of blocks (with halo) plus the network's activations; outputs are
    written block by block into chunk-aligned zarr arrays.

    Args:
        features_path: Feature image (C, z, y, x), e.g. ``results/features/{volume}.zarr``.
        checkpoint_dir: Training output folder (``model_config.json`` + ``checkpoint.pt``).
        out_path: Output store, e.g. ``results/predictions/{volume}.zarr``.
        block_shape: Core block shape (z, y, x) in label voxels; rounded up to multiples
            of ``2**levels`` and capped at the (rounded-up) volume shape. Also the output
            chunk shape.
        device: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N".
        batch_size: Blocks per forward pass.
        autocast: Run in bf16 autocast on CUDA (ignored on CPU).

    Raises:
        ValueError: The features' channel count differs from the model's, or a bad
            ``block_shape`` / ``batch_size``.
    """
    features_path, checkpoint_dir = str(features_path), str(checkpoint_dir)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if len(block_shape) != 3 or any(
        isinstance(b, bool) or not isinstance(b, int | np.integer) or b < 1 for b in block_shape
    ):
        raise ValueError(f"block_shape must be three positive integers (z, y, x), got {block_shape!r}")
    model, config = load_model(checkpoint_dir)
    features = read_image(features_path)
    if not features.channel_axis:
        raise ValueError(f"features {features_path} must be (C, z, y, x), got shape {features.array.shape}")
    channels = int(features.array.shape[0])
    if channels != model.config.in_channels:
        raise ValueError(
            f"features {features_path} have {channels} channels but the model in {checkpoint_dir} "
            f"expects {model.config.in_channels}"
        )
    features_sig, model_sig = (features.attrs or {}).get("signature"), config.get("feature_signature")
    if features_sig is not None and model_sig is not None:
        check_compatible(features_sig, model_sig, str(features_path), f"the training features of {checkpoint_dir}")
    elif features_sig is not None or model_sig is not None:
        logger.warning("cannot check that features %s match model %s: only one records a signature",
                       features_path, checkpoint_dir)
    offsets = config["offsets"]
    num_offsets = len(offsets)
    lsds = model.config.out_channels == num_offsets + NUM_LSD_CHANNELS

    shape = features.geometry.shape
    divisor = model.config.divisor
    halo = _round_up(receptive_field_halo(model.config), divisor)
    block = tuple(
        min(_round_up(int(b), divisor), _round_up(s, divisor)) for b, s in zip(block_shape, shape, strict=True)
    )
    if block != tuple(block_shape):
        logger.info("block shape %s adjusted to %s (multiples of %d, at most the volume)", block_shape, block, divisor)
    chunks = tuple(min(b, s) for b, s in zip(block, shape, strict=True))
    starts = list(_block_starts(shape, block))
    dev = resolve_device(device)
    model.to(dev)
    logger.info(
        "predicting %s (shape %s) with %s: %d blocks of %s + halo %d, device %s",
        features_path,
        shape,
        checkpoint_dir,
        len(starts),
        block,
        halo,
        dev,
    )

    with atomic_output(out_path) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        aff_out = _empty_image(tmp / "affinities", num_offsets, features, chunks, {"offsets": offsets})
        lsd_out = _empty_image(tmp / "lsds", NUM_LSD_CHANNELS, features, chunks, {}) if lsds else None
        with tqdm(total=len(starts), desc="predict", unit="block", disable=None) as progress:
            for first in range(0, len(starts), batch_size):
                batch_starts = starts[first : first + batch_size]
                inputs = np.stack([_read_block(features.array, s, block, halo) for s in batch_starts])
                x = torch.from_numpy(inputs).to(dev).float()
                with torch.no_grad(), autocast_context(dev, autocast):
                    output = model(x)
                aff_logits, lsd = split_output(output.float(), num_offsets)
                aff = torch.sigmoid(aff_logits).cpu().numpy()
                lsd_np = lsd.cpu().numpy() if lsd is not None else None
                for i, start in enumerate(batch_starts):
                    core = [min(b, s - st) for b, s, st in zip(block, shape, start, strict=True)]
                    src = (slice(None), *(slice(halo, halo + c) for c in core))
                    dst = (slice(None), *(slice(st, st + c) for st, c in zip(start, core, strict=True)))
                    aff_out[dst] = aff[i][src]
                    if lsd_out is not None and lsd_np is not None:
                        lsd_out[dst] = lsd_np[i][src]
                progress.update(len(batch_starts))
        root.attrs["dinopipe"] = {
            "offsets": offsets,
            "lsds": lsds,
            "features": features_path,
            "checkpoint": checkpoint_dir,
            "block_shape": list(block),
            "halo": halo,
            "feature_signature": config.get("feature_signature"),
        }
    logger.info("wrote %s", out_path)
