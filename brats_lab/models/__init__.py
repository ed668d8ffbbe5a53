"""The networks of the paper, built by name from a `ModelConfig`.

    from brats_lab.config import ModelConfig
    from brats_lab.models import build_model
    model = build_model(ModelConfig(name="equiunet", width=48, norm="group", deep_supervision=True))

Models return logits and never compute a loss; see `brats_lab.models.unet` for the output contract
(a tensor, or `(logits, [aux x 4])` in training mode with deep supervision). Each network has a
tiny variant (`equiunet_tiny`, ...: the same class at width 4) for tests and smoke runs.
"""

from __future__ import annotations

import torch
from torch import nn

from brats_lab.config import MODEL_NAMES, NETWORKS, TINY_SUFFIX, ModelConfig
from brats_lab.models import unet as _networks
from brats_lab.models.layers import CBAM, group_count, norm_layer
from brats_lab.models.unet import STRIDE, AttEquiUnet, AttEquiUnetWoo, EquiUnet, Unet

# Name -> class, from the registry `brats_lab.config.NETWORKS` (which config checks names against
# without torch). A `*_tiny` name is the same class; `ModelConfig` pins its width to 4.
MODELS: dict[str, type[nn.Module]] = {
    name: getattr(_networks, NETWORKS[name.removesuffix(TINY_SUFFIX)]) for name in MODEL_NAMES
}


def build_model(cfg: ModelConfig) -> nn.Module:
    """The network `cfg.name` with the config's width, norm, deep supervision and dropout."""
    if cfg.name not in MODELS:
        raise ValueError(f"unknown model {cfg.name!r}; registered: {', '.join(MODELS)}")
    cls = MODELS[cfg.name]
    return cls(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        width=cfg.width,
        norm=cfg.norm,
        deep_supervision=cfg.deep_supervision,
        dropout=cfg.dropout,
    )


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def parameter_count(cfg: ModelConfig) -> int:
    """Trainable parameters of `build_model(cfg)`, counted on the meta device: no memory, no init."""
    with torch.device("meta"):
        return count_parameters(build_model(cfg))


__all__ = [
    "MODELS",
    "STRIDE",
    "AttEquiUnet",
    "AttEquiUnetWoo",
    "CBAM",
    "EquiUnet",
    "Unet",
    "build_model",
    "count_parameters",
    "group_count",
    "norm_layer",
    "parameter_count",
]
