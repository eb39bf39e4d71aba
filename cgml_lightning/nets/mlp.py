"""MLP generator for vector data: encoder x -> h, decoder [h, z] -> y."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cgml_lightning.nets.layers import init_weights, mlp


class MLPGenerator(nn.Module):
    def __init__(self, x_shape: tuple[int, ...], y_shape: tuple[int, ...], latent_dim: int,
                 width: int = 128, depth: int = 3, spectral_norm: bool = False):
        super().__init__()
        self.y_shape, self.latent_dim, self.feature_dim = tuple(y_shape), latent_dim, width
        x_dim, y_dim = math.prod(x_shape), math.prod(y_shape)
        self.encoder = nn.Sequential(mlp([x_dim] + [width] * depth), nn.SiLU())
        self.decoder = mlp([width + latent_dim] + [width] * depth + [y_dim])
        init_weights(self, spectral_norm)

    def encode(self, x: Tensor) -> tuple[Tensor, ...]:
        return (self.encoder(x.flatten(1)),)                      # ([B, width],)

    def summarize(self, feats: tuple[Tensor, ...]) -> Tensor:
        return feats[-1]                                           # [B, width]

    def decode(self, feats: tuple[Tensor, ...], z: Tensor) -> Tensor:
        out = self.decoder(torch.cat([feats[-1], z], dim=1))       # [B, y_dim]
        return out.view(-1, *self.y_shape)
