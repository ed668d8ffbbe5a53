"""The paper's networks: `Unet`, `EquiUnet` and `AttEquiUnet` (paper section 2.2).

Shapes for a (B, 4, D, H, W) input and width w (D, H, W multiples of 8)::

    encoder1  DoubleConv 4  -> w   [-> CBAM]   (B, w,  D,   H,   W)    ---------------- skip 1
    encoder2  pool, ... w   -> 2w  [-> CBAM]   (B, 2w, D/2, H/2, W/2)  ----------- skip 2
    encoder3  pool, ... 2w  -> 4w  [-> CBAM]   (B, 4w, D/4, ...)       ------ skip 3
    encoder4  pool, ... 4w  -> 8w  [-> CBAM]   (B, 8w, D/8, ...)       -+
    bottom    DoubleConv 8w -> 8w, dilation 2 [-> CBAM]                   |  a pseudo fifth stage at 1/8
    bottom_2  ConvNormReLU cat(encoder4, bottom) 16w -> 4w [-> CBAM]     <+  the decoder's lowest stage: one conv
    decoder3  up, cat skip 3: DoubleConv 8w -> 4w -> 2w                 (B, 2w, D/4, ...)
    decoder2  up, cat skip 2: DoubleConv 4w -> 2w -> w                  (B, w,  D/2, ...)
    decoder1  up, cat skip 1: DoubleConv 2w -> w  -> w (w/2 in Unet)    (B, w,  D,   H,   W)
    head      1x1x1 conv -> 3 logits (ET, TC, WT)                       (B, 3,  D,   H,   W)

`Unet` halves the middle channels of each encoder stage and ends decoder1 at w/2 channels.
`AttEquiUnet` adds CBAM where the brackets show: after each encoder stage, `bottom` and `bottom_2`;
the decoder has none. Its CBAM is the authors' (a ReLU before the spatial gate's sigmoid);
`AttEquiUnetWoo` is the same network with the CBAM paper's spatial gate instead. Upsampling is trilinear x2 with align_corners=True; no transposed convs.

Deep supervision: four heads (1x1x1 conv -> 3, upsampled trilinearly to the input size) on
`bottom`, `bottom_2`, `decoder3` and `decoder2`, i.e. after the dilated bottleneck and after each
decoder stage but the last. This follows the authors' code and the paper's list of places; the
paper's text then speaks of "the three auxiliary losses", which counts one fewer than its list.

Output contract (the trainer relies on it): the models return logits, never probabilities, and
never compute a loss. `forward(x)` returns a tensor (B, 3, D, H, W), except when the model has
`deep_supervision=True` AND is in training mode: then `(logits, [aux x 4])`, each aux a tensor of
the same shape, ordered coarse to fine as listed above. (The authors' code returns the tuple in
eval mode too; ours skips the four heads there, so inference code needs no special case.)

Parameter counts at width 48 are identical to the authors' models (tests/models check them):
unet 19,167,819 / 19,169,991, equiunet 23,152,563 / 23,154,735, att_equiunet 23,205,588 /
23,207,760, without / with deep supervision; GroupNorm and InstanceNorm count the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from brats_lab.models.layers import CBAM, ConvNormReLU, DeepSupervisionHead, DoubleConv

STRIDE = 8  # three 2x poolings: input sizes must be multiples of this


def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Trilinear x2 upsampling to `like`'s spatial size (exactly 2x for inputs that are multiples of 8)."""
    return F.interpolate(x, size=like.shape[2:], mode="trilinear", align_corners=True)


HEAD_PRIOR_LOGIT = -4.0  # sigmoid(-4) = 0.018: a tumour region is a few percent of a patch


