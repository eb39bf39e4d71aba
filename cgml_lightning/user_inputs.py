"""Users' own files for `cgml-sample`: images (a file or a folder), a completion mask, a hint that guides samples.

Everything is read with the loaders of data/folders.py and turned into the checkpoint's task input with
data/degradations.py, so `cgml-sample input=photo.png` sees what the model saw in training: the same mask,
grey conversion, noise or downsampling. A file that does not fit the model is an error naming the file.

Sizes: a file of the model's size is used as it is; one of the same aspect ratio is resized to the model's
size; any other is an error (or, with crop=true, resized on its shorter side and centre-cropped).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from cgml_lightning.data.degradations import Degradation, apply_mask
from cgml_lightning.data.folders import (IMAGE_EXTENSIONS, UNREADABLE, ImageDataError, decode_upright, inspect_image,
                                         list_images, open_image, split_pair, to_tensor)

log = logging.getLogger("cgml_lightning")

ASPECT_TOLERANCE = 0.02          # relative difference of width/height ratios still resized without a crop
HINT_THRESHOLD = 8 / 255         # a hint pixel with any channel above this (or a non-zero alpha) is known
STREAM_USER = 2                  # random degradations of user images draw from their own stream (0 train, 1 test)
RECORD_KEY = "hyper_parameters.data_info.degradation"      # where a checkpoint keeps its data's degradation
DATA_KEY = "hyper_parameters.data_info.data"              # and the data config it was trained with
FLAT_TASK_DATAMODULES = ("FashionMNISTDataModule", "ImageFolderDataModule", "StreamingDataModule")


def task_degradation(data_cfg: Mapping[str, Any] | None, data_info: Mapping[str, Any]) -> Degradation:
    """The degradation the checkpoint was trained with: the record its datamodule's info() made
    (data_info["degradation"]). Checkpoints made before that record have it inferred from their data config
    (data_info["data"], see inferred_degradation)."""
    if "degradation" in data_info:
        return Degradation.from_record(data_info["degradation"], f"the checkpoint's {RECORD_KEY}")
    return inferred_degradation(data_cfg, data_info)


def inferred_degradation(data_cfg: Mapping[str, Any] | None, data_info: Mapping[str, Any]) -> Degradation:
    """The degradation of a checkpoint without the record, from its data config by key and class name only
    (nothing in it is run): the digits module always hides one half; paired folders (pix2pix) take their input as
    it is; flat `data.task`/`data.mask`... keys name it (fmnist, image_folder and streaming, whose defaults fill
    keys left out). Any other config, or a task at odds with the recorded mask channel (paired streaming data), is
    an error naming the checkpoint's keys."""
    cfg = dict(data_cfg) if isinstance(data_cfg, Mapping) else {}
    target = str(cfg.pop("_target_", None) or "")
    name = target.rsplit(".", 1)[-1]
    if name not in ("DigitsDataModule", "PairedFolderDataModule", *FLAT_TASK_DATAMODULES) and "task" not in cfg:
        raise undetermined(target, "names no datamodule whose degradation is known" if cfg or target else "is absent")
    try:
        if name == "DigitsDataModule":
            degradation = Degradation(task="completion", mask="half", mask_side=cfg.get("mask_side", "bottom"))
        elif name == "PairedFolderDataModule":
            degradation = Degradation(task="identity")
        else:
            degradation = Degradation.pop_from(cfg)
    except (TypeError, ValueError) as err:
        raise ValueError(f"the checkpoint's {DATA_KEY} ({target or 'no _target_'}): {err}") from err
    if "mask_channel" in data_info and degradation.mask_channel != bool(data_info["mask_channel"]):
        raise undetermined(target, f"names task={degradation.task}, but the recorded mask_channel is "
                                   f"{data_info['mask_channel']}")
    return degradation


def undetermined(target: str, why: str) -> ValueError:
    return ValueError(
        f"cannot tell which degradation made this checkpoint's inputs: it records none ({RECORD_KEY}) and its data "
        f"config {DATA_KEY}{f' ({target})' if target else ''} {why}. Add the record to the checkpoint, e.g. "
        f"{RECORD_KEY} = {{'task': 'denoise', 'noise_sigma': 0.2}} (task: completion, denoise, superres, "
        "colorization or identity, with the data.* settings it was trained with)")


