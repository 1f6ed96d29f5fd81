"""Train a 3D UNet on precomputed DINOv3 features to predict affinities and LSDs.

Inputs per volume (see the storage contract in ``DESIGN.md``):

* ``results/features/{volume}.zarr``: image (C, z, y, x) float16 on the label grid.
* ``results/targets/{volume}.zarr``: group of images ``affinities`` (n_offsets, z, y, x)
  uint8, ``lsds`` (10, z, y, x) float16, ``boundary_weights`` (z, y, x) float32,
  ``mask`` (z, y, x) uint8, with the offsets in the root attrs ``["dinopipe"]["offsets"]``.

Outputs in ``out_dir``:

* ``checkpoint.pt``: ``{"model": state_dict, "optimizer": state_dict, "step": int}``
  (tensors and plain values only; load with ``torch.load(..., weights_only=True)``).
* ``model_config.json``: everything needed to rebuild the model and interpret its
  output (see :func:`build_model_config`).
* ``loss_curve.tsv``: columns ``step``, ``train_loss``, ``val_loss``. Row 0 holds the
  validation loss of the untrained model (empty ``train_loss``); ``val_loss`` is empty
  on steps without validation.

Checkpoint and loss curve are rewritten (atomically) every ``validate_every`` steps
and at the end; ``checkpoint.pt`` always holds the latest model, not the best one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from tqdm import tqdm

from dinopipe import __version__
from dinopipe.features import check_compatible
from dinopipe.io import Image, atomic_output, read_image, write_json
from dinopipe.losses import AffinityLoss, affinity_lsd_loss, build_loss
from dinopipe.unet import NUM_LSD_CHANNELS, UNet3D, UNetConfig, output_channels, split_output

logger = logging.getLogger(__name__)

DEFAULT_TRAIN_PARAMS: dict[str, Any] = {
    "steps": 2000,  # optimiser steps
    "batch_size": 2,  # crops per step
    "crop_shape": [32, 64, 64],  # (z, y, x) label voxels, multiples of 2**unet.levels
    "learning_rate": 5e-4,  # AdamW peak learning rate
    "weight_decay": 1e-4,  # AdamW weight decay
    "lr_schedule": "cosine",  # "cosine" (to 0 at the last step) or "constant"
    "warmup_steps": 0,  # linear warm-up steps before the schedule
    "grad_clip_norm": 1.0,  # clip the gradient norm to this; None: no clipping
    "loss": "bce",  # affinity loss: "bce", "focal", "dice", "tversky" (dinopipe.losses)
    "loss_params": {},  # parameters of that loss (e.g. {"gamma": 2.0} for focal)
    "lsds": True,  # also predict the 10 LSD channels
    "lsd_weight": 1.0,  # factor of the LSD MSE term
    "seed": 0,  # seeds model initialisation, crop sampling and validation crops
    "validate_every": 100,  # steps between validations (and checkpoint writes)
    "validation_crops": 8,  # fixed crops drawn from the validate volumes
    "min_mask_fraction": 0.1,  # reject crops with less of their mask set than this
    "unet": {},  # UNetConfig fields except in_channels/out_channels (taken from the data)
    "device": "auto",  # "auto" (CUDA if available), "cpu", "cuda" or "cuda:N"
    "autocast": True,  # bf16 autocast on CUDA (ignored on CPU)
    "num_threads": None,  # torch.set_num_threads for the run; None: leave as is
}
"""Defaults of the ``train:`` config section; :func:`resolve_train_params` checks keys."""

LR_SCHEDULES = ("constant", "cosine")
MAX_CROP_TRIES = 100
"""Random positions tried per crop before taking the best one seen (with a warning)."""


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
    integers = {"steps": 1, "batch_size": 1, "validate_every": 1, "validation_crops": 0, "warmup_steps": 0}
    for key, minimum in integers.items():
        _require(_is_int(p[key]) and p[key] >= minimum, key, p[key], f"an integer >= {minimum}")
        p[key] = int(p[key])
    _require(_is_int(p["seed"]), "seed", p["seed"], "an integer")
    p["seed"] = int(p["seed"])
    crop = p["crop_shape"]
    _require(
        isinstance(crop, Sequence) and len(crop) == 3 and all(_is_int(c) and c >= 1 for c in crop),
        "crop_shape",
        crop,
        "three positive integers (z, y, x) in label voxels",
    )
    p["crop_shape"] = [int(c) for c in crop]
    _require(_is_number(p["learning_rate"]) and p["learning_rate"] > 0, "learning_rate", p["learning_rate"], "> 0")
    for key in ("weight_decay", "lsd_weight"):
        _require(_is_number(p[key]) and p[key] >= 0, key, p[key], "a number >= 0")
    _require(
        p["grad_clip_norm"] is None or (_is_number(p["grad_clip_norm"]) and p["grad_clip_norm"] > 0),
        "grad_clip_norm",
        p["grad_clip_norm"],
        "a number > 0 or null",
    )
    _require(
        _is_number(p["min_mask_fraction"]) and 0 <= p["min_mask_fraction"] <= 1,
        "min_mask_fraction",
        p["min_mask_fraction"],
        "a number in [0, 1]",
    )
    _require(p["lr_schedule"] in LR_SCHEDULES, "lr_schedule", p["lr_schedule"], f"one of {list(LR_SCHEDULES)}")
    for key in ("lsds", "autocast"):
        _require(isinstance(p[key], bool), key, p[key], "true or false")
    _require(
        p["num_threads"] is None or (_is_int(p["num_threads"]) and p["num_threads"] >= 1),
        "num_threads",
        p["num_threads"],
        "a positive integer or null",
    )
    _require(isinstance(p["loss_params"], Mapping), "loss_params", p["loss_params"], "a mapping")
    _require(isinstance(p["loss"], str), "loss", p["loss"], "a loss name")
    build_loss(p["loss"], **p["loss_params"])  # raises for unknown names / params
    p["loss_params"] = dict(p["loss_params"])
    _require(isinstance(p["unet"], Mapping), "unet", p["unet"], "a mapping of UNetConfig fields")
    derived = sorted({"in_channels", "out_channels"} & set(p["unet"]))
    if derived:
        raise ValueError(
            f"train parameter 'unet' must not set {derived}: they follow from the feature channels, "
            "the number of affinity offsets and 'lsds'"
        )
    # Check the UNet fields now (with placeholder channel counts) so that errors come early.
    p["unet"] = {
        k: v
        for k, v in UNetConfig.from_dict({**p["unet"], "in_channels": 1, "out_channels": 1}).to_dict().items()
        if k not in ("in_channels", "out_channels")
    }
    divisor = 2 ** p["unet"]["levels"]
    _require(
        all(c % divisor == 0 for c in p["crop_shape"]),
        "crop_shape",
        p["crop_shape"],
        f"divisible by 2**unet.levels = {divisor} on every axis",
    )
    resolve_device(p["device"])
    return p


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device for "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".

    Raises:
        ValueError: Unknown device string, or CUDA requested but not available.
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if isinstance(device, str) and (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available; use 'auto' or 'cpu'")
        return torch.device(device)
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def autocast_context(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA when ``enabled``; a no-op on CPU."""
    if device.type == "cuda" and enabled:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- data


