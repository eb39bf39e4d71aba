"""The latent-dynamics network Z(hbar, z) -> (r, rho): where z should head next, and how far."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cgml_lightning.algorithm import project
from cgml_lightning.nets.layers import init_weights, mlp

RHO_OUTPUTS = ("linear", "softplus")


class DynamicsNet(nn.Module):
    """rho_output: how the last unit becomes rho. linear: rho is the unit itself, regressed on the recorded move
    lengths with a gradient that never vanishes; a negative rho means no move (algorithm.dynamics_step clamps it).
    softplus: rho = softplus(unit) >= 0, what checkpoints written before rho_output existed hold. Its gradient is
    sigmoid(unit), so where the targets are short moves (~0.05) the unit sits near -3 and a few large early errors
    can push it to where the gradient is ~0: Z then predicts no move for the rest of the run."""

    def __init__(self, feature_dim: int, latent_dim: int, width: int = 128, depth: int = 3,
                 spectral_norm: bool = False, rho_output: str = "linear"):
        super().__init__()
        if rho_output not in RHO_OUTPUTS:
            raise ValueError(f"model.dynamics_net.rho_output must be one of {', '.join(RHO_OUTPUTS)}; "
                             f"got {rho_output!r}")
        self.rho_output = rho_output
        self.net = mlp([feature_dim + latent_dim] + [width] * depth + [latent_dim + 1])
        init_weights(self, spectral_norm)

    def forward(self, hbar: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        out = self.net(torch.cat([hbar, z], dim=1))
        r = project(z + out[:, :-1])          # residual form: near-identity is easy to learn
        rho = out[:, -1:] if self.rho_output == "linear" else F.softplus(out[:, -1:])   # [B, 1]
        return r, rho
