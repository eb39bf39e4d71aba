"""Users' files for cgml-sample: images fitted to the model's size, the task's degradation, masks and hints,
and errors that name the file at fault."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from cgml_lightning import CGMLModule
from cgml_lightning.data import DigitsDataModule
from cgml_lightning.data.degradations import Degradation, to_grayscale
from cgml_lightning.data.folders import ImageDataError
from cgml_lightning.runs import load_checkpoint
from cgml_lightning.user_inputs import (build_inputs, check_image_model, hint_guide, image_files, input_channels,
                                        load_hint, load_images, load_mask, readable_images,
                                        task_degradation)

DIGITS_INFO = {"kind": "image", "x_shape": [2, 8, 8], "y_shape": [1, 8, 8], "mask_channel": True,
               "data": {"_target_": "cgml_lightning.data.DigitsDataModule", "mask_side": "bottom"}}


def fmnist_info(task: str, x_channels: int = 1, **data) -> dict:
    return {"kind": "image", "x_shape": [x_channels, 28, 28], "y_shape": [1, 28, 28], "mask_channel": task == "completion",
            "data": {"_target_": "cgml_lightning.data.FashionMNISTDataModule", "task": task, "data_dir": None, **data}}


def save(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def gradient(w: int, h: int) -> np.ndarray:
    """A grey ramp [h, w] uint8: distinct pixel values, so a resize or a mix-up shows."""
    return (np.add.outer(np.arange(h), np.arange(w)) * 255 // (h + w - 2)).astype(np.uint8)


# ---- the checkpoint's task ------------------------------------------------------------------------------------
def test_task_degradation_from_the_recorded_data_config():
    assert task_degradation(DIGITS_INFO["data"], DIGITS_INFO) == Degradation("completion", mask="half", mask_side="bottom")
    info = fmnist_info("denoise", noise_sigma=0.3, batch_size=64)
    assert task_degradation(info["data"], info) == Degradation("denoise", noise_sigma=0.3)
    paired = {"kind": "image", "x_shape": [3, 8, 8], "y_shape": [3, 8, 8],
              "data": {"_target_": "cgml_lightning.data.PairedFolderDataModule", "root": "/x"}}
    assert task_degradation(paired["data"], paired).task == "identity"


def test_task_degradation_reads_the_recorded_degradation():
    info = DigitsDataModule(mask_side="top").info()
    assert info["degradation"] == {"task": "completion", "mask": "half", "mask_side": "top", "mask_size": 0.5,
                                   "mask_count": 3, "stroke_width": 0.12}
    assert task_degradation(None, info) == Degradation("completion", mask="half", mask_side="top")   # no config needed
    recorded = {**fmnist_info("denoise", noise_sigma=0.1), "degradation": {"task": "denoise", "noise_sigma": 0.3}}
    assert task_degradation(recorded["data"], recorded) == Degradation("denoise", noise_sigma=0.3)  # the record wins
    paired_stream = {"kind": "image", "x_shape": [3, 8, 8], "y_shape": [3, 8, 8], "mask_channel": False,
                     "degradation": {"task": "identity"},
                     "data": {"_target_": "cgml_lightning.data.StreamingDataModule", "task": "completion"}}
    assert task_degradation(paired_stream["data"], paired_stream).task == "identity"
    for record, match in (([1, 2], "must be a mapping"), ({"task": "denoise", "_target_": "os.system"}, "_target_"),
                          ({"task": "blur"}, "data.task must be one of"),
                          ({"task": "denoise", "noise_sigma": -1}, ">= 0")):
        with pytest.raises(ValueError, match=match) as err:
            task_degradation(None, {**DIGITS_INFO, "degradation": record})
        assert "hyper_parameters.data_info.degradation" in str(err.value)


def test_checkpoints_with_and_without_the_record(tmp_path):
    """A checkpoint keeps the record through a weights_only load; one made before it falls back to its data config."""
    dm = DigitsDataModule(mask_side="left")
    data_cfg = {"_target_": "cgml_lightning.data.DigitsDataModule", "mask_side": "left"}
    legacy_info = {k: v for k, v in dm.info().items() if k != "degradation"}
    for info in ({**dm.info(), "data": data_cfg}, {**legacy_info, "data": data_cfg}):
        module = CGMLModule(info, {"name": "unet", "width": 8, "depth": 1}, z_phase="paper", latent_dim=4)
        trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu")
        trainer.strategy.connect(module)
        trainer.save_checkpoint(tmp_path / "model.ckpt")
        loaded = load_checkpoint(str(tmp_path / "model.ckpt")).data_info
        assert ("degradation" in loaded) == ("degradation" in info)
        assert task_degradation(loaded.get("data"), loaded) == Degradation("completion", mask="half", mask_side="left")


def test_without_the_record_an_unclear_data_config_is_an_error_naming_the_keys():
    no_config = {k: v for k, v in DIGITS_INFO.items() if k != "data"}
    custom = {**DIGITS_INFO, "data": {"_target_": "my_lab.MaskedFacesDataModule", "root": "/x"}}
    fmnist_defaults = fmnist_info("completion")
    del fmnist_defaults["data"]["task"]                        # the datamodule's default task: completion
    assert task_degradation(fmnist_defaults["data"], fmnist_defaults) == Degradation("completion")
    paired_stream = {"kind": "image", "x_shape": [3, 8, 8], "y_shape": [3, 8, 8], "mask_channel": False,
                     "data": {"_target_": "cgml_lightning.data.StreamingDataModule", "task": "completion"}}
    for info, detail in ((no_config, r"data_info.data is absent"), (custom, r"MaskedFacesDataModule\) names no"),
                         (paired_stream, "task=completion, but the recorded mask_channel is False")):
        with pytest.raises(ValueError, match=detail) as err:
            task_degradation(info.get("data"), info)
        assert "hyper_parameters.data_info.degradation" in str(err.value)
        assert "hyper_parameters.data_info.data" in str(err.value)
    bad = fmnist_info("denoise", noise_sigma=-1)
    with pytest.raises(ValueError, match=r"hyper_parameters.data_info.data \(cgml_lightning.data.FashionMNIST.*>= 0"):
        task_degradation(bad["data"], bad)


def test_vector_checkpoint_refuses_images():
    with pytest.raises(ValueError, match=r"input= takes images.*vector data"):
        check_image_model({"kind": "vector", "x_shape": [1], "y_shape": [3]}, "input")


# ---- images: sizes, channels, errors ------------------------------------------------------------------------------
def test_images_are_fitted_to_the_model(tmp_path):
    same = save(tmp_path / "a.png", gradient(8, 8))
    bigger = save(tmp_path / "b.png", gradient(32, 32))
    colour = save(tmp_path / "c.png", np.stack([gradient(16, 16)] * 3, axis=-1))
    images = load_images([same, bigger, colour], channels=1, size=(8, 8))
    assert images.shape == (3, 1, 8, 8)
    torch.testing.assert_close(images[0, 0], torch.from_numpy(gradient(8, 8)).float() / 255)
    assert 0 <= images.min() and images.max() <= 1
    assert load_images([same], channels=3, size=(8, 8)).shape == (1, 3, 8, 8)


def test_wrong_aspect_is_an_error_naming_the_file_unless_cropped(tmp_path):
    wide = save(tmp_path / "wide photo.png", gradient(30, 10))
    with pytest.raises(ImageDataError) as err:
        load_images([wide], channels=1, size=(8, 8))
    assert str(wide) in str(err.value) and "30x10" in str(err.value) and "crop=true" in str(err.value)
    assert load_images([wide], channels=1, size=(8, 8), crop=True).shape == (1, 1, 8, 8)


def test_a_folder_with_other_aspect_ratios_names_them_all_at_once(tmp_path):
    """One error lists every file that needs crop=true, instead of stopping at the first of them."""
    files = [save(tmp_path / "a.png", gradient(8, 8)), save(tmp_path / "b.png", gradient(30, 10)),
             save(tmp_path / "c.png", gradient(16, 16)), save(tmp_path / "d.png", gradient(10, 24))]
    with pytest.raises(ImageDataError, match=r"2 of 4 images are not 8:8") as err:
        load_images(files, channels=1, size=(8, 8))
    assert f"{files[1]} (30x10), {files[3]} (10x24)" in str(err.value) and "crop=true" in str(err.value)
    assert str(files[0]) not in str(err.value)
    assert load_images(files, channels=1, size=(8, 8), crop=True).shape == (4, 1, 8, 8)


def test_missing_and_unreadable_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        image_files(tmp_path / "nope.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ImageDataError, match="broken.png"):
        load_images(image_files(broken), channels=1, size=(8, 8))
    text = tmp_path / "notes.txt"
    text.write_text("hi")
    with pytest.raises(ImageDataError, match="notes.txt.*not an image"):
        image_files(text)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        image_files(empty)


def test_a_folders_unreadable_files_are_skipped_and_named(tmp_path, caplog):
    a, c, d = (save(tmp_path / name, gradient(8, 8)) for name in ("a.png", "c.png", "d.png"))
    (tmp_path / "b.png").write_bytes(b"")                                  # an empty file, as a failed copy leaves
    with caplog.at_level("WARNING", logger="cgml_lightning"):
        assert readable_images(image_files(tmp_path), 2) == [a, c]
    assert "b.png" in caplog.text and "skipping 1 unreadable" in caplog.text
    assert readable_images(image_files(tmp_path), 10) == [a, c, d]
    save(tmp_path / "e_tiny.png", np.zeros((1, 1), np.uint8))               # what training skips: too small,
    Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(tmp_path / "f_clear.png")   # fully transparent
    caplog.clear()
    with caplog.at_level("WARNING", logger="cgml_lightning"):
        assert readable_images(image_files(tmp_path), 10) == [a, c, d]
    assert "e_tiny.png: 1x1 pixels" in caplog.text and "f_clear.png: fully transparent" in caplog.text
    with pytest.raises(ImageDataError, match=r"input: .*e_tiny.png: 1x1 pixels"):
        load_images([tmp_path / "e_tiny.png"], channels=1, size=(8, 8))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ImageDataError, match="none of the 1 image"):
        readable_images(image_files(broken), 5)


def test_folder_is_read_recursively_in_sorted_order(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("sub/b.png", "a.png", "c.jpg"):
        save(tmp_path / name, gradient(8, 8))
    assert [p.relative_to(tmp_path).as_posix() for p in image_files(tmp_path)] == ["a.png", "c.jpg", "sub/b.png"]


# ---- building the model's inputs ---------------------------------------------------------------------------------
def test_completion_applies_the_task_mask_or_the_users_mask(tmp_path):
    images = torch.rand(2, 1, 8, 8)
    deg = task_degradation(DIGITS_INFO["data"], DIGITS_INFO)
    inputs = build_inputs(DIGITS_INFO, deg, images, ["a", "b"])
    assert inputs.x.shape == (2, 2, 8, 8) and torch.equal(inputs.given, images)
    assert inputs.x[:, 1, 4:].eq(1).all() and inputs.x[:, 1, :4].eq(0).all()        # the bottom half hidden
    torch.testing.assert_close(inputs.x[:, 0, :4], images[:, 0, :4])
    assert inputs.x[:, 0, 4:].eq(0).all()
    mask_png = np.zeros((16, 16), np.uint8)
    mask_png[:, :8] = 255                                                            # white = hole: left half
    mask = load_mask(save(tmp_path / "mask.png", mask_png), (8, 8))
    assert mask.shape == (1, 8, 8) and mask[0, :, :4].eq(1).all() and mask[0, :, 4:].eq(0).all()
    masked = build_inputs(DIGITS_INFO, deg, images, ["a", "b"], mask=mask)
    assert torch.equal(masked.x[:, 1:], mask.expand(2, 1, 8, 8))
    torch.testing.assert_close(masked.x[:, 0, :, 4:], images[:, 0, :, 4:])


def test_a_paired_checkpoint_reads_ab_images_and_the_input_side_of_a_folder(tmp_path):
    """A|B files split into the input side (per direction) and the truth; a folder with A/ and B/ gives the input
    side's files only; single images are inputs without a truth; a mix is named."""
    from cgml_lightning.user_inputs import input_side, load_pair_inputs, paired_direction

    a = gradient(8, 8)
    save(tmp_path / "ab.png", np.concatenate([a, 255 - a], axis=1))
    x, truth = load_pair_inputs([tmp_path / "ab.png"], 1, (8, 8), "AtoB")
    torch.testing.assert_close(x + truth, torch.ones(1, 1, 8, 8))
    assert torch.equal(x[0, 0], torch.from_numpy(a).float() / 255)
    x_back, truth_back = load_pair_inputs([tmp_path / "ab.png"], 1, (8, 8), "BtoA")
    assert torch.equal(x_back, truth) and torch.equal(truth_back, x)
    save(tmp_path / "single.png", a)
    assert load_pair_inputs([tmp_path / "single.png"], 1, (8, 8), "AtoB")[1] is None
    with pytest.raises(ImageDataError, match=r"ab.png is an A\|B image .*single.png is a single image"):
        load_pair_inputs([tmp_path / "ab.png", tmp_path / "single.png"], 1, (8, 8), "AtoB")
    pairs = tmp_path / "pairs"
    for side in "AB":
        (pairs / side).mkdir(parents=True)
        save(pairs / side / "0.png", a)
    assert input_side(image_files(pairs), pairs, "BtoA") == [pairs / "B" / "0.png"]
    assert input_side(image_files(pairs / "A"), pairs / "A", "AtoB") == [pairs / "A" / "0.png"]   # no A/, B/ there
    paired = {"data": {"_target_": "cgml_lightning.data.PairedFolderDataModule", "direction": "BtoA"},
              "degradation": {"task": "identity"}}
    assert paired_direction(paired) == "BtoA" and paired_direction(DIGITS_INFO) is None


