"""Image datamodules: folders (gray/RGB, nested, corrupt, empty), paired folders (both layouts), Fashion-MNIST's idx
reader (fake files in tmp_path; the real set when installed), every bad-input message, and the image experiments'
Hydra configs (compose + setup; one end-to-end cgml-train run when Fashion-MNIST is installed)."""
from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from PIL import Image

from cgml_lightning.data import FashionMNISTDataModule, ImageFolderDataModule, PairedFolderDataModule
from cgml_lightning.data import fashion_mnist
from cgml_lightning.data.degradations import sample_seed, stroke_mask
from cgml_lightning.data.folders import ImageDataError
from cgml_lightning.data.fashion_mnist import find_files, read_idx
from cgml_lightning.instantiate import instantiate

REAL_FMNIST = find_files(None) is not None       # Debian's /usr/share/datasets/fashion-mnist
needs_fmnist = pytest.mark.skipif(not REAL_FMNIST, reason="Fashion-MNIST not installed "
                                  "(apt-get install dataset-fashion-mnist puts it in /usr/share/datasets/fashion-mnist)")
SMALL = {"batch_size": 4, "eval_batch_size": 4, "val_fraction": 0.2, "test_fraction": 0.2}


# ---- helpers: tiny image sets written with PIL -------------------------------------------------------------------
def pixels(seed: int, size: tuple[int, int], channels: int) -> np.ndarray:
    shape = (size[1], size[0]) + ((channels,) if channels == 3 else ())
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def write_images(folder: Path, n: int, size=(20, 16), mode: str = "RGB", ext: str = "png", seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img_{seed}_{i:03d}.{ext}"
        Image.fromarray(pixels(seed * 1000 + i, size, 3 if mode == "RGB" else 1)).convert(mode).save(path)
        paths.append(path)
    return paths


def write_corrupt(folder: Path) -> tuple[Path, Path]:
    """A non-image with an image extension, and a truncated PNG."""
    junk = folder / "junk.png"
    junk.write_bytes(b"definitely not an image")
    whole = folder / "whole.png"
    Image.fromarray(pixels(99, (64, 64), 3)).save(whole)
    truncated = folder / "truncated.png"
    truncated.write_bytes(whole.read_bytes()[:200])
    whole.unlink()
    return junk, truncated


@pytest.fixture
def rgb_tree(tmp_path) -> Path:
    """10 RGB + 2 gray images across nested folders and extensions, plus a non-image file."""
    root = tmp_path / "faces"
    write_images(root / "a", 4, ext="png")
    write_images(root / "b" / "deep", 4, ext="jpg", seed=1)
    write_images(root / "c", 2, ext="webp", seed=2)
    write_images(root / "c", 2, mode="L", ext="bmp", seed=3)
    (root / "notes.txt").write_text("not an image")
    return root


def make(cls, root, **kwargs):
    dm = cls(root=str(root), **{**SMALL, **kwargs})
    dm.setup()
    return dm


def split_batch(dm, split: str) -> dict:
    """Every sample of a split as one batch, as its loader would serve it (fixed degradation, no augmentation)."""
    data = dm.splits[split]
    return dm.collate([data[i] for i in range(len(data))])


# ---- resizing and cropping ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,scale,shift", [((100, 80), 1.0, None), ((50, 120), 1.0, None),
                                              ((300, 200), 1.5, (0.2, 0.7)), ((64, 64), 1.3, (0.9, 0.1))])
def test_resize_crop_gives_the_window_of_the_resized_image(size, scale, shift):
    """The kept window, resampled alone, matches resizing the whole image and cropping it (a smooth image: equal
    up to rounding at the window's edge)."""
    from cgml_lightning.data.folders import resize_crop

    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = Image.fromarray(np.stack([255 * xx / w, 255 * yy / h, 128 + 0 * xx], -1).astype(np.uint8))
    got = np.asarray(resize_crop(img, 32, scale, shift), dtype=int)
    s = scale * max(32 / w, 32 / h)
    nw, nh = max(32, round(w * s)), max(32, round(h * s))
    left, top = ((nw - 32) // 2, (nh - 32) // 2) if shift is None else (
        min(int(shift[0] * (nw - 31)), nw - 32), min(int(shift[1] * (nh - 31)), nh - 32))
    whole = np.asarray(img.resize((nw, nh), Image.BICUBIC).crop((left, top, left + 32, top + 32)), dtype=int)
    assert got.shape == (32, 32, 3) and np.abs(got - whole).max() <= 2


