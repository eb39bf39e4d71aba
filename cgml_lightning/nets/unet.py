"""U-Net generator for images: the encoder keeps its skips, z enters at the bottleneck (and by FiLM per level).

Each decoder level's first conv sees [upsampled h, skip]. Written as up_in(h) + lateral(skip) (the same
function: a conv of a concatenation is the sum of convs of its parts), the skip's half does not depend on z,
so encode() computes it once per input and every z-step (and sample) reuses it: a z-step then costs only
the z-dependent part of the decoder, forward and backward. up_in is a 4x4 stride-2 transposed conv
(upsample="transposed"): it works at the lower resolution, where nearest upsampling followed by a 3x3 conv
(upsample="nearest") convolves at the higher one, and a z-step is exactly that forward and input-gradient
(docs/algorithm.md has the measured difference).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cgml_lightning.nets.layers import init_weights


def norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"net.norm must be group, batch or none; got {kind!r}")


def conv_block(c_in: int, c_out: int, norm: str, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), *conv_tail(c_out, norm))


def conv_tail(channels: int, norm: str, convs: int = 2) -> list[nn.Module]:
    """What follows a block's first conv: norm, SiLU, then (convs - 1) times conv, norm, SiLU."""
    layers = [norm_layer(norm, channels), nn.SiLU()]
    for _ in range(convs - 1):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), norm_layer(norm, channels), nn.SiLU()]
    return layers


def up_conv(upsample: str, c_in: int, c_out: int) -> nn.Module:
    """up_in of a decoder level: the 2x upsampling conv (transposed) or the conv after nearest upsampling."""
    if upsample == "transposed":
        return nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False)
    return nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)


class UNetGenerator(nn.Module):
    def __init__(self, x_shape: tuple[int, ...], y_shape: tuple[int, ...], latent_dim: int,
                 width: int = 32, depth: int = 2, norm: str = "group", film: bool = True,
                 spectral_norm: bool = False, out_activation: str = "sigmoid", decoder_convs: int = 2,
                 upsample: str = "transposed"):
        super().__init__()
        if len(x_shape) != 3 or len(y_shape) != 3:
            raise ValueError(f"the U-Net needs x and y as [C, H, W]; got x {tuple(x_shape)}, y {tuple(y_shape)}: for "
                             f"vector data use net=mlp (experiment=toy sets it, with the vector z-phase)")
        if tuple(x_shape[1:]) != tuple(y_shape[1:]):
            raise ValueError(f"the U-Net needs x and y of one size; got x {tuple(x_shape)}, y {tuple(y_shape)}")
        self.y_shape, self.latent_dim = tuple(y_shape), latent_dim
        channels = [width * 2 ** i for i in range(depth + 1)]             # per level, stem first
        self.feature_dim = channels[-1]
        self.stem = conv_block(x_shape[0], channels[0], norm)
        self.down = nn.ModuleList(conv_block(a, b, norm, stride=2) for a, b in zip(channels[:-1], channels[1:]))
        # decoder level i: up_in(h from level i+1) + lateral(skip i), then the rest of the block
        self.lateral = nn.ModuleList(nn.Conv2d(a, a, 3, padding=1) for a in channels[:-1])
        if upsample not in ("transposed", "nearest"):
            raise ValueError(f"net.upsample must be transposed or nearest; got {upsample!r}")
        self.upsample = upsample
        self.up_in = nn.ModuleList(up_conv(upsample, b, a) for a, b in zip(channels[:-1], channels[1:]))
        if decoder_convs not in (1, 2):
            raise ValueError(f"net.decoder_convs must be 1 or 2; got {decoder_convs!r}")
        self.up = nn.ModuleList(nn.Sequential(*conv_tail(a, norm, decoder_convs)) for a in channels[:-1])
        self.head = nn.Conv2d(channels[0], y_shape[0], 1)
        self.out_activation = {"sigmoid": torch.sigmoid, "none": nn.Identity()}[out_activation]
        if latent_dim > 0:
            self.z_in = nn.Linear(latent_dim, channels[-1])                # added at the bottleneck
            self.film = nn.ModuleList(nn.Linear(latent_dim, 2 * c) for c in channels[:-1]) if film else None
        init_weights(self, spectral_norm)

    def encode(self, x: Tensor) -> tuple[Tensor, ...]:
        """(lateral(skip_0), ..., lateral(skip_{depth-1}), bottleneck): all that decode needs of x."""
        skips = [self.stem(x)]                                             # [B, c0, H, W]
        for block in self.down:
            skips.append(block(skips[-1]))                                 # [B, c_i, H/2^i, W/2^i]
        return (*(lateral(s) for lateral, s in zip(self.lateral, skips)), skips[-1])

    def summarize(self, feats: tuple[Tensor, ...]) -> Tensor:
        return feats[-1].mean(dim=(2, 3))                                  # [B, c_depth]

    def upsampled(self, level: int, h: Tensor, size: torch.Size) -> Tensor:
        """up_in(h) at the skip's size: 2x up, cropped where a stride-2 conv had rounded an odd size up."""
        if self.upsample == "nearest":
            return self.up_in[level](F.interpolate(h, size=size, mode="nearest"))
        return self.up_in[level](h)[..., : size[0], : size[1]]

    def decode(self, feats: tuple[Tensor, ...], z: Tensor) -> Tensor:
        h = feats[-1]
        if self.latent_dim > 0:
            h = h + self.z_in(z)[:, :, None, None]
        for level in reversed(range(len(self.up))):
            skip_term = feats[level]                                       # lateral(skip), [B, c_level, ...]
            h = self.up[level](self.upsampled(level, h, skip_term.shape[-2:]) + skip_term)  # [B, c_level, ...]
            if self.latent_dim > 0 and self.film is not None:
                scale, shift = self.film[level](z)[:, :, None, None].chunk(2, dim=1)
                h = h * (1 + scale) + shift
        return self.out_activation(self.head(h))                           # [B, C_out, H, W]
