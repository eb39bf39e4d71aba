"""Test-wide settings: no network for W&B, one torch thread (the nets here are tiny; on a 2-core machine extra
threads only add contention), and every file the tests write inside the checkout: pytest's temporary folders in
.pytest_tmp/run and the caches of matplotlib, W&B, Jupyter and the like in .pytest_tmp/home. Subprocesses inherit
the settings through the environment."""
import os
from pathlib import Path

SCRATCH = Path(__file__).resolve().parents[1] / ".pytest_tmp"
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")
for name, sub in (("MPLCONFIGDIR", "matplotlib"), ("WANDB_DIR", "wandb"), ("WANDB_CACHE_DIR", "wandb-cache"),
                  ("WANDB_CONFIG_DIR", "wandb-config"), ("WANDB_DATA_DIR", "wandb-data"), ("XDG_CACHE_HOME", "cache"),
                  ("XDG_CONFIG_HOME", "config"), ("XDG_DATA_HOME", "data"), ("IPYTHONDIR", "ipython"),
                  ("JUPYTER_CONFIG_DIR", "jupyter"), ("JUPYTER_DATA_DIR", "jupyter-data"),
                  ("JUPYTER_RUNTIME_DIR", "jupyter-runtime"), ("TORCH_HOME", "torch")):
    os.environ.setdefault(name, str(SCRATCH / "home" / sub))

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


def pytest_configure(config):
    if config.option.basetemp is None:                      # tmp_path and friends: inside the checkout too
        config.option.basetemp = str(SCRATCH / "run")
