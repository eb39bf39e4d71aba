"""The paper's toy: x ~ U(0, 1), y = a * 4 (x, x^2, x^3) with a drawn fairly from K evenly spaced values in [-1, 1].

K = 2 is the paper's y = +-4 (x, x^2, x^3); K >= 3 adds branches in between (K = 3: a in {-1, 0, 1}).
"""
from __future__ import annotations

import torch
from torch import Tensor

from cgml_lightning.data.base import ArrayDataModule


class ToyDataModule(ArrayDataModule):
    kind = "vector"

    def __init__(self, num_samples: int = 20000, num_modes: int = 2, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if num_modes < 1:
            raise ValueError(f"data.num_modes must be >= 1; got {num_modes}")
        self.num_samples, self.num_modes, self.seed = num_samples, num_modes, seed

    def amplitudes(self) -> Tensor:
        return torch.linspace(-1.0, 1.0, self.num_modes) if self.num_modes > 1 else torch.ones(1)

    def curve(self, x: Tensor) -> Tensor:
        return 4 * torch.cat([x, x**2, x**3], dim=-1)                       # [B, 3]

    def modes(self, x: Tensor) -> Tensor:
        """All true outputs for each input: [B, K, 3]."""
        return self.amplitudes().to(x)[None, :, None] * self.curve(x)[:, None, :]

    def grid(self, num_inputs: int = 100) -> Tensor:
        """Evaluation inputs: midpoints of num_inputs equal cells of [0, 1], shape [n, 1]."""
        return ((torch.arange(num_inputs) + 0.5) / num_inputs)[:, None]

    def load_arrays(self) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        x = torch.rand(self.num_samples, 1, generator=g)
        branch = torch.randint(self.num_modes, (self.num_samples,), generator=g)
        return x, self.amplitudes()[branch, None] * self.curve(x)
