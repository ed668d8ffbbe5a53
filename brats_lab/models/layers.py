"""Building blocks of the U-Nets: normalisation, conv blocks, CBAM attention, deep-supervision heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NORMS: tuple[str, ...] = ("group", "instance")
GROUPS = 16  # GroupNorm's group count when the channel count allows it


def group_count(channels: int) -> int:
    """GroupNorm groups for `channels`, by the authors' rule (`default_norm_layer` in
    lescientifik/open_brats2020, src/models/layers.py; the paper names no group count):

    - up to 16 channels: one group per channel (8 -> 8, 12 -> 12, 1 -> 1);
    - a multiple of 16: 16 groups (48 -> 16, 384 -> 16);
    - otherwise groups of the largest power of two that divides the count (24 -> 3 groups of 8,
      20 -> 5 groups of 4, 18 -> 9 groups of 2).

    At width 48 every network gets 16 groups, and 3 in `unet`'s 24-channel layers.
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    if channels <= GROUPS:
        return channels  # their min(16, channels), which always divides
    if channels % GROUPS == 0:
        return GROUPS
    # Their loop halves a group size of 16 until it divides; below 16 that is the lowest set bit.
    return channels // (channels & -channels)


def norm_layer(kind: str, channels: int) -> nn.Module:
    """GroupNorm (pipeline A, groups by `group_count`) or InstanceNorm3d with affine weights (B)."""
    if kind == "group":
        return nn.GroupNorm(group_count(channels), channels)
    if kind == "instance":
        # affine=True: the same learnable scale and shift as GroupNorm, so both count the same
        # parameters; no running statistics, so train and eval normalise the same way.
        return nn.InstanceNorm3d(channels, affine=True)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


class ConvNormReLU(nn.Sequential):
    """3x3x3 conv (no bias: the norm's shift replaces it) -> norm -> ReLU [-> dropout]."""

    def __init__(self, in_ch: int, out_ch: int, norm: str, dilation: int = 1, dropout: float = 0.0) -> None:
        layers: list[nn.Module] = [
            nn.Conv3d(in_ch, out_ch, 3, padding=dilation, dilation=dilation, bias=False),
            norm_layer(norm, out_ch),
            nn.ReLU(inplace=True),
        ]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        super().__init__(*layers)


class DoubleConv(nn.Sequential):
    """One stage: two ConvNormReLU, in -> mid -> out channels (a `UBlock` in the authors' code)."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, norm: str, dilation: int = 1, dropout: float = 0.0) -> None:
        super().__init__(
            ConvNormReLU(in_ch, mid_ch, norm, dilation, dropout),
            ConvNormReLU(mid_ch, out_ch, norm, dilation, dropout),
        )


class ChannelGate(nn.Module):
    """CBAM channel attention: a shared MLP (C -> C/16 -> C) on the global average and max pools,
    summed, sigmoid, multiplied into the input."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)  # tiny widths: never a 0-wide hidden layer
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(x.mean(dim=(2, 3, 4)))  # (B, C)
        mx = self.mlp(x.amax(dim=(2, 3, 4)))  # (B, C)
        return x * torch.sigmoid(avg + mx)[:, :, None, None, None]


class SpatialGate(nn.Module):
    """CBAM spatial attention: channel max and mean -> 7x7x7 conv -> norm [-> ReLU] -> sigmoid,
    multiplied in.

    `relu=True` (the default) is the authors' gate (`BasicConv` = conv, norm, ReLU in their
    `SpatialGate`): its weights are never below 0.5, i.e. it can only halve a voxel's features,
    never suppress them. `relu=False` is the CBAM paper's gate (Woo et al. 2018), used only by the
    `att_equiunet_woo` variant.
    """

    def __init__(self, norm: str, kernel_size: int = 7, relu: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = norm_layer(norm, 1)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)  # (B, 2, D, H, W)
        gate = self.norm(self.conv(pooled))  # (B, 1, D, H, W)
        if self.relu:
            gate = F.relu(gate)
        return x * torch.sigmoid(gate)


class CBAM(nn.Sequential):
    """Convolutional Block Attention Module (Woo et al. 2018): channel gate, then spatial gate.

    By default the authors' form (ReLU before the spatial sigmoid, see `SpatialGate`)."""

    def __init__(self, channels: int, norm: str, spatial_relu: bool = True) -> None:
        super().__init__(ChannelGate(channels), SpatialGate(norm, relu=spatial_relu))


class DeepSupervisionHead(nn.Module):
    """1x1x1 conv to the output channels at the feature map's resolution, then trilinear
    upsampling to the input's size (convolving before upsampling is the cheap order)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, size: torch.Size | tuple[int, ...]) -> torch.Tensor:
        return F.interpolate(self.conv(x), size=size, mode="trilinear", align_corners=True)