class _UNet3D(nn.Module):
    """The shared topology; subclasses choose the channel plan and attention."""

    halve_encoder_mid = False  # Unet: the first conv of each encoder stage has half the channels
    halve_last = False  # Unet: decoder1 ends at w/2 channels
    attention = False  # AttEquiUnet: CBAM after the encoder stages and the bottleneck
    cbam_spatial_relu = True  # the authors' CBAM; AttEquiUnetWoo: the CBAM paper's (no ReLU)

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 3,
        width: int = 48,
        norm: str = "group",
        deep_supervision: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if (self.halve_encoder_mid or self.halve_last) and width < 2:
            raise ValueError(f"{type(self).__name__} halves the width somewhere, so width must be >= 2, got {width}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_channels, self.out_channels, self.width = in_channels, out_channels, width
        self.norm, self.deep_supervision, self.dropout = norm, deep_supervision, dropout

        f = [width, 2 * width, 4 * width, 8 * width]
        mid = [c // 2 for c in f] if self.halve_encoder_mid else f
        last = f[0] // 2 if self.halve_last else f[0]

        def att(channels: int) -> nn.Module:
            return CBAM(channels, norm, self.cbam_spatial_relu) if self.attention else nn.Identity()

        def stage(cin: int, cmid: int, cout: int, dilation: int = 1) -> nn.Sequential:
            return nn.Sequential(DoubleConv(cin, cmid, cout, norm, dilation, dropout), att(cout))

        self.encoder1 = stage(in_channels, mid[0], f[0])
        self.encoder2 = stage(f[0], mid[1], f[1])
        self.encoder3 = stage(f[1], mid[2], f[2])
        self.encoder4 = stage(f[2], mid[3], f[3])
        self.pool = nn.MaxPool3d(2)
        self.bottom = stage(f[3], f[3], f[3], dilation=2)
        self.bottom_2 = nn.Sequential(ConvNormReLU(2 * f[3], f[2], norm, dropout=dropout), att(f[2]))
        self.decoder3 = DoubleConv(2 * f[2], f[2], f[1], norm, dropout=dropout)
        self.decoder2 = DoubleConv(2 * f[1], f[1], f[0], norm, dropout=dropout)
        self.decoder1 = DoubleConv(2 * f[0], f[0], last, norm, dropout=dropout)
        self.head = nn.Conv3d(last, out_channels, 1)
        if deep_supervision:
            # On bottom, bottom_2, decoder3, decoder2: coarse to fine.
            self.deep_heads = nn.ModuleList(DeepSupervisionHead(c, out_channels) for c in (f[3], f[2], f[1], f[0]))
        else:
            self.deep_heads = None  # type: ignore[assignment]  # no heads: forward checks for None
        self._init_weights()

    def _init_weights(self) -> None:
        # Kaiming normal (fan_out, for the ReLUs) on every conv, as the authors did; norms start
        # as the identity. CBAM's linear layers keep torch's init.
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.GroupNorm, nn.InstanceNorm3d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # The output heads start small and biased towards "no tumour" (the RetinaNet prior):
        # with the authors' init the logits start with a spread of about +-2, a region channel
        # can start on over much of the brain, and the Dice loss's gradient to switch it off
        # vanishes as the predicted volume grows (seen for ET on phantoms, pipeline B).
        for head in [self.head, *(h.conv for h in self.deep_heads or [])]:
            nn.init.normal_(head.weight, std=0.01)  # type: ignore[arg-type, union-attr]  # a Conv3d
            nn.init.constant_(head.bias, HEAD_PRIOR_LOGIT)  # type: ignore[arg-type, union-attr]

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, C_in, D, H, W) -> logits (B, C_out, D, H, W), or `(logits, [aux x 4])` when deep
        supervision is on and the model is in training mode. D, H, W must be multiples of 8."""
        if x.ndim != 5 or any(s % STRIDE for s in x.shape[2:]):
            raise ValueError(
                f"{type(self).__name__} expects (B, C, D, H, W) with D, H, W multiples of {STRIDE} "
                f"(three 2x poolings), got shape {tuple(x.shape)}; pad the input (data.pad_multiple)"
            )
        s1 = self.encoder1(x)  # (B, w, D, H, W)
        s2 = self.encoder2(self.pool(s1))  # (B, 2w, D/2, H/2, W/2)
        s3 = self.encoder3(self.pool(s2))  # (B, 4w, D/4, ...)
        s4 = self.encoder4(self.pool(s3))  # (B, 8w, D/8, ...)
        bottom = self.bottom(s4)  # (B, 8w, D/8, ...), dilated
        bottom_2 = self.bottom_2(torch.cat([s4, bottom], dim=1))  # (B, 4w, D/8, ...)
        d3 = self.decoder3(torch.cat([s3, _up(bottom_2, s3)], dim=1))  # (B, 2w, D/4, ...)
        d2 = self.decoder2(torch.cat([s2, _up(d3, s2)], dim=1))  # (B, w, D/2, ...)
        d1 = self.decoder1(torch.cat([s1, _up(d2, s1)], dim=1))  # (B, w or w/2, D, H, W)
        logits = self.head(d1)  # (B, 3, D, H, W)
        if self.deep_heads is None or not self.training:
            return logits
        size = x.shape[2:]
        aux = [head(feat, size) for head, feat in zip(self.deep_heads, (bottom, bottom_2, d3, d2))]
        return logits, aux

    def extra_repr(self) -> str:
        return f"width={self.width}, norm={self.norm!r}, deep_supervision={self.deep_supervision}, dropout={self.dropout}"


class Unet(_UNet3D):
    """3D U-Net with the dilated bottleneck; encoder stages widen in their second conv
    (mid channels halved) and the last decoder stage ends at w/2 channels."""

    halve_encoder_mid = True
    halve_last = True


class EquiUnet(_UNet3D):
    """The paper's network: every encoder stage's first conv already has the stage's width."""


class AttEquiUnet(_UNet3D):
    """EquiUnet with CBAM after each encoder stage, after `bottom` and after `bottom_2`: the
    authors' `Att_EquiUnet`, their CBAM included (a ReLU before the spatial gate's sigmoid)."""

    attention = True


class AttEquiUnetWoo(AttEquiUnet):
    """`AttEquiUnet` with the CBAM paper's spatial gate (Woo et al. 2018: no ReLU before the
    sigmoid, so the gate can suppress a voxel, not only halve it). Not the paper's network: a
    variant to ablate that one difference (`model.name=att_equiunet_woo`)."""

    cbam_spatial_relu = False