def check_image_model(data_info: dict[str, Any], key: str) -> tuple[int, int, int]:
    """(channels, height, width) of the model's outputs; an error for a model of vector data."""
    y_shape = list(data_info["y_shape"])
    if data_info.get("kind") != "image" or len(y_shape) != 3:
        raise ValueError(f"{key}= takes images, but this checkpoint was trained on vector data "
                         f"(x_shape {list(data_info['x_shape'])}, y_shape {y_shape}); sample it without {key}=")
    return y_shape[0], y_shape[1], y_shape[2]


def fit_size(img: Image.Image, path: Path, size: tuple[int, int], crop: bool, key: str,
             resample: int = Image.BICUBIC) -> Image.Image:
    """img at the model's size (height, width): as it is, resized when the aspect ratio fits, or cropped (crop=true)."""
    h, w = size
    if img.size == (w, h):
        return img
    ratio, model_ratio = img.size[0] / img.size[1], w / h
    fits = abs(ratio - model_ratio) <= ASPECT_TOLERANCE * model_ratio
    if crop and not fits:        # the shorter side to the model's size, then a centre crop, with `resample`
        log.info("%s: resized and centre-cropped %s from %dx%d to %dx%d", key, path, img.size[0], img.size[1], w, h)
        return ImageOps.fit(img, (w, h), method=resample)
    if not fits:
        raise AspectRatioError(f"{key}: {path} is {img.size[0]}x{img.size[1]} (W x H) but the model takes {w}x{h}: "
                               f"the aspect ratio differs, so it cannot be resized without distortion. Crop it to "
                               f"{w}:{h} first, or pass crop=true to resize its shorter side and centre-crop",
                               f"{path} ({img.size[0]}x{img.size[1]})")
    log.info("%s: resized %s from %dx%d to %dx%d", key, path, img.size[0], img.size[1], w, h)
    return img.resize((w, h), resample)


class AspectRatioError(ImageDataError):
    """A user's image of another aspect ratio than the model's; `file` names it with its size, for a list."""

    def __init__(self, message: str, file: str) -> None:
        super().__init__(message)
        self.file = file


class FitToModel:
    """fit_size as a tensor for each of `count` files, recording instead of raising an image of another aspect ratio;
    check() then raises one error naming every such file (the file's own error when there is one file)."""

    def __init__(self, count: int, size: tuple[int, int], crop: bool, key: str) -> None:
        self.count, self.size, self.crop, self.key = count, size, crop, key
        self.wrong: list[AspectRatioError] = []

    def __call__(self, img: Image.Image, path: Path) -> Tensor | None:
        try:
            return to_tensor(fit_size(img, path, self.size, self.crop, self.key))
        except AspectRatioError as err:
            self.wrong.append(err)
            return None

    def check(self) -> None:
        if len(self.wrong) == 1 and self.count == 1:
            raise self.wrong[0]
        if self.wrong:
            (h, w), more = self.size, len(self.wrong) - 10
            named = ", ".join(err.file for err in self.wrong[:10]) + (f" and {more} more" if more > 0 else "")
            raise AspectRatioError(f"{self.key}: {len(self.wrong)} of {self.count} images are not {w}:{h} like the "
                                   f"model's {w}x{h} (W x H), so they cannot be resized without distortion: {named}. "
                                   f"Crop them to {w}:{h} first, or pass crop=true to resize each one's shorter side "
                                   f"and centre-crop", named)


class UnreadableImageError(ImageDataError):
    """A user's file that cannot be decoded as an image (corrupt, truncated, empty, not an image)."""


def open_checked(path: Path, key: str, mode: str) -> Image.Image:
    """Decode a user's file as training decodes its images (upright by its orientation tag, 16-bit grey rescaled) in
    PIL mode L, RGB (transparency onto white), LA or RGBA; errors name the key and the file. The file passes the
    checks training makes (inspect_image: still, at least 2x2, not fully transparent)."""
    if not path.is_file():
        raise FileNotFoundError(f"{key}: no such file: {path.resolve()}")
    try:
        inspect_image(path)
        if mode in ("L", "RGB"):
            return open_image(path, 1 if mode == "L" else 3)
        return decode_upright(path).convert(mode)
    except ImageDataError as err:                           # readable, but not an image training would take
        raise ImageDataError(f"{key}: {err}") from err
    except UNREADABLE as err:
        raise UnreadableImageError(f"{key}: cannot read {path} as an image ({type(err).__name__}: {err})") from err


