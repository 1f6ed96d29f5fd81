"""Tests for dinopipe.losses on hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from dinopipe.losses import (
    affinity_lsd_loss,
    build_loss,
    dice_loss,
    focal_loss,
    masked_mse,
    tversky_loss,
    weighted_bce,
)

LN2 = math.log(2.0)


def vol(values, channels=1):
    """(1, C, 1, 1, N) tensor from a flat list (C rows of N values)."""
    t = torch.tensor(values, dtype=torch.float32)
    return t.reshape(1, channels, 1, 1, -1)


def test_bce_of_logit_zero_is_ln2():
    logits = torch.zeros(2, 3, 2, 2, 2)
    for target in (torch.zeros_like(logits), torch.ones_like(logits)):
        assert weighted_bce(logits, target).item() == pytest.approx(LN2)


def test_bce_hand_values_weight_and_mask():
    logits, target = vol([2.0, -1.0, 3.0]), vol([1.0, 0.0, 0.0])
    per_voxel = [math.log1p(math.exp(-2.0)), math.log1p(math.exp(-1.0)), math.log1p(math.exp(3.0))]
    assert weighted_bce(logits, target).item() == pytest.approx(sum(per_voxel) / 3)
    weight = vol([2.0, 1.0, 1.0])
    assert weighted_bce(logits, target, weight).item() == pytest.approx(
        (2 * per_voxel[0] + per_voxel[1] + per_voxel[2]) / 3
    )
    mask = torch.tensor([1.0, 1.0, 0.0]).reshape(1, 1, 1, -1)  # (B, z, y, x)
    assert weighted_bce(logits, target, weight, mask).item() == pytest.approx((2 * per_voxel[0] + per_voxel[1]) / 2)


def test_masked_out_voxels_are_ignored():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    target = (torch.rand(2, 3, 4, 4, 4) > 0.5).float()
    mask = torch.ones(2, 1, 4, 4, 4)
    mask[:, :, :2] = 0
    wild = logits.detach().clone()
    wild[:, :, :2] = 1e4 * (1 - 2 * target[:, :, :2])  # confidently wrong where masked out
    for fn in (weighted_bce, masked_mse, focal_loss, dice_loss, tversky_loss):
        expected = fn(logits[:, :, 2:], target[:, :, 2:])
        assert fn(logits, target, None, mask).item() == pytest.approx(expected.item(), rel=1e-5), fn.__name__
        assert fn(wild, target, None, mask).item() == pytest.approx(
            fn(wild[:, :, 2:], target[:, :, 2:]).item(), rel=1e-5
        ), fn.__name__
    weighted_bce(logits, target, None, mask).backward()
    assert torch.all(logits.grad[:, :, :2] == 0)


@pytest.mark.parametrize("fn", [weighted_bce, masked_mse, focal_loss, dice_loss, tversky_loss])
def test_empty_mask_gives_zero_not_nan(fn):
    logits = torch.randn(1, 2, 3, 3, 3, requires_grad=True)
    loss = fn(logits, torch.ones(1, 2, 3, 3, 3), torch.full((1, 1, 3, 3, 3), 3.0), torch.zeros(1, 3, 3, 3))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_mask_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"mask of shape \(1, 1, 2, 2, 3\)"):
        weighted_bce(torch.zeros(1, 1, 2, 2, 2), torch.zeros(1, 1, 2, 2, 2), None, torch.ones(1, 1, 2, 2, 3))
    with pytest.raises(ValueError, match="target shape"):
        weighted_bce(torch.zeros(1, 1, 2, 2, 2), torch.zeros(1, 2, 2, 2, 2))


def test_mse_hand_values():
    assert masked_mse(vol([0.5, 1.0]), vol([0.0, 0.0])).item() == pytest.approx((0.25 + 1.0) / 2)
    mask = vol([0.0, 1.0])
    assert masked_mse(vol([0.5, 1.0]), vol([0.0, 0.0]), None, mask).item() == pytest.approx(1.0)


def test_focal_hand_values():
    logits, target = vol([0.0, 0.0]), vol([1.0, 0.0])
    # p_t = 0.5 everywhere: (1 - 0.5)^2 * ln 2, alpha_t = 0.25 for target 1, 0.75 for target 0
    assert focal_loss(logits, target, gamma=2.0, alpha=0.25).item() == pytest.approx((0.25 + 0.75) / 2 * 0.25 * LN2)
    assert focal_loss(logits, target, gamma=2.0, alpha=None).item() == pytest.approx(0.25 * LN2)
    torch.manual_seed(1)
    x, t = torch.randn(1, 2, 3, 3, 3), (torch.rand(1, 2, 3, 3, 3) > 0.5).float()
    assert focal_loss(x, t, gamma=0.0, alpha=None).item() == pytest.approx(weighted_bce(x, t).item())
    # a confident correct prediction is down-weighted much more than under BCE
    easy, easy_t = vol([4.0]), vol([1.0])
    assert focal_loss(easy, easy_t, gamma=2.0, alpha=None) < 0.001 * weighted_bce(easy, easy_t)


def test_dice_and_tversky_hand_values():
    logits, target = vol([0.0] * 4), vol([1.0] * 4)  # p = 0.5, t = 1: TP = 2, FP = 0, FN = 2
    assert dice_loss(logits, target, smooth=0.0).item() == pytest.approx(1 - 4 / (2 + 4))
    assert tversky_loss(logits, target, alpha=0.5, beta=0.5, smooth=0.0).item() == pytest.approx(1 / 3)
    assert tversky_loss(logits, target, alpha=1.0, beta=0.0, smooth=0.0).item() == pytest.approx(0.0)
    assert tversky_loss(logits, target, alpha=0.0, beta=1.0, smooth=0.0).item() == pytest.approx(0.5)
    # perfect prediction: loss ~0; per channel, then averaged over channels
    two = vol([20.0, -20.0, 0.0, 0.0], channels=2)
    two_t = vol([1.0, 0.0, 1.0, 1.0], channels=2)
    assert dice_loss(two, two_t, smooth=0.0).item() == pytest.approx((0.0 + 1 / 3) / 2, abs=1e-6)
    # weights scale the contributions: TP = 2 * 0.5 + 0.5, sum p = 1.5, sum t = 3
    weight = vol([2.0, 1.0, 0.0, 0.0])
    assert dice_loss(logits, target, weight, smooth=0.0).item() == pytest.approx(1 - 3 / (1.5 + 3))


def test_affinity_lsd_loss_is_bce_plus_weighted_mse():
    aff, aff_t = vol([0.0, 0.0]), vol([1.0, 0.0])
    lsd, lsd_t = vol([0.5, 0.5]), vol([0.0, 1.0])
    weight = vol([3.0, 1.0])
    expected = (3 * LN2 + LN2) / 2 + 0.5 * 0.25
    assert affinity_lsd_loss(aff, aff_t, lsd, lsd_t, weight, None, lsd_weight=0.5).item() == pytest.approx(expected)
    mask = vol([1.0, 0.0])
    expected_masked = 3 * LN2 + 0.5 * 0.25
    assert affinity_lsd_loss(aff, aff_t, lsd, lsd_t, weight, mask, lsd_weight=0.5).item() == pytest.approx(
        expected_masked
    )
    assert affinity_lsd_loss(aff, aff_t, None, None, weight, mask).item() == pytest.approx(3 * LN2)
    with pytest.raises(ValueError, match="lsd_weight"):
        affinity_lsd_loss(aff, aff_t, lsd, lsd_t, lsd_weight=-1.0)


def test_losses_accept_bf16_and_compute_in_float32():
    logits = torch.zeros(1, 1, 2, 2, 2, dtype=torch.bfloat16)
    loss = weighted_bce(logits, torch.ones(1, 1, 2, 2, 2, dtype=torch.bfloat16))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(LN2)


def test_build_loss():
    x, t = vol([0.0, 0.0]), vol([1.0, 0.0])
    assert build_loss("bce")(x, t).item() == pytest.approx(LN2)
    assert build_loss("focal", gamma=0.0, alpha=None)(x, t).item() == pytest.approx(LN2)
    assert build_loss("tversky", alpha=0.0, beta=1.0, smooth=0.0)(x, t).item() == pytest.approx(0.5)
    assert build_loss("dice", smooth=0.0)(x, t, None, vol([1.0, 0.0])).item() == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match=r"unknown loss 'hinge'; allowed: \['bce', 'bce_dice', 'dice', 'focal', 'tversky'\]"):
        build_loss("hinge")
    with pytest.raises(ValueError, match=r"unknown parameters \['delta'\] for loss 'focal'"):
        build_loss("focal", delta=1.0)
    with pytest.raises(ValueError, match=r"unknown parameters \['gamma'\] for loss 'bce'"):
        build_loss("bce", gamma=1.0)
    with pytest.raises(ValueError, match="gamma must be a number >= 0, got -1"):
        build_loss("focal", gamma=-1)
    with pytest.raises(ValueError, match="alpha must be a number in"):
        build_loss("focal", alpha=2.0)


def test_cross_entropy_hand_values_class_weights_and_mask():
    from dinopipe.losses import weighted_cross_entropy

    # two voxels, two classes: logits (0, 0) -> CE ln 2 whatever the class; (ln 3, 0) -> p(class 0) = 3/4
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]]).reshape(1, 2, 1, 1, 2)
    target = torch.tensor([1, 0]).reshape(1, 1, 1, 2)
    ce = [LN2, -math.log(0.75)]
    assert weighted_cross_entropy(logits, target).item() == pytest.approx(sum(ce) / 2)
    weights = torch.tensor([3.0, 0.5])  # class 1 at voxel 0, class 0 at voxel 1
    assert weighted_cross_entropy(logits, target, weights).item() == pytest.approx((0.5 * ce[0] + 3 * ce[1]) / 2)
    mask = torch.tensor([0.0, 1.0]).reshape(1, 1, 1, 2)
    assert weighted_cross_entropy(logits, target, weights, mask).item() == pytest.approx(3 * ce[1])
    empty = weighted_cross_entropy(logits, target, weights, torch.zeros_like(mask))
    assert empty.item() == 0.0
    with pytest.raises(ValueError, match="class weights for 2 classes"):
        weighted_cross_entropy(logits, target, torch.ones(3))
    with pytest.raises(ValueError, match="without the class axis"):
        weighted_cross_entropy(logits, target.unsqueeze(0))


def test_boundary_weighted_affinity_loss_uses_each_loss_own_parameters():
    # focal alpha and tversky alpha are separate parameters of separate losses: never shared
    x, t = vol([0.0, 0.0]), vol([1.0, 0.0])
    focal = build_loss("focal", gamma=0.0, alpha=0.25)
    assert focal(x, t).item() == pytest.approx((0.25 + 0.75) / 2 * LN2)
    tversky = build_loss("tversky", alpha=0.0, beta=1.0, smooth=0.0)
    assert tversky(x, t).item() == pytest.approx(0.5)
    weight = vol([4.0, 1.0])  # boundary weights emphasise the first voxel
    assert affinity_lsd_loss(x, t, None, None, weight, None, affinity_loss=focal).item() == pytest.approx(
        (4 * 0.25 + 0.75) / 2 * LN2
    )
