"""Train a 3D UNet on precomputed DINOv3 features to predict affinities (+ LSDs) or classes.

Inputs per volume (the stores the features and targets stages write; README, "What the workflow does"):

* ``results/features/{volume}.zarr``: image (C, z, y, x) float16 on the label grid.
* ``results/targets/{volume}.zarr``: group of images ``affinities`` (n_offsets, z, y, x)
  uint8, ``lsds`` (10, z, y, x) float16, ``boundary_weights`` (z, y, x) float32,
  ``mask`` (z, y, x) uint8, ``raw`` (z, y, x) float32 and ``labels``, with the offsets
  in the root attrs ``["dinopipe"]["offsets"]``. Semantic targets (``target:
  semantic``) read ``semantic`` (z, y, x) uint8 classes instead, with ``num_classes``
  (and optionally ``class_weights``) in the root attrs; overlapping classes
  (``classes_overlap`` in the root attrs) read ``classes`` and ``class_mask`` (C, z, y, x)
  uint8, learnt one sigmoid per class by ``train.loss`` (bce, focal, dice, tversky,
  bce_dice) within each class's annotation mask, weighted by ``train.class_weights``
  (default 1 each); ``model_config.json`` then records ``classes_overlap: true``.

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
  ``val_bacc_<name>`` per class (``val_bacc_class<c>`` for targets without class names). ``val_bacc`` is the balanced accuracy on the
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
from dinopipe.checkpoint import build_model_config, save_checkpoint
from dinopipe.classes import check_class_loss
from dinopipe.config import RESUME_FREE
from dinopipe.curves import Row, channel_names, plot_curve, write_curve
from dinopipe.loader import (
    CropSampler,
    Prefetcher,
    VolumeStores,
    check_consistent,
    open_volume,
    to_device,
)
from dinopipe.logs import Progress
from dinopipe.objective import Objective, validate_crops
from dinopipe.runtime import autocast_context, resolve_device
from dinopipe.train_params import resolve_train_params
from dinopipe.unet import UNet3D, UNetConfig, target_channels

logger = logging.getLogger(__name__)


class TrainingInterrupted(RuntimeError):
    """Raised by the ``stop_after_step`` testing hook of :func:`train` (simulates a kill)."""


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
    if first.attrs.get("classes_overlap"):  # one sigmoid per class: weights 1 unless given (see _overlap)
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"volume {first.name}: targets {first.targets_path} of overlapping classes record no "
                             f"'num_classes'; recompute the targets")
        weights = p["class_weights"] if p["class_weights"] is not None else [1.0] * n
        if len(weights) != n:
            raise ValueError(f"train.class_weights has {len(weights)} weights but the targets of volume {first.name} "
                             f"hold {n} overlapping classes {first.attrs.get('class_names')} (one weight per class, "
                             f"no background)")
        return n, [float(w) for w in weights]
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


def _overlap(volumes: Sequence[VolumeStores], p: Mapping[str, Any]) -> bool:
    """Whether the volumes' classes overlap (``classes_overlap`` in their targets' attrs, the same in
    every volume), checked against ``train.loss`` (:func:`dinopipe.classes.check_class_loss`)."""
    if p["target"] != "semantic":
        return False
    kinds = {v.name: bool(v.attrs.get("classes_overlap", False)) for v in volumes}
    if len(set(kinds.values())) > 1:
        raise ValueError(f"the targets of some volumes hold overlapping classes and of others exclusive ones "
                         f"({kinds}); recompute the targets with one targets.classes_overlap")
    overlap = next(iter(kinds.values()))
    check_class_loss(p["loss"], overlap, f"targets.classes_overlap of the targets of volume {volumes[0].name}")
    return overlap


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
    objective = Objective(p, len(opened[0].offsets), class_weights, dev, overlap=_overlap(opened, p))
    model.to(dev)
    return validate_crops(model, sampler, sampler.fixed_crops(p["validation_crops"]), objective, dev, p["autocast"])[0]


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
    """``class_names``, ``instance_classes`` (and ``classes_overlap`` for overlapping classes) of
    semantic targets (:mod:`dinopipe.classes`), the same in every volume; nothing for affinity
    models or targets that record no names."""
    if p["target"] != "semantic":
        return {}
    keys = ("class_names", "instance_classes", "classes_overlap")
    first = {k: volumes[0].attrs.get(k) for k in keys}
    for v in volumes[1:]:
        other = {k: v.attrs.get(k) for k in keys}
        if other != first:
            raise ValueError(f"volumes {volumes[0].name} and {v.name} have different classes in their targets "
                             f"({first} vs {other}); recompute the targets with one targets.classes")
    if not first["classes_overlap"]:
        del first["classes_overlap"]  # exclusive classes: model configs as before overlapping classes
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
        params: The ``train:`` config section; see :data:`dinopipe.train_params.DEFAULT_TRAIN_PARAMS`.
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
    out = Path(out_dir)
    state = Path(state_dir) if state_dir is not None else out / "state"
    out.mkdir(parents=True, exist_ok=True)
    state.mkdir(parents=True, exist_ok=True)
    with _torch_threads(p["num_threads"]):
        run = _Run(train_volumes, validate_volumes, out, state, p)
        run.resume()
        run.loop(stop_after_step)
        run.write_outputs()
    return run.summary()


class _Run:
    """One training run (see :func:`train`): volumes and samplers, the model and its optimiser,
    the loss curve, validation with early stopping, the resumable state and the outputs."""

    def __init__(self, train_volumes: Sequence[tuple[str, str]], validate_volumes: Sequence[tuple[str, str]],
                 out: Path, state: Path, p: Mapping[str, Any]) -> None:
        self.p, self.out, self.state, self.latest = p, out, state, state / "latest.pt"
        self.device = resolve_device(p["device"])
        self._open(train_volumes, validate_volumes)
        self._build()
        self.signature = _resume_signature(self.model_config, p, self.train_vols, self.val_vols)
        self.rows: list[Row] = []
        self.best: tuple[float, int] | None = None
        self.bad_validations, self.stopped_early, self.start_step = 0, False, 0
        self.train_loss, self.step_seconds, self.seconds, self.wait = float("nan"), 0.0, 0.0, 0.0
        self.writer: Any = None
        self.images = _Images(self.val_vols)

    def _open(self, train_volumes: Sequence[tuple[str, str]], validate_volumes: Sequence[tuple[str, str]]) -> None:
        """Open the volumes and describe the model (``model_config.json``)."""
        p = self.p
        self.train_vols = _open_all(train_volumes, p, "train", boundary=p["sample_boundary"] > 0)
        self.val_vols = _open_all(validate_volumes, p, "validate",
                                  extra=("labels", "raw") if p["tensorboard"] else ())
        check_consistent(self.train_vols + self.val_vols)
        first = self.train_vols[0]
        self.offsets, self.num_offsets = first.offsets, len(first.offsets)
        self.num_classes, self.class_weights = (
            _num_classes(self.train_vols, p) if p["target"] == "semantic" else (None, None)
        )
        if not self.val_vols:
            logger.warning("no validate volumes given: training without validation (val_loss stays empty)")
        in_ch, out_ch = target_channels(
            p["target"], num_offsets=self.num_offsets, lsds=p["lsds"], num_classes=self.num_classes or 0,
            input_raw=p["input_raw"], feature_channels=first.channels if p["input_features"] else 0,
            overlap=_overlap(self.train_vols + self.val_vols, p),
        )
        self.unet_config = UNetConfig.from_dict({**p["unet"], "in_channels": in_ch, "out_channels": out_ch})
        volumes_used = {
            "train_volumes": [list(map(str, v)) for v in train_volumes],
            "validate_volumes": [list(map(str, v)) for v in validate_volumes],
        }
        self.model_config = build_model_config(
            self.unet_config, self.offsets, p["lsds"], first.signature, p, input_raw=p["input_raw"],
            input_features=p["input_features"], target=p["target"], num_classes=self.num_classes,
            class_weights=self.class_weights, **_class_names(self.train_vols + self.val_vols, p), **volumes_used,
        )
        logger.info(
            "training on %d volume(s) (%s), validating on %d, %d feature channels%s, offsets %s, device %s",
            len(self.train_vols), ", ".join(v.name for v in self.train_vols), len(self.val_vols), first.channels,
            " + raw" if p["input_raw"] else "", self.offsets, self.device,
        )

    def _build(self) -> None:
        """Model, optimiser, schedule, loss and the train and validation samplers."""
        p, device, crop = self.p, self.device, self.p["crop_shape"]
        torch.manual_seed(p["seed"])
        self.model = UNet3D(self.unet_config).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=p["learning_rate"],
                                           weight_decay=p["weight_decay"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_factor(p))
        self.scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and p["autocast"] == "fp16")
        self.objective = Objective(p, self.num_offsets, self.class_weights, device,
                                   overlap=_overlap(self.train_vols + self.val_vols, p))
        self.channels = channel_names(self.offsets, self.num_classes, self.model_config.get("class_names"))
        self.sampler = CropSampler(self.train_vols, crop, p["batch_size"], p["seed"], p["min_mask_fraction"],
                                   p["augment"], lsds=p["lsds"], raw=p["input_raw"], target=p["target"],
                                   boundary_fraction=p["sample_boundary"])
        self.val_sampler = (
            CropSampler(self.val_vols, crop, 1, p["seed"], p["min_mask_fraction"], None,
                        lsds=p["lsds"], raw=p["input_raw"], target=p["target"]) if self.val_vols else None
        )
        self.val_crops = self.val_sampler.fixed_crops(p["validation_crops"]) if self.val_sampler else []
        if self.val_vols and not self.val_crops:
            logger.warning("validation_crops is 0: training without validation")

    def resume(self) -> None:
        """Continue from ``latest.pt`` when it belongs to this run (same signature, not beyond ``steps``)."""
        p, latest = self.p, self.latest
        if not (p["resume"] and latest.is_file()):
            return
        saved = torch.load(latest, map_location="cpu", weights_only=True)
        differs = _differences(saved.get("signature", {}), self.signature)
        if differs:
            logger.warning("not resuming from %s: settings differ in %s; starting from step 0", latest, differs)
            return
        if saved["step"] > p["steps"]:
            logger.warning("not resuming from %s: it is at step %d, beyond steps=%d; starting from step 0",
                           latest, saved["step"], p["steps"])
            return
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        torch.set_rng_state(saved["torch_rng"])
        if self.device.type == "cuda" and saved.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(saved["cuda_rng"], self.device)
        self.start_step = int(saved["step"])
        self.rows = [tuple(r) for r in saved["rows"]]  # type: ignore[misc]
        self.best = tuple(saved["best"]) if saved["best"] is not None else None  # type: ignore[assignment]
        self.bad_validations, self.stopped_early = int(saved["bad_validations"]), bool(saved["stopped_early"])
        if self.stopped_early and p["steps"] > int(saved["steps_param"]):  # asked for more steps: train on
            self.stopped_early, self.bad_validations = False, 0
        logger.info("resuming from %s at step %d of %d", latest, self.start_step, p["steps"])

    def save_state(self, step: int) -> None:
        """Write the resumable state (``latest.pt``) and the curve so far."""
        save_checkpoint(
            self.latest, self.model, self.optimizer, step, scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(), torch_rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            rows=[list(r) for r in self.rows], best=list(self.best) if self.best else None,
            bad_validations=self.bad_validations, stopped_early=self.stopped_early, signature=self.signature,
            steps_param=self.p["steps"],
        )
        write_curve(self.state / "loss_curve.tsv", self.rows, self.channels)

    def validation(self, step: int) -> tuple[float | None, float | None, tuple[float, ...] | None]:
        """Validate, log, keep the best model (``best.pt``) and count validations without improvement."""
        p, writer = self.p, self.writer
        val_loss, val_bacc, per_channel, first_crop = validate_crops(
            self.model, self.val_sampler, self.val_crops, self.objective, self.device, p["autocast"])
        if val_loss is None:
            return None, None, None
        self.images.log(writer, first_crop, p["crop_shape"], step, self.num_offsets, p["target"] == "semantic")
        logger.info("step %d: validation balanced accuracy %.4f; per %s: %s", step, val_bacc,
                    "class" if self.num_classes else "offset",
                    ", ".join(f"{n} {v:.3f}" for n, v in zip(self.channels, per_channel or ())))
        if writer is not None:
            writer.add_scalar("val/loss", val_loss, step)
            writer.add_scalar("val/bacc", val_bacc, step)
            for name, value in zip(self.channels, per_channel or ()):
                writer.add_scalar(f"val/bacc_{name}", value, step)
        if self.best is None or val_loss < self.best[0] - p["early_stopping_min_delta"]:
            self.best = (val_loss, step)
            self.bad_validations = 0
            save_checkpoint(self.state / "best.pt", self.model, None, step, val_loss=val_loss)
        else:
            self.bad_validations += 1
            patience = p["early_stopping_patience"]
            if patience is not None and self.bad_validations >= patience:
                self.stopped_early = True
        return val_loss, val_bacc, per_channel

    def train_step(self, step: int, host: dict[str, np.ndarray]) -> float:
        """One optimiser step on a prepared batch; returns the learning rate it used."""
        p, device = self.p, self.device
        t0 = time.perf_counter()
        batch = to_device(host, device)
        self.sampler.recycle(host)
        lr = self.scheduler.get_last_lr()[0]
        with autocast_context(device, p["autocast"]):
            output = self.model(self.objective.inputs(batch, _step_generator(p["seed"], step, device)))
        loss = self.objective.loss(output, batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if p["grad_clip_norm"] is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), p["grad_clip_norm"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.train_loss = loss.item()
        self.step_seconds += time.perf_counter() - t0
        if not math.isfinite(self.train_loss):
            raise FloatingPointError(
                f"training diverged at step {step} (loss {self.train_loss}); lower learning_rate "
                f"(now {p['learning_rate']}) or check the inputs"
            )
        return lr

    def loop(self, stop_after_step: int | None) -> None:
        """Validate the untrained model (a fresh run), then train to ``steps`` or early stopping."""
        p = self.p
        if p["tensorboard"]:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tensorboard"),
                                        purge_step=self.start_step if self.start_step else None)
        if self.start_step == 0:
            self.rows = []
            val_loss, val_bacc, per_channel = self.validation(0)
            if val_loss is not None:
                self.rows.append((0, None, val_loss, val_bacc, None, per_channel))
                logger.info("step 0: val_loss %.5f val_bacc %.4f", val_loss, val_bacc)
        started = time.perf_counter()
        if self.rows and self.rows[-1][1] is not None:
            self.train_loss = self.rows[-1][1]
        self.model.train()
        progress = Progress(p["steps"], "train", "step", initial=self.start_step)
        prefetcher = None
        if self.start_step < p["steps"] and not self.stopped_early:
            prefetcher = Prefetcher(self.sampler.batch, self.start_step + 1, p["steps"], p["loader_workers"],
                                    p["prefetch"])
        try:
            step = self.start_step
            while prefetcher is not None and step < p["steps"] and not self.stopped_early:
                step += 1
                self._after_step(step, self.train_step(step, prefetcher.get(step)), progress)
                if stop_after_step is not None and step >= stop_after_step:
                    raise TrainingInterrupted(f"stopped after step {step} (testing hook)")
        finally:
            progress.close()
            if prefetcher is not None:
                prefetcher.close()
            if self.writer is not None:
                self.writer.close()
        self.wait = prefetcher.wait_seconds if prefetcher is not None else 0.0
        self.seconds = time.perf_counter() - started

    def _after_step(self, step: int, lr: float, progress: Progress) -> None:
        """Log the step, validate and write the state at validation steps, stop early if due."""
        p, writer, train_loss = self.p, self.writer, self.train_loss
        if writer is not None:
            writer.add_scalar("train/loss", train_loss, step)
            writer.add_scalar("train/lr", lr, step)
        val_loss = val_bacc = per_channel = None
        checkpoint_step = step % p["validate_every"] == 0 or step == p["steps"]
        if checkpoint_step:
            val_loss, val_bacc, per_channel = self.validation(step)
            if val_loss is not None:
                logger.info("step %d: train_loss %.5f val_loss %.5f val_bacc %.4f", step, train_loss,
                            val_loss, val_bacc)
        self.rows.append((step, train_loss, val_loss, val_bacc, lr, per_channel))
        progress.update(1)
        if step % 10 == 0 or checkpoint_step:
            progress.set_postfix(loss=f"{train_loss:.4f}")
        if checkpoint_step or self.stopped_early:
            self.save_state(step)
        if self.stopped_early:
            logger.info("early stopping at step %d: no improvement in %d validations (best %.5f at step %d)",
                        step, self.bad_validations, *self.best)  # type: ignore[misc]

    def write_outputs(self) -> None:
        """``model_config.json``, ``checkpoint.pt`` (the best validated model, else the last),
        ``loss_curve.tsv`` and ``loss_curve.png``."""
        out, state, best = self.out, self.state, self.best
        self.final_step = self.rows[-1][0] if self.rows else self.start_step
        if best is not None and (state / "best.pt").is_file():
            best_state = torch.load(state / "best.pt", map_location="cpu", weights_only=True)
            final = {"model": best_state["model"], "step": int(best_state["step"]), "val_loss": best[0]}
        else:
            final = {"model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                     "step": int(self.final_step), "val_loss": None}
        write_json(out / "model_config.json", {**self.model_config, "checkpoint_step": final["step"]})
        with atomic_output(out / "checkpoint.pt") as tmp:
            torch.save(final, tmp)
        write_curve(out / "loss_curve.tsv", self.rows, self.channels)
        plot_curve(out / "loss_curve.png", self.rows)

    def summary(self) -> dict[str, Any]:
        """What :func:`train` returns."""
        best = self.best
        summary = {
            "steps": int(self.final_step),
            "start_step": self.start_step,
            "stopped_early": self.stopped_early,
            "final_train_loss": self.train_loss,
            "best_val_loss": best[0] if best else None,
            "best_val_step": best[1] if best else None,
            "final_val_loss": next((r[2] for r in reversed(self.rows) if r[2] is not None), None),
            "seconds": self.seconds,
            "data_wait_fraction": self.wait / self.step_seconds if self.step_seconds > 0 else 0.0,
            "device": str(self.device),
        }
        logger.info("training done in %.1f s: %s", self.seconds, summary)
        return summary
