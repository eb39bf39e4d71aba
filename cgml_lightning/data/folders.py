"""Image folders with PIL, read lazily: any folder of images becomes any task (data=image_folder), and pix2pix-style
paired folders become translation (data=paired_folder).

Setup lists the files in sorted order (hidden files and __MACOSX / @eaDir folders left out); only the headers of a
small validation or test split (at most EVAL_HEADERS_AT_SETUP files) are read, so start-up is a directory listing
however many files there are. The datasets keep relative names in one compact table, never pixels, so memory does
not grow with the images; each file's row of the latent table is its sorted position in the training split.
DataLoader workers decode, resize, crop (randomly, and flip, in training when data.augment asks) and hand over uint8
tensors; the collate function turns them into the float batch {"x", "y", "index"} and draws the degradation. A file
that cannot serve as a sample when a worker reads it (corrupt, animated, fully transparent, smaller than 2x2, an A|B
pair that does not fit) is skipped with a warning naming it and why: a readable row drawn from the draw's own seed
stands in for that draw, and no other file changes row. Transparent pixels are composited onto white.

data.check_files=true (and data.image_size=null, which needs every file's size) reads every header at setup, in
threads, instead: unreadable files are then dropped with one warning before rows are assigned, and a file that
cannot serve as a sample is an error naming it.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import struct
import unicodedata
import warnings
from array import array
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from cgml_lightning.data.base import SplitDataModule, draw_key, split_sizes
from cgml_lightning.data.degradations import Degradation, sample_seed

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
OTHER_IMAGE_EXTENSIONS = (".tif", ".tiff", ".gif", ".jfif", ".heic", ".heif", ".avif", ".jp2", ".ppm", ".pgm", ".pbm")
log = logging.getLogger("cgml_lightning")
UNREADABLE = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)   # what PIL raises on a bad file
EVAL_HEADERS_AT_SETUP = 1000     # a val or test split this small has its headers read at setup (well under 1 s)
HEADER_THREADS = 8              # threads reading image headers at setup (file reads, mostly waiting on the disk)
COLOUR_CHECKS = 64              # images spread over a colorization set, decoded small at setup to check for colour
GREY_TOLERANCE = 3              # an image is grey where its channels differ by at most this (JPEG's chroma noise)
AUGMENT_STREAM = 3              # augmentations draw from their own stream of the draw's seed
EXIF_ORIENTATION = 0x0112
ORIENTATION_SOURCES = ("exif", "xmp", "XML:com.adobe.xmp")   # where PIL finds an orientation (EXIF, or XMP alone)
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}      # an orientation tag's value -> the transpose that shows the image upright
SYSTEM_FOLDERS = ("__MACOSX", "@eaDir")     # written by archivers and NAS software beside the images
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageDataError(ValueError):
    """A readable file that does not fit (size, shape): an error, unlike a corrupt file, which is skipped."""


def check_root(root: str | Path | None, key: str = "data.root") -> Path:
    if root is None or str(root) in ("", "???"):
        raise ValueError(f"{key} is required: the folder of images (e.g. {key}=/path/to/images)")
    path = Path(root).expanduser()
    if path.is_file():
        raise NotADirectoryError(f"{key}: {path.resolve()} is a file; give the folder that holds the images")
    if not path.is_dir():
        raise FileNotFoundError(f"{key}: no such folder: {path.resolve()}")
    return path


# ---- listing: relative names and sizes, in sorted order, stored compactly --------------------------------------
def walk_images(folder: str | Path, others: Counter | None = None) -> Iterator[tuple[str, int]]:
    """(relative POSIX name, size in bytes) of each image file under folder, recursively, sorted by path parts
    (the order of sorted Path objects), without building a list of every file first. Symlinked folders are
    followed once each. Hidden entries (names starting with a dot, such as macOS's ._ resource forks) and the
    folders archivers and NAS software add (__MACOSX, @eaDir) are not images and are left out. others, if given,
    counts the files left out for an image extension this package does not read (OTHER_IMAGE_EXTENSIONS)."""
    seen: set[str] = set()

    def visit(path: str, prefix: str) -> Iterator[tuple[str, int]]:
        real = os.path.realpath(path)
        if real in seen:
            return
        seen.add(real)
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            if entry.name.startswith(".") or entry.name in SYSTEM_FOLDERS:
                continue
            if entry.is_dir():
                yield from visit(entry.path, f"{prefix}{entry.name}/")
            elif (ext := os.path.splitext(entry.name)[1].lower()) in IMAGE_EXTENSIONS and entry.is_file():
                yield f"{prefix}{entry.name}", entry.stat().st_size
            elif others is not None and ext in OTHER_IMAGE_EXTENSIONS:
                others[ext] += 1

    yield from visit(str(folder), "")


def warn_other_images(folder: Path, others: Counter) -> None:
    if others:
        found = ", ".join(f"{count} {ext}" for ext, count in sorted(others.items()))
        log.warning("%s: left out %s file(s), which are not read (images: %s); convert them to PNG to use them",
                    folder, found, ", ".join(IMAGE_EXTENSIONS))


def image_table(root: Path) -> FileTable:
    """Every image under root (recursive, sorted), listed without reading a pixel; an error naming root when none.
    Files of other image formats are counted in a warning."""
    others: Counter = Counter()
    table = FileTable.build(walk_images(root, others))
    warn_other_images(root, others)
    if not len(table):
        raise no_images_error(root, "data.root")
    return table


def no_images_error(folder: Path, key: str) -> FileNotFoundError:
    return FileNotFoundError(f"{key}: no images in {folder.resolve()} (looked recursively for "
                             f"{', '.join(IMAGE_EXTENSIONS)}, any case)")


def list_images(folder: Path, key: str = "data.root") -> list[Path]:
    """Image files under folder, recursively, in sorted (deterministic) order; an error if there are none."""
    others: Counter = Counter()
    files = [folder / name for name, _ in walk_images(folder, others)]
    warn_other_images(folder, others)
    if not files:
        raise no_images_error(folder, key)
    return files


class FileTable:
    """Relative file names in one UTF-8 byte array with offsets, and their sizes in bytes: no Python object per
    file, so a million names cost about their length plus 16 bytes each, and DataLoader workers share them."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray, sizes: np.ndarray):
        self.blob, self.offsets, self.sizes = blob, offsets, sizes

    @classmethod
    def build(cls, entries: Iterator[tuple[str, int]]) -> "FileTable":
        blob, offsets, sizes = bytearray(), array("q", [0]), array("q")
        for name, size in entries:
            blob += name.encode("utf-8", "surrogateescape")
            offsets.append(len(blob))
            sizes.append(size)
        return cls(np.frombuffer(bytes(blob), dtype=np.uint8), np.asarray(offsets, dtype=np.int64),
                   np.asarray(sizes, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.sizes)

    def name(self, i: int) -> str:
        return self.blob[self.offsets[i]: self.offsets[i + 1]].tobytes().decode("utf-8", "surrogateescape")

    def __iter__(self) -> Iterator[str]:
        return (self.name(i) for i in range(len(self)))

    def take(self, rows: np.ndarray) -> "FileTable":
        """The table of the given rows, in their order."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, lengths = self.offsets[rows], self.offsets[rows + 1] - self.offsets[rows]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        positions = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
        return FileTable(self.blob[positions], offsets, self.sizes[rows])

    def head(self, n: int | None) -> "FileTable":
        return self if n is None or n >= len(self) else self.take(np.arange(n))

    def update_hash(self, h: "hashlib._Hash") -> None:
        """Names and sizes, in order, into a hash (the data fingerprint: no pixels read)."""
        h.update(np.int64(len(self)).tobytes())
        h.update(self.offsets.tobytes())
        h.update(self.blob.tobytes())
        h.update(self.sizes.tobytes())


class FilePaths(Sequence):
    """The files of a table as Paths under root (built on access)."""

    def __init__(self, root: Path, table: FileTable):
        self.root, self.table = root, table

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.root / self.table.name(i)


# ---- reading one image ------------------------------------------------------------------------------------------
def orientation(img: Image.Image) -> int:
    """The image's orientation tag (EXIF, or XMP alone), 1 to 8; 1 (as stored) where it has none, or where its EXIF
    block cannot be parsed or holds another value: such a file's pixels are still the image."""
    if not any(key in img.info for key in ORIENTATION_SOURCES):     # else getexif() would decode a PNG
        return 1
    try:
        value = img.getexif().get(EXIF_ORIENTATION, 1)
    except (struct.error, TypeError, KeyError, *UNREADABLE):
        return 1
    return value if isinstance(value, int) and value in UPRIGHT else 1


def inspect_image(path: str | Path | io.BytesIO) -> tuple[int, int]:
    """(width, height) as the image will be decoded (after EXIF rotation), from its header: no pixels are decoded,
    except the alpha band of images that have one. ImageDataError for an image that cannot be a sample (animated,
    smaller than 2x2, fully transparent); what PIL raises (UNREADABLE) for a file it cannot read."""
    with Image.open(path) as img:
        w, h = img.size
        frames = getattr(img, "n_frames", 1)
        if frames > 1 and img.format != "MPO":          # MPO: a camera JPEG whose first frame is the photograph
            raise ImageDataError(f"{path}: an animated image ({frames} frames); use still images (e.g. save its "
                                 "first frame as PNG)")
        if orientation(img) in (5, 6, 7, 8):           # rotated by 90 degrees
            w, h = h, w
        if w < 2 or h < 2:
            raise ImageDataError(f"{path}: {w}x{h} pixels (W x H); images need at least 2x2")
        if img.mode in ALPHA_MODES or "transparency" in img.info:
            if img.convert("RGBA").getchannel("A").getextrema()[1] == 0:
                raise ImageDataError(f"{path}: fully transparent (alpha 0 everywhere): no visible pixels")
    return w, h


def is_grey(path: str | Path) -> bool | None:
    """Whether an image holds no colour: a grey mode, or channels equal within GREY_TOLERANCE, decoded at most
    64 px wide (JPEG decodes at a reduced scale). None for a file that cannot be read."""
    try:
        with Image.open(path) as img:
            if img.mode in ("1", "L", "LA", "I", "F") or img.mode.startswith("I;16"):
                return True
            img.thumbnail((64, 64))
            rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
    except UNREADABLE:
        return None
    return int(np.abs(rgb - rgb[..., :1]).max()) <= GREY_TOLERANCE


def check_colour(files: Sequence[Path], root: Path) -> None:
    """Colorization learns colours from colour targets: an error when the COLOUR_CHECKS images spread over the set
    are all grey, a warning naming the grey ones when some are."""
    picks = np.unique(np.linspace(0, len(files) - 1, min(len(files), COLOUR_CHECKS)).round().astype(np.int64))
    paths = [files[int(i)] for i in picks]
    with ThreadPool(HEADER_THREADS) as pool:
        found = pool.map(is_grey, paths)
    grey = [str(path) for path, g in zip(paths, found) if g]
    checked = sum(g is not None for g in found)
    if grey and len(grey) == checked:
        raise ImageDataError(f"data.task=colorization learns colours from colour images, but all {checked} images "
                             f"checked under {root} are grey (e.g. {grey[0]}); give a folder of colour images")
    if grey:
        shown = "\n  ".join(grey[:10]) + (f"\n  ... and {len(grey) - 10} more" if len(grey) > 10 else "")
        warnings.warn(f"{len(grey)} of {checked} images checked under {root} are grey: colorization trains toward "
                      f"grey outputs on such images; remove them for colourful results:\n  {shown}", stacklevel=3)


def decode_upright(path: str | Path | io.BytesIO) -> Image.Image:
    """The file decoded fully (so corrupt or truncated files fail here) and turned upright by its orientation tag;
    16-bit grey rescaled to 8 bits (PIL's convert would clip it), its transparent value, if any, as alpha (LA)."""
    with Image.open(path) as img:
        img.load()
        turn = UPRIGHT.get(orientation(img))
        img = img.transpose(turn) if turn is not None else img
        if not (img.mode.startswith("I;16") or img.mode == "I"):  # "I": how older Pillow opens 16-bit PNG
            return img
        raw = np.asarray(img)
        grey = Image.fromarray((raw.astype(np.float32) / 257.0).round().clip(0, 255).astype(np.uint8))
        clear = img.info.get("transparency")
        if not isinstance(clear, int):
            return grey
        return Image.merge("LA", (grey, Image.fromarray(np.where(raw == clear, 0, 255).astype(np.uint8))))


def open_image(path: str | Path | io.BytesIO, channels: int) -> Image.Image:
    """decode_upright, converted to L (channels 1) or RGB (channels 3). Transparent pixels are composited onto white:
    the colours a file keeps under alpha 0 are arbitrary."""
    img = decode_upright(path)
    if img.mode in ALPHA_MODES or "transparency" in img.info:
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    return img.convert("L" if channels == 1 else "RGB")


def decode_sample(sources: Sequence[str | bytes | memoryview], channels: int, side_by_side: bool,
                  name: str) -> list[Image.Image]:
    """One sample's image, or its pair (A, B), decoded from its file(s), given as paths or as the files' bytes: one or
    two PIL images of the same size. ImageDataError for a file that cannot be a sample (the checks of inspect_image;
    an A|B pair whose sides differ in size), what PIL raises (UNREADABLE) for one it cannot read."""
    images = []
    for source in sources:
        file = (lambda: source) if isinstance(source, (str, os.PathLike)) else (lambda: io.BytesIO(source))
        inspect_image(file())
        images.append(open_image(file(), channels))
    if len(images) == 2 and images[0].size != images[1].size:
        (wa, ha), (wb, hb) = images[0].size, images[1].size
        raise ImageDataError(f"{name}: A and B differ in size ({wa}x{ha} vs {wb}x{hb}, W x H)")
    return split_pair(images[0], name) if side_by_side else images


def resize_crop(img: Image.Image, size: int | tuple[int, int] | None, scale: float = 1.0,
                shift: tuple[float, float] | None = None) -> Image.Image:
    """Resize so the image covers size (S for S x S, or (W, H); None: its own size) times scale, keeping its aspect
    ratio, then crop to size: centred, or at shift = (fx, fy) in [0, 1) of the slack (a random crop). Only the
    window kept is resampled (PIL's resize box), so a very elongated image is never resized whole."""
    w, h = img.size
    tw, th = (w, h) if size is None else (size, size) if isinstance(size, int) else size
    s = scale * max(tw / w, th / h)
    nw, nh = max(tw, round(w * s)), max(th, round(h * s))
    if shift is None:
        left, top = (nw - tw) // 2, (nh - th) // 2
    else:
        left, top = min(int(shift[0] * (nw - tw + 1)), nw - tw), min(int(shift[1] * (nh - th + 1)), nh - th)
    if (nw, nh) == (w, h):
        return img.crop((left, top, left + tw, top + th))
    sx, sy = w / nw, h / nh                                      # the window in the source's pixels
    return img.resize((tw, th), Image.BICUBIC, box=(left * sx, top * sy, (left + tw) * sx, (top + th) * sy))


def to_tensor(img: Image.Image) -> Tensor:
    """PIL L/RGB -> float [C, H, W] in [0, 1]."""
    return to_uint8(img).float() / 255.0


def to_uint8(img: Image.Image) -> Tensor:
    """PIL L/RGB -> uint8 [C, H, W]."""
    a = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(a[None].copy() if a.ndim == 2 else a.transpose(2, 0, 1).copy())


@dataclass(frozen=True)
class Augment:
    """Training augmentation (data.augment.*): resize to crop_scale x the image size and crop a random image-size
    window (1: centre crop, no randomness), and flip left-right with probability 1/2 (hflip). Validation and test
    never augment."""

    crop_scale: float = 1.0
    hflip: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.crop_scale, (int, float)) and 1 <= self.crop_scale <= 4):
            raise ValueError(f"data.augment.crop_scale must be a number in [1, 4] (1: no random crop); got {self.crop_scale!r}")
        if not isinstance(self.hflip, bool):
            raise ValueError(f"data.augment.hflip must be true or false; got {self.hflip!r}")

    @classmethod
    def parse(cls, value: Mapping | None) -> "Augment":
        if value is None:
            return cls()
        if not isinstance(value, Mapping):
            raise ValueError(f"data.augment must be a mapping with crop_scale and hflip; got {value!r}")
        unknown = sorted(set(value) - {"crop_scale", "hflip"})
        if unknown:
            raise ValueError(f"data.augment: unknown key(s) {unknown}; known: crop_scale, hflip")
        return cls(**{k: value[k] for k in value})

    @property
    def active(self) -> bool:
        return self.crop_scale > 1 or self.hflip


