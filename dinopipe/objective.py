"""What a training batch is scored by: the network input, the loss and the confusion counts,
and validation on fixed crops (loss and balanced accuracy per offset or class).

Shared by :mod:`dinopipe.train` (each step and each validation) and
:func:`dinopipe.train.validation_loss`; tensors are (batch, channels, z, y, x).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from dinopipe.augment import feature_noise, raw_intensity
from dinopipe.evaluate import balanced_accuracy
from dinopipe.loader import CropSampler, to_device
from dinopipe.losses import affinity_lsd_loss, build_loss, per_class_loss, weighted_cross_entropy
from dinopipe.runtime import autocast_context
from dinopipe.unet import UNet3D, split_output


class Objective:
    """Network input, loss and confusion counts of a batch, for either target type."""

    def __init__(self, p: Mapping[str, Any], num_offsets: int, class_weights: list[float] | None,
                 device: torch.device, overlap: bool = False) -> None:
        """``overlap``: overlapping classes (``targets.classes_overlap``): one sigmoid per class,
        ``p["loss"]`` per class within each class's annotation mask (:func:`per_class_loss`)."""
        self.p, self.num_offsets, self.device = p, num_offsets, device
        self.semantic = p["target"] == "semantic"
        self.overlap = self.semantic and overlap
        self.class_weights = None if class_weights is None else torch.tensor(class_weights, device=device)
        sigmoid = not self.semantic or self.overlap
        self.aff_loss = build_loss(p["loss"], **p["loss_params"]) if sigmoid else None

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
        if self.overlap:
            assert self.aff_loss is not None
            return per_class_loss(output, batch["classes"], batch["class_mask"], self.aff_loss, self.class_weights)
        if self.semantic:
            return weighted_cross_entropy(output, batch["semantic"], self.class_weights, batch["mask"])
        aff_logits, lsd_pred = split_output(output, self.num_offsets)
        return affinity_lsd_loss(
            aff_logits, batch["affinities"], lsd_pred, batch.get("lsds"), batch["weights"], batch["mask"],
            lsd_weight=self.p["lsd_weight"], affinity_loss=self.aff_loss,
        )

    def confusion(self, output: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> np.ndarray:
        """(TP, FP, FN, TN) over masked elements per channel: per offset, positive = affinity
        (predicted > 0.5, target 1); or per class, that class against the rest (overlapping
        classes: probability > 0.5, within the class's annotation mask)."""
        mask = batch["mask"] > 0
        if mask.dim() < output.dim():
            mask = mask.unsqueeze(1)
        if self.overlap:  # per class, within its own annotation
            pred, truth, known = output > 0, batch["classes"] > 0.5, batch["class_mask"] > 0
            counts = [[int((p & t & m).sum()), int((p & ~t & m).sum()), int((~p & t & m).sum()),
                       int((~p & ~t & m).sum())]
                      for p, t, m in ((pred[:, c], truth[:, c], known[:, c]) for c in range(output.shape[1]))]
            return np.array(counts, dtype=np.int64)
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


def validate_crops(
    model: UNet3D, sampler: CropSampler | None, crops: Sequence[tuple[int, tuple[int, ...]]],
    objective: Objective, device: torch.device, autocast: str,
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
