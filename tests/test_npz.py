"""data=npz: a user's own arrays. Good files give inferred shapes; every bad file fails with a message naming it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cgml_lightning.data import NpzDataModule, load_npz


def write(tmp_path, name: str = "data.npz", **arrays) -> str:
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def good_arrays(n: int = 50):
    rng = np.random.default_rng(0)
    return {"x": rng.random(n).astype(np.float64), "y": rng.random((n, 3)).astype(np.float32)}


def test_load_npz_good_file_1d_and_2d(tmp_path):
    arrays = good_arrays()
    x, y = load_npz(write(tmp_path, **arrays))
    assert x.shape == (50, 1) and y.shape == (50, 3)
    assert x.dtype == torch.float32 and y.dtype == torch.float32
    np.testing.assert_allclose(x[:, 0].numpy(), arrays["x"], rtol=1e-6)
    np.testing.assert_allclose(y.numpy(), arrays["y"], rtol=1e-6)


def test_load_npz_integer_arrays_become_float(tmp_path):
    x, y = load_npz(write(tmp_path, x=np.arange(10), y=np.arange(20).reshape(10, 2)))
    assert x.dtype == y.dtype == torch.float32
    assert y[3].tolist() == [6.0, 7.0]


def test_npz_datamodule_infers_shapes(tmp_path):
    dm = NpzDataModule(path=write(tmp_path, **good_arrays()), batch_size=8, val_fraction=0.1, test_fraction=0.1)
    info = dm.info()
    assert info["x_shape"] == [1]
    assert info["y_shape"] == [3]
    assert info["num_train_samples"] == 40
    assert info["kind"] == "vector" and info["mask_channel"] is False
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (8, 1) and batch["y"].shape == (8, 3)
    assert batch["index"].dtype == torch.long
    assert ((batch["index"] >= 0) & (batch["index"] < 40)).all()


def test_npz_datamodule_multidim_arrays(tmp_path):
    rng = np.random.default_rng(1)
    path = write(tmp_path, x=rng.random((30, 2, 4)), y=rng.random((30, 5)))
    info = NpzDataModule(path=path).info()
    assert info["x_shape"] == [2, 4] and info["y_shape"] == [5]


def test_npz_extra_arrays_are_ignored(tmp_path):
    arrays = good_arrays()
    x, y = load_npz(write(tmp_path, notes=np.array(["hello"]), **arrays))
    assert x.shape == (50, 1) and y.shape == (50, 3)


# ---- every problem: an error naming the file and the problem ------------------------------------------------
def test_npz_path_none():
    with pytest.raises(ValueError, match="data.path"):
        load_npz(None)
    with pytest.raises(ValueError, match="data.path"):
        NpzDataModule(path=None).info()


def test_npz_missing_file(tmp_path):
    missing = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError) as err:
        load_npz(str(missing))
    assert "nope.npz" in str(err.value) and "no such file" in str(err.value)


def assert_bad(path: str, *fragments: str, error=ValueError):
    with pytest.raises(error) as err:
        load_npz(path)
    message = str(err.value)
    assert path in message, message
    for fragment in fragments:
        assert fragment in message, message
    # and the same through the datamodule
    with pytest.raises(error) as err2:
        NpzDataModule(path=path).info()
    assert path in str(err2.value)


def test_npz_missing_y(tmp_path):
    assert_bad(write(tmp_path, x=np.zeros(10), z=np.zeros(10)), "missing array 'y'", "'x'", "'z'")


def test_npz_missing_x(tmp_path):
    assert_bad(write(tmp_path, y=np.zeros(10)), "missing array 'x'")


def test_npz_length_mismatch(tmp_path):
    assert_bad(write(tmp_path, x=np.zeros(10), y=np.zeros((12, 2))), "differ in length", "10", "12")


def test_npz_string_array(tmp_path):
    assert_bad(write(tmp_path, x=np.array(["a", "b", "c", "d"]), y=np.zeros(4)), "'x'", "non-numeric")


def test_npz_nan(tmp_path):
    y = np.zeros((10, 2))
    y[7, 1] = np.nan
    assert_bad(write(tmp_path, x=np.zeros(10), y=y), "'y'", "NaN", "sample 7")


def test_npz_inf(tmp_path):
    x = np.zeros(10)
    x[3] = -np.inf
    assert_bad(write(tmp_path, x=x, y=np.zeros(10)), "'x'", "Inf", "sample 3")


def test_npz_object_array_is_refused(tmp_path):
    x = np.empty(4, dtype=object)
    x[:] = [1.0, "a", None, {"k": 1}]
    path = tmp_path / "pickled.npz"
    np.savez(path, x=x, y=np.zeros(4))
    assert_bad(str(path), "'x'", "pickled")


def test_npz_other_arrays_are_not_read(tmp_path):
    """Only x and y are read: a pickled array beside them neither runs nor refuses the file."""
    extra = np.empty(2, dtype=object)
    extra[:] = [{"k": 1}, None]
    path = tmp_path / "more.npz"
    np.savez(path, x=np.linspace(-1, 1, 6), y=np.ones((6, 2)), notes=extra)
    x, y = load_npz(str(path))
    assert x.shape == (6, 1) and y.shape == (6, 2)


def test_npz_not_a_zip(tmp_path):
    path = tmp_path / "garbage.npz"
    path.write_bytes(b"this is not an npz archive at all")
    assert_bad(str(path), "not an .npz archive")
    np.save(tmp_path / "plain.npy", np.zeros(4))                     # a .npy array, not an archive of x and y
    assert_bad(str(tmp_path / "plain.npy"), "not an .npz archive")
    with pytest.raises(ValueError) as err:                 # numpy's advice to load with pickles: not passed on
        load_npz(str(path))
    assert "allow_pickle" not in str(err.value)


def test_npz_far_from_unit_scale_is_named(tmp_path, caplog):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 2)), rng.normal(size=(60, 3))
    with caplog.at_level("WARNING", logger="cgml_lightning"):
        load_npz(write(tmp_path, "unit.npz", x=x, y=y))
    assert "unit scale" not in caplog.text
    y[:, 1] *= 1000
    with caplog.at_level("WARNING", logger="cgml_lightning"):
        load_npz(write(tmp_path, "grams.npz", x=x, y=y))
    assert "array 'y' is far from unit scale (column 1" in caplog.text and "standardise" in caplog.text


def test_npz_scalar_array(tmp_path):
    assert_bad(write(tmp_path, x=np.float64(1.0), y=np.zeros(4)), "'x'", "scalar")


def test_npz_too_few_samples(tmp_path):
    assert_bad(write(tmp_path, x=np.zeros(2), y=np.zeros(2)), "at least 3")


def test_the_picture_of_multi_axis_inputs_and_many_outputs(tmp_path):
    """x with two feature axes is sorted by its first value; y with many dimensions draws the first eight panels."""
    from cgml_lightning import CGMLModule
    from cgml_lightning.plots import save_samples_png

    rng = np.random.default_rng(0)
    dm = NpzDataModule(path=write(tmp_path, x=rng.normal(size=(40, 2, 3)), y=rng.normal(size=(40, 12))),
                       batch_size=8)
    dm.setup()
    module = CGMLModule(dm.info(), {"name": "mlp", "width": 16, "depth": 2}, latent_dim=4, z_phase="paper")
    path = save_samples_png(module, dm, tmp_path / "samples.png")
    from PIL import Image

    width, height = Image.open(path).size
    assert width < 8 * 4 * 100 * 1.2 and height < 400                  # eight panels of 4 x 3.2 inches at 100 dpi


def test_evaluate_refuses_data_of_another_y_shape(tmp_path):
    """evaluate() on data whose y is shaped otherwise than the model's training data names both shapes, instead of
    scoring broadcast distances."""
    from cgml_lightning import CGMLModule
    from cgml_lightning.evaluation import evaluate

    rng = np.random.default_rng(0)
    trained = NpzDataModule(path=write(tmp_path, x=rng.normal(size=(40, 2)), y=rng.normal(size=(40, 2))))
    trained.setup()
    module = CGMLModule(trained.info(), {"name": "mlp", "width": 16, "depth": 2}, latent_dim=4, z_phase="paper")
    (tmp_path / "other").mkdir()
    other = NpzDataModule(path=write(tmp_path / "other", x=rng.normal(size=(40, 2)), y=rng.normal(size=(40, 1))))
    with pytest.raises(ValueError, match=r"NpzDataModule: its test targets y are \[1\] per sample, .*on y \[2\]"):
        evaluate(module, other, num_samples=2, num_inputs=4)
    assert evaluate(module, trained, num_samples=2, num_inputs=4)["num_inputs"] == 4


@pytest.mark.parametrize("key,value", [("batch_size", 0), ("eval_batch_size", -2), ("eval_batch_size", 0),
                                       ("num_workers", -1), ("batch_size", 8.5)])
def test_loader_settings_are_checked_at_construction(tmp_path, key, value):
    """A batch size or worker count no DataLoader takes names its data.KEY before any data is read."""
    with pytest.raises(ValueError, match=f"data.{key} must be a whole number.*got {value}"):
        NpzDataModule(path=str(tmp_path / "never_read.npz"), **{key: value})


def test_a_unet_on_vector_data_names_the_net_to_use(tmp_path):
    from cgml_lightning import CGMLModule

    dm = NpzDataModule(path=write(tmp_path, **good_arrays()))
    dm.setup()
    with pytest.raises(ValueError, match=r"U-Net needs x and y as \[C, H, W\].*use net=mlp \(experiment=toy"):
        CGMLModule(dm.info(), {"name": "unet"})
