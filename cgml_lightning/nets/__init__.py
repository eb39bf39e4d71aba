"""Networks: generators G = (encode, decode) for vectors (MLP) and images (U-Net), and the dynamics net Z.

Every generator exposes the same three calls, so the modules never look inside:
    feats = G.encode(x)        # tuple of tensors (U-Net skips; the last one is the bottleneck)
    hbar  = G.summarize(feats) # [B, G.feature_dim], what Z sees of the input
    y     = G.decode(feats, z) # [B, *y_shape]
"""
from __future__ import annotations

from typing import Any

from torch import nn

from cgml_lightning.nets.discriminator import build_discriminator, build_encoder
from cgml_lightning.nets.dynamics import DynamicsNet
from cgml_lightning.nets.layers import init_weights
from cgml_lightning.nets.mlp import MLPGenerator
from cgml_lightning.nets.unet import UNetGenerator

GENERATORS: dict[str, type[nn.Module]] = {"mlp": MLPGenerator, "unet": UNetGenerator}


def build_generator(cfg: dict[str, Any], x_shape, y_shape, latent_dim: int) -> nn.Module:
    """Build a generator from a plain net config ({"name": ..., **kwargs}); no _target_ strings involved."""
    cfg = dict(cfg)
    name = cfg.pop("name", None)
    if name not in GENERATORS:
        raise ValueError(f"net.name must be one of {sorted(GENERATORS)}; got {name!r}")
    return GENERATORS[name](x_shape=tuple(x_shape), y_shape=tuple(y_shape), latent_dim=latent_dim, **cfg)



__all__ = ["DynamicsNet", "MLPGenerator", "UNetGenerator", "GENERATORS", "build_generator", "init_weights",
           "build_discriminator", "build_encoder"]
