"""The ``train:`` config section: its defaults and the checks that turn it into run parameters.

:func:`resolve_train_params` fills in :data:`DEFAULT_TRAIN_PARAMS` (the schema's defaults,
``tests/test_config_defaults.py``) and refuses unknown keys and bad values with errors naming
the key and what is allowed. Shapes are (z, y, x) in label voxels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dinopipe.augment import resolve_augment_params
from dinopipe.loader import TARGET_TYPES
from dinopipe.losses import LOSSES, build_loss
from dinopipe.runtime import autocast_mode, resolve_device
from dinopipe.unet import UNetConfig

DEFAULT_TRAIN_PARAMS: dict[str, Any] = {
    "steps": 2000,  # optimiser steps in total (a rerun with more steps continues)
    "batch_size": 2,  # crops per step
    "crop_shape": [32, 64, 64],  # (z, y, x) label voxels, multiples of 2**unet.levels
    "learning_rate": 5e-4,  # AdamW peak learning rate
    "weight_decay": 1e-4,  # AdamW weight decay
    "lr_schedule": "cosine",  # "cosine" (to 0 at the last step) or "constant"
    "warmup_steps": 0,  # linear warm-up steps before the schedule
    "grad_clip_norm": 1.0,  # clip the gradient norm to this; None: no clipping
    "target": "affinities",  # "affinities" (+ LSDs) or "semantic" (classes)
    "loss": "bce",  # affinities: "bce", "focal", "dice", "tversky"; semantic: "cross_entropy"
    "loss_params": {},  # parameters of that loss only (e.g. {"gamma": 2.0} for focal)
    "lsds": True,  # affinities: also predict the 10 LSD channels
    "lsd_weight": 1.0,  # λ of the LSD MSE term
    "class_weights": None,  # semantic: per-class weights; None: the targets' attrs, else 1
    "input_raw": False,  # append the raw image on the label grid as an input channel
    "input_features": True,  # feed the cached features; False (with input_raw): a UNet on the raw alone
    "augment": {},  # dinopipe.augment.DEFAULT_AUGMENT_PARAMS
    "seed": 0,  # seeds model initialisation, crops, augmentation and validation crops
    "validate_every": 100,  # steps between validations (and resumable-state writes)
    "validation_crops": 8,  # fixed crops drawn from the validate volumes
    "min_mask_fraction": 0.1,  # reject crops with less of their mask set than this
    "sample_boundary": 0.0,  # fraction of training crops centred on label boundary voxels
    "early_stopping_patience": None,  # stop after this many validations without improvement
    "early_stopping_min_delta": 0.0,  # an improvement must lower val_loss by more than this
    "unet": {},  # UNetConfig fields except in_channels/out_channels (taken from the data)
    "device": "auto",  # "auto" (CUDA if available), "cpu", "cuda" or "cuda:N"
    "autocast": "bf16",  # CUDA mixed precision: "bf16", "fp16" (with loss scaling) or "none"
    "num_threads": None,  # torch.set_num_threads for the run; None: leave as is
    "loader_workers": 2,  # threads preparing batches
    "prefetch": 4,  # batches prepared ahead
    "resume": True,  # continue from out_dir/state/latest.pt when compatible
    "tensorboard": True,  # write TensorBoard scalars and image slices
}
"""Defaults of the ``train:`` config section; :func:`resolve_train_params` checks keys."""

LR_SCHEDULES = ("constant", "cosine")


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"train parameter {key!r} must be {allowed}, got {value!r}")


def resolve_train_params(params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Merge ``params`` over :data:`DEFAULT_TRAIN_PARAMS` and check every value.

    Raises:
        ValueError: An unknown key (named, with the allowed keys) or a bad value.
    """
    params = dict(params or {})
    unknown = sorted(set(params) - set(DEFAULT_TRAIN_PARAMS))
    if unknown:
        raise ValueError(f"unknown train parameters {unknown}; allowed: {sorted(DEFAULT_TRAIN_PARAMS)}")
    p = {**DEFAULT_TRAIN_PARAMS, **params}
    _check_numbers(p)
    _check_target(p)
    _check_model(p)
    resolve_device(p["device"], "train.device")
    return p


