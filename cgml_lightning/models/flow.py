"""Conditional flow matching (rectified flow) baseline: a velocity net v(x_t, t | x) carries N(0, I) noise to y.

Training: x0 ~ N(0, I) shaped like y, t ~ U(0, 1), x_t = (1 - t) x0 + t y, regress v on the target y - x0.
Sampling: integrate dx/dt = v(x_t, t | x) from t = 0 to 1 with Euler or Heun steps.
The velocity net is the project's generator with input concat(x, x_t) (channels for images, flat for vectors)
and the time embedding in place of z. Its encoder sees x_t, so it runs once per integration step (not once per x).
For completion, the visible pixels of x_t (outside the hole) are put back on their straight path at every step,
which keeps x_t distributed as in training where the loss (taken in the hole) leaves their velocity unconstrained.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from cgml_lightning import nets
from cgml_lightning.models.base import ConditionalModule, in_chunks, is_count, sample_rows


def time_embedding(t: Tensor, dim: int, max_freq: float = 1000.0) -> Tensor:
    """Sinusoidal features of t in [0, 1]: [B] -> [B, dim], frequencies log-spaced in [1, max_freq]."""
    freqs = torch.exp(torch.linspace(0.0, math.log(max_freq), dim // 2, device=t.device, dtype=t.dtype))
    angles = t[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class FlowModule(ConditionalModule):
    module_name = "flow"
    takes_latent = False                # its noise is shaped like y; time_dim is checked here

    def __init__(self, data_info: dict[str, Any], net: dict[str, Any], time_dim: int = 16, sample_steps: int = 20,
                 sampler: str = "euler", distance: str = "l2", distance_region: str = "auto",
                 optimizer: dict | None = None, scheduler: dict | None = None, val_num_samples: int = 4,
                 latent_dim: int | None = None,
                 compile: bool = False, channels_last: bool = False, ema_decay: float | None = None):
        """latent_dim is ignored (the flow's noise is shaped like y); it is accepted so experiment configs that set
        model.latent_dim for the latent-variable models compose with model=flow."""
        if not is_count(time_dim) or time_dim < 2 or time_dim % 2:
            raise ValueError(f"model.time_dim must be even and >= 2; got {time_dim}")
        if sampler not in ("euler", "heun"):
            raise ValueError(f"model.sampler must be euler or heun; got {sampler!r}")
        super().__init__(data_info, net, time_dim, distance, distance_region, optimizer, scheduler, val_num_samples,
                         compile=compile, channels_last=channels_last, ema_decay=ema_decay)

    def build_generator(self, net: dict[str, Any]) -> torch.nn.Module:
        """The velocity net G(concat(x, x_t), t): the generator on the joined input, the time embedding (latent_dim =
        time_dim) in place of z. Velocities are unbounded: no output sigmoid."""
        net = {**net, "out_activation": "none"} if net.get("name") == "unet" else dict(net)
        if len(self.x_shape) == 3 and len(self.y_shape) == 3:
            in_shape = (self.x_shape[0] + self.y_shape[0], *self.x_shape[1:])
        else:
            in_shape = (math.prod(self.x_shape) + math.prod(self.y_shape),)
        return nets.build_generator(net, in_shape, self.y_shape, self.latent_dim)

    @staticmethod
    def velocity_input(x: Tensor, x_t: Tensor) -> Tensor:
        """What the velocity net reads: concat(x, x_t), on channels for images, flat for vectors."""
        return torch.cat([x, x_t], dim=1) if x.dim() == 4 else torch.cat([x.flatten(1), x_t.flatten(1)], dim=1)

    def velocity(self, x: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """v(x_t, t | x): [B, *y_shape]; t is [B]."""
        feats = self.generator.encode(self.velocity_input(x, x_t))
        return self.generator.decode(feats, time_embedding(t, self.hparams.time_dim))

    def probe_features(self, x: Tensor) -> Tensor:
        """The velocity net's summary of x at t = 0, with x_t at the mean of its noise (zeros)."""
        return super().probe_features(self.velocity_input(x, x.new_zeros(len(x), *self.y_shape)))

    def visible(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """For completion: (the input's pixels: y's where visible; the mask of the hole), else None."""
        hole = self.hole(x)
        return None if hole is None else (x[:, :-1], hole)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x, y = batch["x"], batch["y"]
        x0 = torch.randn_like(y)
        t = torch.rand(len(y), device=y.device)
        t_ = t.view(-1, *[1] * (y.dim() - 1))
        x_t = (1 - t_) * x0 + t_ * y
        loss = self.distance(self.velocity(x, x_t, t), y - x0, x).mean()
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(x))
        return loss

    def _sample(self, x: Tensor, num_samples: int, steps: int | None, guide, generator,
                chunk_size: int = 4096) -> Tensor:
        steps = self.hparams.sample_steps if steps is None else steps
        if steps < 1:
            raise ValueError(f"flow sampling needs steps >= 1; got {steps}")
        b, n = len(x), num_samples
        x0 = torch.randn(b * n, *self.y_shape, generator=generator).to(x)             # row b*N + i -> input b
        rows = sample_rows(b, n, x.device)
        out = in_chunks(lambda c: self.integrate(x[rows[c]], x0[c], steps), b * n, chunk_size, x.device)
        out = out.view(b, n, *self.y_shape)
        return out.clamp(0, 1) if self.data_info.get("kind") == "image" else out

    def integrate(self, x: Tensor, x0: Tensor, steps: int) -> Tensor:
        """From noise x0 at t = 0 to a sample at t = 1 (Euler or Heun)."""
        given, dt, x_t = self.visible(x), 1.0 / steps, x0
        for i in range(steps):
            t = torch.full((len(x),), i * dt, device=x.device, dtype=x0.dtype)
            if given is not None:                                         # visible pixels on their path
                pixels, hole = given
                x_t = x_t * hole + ((1 - i * dt) * x0 + i * dt * pixels) * (1 - hole)
            v = self.velocity(x, x_t, t)
            if self.hparams.sampler == "heun":
                v = 0.5 * (v + self.velocity(x, x_t + dt * v, t + dt))
            x_t = x_t + dt * v
        return x_t
