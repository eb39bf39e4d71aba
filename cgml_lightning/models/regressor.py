"""The deterministic floor: the same generator with z removed, trained with the same distance."""
from __future__ import annotations

from typing import Any

from torch import Tensor

from cgml_lightning.models.base import ConditionalModule


class RegressorModule(ConditionalModule):
    module_name = "regressor"
    takes_latent = False
    guide_error = "the regressor has no latent to steer: guided sampling needs model=cgml"

    def __init__(self, data_info: dict[str, Any], net: dict[str, Any], distance: str = "l1",
                 distance_region: str = "auto", optimizer: dict | None = None, scheduler: dict | None = None,
                 val_num_samples: int = 4, latent_dim: int = 0,
                 compile: bool = False, channels_last: bool = False, ema_decay: float | None = None):
        # latent_dim is accepted and ignored: experiments set it for every model, and the regressor has no z
        super().__init__(data_info, net, 0, distance, distance_region, optimizer, scheduler, val_num_samples,
                         compile=compile, channels_last=channels_last, ema_decay=ema_decay)

    def forward(self, x: Tensor) -> Tensor:
        feats = self.generator.encode(x)
        return self.generator.decode(feats, x.new_zeros(len(x), 0))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x, y = batch["x"], batch["y"]
        loss = self.distance(self(x), y, x).mean()
        self.log("train/w_loss", loss.detach(), prog_bar=True, batch_size=len(x))
        return loss

    def _sample(self, x: Tensor, num_samples: int, steps, guide, generator, chunk_size: int = 8192) -> Tensor:
        out = self(x)                                 # one output per input: chunk_size is taken, as by the others
        return out[:, None].expand(len(x), num_samples, *out.shape[1:])
