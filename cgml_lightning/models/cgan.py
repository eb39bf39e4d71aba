"""Conditional GAN baseline: pix2pix with a noise input, plus BicycleGAN's latent regression so z is not ignored.

Per batch (manual optimization, D then G), z from the prior:
    y_hat = G(x, z)
    D step:  adv(D(x, y), real) + adv(D(x, y_hat.detach()), fake)                        (D's params only)
    G step:  adv(D(x, y_hat), real) + lambda_l1 * l1(y_hat, y) + lambda_z * |E_z(y_hat) - z|   (G and E_z only)
With encoded_branch (the full BicycleGAN: its cVAE-GAN half), E_z also encodes the real y to (mu, logvar):
y_rec = G(x, z_enc) is a second fake for D, the L1 term moves from y_hat to y_rec (the L1 on a random-z output
pulls every sample to the conditional median, i.e. mode collapse) and lambda_kl * KL(q(z|y) || N(0, I)) is added.
For completion D and E_z see the composite (visible pixels from x), so D cannot tell fakes by the visible pixels.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from cgml_lightning.algorithm import project
from cgml_lightning.models.base import ConditionalModule
from cgml_lightning.models.gaussian import kl_to_prior, reparameterise, sample_from_prior, split_gaussian
from cgml_lightning.nets import build_discriminator, build_encoder


def adversarial_loss(logits: Tensor, real: bool, kind: str) -> Tensor:
    """lsgan: least squares to 1 (real) / 0 (fake); bce: logistic (the generator's 'real' target is the
    non-saturating loss)."""
    target = torch.full_like(logits, 1.0 if real else 0.0)
    if kind == "lsgan":
        return F.mse_loss(logits, target)
    return F.binary_cross_entropy_with_logits(logits, target)


class CGANModule(ConditionalModule):
    module_name = "cgan"

    def __init__(self, data_info: dict[str, Any], net: dict[str, Any], latent_dim: int = 16,
                 latent_prior: str = "gaussian", gan_loss: str = "bce", lambda_l1: float = 10.0,
                 lambda_z: float = 1.0, encoded_branch: bool = False, lambda_kl: float = 0.01,
                 discriminator: dict[str, Any] | None = None, z_encoder: dict[str, Any] | None = None,
                 distance: str = "l1", distance_region: str = "auto",
                 optimizer: dict | None = None, discriminator_optimizer: dict | None = None,
                 scheduler: dict | None = None, clip_grad_norm: float | None = None, val_num_samples: int = 4,
                 compile: bool = False, channels_last: bool = False, ema_decay: float | None = None):
        super().__init__(data_info, net, latent_dim, distance, distance_region, optimizer, scheduler, val_num_samples,
                         compile=compile, channels_last=channels_last, ema_decay=ema_decay)
        self.automatic_optimization = False                     # D and G(+E_z) step in turn
        if latent_prior not in ("gaussian", "sphere"):
            raise ValueError(f"model.latent_prior must be gaussian or sphere; got {latent_prior!r}")
        if encoded_branch and latent_prior != "gaussian":
            raise ValueError("model.encoded_branch fits q(z|y) to N(0, I): it needs model.latent_prior=gaussian")
        if gan_loss not in ("lsgan", "bce"):
            raise ValueError(f"model.gan_loss must be lsgan or bce; got {gan_loss!r}")
        # D and E_z as wide as the generator unless told otherwise (a weak D on the toy leaves samples off the modes)
        width = net.get("width", 64)
        d_cfg, e_cfg = {**(discriminator or {})}, {**(z_encoder or {})}
        d_cfg["width"], e_cfg["width"] = d_cfg.get("width") or width, e_cfg.get("width") or width
        self.discriminator = build_discriminator(self.x_shape, self.y_shape, **d_cfg)
        self.z_encoder = build_encoder(self.y_shape, latent_dim * (2 if encoded_branch else 1), **e_cfg)
        self.y_numel = math.prod(self.y_shape)

    def prior(self, n: int, device=None) -> Tensor:
        z = torch.randn(n, self.latent_dim, device=device)
        return project(z) if self.hparams.latent_prior == "sphere" else z

    def encode_latent(self, y: Tensor) -> tuple[Tensor, Tensor | None]:
        """E_z(y): (mu, logvar) with the encoded branch, else (z_hat, None)."""
        out = self.z_encoder(y)
        return split_gaussian(out) if self.hparams.encoded_branch else (out, None)

    def forward_pass(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """One generator pass per branch, shared by the D and G steps: z, fakes [y_hat(, y_rec)], (mu, logvar)."""
        feats = self.generator.encode(x)
        out = {"z": self.prior(len(x), x.device)}
        out["fakes"] = [self.composite(self.generator.decode(feats, out["z"]), x)]
        if self.hparams.encoded_branch:
            out["mu"], out["logvar"] = self.encode_latent(y)
            z_enc = reparameterise(out["mu"], out["logvar"])
            out["fakes"].append(self.composite(self.generator.decode(feats, z_enc), x))
        return out

    def discriminator_loss(self, x: Tensor, y: Tensor, out: dict) -> Tensor:
        kind = self.hparams.gan_loss
        real = adversarial_loss(self.discriminator(x, y), True, kind)
        fake = sum(adversarial_loss(self.discriminator(x, f.detach()), False, kind) for f in out["fakes"])
        return 0.5 * (real + fake / len(out["fakes"]))

    def generator_loss(self, x: Tensor, y: Tensor, out: dict) -> tuple[Tensor, dict[str, Tensor]]:
        hp, fakes = self.hparams, out["fakes"]
        parts = {
            "adv": sum(adversarial_loss(self.discriminator(x, f), True, hp.gan_loss) for f in fakes) / len(fakes),
            # the distance is summed per sample; per element it keeps pix2pix's meaning of lambda_l1
            "l1": self.distance(fakes[-1], y, x).mean() / self.y_numel,
            "z": (self.encode_latent(fakes[0])[0] - out["z"]).abs().mean(),
        }
        loss = parts["adv"] + hp.lambda_l1 * parts["l1"] + hp.lambda_z * parts["z"]
        if hp.encoded_branch:
            parts["kl"] = kl_to_prior(out["mu"], out["logvar"]).sum(1).mean()
            loss = loss + hp.lambda_kl * parts["kl"]
        return loss, parts

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        x, y = batch["x"], batch["y"]
        opt_d, opt_g = self.optimizers()
        out = self.forward_pass(x, y)

        d_loss = self.discriminator_loss(x, y, out)             # fakes detached inside: D's params only
        self.manual_step(d_loss, opt_d)

        self.toggle_optimizer(opt_g)                            # D frozen: the G loss's gradients reach G and E_z only
        g_loss, parts = self.generator_loss(x, y, out)
        self.manual_step(g_loss, opt_g)
        self.untoggle_optimizer(opt_g)

        self.log_dict({"train/d_loss": d_loss.detach(), "train/g_loss": g_loss.detach(),
                       **{f"train/g_{k}": v.detach() for k, v in parts.items()}}, prog_bar=True, batch_size=len(x))

    def optimizer_groups(self):
        """opt_d: the discriminator (discriminator_optimizer, else the same optimizer); opt_g: G and E_z."""
        hp = self.hparams
        return [(self.discriminator.parameters(), hp.discriminator_optimizer or hp.optimizer),
                ([*self.generator.parameters(), *self.z_encoder.parameters()], hp.optimizer)]

    def _sample(self, x: Tensor, num_samples: int, steps, guide, generator, chunk_size: int = 8192) -> Tensor:
        return sample_from_prior(self, x, num_samples, generator, self.hparams.latent_prior, chunk_size)
