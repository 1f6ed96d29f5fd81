"""Masked, weighted losses for affinity and LSD prediction.

Shapes: predictions and targets are (B, C, z, y, x). ``weight`` and ``mask`` are
(B, 1, z, y, x), (B, z, y, x) or (B, C, z, y, x) and broadcast over channels.

Mask semantics (all losses): ``mask`` is 1 where the target is known and 0
elsewhere. Masked-out voxels contribute nothing. Voxelwise losses
(:func:`weighted_bce`, :func:`masked_mse`, :func:`focal_loss`) are
``sum(mask * weight * loss) / sum(mask)`` over all elements (voxels x channels),
i.e. the mean over masked elements with ``weight`` as an emphasis factor (boundary
weights >= 1 raise the loss near boundaries rather than being normalised away). An
empty mask gives a loss of 0 (with a gradient of 0), never NaN. Overlap losses
(:func:`dice_loss`, :func:`tversky_loss`) sum over the batch and space per channel
and average over channels.

All losses are computed in float32, whatever the dtype of their inputs (e.g. bf16
under autocast).

Semantic targets (one class per voxel) use :func:`weighted_cross_entropy` with class
weights. Overlapping classes (one sigmoid per class) use :func:`per_class_loss`: any of the
losses below on each class channel, masked by that class's annotation mask, then averaged
with class weights over the classes annotated in the batch.

Every affinity loss has the signature ``loss(logits, target, weight=None,
mask=None, **params)``; :func:`build_loss` binds the params by name.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

AffinityLoss = Callable[..., torch.Tensor]


def _as_float(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype != torch.float32 else t


def _broadcastable(t: torch.Tensor | None, ref: torch.Tensor, name: str) -> torch.Tensor | None:
    """Bring ``weight``/``mask`` to a shape that broadcasts against ``ref`` (B, C, z, y, x)."""
    if t is None:
        return None
    t = _as_float(t)
    if t.dim() == ref.dim() - 1:
        t = t.unsqueeze(1)
    if t.dim() != ref.dim() or t.shape[0] != ref.shape[0] or t.shape[2:] != ref.shape[2:] or t.shape[1] not in (
        1,
        ref.shape[1],
    ):
        raise ValueError(
            f"{name} of shape {tuple(t.shape)} does not match predictions of shape {tuple(ref.shape)}; "
            "allowed: (B, z, y, x), (B, 1, z, y, x) or the predictions' shape"
        )
    return t


def _check_pair(pred: torch.Tensor, target: torch.Tensor, what: str) -> None:
    if pred.dim() != 5:
        raise ValueError(f"{what}: expected (B, C, z, y, x) predictions, got shape {tuple(pred.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"{what}: prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")


def _masked_mean(
    elementwise: torch.Tensor, weight: torch.Tensor | None, mask: torch.Tensor | None
) -> torch.Tensor:
    """``sum(mask * weight * elementwise) / sum(mask)`` over all elements; 0 for an empty mask."""
    if weight is not None:
        elementwise = elementwise * weight
    if mask is None:
        return elementwise.mean()
    total = (elementwise * mask).sum()
    count = mask.expand_as(elementwise).sum()
    return total / torch.where(count > 0, count, torch.ones_like(count))


def weighted_bce(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    pos_weight: float = 1.0,
) -> torch.Tensor:
    """Binary cross-entropy on logits, weighted and masked.

    Per element ``-(pos_weight * t log p + (1 - t) log(1 - p))``, ``p = sigmoid(logit)``
    (torch's ``pos_weight``): a ``pos_weight`` above 1 counts the rare positives (a class
    covering 1 % of the voxels) more, as class weights do for cross-entropy.

    Args:
        logits: (B, C, z, y, x) logits.
        target: (B, C, z, y, x) targets in [0, 1].
        weight: Per-voxel weights (e.g. boundary weights >= 1), or None for 1.
        mask: 1 where the target is known, or None for everywhere.
        pos_weight: Weight of the positive term, > 0.

    Returns:
        Scalar: mean over masked elements of ``weight * BCE`` (``ln 2`` for logits 0
        and weight 1).
    """
    _check_pair(logits, target, "weighted_bce")
    logits, target = _as_float(logits), _as_float(target)
    extra = {} if pos_weight == 1.0 else {"pos_weight": torch.tensor(float(pos_weight), device=logits.device)}
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none", **extra)
    return _masked_mean(bce, _broadcastable(weight, logits, "weight"), _broadcastable(mask, logits, "mask"))


def masked_mse(
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error, weighted and masked (mean over masked elements).

    Args:
        pred: (B, C, z, y, x) predictions.
        target: (B, C, z, y, x) targets.
        weight: Per-voxel weights, or None for 1.
        mask: 1 where the target is known, or None for everywhere.
    """
    _check_pair(pred, target, "masked_mse")
    pred, target = _as_float(pred), _as_float(target)
    return _masked_mean(
        (pred - target) ** 2, _broadcastable(weight, pred, "weight"), _broadcastable(mask, pred, "mask")
    )


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    gamma: float = 2.0,
    alpha: float | None = 0.25,
) -> torch.Tensor:
    """Focal loss (Lin et al. 2017) on logits, weighted and masked.

    Per element: ``-alpha_t * (1 - p_t)**gamma * log(p_t)`` with ``p_t = p`` where
    the target is 1 and ``1 - p`` where it is 0; ``alpha_t = alpha`` for targets 1
    and ``1 - alpha`` for targets 0 (soft targets interpolate). ``gamma=0`` and
    ``alpha=None`` give :func:`weighted_bce`.

    Args:
        logits: (B, C, z, y, x) logits.
        target: (B, C, z, y, x) targets in [0, 1].
        weight: Per-voxel weights, or None for 1.
        mask: 1 where the target is known, or None for everywhere.
        gamma: Focusing exponent, >= 0.
        alpha: Weight of the positive class in [0, 1], or None for no class weighting.
    """
    _check_focal(gamma, alpha)
    _check_pair(logits, target, "focal_loss")
    logits, target = _as_float(logits), _as_float(target)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * target + (1 - p) * (1 - target)
    loss = (1 - p_t) ** gamma * bce if gamma else bce
    if alpha is not None:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return _masked_mean(loss, _broadcastable(weight, logits, "weight"), _broadcastable(mask, logits, "mask"))