def test_a_masks_transparent_pixels_are_visible(tmp_path):
    """A white box on a transparent layer (as an editor draws it) is the hole; transparent pixels, whatever colour
    they hold, are visible."""
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 255                                          # white everywhere, but only the box is opaque
    rgba[2:6, 2:6, 3] = 255
    mask = load_mask(save(tmp_path / "layer.png", rgba), (8, 8))
    expected = torch.zeros(1, 8, 8)
    expected[:, 2:6, 2:6] = 1
    assert torch.equal(mask, expected)


def test_masks_and_hints_are_read_as_training_reads_images(tmp_path):
    """16-bit grey is rescaled (not clipped to white), the orientation tag turns a mask as it turns the photo it
    belongs to, and an animated file is refused by name."""
    deep = np.full((8, 8), 1000, np.uint16)                     # near black: visible
    deep[:2, :2] = 60000                                          # near white: the hole
    mask = load_mask(save(tmp_path / "deep.png", deep), (8, 8))
    assert mask.sum() == 4 and mask[0, :2, :2].eq(1).all()
    hint, known = load_hint(save(tmp_path / "ramp.png", (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)),
                            channels=1, size=(8, 8))
    torch.testing.assert_close(hint[0, 7, 7], torch.tensor(round(63000 / 257) / 255))

    box = np.zeros((8, 16), np.uint8)
    box[:2, :2] = 255                                             # top left as stored
    exif = Image.Exif()
    exif[0x0112] = 6                                              # shown turned 90 degrees clockwise
    Image.fromarray(box).save(tmp_path / "turned.png", exif=exif)
    shown = load_images([tmp_path / "turned.png"], 1, (16, 8))[0, 0]
    mask = load_mask(tmp_path / "turned.png", (16, 8))[0]
    assert torch.equal(mask, (shown > 0.5).float()) and mask[:2, 6:].eq(1).all()    # top right, as shown

    frames = [Image.fromarray(np.full((8, 8), v, np.uint8)) for v in (0, 255)]
    frames[0].save(tmp_path / "moving.webp", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageDataError, match="hint: .*moving.webp: an animated image"):
        load_hint(tmp_path / "moving.webp", channels=1, size=(8, 8))