def image_files(source: str | Path, key: str = "input") -> list[Path]:
    """The image file itself, or the images under a folder (recursive, sorted); errors name what is missing."""
    path = Path(source).expanduser()
    if path.is_dir():
        return list_images(path, key)
    if not path.exists():
        raise FileNotFoundError(f"{key}: no such file or folder: {path.resolve()}")
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise ImageDataError(f"{key}: {path} is not an image file (expected {', '.join(IMAGE_EXTENSIONS)})")
    return [path]


def readable_images(files: list[Path], count: int, key: str = "input") -> list[Path]:
    """The first `count` of a folder's files that decode and pass training's checks, in order; the others skipped
    with one warning naming them, as training skips them. An error when none is left."""
    kept, skipped = [], []
    for path in files:
        if len(kept) == count:
            break
        try:
            open_checked(path, key, "L")
            kept.append(path)
        except ImageDataError as err:                       # unreadable, or unusable (animated, tiny, transparent)
            skipped.append(str(err))
    if skipped:
        log.warning("%s: skipping %d unreadable or unusable image(s):\n  %s", key, len(skipped), "\n  ".join(skipped))
    if not kept:
        raise UnreadableImageError(f"{key}: none of the {len(files)} image file(s) given could be read")
    return kept


def load_images(files: list[Path], channels: int, size: tuple[int, int], crop: bool = False,
                key: str = "input") -> Tensor:
    """Images [N, channels, H, W] in [0, 1], each converted to grey (1) or RGB (3) and fitted to the model's size."""
    fit = FitToModel(len(files), size, crop, key)
    images = [fit(open_checked(path, key, "L" if channels == 1 else "RGB"), path) for path in files]
    fit.check()
    return torch.stack(images)


def paired_direction(data_info: Mapping[str, Any]) -> str | None:
    """AtoB or BtoA for a checkpoint trained on image pairs (paired folders, or paired litdata chunks), else None."""
    data = data_info.get("data") or {}
    name = str(data.get("_target_") or "").rsplit(".", 1)[-1]
    identity = (data_info.get("degradation") or {}).get("task", "identity") == "identity"
    if name == "PairedFolderDataModule" or (name == "StreamingDataModule" and identity):
        return data.get("direction") or "AtoB"
    return None


def input_side(files: list[Path], folder: Path, direction: str) -> list[Path]:
    """A paired checkpoint given a folder with A/ and B/: the input side's files only (A/ for AtoB, B/ for BtoA)."""
    side = folder.expanduser() / direction[0]
    if not (side.is_dir() and (folder.expanduser() / direction[-1]).is_dir()):
        return files
    log.info("input: a paired checkpoint (%s): reading the images under %s", direction, side)
    return [f for f in files if side in f.parents]


def load_pair_inputs(files: list[Path], channels: int, size: tuple[int, int], direction: str, crop: bool = False,
                     key: str = "input") -> tuple[Tensor, Tensor | None]:
    """A paired checkpoint's inputs [N, C, H, W], and their truths when the files are A|B images (twice the model's
    width: split in half, the input side per direction, the other half the truth); other files are inputs as
    they are (no truth). A mix of the two is an error naming the first file of the other kind."""
    h, w = size
    fit = FitToModel(len(files), size, crop, key)
    inputs, truths, pairs, single = [], [], [], []
    for path in files:
        img = open_checked(path, key, "L" if channels == 1 else "RGB")
        if abs(img.size[0] / img.size[1] - 2 * w / h) <= ASPECT_TOLERANCE * 2 * w / h:
            a, b = split_pair(img, f"{key}: {path}")
            given, truth = (a, b) if direction == "AtoB" else (b, a)
            inputs.append(fit(given, path))
            truths.append(fit(truth, path))
            pairs.append(path)
        else:
            inputs.append(fit(img, path))
            single.append(path)
    fit.check()
    if pairs and single:
        raise ImageDataError(f"{key}: {pairs[0]} is an A|B image (twice as wide as the model's {w}x{h}) but "
                             f"{single[0]} is a single image; give one kind")
    return torch.stack(inputs), (torch.stack(truths) if truths else None)


