"""Tests for dinopipe.unet: shapes, config round trip, receptive field halo."""

from __future__ import annotations

import json

import pytest
import torch

from dinopipe.unet import (
    NUM_LSD_CHANNELS,
    UNet3D,
    UNetConfig,
    output_channels,
    receptive_field_halo,
    split_output,
)


@pytest.mark.parametrize(
    ("levels", "base", "mult", "norm", "dropout", "spatial"),
    [
        (0, 4, 2, None, 0.0, (3, 5, 7)),
        (1, 4, 2, "batch", 0.0, (4, 6, 8)),
        (2, 4, 1, "group", 0.1, (8, 12, 4)),
        (2, 3, 2, "instance", 0.0, (8, 8, 8)),
        (3, 2, 3, "batch", 0.0, (8, 16, 8)),
    ],
)
def test_output_shape_equals_input_shape(levels, base, mult, norm, dropout, spatial):
    config = UNetConfig(
        in_channels=5,
        out_channels=13,
        levels=levels,
        base_channels=base,
        channel_multiplier=mult,
        norm=norm,
        dropout=dropout,
    )
    model = UNet3D(config)
    out = model(torch.randn(2, 5, *spatial))
    assert out.shape == (2, 13, *spatial)


def test_indivisible_shape_is_a_clear_error():
    model = UNet3D(in_channels=2, out_channels=1, levels=2, base_channels=2)
    with pytest.raises(ValueError, match=r"divisible by 4.*\(8, 6, 8\)"):
        model(torch.randn(1, 2, 8, 6, 8))
    with pytest.raises(ValueError, match=r"\(B, 2, z, y, x\)"):
        model(torch.randn(1, 3, 8, 8, 8))


def test_config_round_trip_and_validation():
    config = UNetConfig(in_channels=16, out_channels=13, levels=3, norm="group", dropout=0.2, checkpointing=True)
    data = json.loads(json.dumps(config.to_dict()))
    assert UNetConfig.from_dict(data) == config
    with pytest.raises(ValueError, match=r"unknown UNet config keys \['depth', 'kernel'\]"):
        UNetConfig.from_dict({**data, "depth": 2, "kernel": 5})
    with pytest.raises(ValueError, match="in_channels"):
        UNetConfig.from_dict({"out_channels": 3})
    with pytest.raises(ValueError, match="norm.*'layer'"):
        UNetConfig(in_channels=1, out_channels=1, norm="layer")
    with pytest.raises(ValueError, match="dropout"):
        UNetConfig(in_channels=1, out_channels=1, dropout=1.0)
    with pytest.raises(ValueError, match="levels"):
        UNetConfig(in_channels=1, out_channels=1, levels=-1)
    assert UNetConfig(in_channels=1, out_channels=1, norm="none").norm is None


def test_halo_positive_and_growing():
    halos = [receptive_field_halo(UNetConfig(in_channels=1, out_channels=1, levels=n)) for n in range(5)]
    assert halos[0] > 0
    assert all(b > a for a, b in zip(halos, halos[1:]))
    assert receptive_field_halo({"levels": 2}) == halos[2] == 23


@pytest.mark.parametrize("levels", [0, 1, 2])
def test_halo_is_the_exact_receptive_field(levels):
    """The gradient of one output voxel is non-zero exactly within the halo, never beyond."""
    torch.manual_seed(0)
    config = UNetConfig(in_channels=2, out_channels=3, levels=levels, base_channels=4, norm=None)
    model = UNet3D(config).double()
    halo = receptive_field_halo(config)
    step = 2**levels
    n = step * -(-(4 * step + 2 * halo) // step)
    extent = 0
    for position in range(n // 2 - step, n // 2 + step):  # every pooling phase
        x = torch.randn(1, 2, n, 4, 4, dtype=torch.double, requires_grad=True)
        model(x)[0, :, position].sum().backward()
        touched = (x.grad[0].abs().sum((0, 2, 3)) > 0).nonzero().flatten()
        extent = max(extent, position - int(touched.min()), int(touched.max()) - position)
    assert extent == halo


def test_checkpointing_gives_the_same_output_and_gradients():
    torch.manual_seed(0)
    plain = UNet3D(in_channels=3, out_channels=2, levels=2, base_channels=4, norm="group")
    checkpointed = UNet3D(in_channels=3, out_channels=2, levels=2, base_channels=4, norm="group", checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 8, 8, 8)
    grads = []
    for model in (plain, checkpointed):
        model.zero_grad()
        out = model(x)
        out.square().mean().backward()
        grads.append((out.detach(), model.head.weight.grad.clone(), model.encoders[0][0].weight.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_output_channels_and_split():
    assert output_channels(3, lsds=True) == 3 + NUM_LSD_CHANNELS == 13
    assert output_channels(5, lsds=False) == 5
    with pytest.raises(ValueError, match="num_offsets"):
        output_channels(0, lsds=True)
    out = torch.zeros(1, 13, 2, 2, 2)
    affs, lsds = split_output(out, 3)
    assert affs.shape[1] == 3 and lsds is not None and lsds.shape[1] == 10
    assert torch.all(lsds == 0.5)  # LSDs go through a sigmoid
    assert split_output(out[:, :3], 3)[1] is None
    with pytest.raises(ValueError, match="13 channels"):
        split_output(out, 4)


def test_channels_follow_the_target_type():
    from dinopipe.unet import target_channels

    assert target_channels("affinities", num_offsets=6, lsds=True, feature_channels=32) == (32, 16)
    assert target_channels("affinities", num_offsets=6, lsds=False, feature_channels=32, input_raw=True) == (33, 6)
    assert target_channels("semantic", num_classes=4, feature_channels=8) == (8, 4)
    with pytest.raises(ValueError, match="num_classes >= 2"):
        target_channels("semantic", num_classes=1, feature_channels=8)
    # overlapping classes: one sigmoid per class, a single class is fine
    assert target_channels("semantic", num_classes=1, feature_channels=8, overlap=True) == (8, 1)
    with pytest.raises(ValueError, match=r"num_classes >= 1 \(overlapping classes\)"):
        target_channels("semantic", num_classes=0, feature_channels=8, overlap=True)
    with pytest.raises(ValueError, match="target must be"):
        target_channels("boundaries", feature_channels=8)
