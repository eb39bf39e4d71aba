"""Timing a training step: the module's own step through a Lightning Trainer, with the sections it records by
`phase()` read from Lightning's SimpleProfiler (the same records `trainer.profiler=simple` prints in a real run),
its peak memory, and sampling throughput. `python -m cgml_lightning.timing [train overrides]` reports the cGML step
against the baselines'.

A benchmark helper, not a test: absolute times are noisy on shared machines, so callers compare ratios
measured side by side in one process (cgml / regressor step, phase / step).
"""
from __future__ import annotations

import ctypes
import gc
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from torch import Tensor


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() over `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sync(device: torch.device | None = None) -> None:
    """Wait for queued GPU work (on `device`, or the current one), so a time covers the kernels, not their launch."""
    if (device is None or device.type == "cuda") and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize(device)


class StepTimer(L.Callback):
    """Wall time and peak memory of each training batch (the module's whole training_step, its backward and
    optimizer steps, as in training), after `warmup` untimed ones. Peak memory: on CUDA the allocator's peak over
    the step; on Linux CPUs the peak resident set (VmHWM, reset through /proc/self/clear_refs) over the resident set
    before the step; None where neither can be read."""

    def __init__(self, warmup: int):
        self.warmup, self.seconds, self.peak_mb = warmup, [], []
        self.start, self.before = 0.0, 0

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch, batch_idx: int) -> None:
        self.before = _reset_peak(module.device)
        sync(module.device)
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        sync(module.device)
        if batch_idx >= self.warmup:
            self.seconds.append(time.perf_counter() - self.start)
            self.peak_mb.append(_peak_since(module.device, self.before))


def step_profile(module, batches: list[dict[str, Tensor]], warmup: int = 1, **trainer_kwargs) -> dict[str, Any]:
    """One training step of `module` timed through a Lightning Trainer (its own training_step and optimizers, as
    in training) over `batches`, after `warmup` of them; the weights change. Returns step_s (median seconds),
    peak_mb (median peak memory of a step; None where unreadable) and phases_s: the median seconds of each section
    the module records with `phase()` (cGML: encoder, start_selection, z_steps, dynamics_loss, w_loss, backward,
    update, more_w_steps), read from Lightning's SimpleProfiler. trainer_kwargs go to the Trainer (accelerator,
    precision, ...)."""
    from lightning.pytorch.profilers import SimpleProfiler
    from torch.utils.data import DataLoader

    if len(batches) <= warmup:
        raise ValueError(f"step_profile: need batches beyond the {warmup} warm-up ones; got {len(batches)}")
    timer, profiler = StepTimer(warmup), SimpleProfiler()
    settings = {"accelerator": "cpu", "devices": 1, **trainer_kwargs}
    trainer = L.Trainer(callbacks=[timer], profiler=profiler, logger=False, max_epochs=1, max_time=None,
                        limit_train_batches=len(batches), limit_val_batches=0, num_sanity_val_steps=0,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **settings)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    prefix = f"[{type(module).module_name}] "
    phases = {name[len(prefix):]: statistics.median(durations[warmup:])
              for name, durations in profiler.recorded_durations.items()
              if name.startswith(prefix) and len(durations) > warmup}
    peaks = [p for p in timer.peak_mb if p is not None]
    return {"step_s": statistics.median(timer.seconds), "peak_mb": statistics.median(peaks) if peaks else None,
            "phases_s": phases}


def _reset_peak(device: torch.device) -> int:
    """Start a peak-memory window: the memory in use now (bytes on CUDA, KiB resident on Linux CPUs; 0 where unread)."""
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)                               # freed heap back to the OS first
        Path("/proc/self/clear_refs").write_text("5")                       # 5: reset the peak resident set
        return _proc_status_kib("VmRSS")
    except (OSError, AttributeError):                                       # no glibc or no /proc (not Linux)
        return -1


def _peak_since(device: torch.device, before: int) -> float | None:
    """The peak memory of the window _reset_peak opened, over what was in use then, in MiB."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if before < 0:
        return None
    return (_proc_status_kib("VmHWM") - before) / 1024


def _proc_status_kib(key: str) -> int:
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":"))
    return int(line.split()[1])


def samples_per_second(module, x: Tensor, num_samples: int, repeats: int = 3, **kwargs) -> float:
    """N samples of each input of x, in one batched call, after a warm-up call."""
    return len(x) * num_samples / median_seconds(lambda: module.sample(x, num_samples, seed=0, **kwargs), repeats)


def perf_report(overrides: list[str], baselines: tuple[str, ...] = ("regressor", "flow"), repeats: int = 5,
                num_samples: int = 10) -> dict:
    """The cGML step against the baselines' on the same nets, data and batches (ratios), its phases, the step's
    peak memory, and sampling throughput; `overrides` compose the training config as on the cgml-train command
    line. The modules take turns, `repeats` rounds of a few steps each, so a slow spell of a shared machine hits
    all of them alike."""
    from hydra import compose, initialize_config_module

    from cgml_lightning.runs import build_datamodule, build_module

    if any(o.lstrip("+~").split("=", 1)[0] == "model" for o in overrides):
        raise ValueError("timing compares model=cgml with the baselines; model= is no option here (model.* keys "
                         "reach cGML)")
    with initialize_config_module("cgml_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
        datamodule = build_datamodule(cfg)
        modules = {"cgml": build_module(cfg, datamodule)}
        shared = [o for o in overrides if not o.lstrip("+~").startswith("model")]     # model.* keys are cGML's
        for name in baselines:
            modules[name] = build_module(compose("train", overrides=[*shared, f"model={name}"]), datamodule)
    batch = next(iter(datamodule.train_dataloader()))
    rounds: dict[str, list[dict]] = {name: [] for name in modules}
    for _ in range(repeats):
        for name, module in modules.items():
            rounds[name].append(step_profile(module, [batch] * 3, warmup=1))
    steps = {name: statistics.median(r["step_s"] for r in runs) for name, runs in rounds.items()}
    cgml, k = modules["cgml"], modules["cgml"].hparams.z_steps
    phases = {p: statistics.median(r["phases_s"][p] for r in rounds["cgml"]) for p in rounds["cgml"][0]["phases_s"]}
    x = batch["x"][:16]
    return {
        "batch_size": len(batch["x"]), "z_steps": k, "start_candidates": cgml.hparams.start_candidates,
        "w_steps": cgml.hparams.w_steps, "threads": torch.get_num_threads(),
        "train_s_per_step": steps,
        "step_ratio_to_regressor": {n: t / steps["regressor"] for n, t in steps.items()} if "regressor" in steps else {},
        # seconds per weight update of the generator: a cGML step (one batch) makes w_steps of them
        "cgml_s_per_w_update": steps["cgml"] / cgml.hparams.w_steps,
        "goal_ratio": 1 + 0.4 * k,
        "peak_step_memory_mb": {name: runs[-1]["peak_mb"] for name, runs in rounds.items()},
        "phases_s": phases,
        "samples_per_s": {n: samples_per_second(m, x, num_samples) for n, m in modules.items()},
    }


if __name__ == "__main__":
    import json
    import sys

    try:
        report = perf_report(sys.argv[1:])
    except ValueError as err:                               # a refused override: the message alone
        sys.exit(f"Error: {err}")
    print(json.dumps(report, indent=2))
