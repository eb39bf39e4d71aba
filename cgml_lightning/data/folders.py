"""Image folders with PIL: any folder of images becomes any task (data=image_folder), and pix2pix-style paired
folders become translation (data=paired_folder). Files are read once, in sorted order, at setup; unreadable
files are dropped with a warning before sample indices are assigned, and every other problem is an error
at setup naming the file (never a crash inside a DataLoader worker)."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from cgml_lightning.data.base import ArrayDataModule
from cgml_lightning.data.degradations import Degradation

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)   # what PIL raises on a bad file


class ImageDataError(ValueError):
    """A readable file that does not fit (size, shape): an error, unlike a corrupt file, which is skipped."""


def check_root(root: str | Path | None, key: str = "data.root") -> Path:
    if root is None or str(root) in ("", "???"):
        raise ValueError(f"{key} is required: the folder of images (e.g. {key}=/path/to/images)")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{key}: no such folder: {path.resolve()}")
    return path


def list_images(folder: Path, key: str = "data.root") -> list[Path]:
    """Image files under folder, recursively, in sorted (deterministic) order; an error if there are none."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise FileNotFoundError(f"{key}: no images in {folder.resolve()} (looked recursively for "
                                f"{', '.join(IMAGE_EXTENSIONS)}, any case)")
    return files


def open_image(path: Path, channels: int) -> Image.Image:
    """Decode fully (so corrupt or truncated files fail here) and convert to L (channels 1) or RGB (channels 3)."""
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode.startswith("I;16"):             # 16-bit grey: PIL's convert("L") would clip, so rescale
            img = Image.fromarray((np.asarray(img, dtype=np.float32) / 257.0).round().astype(np.uint8))
        return img.convert("L" if channels == 1 else "RGB")


def resize_crop(img: Image.Image, size: int | None) -> Image.Image:
    """Resize the shorter side to `size`, then centre-crop to size x size (None: keep the image as it is)."""
    if size is None:
        return img
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image) -> Tensor:
    """PIL L/RGB -> float [C, H, W] in [0, 1]."""
    a = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(a[None] if a.ndim == 2 else a.transpose(2, 0, 1).copy())


def read_all(items: list, read: Callable, root: Path) -> tuple[list, list[Tensor]]:
    """Apply read to each file (or pair of files); drop unreadable ones with one warning naming them, before any
    sample index is assigned; an error if none are left. ImageDataError (a misfit, not a corrupt file) propagates."""
    kept, images, bad = [], [], []
    for item in items:
        try:
            images.append(read(item))
            kept.append(item)
        except ImageDataError:
            raise
        except UNREADABLE as err:
            name = " / ".join(map(str, item)) if isinstance(item, tuple) else str(item)
            bad.append(f"{name} ({type(err).__name__}: {err})")
    if bad:
        shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        warnings.warn(f"skipping {len(bad)} unreadable image(s) under {root}:\n  {shown}", stacklevel=2)
    if not images:
        raise ValueError(f"no readable images under {root}: all {len(items)} file(s) failed to decode")
    return kept, images


def stack_same_size(images: list[Tensor], files: list[Path], what: str = "image") -> Tensor:
    """[N, C, H, W]; an error naming the first file whose shape differs from the first one's."""
    for img, path in zip(images, files):
        if img.shape != images[0].shape:
            raise ImageDataError(f"{path}: {what} shape {tuple(img.shape)} differs from {tuple(images[0].shape)} "
                             f"({files[0]}); set data.image_size to resize every image to one size")
    return torch.stack(images)


class FolderDataModule(ArrayDataModule):
    """Shared by the folder datamodules: root and image checks, and splits that leave val/test non-empty."""

    kind = "image"

    def __init__(self, root: str | None = None, channels: int = 3, image_size: int | None = 64,
                 max_images: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if channels not in (1, 3):
            raise ValueError(f"data.channels must be 1 (grey) or 3 (RGB); got {channels!r}")
        if image_size is not None and image_size < 1:
            raise ValueError(f"data.image_size must be a positive number of pixels or null; got {image_size!r}")
        self.root, self.channels, self.image_size, self.max_images = root, channels, image_size, max_images
        self.files: list[Path] = []        # the file(s) behind each sample, in sample order (before the split)

    def read(self, path: Path) -> Tensor:
        return to_tensor(resize_crop(open_image(path, self.channels), self.image_size))

    def load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        x, y = self.load_arrays()
        n = len(x)
        sizes = [max(1, round(n * f)) if f > 0 else 0 for f in (self.val_fraction, self.test_fraction)]
        if n - sum(sizes) < 1:
            raise ValueError(f"{self.root}: {n} image(s) are too few for val_fraction={self.val_fraction} and "
                             f"test_fraction={self.test_fraction} (each non-zero split takes at least one image)")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed))
        parts = {"val": order[: sizes[0]], "test": order[sizes[0]: sum(sizes)], "train": order[sum(sizes):].sort().values}
        return {k: (x[idx], y[idx]) for k, idx in parts.items()}


