"""Train a 3D UNet on precomputed DINOv3 features to predict affinities (+ LSDs) or classes.

Inputs per volume (the stores the features and targets stages write; README, "What the workflow does"):

* ``results/features/{volume}.zarr``: image (C, z, y, x) float16 on the label grid.
* ``results/targets/{volume}.zarr``: group of images ``affinities`` (n_offsets, z, y, x)
  uint8, ``lsds`` (10, z, y, x) float16, ``boundary_weights`` (z, y, x) float32,
  ``mask`` (z, y, x) uint8, ``raw`` (z, y, x) float32 and ``labels``, with the offsets
  in the root attrs ``["dinopipe"]["offsets"]``. Semantic targets (``target:
  semantic``) read ``semantic`` (z, y, x) uint8 classes instead, with ``num_classes``
  (and optionally ``class_weights``) in the root attrs.

Crops come from :mod:`dinopipe.loader` (tensorstore, threaded prefetch) and are
augmented by :mod:`dinopipe.augment`.

Outputs in ``out_dir``, written when training ends (a killed run leaves none of them):

* ``checkpoint.pt``: ``{"model": state_dict, "step": int, "val_loss": float | None}``,
  the model with the best validation loss (the final model without validation);
  tensors and plain values only: ``torch.load(..., weights_only=True)``.
* ``model_config.json``: everything needed to rebuild the model and feed it (see
  :func:`build_model_config`), incl. ``input_raw`` and where the raw comes from.
* ``loss_curve.tsv``: columns ``step``, ``train_loss``, ``val_loss``, ``val_bacc``,
  ``lr``, then ``val_bacc_<offset>`` per affinity offset (e.g. ``val_bacc_1_0_0``) or
  ``val_bacc_class<c>`` per class. ``val_bacc`` is the balanced accuracy on the
  validation crops (:func:`dinopipe.evaluate.balanced_accuracy`: the mean of the recalls
  of same-object and of boundary edges, per offset, then averaged over offsets; for
  classes, one class against the rest), so that the rare boundary edges count as much as
  the many edges inside objects: predicting "same object" everywhere scores 0.5. Row 0
  holds the validation of the untrained model; validation columns are empty on steps
  without validation. ``loss_curve.png`` plots it.

Resumable state in ``state_dir`` (default ``out_dir/state``; deliberately not a
Snakemake output, which Snakemake would delete before rerunning the job):

* ``latest.pt``: model, optimiser, scheduler, grad scaler, torch RNG states, step, the
  curve so far, the best validation and early-stopping counters, and the resume
  signature; written at every validation.
* ``best.pt``: the best model so far; ``loss_curve.tsv``: the curve so far.

A rerun continues from ``latest.pt`` only into the same run: the state records a
fingerprint of everything the run depends on (:func:`_resume_signature`: every
result-changing train key, the architecture and offsets, and per input volume its paths,
the features' signature, the targets' parameters and the identity of both stores, which
changes whenever a store is rewritten). Only ``steps`` and the runtime-only keys
(:data:`dinopipe.config.RESUME_FREE`) may differ; any other difference starts afresh
from step 0 with a warning naming what differs. Batches depend only on ``(seed, step)``,
so on CPU a resumed run is bitwise the run that was not interrupted. TensorBoard logs go
to ``out_dir/tensorboard``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinopipe.atomic import atomic_output, write_json
from dinopipe.augment import feature_noise, raw_intensity, resolve_augment_params
from dinopipe.checkpoint import build_model_config, save_checkpoint
from dinopipe.config import RESUME_FREE
from dinopipe.curves import Row, channel_names, plot_curve, write_curve
from dinopipe.evaluate import balanced_accuracy
from dinopipe.loader import (
    TARGET_TYPES,
    CropSampler,
    Prefetcher,
    VolumeStores,
    check_consistent,
    open_volume,
    to_device,
)
from dinopipe.logs import Progress
from dinopipe.losses import affinity_lsd_loss, build_loss, weighted_cross_entropy
from dinopipe.runtime import autocast_context, autocast_mode, resolve_device
from dinopipe.unet import UNet3D, UNetConfig, split_output, target_channels

logger = logging.getLogger(__name__)

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


class TrainingInterrupted(RuntimeError):
    """Raised by the ``stop_after_step`` testing hook of :func:`train` (simulates a kill)."""


# --------------------------------------------------------------------------- params


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
    if not p["input_features"] and not p["input_raw"]:
        raise ValueError("train parameter 'input_features' is false but 'input_raw' is false too: the network "
                         "would have no input; set input_raw: true for a UNet on the raw alone")
    _require(p["target"] in TARGET_TYPES, "target", p["target"], f"one of {list(TARGET_TYPES)}")
    _require(isinstance(p["loss_params"], Mapping), "loss_params", p["loss_params"], "a mapping")
    _require(isinstance(p["loss"], str), "loss", p["loss"], "a loss name")
    p["loss_params"] = dict(p["loss_params"])
    if p["target"] == "semantic":
        _require(p["loss"] == "cross_entropy", "loss", p["loss"], "'cross_entropy' for target 'semantic'")
        _require(not p["loss_params"], "loss_params", p["loss_params"], "empty for cross_entropy (use class_weights)")
        cw = p["class_weights"]
        _require(
            cw is None or (isinstance(cw, Sequence) and len(cw) >= 2 and all(_is_number(w) and w >= 0 for w in cw)),
            "class_weights", cw, "null or a list of >= 2 numbers >= 0",
        )
    else:
        if p["loss"] == "cross_entropy":
            raise ValueError("train parameter 'loss' is 'cross_entropy', which needs target: semantic")
        build_loss(p["loss"], **p["loss_params"])  # raises for unknown names / params
        _require(p["class_weights"] is None, "class_weights", p["class_weights"], "null for target 'affinities'")
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
    resolve_device(p["device"], "train.device")
    return p


# --------------------------------------------------------------------------- data


def _open_all(
    volumes: Sequence[tuple[str, str]], p: Mapping[str, Any], role: str, extra: Sequence[str] = (),
    boundary: bool = False,
) -> list[VolumeStores]:
    opened = []
    for i, entry in enumerate(volumes):
        if isinstance(entry, str | bytes) or len(entry) != 2:
            raise ValueError(f"{role} volume #{i} must be a (features_path, targets_path) pair, got {entry!r}")
        volume = open_volume(
            entry[0], entry[1], lsds=p["lsds"], raw=p["input_raw"], target=p["target"], extra=extra,
            boundary=boundary,
        )
        if any(c > s for c, s in zip(p["crop_shape"], volume.shape, strict=True)):
            raise ValueError(
                f"{role} volume {volume.name}: crop_shape {list(p['crop_shape'])} is larger than the volume "
                f"{list(volume.shape)} (z, y, x) ({volume.features_path}); use a smaller crop_shape"
            )
        opened.append(volume)
    check_masks(opened, p["crop_shape"], p["min_mask_fraction"], role)
    return opened


def check_masks(volumes: Sequence[VolumeStores], crop: Sequence[int], min_fraction: float, role: str) -> None:
    """Refuse volumes whose mask is empty or too small for one crop to reach ``min_fraction``.

    A crop is accepted when at least ``min_fraction`` of its voxels are masked in (labelled),
    so a volume needs ``ceil(min_fraction * prod(crop))`` (at least 1) labelled voxels, or no
    crop can ever be drawn from it and training would learn nothing (loss 0, F1 nan).

    Raises:
        ValueError: Naming every such volume, its labelled voxel count and targets path.
    """
    need = max(1, math.ceil(min_fraction * math.prod(int(c) for c in crop)))
    empty = [v for v in volumes if v.labelled < need]
    if empty:
        listed = "; ".join(f"{v.name}: {v.labelled} labelled voxel(s) in {v.targets_path}/mask" for v in empty)
        raise ValueError(
            f"{role} volume(s) with an empty or nearly empty mask ({listed}); a crop of {list(crop)} voxels needs "
            f"at least {need} labelled voxels (train.min_mask_fraction {min_fraction}). Check targets.unlabelled_ids "
            f"and targets.mask_erosion_nm, or remove these volumes from the {role} role"
        )


def _num_classes(volumes: Sequence[VolumeStores], p: Mapping[str, Any]) -> tuple[int, list[float] | None]:
    """Number of classes and class weights: ``train.class_weights``, else balanced weights over
    the known voxels of all ``volumes`` (from their targets' ``class_voxels``; a class absent
    from one crop keeps its weight), else the first volume's ``class_weights``."""
    first = volumes[0]
    n = first.attrs.get("num_classes")
    weights = p["class_weights"] if p["class_weights"] is not None else _pooled_weights(volumes)
    if weights is None:
        weights = first.attrs.get("class_weights")
    if n is None and weights is not None:
        n = len(weights)
    if n is None:
        raise ValueError(
            f"volume {first.name}: semantic targets {first.targets_path} have no 'num_classes' in their "
            "'dinopipe' attributes; set train.class_weights (one per class) or store num_classes"
        )
    if weights is not None and len(weights) != n:
        raise ValueError(f"{len(weights)} class weights for {n} classes (volume {first.name})")
    return int(n), None if weights is None else [float(w) for w in weights]