def test_resize_crop_never_resizes_an_elongated_image_whole(monkeypatch):
    from cgml_lightning.data.folders import resize_crop

    sizes, resize = [], Image.Image.resize

    def recorded(self, size, *args, **kwargs):
        sizes.append(size)
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recorded)
    assert resize_crop(Image.new("RGB", (30000, 2), "red"), 64).size == (64, 64)
    assert sizes == [(64, 64)]                                # not 960000 x 64


# ---- ImageFolderDataModule ----------------------------------------------------------------------------------------
def test_image_folder_rgb_nested_completion(rgb_tree):
    dm = make(ImageFolderDataModule, rgb_tree, image_size=12, mask="box")
    assert len(dm.files) == 12 and list(dm.files) == sorted(dm.files)
    assert {p.suffix for p in dm.files} == {".png", ".jpg", ".webp", ".bmp"}
    info = dm.info()
    assert info["kind"] == "image" and info["mask_channel"] is True
    assert info["x_shape"] == [4, 12, 12] and info["y_shape"] == [3, 12, 12]
    assert sum(len(s) for s in dm.splits.values()) == 12 and len(dm.splits["val"]) == len(dm.splits["test"]) == 2
    batch = next(iter(dm.train_dataloader()))
    x, y = batch["x"], batch["y"]
    assert y.min() >= 0 and y.max() <= 1 and y.dtype == torch.float32
    hole = x[:, -1:]
    assert torch.equal(x[:, :-1], y * (1 - hole))                     # visible pixels of y, hidden ones zeroed
    assert hole[:, :, 3:9, 3:9].all() and hole.sum() == len(x) * 36


def test_image_folder_gray_channels_and_resize(rgb_tree):
    dm = make(ImageFolderDataModule, rgb_tree, channels=1, image_size=8, task="identity")
    assert dm.info()["x_shape"] == [1, 8, 8] and dm.info()["mask_channel"] is False
    train = split_batch(dm, "train")
    assert torch.equal(train["x"], train["y"])
    rgb = ImageFolderDataModule(root=str(rgb_tree), image_size=None)               # gray files become 3 equal channels
    gray = rgb.read(next(p for p in dm.files if p.suffix == ".bmp"))
    assert gray.shape == (3, 16, 20) and torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    colour = rgb.read(dm.files[0])
    assert colour.shape == (3, 16, 20) and not torch.equal(colour[0], colour[1])


def test_image_folder_deterministic_order_splits_and_masks(rgb_tree):
    kw = dict(image_size=16, mask="strokes", split_seed=3)
    a, b = make(ImageFolderDataModule, rgb_tree, **kw), make(ImageFolderDataModule, rgb_tree, **kw)
    for split in ("train", "val", "test"):
        one, two = split_batch(a, split), split_batch(b, split)
        assert all(torch.equal(one[k], two[k]) for k in ("x", "y", "index"))
    # a plain row (val/test, or any DataLoader without the training sampler) gets the mask seeded by
    # (split_seed, its position in the sorted file list): the same on every pass
    for split in ("val", "train"):
        batch, keys = split_batch(a, split), a.splits[split].keys
        for row in (0, 1):
            expected = stroke_mask((16, 16), torch.Generator().manual_seed(sample_seed(3, int(keys[row]), 0)))
            assert torch.equal(batch["x"][row, -1:], expected)
        assert not torch.equal(batch["x"][0, -1], batch["x"][1, -1])
    c = make(ImageFolderDataModule, rgb_tree, image_size=16, mask="strokes", split_seed=4)
    assert not torch.equal(split_batch(a, "val")["y"], split_batch(c, "val")["y"])


@pytest.mark.parametrize("task,x_channels", [("colorization", 1), ("denoise", 3), ("superres", 3)])
def test_image_folder_tasks(rgb_tree, task, x_channels):
    dm = make(ImageFolderDataModule, rgb_tree, image_size=16, task=task, scale=4)
    train = split_batch(dm, "train")
    assert train["x"].shape[1:] == (x_channels, 16, 16) and train["y"].shape[1:] == (3, 16, 16)
    assert train["x"].min() >= 0 and train["x"].max() <= 1 and not dm.info()["mask_channel"]
    assert dm.info()["x_shape"] == [x_channels, 16, 16]


