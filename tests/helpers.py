"""Helpers shared by the test files: the console scripts as subprocess commands."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

SCRIPTS = {"cgml-train": "train", "cgml-eval": "evaluate", "cgml-sample": "sample"}


def script_command(name: str) -> list[str]:
    """The console script next to this interpreter (the venv's), else on PATH, else its entry point via -c."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return [str(beside)]
    found = shutil.which(name)
    if found:
        return [found]
    return [sys.executable, "-c", f"from cgml_lightning.cli import {SCRIPTS[name]}; {SCRIPTS[name]}()"]


# the toy at 512 samples (4 batches an epoch), two samples on eight inputs at the end: every run takes seconds
TOY = ["experiment=toy", "data.num_samples=512", "eval.num_samples=2", "eval.num_inputs=8",
       "++trainer.limit_val_batches=1"]


def cli_env(cwd: Path) -> dict[str, str]:
    env = {**os.environ, "WANDB_MODE": "disabled", "PWD": str(cwd), "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def run_cli(name: str, *args: str, cwd: Path, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([*script_command(name), *args], cwd=cwd, env=cli_env(cwd), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{name} {' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}"
                    f"\n--- stderr\n{proc.stderr[-5000:]}")
    return proc


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def compose_job(out: Path, *overrides: str):
    """The job config of `cgml-train OVERRIDES hydra.run.dir=OUT`, as the task sees it, with HydraConfig set so
    `run_train` can run in-process and write into OUT."""
    out.mkdir(parents=True, exist_ok=True)
    with initialize_config_module(config_module="cgml_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"hydra.run.dir={out}"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