@dataclass
class _Volume:
    """One training volume, opened once: zarr arrays, read lazily crop by crop."""

    name: str
    features_path: str
    targets_path: str
    features: Any
    affinities: Any
    lsds: Any
    weights: Any
    mask: Any
    offsets: list[list[int]]
    signature: Mapping[str, Any] | None
    shape: tuple[int, int, int]
    warned_mask: bool = False

    @property
    def channels(self) -> int:
        return int(self.features.shape[0])

    def read(self, start: Sequence[int], crop: Sequence[int], mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Read one crop; features stay float16, targets keep their stored dtypes."""
        sl = tuple(slice(s, s + c) for s, c in zip(start, crop, strict=True))
        out = {
            "features": np.asarray(self.features[(slice(None), *sl)]),
            "affinities": np.asarray(self.affinities[(slice(None), *sl)]),
            "weights": np.asarray(self.weights[sl]),
            "mask": np.asarray(self.mask[sl]) if mask is None else mask,
        }
        if self.lsds is not None:
            out["lsds"] = np.asarray(self.lsds[(slice(None), *sl)])
        return out


def _volume_name(features_path: str) -> str:
    name = Path(features_path).name
    return name[: -len(".zarr")] if name.endswith(".zarr") else name


def _open_volume(features_path: str | Path, targets_path: str | Path, lsds: bool) -> _Volume:
    features_path, targets_path = str(features_path), str(targets_path)
    name = _volume_name(features_path)
    features = read_image(features_path)
    if not features.channel_axis:
        raise ValueError(
            f"volume {name}: features {features_path} must be (C, z, y, x), got shape {features.array.shape}"
        )
    if not Path(targets_path).exists():
        raise FileNotFoundError(f"volume {name}: no targets at {targets_path}")
    root_attrs = dict(zarr.open_group(targets_path, mode="r").attrs).get("dinopipe", {})
    offsets = root_attrs.get("offsets")
    if not offsets:
        raise ValueError(f"volume {name}: targets {targets_path} have no 'offsets' in their 'dinopipe' attributes")
    offsets = [[int(o) for o in off] for off in offsets]

    def target(key: str, channels: int | None) -> Image:
        image = read_image(Path(targets_path) / key)
        where = f"volume {name}: target {targets_path}/{key}"
        if image.geometry.shape != features.geometry.shape:
            raise ValueError(
                f"{where} has spatial shape {image.geometry.shape} but features {features_path} have "
                f"{features.geometry.shape}; both must be on the same label grid"
            )
        if not np.allclose(image.geometry.voxel_size, features.geometry.voxel_size) or not np.allclose(
            image.geometry.translation, features.geometry.translation
        ):
            raise ValueError(
                f"{where} has voxel size {image.geometry.voxel_size} nm / translation "
                f"{image.geometry.translation} nm but features {features_path} have "
                f"{features.geometry.voxel_size} / {features.geometry.translation}; both must be on the label grid"
            )
        actual = image.array.shape[0] if image.channel_axis else None
        if actual != channels:
            raise ValueError(f"{where} has shape {image.array.shape}; expected {channels} channels first")
        return image

    signature = (features.attrs or {}).get("signature")
    return _Volume(
        name=name,
        features_path=features_path,
        targets_path=targets_path,
        features=features.array,
        affinities=target("affinities", len(offsets)).array,
        lsds=target("lsds", NUM_LSD_CHANNELS).array if lsds else None,
        weights=target("boundary_weights", None).array,
        mask=target("mask", None).array,
        offsets=offsets,
        signature=signature,
        shape=features.geometry.shape,
    )


def _open_volumes(
    volumes: Sequence[tuple[str, str]], crop: Sequence[int], lsds: bool, role: str
) -> list[_Volume]:
    opened = []
    for i, entry in enumerate(volumes):
        if isinstance(entry, str | bytes) or len(entry) != 2:
            raise ValueError(f"{role} volume #{i} must be a (features_path, targets_path) pair, got {entry!r}")
        volume = _open_volume(entry[0], entry[1], lsds)
        if any(c > s for c, s in zip(crop, volume.shape, strict=True)):
            raise ValueError(
                f"{role} volume {volume.name}: crop_shape {list(crop)} is larger than the volume "
                f"{list(volume.shape)} (z, y, x) ({volume.features_path}); use a smaller crop_shape"
            )
        opened.append(volume)
    return opened


def _check_consistent(volumes: Sequence[_Volume]) -> None:
    first = volumes[0]
    for v in volumes[1:]:
        if v.channels != first.channels:
            raise ValueError(
                f"volume {v.name} has {v.channels} feature channels ({v.features_path}) but volume "
                f"{first.name} has {first.channels} ({first.features_path})"
            )
        if v.offsets != first.offsets:
            raise ValueError(
                f"volume {v.name} has affinity offsets {v.offsets} ({v.targets_path}) but volume "
                f"{first.name} has {first.offsets} ({first.targets_path})"
            )
        if first.signature is not None and v.signature is not None:
            check_compatible(v.signature, first.signature, v.features_path, first.features_path)


def _sample_crop(
    volume: _Volume, crop: Sequence[int], rng: np.random.Generator, min_fraction: float
) -> tuple[tuple[int, ...], np.ndarray]:
    """A uniformly random crop start whose mask covers at least ``min_fraction``."""
    best: tuple[float, tuple[int, ...], np.ndarray] = (-1.0, (), np.empty(0))
    for _ in range(MAX_CROP_TRIES):
        start = tuple(int(rng.integers(0, s - c + 1)) for s, c in zip(volume.shape, crop, strict=True))
        mask = np.asarray(volume.mask[tuple(slice(s, s + c) for s, c in zip(start, crop, strict=True))])
        fraction = float(np.count_nonzero(mask)) / mask.size
        if fraction >= min_fraction:
            return start, mask
        if fraction > best[0]:
            best = (fraction, start, mask)
    if not volume.warned_mask:
        logger.warning(
            "volume %s: no crop with >= %.0f%% of its mask set in %d tries; using the best found (%.1f%%)",
            volume.name,
            100 * min_fraction,
            MAX_CROP_TRIES,
            100 * best[0],
        )
        volume.warned_mask = True
    return best[1], best[2]


def _validation_crops(
    volumes: Sequence[_Volume], count: int, crop: Sequence[int], seed: int, min_fraction: float
) -> list[tuple[int, tuple[int, ...]]]:
    """A fixed, seeded set of (volume index, start) crops, spread round-robin over the volumes."""
    if not volumes:
        return []
    rng = np.random.default_rng([seed, 1])
    crops = []
    for i in range(count):
        index = i % len(volumes)
        start, _ = _sample_crop(volumes[index], crop, rng, min_fraction)
        crops.append((index, start))
    return crops


def _to_device(samples: Sequence[Mapping[str, np.ndarray]], device: torch.device) -> dict[str, torch.Tensor]:
    """Stack samples into a batch; float16 features become float32 only on the device."""
    batch = {}
    for key in samples[0]:
        array = np.stack([s[key] for s in samples])
        tensor = torch.from_numpy(array).to(device, non_blocking=True)
        if key in ("weights", "mask"):
            tensor = tensor.unsqueeze(1)
        batch[key] = tensor.float()
    return batch


def _batch_loss(
    model: UNet3D,
    batch: Mapping[str, torch.Tensor],
    num_offsets: int,
    aff_loss: AffinityLoss,
    lsd_weight: float,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
) -> torch.Tensor:
    with autocast():
        output = model(batch["features"])
    aff_logits, lsd_pred = split_output(output.float(), num_offsets)
    return affinity_lsd_loss(
        aff_logits,
        batch["affinities"],
        lsd_pred,
        batch.get("lsds"),
        batch["weights"],
        batch["mask"],
        lsd_weight=lsd_weight,
        affinity_loss=aff_loss,
    )


def _validation_loss(
    model: UNet3D,
    volumes: Sequence[_Volume],
    crops: Sequence[tuple[int, tuple[int, ...]]],
    crop: Sequence[int],
    params: Mapping[str, Any],
    device: torch.device,
) -> float | None:
    """Mean over the fixed validation crops of the per-crop loss (model in eval mode)."""
    if not crops:
        return None
    was_training = model.training
    model.eval()
    num_offsets = len(volumes[0].offsets)
    aff_loss = build_loss(params["loss"], **params["loss_params"])

    def autocast() -> contextlib.AbstractContextManager[Any]:
        return autocast_context(device, params["autocast"])

    losses = []
    with torch.no_grad():
        for index, start in crops:
            batch = _to_device([volumes[index].read(start, crop)], device)
            loss = _batch_loss(model, batch, num_offsets, aff_loss, params["lsd_weight"], autocast)
            losses.append(float(loss))
    model.train(was_training)
    return float(np.mean(losses))


def evaluate(
    model: UNet3D,
    volumes: Sequence[tuple[str, str]],
    params: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> float | None:
    """Validation loss of ``model`` on the fixed validation crops that :func:`train` uses.

    With the same ``params`` (seed, crop_shape, validation_crops, loss, lsd_weight,
    min_mask_fraction) this reproduces the ``val_loss`` that :func:`train` logged for
    the same model.

    Args:
        model: The model (switched to eval mode for the evaluation, then restored).
        volumes: (features_path, targets_path) pairs.
        params: Train parameters (see :data:`DEFAULT_TRAIN_PARAMS`).
        device: Where to run.

    Returns:
        The mean per-crop loss, or None when there are no crops.
    """
    p = resolve_train_params(params)
    dev = resolve_device(device)
    opened = _open_volumes(volumes, p["crop_shape"], p["lsds"], "evaluate")
    if not opened:
        return None
    _check_consistent(opened)
    crops = _validation_crops(opened, p["validation_crops"], p["crop_shape"], p["seed"], p["min_mask_fraction"])
    model.to(dev)
    return _validation_loss(model, opened, crops, p["crop_shape"], p, dev)


# --------------------------------------------------------------------------- outputs


def build_model_config(
    unet: UNetConfig,
    offsets: Sequence[Sequence[int]],
    lsds: bool,
    feature_signature: Mapping[str, Any] | None = None,
    train_params: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The contents of ``model_config.json`` (what :func:`dinopipe.predict.load_model` reads).

    Args:
        unet: The architecture.
        offsets: Affinity offsets (z, y, x) in voxels, in output channel order.
        lsds: Whether the last 10 output channels are LSDs (through a sigmoid).
        feature_signature: Signature of the features the model was trained on.
        train_params: The resolved train parameters.
        **extra: Further JSON-serialisable entries (e.g. the volume paths).
    """
    expected = output_channels(len(offsets), lsds)
    if unet.out_channels != expected:
        raise ValueError(
            f"UNet has {unet.out_channels} output channels but {len(offsets)} offsets "
            f"{'with' if lsds else 'without'} LSDs need {expected}"
        )
    return {
        "unet": unet.to_dict(),
        "in_channels": unet.in_channels,
        "offsets": [[int(o) for o in off] for off in offsets],
        "lsds": lsds,
        "lsd_channels": NUM_LSD_CHANNELS if lsds else 0,
        "lsd_activation": "sigmoid",
        "feature_signature": dict(feature_signature) if feature_signature is not None else None,
        "train_params": dict(train_params) if train_params is not None else None,
        "dinopipe_version": __version__,
        **extra,
    }


def save_checkpoint(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, step: int = 0
) -> None:
    """Write ``{"model", "optimizer", "step"}`` state dicts atomically (model tensors on CPU)."""
    state = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else {},
        "step": int(step),
    }
    with atomic_output(path) as tmp:
        torch.save(state, tmp)


