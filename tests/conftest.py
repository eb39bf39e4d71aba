"""Test-wide settings: no network for W&B, and one torch thread (the nets here are tiny; on a 2-core machine
extra threads only add contention). Subprocesses inherit both through the environment."""
import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402

from cgml_lightning.data import DigitsDataModule, ToyDataModule  # noqa: E402


@pytest.fixture(scope="module")
def toy_dm():
    """256 toy samples, set up: for module-level tests of the MLP path."""
    dm = ToyDataModule(num_samples=256, batch_size=64, eval_batch_size=64)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def digits_dm():
    """64 digits, set up: for module-level tests of the U-Net path."""
    dm = DigitsDataModule(max_train_samples=64, batch_size=32, eval_batch_size=32)
    dm.setup()
    return dm