def make_item(images: list[Image.Image], row: int, key: int, epoch: int | None, seed: int | None, fixed_seed: int,
              size: tuple[int, int], augment: Augment | None, swap: bool = False) -> dict[str, Any]:
    """A dataset item from the decoded image (or pair A, B) of a row: resized and cropped to size (W, H), with a
    random crop and flip for a training draw (epoch not None) when augment asks, the same for A and B, as uint8.
    "seed" is the draw's seed (per (seed, key, epoch) in training, (fixed_seed, key) otherwise); the collate
    function draws the degradation from it."""
    draw = sample_seed(fixed_seed, key) if epoch is None else sample_seed(seed, key, 0, epoch)
    shift, flip, scale = None, False, 1.0
    if epoch is not None and augment is not None and augment.active:
        g = torch.Generator().manual_seed(sample_seed(draw, 0, AUGMENT_STREAM))
        fx, fy, coin = torch.rand(3, generator=g).tolist()           # one draw for A and B: they stay aligned
        scale, flip = augment.crop_scale, augment.hflip and coin < 0.5
        shift = (fx, fy) if scale > 1 else None
    out = []
    for img in images:
        img = resize_crop(img, size, scale, shift)
        out.append(to_uint8(img.transpose(Image.FLIP_LEFT_RIGHT) if flip else img))
    if len(out) == 1:
        return {"y": out[0], "index": row, "seed": draw}
    a, b = out[::-1] if swap else out
    return {"x": a, "y": b, "index": row, "seed": draw}


