"""Conditional IMLE (Li & Malik, "Multimodal image synthesis with conditional implicit maximum likelihood
estimation", IJCV 2020): for each training input draw m latents, keep the one whose output is nearest the target,
and regress the generator on it. Non-adversarial, one generator pass per sample at inference: cGML's start
selection without the z-steps and the dynamics network."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from cgml_lightning import algorithm as A
from cgml_lightning.models.base import ConditionalModule
from cgml_lightning.models.gaussian import sample_from_prior


class CIMLEModule(ConditionalModule):
    """latents [num_train_samples, d]: the latent chosen for each training input, re-chosen (the nearest of
    num_draws fresh N(0, I) draws) once every resample_every epochs and regressed on in between; latents_epoch:
    the epoch each row was chosen in. Both are checkpointed, so a resumed run keeps its choices."""

    module_name = "cimle"

    def __init__(self, data_info: dict[str, Any], net: dict[str, Any], latent_dim: int = 16, num_draws: int = 10,
                 resample_every: int = 1, distance: str = "l1", distance_region: str = "auto",
                 optimizer: dict | None = None, scheduler: dict | None = None, val_num_samples: int = 4,
                 compile: bool = False, channels_last: bool = False, ema_decay: float | None = None):
        super().__init__(data_info, net, latent_dim, distance, distance_region, optimizer, scheduler, val_num_samples,
                         compile=compile, channels_last=channels_last, ema_decay=ema_decay)
        if num_draws < 1 or resample_every < 1:
            raise ValueError(f"model.num_draws and model.resample_every must be >= 1; got {num_draws} and "
                             f"{resample_every}")
        n = int(data_info["num_train_samples"])
        # frozen Parameters, not buffers: DDP re-broadcasts buffers from rank 0, over rows other ranks just wrote
        self.latents = nn.Parameter(torch.randn(n, latent_dim), requires_grad=False)
        self.latents_epoch = nn.Parameter(torch.full((n,), -resample_every, dtype=torch.long), requires_grad=False)

    @torch.no_grad()
    def chosen_latents(self, feats: tuple[Tensor, ...], y: Tensor, x: Tensor, index: Tensor,
                       generator: torch.Generator | None = None) -> Tensor:
        """The latents [B, d] the batch is regressed on: for rows due (chosen resample_every or more epochs ago),
        the draw of num_draws whose output is nearest y, written back to the table on every rank."""
        hp, epoch = self.hparams, self.current_epoch
        due = (epoch - self.latents_epoch[index]) >= hp.resample_every
        z = self.latents[index].to(y)
        if due.any():                                      # m decoder passes only when some row is re-drawn
            draws = torch.randn(hp.num_draws, len(y), hp.latent_dim, generator=generator).to(y)    # [m, B, d]
            fresh = A.select_starts(lambda z_: self.distance(self.generator.decode(feats, z_), y, x), draws)
            z = torch.where(due[:, None], fresh, z)
        rows, kept, epochs = index, z, torch.where(due, epoch, self.latents_epoch[index])
        if self._trainer is not None and self.trainer.world_size > 1:           # every rank holds every row
            rows, kept, epochs = self.gather_rows(rows, kept, epochs)
        self.latents[rows] = kept.to(self.latents.dtype)
        self.latents_epoch[rows] = epochs
        return z

    def optimizer_groups(self):
        """The generator's weights only: the latent table is chosen, not trained."""
        return [(self.generator.parameters(), self.hparams.optimizer)]

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x, y, index = batch["x"], batch["y"], batch["index"]
        feats = self.generator.encode(x)
        z = self.chosen_latents(tuple(f.detach() for f in feats), y, x, index, self.step_generator())
        loss = self.distance(self.generator.decode(feats, z), y, x).mean()
        self.log("train/w_loss", loss.detach(), prog_bar=True, batch_size=len(x))
        return loss

    def _sample(self, x: Tensor, num_samples: int, steps, guide, generator, chunk_size: int = 8192) -> Tensor:
        return sample_from_prior(self, x, num_samples, generator, "gaussian", chunk_size)
