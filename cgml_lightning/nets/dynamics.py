"""The latent-dynamics network Z(hbar, z) -> (r, rho): where z should head next, and how far."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cgml_lightning.algorithm import project
from cgml_lightning.nets.layers import init_weights, mlp


class DynamicsNet(nn.Module):
    def __init__(self, feature_dim: int, latent_dim: int, width: int = 128, depth: int = 3,
                 spectral_norm: bool = False):
        super().__init__()
        self.net = mlp([feature_dim + latent_dim] + [width] * depth + [latent_dim + 1])
        init_weights(self, spectral_norm)

    def forward(self, hbar: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        out = self.net(torch.cat([hbar, z], dim=1))
        r = project(z + out[:, :-1])          # residual form: near-identity is easy to learn
        rho = F.softplus(out[:, -1:])         # [B, 1], >= 0
        return r, rho