def test_mask_errors(tmp_path):
    with pytest.raises(ValueError, match="black.png hides no pixel"):
        load_mask(save(tmp_path / "black.png", np.zeros((8, 8), np.uint8)), (8, 8))
    with pytest.raises(ValueError, match="white.png hides every pixel"):
        load_mask(save(tmp_path / "white.png", np.full((8, 8), 255, np.uint8)), (8, 8))
    info = fmnist_info("denoise")
    with pytest.raises(ValueError, match="mask= is for completion checkpoints.*denoise"):
        build_inputs(info, task_degradation(info["data"], info), torch.rand(1, 1, 28, 28), ["a"],
                     mask=torch.ones(1, 28, 28))
    with pytest.raises(ValueError, match="degrade=false.*needs mask=FILE"):
        build_inputs(DIGITS_INFO, task_degradation(DIGITS_INFO["data"], DIGITS_INFO), torch.rand(1, 1, 8, 8), ["a"],
                     degrade=False)


def test_colorization_degrades_rgb_or_takes_grey_photos_as_they_are():
    info = {"kind": "image", "x_shape": [1, 8, 8], "y_shape": [3, 8, 8], "mask_channel": False,
            "data": {"_target_": "cgml_lightning.data.ImageFolderDataModule", "task": "colorization", "root": "/x"}}
    deg = task_degradation(info["data"], info)
    assert input_channels(info, deg, degrade=True) == 3 and input_channels(info, deg, degrade=False) == 1
    rgb = torch.rand(2, 3, 8, 8)
    degraded = build_inputs(info, deg, rgb, ["a", "b"])
    torch.testing.assert_close(degraded.x, to_grayscale(rgb))
    assert torch.equal(degraded.given, rgb)
    grey = torch.rand(2, 1, 8, 8)
    as_is = build_inputs(info, deg, grey, ["a", "b"], degrade=False)
    assert torch.equal(as_is.x, grey) and as_is.given is None
    with pytest.raises(ImageDataError, match=r"shape \[3, 8, 8\].*takes \[1, 8, 8\]"):
        build_inputs(info, deg, rgb, ["a", "b"], degrade=False)