def load_mask(path: str | Path, size: tuple[int, int], crop: bool = False) -> Tensor:
    """A completion mask [1, H, W] from a picture where white (> 50% grey) = hole (to fill), black = visible; a
    transparent pixel is visible too (a white shape drawn on a transparent layer is the hole)."""
    path = Path(path).expanduser()
    img = fit_size(open_checked(path, "mask", "LA"), path, size, crop, "mask", Image.NEAREST)
    grey, alpha = torch.from_numpy(np.asarray(img, dtype=np.float32)).unbind(-1)
    mask = ((grey > 127.5) & (alpha > 0)).float()[None]
    if mask.sum() == 0:
        raise ValueError(f"mask: {path} hides no pixel (white = hole, black = visible): none of its opaque pixels "
                         "is brighter than 50% grey")
    if mask.min() == 1:
        raise ValueError(f"mask: {path} hides every pixel (white = hole, black = visible); nothing is left to "
                         "condition on")
    return mask


def load_hint(path: str | Path, channels: int, size: tuple[int, int], crop: bool = False) -> tuple[Tensor, Tensor]:
    """A hint image [C, H, W] and where it is known [1, H, W]: its alpha > 0 when it has transparency, else
    its non-black pixels (any channel above HINT_THRESHOLD)."""
    path = Path(path).expanduser()
    with_alpha = open_checked(path, "hint", "LA" if channels == 1 else "RGBA")
    has_alpha = bool(np.asarray(with_alpha)[..., -1].min() < 255)
    img = to_tensor(fit_size(with_alpha, path, size, crop, "hint", Image.NEAREST))           # [C + 1, H, W]
    colour, alpha = img[:-1], img[-1:]
    known = (alpha > 0) if has_alpha else (colour > HINT_THRESHOLD).any(dim=0, keepdim=True)
    if not known.any():
        raise ValueError(f"hint: {path} has no known pixel (known = non-transparent, or non-black when it has "
                         "no transparency)")
    return colour, known.float()


def hint_guide(hint: Tensor, known: Tensor) -> Callable[[Tensor], Tensor]:
    """Masked L1 to the hint: samples [B, N, C, H, W] -> scalar. hint [C, H, W] (one for all inputs) or
    [B, C, H, W] (one per input); known [1, H, W] or [B, 1, H, W]: 1 where the hint's pixels count."""
    target = hint.unsqueeze(1) if hint.dim() == 4 else hint                                 # [B, 1, C, H, W]
    weight = known.unsqueeze(1) if known.dim() == 4 else known                              # [B, 1, 1, H, W]

    def guide(samples: Tensor) -> Tensor:
        return ((samples - target.to(samples)).abs() * weight.to(samples)).sum()

    return guide


@dataclass
class UserInputs:
    """What cgml-sample conditions on: x [B, *x_shape]; the images given, when they are the clean targets
    (shown as the grid's last column); the file behind each row."""

    x: Tensor
    given: Tensor | None
    files: list[str]


def build_inputs(data_info: dict[str, Any], degradation: Degradation, images: Tensor, files: list[str],
                 mask: Tensor | None = None, degrade: bool = True, seed: int = 0) -> UserInputs:
    """Turn images [N, C, H, W] into the model's inputs.

    images: clean images (degrade=true: the task's degradation makes x, and they are kept as `given`), or
      already degraded ones (degrade=false: a grey photo to colorize, a noisy one to denoise).
    mask: [1, H, W], 1 = hole: replaces the task's mask (completion checkpoints only).
    """
    x_shape = list(data_info["x_shape"])
    completion = degradation.task == "completion"
    if mask is not None and not completion:
        raise ValueError(f"mask= is for completion checkpoints; this one was trained for task={degradation.task}")
    if completion:
        if mask is None and not degrade:
            raise ValueError("degrade=false with a completion checkpoint needs mask=FILE (white = hole): "
                             "the model must know which pixels to fill")
        x_new = apply_mask(images, mask) if mask is not None else degradation.apply(images, seed, STREAM_USER)
        given = images
    elif degrade:
        x_new, given = degradation.apply(images, seed, STREAM_USER), images
        if degradation.task == "identity":
            given = None                                                # the image is the input: no target
    else:
        x_new, given = images, None
    if list(x_new.shape[1:]) != x_shape:
        raise ImageDataError(f"input: the images make inputs of shape {list(x_new.shape[1:])} but the checkpoint "
                             f"takes {x_shape} (task={degradation.task}, degrade={degrade})")
    return UserInputs(x_new, given, files)


def input_channels(data_info: dict[str, Any], degradation: Degradation, degrade: bool) -> int:
    """How many channels to read user images with: the target's, or the input's when they are already degraded."""
    y_channels, x_channels = data_info["y_shape"][0], data_info["x_shape"][0]
    if degrade or degradation.task == "completion":
        return y_channels
    return x_channels