def _check_numbers(p: dict[str, Any]) -> None:
    """Counts, the crop, rates, thresholds and switches (normalised in place)."""
    integers = {
        "steps": 1, "batch_size": 1, "validate_every": 1, "validation_crops": 0, "warmup_steps": 0,
        "loader_workers": 1, "prefetch": 1,
    }
    for key, minimum in integers.items():
        _require(_is_int(p[key]) and p[key] >= minimum, key, p[key], f"an integer >= {minimum}")
        p[key] = int(p[key])
    _require(_is_int(p["seed"]), "seed", p["seed"], "an integer")
    p["seed"] = int(p["seed"])
    crop = p["crop_shape"]
    _require(
        isinstance(crop, Sequence) and len(crop) == 3 and all(_is_int(c) and c >= 1 for c in crop),
        "crop_shape", crop, "three positive integers (z, y, x) in label voxels",
    )
    p["crop_shape"] = [int(c) for c in crop]
    _require(_is_number(p["learning_rate"]) and p["learning_rate"] > 0, "learning_rate", p["learning_rate"], "> 0")
    for key in ("weight_decay", "lsd_weight", "early_stopping_min_delta"):
        _require(_is_number(p[key]) and p[key] >= 0, key, p[key], "a number >= 0")
    _require(
        p["grad_clip_norm"] is None or (_is_number(p["grad_clip_norm"]) and p["grad_clip_norm"] > 0),
        "grad_clip_norm", p["grad_clip_norm"], "a number > 0 or null",
    )
    _require(
        p["early_stopping_patience"] is None or (_is_int(p["early_stopping_patience"]) and p["early_stopping_patience"] >= 1),
        "early_stopping_patience", p["early_stopping_patience"], "an integer >= 1 or null",
    )
    for key in ("min_mask_fraction", "sample_boundary"):
        _require(_is_number(p[key]) and 0 <= p[key] <= 1, key, p[key], "a number in [0, 1]")
        p[key] = float(p[key])
    _require(p["lr_schedule"] in LR_SCHEDULES, "lr_schedule", p["lr_schedule"], f"one of {list(LR_SCHEDULES)}")
    p["autocast"] = autocast_mode(p["autocast"], "train.autocast")
    for key in ("lsds", "input_raw", "input_features", "resume", "tensorboard"):
        _require(isinstance(p[key], bool), key, p[key], "true or false")
    _require(
        p["num_threads"] is None or (_is_int(p["num_threads"]) and p["num_threads"] >= 1),
        "num_threads", p["num_threads"], "a positive integer or null",
    )


def _check_target(p: dict[str, Any]) -> None:
    """The inputs, the target type and its loss."""
    if not p["input_features"] and not p["input_raw"]:
        raise ValueError("train parameter 'input_features' is false but 'input_raw' is false too: the network "
                         "would have no input; set input_raw: true for a UNet on the raw alone")
    _require(p["target"] in TARGET_TYPES, "target", p["target"], f"one of {list(TARGET_TYPES)}")
    _require(isinstance(p["loss_params"], Mapping), "loss_params", p["loss_params"], "a mapping")
    _require(isinstance(p["loss"], str), "loss", p["loss"], "a loss name")
    p["loss_params"] = dict(p["loss_params"])
    if p["target"] == "semantic":
        # cross_entropy: exclusive classes (softmax); any other loss: overlapping classes, one
        # sigmoid per class (check_class_loss, against targets.classes_overlap)
        allowed = ["cross_entropy", *sorted(LOSSES)]
        _require(p["loss"] in allowed, "loss", p["loss"], f"one of {allowed} for target 'semantic'")
        if p["loss"] == "cross_entropy":
            _require(not p["loss_params"], "loss_params", p["loss_params"],
                     "empty for cross_entropy (use class_weights)")
        else:
            build_loss(p["loss"], **p["loss_params"])  # raises for unknown params / values
        cw = p["class_weights"]
        _require(
            cw is None or (isinstance(cw, Sequence) and len(cw) >= 1 and all(_is_number(w) and w >= 0 for w in cw)),
            "class_weights", cw, "null or a list of numbers >= 0 (one per class)",
        )
    else:
        if p["loss"] == "cross_entropy":
            raise ValueError("train parameter 'loss' is 'cross_entropy', which needs target: semantic")
        build_loss(p["loss"], **p["loss_params"])  # raises for unknown names / params
        _require(p["class_weights"] is None, "class_weights", p["class_weights"], "null for target 'affinities'")


def _check_model(p: dict[str, Any]) -> None:
    """Augmentation and the UNet (its fields; the crop divisible by its downsampling)."""
    _require(isinstance(p["augment"], Mapping), "augment", p["augment"], "a mapping")
    p["augment"] = resolve_augment_params(p["augment"])
    _require(isinstance(p["unet"], Mapping), "unet", p["unet"], "a mapping of UNetConfig fields")
    derived = sorted({"in_channels", "out_channels"} & set(p["unet"]))
    if derived:
        raise ValueError(
            f"train parameter 'unet' must not set {derived}: they follow from the feature channels, "
            "input_raw, the number of affinity offsets and 'lsds' (or the number of classes)"
        )
    p["unet"] = {
        k: v
        for k, v in UNetConfig.from_dict({**p["unet"], "in_channels": 1, "out_channels": 1}).to_dict().items()
        if k not in ("in_channels", "out_channels")
    }
    divisor = 2 ** p["unet"]["levels"]
    _require(
        all(c % divisor == 0 for c in p["crop_shape"]),
        "crop_shape", p["crop_shape"], f"divisible by 2**unet.levels = {divisor} on every axis",
    )