def _write_curve(path: Path, rows: Sequence[tuple[int, float | None, float | None]]) -> None:
    def fmt(value: float | None) -> str:
        return "" if value is None else f"{value:.8g}"

    lines = ["step\ttrain_loss\tval_loss"] + [f"{s}\t{fmt(t)}\t{fmt(v)}" for s, t, v in rows]
    with atomic_output(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


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


# --------------------------------------------------------------------------- train


def train(
    train_volumes: Sequence[tuple[str, str]],
    validate_volumes: Sequence[tuple[str, str]],
    out_dir: str | Path,
    params: Mapping[str, Any],
) -> dict[str, Any]:
    """Train a :class:`UNet3D` from features to affinities (+ LSDs).

    Each step draws ``batch_size`` crops of ``crop_shape`` label voxels: a volume with
    probability proportional to its size, then a uniformly random position, redrawn
    (up to :data:`MAX_CROP_TRIES` times) while less than ``min_mask_fraction`` of the
    crop's mask is set. The loss is the boundary-weighted, masked affinity loss plus
    ``lsd_weight`` times the masked LSD MSE (:func:`dinopipe.losses.affinity_lsd_loss`);
    the model's LSD channels go through a sigmoid. Optimiser: AdamW with gradient
    clipping and a cosine or constant learning rate.

    Validation uses a fixed, seeded set of ``validation_crops`` crops from
    ``validate_volumes`` only, before training (step 0), every ``validate_every``
    steps and at the last step. Without validate volumes a warning is logged and no
    validation is done (``val_loss`` stays empty, ``best_val_loss`` is None).

    On CPU, runs with the same seed and thread count give identical results.

    Args:
        train_volumes: (features_path, targets_path) pairs to train on.
        validate_volumes: (features_path, targets_path) pairs to validate on.
        out_dir: Folder for ``checkpoint.pt``, ``model_config.json`` and ``loss_curve.tsv``.
        params: The ``train:`` config section; see :data:`DEFAULT_TRAIN_PARAMS`.

    Returns:
        Summary: ``steps``, ``final_train_loss``, ``best_val_loss``, ``best_val_step``,
        ``final_val_loss``, ``seconds``, ``device``.

    Raises:
        ValueError: Unknown or invalid params, no train volumes, a crop larger than a
            volume, or volumes that disagree on feature channels or offsets.
    """
    p = resolve_train_params(params)
    if not train_volumes:
        raise ValueError("train() needs at least one train volume, got none")
    device = resolve_device(p["device"])
    crop = p["crop_shape"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    with _torch_threads(p["num_threads"]):
        train_vols = _open_volumes(train_volumes, crop, p["lsds"], "train")
        val_vols = _open_volumes(validate_volumes, crop, p["lsds"], "validate")
        _check_consistent(train_vols + val_vols)
        first = train_vols[0]
        offsets, num_offsets = first.offsets, len(first.offsets)
        if not val_vols:
            logger.warning("no validate volumes given: training without validation (val_loss stays empty)")

        unet_config = UNetConfig.from_dict(
            {**p["unet"], "in_channels": first.channels, "out_channels": output_channels(num_offsets, p["lsds"])}
        )
        write_json(
            out / "model_config.json",
            build_model_config(
                unet_config,
                offsets,
                p["lsds"],
                first.signature,
                p,
                train_volumes=[list(map(str, v)) for v in train_volumes],
                validate_volumes=[list(map(str, v)) for v in validate_volumes],
            ),
        )
        logger.info(
            "training on %d volume(s) (%s), validating on %d, %d feature channels, offsets %s, device %s",
            len(train_vols),
            ", ".join(v.name for v in train_vols),
            len(val_vols),
            first.channels,
            offsets,
            device,
        )

        torch.manual_seed(p["seed"])
        rng = np.random.default_rng(p["seed"])
        model = UNet3D(unet_config).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=p["learning_rate"], weight_decay=p["weight_decay"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(p))
        aff_loss = build_loss(p["loss"], **p["loss_params"])
        sizes = np.array([np.prod(v.shape) for v in train_vols], dtype=np.float64)
        volume_p = sizes / sizes.sum()
        val_crops = _validation_crops(val_vols, p["validation_crops"], crop, p["seed"], p["min_mask_fraction"])
        if val_vols and not val_crops:
            logger.warning("validation_crops is 0: training without validation")

        def autocast() -> contextlib.AbstractContextManager[Any]:
            return autocast_context(device, p["autocast"])

        rows: list[tuple[int, float | None, float | None]] = []
        best: tuple[float, int] | None = None
        val_loss = _validation_loss(model, val_vols, val_crops, crop, p, device)
        if val_loss is not None:
            rows.append((0, None, val_loss))
            best = (val_loss, 0)
            logger.info("step 0: val_loss %.5f", val_loss)

        started = time.perf_counter()
        train_loss = float("nan")
        model.train()
        progress = tqdm(range(1, p["steps"] + 1), desc="train", unit="step", disable=None)
        for step in progress:
            samples = []
            for _ in range(p["batch_size"]):
                volume = train_vols[int(rng.choice(len(train_vols), p=volume_p))]
                start, mask = _sample_crop(volume, crop, rng, p["min_mask_fraction"])
                samples.append(volume.read(start, crop, mask))
            batch = _to_device(samples, device)
            loss = _batch_loss(model, batch, num_offsets, aff_loss, p["lsd_weight"], autocast)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if p["grad_clip_norm"] is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), p["grad_clip_norm"])
            optimizer.step()
            scheduler.step()
            train_loss = loss.item()
            if not math.isfinite(train_loss):
                raise FloatingPointError(
                    f"training diverged at step {step} (loss {train_loss}); lower learning_rate "
                    f"(now {p['learning_rate']}) or check the inputs"
                )
            val_loss = None
            checkpoint_step = step % p["validate_every"] == 0 or step == p["steps"]
            if checkpoint_step:
                val_loss = _validation_loss(model, val_vols, val_crops, crop, p, device)
                if val_loss is not None:
                    logger.info("step %d: train_loss %.5f val_loss %.5f", step, train_loss, val_loss)
                    if best is None or val_loss < best[0]:
                        best = (val_loss, step)
            rows.append((step, train_loss, val_loss))
            if step % 10 == 0 or checkpoint_step:
                progress.set_postfix(loss=f"{train_loss:.4f}")
            if checkpoint_step:
                save_checkpoint(out / "checkpoint.pt", model, optimizer, step)
                _write_curve(out / "loss_curve.tsv", rows)
        progress.close()

    seconds = time.perf_counter() - started
    summary = {
        "steps": p["steps"],
        "final_train_loss": train_loss,
        "best_val_loss": best[0] if best else None,
        "best_val_step": best[1] if best else None,
        "final_val_loss": rows[-1][2],
        "seconds": seconds,
        "device": str(device),
    }
    logger.info("training done in %.1f s: %s", seconds, summary)
    return summary
