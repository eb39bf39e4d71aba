"""Test-wide settings: no network for W&B, and one torch thread (the nets here are tiny; on a 2-core machine
extra threads only add contention). Subprocesses inherit both through the environment."""
import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