def split_pair(img: Image.Image, name: str) -> list[Image.Image]:
    """An A|B image as its halves [A, B]."""
    w, h = img.size
    if w % 2 or w < 4:
        raise ImageDataError(f"{name}: an A|B image needs an even width to split in half"
                             f"{' (and halves of at least 2x2)' if w < 4 else ''}; got {w}x{h} (W x H)")
    return [img.crop((0, 0, w // 2, h)), img.crop((w // 2, 0, w, h))]


class ImageFileDataset(Dataset):
    """One split of an image folder: relative names (FileTable), each row's key (its position in the sorted file
    list, which seeds its fixed degradation), and how to read it. Items are uint8: {"y", "index", "seed"} for a
    single image (the collate function degrades y with the seed), {"x", "y", "index", "seed"} for a pair."""

    def __init__(self, root: str | Path, names: FileTable, keys: np.ndarray, size: tuple[int, int], channels: int,
                 fixed_seed: int = 0, names_b: FileTable | None = None, side_by_side: bool = False,
                 swap: bool = False, augment: Augment | None = None, split: str = "data"):
        self.root, self.names, self.names_b, self.keys = str(root), names, names_b, np.asarray(keys, dtype=np.int64)
        self.size, self.channels, self.fixed_seed = tuple(size), channels, fixed_seed
        self.side_by_side, self.swap, self.augment = side_by_side, swap, augment
        self.label, self.split = None, split
        self.skipped: set[int] = set()                 # rows found unreadable by this copy (one per worker)

    def __len__(self) -> int:
        return len(self.names)

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.names.name(i))

    def describe(self, i: int) -> str:
        return self.path(i) if self.names_b is None else f"{self.path(i)} / {os.path.join(self.root, self.names_b.name(i))}"

    def decode(self, i: int) -> list[Image.Image]:
        """The image, or the pair (A, B), of row i, decoded: one or two PIL images of the same size. ImageDataError
        for a file that cannot be a sample (the checks setup makes with data.check_files=true)."""
        files = [self.path(i)] + ([] if self.names_b is None else [os.path.join(self.root, self.names_b.name(i))])
        return decode_sample(files, self.channels, self.side_by_side, self.describe(i))

    def load(self, i: int, epoch: int | None, seed: int | None) -> dict[str, Any]:
        return make_item(self.decode(i), i, int(self.keys[i]), epoch, seed, self.fixed_seed, self.size,
                         self.augment, self.swap)

    def __getitem__(self, key) -> dict[str, Any]:
        row, epoch, seed = draw_key(key)
        n, i, stand_ins = len(self), row, None
        if not 0 <= row < n:
            raise IndexError(f"row {row} of the {self.split} split, which holds {n}")
        while len(self.skipped) < n:
            if i not in self.skipped:
                try:
                    return self.load(i, epoch, seed)
                except UNREADABLE as err:               # ImageDataError too: the file changed since setup
                    self.skipped.add(i)
                    warnings.warn(f"skipping unreadable image {self.describe(i)} ({type(err).__name__}: {err}); "
                                  "a readable image drawn at random stands in for it", stacklevel=2)
            if stand_ins is None:
                # rows drawn from the draw's own key: the same stand-in on every worker and after a resume, and
                # a run of unreadable files does not pile its draws onto one neighbour
                stand_ins = np.random.default_rng([row, 0 if epoch is None else epoch + 1, (seed or 0) % 2**64])
            i = int(stand_ins.integers(n))
        raise RuntimeError(f"no readable image left in the {self.split} split under {self.root}: all {n} file(s) "
                           f"failed to decode, e.g. {self.describe(row)} (see the warnings above)")


class ImageBatch:
    """collate_fn of the folder datamodules: uint8 items -> the float batch {"x", "y", "index"} in [0, 1]; a single
    image's x is degradation(y), each item drawing from its own seed (fresh per training draw, fixed otherwise)."""

    def __init__(self, degradation: Degradation | None):
        self.degradation = degradation

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Tensor]:
        items = [item for item in items if item is not None]       # a streamed sample that failed to decode
        if not items:
            raise RuntimeError("a whole batch of images failed to decode (see the warnings above naming them)")
        y = torch.stack([item["y"] for item in items]).float().div_(255)
        index = torch.tensor([item["index"] for item in items], dtype=torch.long)
        if self.degradation is None:
            x = torch.stack([item["x"] for item in items]).float().div_(255)
        else:
            x = self.degradation.apply_seeded(y, [item["seed"] for item in items])
        return {"x": x, "y": y, "index": index}


# ---- the datamodules ----------------------------------------------------------------------------------------------
class FolderDataModule(SplitDataModule):
    """Shared by the folder datamodules: listing, header checks, splits (each non-zero split takes at least one
    image) and the lazy datasets. Subclasses list their samples (`list_samples`) and say what an item is."""

    kind = "image"

    def __init__(self, root: str | None = None, channels: int = 3, image_size: int | None = 64,
                 max_images: int | None = None, augment: Mapping | None = None, check_files: bool = False,
                 val_fraction: float = 0.05, test_fraction: float = 0.05, **kwargs):
        super().__init__(val_fraction=val_fraction, test_fraction=test_fraction, **kwargs)   # as the yaml and convert
        if channels not in (1, 3):
            raise ValueError(f"data.channels must be 1 (grey) or 3 (RGB); got {channels!r}")
        if image_size is not None and (not isinstance(image_size, int) or image_size < 2):
            raise ValueError(f"data.image_size must be a positive number of pixels (at least 2) or null; got {image_size!r}")
        from cgml_lightning.models.base import check_flags        # models import data: imported here

        check_flags({"data.check_files": check_files})
        self.root, self.channels, self.image_size, self.max_images = root, channels, image_size, max_images
        self.augment, self.check_files = Augment.parse(augment), check_files
        self.tables: tuple[FileTable, ...] = ()     # the file(s) behind each kept sample, in sample order
        self.size: tuple[int, int] | None = None    # (W, H) of every sample
        self._fingerprint = ""

    # subclasses
    def list_samples(self, root: Path) -> tuple[FileTable, ...]:
        raise NotImplementedError

    def check_sample(self, paths: list[str], sizes: list[tuple[int, int]]) -> tuple[int, int]:
        """(W, H) of a sample from its files' header sizes; ImageDataError when they do not fit together."""
        return sizes[0]

    def dataset_options(self) -> dict[str, Any]:
        return {}

    @property
    def files(self) -> FilePaths:
        """The (first) file of each kept sample, in sample order (before the split), as Paths."""
        self.setup()
        return FilePaths(check_root(self.root), self.tables[0])

    def inspect(self, root: Path, tables: tuple[FileTable, ...], rows: np.ndarray | None = None,
                strict: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Headers of the samples at rows (default: all) in threads: (the rows kept, their (W, H) [n, 2]).
        Unreadable files are dropped with one warning naming them; misfits are one ImageDataError naming every one
        (strict), or dropped with them (strict=False: the run-time rule)."""
        rows = np.arange(len(tables[0])) if rows is None else np.asarray(rows, dtype=np.int64)

        def check(i: int):
            paths = [os.path.join(root, t.name(i)) for t in tables]
            sizes: list[tuple[int, int]] = []
            try:
                for p in paths:
                    sizes.append(inspect_image(p))
                return self.check_sample(paths, sizes)
            except ImageDataError as err:                    # a ValueError, so caught before UNREADABLE
                return ImageDataError(str(err))              # names the file
            except UNREADABLE as err:                        # only headers raise these: the file after those read
                return f"{paths[len(sizes)]} ({type(err).__name__}: {err})"

        sizes = np.zeros((len(rows), 2), dtype=np.int64)
        kept = np.zeros(len(rows), dtype=bool)
        bad: list[str] = []
        misfits: list[str] = []
        with ThreadPool(HEADER_THREADS) as pool:
            for j, result in enumerate(pool.imap(check, rows.tolist(), chunksize=64)):
                if isinstance(result, ImageDataError):
                    (misfits if strict else bad).append(str(result))
                elif isinstance(result, str):
                    bad.append(result)
                else:
                    kept[j], sizes[j] = True, result
        if misfits:
            shown = "\n  ".join(misfits[:20]) + (f"\n  ... and {len(misfits) - 20} more" if len(misfits) > 20 else "")
            raise ImageDataError(misfits[0] if len(misfits) == 1 else
                                 f"{len(misfits)} files under {root} cannot be samples:\n  {shown}")
        if bad:
            shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
            what = "unreadable image(s)" if strict else "unreadable or unusable image(s)"
            warnings.warn(f"skipping {len(bad)} {what} under {root}:\n  {shown}", stacklevel=3)
        return rows[kept], sizes[kept]

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        root = check_root(self.root)
        tables = tuple(t.head(self.max_images) for t in self.list_samples(root))
        if self.image_size is None or self.check_files:
            rows, sizes = self.inspect(root, tables)
            if not len(rows):
                raise ValueError(f"no readable images under {root}: all {len(tables[0])} file(s) failed to decode")
            tables = tuple(t.take(rows) for t in tables)
        else:
            rows = np.arange(len(tables[0]))
        if self.image_size is None:
            different = np.flatnonzero((sizes != sizes[0]).any(1))
            if len(different):
                i, c = different[0], self.channels
                what = "image" if len(tables) == 1 and not self.dataset_options().get("side_by_side") else "A|B pair"
                raise ImageDataError(f"{root / tables[0].name(i)}: {what} shape {(c, int(sizes[i][1]), int(sizes[i][0]))} "
                                     f"differs from {(c, int(sizes[0][1]), int(sizes[0][0]))} ({root / tables[0].name(0)}); "
                                     "set data.image_size to resize every image to one size")
            self.size = (int(sizes[0][0]), int(sizes[0][1]))
        else:
            self.size = (self.image_size, self.image_size)
        n = len(rows)
        n_val, n_test = split_sizes(n, self.val_fraction, self.test_fraction, str(self.root), "image")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed)).numpy()
        parts = {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": np.sort(order[n_val + n_test:])}
        if self.max_train_samples is not None:
            parts["train"] = parts["train"][: self.max_train_samples]
        if not (self.image_size is None or self.check_files):
            # small evaluation splits (a fraction of a second of headers) are checked now: a bad file there is
            # dropped before training, instead of leaving a one-image test split with nothing to evaluate at the end
            for k in ("val", "test"):
                if 0 < len(parts[k]) <= EVAL_HEADERS_AT_SETUP:
                    parts[k] = self.inspect(root, tables, parts[k], strict=False)[0]
                    if not len(parts[k]):
                        raise ValueError(f"the {k} split under {root} holds no readable image; add images or "
                                         f"change data.{k}_fraction")
        h = hashlib.sha256()
        for t in tables:
            t.take(parts["train"]).update_hash(h)
        self.tables, self._fingerprint = tables, h.hexdigest()[:16]
        self.splits = {k: self.make_dataset(root, rows_, k) for k, rows_ in parts.items()}
        counts = [len(parts[k]) for k in ("train", "val", "test")]
        left_out = f"; {n - sum(counts)} left out by data.max_train_samples or as unusable" if sum(counts) < n else ""
        log.info("%s: %d samples under %s: %d train, %d val, %d test (data.val_fraction, data.test_fraction%s)",
                 type(self).__name__, n, root, *counts, left_out)

    def make_dataset(self, root: Path, rows: np.ndarray, split: str) -> ImageFileDataset:
        names = [t.take(rows) for t in self.tables]
        return ImageFileDataset(root, names[0], rows, self.size, self.channels, self.split_seed,
                                names_b=names[1] if len(names) > 1 else None,
                                augment=self.augment if split == "train" else None, split=split,
                                **self.dataset_options())

    def shapes(self) -> tuple[list[int], list[int]]:
        """(x_shape, y_shape), from the sample size and the task: nothing is decoded."""
        w, h = self.size
        return [self.channels, h, w], [self.channels, h, w]

    def info(self) -> dict[str, Any]:
        """What a module needs to build its nets and latent table: plain containers only."""
        self.setup()
        x_shape, y_shape = self.shapes()
        return {"kind": self.kind, "x_shape": x_shape, "y_shape": y_shape, "num_train_samples": len(self.splits["train"]),
                "mask_channel": self.mask_channel, "fingerprint": self._fingerprint, **self.degradation_info()}


class ImageFolderDataModule(FolderDataModule):
    """data=image_folder: every image under data.root (recursive; grey or RGB via data.channels), resized on its
    shorter side to data.image_size and centre-cropped (randomly cropped and flipped in training per data.augment),
    becomes y; x = degrade(y) for data.task, drawn afresh per training draw and fixed per sample for val/test."""

    def __init__(self, root: str | None = None, **kwargs):
        self.degradation = Degradation.pop_from(kwargs)
        super().__init__(root=root, **kwargs)
        self.mask_channel = self.degradation.mask_channel
        if self.degradation.task == "colorization" and self.channels != 3:
            raise ValueError(f"data.task=colorization needs data.channels=3 (RGB targets); got {self.channels}")
        self.collate = ImageBatch(self.degradation)

    def list_samples(self, root: Path) -> tuple[FileTable, ...]:
        if (root / "A").is_dir() and (root / "B").is_dir():
            warnings.warn(f"{root}: holds A/ and B/, the layout of a paired folder, and data=image_folder reads the "
                          f"images of both as single images; for pairs use data=paired_folder (experiment="
                          f"paired_translation), or --paired to convert them for data=streaming", stacklevel=2)
        return (image_table(root),)

    def setup(self, stage: str | None = None) -> None:
        fresh = self.splits is None
        super().setup(stage)
        if fresh and self.degradation.task == "colorization":
            files = self.files
            check_colour(files, files.root)

    def shapes(self) -> tuple[list[int], list[int]]:
        w, h = self.size
        x = self.degradation(torch.zeros(1, self.channels, h, w), torch.Generator().manual_seed(0))
        return list(x.shape[1:]), [self.channels, h, w]

    def read(self, path: Path) -> Tensor:
        """One image as the datasets serve it for evaluation (centre crop), float [C, H, W] in [0, 1]."""
        return to_tensor(resize_crop(open_image(path, self.channels), self.image_size))


class PairedFolderDataModule(FolderDataModule):
    """data=paired_folder, image-to-image translation with x = A, y = B (direction=BtoA swaps them). data.root holds
    either A|B images side by side (pix2pix: each image is split in half across its width), or subfolders A/ and
    B/ with matching file names (extension aside). layout: auto | side_by_side | folders. A training draw crops and
    flips A and B alike."""

    degradation = Degradation(task="identity")          # x is image A as it is

    def __init__(self, root: str | None = None, layout: str = "auto", direction: str = "AtoB", **kwargs):
        super().__init__(root=root, **kwargs)
        if layout not in ("auto", "side_by_side", "folders"):
            raise ValueError(f"data.layout must be auto, side_by_side or folders; got {layout!r}")
        if direction not in ("AtoB", "BtoA"):
            raise ValueError(f"data.direction must be AtoB or BtoA; got {direction!r}")
        self.layout, self.direction = layout, direction
        self.side_by_side = True
        self.collate = ImageBatch(None)

    def dataset_options(self) -> dict[str, Any]:
        return {"side_by_side": self.side_by_side, "swap": self.direction == "BtoA"}

    def list_samples(self, root: Path) -> tuple[FileTable, ...]:
        has_a, has_b = (root / "A").is_dir(), (root / "B").is_dir()
        if self.layout == "folders" and not (has_a and has_b):
            raise FileNotFoundError(f"data.layout=folders needs subfolders A/ and B/ in {root.resolve()}")
        if self.layout == "auto":
            check_auto_layout(root, has_a, has_b)
        self.side_by_side = not (self.layout == "folders" or (self.layout == "auto" and has_a and has_b))
        if not self.side_by_side:
            return pair_tables(root)
        table = image_table(root)
        if self.layout == "auto":
            warn_if_not_side_by_side([root / table.name(i) for i in range(min(len(table), 10))])
        return (table,)

    def check_sample(self, paths: list[str], sizes: list[tuple[int, int]]) -> tuple[int, int]:
        if self.side_by_side:
            w, h = sizes[0]
            if w % 2 or w < 4:
                raise ImageDataError(f"{paths[0]}: an A|B image needs an even width to split in half"
                                     f"{' (and halves of at least 2x2)' if w < 4 else ''}; got {w}x{h} (W x H)")
            return w // 2, h
        (aw, ah), (bw, bh) = sizes
        if (aw, ah) != (bw, bh):
            raise ImageDataError(f"{paths[0]} and {paths[1]}: A and B differ in size ({aw}x{ah} vs {bw}x{bh}, "
                                 "W x H); a pair must be pixel-aligned")
        return aw, ah


def check_auto_layout(root: Path, has_a: bool, has_b: bool) -> None:
    """data.layout=auto reads A/ + B/ as pairs and anything else as A|B images: refuse the folder layouts that would
    be split in half by mistake (one of A/ and B/ alone; two sides named otherwise, as trainA/ and trainB/)."""
    if has_a != has_b:
        raise FileNotFoundError(f"{root.resolve()}: holds {'A/' if has_a else 'B/'} but no {'B/' if has_a else 'A/'}; "
                                "paired folders need both, with the same file names (data.layout=side_by_side reads "
                                "every image under data.root as A|B halves instead)")
    if has_a:
        return
    with os.scandir(root) as entries:
        subfolders = {e.name for e in entries if e.is_dir()}
    for name in sorted(subfolders):
        other = name[:-1] + {"A": "B", "a": "b"}.get(name[-1:], "")
        if name[-1:] in ("A", "a") and other in subfolders:
            raise ValueError(f"{root.resolve()}: subfolders {name}/ and {other}/ look like the two sides of a paired "
                             f"set, but data=paired_folder reads pairs from A/ and B/ (the same file names); rename "
                             f"them A/ and B/ if their files are pairs, or set data.layout=side_by_side if they hold "
                             f"A|B images")


def warn_if_not_side_by_side(paths: list[Path]) -> None:
    """One header: an A|B image is about twice as wide as high; warn when the first readable one of `paths` (the
    first files) is not. An unreadable file is named when a worker skips it."""
    for path in paths:
        try:
            w, h = inspect_image(path)
            break
        except UNREADABLE:
            continue
    else:
        return
    if w < 1.5 * h:
        warnings.warn(f"{path}: {w}x{h} (W x H) is not about twice as wide as high, yet data=paired_folder splits "
                      "every image under data.root into its left (A) and right (B) halves; for separate A and B "
                      "files use subfolders A/ and B/", stacklevel=3)


def pair_tables(root: Path) -> tuple[FileTable, FileTable]:
    """(A files, B files) matched by relative name without extension (Unicode-normalised: café matches café, however
    each is encoded), in sorted order of those names; an error listing names found on one side only, or twice on
    one side (a.png beside a.jpg)."""
    sides = []
    for s in ("A", "B"):
        found: dict[str, tuple[str, int]] = {}
        others: Counter = Counter()
        for name, size in walk_images(root / s, others):
            stem = unicodedata.normalize("NFC", os.path.splitext(name)[0])     # macOS writes names decomposed (NFD)
            if stem in found:
                raise ValueError(f"{root / s / found[stem][0][2:]} and {root / s / name}: one name with two "
                                 f"extensions in {s}/; pairs are matched by name without extension, so keep one")
            found[stem] = (f"{s}/{name}", size)
        warn_other_images(root / s, others)
        if not found:
            raise no_images_error(root / s, f"data.root/{s}")
        sides.append(found)
    only = [(s, sorted(set(sides[i]) - set(sides[1 - i]))) for i, s in enumerate("AB")]
    if any(names for _, names in only):
        detail = "; ".join(f"only in {s}/: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                           for s, names in only if names)
        raise ValueError(f"{root}: A/ and B/ must hold the same file names (extension aside); {detail}")
    stems = sorted(sides[0], key=lambda stem: stem.split("/"))
    return FileTable.build(sides[0][k] for k in stems), FileTable.build(sides[1][k] for k in stems)
