"""Gaussian latents, shared by the cVAE and the cGAN: encoders' (mu, logvar) outputs, the reparameterisation, the KL
to the prior N(0, I), and sampling by decoding prior draws."""
from __future__ import annotations

import torch
from torch import Tensor

from cgml_lightning.algorithm import project
from cgml_lightning.models.base import ConditionalModule, sample_rows


def split_gaussian(out: Tensor) -> tuple[Tensor, Tensor]:
    """An encoder's output [B, 2d] read as (mu, logvar), each [B, d]; logvar clamped to [-10, 10] so that
    exp(logvar) stays finite."""
    mu, logvar = out.chunk(2, dim=1)
    return mu, logvar.clamp(-10.0, 10.0)


def reparameterise(mu: Tensor, logvar: Tensor) -> Tensor:
    """A draw of N(mu, exp(logvar)) as mu + sigma * eps (eps from the global RNG), differentiable in mu and logvar."""
    return mu + (0.5 * logvar).exp() * torch.randn_like(mu)


def kl_to_prior(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per sample and latent dimension: [B, d]."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)


def sample_from_prior(module: ConditionalModule, x: Tensor, num_samples: int, generator: torch.Generator | None,
                      prior: str = "gaussian", chunk_size: int = 8192) -> Tensor:
    """Decode N prior latents per input with a ConditionalModule's generator: Tensor[B, N, *y_shape]. The prior is
    N(0, I), or its draws projected onto the unit sphere (prior="sphere"). The encoder runs once per input; the B*N
    latents are decoded in chunks (row b*N + i -> input b). Randomness comes from `generator` only (drawn on CPU)."""
    b, n = len(x), num_samples
    feats = module.generator.encode(x)
    z = torch.randn(b * n, module.latent_dim, generator=generator).to(x)              # [B*N, d]
    if prior == "sphere":
        z = project(z)
    return module.decode_rows(feats, z, sample_rows(b, n, x.device), chunk_size).view(b, n, *module.y_shape)
