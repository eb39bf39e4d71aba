"""Auxiliary nets of the baselines: encoders of an output y to a vector (cVAE posterior, cGAN's E_z) and the
conditional discriminators D(x, y) (PatchGAN for images, MLP for vectors)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cgml_lightning.nets.layers import init_weights, mlp


class ImageEncoder(nn.Module):
    """[B, C, H, W] -> [B, out_dim]: strided convs, global average pool, linear."""

    def __init__(self, in_channels: int, out_dim: int, width: int = 32, depth: int = 2):
        super().__init__()
        channels = [width * 2 ** i for i in range(depth + 1)]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels[0], 3, padding=1), nn.SiLU()]
        for a, b in zip(channels[:-1], channels[1:]):
            layers += [nn.Conv2d(a, b, 4, stride=2, padding=1), nn.SiLU()]          # H -> H/2
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels[-1], out_dim)
        init_weights(self)

    def forward(self, y: Tensor) -> Tensor:
        return self.head(self.features(y).mean(dim=(2, 3)))


class VectorEncoder(nn.Module):
    """[B, *shape] -> [B, out_dim]: an MLP on the flattened input."""

    def __init__(self, shape: tuple[int, ...], out_dim: int, width: int = 128, depth: int = 2):
        super().__init__()
        self.net = mlp([math.prod(shape)] + [width] * depth + [out_dim])
        init_weights(self)

    def forward(self, y: Tensor) -> Tensor:
        return self.net(y.flatten(1))


def build_encoder(shape, out_dim: int, width: int = 32, depth: int = 2) -> nn.Module:
    """A conv encoder for [C, H, W] shapes, an MLP otherwise."""
    shape = tuple(shape)
    if len(shape) == 3:
        return ImageEncoder(shape[0], out_dim, width, depth)
    return VectorEncoder(shape, out_dim, width, depth)


class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN on concat(x, y) along channels: a real/fake logit per patch, [B, 1, H/2^depth, W/2^depth]."""

    def __init__(self, in_channels: int, width: int = 32, depth: int = 2, spectral_norm: bool = False):
        super().__init__()
        channels = [in_channels] + [width * 2 ** i for i in range(depth)]
        layers: list[nn.Module] = []
        for a, b in zip(channels[:-1], channels[1:]):
            layers += [nn.Conv2d(a, b, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(channels[-1], 1, 3, padding=1))
        self.net = nn.Sequential(*layers)
        init_weights(self, spectral_norm)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.net(torch.cat([x, y], dim=1))


class MLPDiscriminator(nn.Module):
    """D on concat(flatten(x), flatten(y)): one logit per input, [B, 1]."""

    def __init__(self, in_dim: int, width: int = 128, depth: int = 2, spectral_norm: bool = False):
        super().__init__()
        self.net = mlp([in_dim] + [width] * depth + [1], activation=lambda: nn.LeakyReLU(0.2))
        init_weights(self, spectral_norm)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.net(torch.cat([x.flatten(1), y.flatten(1)], dim=1))


def build_discriminator(x_shape, y_shape, width: int = 32, depth: int = 2, spectral_norm: bool = False) -> nn.Module:
    x_shape, y_shape = tuple(x_shape), tuple(y_shape)
    if len(x_shape) == 3 and len(y_shape) == 3 and x_shape[1:] == y_shape[1:]:
        return PatchDiscriminator(x_shape[0] + y_shape[0], width, depth, spectral_norm)
    return MLPDiscriminator(math.prod(x_shape) + math.prod(y_shape), width, depth, spectral_norm)
