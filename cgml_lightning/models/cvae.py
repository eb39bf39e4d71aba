"""Conditional VAE baseline: a recognition net q(z | x, y) in training, the prior N(0, I) at sampling."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from cgml_lightning.models.base import ConditionalModule
from cgml_lightning.models.gaussian import kl_to_prior, reparameterise, sample_from_prior, split_gaussian
from cgml_lightning.nets import build_encoder
from cgml_lightning.nets.layers import init_weights, mlp


class CVAEModule(ConditionalModule):
    module_name = "cvae"

    def __init__(self, data_info: dict[str, Any], net: dict[str, Any], latent_dim: int = 16, beta: float = 1.0,
                 kl_warmup_steps: int = 1000, free_bits: float = 0.0, posterior_net: dict[str, Any] | None = None,
                 distance: str = "l1", distance_region: str = "auto", optimizer: dict | None = None,
                 scheduler: dict | None = None, val_num_samples: int = 4,
                 compile: bool = False, channels_last: bool = False, ema_decay: float | None = None):
        super().__init__(data_info, net, latent_dim, distance, distance_region, optimizer, scheduler, val_num_samples,
                         compile=compile, channels_last=channels_last, ema_decay=ema_decay)
        cfg = {"width": 64, "depth": 2, **(posterior_net or {})}
        # q(z | x, y): an encoder of y, joined with the generator's summary hbar of x -> (mu, logvar)
        self.target_encoder = build_encoder(self.y_shape, cfg["width"], cfg["width"], cfg["depth"])
        self.posterior = mlp([self.generator.feature_dim + cfg["width"], cfg["width"], 2 * latent_dim])
        init_weights(self.posterior)

    def encode_posterior(self, hbar: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, logvar), each [B, d]."""
        return split_gaussian(self.posterior(torch.cat([hbar, self.target_encoder(y)], dim=1)))

    def kl_weight(self) -> float:
        """beta, ramped linearly from 0 over kl_warmup_steps, so the decoder learns to use z before KL squeezes it."""
        hp = self.hparams
        return hp.beta * min(1.0, (self.global_step + 1) / hp.kl_warmup_steps) if hp.kl_warmup_steps > 0 else hp.beta

    def loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(total, reconstruction, KL); the KL term counts at least free_bits nats per latent dimension."""
        feats = self.generator.encode(x)
        mu, logvar = self.encode_posterior(self.generator.summarize(feats), y)
        recon = self.distance(self.generator.decode(feats, reparameterise(mu, logvar)), y, x).mean()
        kl_per_dim = kl_to_prior(mu, logvar).mean(0)                                      # [d], batch mean
        kl_term = kl_per_dim.clamp_min(self.hparams.free_bits).sum()
        return recon + self.kl_weight() * kl_term, recon, kl_per_dim.sum()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, recon, kl = self.loss(batch["x"], batch["y"])
        self.log_dict({"train/loss": loss.detach(), "train/recon": recon.detach(), "train/kl": kl.detach(),
                       "train/kl_weight": self.kl_weight()}, prog_bar=True, batch_size=len(batch["x"]))
        return loss

    def _sample(self, x: Tensor, num_samples: int, steps, guide, generator, chunk_size: int = 8192) -> Tensor:
        return sample_from_prior(self, x, num_samples, generator, "gaussian", chunk_size)
