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

SCRIPTS = {"cgml-train": "train", "cgml-eval": "eval", "cgml-sample": "sample", "cgml-bench": "bench"}


def script_command(name: str) -> list[str]:
    """The console script next to this interpreter (the venv's), else on PATH, else its entry point via -c."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return [str(beside)]
    found = shutil.which(name)
    if found:
        return [found]
    return [sys.executable, "-m", f"cgml_lightning.commands.{SCRIPTS[name]}"]


# the toy at 512 samples (4 batches an epoch), two samples on eight inputs at the end: every run takes seconds
TOY = ["experiment=toy", "data.num_samples=512", "eval.num_samples=2", "eval.num_inputs=8",
       "++trainer.limit_val_batches=1"]


def cli_env(cwd: Path) -> dict[str, str]:
    env = {**os.environ, "WANDB_MODE": "disabled", "PWD": str(cwd), "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def run_cli(name: str, *args: str, cwd: Path, check: bool = True, timeout: int = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([*script_command(name), *args], cwd=cwd, env={**cli_env(cwd), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
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


def wandb_records(run_dir: Path):
    """The records of an offline W&B run (its run-*.wandb file), decoded with W&B's own protobuf messages. The file
    is a LevelDB-style log: a 7-byte header (":W&B", magic, version), then 32 KiB blocks of chunks, each with a
    7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = Path(run_dir).glob("run-*.wandb")
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (kind == 0 and length == 0):                   # block trailer / padding
            pos += left
            continue
        pending = data[pos + 7:pos + 7 + length] if kind in (1, 2) else pending + data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def wandb_run(run_dir: Path) -> dict:
    """An offline W&B run as plain data: its name/group/job type/tags, config keys, summary and media files."""
    import json

    out = {"summary": {}, "config": {}, "media": sorted(str(p.relative_to(run_dir / "files"))
                                                         for p in (Path(run_dir) / "files").rglob("*.png"))}
    for record in wandb_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out.update(name=run.display_name, group=run.run_group, job_type=run.job_type, tags=list(run.tags))
        elif kind == "summary":
            for item in record.summary.update:
                out["summary"]["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                out["config"]["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
    return out


def wandb_runs(folder: Path) -> list[dict]:
    """Every offline W&B run under a folder."""
    return [wandb_run(p) for p in sorted(Path(folder).rglob("offline-run-*")) if p.is_dir()]