def test_colorization_checks_that_the_images_have_colour(tmp_path):
    """Grey files (grey modes, or RGB with equal channels) among colour ones are named in a warning; a folder of
    grey images only is refused for colorization, and is fine for other tasks."""
    mixed = tmp_path / "mixed"
    write_images(mixed, 6)
    write_images(mixed, 2, mode="L", seed=1)
    grey_jpeg = mixed / "grey_in_rgb.jpg"
    Image.fromarray(pixels(7, (20, 16), 1)).convert("RGB").save(grey_jpeg)
    with pytest.warns(UserWarning, match=r"3 of 9 images checked under .* are grey") as caught:
        make(ImageFolderDataModule, mixed, image_size=16, task="colorization")
    assert str(grey_jpeg) in str(caught[0].message) and "img_0_" not in str(caught[0].message)
    grey = tmp_path / "grey"
    write_images(grey, 5, mode="L")
    with pytest.raises(ImageDataError, match=r"colorization learns colours .* all 5 images checked under .* grey"):
        make(ImageFolderDataModule, grey, image_size=16, task="colorization")
    make(ImageFolderDataModule, grey, image_size=16, task="completion")


def test_image_folder_max_images(rgb_tree):
    dm = make(ImageFolderDataModule, rgb_tree, image_size=8, max_images=5, test_fraction=0.0)
    assert len(dm.files) == 5 and len(dm.splits["test"]) == 0


def test_corrupt_files_are_skipped_with_a_warning(rgb_tree):
    """data.check_files=true: a file whose header does not read is dropped at setup; a truncated one (its header
    reads) is skipped when a worker decodes it, and a readable row drawn from the draw's seed stands in."""
    junk, truncated = write_corrupt(rgb_tree / "a")
    with pytest.warns(UserWarning, match="skipping 1 unreadable image") as record:
        dm = make(ImageFolderDataModule, rgb_tree, image_size=8, val_fraction=0.0, test_fraction=0.0, check_files=True)
    assert str(junk) in str(record[0].message)
    assert len(dm.files) == 13 and junk not in dm.files and truncated in dm.files
    train = dm.splits["train"]
    row = list(dm.files).index(truncated)                           # train rows = the sorted files here
    with pytest.warns(UserWarning, match=rf"skipping unreadable image {truncated}"):
        item = train[row]
    assert item["index"] != row and item["index"] == train[row]["index"]  # another row stands in, with its index
    with pytest.warns(UserWarning, match="skipping 1 unreadable image"):
        fresh = make(ImageFolderDataModule, rgb_tree, image_size=8, val_fraction=0.0, test_fraction=0.0,
                     check_files=True)
    with pytest.warns(UserWarning, match=rf"skipping unreadable image {truncated}"):
        indices = torch.cat([batch["index"] for batch in fresh.train_dataloader()])   # a whole epoch: no crash
    assert len(indices) == 13 and set(indices.tolist()) == set(range(13)) - {row}


def test_all_corrupt_is_an_error(tmp_path):
    for name in ("a.png", "b.jpg"):
        (tmp_path / name).write_bytes(b"not an image")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no readable images under .*all 2 file"):
        make(ImageFolderDataModule, tmp_path, check_files=True)


def test_checked_files_name_every_misfit_at_once(tmp_path):
    """With data.check_files=true every file that cannot be a sample is named in one error, not one per run."""
    write_images(tmp_path, 6)
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(tmp_path / "tiny.png")
    Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(tmp_path / "clear.png")
    with pytest.raises(ImageDataError, match=r"2 files under .* cannot be samples") as err:
        make(ImageFolderDataModule, tmp_path, image_size=8, check_files=True)
    assert "tiny.png: 1x1 pixels" in str(err.value) and "clear.png: fully transparent" in str(err.value)


