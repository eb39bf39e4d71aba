"""Degradations turn clean images y[C, H, W] in [0, 1] into conditional inputs x = degrade(y).

Plain torch (PIL rasterises brush strokes). Masks are [1, H, W] with 1 = hidden; a completion input carries
the mask as its last channel (`apply_mask`). Random degradations draw from an explicit `torch.Generator` seeded
per sample by `sample_seed`: without an epoch the seed depends on (seed, stream, index) only, which gives
validation and test inputs one fixed degradation; training draws add the epoch, so every draw of a sample gets
its own mask or noise, and a resumed run or another DDP rank draws the same one for the same (index, epoch).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor

TASKS = ("completion", "denoise", "superres", "colorization", "identity")
MASKS = ("half", "box", "rects", "strokes", "mixed")
UPSAMPLE_MODES = ("nearest", "bilinear", "bicubic")
LUMA = (0.299, 0.587, 0.114)                     # ITU-R BT.601 luminance weights
TASK_SETTINGS = {                                # the settings each task reads (Degradation.record keeps these)
    "completion": ("mask", "mask_side", "mask_size", "mask_count", "stroke_width"),
    "denoise": ("noise_sigma",),
    "superres": ("scale", "upsample"),
    "colorization": (),
    "identity": (),
}


# ---- completion masks: [1, H, W], 1 = hidden ----------------------------------------------------------------
def half_mask(shape: tuple[int, ...], side: str = "bottom") -> Tensor:
    """1 where pixels are hidden: one half of an [H, W] image; returns [1, H, W]."""
    h, w = shape[-2:]
    mask = torch.zeros(1, h, w)
    if side == "bottom":
        mask[:, h // 2:] = 1
    elif side == "top":
        mask[:, : h - h // 2] = 1
    elif side == "left":
        mask[:, :, : w - w // 2] = 1
    elif side == "right":
        mask[:, :, w // 2:] = 1
    else:
        raise ValueError(f"mask side must be top, bottom, left or right; got {side!r}")
    return mask


def box_mask(shape: tuple[int, ...], size: float = 0.5) -> Tensor:
    """A centred box covering `size` of the height and of the width: [1, H, W]."""
    h, w = shape[-2:]
    bh, bw = max(1, round(h * size)), max(1, round(w * size))
    top, left = (h - bh) // 2, (w - bw) // 2
    mask = torch.zeros(1, h, w)
    mask[:, top: top + bh, left: left + bw] = 1
    return mask


def rect_mask(shape: tuple[int, ...], generator: torch.Generator | None = None, count: int = 3,
              max_size: float = 0.5, min_size: float = 0.1) -> Tensor:
    """`count` axis-aligned rectangles, each side a uniform fraction in [min_size, max_size] of the image: [1, H, W]."""
    h, w = shape[-2:]
    mask = torch.zeros(1, h, w)
    for fh, fw, ft, fl in torch.rand(count, 4, generator=generator).tolist():         # all draws at once: fast
        span = max_size - min_size
        rh, rw = max(1, round(h * (min_size + span * fh))), max(1, round(w * (min_size + span * fw)))
        top, left = int(ft * (h - rh + 1)), int(fl * (w - rw + 1))
        mask[:, top: top + rh, left: left + rw] = 1
    return mask


def stroke_mask(shape: tuple[int, ...], generator: torch.Generator | None = None, count: int = 3,
                width: float = 0.12, max_segments: int = 5, max_angle: float = 2.0) -> Tensor:
    """Free-form brush strokes (DeepFill-v2 style): `count` thick random polylines with round ends: [1, H, W].

    width: brush diameter as a fraction of min(H, W) (each stroke draws in [0.5, 1] x width).
    """
    h, w = shape[-2:]
    size = min(h, w)
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)                                                      # PIL rasterises in C: fast
    for r in torch.rand(count, 5 + 2 * max_segments, generator=generator).tolist():   # all draws at once
        py, px, angle, radius = r[0] * h, r[1] * w, r[2] * 2 * math.pi, 0.25 * size * width * (1 + r[4])
        points = [(px, py)]                                                            # PIL wants (x, y)
        for k in range(1 + int(r[3] * max_segments)):
            angle += (2 * r[5 + 2 * k] - 1) * max_angle
            length = size * (0.15 + 0.25 * r[6 + 2 * k])
            py = min(max(py + length * math.sin(angle), 0.0), float(h))
            px = min(max(px + length * math.cos(angle), 0.0), float(w))
            points.append((px, py))
        draw.line(points, fill=255, width=max(1, round(2 * radius)), joint="curve")
        for x, y in (points[0], points[-1]):                                           # round caps
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=255)
    return torch.from_numpy(np.asarray(canvas) > 0).float()[None]


def apply_mask(y: Tensor, mask: Tensor) -> Tensor:
    """Completion input: the visible pixels plus the mask as an extra channel, [.., C + 1, H, W]."""
    mask = mask.expand(*y.shape[:-3], 1, *y.shape[-2:])
    return torch.cat([y * (1 - mask), mask], dim=-3)


# ---- other degradations: [.., C, H, W] -> [.., C', H, W] -----------------------------------------------------
def to_grayscale(y: Tensor) -> Tensor:
    """Luminance of RGB images: [.., 3, H, W] -> [.., 1, H, W] (colorization input)."""
    if y.shape[-3] != 3:
        raise ValueError(f"colorization needs RGB images (3 channels); got {y.shape[-3]} channel(s), shape {tuple(y.shape)}")
    weights = torch.tensor(LUMA, dtype=y.dtype, device=y.device).view(3, 1, 1)
    return (y * weights).sum(dim=-3, keepdim=True)


def add_noise(y: Tensor, sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """Additive Gaussian noise, clamped back to [0, 1]: same shape as y."""
    noise = torch.randn(y.shape, generator=generator, dtype=y.dtype)
    return (y + sigma * noise.to(y.device)).clamp(0, 1)


def downsample(y: Tensor, scale: int = 2, upsample: str = "bilinear") -> Tensor:
    """Super-resolution input: area-downsample by `scale`, then upsample back to [.., C, H, W] (U-Net needs one size)."""
    h, w = y.shape[-2:]
    if h % scale or w % scale:              # the low-resolution input rounds down; once per size (warnings' filter)
        sw, sh = max(1, w // scale), max(1, h // scale)
        warnings.warn(f"data.scale={scale} does not divide the image size {w}x{h} (W x H): the low-resolution input "
                      f"is {sw}x{sh}, factors of {w / sw:.2f} x {h / sh:.2f}; choose a data.image_size divisible by "
                      f"{scale} for an exact factor", stacklevel=2)
    flat = y.reshape(-1, *y.shape[-3:])                                               # [N, C, H, W]
    small = F.interpolate(flat, size=(max(1, h // scale), max(1, w // scale)), mode="area")
    extra = {} if upsample == "nearest" else {"align_corners": False}
    return F.interpolate(small, size=(h, w), mode=upsample, **extra).clamp(0, 1).reshape(y.shape)


# ---- configuration: which task, with which parameters ----------------------------------------------------------
def sample_seed(seed: int, index: int, stream: int = 0, epoch: int | None = None) -> int:
    """A per-sample seed from (seed, stream, index), and the epoch for a training draw (None: the sample's one
    fixed seed); streams keep e.g. an official test file apart from train."""
    base = ((seed * 1_000_003 + stream) * 1_000_000_007 + index) % (2**63 - 1)
    if epoch is None:
        return base
    return (base * 1_000_000_009 + 7919 * (epoch + 1)) % (2**63 - 1)


@dataclass(frozen=True)
class Degradation:
    """x = degrade(y) for one task; the datamodules take these fields as flat `data.*` keys.

    task: completion | denoise | superres | colorization | identity
    completion: mask (half | box | rects | strokes | mixed: strokes and rectangles together), mask_side (half),
      mask_size (box side / largest rect side, as a fraction of the image), mask_count (rects / strokes; mixed draws
      mask_count strokes and mask_count // 2 rectangles, at least one), stroke_width (fraction of min(H, W))
    denoise: noise_sigma.   superres: scale (integer factor), upsample (nearest | bilinear | bicubic)
    """

    task: str = "completion"
    mask: str = "half"
    mask_side: str = "bottom"
    mask_size: float = 0.5
    mask_count: int = 3
    stroke_width: float = 0.12
    noise_sigma: float = 0.4
    scale: int = 2
    upsample: str = "bilinear"

    def __post_init__(self) -> None:
        checks = [
            (self.task in TASKS, f"data.task must be one of {', '.join(TASKS)}; got {self.task!r}"),
            (self.mask in MASKS, f"data.mask must be one of {', '.join(MASKS)}; got {self.mask!r}"),
            (self.mask_side in ("top", "bottom", "left", "right"),
             f"data.mask_side must be top, bottom, left or right; got {self.mask_side!r}"),
            (0 < self.mask_size <= 1, f"data.mask_size must be in (0, 1]; got {self.mask_size}"),
            (self.mask_count >= 1, f"data.mask_count must be >= 1; got {self.mask_count}"),
            (0 < self.stroke_width <= 1, f"data.stroke_width must be in (0, 1]; got {self.stroke_width}"),
            (self.noise_sigma >= 0, f"data.noise_sigma must be >= 0; got {self.noise_sigma}"),
            (isinstance(self.scale, int) and self.scale >= 1, f"data.scale must be an integer >= 1; got {self.scale!r}"),
            (self.upsample in UPSAMPLE_MODES, f"data.upsample must be one of {', '.join(UPSAMPLE_MODES)}; got {self.upsample!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @classmethod
    def pop_from(cls, kwargs: dict[str, Any]) -> "Degradation":
        """Take this class's fields out of a datamodule's keyword arguments (the rest go to the base class)."""
        return cls(**{f.name: kwargs.pop(f.name) for f in fields(cls) if f.name in kwargs})

    def record(self) -> dict[str, Any]:
        """The task and the settings it reads, as plain values: what a datamodule's info() records as "degradation"
        (checkpoints keep it in data_info), read back by `from_record`."""
        return {"task": self.task, **{name: getattr(self, name) for name in TASK_SETTINGS[self.task]}}

    @classmethod
    def from_record(cls, record: Any, source: str = "degradation") -> "Degradation":
        """The Degradation a `record()` describes: plain values for this class's fields, nothing else; errors name
        `source` (where the record came from)."""
        if not isinstance(record, Mapping) or "task" not in record:
            raise ValueError(f"{source} must be a mapping with a 'task' key (and the task's settings); got {record!r}")
        unknown = sorted(str(k) for k in set(record) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{source} holds key(s) no degradation takes: {', '.join(unknown)} "
                             f"(record: {dict(record)})")
        try:
            return cls(**record)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from err

    @property
    def mask_channel(self) -> bool:
        return self.task == "completion"

    @property
    def random(self) -> bool:
        return (self.task == "completion" and self.mask in ("rects", "strokes", "mixed")) or (self.task == "denoise" and self.noise_sigma > 0)

    def make_mask(self, shape: tuple[int, ...], generator: torch.Generator | None = None) -> Tensor:
        """The completion mask [1, H, W] for an image of shape [.., H, W]."""
        if self.mask == "half":
            return half_mask(shape, self.mask_side)
        if self.mask == "box":
            return box_mask(shape, self.mask_size)
        if self.mask == "rects":
            return rect_mask(shape, generator, self.mask_count, self.mask_size, min(0.1, self.mask_size))
        strokes = stroke_mask(shape, generator, self.mask_count, self.stroke_width)
        if self.mask == "strokes":
            return strokes
        boxes = rect_mask(shape, generator, max(1, self.mask_count // 2), self.mask_size, min(0.1, self.mask_size))
        return torch.maximum(strokes, boxes)

    def __call__(self, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """y [C, H, W] or [N, C, H, W] -> x; a batch shares one random mask (use `apply` for one per sample)."""
        if self.task == "completion":
            return apply_mask(y, self.make_mask(y.shape, generator).to(y))
        if self.task == "denoise":
            return add_noise(y, self.noise_sigma, generator)
        if self.task == "superres":
            return downsample(y, self.scale, self.upsample)
        if self.task == "colorization":
            return to_grayscale(y)
        return y.clone()

    def apply(self, y: Tensor, seed: int = 0, stream: int = 0, first_index: int = 0) -> Tensor:
        """A whole image set y [N, C, H, W] -> x [N, C', H, W]; sample i draws from its own generator,
        seeded by sample_seed(seed, first_index + i, stream), so each x is fixed once and for all."""
        seeds = [sample_seed(seed, first_index + i, stream) for i in range(len(y))] if self.random else None
        return self.apply_seeded(y, seeds)

    def apply_seeded(self, y: Tensor, seeds: list[int] | Tensor | None) -> Tensor:
        """y [N, C, H, W] -> x [N, C', H, W], sample i drawing from a generator seeded by seeds[i] (one seed per
        draw: see sample_seed); deterministic tasks ignore the seeds and run on the whole batch at once."""
        if y.dim() != 4:
            raise ValueError(f"expected images [N, C, H, W]; got shape {tuple(y.shape)}")
        if not self.random:
            return self(y)
        seeds = seeds.tolist() if isinstance(seeds, Tensor) else list(seeds)
        if len(seeds) != len(y):
            raise ValueError(f"apply_seeded: {len(seeds)} seeds for {len(y)} images")
        g = torch.Generator()
        if self.task == "completion":
            masks = torch.stack([self.make_mask(y.shape, g.manual_seed(s)) for s in seeds])       # [N, 1, H, W]
            return apply_mask(y, masks.to(y))
        noise = torch.stack([torch.randn(y.shape[1:], generator=g.manual_seed(s), dtype=y.dtype) for s in seeds])
        return (y + self.noise_sigma * noise.to(y)).clamp(0, 1)


def degrade(y: Tensor, task: str = "completion", generator: torch.Generator | None = None, **kwargs: Any) -> Tensor:
    """x = degrade(y): e.g. degrade(y, "denoise", noise_sigma=0.2) or degrade(y, "completion", mask="strokes")."""
    return Degradation(task=task, **kwargs)(y, generator)