class ImageFolderDataModule(FolderDataModule):
    """data=image_folder: every image under data.root (recursive; grey or RGB via data.channels), resized on its
    shorter side to data.image_size and centre-cropped, becomes y; x = degrade(y) for data.task."""

    def __init__(self, root: str | None = None, **kwargs):
        self.degradation = Degradation.pop_from(kwargs)
        super().__init__(root=root, **kwargs)
        self.mask_channel = self.degradation.mask_channel
        if self.degradation.task == "colorization" and self.channels != 3:
            raise ValueError(f"data.task=colorization needs data.channels=3 (RGB targets); got {self.channels}")

    def load_arrays(self) -> tuple[Tensor, Tensor]:
        root = check_root(self.root)
        files = list_images(root)[: self.max_images]
        self.files, images = read_all(files, self.read, root)
        y = stack_same_size(images, self.files)                                     # [N, C, H, W]
        return self.degradation.apply(y, self.split_seed), y


class PairedFolderDataModule(FolderDataModule):
    """data=paired_folder, image-to-image translation with x = A, y = B (direction=BtoA swaps them). data.root holds
    either A|B images side by side (pix2pix: each image is split in half across its width), or subfolders A/ and
    B/ with matching file names (extension aside). layout: auto | side_by_side | folders."""

    def __init__(self, root: str | None = None, layout: str = "auto", direction: str = "AtoB", **kwargs):
        super().__init__(root=root, **kwargs)
        if layout not in ("auto", "side_by_side", "folders"):
            raise ValueError(f"data.layout must be auto, side_by_side or folders; got {layout!r}")
        if direction not in ("AtoB", "BtoA"):
            raise ValueError(f"data.direction must be AtoB or BtoA; got {direction!r}")
        self.layout, self.direction = layout, direction

    def read_side_by_side(self, path: Path) -> Tensor:
        img = open_image(path, self.channels)
        w, h = img.size
        if w % 2:
            raise ImageDataError(f"{path}: an A|B image needs an even width to split in half; got {w}x{h} (W x H)")
        a, b = img.crop((0, 0, w // 2, h)), img.crop((w // 2, 0, w, h))
        return torch.stack([self.read_half(a), self.read_half(b)])                    # [2, C, H, W]

    def read_half(self, img: Image.Image) -> Tensor:
        return to_tensor(resize_crop(img, self.image_size))

    def read_pair(self, pair: tuple[Path, Path]) -> Tensor:
        a, b = (open_image(p, self.channels) for p in pair)
        if a.size != b.size:
            raise ImageDataError(f"{pair[0]} and {pair[1]}: A and B differ in size ({a.size[0]}x{a.size[1]} vs "
                             f"{b.size[0]}x{b.size[1]}, W x H); a pair must be pixel-aligned")
        return torch.stack([self.read_half(a), self.read_half(b)])

    def pairs(self, root: Path) -> list[tuple[Path, Path]]:
        """(A file, B file) for each name in A/, matched by relative path without extension."""
        sides = [{p.relative_to(root / s).with_suffix(""): p for p in list_images(root / s, f"data.root/{s}")}
                 for s in ("A", "B")]
        only = [(s, sorted(set(sides[i]) - set(sides[1 - i]))) for i, s in enumerate("AB")]
        if any(names for _, names in only):
            detail = "; ".join(f"only in {s}/: {', '.join(map(str, names[:5]))}{' ...' if len(names) > 5 else ''}"
                               for s, names in only if names)
            raise ValueError(f"{root}: A/ and B/ must hold the same file names (extension aside); {detail}")
        return [(sides[0][k], sides[1][k]) for k in sorted(sides[0])]

    def load_arrays(self) -> tuple[Tensor, Tensor]:
        root = check_root(self.root)
        folders = (root / "A").is_dir() and (root / "B").is_dir()
        if self.layout == "folders" and not folders:
            raise FileNotFoundError(f"data.layout=folders needs subfolders A/ and B/ in {root.resolve()}")
        if self.layout == "folders" or (self.layout == "auto" and folders):
            items, read = self.pairs(root)[: self.max_images], self.read_pair
        else:
            items, read = list_images(root)[: self.max_images], self.read_side_by_side
        kept, pairs = read_all(items, read, root)
        self.files = [p if isinstance(p, Path) else p[0] for p in kept]
        ab = stack_same_size(pairs, self.files, "A|B pair")                           # [N, 2, C, H, W]
        a, b = ab[:, 0], ab[:, 1]
        return (a, b) if self.direction == "AtoB" else (b, a)
