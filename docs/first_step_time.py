"""Seconds from the process's start to the first training step of `cgml-train OVERRIDES` (imports, config, data
setup, module, sanity validation included), printed when that step begins; the run then goes on as usual:

    python docs/first_step_time.py experiment=folder_completion data.root=DIR +trainer.max_steps=2
"""
from __future__ import annotations

import os
import sys
import time

import lightning as L


def process_start() -> float:
    """The process's start as a time.time() value (Linux: from /proc; elsewhere: this module's import)."""
    try:
        ticks = int(open(f"/proc/{os.getpid()}/stat").read().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return time.time()


STARTED = process_start()
first = L.LightningModule.on_train_batch_start


def on_train_batch_start(self, batch, batch_idx):
    if self.global_step == 0 and batch_idx == 0:
        print(f"first training step after {time.time() - STARTED:.1f} s", flush=True)
    return first(self, batch, batch_idx)


if __name__ == "__main__":
    L.LightningModule.on_train_batch_start = on_train_batch_start
    from cgml_lightning.commands.train import main as train

    sys.argv = ["cgml-train", *sys.argv[1:]]
    train()