def tversky_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    alpha: float = 0.5,
    beta: float = 0.5,
    smooth: float = 1.0,
) -> torch.Tensor:
    """Soft Tversky loss on sigmoid probabilities, per channel, averaged over channels.

    Per channel, summed over batch and space with ``w = weight * mask``:
    ``TP = sum(w p t)``, ``FP = sum(w p (1 - t))``, ``FN = sum(w (1 - p) t)`` and
    ``loss = 1 - (TP + smooth) / (TP + alpha FP + beta FN + smooth)``. A channel with
    a zero denominator (empty mask and ``smooth=0``) contributes 0. ``alpha = beta =
    0.5`` is the soft Dice loss.

    Args:
        logits: (B, C, z, y, x) logits.
        target: (B, C, z, y, x) targets in [0, 1].
        weight: Per-voxel weights, or None for 1.
        mask: 1 where the target is known, or None for everywhere.
        alpha: Weight of false positives, >= 0.
        beta: Weight of false negatives, >= 0.
        smooth: Added to numerator and denominator, >= 0.
    """
    _check_tversky(alpha, beta, smooth)
    _check_pair(logits, target, "tversky_loss")
    logits, target = _as_float(logits), _as_float(target)
    p = torch.sigmoid(logits)
    w = torch.ones_like(p[:, :1])
    for extra in (_broadcastable(weight, logits, "weight"), _broadcastable(mask, logits, "mask")):
        if extra is not None:
            w = w * extra
    w = w.expand_as(p)
    dims = (0, 2, 3, 4)
    tp = (w * p * target).sum(dims)
    fp = (w * p * (1 - target)).sum(dims)
    fn = (w * (1 - p) * target).sum(dims)
    denominator = tp + alpha * fp + beta * fn + smooth
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    per_channel = torch.where(denominator > 0, 1 - (tp + smooth) / safe, torch.zeros_like(denominator))
    return per_channel.mean()


def dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    smooth: float = 1.0,
) -> torch.Tensor:
    """Soft Dice loss: ``1 - (2 TP + s) / (sum p + sum t + s)`` per channel, averaged.

    The same as :func:`tversky_loss` with ``alpha = beta = 0.5`` (see there for the
    definitions, the masking and the weighting).
    """
    _check_tversky(0.5, 0.5, smooth)
    return tversky_loss(logits, target, weight, mask, alpha=0.5, beta=0.5, smooth=smooth)