def test_denoise_noise_is_seeded():
    info = fmnist_info("denoise", noise_sigma=0.3)
    deg = task_degradation(info["data"], info)
    images = torch.full((2, 1, 28, 28), 0.5)
    a, b = (build_inputs(info, deg, images, ["a", "b"], seed=s).x for s in (0, 0))
    c = build_inputs(info, deg, images, ["a", "b"], seed=1).x
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0.2 < (a - images).abs().mean() / 0.3 < 1.0                                # noise of about sigma 0.3


# ---- hints ---------------------------------------------------------------------------------------------------------
def test_hint_known_pixels_from_alpha_or_non_black(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[2:4, 2:4] = (0, 0, 0, 255)                                                  # black but opaque: known
    rgba[6, 6] = (200, 10, 10, 255)
    hint, known = load_hint(save(tmp_path / "alpha.png", rgba), channels=3, size=(8, 8))
    assert hint.shape == (3, 8, 8) and known.shape == (1, 8, 8)
    assert known.sum() == 5 and known[0, 2:4, 2:4].eq(1).all() and known[0, 6, 6] == 1
    torch.testing.assert_close(hint[:, 6, 6], torch.tensor([200, 10, 10]) / 255)
    plain = np.zeros((16, 16), np.uint8)
    plain[0:2, 0:2] = 255
    hint, known = load_hint(save(tmp_path / "plain.png", plain), channels=1, size=(8, 8))
    assert known.sum() == 1 and known[0, 0, 0] == 1 and hint[0, 0, 0] == 1
    with pytest.raises(ValueError, match="empty.png has no known pixel"):
        load_hint(save(tmp_path / "empty.png", np.zeros((8, 8), np.uint8)), channels=1, size=(8, 8))


def test_hint_guide_is_a_masked_l1():
    hint = torch.zeros(1, 2, 2)
    known = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])                                  # only pixel (0, 0)
    samples = torch.ones(3, 4, 1, 2, 2)                                               # [B, N, C, H, W]
    assert hint_guide(hint, known)(samples).item() == pytest.approx(3 * 4)
    per_input = torch.stack([known, torch.zeros_like(known), known])                  # [B, 1, H, W]
    assert hint_guide(hint, per_input)(samples).item() == pytest.approx(2 * 4)
    hints = torch.stack([hint, torch.ones_like(hint), hint])                          # [B, C, H, W]: input 1 met
    assert hint_guide(hints, known)(samples).item() == pytest.approx(2 * 4)
