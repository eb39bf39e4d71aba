"""scikit-learn's bundled 8x8 handwritten digits (1797 images, offline): complete the hidden bottom half."""
from __future__ import annotations

import torch
from torch import Tensor

from cgml_lightning.data.base import ArrayDataModule
from cgml_lightning.data.degradations import Degradation


class DigitsDataModule(ArrayDataModule):
    kind = "image"
    mask_channel = True

    def __init__(self, mask_side: str = "bottom", **kwargs):
        super().__init__(**kwargs)
        self.mask_side = mask_side
        self.degradation = Degradation(task="completion", mask="half", mask_side=mask_side)

    def load_arrays(self) -> tuple[Tensor, Tensor]:
        from sklearn.datasets import load_digits

        y = torch.from_numpy(load_digits().images).float()[:, None] / 16.0       # [1797, 1, 8, 8] in [0, 1]
        return self.degradation(y), y                                            # x: [1797, 2, 8, 8]

    def load_labels(self) -> Tensor:
        from sklearn.datasets import load_digits

        return torch.from_numpy(load_digits().target).long()                     # [1797], digits 0-9