def affinity_lsd_loss(
    aff_logits: torch.Tensor,
    aff_target: torch.Tensor,
    lsd_pred: torch.Tensor | None,
    lsd_target: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    lsd_weight: float = 1.0,
    affinity_loss: AffinityLoss | None = None,
) -> torch.Tensor:
    """Boundary-weighted affinity loss plus ``lsd_weight`` times the masked LSD MSE.

    Args:
        aff_logits: (B, n_offsets, z, y, x) affinity logits.
        aff_target: (B, n_offsets, z, y, x) affinities in {0, 1}.
        lsd_pred: (B, 10, z, y, x) predicted LSDs (after the sigmoid), or None.
        lsd_target: (B, 10, z, y, x) target LSDs, or None.
        weight: Boundary weights (>= 1) for the affinity term only; None for 1.
        mask: 1 where labels are known; applies to both terms.
        lsd_weight: Factor of the LSD term (>= 0); ignored when there are no LSDs.
        affinity_loss: Loss for the affinity term with the signature
            ``(logits, target, weight, mask)`` (see :func:`build_loss`); default
            :func:`weighted_bce`.

    Returns:
        Scalar loss.
    """
    if lsd_weight < 0:
        raise ValueError(f"lsd_weight must be >= 0, got {lsd_weight!r}")
    if (lsd_pred is None) != (lsd_target is None):
        raise ValueError("lsd_pred and lsd_target must both be given or both be None")
    loss = (affinity_loss or weighted_bce)(aff_logits, aff_target, weight, mask)
    if lsd_pred is not None and lsd_target is not None and lsd_weight > 0:
        loss = loss + lsd_weight * masked_mse(lsd_pred, lsd_target, None, mask)
    return loss


