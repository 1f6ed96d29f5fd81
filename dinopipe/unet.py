"""A configurable 3D UNet that maps feature volumes to affinities and LSDs.

Tensors are (batch, channels, z, y, x). Every convolution has kernel size 3 and
"same" (zero) padding, downsampling is 2x2x2 max pooling and upsampling a 2x2x2
transposed convolution, so the output has the spatial shape of the input. The
input's spatial shape must be divisible by ``2**levels`` on every axis; other shapes
are rejected with a ValueError (callers pad, e.g. :mod:`dinopipe.predict`).

The output channels follow from the target type (:func:`target_channels`): for
affinities ``num_offsets`` affinity logits followed by :data:`dinopipe.targets.NUM_LSD_CHANNELS` LSD
channels (see :func:`output_channels` and :func:`split_output`), for semantic targets
one logit per class. The input channels are the feature channels, plus one for the raw
image when the model was trained with ``input_raw``.

Normalisation and blockwise prediction: "batch" (in eval mode) and no normalisation
act voxel by voxel, so predicting a volume block by block with a halo of
:func:`receptive_field_halo` voxels gives the same result as predicting it in one
piece. "group" and "instance" normalise with statistics over the whole spatial
extent of the input, so their output depends on the block size and position, and
blockwise predictions show (usually small) seams.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dinopipe.targets import NUM_LSD_CHANNELS

logger = logging.getLogger(__name__)


NORMS = ("batch", "group", "instance")
"""Allowed values of :attr:`UNetConfig.norm` (besides None)."""

_CONVS_PER_BLOCK = 2
_KERNEL_SIZE = 3


@dataclass
class UNetConfig:
    """Architecture of :class:`UNet3D`; JSON-serialisable via :meth:`to_dict`.

    Attributes:
        in_channels: Input channels (feature channels).
        out_channels: Output channels (affinities + LSDs, see :func:`output_channels`).
        levels: Number of 2x downsamplings; input spatial dims must be divisible by
            ``2**levels``.
        base_channels: Channels of the first (full-resolution) level.
        channel_multiplier: Channels grow by this factor per level:
            ``base_channels * channel_multiplier**level``.
        norm: "batch", "group", "instance" or None (no normalisation). See the
            module docstring for how this affects blockwise prediction.
        dropout: Probability of channel dropout (``Dropout3d``) after each
            convolution block, in [0, 1).
        checkpointing: Recompute the activations of each convolution block in the
            backward pass instead of storing them (saves memory, costs ~30% time).
    """

    in_channels: int
    out_channels: int
    levels: int = 2
    base_channels: int = 16
    channel_multiplier: int = 2
    norm: str | None = "batch"
    dropout: float = 0.0
    checkpointing: bool = False

    def __post_init__(self) -> None:
        for name, minimum in (
            ("in_channels", 1),
            ("out_channels", 1),
            ("levels", 0),
            ("base_channels", 1),
            ("channel_multiplier", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"UNet {name} must be an integer >= {minimum}, got {value!r}")
        if isinstance(self.norm, str) and self.norm.lower() == "none":
            self.norm = None
        if self.norm is not None and self.norm not in NORMS:
            raise ValueError(f"UNet norm must be one of {list(NORMS)} or None, got {self.norm!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float) or not 0 <= self.dropout < 1:
            raise ValueError(f"UNet dropout must be a number in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        if not isinstance(self.checkpointing, bool):
            raise ValueError(f"UNet checkpointing must be true or false, got {self.checkpointing!r}")

    @property
    def divisor(self) -> int:
        """Spatial dims of the input must be multiples of this (``2**levels``)."""
        return 2**self.levels

    def channels(self, level: int) -> int:
        """Feature channels at ``level`` (0 = full resolution)."""
        return self.base_channels * self.channel_multiplier**level

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict that :meth:`from_dict` turns back into this config."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UNetConfig:
        """Build a config from a dict, rejecting unknown and missing keys.

        Raises:
            ValueError: ``data`` has keys that are not fields, lacks a required
                field, or holds an invalid value.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"unknown UNet config keys {unknown}; allowed: {sorted(fields)}")
        required = [
            n
            for n, f in fields.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [n for n in required if n not in data]
        if missing:
            raise ValueError(f"UNet config lacks required keys {missing}")
        return cls(**dict(data))


def output_channels(num_offsets: int, lsds: bool) -> int:
    """Number of UNet output channels: one affinity per offset, plus the LSDs.

    Args:
        num_offsets: Number of affinity offsets (>= 1).
        lsds: Whether the network also predicts the :data:`dinopipe.targets.NUM_LSD_CHANNELS` LSDs.
    """
    if isinstance(num_offsets, bool) or not isinstance(num_offsets, int) or num_offsets < 1:
        raise ValueError(f"num_offsets must be an integer >= 1, got {num_offsets!r}")
    return num_offsets + (NUM_LSD_CHANNELS if lsds else 0)


def target_channels(
    target: str, *, num_offsets: int = 0, lsds: bool = False, num_classes: int = 0, input_raw: bool = False,
    feature_channels: int = 0, overlap: bool = False,
) -> tuple[int, int]:
    """(input, output) channels of the UNet for a target type.

    Args:
        target: ``"affinities"`` (``num_offsets`` logits, plus the LSDs when ``lsds``)
            or ``"semantic"`` (``num_classes`` class logits).
        num_offsets, lsds: For affinities (see :func:`output_channels`).
        num_classes: For semantic targets: >= 2 for exclusive classes (background + classes),
            >= 1 for overlapping classes (``overlap``: one sigmoid per class).
        input_raw: Whether the raw image is appended as the last input channel.
        feature_channels: Feature channels of the cached features.
    """
    inputs = int(feature_channels) + int(bool(input_raw))
    if target == "affinities":
        return inputs, output_channels(num_offsets, lsds)
    if target == "semantic":
        least = 1 if overlap else 2
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < least:
            raise ValueError(f"semantic targets need num_classes >= {least}"
                             f"{' (overlapping classes)' if overlap else ''}, got {num_classes!r}")
        return inputs, num_classes
    raise ValueError(f"target must be 'affinities' or 'semantic', got {target!r}")


def split_output(output: torch.Tensor, num_offsets: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split raw network output into affinity logits and LSD predictions.

    LSD targets lie in [0, 1], so the LSD channels pass through a sigmoid; the
    affinity channels are returned as logits (apply ``torch.sigmoid`` for
    probabilities).

    Args:
        output: (B, num_offsets [+ 10], z, y, x) network output.
        num_offsets: Number of affinity channels.

    Returns:
        (affinity logits, LSDs in [0, 1] or None when there are no LSD channels).
    """
    channels = output.shape[1]
    if channels == num_offsets:
        return output, None
    if channels != num_offsets + NUM_LSD_CHANNELS:
        raise ValueError(
            f"network output has {channels} channels; expected {num_offsets} affinities "
            f"or {num_offsets} + {NUM_LSD_CHANNELS} LSDs"
        )
    return output[:, :num_offsets], torch.sigmoid(output[:, num_offsets:])


def receptive_field_halo(config: UNetConfig | Mapping[str, Any]) -> int:
    """Voxels of context needed on each side of an output voxel.

    The exact one-sided extent of the receptive field of :class:`UNet3D`, accounting
    for the misalignment of 2x pooling windows: ``7 * 2**levels - 5`` (2 for a UNet
    without downsampling, 9 with one level, 23 with two). An output voxel depends only
    on input voxels within this distance along each axis.

    For blockwise prediction to match whole-volume prediction, blocks must also start
    at multiples of ``2**levels`` relative to each other, so :mod:`dinopipe.predict`
    rounds this halo and the block shape up to multiples of ``2**levels``.

    Args:
        config: The UNet config (or its dict form).
    """
    if isinstance(config, Mapping):
        levels = config.get("levels", UNetConfig.levels)
    else:
        levels = config.levels
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 0:
        raise ValueError(f"UNet levels must be an integer >= 0, got {levels!r}")
    per_conv = (_KERNEL_SIZE - 1) // 2
    halo = _CONVS_PER_BLOCK * per_conv  # bottleneck block
    for _ in range(levels):
        # decoder convs + encoder convs at this level, pooling window (1), upsampled deeper halo
        halo = 2 * halo + 2 * _CONVS_PER_BLOCK * per_conv + 1
    return halo


def _norm(kind: str | None, channels: int) -> nn.Module:
    if kind is None:
        return nn.Identity()
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class _ConvBlock(nn.Sequential):
    """Two (conv 3^3 -> norm -> ReLU) layers, then optional channel dropout."""

    def __init__(self, in_channels: int, out_channels: int, norm: str | None, dropout: float) -> None:
        layers: list[nn.Module] = []
        for i in range(_CONVS_PER_BLOCK):
            layers += [
                nn.Conv3d(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    _KERNEL_SIZE,
                    padding=_KERNEL_SIZE // 2,
                    bias=norm is None,
                ),
                _norm(norm, out_channels),
                nn.ReLU(inplace=True),
            ]
        if dropout > 0:
            layers.append(nn.Dropout3d(dropout))
        super().__init__(*layers)


class UNet3D(nn.Module):
    """3D UNet with "same" padding: output spatial shape == input spatial shape.

    Args:
        config: The architecture. Keyword arguments are also accepted instead, as
            for :class:`UNetConfig` (``UNet3D(in_channels=16, out_channels=13)``).

    Input: (B, in_channels, z, y, x) with z, y, x divisible by ``2**levels``.
    Output: (B, out_channels, z, y, x), raw (logits; see :func:`split_output`).

    With ``config.checkpointing`` the convolution blocks are recomputed in the
    backward pass. Batch norm running statistics are then updated twice per step
    (a known property of checkpointing batch norm; harmless for training).
    """

    def __init__(self, config: UNetConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        if config is None:
            config = UNetConfig.from_dict(kwargs)
        elif kwargs:
            raise ValueError(f"pass either a UNetConfig or keyword arguments, not both (got {sorted(kwargs)})")
        self.config = config
        c = config
        self.encoders = nn.ModuleList()
        in_ch = c.in_channels
        for level in range(c.levels):
            self.encoders.append(_ConvBlock(in_ch, c.channels(level), c.norm, c.dropout))
            in_ch = c.channels(level)
        self.bottleneck = _ConvBlock(in_ch, c.channels(c.levels), c.norm, c.dropout)
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in reversed(range(c.levels)):
            self.upsamplers.append(nn.ConvTranspose3d(c.channels(level + 1), c.channels(level), 2, stride=2))
            self.decoders.append(_ConvBlock(2 * c.channels(level), c.channels(level), c.norm, c.dropout))
        self.head = nn.Conv3d(c.channels(0), c.out_channels, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv3d | nn.ConvTranspose3d) and module is not self.head:
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.config.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        if x.dim() != 5 or x.shape[1] != c.in_channels:
            raise ValueError(
                f"UNet3D expects input of shape (B, {c.in_channels}, z, y, x), got {tuple(x.shape)}"
            )
        spatial = tuple(x.shape[2:])
        if any(s % c.divisor for s in spatial):
            raise ValueError(
                f"UNet3D with levels={c.levels} needs spatial dims divisible by {c.divisor}, "
                f"got (z, y, x) = {spatial}; pad or crop the input"
            )
        skips = []
        for encoder in self.encoders:
            x = self._block(encoder, x)
            skips.append(x)
            x = F.max_pool3d(x, 2)
        x = self._block(self.bottleneck, x)
        for upsample, decoder, skip in zip(self.upsamplers, self.decoders, reversed(skips), strict=True):
            x = self._block(decoder, torch.cat([skip, upsample(x)], dim=1))
        return self.head(x)