class _Objective:
    """Network input, loss and confusion counts of a batch, for either target type."""

    def __init__(self, p: Mapping[str, Any], num_offsets: int, class_weights: list[float] | None,
                 device: torch.device) -> None:
        self.p, self.num_offsets, self.device = p, num_offsets, device
        self.semantic = p["target"] == "semantic"
        self.class_weights = None if class_weights is None else torch.tensor(class_weights, device=device)
        self.aff_loss = None if self.semantic else build_loss(p["loss"], **p["loss_params"])

    def inputs(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """The network input; with ``generator`` (training), feature and raw intensity augmentation."""
        a = self.p["augment"]
        raw = batch["raw"] if self.p["input_raw"] else None
        if raw is not None and generator is not None:
            raw = raw_intensity(raw, a, generator)
        if not self.p["input_features"]:
            return raw
        x = batch["features"]
        if generator is not None:
            x = feature_noise(x, a["feature_noise"], a["channel_dropout"], generator)
        if raw is not None:
            x = torch.cat([x, raw], dim=1)
        return x

    def loss(self, output: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        output = output.float()
        if self.semantic:
            return weighted_cross_entropy(output, batch["semantic"], self.class_weights, batch["mask"])
        aff_logits, lsd_pred = split_output(output, self.num_offsets)
        return affinity_lsd_loss(
            aff_logits, batch["affinities"], lsd_pred, batch.get("lsds"), batch["weights"], batch["mask"],
            lsd_weight=self.p["lsd_weight"], affinity_loss=self.aff_loss,
        )

    def confusion(self, output: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> np.ndarray:
        """(TP, FP, FN, TN) over masked elements per channel: per offset, positive = affinity
        (predicted > 0.5, target 1); or per class, that class against the rest."""
        mask = batch["mask"] > 0
        if mask.dim() < output.dim():
            mask = mask.unsqueeze(1)
        if self.semantic:
            pred = output.argmax(1, keepdim=True)
            truth = batch["semantic"].unsqueeze(1)
            pairs = [(pred == c, truth == c) for c in range(output.shape[1])]
        else:
            pred = output[:, : self.num_offsets] > 0
            truth = batch["affinities"] > 0.5
            pairs = [(pred[:, k : k + 1], truth[:, k : k + 1]) for k in range(self.num_offsets)]
        counts = [[int((p & t & mask).sum()), int((p & ~t & mask).sum()), int((~p & t & mask).sum()),
                   int((~p & ~t & mask).sum())] for p, t in pairs]
        return np.array(counts, dtype=np.int64)


def _validate(
    model: UNet3D, sampler: CropSampler | None, crops: Sequence[tuple[int, tuple[int, ...]]],
    objective: _Objective, device: torch.device, autocast: str,
) -> tuple[float | None, float | None, tuple[float, ...] | None, dict[str, np.ndarray] | None]:
    """(mean per-crop loss, balanced accuracy, per-channel balanced accuracy, first crop's output
    on CPU) on the fixed validation crops, in eval mode."""
    if sampler is None or not crops:
        return None, None, None, None
    was_training = model.training
    model.eval()
    losses, counts, first = [], None, None
    with torch.no_grad():
        for index, start in crops:
            host = sampler.batch_of([(index, start)])
            batch = to_device(host, device)
            sampler.recycle(host)
            with autocast_context(device, autocast):
                output = model(objective.inputs(batch))
            losses.append(float(objective.loss(output, batch)))
            c = objective.confusion(output.float(), batch)
            counts = c if counts is None else counts + c
            if first is None:
                first = {"output": output.float().cpu().numpy()[0], "start": np.asarray(start), "index": np.asarray(index)}
    model.train(was_training)
    per_channel = balanced_accuracy(counts)
    valid = per_channel[~np.isnan(per_channel)]
    mean = float(valid.mean()) if valid.size else float("nan")
    return float(np.mean(losses)), mean, tuple(float(v) for v in per_channel), first


def validation_loss(
    model: UNet3D,
    volumes: Sequence[tuple[str, str]],
    params: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> float | None:
    """Validation loss of ``model`` on the fixed validation crops that :func:`train` uses.

    With the same ``params`` this reproduces the ``val_loss`` that :func:`train` logged.

    Returns:
        The mean per-crop loss, or None when there are no crops.
    """
    p = resolve_train_params(params)
    dev = resolve_device(device)
    opened = _open_all(volumes, p, "evaluate")
    if not opened:
        return None
    check_consistent(opened)
    sampler = CropSampler(opened, p["crop_shape"], 1, p["seed"], p["min_mask_fraction"], None,
                          lsds=p["lsds"], raw=p["input_raw"], target=p["target"])
    class_weights = _num_classes(opened, p)[1] if p["target"] == "semantic" else None
    objective = _Objective(p, len(opened[0].offsets), class_weights, dev)
    model.to(dev)
    return _validate(model, sampler, sampler.fixed_crops(p["validation_crops"]), objective, dev, p["autocast"])[0]


# --------------------------------------------------------------------------- outputs


def _pooled_weights(volumes: Sequence[VolumeStores]) -> list[float] | None:
    """Balanced inverse-frequency class weights (:func:`dinopipe.targets.compute_semantic_targets`'s
    rule) over the summed ``class_voxels`` of every volume; None when a volume lacks them."""
    counts = [v.attrs.get("class_voxels") for v in volumes]
    if any(c is None for c in counts) or len({len(c) for c in counts}) != 1:
        return None
    total = np.sum(np.asarray(counts, dtype=np.float64), axis=0)
    present = total > 0
    weights = np.zeros(len(total))
    weights[present] = total.sum() / (present.sum() * total[present])
    return weights.tolist()


def _class_names(volumes: Sequence[VolumeStores], p: Mapping[str, Any]) -> dict[str, Any]:
    """``class_names`` and ``instance_classes`` of semantic targets (:mod:`dinopipe.classes`), the
    same in every volume; nothing for affinity models or targets that record no names."""
    if p["target"] != "semantic":
        return {}
    keys = ("class_names", "instance_classes")
    first = {k: volumes[0].attrs.get(k) for k in keys}
    for v in volumes[1:]:
        other = {k: v.attrs.get(k) for k in keys}
        if other != first:
            raise ValueError(f"volumes {volumes[0].name} and {v.name} have different classes in their targets "
                             f"({first} vs {other}); recompute the targets with one targets.classes")
    return first if first["class_names"] else {}


def _lr_factor(params: Mapping[str, Any]) -> Callable[[int], float]:
    steps, warmup, schedule = params["steps"], params["warmup_steps"], params["lr_schedule"]

    def factor(step: int) -> float:  # step = number of optimiser steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@contextlib.contextmanager
def _torch_threads(num_threads: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _resume_signature(model_config: Mapping[str, Any], p: Mapping[str, Any], train_vols: Sequence[VolumeStores],
                      val_vols: Sequence[VolumeStores]) -> dict:
    """Everything a training run depends on, to resume only into the same run: the model,
    the result-changing train params (all but :data:`dinopipe.config.RESUME_FREE`) and,
    per volume, what its inputs hold (:meth:`dinopipe.loader.VolumeStores.identity`)."""
    return {
        "unet": model_config["unet"],
        "offsets": model_config["offsets"],
        "train_params": {k: v for k, v in p.items() if k not in RESUME_FREE},
        "inputs": {
            **{f"train {v.name}": v.identity() for v in train_vols},
            **{f"validate {v.name}": v.identity() for v in val_vols},
        },
    }


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def _step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(int(np.random.SeedSequence([seed, 2, step]).generate_state(1, np.uint64)[0] >> 1))
    return generator


class _Images:
    """TensorBoard image slices of the first validation crop: raw, labels, predicted affinities."""

    def __init__(self, volumes: Sequence[VolumeStores]) -> None:
        self.volumes = volumes

    def log(self, writer: Any, first: Mapping[str, np.ndarray] | None, crop: Sequence[int], step: int,
            num_offsets: int, semantic: bool) -> None:
        if writer is None or first is None:
            return
        volume = self.volumes[int(first["index"])]
        start = [int(s) for s in first["start"]]
        z = start[0] + crop[0] // 2
        plane = [z, *start[1:]], [1, *crop[1:]]
        if "raw" in volume.arrays:
            writer.add_image("val/raw", volume.read("raw", *plane).result()[0], step, dataformats="HW")
        if "labels" in volume.arrays:
            labels = volume.read("labels", *plane).result()[0].astype(np.uint64)
            colours = np.stack([(labels * k) % 251 for k in (97, 57, 31)]).astype(np.float32) / 250
            colours[:, labels == 0] = 0
            writer.add_image("val/labels", colours, step, dataformats="CHW")
        out = first["output"][:, crop[0] // 2]
        if semantic:
            classes = out.argmax(0)
            writer.add_image("val/predicted_classes", classes / max(1, out.shape[0] - 1), step, dataformats="HW")
        else:
            affs = 1 / (1 + np.exp(-out[: min(3, num_offsets)]))
            if affs.shape[0] < 3:
                affs = np.concatenate([affs, np.repeat(affs[-1:], 3 - affs.shape[0], 0)])
            writer.add_image("val/predicted_affinities", affs, step, dataformats="CHW")


# --------------------------------------------------------------------------- train


def train(
    train_volumes: Sequence[tuple[str, str]],
    validate_volumes: Sequence[tuple[str, str]],
    out_dir: str | Path,
    params: Mapping[str, Any],
    *,
    state_dir: str | Path | None = None,
    stop_after_step: int | None = None,
) -> dict[str, Any]:
    """Train a :class:`UNet3D` from features to affinities (+ LSDs) or semantic classes.

    Each step draws ``batch_size`` crops of ``crop_shape`` label voxels from the train
    volumes where their masks have labels (:class:`dinopipe.loader.CropSampler`),
    augments them (:mod:`dinopipe.augment`) and prepares them in ``loader_workers``
    threads, ``prefetch`` batches ahead. The loss is the boundary-weighted, masked
    affinity loss plus ``lsd_weight`` times the masked LSD MSE, or the class-weighted
    cross-entropy. AdamW, warm-up plus cosine or constant learning rate, gradient
    clipping, bf16/fp16 autocast on CUDA.

    Validation uses a fixed, seeded set of ``validation_crops`` crops from
    ``validate_volumes`` only (never from train volumes), before training (step 0),
    every ``validate_every`` steps and at the last step: loss and balanced accuracy
    (overall and per offset or class; see ``loss_curve.tsv`` above). Training stops
    early after ``early_stopping_patience`` validations without an improvement of more
    than ``early_stopping_min_delta``. Without validate volumes a warning is logged
    and no validation is done.

    Args:
        train_volumes: (features_path, targets_path) pairs to train on.
        validate_volumes: (features_path, targets_path) pairs to validate on.
        out_dir: Folder for ``checkpoint.pt``, ``model_config.json``, ``loss_curve.tsv``,
            ``loss_curve.png`` and ``tensorboard/``.
        params: The ``train:`` config section; see :data:`DEFAULT_TRAIN_PARAMS`.
        state_dir: Resumable state (default ``out_dir/state``).
        stop_after_step: Testing hook: raise :class:`TrainingInterrupted` after this step,
            as if the job were killed there (state written only at validations).

    Returns:
        Summary: ``steps``, ``start_step``, ``stopped_early``, ``final_train_loss``,
        ``best_val_loss``, ``best_val_step``, ``final_val_loss``, ``seconds``,
        ``data_wait_fraction``, ``device``.

    Raises:
        ValueError: Invalid params, no train volumes, a crop larger than a volume,
            volumes that disagree on feature channels or offsets, or a train volume
            that is also a validate volume.
    """
    p = resolve_train_params(params)
    if not train_volumes:
        raise ValueError("train() needs at least one train volume, got none")
    both = sorted({str(f) for f, _ in train_volumes} & {str(f) for f, _ in validate_volumes})
    if both:
        raise ValueError(f"volumes {both} are both train and validate volumes; a volume must be on one side only")
    device = resolve_device(p["device"])
    crop = p["crop_shape"]
    out = Path(out_dir)
    state = Path(state_dir) if state_dir is not None else out / "state"
    out.mkdir(parents=True, exist_ok=True)
    state.mkdir(parents=True, exist_ok=True)

    with _torch_threads(p["num_threads"]):
        train_vols = _open_all(train_volumes, p, "train", boundary=p["sample_boundary"] > 0)
        val_vols = _open_all(validate_volumes, p, "validate", extra=("labels", "raw") if p["tensorboard"] else ())
        check_consistent(train_vols + val_vols)
        first = train_vols[0]
        offsets, num_offsets = first.offsets, len(first.offsets)
        num_classes, class_weights = _num_classes(train_vols, p) if p["target"] == "semantic" else (None, None)
        if not val_vols:
            logger.warning("no validate volumes given: training without validation (val_loss stays empty)")
        in_ch, out_ch = target_channels(
            p["target"], num_offsets=num_offsets, lsds=p["lsds"], num_classes=num_classes or 0,
            input_raw=p["input_raw"], feature_channels=first.channels if p["input_features"] else 0,
        )
        unet_config = UNetConfig.from_dict({**p["unet"], "in_channels": in_ch, "out_channels": out_ch})
        volumes_used = {
            "train_volumes": [list(map(str, v)) for v in train_volumes],
            "validate_volumes": [list(map(str, v)) for v in validate_volumes],
        }
        model_config = build_model_config(
            unet_config, offsets, p["lsds"], first.signature, p, input_raw=p["input_raw"],
            input_features=p["input_features"], target=p["target"],
            num_classes=num_classes, class_weights=class_weights, **_class_names(train_vols + val_vols, p),
            **volumes_used,
        )
        logger.info(
            "training on %d volume(s) (%s), validating on %d, %d feature channels%s, offsets %s, device %s",
            len(train_vols), ", ".join(v.name for v in train_vols), len(val_vols), first.channels,
            " + raw" if p["input_raw"] else "", offsets, device,
        )

        torch.manual_seed(p["seed"])
        model = UNet3D(unet_config).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=p["learning_rate"], weight_decay=p["weight_decay"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(p))
        scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and p["autocast"] == "fp16")
        objective = _Objective(p, num_offsets, class_weights, device)
        channels = channel_names(offsets, num_classes)
        sampler = CropSampler(train_vols, crop, p["batch_size"], p["seed"], p["min_mask_fraction"], p["augment"],
                              lsds=p["lsds"], raw=p["input_raw"], target=p["target"],
                              boundary_fraction=p["sample_boundary"])
        val_sampler = (
            CropSampler(val_vols, crop, 1, p["seed"], p["min_mask_fraction"], None,
                        lsds=p["lsds"], raw=p["input_raw"], target=p["target"]) if val_vols else None
        )
        val_crops = val_sampler.fixed_crops(p["validation_crops"]) if val_sampler else []
        if val_vols and not val_crops:
            logger.warning("validation_crops is 0: training without validation")

        signature = _resume_signature(model_config, p, train_vols, val_vols)
        rows: list[Row] = []
        best: tuple[float, int] | None = None
        bad_validations, stopped_early, start_step = 0, False, 0
        latest = state / "latest.pt"
        if p["resume"] and latest.is_file():
            saved = torch.load(latest, map_location="cpu", weights_only=True)
            differs = _differences(saved.get("signature", {}), signature)
            if differs:
                logger.warning("not resuming from %s: settings differ in %s; starting from step 0", latest, differs)
            elif saved["step"] > p["steps"]:
                logger.warning("not resuming from %s: it is at step %d, beyond steps=%d; starting from step 0",
                               latest, saved["step"], p["steps"])
            else:
                model.load_state_dict(saved["model"])
                optimizer.load_state_dict(saved["optimizer"])
                scheduler.load_state_dict(saved["scheduler"])
                scaler.load_state_dict(saved["scaler"])
                torch.set_rng_state(saved["torch_rng"])
                if device.type == "cuda" and saved.get("cuda_rng") is not None:
                    torch.cuda.set_rng_state(saved["cuda_rng"], device)
                start_step = int(saved["step"])
                rows = [tuple(r) for r in saved["rows"]]  # type: ignore[misc]
                best = tuple(saved["best"]) if saved["best"] is not None else None  # type: ignore[assignment]
                bad_validations, stopped_early = int(saved["bad_validations"]), bool(saved["stopped_early"])
                if stopped_early and p["steps"] > int(saved["steps_param"]):  # asked for more steps: train on
                    stopped_early, bad_validations = False, 0
                logger.info("resuming from %s at step %d of %d", latest, start_step, p["steps"])

        writer = None
        if p["tensorboard"]:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step if start_step else None)
        images = _Images(val_vols)

        def save_state(step: int) -> None:
            save_checkpoint(
                latest, model, optimizer, step, scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                torch_rng=torch.get_rng_state(),
                cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                rows=[list(r) for r in rows], best=list(best) if best else None,
                bad_validations=bad_validations, stopped_early=stopped_early, signature=signature,
                steps_param=p["steps"],
            )
            write_curve(state / "loss_curve.tsv", rows, channels)

        def validation(step: int) -> tuple[float | None, float | None, tuple[float, ...] | None]:
            nonlocal best, bad_validations, stopped_early
            val_loss, val_bacc, per_channel, first_crop = _validate(model, val_sampler, val_crops, objective, device,
                                                                    p["autocast"])
            if val_loss is None:
                return None, None, None
            images.log(writer, first_crop, crop, step, num_offsets, p["target"] == "semantic")
            logger.info("step %d: validation balanced accuracy %.4f; per %s: %s", step, val_bacc,
                        "class" if num_classes else "offset",
                        ", ".join(f"{n} {v:.3f}" for n, v in zip(channels, per_channel or ())))
            if writer is not None:
                writer.add_scalar("val/loss", val_loss, step)
                writer.add_scalar("val/bacc", val_bacc, step)
                for name, value in zip(channels, per_channel or ()):
                    writer.add_scalar(f"val/bacc_{name}", value, step)
            if best is None or val_loss < best[0] - p["early_stopping_min_delta"]:
                best = (val_loss, step)
                bad_validations = 0
                save_checkpoint(state / "best.pt", model, None, step, val_loss=val_loss)
            else:
                bad_validations += 1
                patience = p["early_stopping_patience"]
                if patience is not None and bad_validations >= patience:
                    stopped_early = True
            return val_loss, val_bacc, per_channel

        if start_step == 0:
            rows = []
            val_loss, val_bacc, per_channel = validation(0)
            if val_loss is not None:
                rows.append((0, None, val_loss, val_bacc, None, per_channel))
                logger.info("step 0: val_loss %.5f val_bacc %.4f", val_loss, val_bacc)

        started = time.perf_counter()
        train_loss = rows[-1][1] if rows and rows[-1][1] is not None else float("nan")
        step_seconds = 0.0
        model.train()
        progress = Progress(p["steps"], "train", "step", initial=start_step)
        prefetcher = None
        if start_step < p["steps"] and not stopped_early:
            prefetcher = Prefetcher(sampler.batch, start_step + 1, p["steps"], p["loader_workers"], p["prefetch"])
        try:
            step = start_step
            while prefetcher is not None and step < p["steps"] and not stopped_early:
                step += 1
                t0 = time.perf_counter()
                host = prefetcher.get(step)
                batch = to_device(host, device)
                sampler.recycle(host)
                lr = scheduler.get_last_lr()[0]
                with autocast_context(device, p["autocast"]):
                    output = model(objective.inputs(batch, _step_generator(p["seed"], step, device)))
                loss = objective.loss(output, batch)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if p["grad_clip_norm"] is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), p["grad_clip_norm"])
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                train_loss = loss.item()
                step_seconds += time.perf_counter() - t0
                if not math.isfinite(train_loss):
                    raise FloatingPointError(
                        f"training diverged at step {step} (loss {train_loss}); lower learning_rate "
                        f"(now {p['learning_rate']}) or check the inputs"
                    )
                if writer is not None:
                    writer.add_scalar("train/loss", train_loss, step)
                    writer.add_scalar("train/lr", lr, step)
                val_loss = val_bacc = per_channel = None
                checkpoint_step = step % p["validate_every"] == 0 or step == p["steps"]
                if checkpoint_step:
                    val_loss, val_bacc, per_channel = validation(step)
                    if val_loss is not None:
                        logger.info("step %d: train_loss %.5f val_loss %.5f val_bacc %.4f", step, train_loss,
                                    val_loss, val_bacc)
                rows.append((step, train_loss, val_loss, val_bacc, lr, per_channel))
                progress.update(1)
                if step % 10 == 0 or checkpoint_step:
                    progress.set_postfix(loss=f"{train_loss:.4f}")
                if checkpoint_step or stopped_early:
                    save_state(step)
                if stopped_early:
                    logger.info("early stopping at step %d: no improvement in %d validations (best %.5f at step %d)",
                                step, bad_validations, *best)  # type: ignore[misc]
                if stop_after_step is not None and step >= stop_after_step:
                    raise TrainingInterrupted(f"stopped after step {step} (testing hook)")
        finally:
            progress.close()
            if prefetcher is not None:
                prefetcher.close()
            if writer is not None:
                writer.close()

        wait = prefetcher.wait_seconds if prefetcher is not None else 0.0
        seconds = time.perf_counter() - started
        final_step = rows[-1][0] if rows else start_step
        if best is not None and (state / "best.pt").is_file():
            best_state = torch.load(state / "best.pt", map_location="cpu", weights_only=True)
            final = {"model": best_state["model"], "step": int(best_state["step"]), "val_loss": best[0]}
        else:
            final = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                     "step": int(final_step), "val_loss": None}
        write_json(out / "model_config.json", {**model_config, "checkpoint_step": final["step"]})
        with atomic_output(out / "checkpoint.pt") as tmp:
            torch.save(final, tmp)
        write_curve(out / "loss_curve.tsv", rows, channels)
        plot_curve(out / "loss_curve.png", rows)

    summary = {
        "steps": int(final_step),
        "start_step": start_step,
        "stopped_early": stopped_early,
        "final_train_loss": train_loss,
        "best_val_loss": best[0] if best else None,
        "best_val_step": best[1] if best else None,
        "final_val_loss": next((r[2] for r in reversed(rows) if r[2] is not None), None),
        "seconds": seconds,
        "data_wait_fraction": wait / step_seconds if step_seconds > 0 else 0.0,
        "device": str(device),
    }
    logger.info("training done in %.1f s: %s", seconds, summary)
    return summary