def weighted_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy for semantic (per-voxel class) targets, class-weighted and masked.

    Per voxel: ``-w[t] * log softmax(logits)[t]`` with ``t`` the voxel's class and ``w``
    the class weights (e.g. from :func:`dinopipe.targets.compute_semantic_targets`,
    normalised to mean 1 over the voxels). Reduced as the other voxelwise losses:
    ``sum(mask * w[t] * CE) / sum(mask)``; an empty mask gives 0.

    Args:
        logits: (B, K, z, y, x) class logits.
        target: (B, z, y, x) integer classes in [0, K).
        class_weights: (K,) weights, or None for 1.
        mask: (B, z, y, x) or (B, 1, z, y, x), 1 where the class is known, or None.
    """
    if logits.dim() != 5:
        raise ValueError(f"weighted_cross_entropy: expected (B, K, z, y, x) logits, got shape {tuple(logits.shape)}")
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"weighted_cross_entropy: target shape {tuple(target.shape)} must be the logits' shape "
            f"{tuple(logits.shape)} without the class axis"
        )
    if class_weights is not None and class_weights.shape != (logits.shape[1],):
        raise ValueError(
            f"weighted_cross_entropy: {tuple(class_weights.shape)} class weights for {logits.shape[1]} classes"
        )
    logits = _as_float(logits)
    ce = F.cross_entropy(logits, target.long(), reduction="none").unsqueeze(1)  # (B, 1, z, y, x)
    weight = None
    if class_weights is not None:
        weight = _as_float(class_weights).to(logits.device)[target.long()].unsqueeze(1)
    return _masked_mean(ce, weight, _broadcastable(mask, ce, "mask"))


def _check_number(name: str, value: Any, low: float, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < low or (
        high is not None and value > high
    ):
        allowed = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"loss parameter {name} must be a number {allowed}, got {value!r}")


def _check_focal(gamma: float, alpha: float | None) -> None:
    _check_number("gamma", gamma, 0)
    if alpha is not None:
        _check_number("alpha", alpha, 0, 1)


def _check_tversky(alpha: float, beta: float, smooth: float) -> None:
    _check_number("alpha", alpha, 0)
    _check_number("beta", beta, 0)
    _check_number("smooth", smooth, 0)


def bce_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    smooth: float = 1.0,
    dice_weight: float = 1.0,
    pos_weight: float = 1.0,
) -> torch.Tensor:
    """:func:`weighted_bce` (with ``pos_weight``) + ``dice_weight`` x :func:`dice_loss` (same
    weight and mask)."""
    _check_bce_dice(smooth, dice_weight, pos_weight)
    return weighted_bce(logits, target, weight, mask, pos_weight=pos_weight) + dice_weight * dice_loss(
        logits, target, weight, mask, smooth=smooth)


def _check_bce(pos_weight: float) -> None:
    _check_number("pos_weight", pos_weight, 0)
    if pos_weight == 0:
        raise ValueError("loss parameter pos_weight must be > 0, got 0")


def _check_bce_dice(smooth: float, dice_weight: float, pos_weight: float = 1.0) -> None:
    _check_number("smooth", smooth, 0)
    _check_number("dice_weight", dice_weight, 0)
    _check_bce(pos_weight)


def per_class_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    loss: AffinityLoss,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """A sigmoid loss per class of overlapping classes, each masked by its own annotation mask.

    ``L_c = loss(logits[:, c], target[:, c], mask=mask[:, c])`` for every class ``c`` whose
    mask is not empty in the batch; the result is ``sum(w_c L_c) / sum(w_c)`` over those
    classes (``w`` the class weights, 1 by default), 0 when no class is annotated. Each class
    is thus normalised by its own annotated voxels (a class annotated in few crops counts as
    much as one annotated everywhere), and a class not annotated in a crop (CellMap: the crop
    lacks its array) contributes nothing there.

    Args:
        logits: (B, C, z, y, x) class logits.
        target: (B, C, z, y, x) 0/1 class targets.
        mask: (B, C, z, y, x) 1 where class ``c`` is annotated.
        loss: A loss ``loss(logits, target, weight, mask)`` (:func:`build_loss`).
        class_weights: (C,) weights >= 0, or None for 1.
    """
    _check_pair(logits, target, "per_class_loss")
    if mask.shape != logits.shape:
        raise ValueError(f"per_class_loss: mask shape {tuple(mask.shape)} must be the logits' shape "
                         f"{tuple(logits.shape)} (one annotation mask per class)")
    num = logits.shape[1]
    if class_weights is not None and class_weights.shape != (num,):
        raise ValueError(f"per_class_loss: {tuple(class_weights.shape)} class weights for {num} classes")
    total = logits.new_zeros((), dtype=torch.float32)
    norm = logits.new_zeros((), dtype=torch.float32)
    for c in range(num):
        m = mask[:, c : c + 1]
        if not bool((m > 0).any()):
            continue
        w = 1.0 if class_weights is None else _as_float(class_weights[c]).to(logits.device)
        total = total + w * loss(logits[:, c : c + 1], target[:, c : c + 1], None, m)
        norm = norm + w
    return total / norm if float(norm) > 0 else total


LOSSES: dict[str, tuple[AffinityLoss, dict[str, Any], Callable[..., None] | None]] = {
    "bce": (weighted_bce, {"pos_weight": 1.0}, _check_bce),
    "focal": (focal_loss, {"gamma": 2.0, "alpha": 0.25}, _check_focal),
    "dice": (dice_loss, {"smooth": 1.0}, lambda smooth: _check_tversky(0.5, 0.5, smooth)),
    "tversky": (tversky_loss, {"alpha": 0.5, "beta": 0.5, "smooth": 1.0}, _check_tversky),
    "bce_dice": (bce_dice_loss, {"smooth": 1.0, "dice_weight": 1.0, "pos_weight": 1.0}, _check_bce_dice),
}
"""Affinity losses by name: (function, default params, parameter check)."""


def build_loss(name: str, **params: Any) -> AffinityLoss:
    """An affinity loss ``loss(logits, target, weight=None, mask=None)`` by name.

    Args:
        name: One of "bce" (param pos_weight), "focal" (gamma, alpha), "dice" (smooth),
            "tversky" (alpha, beta, smooth) or "bce_dice" (smooth, dice_weight, pos_weight).
        **params: Parameters of that loss; defaults as in the loss functions.

    Raises:
        ValueError: Unknown name, unknown parameter or invalid parameter value.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; allowed: {sorted(LOSSES)}")
    fn, defaults, check = LOSSES[name]
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(f"unknown parameters {unknown} for loss {name!r}; allowed: {sorted(defaults)}")
    merged = {**defaults, **params}
    if check is not None:
        check(**merged)
    return functools.partial(fn, **merged) if merged else fn
