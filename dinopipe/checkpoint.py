"""Trained models on disk: ``model_config.json`` and ``checkpoint.pt``, written by training and read by prediction.

The one place for the checkpoint format, so that inference never imports training:
:func:`build_model_config` (what the model is: architecture, inputs, outputs, the features'
signature), :func:`save_checkpoint` (weights and optimiser state, written atomically) and
:func:`load_model` (the model rebuilt, weights loaded with ``weights_only=True``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dinopipe import __version__
from dinopipe.atomic import atomic_output
from dinopipe.targets import NUM_LSD_CHANNELS
from dinopipe.unet import UNet3D, UNetConfig, output_channels

#: Where the raw input channel of an ``input_raw`` model comes from (recorded in its config).
RAW_SOURCE = (
    "targets store image 'raw' (results/targets/{volume}.zarr/raw): the raw image scaled to 0..1 by "
    "the volume's 0.5-99.5 percentile range and area-averaged onto the label grid; appended as the last input channel"
)


def build_model_config(
    unet: UNetConfig,
    offsets: Sequence[Sequence[int]],
    lsds: bool,
    feature_signature: Mapping[str, Any] | None = None,
    train_params: Mapping[str, Any] | None = None,
    *,
    input_raw: bool = False,
    input_features: bool = True,
    target: str = "affinities",
    num_classes: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The contents of ``model_config.json`` (what :func:`load_model` reads).

    Args:
        unet: The architecture.
        offsets: Affinity offsets (z, y, x) in voxels, in output channel order.
        lsds: Whether the last 10 output channels are LSDs (through a sigmoid).
        feature_signature: Signature of the features the model was trained on.
        train_params: The resolved train parameters.
        input_raw: Whether the raw image on the label grid is the last input channel
            (``raw_source`` says where it comes from).
        input_features: Whether the features are input channels; False with ``input_raw``:
            the raw is the only input (``feature_channels`` 0).
        target: "affinities" or "semantic" (then ``num_classes`` class logits).
        num_classes: Number of classes for semantic targets.
        **extra: Further JSON-serialisable entries (e.g. the volume paths).
    """
    if target == "affinities":
        expected = output_channels(len(offsets), lsds)
        if unet.out_channels != expected:
            raise ValueError(
                f"UNet has {unet.out_channels} output channels but {len(offsets)} offsets "
                f"{'with' if lsds else 'without'} LSDs need {expected}"
            )
    elif unet.out_channels != num_classes:
        raise ValueError(f"UNet has {unet.out_channels} output channels but there are {num_classes} classes")
    feature_channels = unet.in_channels - int(input_raw) if input_features else 0
    return {
        "unet": unet.to_dict(),
        "in_channels": unet.in_channels,
        "feature_channels": feature_channels,
        "input_raw": bool(input_raw),
        "input_features": bool(input_features),
        "raw_source": RAW_SOURCE if input_raw else None,
        "target": target,
        "num_classes": num_classes,
        "offsets": [[int(o) for o in off] for off in offsets],
        "lsds": bool(lsds) and target == "affinities",
        "lsd_channels": NUM_LSD_CHANNELS if lsds and target == "affinities" else 0,
        "lsd_activation": "sigmoid",
        "feature_signature": dict(feature_signature) if feature_signature is not None else None,
        "train_params": dict(train_params) if train_params is not None else None,
        "dinopipe_version": __version__,
        **extra,
    }


def save_checkpoint(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, step: int = 0,
    **extra: Any,
) -> None:
    """Write ``{"model", "optimizer", "step", **extra}`` atomically (model tensors on CPU)."""
    state = {
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else {},
        "step": int(step),
        **extra,
    }
    with atomic_output(path) as tmp:
        torch.save(state, tmp)



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
    if config.get("target", "affinities") not in ("affinities", "semantic"):
        raise ValueError(
            f"{config_path}: the model predicts {config.get('target')!r} targets; prediction knows affinity "
            "models (target 'affinities') and class models (target 'semantic')"
        )
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


def takes_raw(config: Mapping[str, Any]) -> bool:
    """Whether the model takes the raw on the label grid as its last input channel."""
    return bool(config.get("input_raw", False))


def takes_features(config: Mapping[str, Any]) -> bool:
    """False for a model on the raw alone (``train.input_features: false``); older models: True."""
    return bool(config.get("input_features", True))