def test_images_of_other_formats_are_counted_in_a_warning(tmp_path, caplog):
    write_images(tmp_path, 3, size=(8, 8))
    for name in ("scan.TIF", "b.tif", "anim.gif"):
        Image.fromarray(pixels(0, (8, 8), 3)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image: not counted")
    with caplog.at_level("WARNING", logger="cgml_lightning"):
        dm = make(ImageFolderDataModule, tmp_path, image_size=8, val_fraction=0.0, test_fraction=0.0)
    assert len(dm.splits["train"]) == 3
    assert "left out 1 .gif, 2 .tif file(s)" in caplog.text and ".txt" not in caplog.text


def test_empty_folder_names_folder_and_extensions(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(FileNotFoundError) as err:
        make(ImageFolderDataModule, tmp_path)
    assert str(tmp_path.resolve()) in str(err.value) and "data.root" in str(err.value)
    for ext in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
        assert ext in str(err.value)


def test_missing_root_names_key_and_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.root: no such folder: .*nowhere"):
        make(ImageFolderDataModule, tmp_path / "nowhere")
    one = write_images(tmp_path, 1)[0]
    with pytest.raises(NotADirectoryError, match=rf"data.root: {one} is a file; give the folder"):
        make(ImageFolderDataModule, one)
    with pytest.raises(ValueError, match="data.root is required"):
        ImageFolderDataModule(root=None).setup()


def test_size_mismatch_without_resize(tmp_path):
    write_images(tmp_path, 3, size=(8, 8))
    odd = write_images(tmp_path / "z", 1, size=(10, 8), seed=5)[0]
    with pytest.raises(ValueError) as err:
        make(ImageFolderDataModule, tmp_path, image_size=None)
    assert str(odd) in str(err.value) and "(3, 8, 10)" in str(err.value) and "(3, 8, 8)" in str(err.value)
    assert "data.image_size" in str(err.value)


@pytest.mark.parametrize("kwargs,message", [
    ({"channels": 2}, "data.channels must be 1 .grey. or 3 .RGB.; got 2"),
    ({"channels": 1, "task": "colorization"}, "data.task=colorization needs data.channels=3"),
    ({"image_size": 0}, "data.image_size must be a positive"),
    ({"task": "deblur"}, "data.task must be one of"),
])
def test_bad_image_folder_options(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageFolderDataModule(root=str(tmp_path), **kwargs)


def test_hidden_files_and_archive_folders_are_not_images(tmp_path):
    """macOS's ._ resource forks (and the __MACOSX folder of a zip) carry image extensions but are not images."""
    write_images(tmp_path, 5)
    for folder in (tmp_path / "__MACOSX", tmp_path / "@eaDir", tmp_path / ".cache"):
        write_images(folder, 2)
    (tmp_path / "._img_0_000.png").write_bytes(b"\x00\x05\x16\x07" + bytes(80))
    listed = sorted(p.name for p in make(ImageFolderDataModule, tmp_path).files)
    assert listed == [f"img_0_{i:03d}.png" for i in range(5)]


def test_small_eval_splits_drop_bad_files_before_training(tmp_path):
    """Without data.check_files the headers of a small validation or test split are read at setup: a bad file there
    is dropped with a warning naming it, and a split left with none is an error naming the split, before training
    rather than at the final evaluation."""
    write_images(tmp_path, 19, size=(8, 8))
    (tmp_path / "img_9_bad.png").write_bytes(b"")
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=8, val_fraction=0.25, test_fraction=0.25, num_workers=0)
    with pytest.warns(UserWarning, match=r"(?s)skipping 1 unreadable or unusable image.*img_9_bad.png"):
        dm.setup()
    assert len(dm.splits["val"]) + len(dm.splits["test"]) == 9 and len(dm.splits["train"]) == 10
    assert not any("bad" in dm.splits[k].path(i) for k in ("val", "test") for i in range(len(dm.splits[k])))
    lone = ImageFolderDataModule(root=str(tmp_path), image_size=8, val_fraction=0.05, test_fraction=0.05,
                                 num_workers=0, split_seed=14)         # a one-image test split: the bad file
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="the test split under .* holds no readable image"):
        lone.setup()


def test_orientation_from_xmp_alone_turns_the_header_size(tmp_path):
    """A JPEG whose orientation (90 degrees) sits in XMP only: decoding rotates it, so its header size must too."""
    from cgml_lightning.data.folders import inspect_image, open_image

    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    Image.fromarray(pixels(0, (40, 20), 3)).save(tmp_path / "turned.jpg", xmp=xmp)
    assert inspect_image(tmp_path / "turned.jpg") == open_image(tmp_path / "turned.jpg", 3).size == (20, 40)


def damaged_exif(orientation: int) -> bytes:
    """An EXIF block that PIL parses but cannot write back (a RATIONAL tag stored as text), with an orientation."""
    entries = [(0x0112, 3, 1, struct.pack(">HH", orientation, 0)), (0x011B, 2, 4, b"abc\0")]
    ifd = struct.pack(">H", len(entries)) + b"".join(struct.pack(">HHI", tag, kind, count) + value
                                                     for tag, kind, count, value in entries) + struct.pack(">I", 0)
    return b"Exif\0\0MM\0*" + struct.pack(">I", 8) + ifd


def test_a_damaged_exif_block_still_turns_the_image(tmp_path):
    """PIL's exif_transpose raises a TypeError writing such a block back; the image is still read, and turned by
    the orientation it holds (6: 90 degrees), as its header size says."""
    from cgml_lightning.data.folders import inspect_image, open_image

    write_images(tmp_path, 4, size=(20, 16))
    Image.fromarray(pixels(0, (40, 20), 3)).save(tmp_path / "camera.jpg", exif=damaged_exif(6))
    assert inspect_image(tmp_path / "camera.jpg") == open_image(tmp_path / "camera.jpg", 3).size == (20, 40)
    dm = make(ImageFolderDataModule, tmp_path, image_size=8, val_fraction=0.0, test_fraction=0.0)
    data = dm.splits["train"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                 # read, not skipped
        items = [data[(i, 0, 0)] for i in range(len(data))]
    assert len(items) == 5 and not data.skipped


def test_sixteen_bit_grey_keeps_its_transparent_value(tmp_path):
    """A 16-bit grey PNG with a transparent value (tRNS): those pixels become white, as every transparent pixel."""
    from cgml_lightning.data.folders import open_image

    grey = np.full((6, 6), 1000, dtype=np.uint16)
    grey[:3] = 40000
    Image.fromarray(grey).save(tmp_path / "deep.png", transparency=1000)
    out = np.asarray(open_image(tmp_path / "deep.png", 3))
    assert (out[3:] == 255).all()                                      # transparent: white
    assert (out[:3] == round(40000 / 257)).all()                       # opaque: rescaled to 8 bits


def test_transparent_pixels_become_white(tmp_path):
    """The colours a file keeps under alpha 0 are arbitrary (here red): they are composited onto white."""
    write_images(tmp_path, 3, size=(8, 8))
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 255                                   # red everywhere, visible only in the top half
    rgba[:4, :, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "cut.png")
    dm = make(ImageFolderDataModule, tmp_path, image_size=8, val_fraction=0.0, test_fraction=0.0)
    y = dm.splits["train"][[p.name for p in dm.files].index("cut.png")]["y"]
    assert (y[:, :4] == torch.tensor([255, 0, 0], dtype=torch.uint8)[:, None, None]).all()
    assert (y[:, 5:] == 255).all()


def test_too_few_images(tmp_path):
    write_images(tmp_path, 2)
    with pytest.raises(ValueError, match="2 image.s. are too few for val_fraction=0.2 and test_fraction=0.2"):
        make(ImageFolderDataModule, tmp_path)
    with pytest.raises(ValueError, match=r"val_fraction=0.9 and data.test_fraction=0.2 add up to 1.1"):
        make(ImageFolderDataModule, tmp_path, val_fraction=0.9, test_fraction=0.2)


def test_the_python_api_splits_as_the_command_line(tmp_path):
    """The folder datamodules' own defaults are the yaml's (and the litdata conversion's): 5% val, 5% test."""
    from hydra import compose, initialize_config_module

    write_images(tmp_path, 40)
    with initialize_config_module(config_module="cgml_lightning.conf", version_base="1.3"):
        for group, cls in (("image_folder", ImageFolderDataModule), ("paired_folder", PairedFolderDataModule)):
            cfg = compose("train", [f"data={group}", f"data.root={tmp_path}"])
            assert (cfg.data.val_fraction, cfg.data.test_fraction) == (0.05, 0.05)
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=8)
    dm.setup()
    assert [len(dm.splits[k]) for k in ("train", "val", "test")] == [36, 2, 2]


# ---- PairedFolderDataModule ---------------------------------------------------------------------------------------
def write_side_by_side(root: Path, n: int, size=(12, 10)) -> None:
    """A|B images: A = left half, B = right half = 1 - A (so pairs are checkable)."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = pixels(i, size, 3)
        Image.fromarray(np.concatenate([a, 255 - a], axis=1)).save(root / f"{i:02d}.png")


def test_paired_side_by_side(tmp_path):
    write_side_by_side(tmp_path / "train", 6)
    dm = make(PairedFolderDataModule, tmp_path, image_size=None)
    info = dm.info()
    assert info["x_shape"] == [3, 10, 12] and info["y_shape"] == [3, 10, 12] and not info["mask_channel"]
    for split in dm.splits:
        batch = split_batch(dm, split)
        assert torch.allclose(batch["y"], 1 - batch["x"], atol=1e-6)  # x = A (left), y = B (right)
    flipped = make(PairedFolderDataModule, tmp_path, image_size=None, direction="BtoA")
    assert torch.equal(split_batch(flipped, "train")["x"], split_batch(dm, "train")["y"])
    resized = make(PairedFolderDataModule, tmp_path, image_size=8, channels=1)
    assert resized.info()["x_shape"] == [1, 8, 8] == resized.info()["y_shape"]


def test_paired_folders_layout_matches_names(tmp_path):
    for i in range(5):
        a = pixels(i, (9, 7), 3)
        (tmp_path / "A" / "sub").mkdir(parents=True, exist_ok=True)
        (tmp_path / "B" / "sub").mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(tmp_path / "A" / "sub" / f"{i}.png")
        Image.fromarray(255 - a).save(tmp_path / "B" / "sub" / f"{i}.bmp")     # same name, other extension
    dm = make(PairedFolderDataModule, tmp_path, image_size=None)
    assert len(dm.files) == 5 and all(p.parent.parent.name == "A" for p in dm.files)
    assert dm.info()["x_shape"] == [3, 7, 9]
    for split in dm.splits:
        batch = split_batch(dm, split)
        assert torch.allclose(batch["y"], 1 - batch["x"], atol=1e-6)


def test_paired_names_match_however_their_unicode_is_encoded(tmp_path):
    import unicodedata

    for i, name in enumerate(("café", "crème", "plain")):
        a = pixels(i, (9, 7), 3)
        for side, array, form in (("A", a, "NFC"), ("B", 255 - a, "NFD")):       # macOS writes NFD
            (tmp_path / side).mkdir(exist_ok=True)
            Image.fromarray(array).save(tmp_path / side / f"{unicodedata.normalize(form, name)}.png")
    dm = make(PairedFolderDataModule, tmp_path, image_size=None, val_fraction=0.0, test_fraction=0.0)
    assert len(dm.files) == 3
    assert torch.allclose(split_batch(dm, "train")["y"], 1 - split_batch(dm, "train")["x"], atol=1e-6)


def test_paired_size_mismatch_names_files_and_sizes(tmp_path):
    for i in range(4):
        write_images(tmp_path / "A", 1, size=(8, 8), seed=i)
        write_images(tmp_path / "B", 1, size=(8, 8) if i else (10, 8), seed=i)
    with pytest.raises(ValueError) as err:
        make(PairedFolderDataModule, tmp_path, check_files=True)
    message = str(err.value)
    assert "img_0_000.png" in message and "A and B differ in size (8x8 vs 10x8" in message


def test_paired_unmatched_names(tmp_path):
    write_images(tmp_path / "A", 4)
    write_images(tmp_path / "B", 3)
    write_images(tmp_path / "B", 1, seed=7)
    with pytest.raises(ValueError, match=r"same file names .*only in A/: img_0_003; only in B/: img_7_000"):
        make(PairedFolderDataModule, tmp_path)


def test_paired_auto_layout_refuses_folders_it_would_split_in_half(tmp_path):
    write_images(tmp_path / "cyc" / "trainA", 4)
    write_images(tmp_path / "cyc" / "trainB", 4)
    with pytest.raises(ValueError, match=r"subfolders trainA/ and trainB/ look like the two sides .* rename them A/"):
        make(PairedFolderDataModule, tmp_path / "cyc")
    write_images(tmp_path / "half" / "A", 4)
    with pytest.raises(FileNotFoundError, match="holds A/ but no B/"):
        make(PairedFolderDataModule, tmp_path / "half")
    write_images(tmp_path / "square", 6, size=(8, 8))
    with pytest.warns(UserWarning, match=r"img_0_000.png: 8x8 .W x H. is not about twice as wide as high"):
        make(PairedFolderDataModule, tmp_path / "square")
    sides = make(PairedFolderDataModule, tmp_path / "square", layout="side_by_side")     # asked for: no warning
    assert sides.side_by_side
    write_images(tmp_path / "ab" / "A", 2)
    write_images(tmp_path / "ab" / "B", 2)
    with pytest.warns(UserWarning, match=r"holds A/ and B/, the layout of a paired folder"):
        ImageFolderDataModule(root=str(tmp_path / "ab")).list_samples(tmp_path / "ab")
    write_images(tmp_path / "first_corrupt", 20, size=(8, 8))
    (tmp_path / "first_corrupt" / "a_corrupt.png").write_bytes(b"not an image")    # sorts first: the next one speaks
    with pytest.warns(UserWarning, match=r"img_0_000.png: 8x8 .W x H. is not about twice as wide as high"):
        PairedFolderDataModule(root=str(tmp_path / "first_corrupt")).setup()


def test_paired_name_with_two_extensions_is_an_error(tmp_path):
    for side in "AB":
        write_images(tmp_path / side, 4)
    write_images(tmp_path / "A", 1, ext="jpg")
    with pytest.raises(ValueError, match=r"img_0_000.jpg and .*img_0_000.png: one name with two extensions in A/"):
        make(PairedFolderDataModule, tmp_path)


def test_paired_bad_inputs(tmp_path):
    odd = tmp_path / "odd"
    write_images(odd, 3, size=(11, 8))
    with pytest.raises(ValueError, match=r"img_0_000.png: an A\|B image needs an even width .* got 11x8"):
        make(PairedFolderDataModule, odd, check_files=True)
    with pytest.raises(FileNotFoundError, match="data.layout=folders needs subfolders A/ and B/"):
        make(PairedFolderDataModule, odd, layout="folders")
    (tmp_path / "ab" / "A").mkdir(parents=True)
    (tmp_path / "ab" / "B").mkdir()
    with pytest.raises(FileNotFoundError, match="data.root/A: no images in"):
        make(PairedFolderDataModule, tmp_path / "ab")
    with pytest.raises(ValueError, match="data.direction must be AtoB or BtoA"):
        PairedFolderDataModule(root=str(odd), direction="sideways")


# ---- Fashion-MNIST: the idx reader on fake files, then the real set when installed --------------------------------------
def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    data = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def write_fake_fmnist(folder: Path, n_train: int = 40, n_test: int = 10, gz: bool = True) -> None:
    """Image i is constant with value i, its label i % 10: a label can be checked against its image."""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte", np.arange(n)[:, None, None] * np.ones((1, 28, 28)), gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, gz)


@pytest.fixture
def no_debian(monkeypatch, tmp_path):
    """Hide the real installed copy so only tmp_path counts."""
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "not-installed")


@pytest.mark.parametrize("gz,layout", [(True, ""), (False, "FashionMNIST/raw")])
def test_fmnist_reader_on_fake_files(tmp_path, no_debian, gz, layout):
    write_fake_fmnist(tmp_path / layout if layout else tmp_path, gz=gz)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), val_fraction=0.25, batch_size=8)
    dm.setup()
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [30, 10, 10]
    info = dm.info()
    assert info["x_shape"] == [2, 28, 28] and info["y_shape"] == [1, 28, 28] and info["mask_channel"]
    train = dm.splits["train"]
    assert train.y.min() >= 0 and train.y.max() <= 1
    assert train.x[:, -1, 14:].eq(1).all() and train.x[:, -1, :14].eq(0).all()        # default: bottom half hidden
    assert {k: len(v) for k, v in dm.labels.items()} == {"train": 30, "val": 10, "test": 10}
    assert torch.equal(dm.labels["test"], torch.arange(10) % 10)
    for split in ("train", "val", "test"):                                          # labels follow their images
        value = (dm.splits[split].y[:, 0, 0, 0] * 255).round().long()
        assert torch.equal(value % 10, dm.labels[split])
    assert not torch.equal(dm.splits["val"].y, FashionMNISTDataModule(data_dir=str(tmp_path), val_fraction=0.25,
                                                                         split_seed=1).load_datasets()["val"].y)


def test_fmnist_options_on_fake_files(tmp_path, no_debian):
    write_fake_fmnist(tmp_path)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), task="superres", scale=4, max_train_samples=7, val_fraction=0.1)
    dm.setup()
    assert len(dm.splits["train"]) == 7 == len(dm.labels["train"]) and not dm.info()["mask_channel"]
    assert dm.info()["x_shape"] == [1, 28, 28]
    again = FashionMNISTDataModule(data_dir=str(tmp_path), task="denoise", val_fraction=0.1)
    again.setup()
    other = FashionMNISTDataModule(data_dir=str(tmp_path), task="denoise", val_fraction=0.1)
    other.setup()
    assert again.info()["x_shape"] == [1, 28, 28]
    for split in ("train", "val", "test"):                                            # noise fixed per plain row
        assert torch.equal(again.splits[split][3]["x"], other.splits[split][3]["x"])
    train = again.splits["train"]                                                     # and fresh per training draw
    assert torch.equal(train[(3, 1, 7)]["x"], other.splits["train"][(3, 1, 7)]["x"])
    assert not torch.equal(train[(3, 1, 7)]["x"], train[(3, 2, 7)]["x"])


def test_fmnist_rejects_colorization():
    with pytest.raises(ValueError, match="colorization needs RGB images; Fashion-MNIST is grey"):
        FashionMNISTDataModule(task="colorization")


def test_fmnist_missing_lists_every_place(tmp_path, no_debian):
    with pytest.raises(FileNotFoundError) as err:
        FashionMNISTDataModule(data_dir=str(tmp_path / "data")).setup()
    message = str(err.value)
    for expected in (str(tmp_path / "data"), str(tmp_path / "data" / "FashionMNIST" / "raw"), "not-installed",
                     "apt-get install dataset-fashion-mnist", "data.download=true", "data.data_dir",
                     "train-images-idx3-ubyte[.gz]"):
        assert expected in message


def test_fmnist_bad_idx_files(tmp_path, no_debian):
    write_fake_fmnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(9), gz=True)             # 9 labels for 10 images
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.gz: images \(10, 28, 28\) do not match labels \(9,\)"):
        FashionMNISTDataModule(data_dir=str(tmp_path)).setup()
    bad = tmp_path / "junk-idx"
    bad.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="junk-idx: not an unsigned-byte idx file"):
        read_idx(bad)
    short = tmp_path / "short-idx"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 5) + b"abc")
    with pytest.raises(ValueError, match=r"short-idx: idx header says shape \(5,\) but the file holds 3 bytes"):
        read_idx(short)


@pytest.fixture(scope="module")
def real_fmnist():
    dm = FashionMNISTDataModule(data_dir=None, batch_size=16, eval_batch_size=16)
    dm.setup()
    return dm


@needs_fmnist
def test_fmnist_real(real_fmnist):
    dm = real_fmnist
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [54000, 6000, 10000]
    assert dm.info()["x_shape"] == [2, 28, 28] and dm.info()["num_train_samples"] == 54000
    assert sorted(dm.labels["test"].unique().tolist()) == list(range(10))
    assert torch.bincount(dm.labels["test"]).tolist() == [1000] * 10
    y = dm.splits["test"].y
    assert y.min() == 0 and y.max() == 1 and y.shape == (10000, 1, 28, 28)


# ---- the experiments' Hydra configs --------------------------------------------------------------------------------------
def compose_train(overrides: list[str]):
    with initialize_config_module(config_module="cgml_lightning.conf", version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("experiment,task,x_channels", [
    ("fmnist_completion", "completion", 2), ("fmnist_denoise", "denoise", 1), ("fmnist_superres", "superres", 1),
])
def test_fmnist_experiment_configs(tmp_path, no_debian, experiment, task, x_channels):
    write_fake_fmnist(tmp_path)
    cfg = compose_train([f"experiment={experiment}", f"data.data_dir={tmp_path}"])
    assert cfg.task_name == experiment and cfg.data.task == task and cfg.net.name == "unet"
    assert cfg.data._target_ == "cgml_lightning.data.FashionMNISTDataModule" and cfg.data.download is False
    dm = instantiate(cfg.data)
    dm.setup()
    assert dm.info()["x_shape"] == [x_channels, 28, 28] and dm.info()["y_shape"] == [1, 28, 28]
    if experiment == "fmnist_completion":
        assert (cfg.data.mask, cfg.data.mask_side) == ("half", "bottom")


def test_fmnist_data_dir_default_is_paths_data_dir():
    cfg = compose_train(["experiment=fmnist_completion"])
    assert cfg.data.data_dir == cfg.paths.data_dir and (cfg.data.batch_size, cfg.data.eval_batch_size) == (64, 256)


def test_colorization_experiment_config(rgb_tree):
    cfg = compose_train(["experiment=colorization", f"data.root={rgb_tree}", "data.image_size=16"])
    assert cfg.task_name == "colorization" and cfg.data.task == "colorization" and cfg.data.channels == 3
    dm = instantiate(cfg.data)
    dm.setup()
    assert dm.info()["x_shape"] == [1, 16, 16] and dm.info()["y_shape"] == [3, 16, 16]


def test_paired_experiment_config(tmp_path):
    write_side_by_side(tmp_path, 8, size=(16, 16))
    cfg = compose_train(["experiment=paired_translation", f"data.root={tmp_path}", "data.image_size=16"])
    assert cfg.task_name == "paired_translation" and cfg.net.name == "unet"
    dm = instantiate(cfg.data)
    dm.setup()
    assert dm.info()["x_shape"] == [3, 16, 16] == dm.info()["y_shape"]


@pytest.mark.parametrize("experiment", ["colorization", "paired_translation"])
def test_folder_experiments_require_root(experiment):
    cfg = compose_train([f"experiment={experiment}"])
    with pytest.raises(Exception, match="Missing mandatory value: data.root"):
        instantiate(cfg.data)


def run_train(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("cgml-train")
    env = {**os.environ, "PWD": str(cwd), "WANDB_MODE": "disabled"}
    return subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@needs_fmnist
def test_cgml_train_fmnist_completion_fast_dev_run(tmp_path):
    out = tmp_path / "run"
    result = run_train(["experiment=fmnist_completion", "debug=fdr", f"hydra.run.dir={out}"], tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (out / "metrics.json").is_file() and (out / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_cgml_train_colorization_fast_dev_run(tmp_path, rgb_tree):
    out = tmp_path / "run"
    result = run_train(["experiment=colorization", f"data.root={rgb_tree}", "data.image_size=16", "debug=fdr",
                        f"hydra.run.dir={out}"], tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (out / "metrics.json").is_file()
    assert "are grey" in (out / "train.log").read_text()                     # the data checks' warnings: logged
