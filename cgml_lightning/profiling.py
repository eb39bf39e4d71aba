"""Where a cGML training step spends its time: the phases timed one by one on the same batch.

A benchmark helper, not a test: absolute times are noisy on shared machines, so callers compare ratios
measured side by side in one process (cgml / regressor step, phase / step).
"""
from __future__ import annotations

import ctypes
import gc
import statistics
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from cgml_lightning import algorithm as A


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


def train_step_seconds(modules: dict[str, object], batch: dict[str, Tensor], repeats: int = 5,
                       warmup: int = 1) -> dict[str, float]:
    """Median time of one full training step (forward, backward, optimizer steps; no Trainer) of each module on
    the same batch. The modules take turns step by step, so a slow spell of a shared machine hits all of them
    alike and their ratios hold. Works for automatic and manual optimization; the weights do change."""
    with ExitStack() as stack:
        steps = {name: stack.enter_context(_standalone(module, batch)) for name, module in modules.items()}
        for _ in range(warmup):
            for step in steps.values():
                step()
        times: dict[str, list[float]] = {name: [] for name in modules}
        for _ in range(repeats):
            for name, step in steps.items():
                sync()
                start = time.perf_counter()
                step()
                sync()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_step_memory_mb(modules: dict[str, object], batch: dict[str, Tensor]) -> dict[str, float | None]:
    """Memory one training step adds at its peak, per module, in MiB: on CUDA the allocator's peak; on Linux CPUs
    the peak resident set (VmHWM, reset through /proc/self/clear_refs) over the resident set before the step,
    after freed heap memory went back to the OS. None where neither can be read."""
    peaks: dict[str, float | None] = {}
    with ExitStack() as stack:
        for name, module in modules.items():
            step = stack.enter_context(_standalone(module, batch))
            step()                                                          # warm-up: optimizer state exists
            peaks[name] = _peak_mb(step, next(module.parameters()).device)
    return peaks


def _peak_mb(step: Callable[[], object], device: torch.device) -> float | None:
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")                       # 5: reset the peak resident set
        before = _proc_status_kib("VmRSS")
        step()
        return (_proc_status_kib("VmHWM") - before) / 1024
    except (OSError, AttributeError):                                       # no glibc or no /proc (not Linux)
        return None


def _proc_status_kib(key: str) -> int:
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":"))
    return int(line.split()[1])


def samples_per_second(module, x: Tensor, num_samples: int, repeats: int = 3, **kwargs) -> float:
    """N samples of each input of x, in one batched call, after a warm-up call."""
    return len(x) * num_samples / median_seconds(lambda: module.sample(x, num_samples, seed=0, **kwargs), repeats)


def phase_profile(module, batch: dict[str, Tensor], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each phase of CGMLModule's step on `batch` (no weights change):
    encoder, start selection (M candidate decodes), z-steps (k decoder forward + backward to z), Z-phase
    (forward + backward of the dynamics net), w-phase (decoder at z_k, backward through encoder + decoder)."""
    x, y, index = batch["x"], batch["y"], batch["index"]
    hp = module.hparams
    module.train()
    generator = lambda: torch.Generator().manual_seed(0)                              # noqa: E731
    with torch.no_grad():
        feats = tuple(f.detach() for f in module.generator.encode(x))
    z0 = module.initial_latents(feats, y, x, index, generator())
    path = A.z_descent(module.loss_fn(feats, y, x), z0, hp.z_steps, hp.z_lr, hp.momentum, hp.z_normalized)

    def encoder():
        with torch.no_grad():
            module.generator.encode(x)

    def dynamics():
        module.dynamics.zero_grad(set_to_none=True)
        module.dynamics_phase_loss(module.generator.summarize(feats), path).backward()

    def w_phase():
        module.generator.zero_grad(set_to_none=True)
        module.generator_phase_loss(module.generator.encode(x), path[-1], y, x).backward()

    profile = {
        "encoder_s": median_seconds(encoder, repeats, warmup),
        "start_selection_s": median_seconds(lambda: module.initial_latents(feats, y, x, index, generator()),
                                            repeats, warmup),
        "z_steps_s": median_seconds(lambda: A.z_descent(module.loss_fn(feats, y, x), z0, hp.z_steps, hp.z_lr,
                                                        hp.momentum, hp.z_normalized), repeats, warmup),
        "dynamics_phase_s": median_seconds(dynamics, repeats, warmup),
        "w_phase_s": median_seconds(w_phase, repeats, warmup),
    }
    module.zero_grad(set_to_none=True)
    return profile


def _as_optimizer_list(configured) -> list:
    if isinstance(configured, dict):
        return [configured["optimizer"]]
    if isinstance(configured, tuple) and len(configured) == 2 and isinstance(configured[0], list):
        return list(configured[0])
    if isinstance(configured, (list, tuple)):
        return list(configured)
    return [configured]


class _standalone:
    """A training step without a Trainer: entering yields step(); for manual optimization, self.optimizers(),
    manual_backward, clip_gradients and logging are redirected to plain torch until exit."""

    patched = ("optimizers", "manual_backward", "log", "log_dict", "clip_gradients")

    def __init__(self, module, batch: dict[str, Tensor]):
        self.module, self.batch = module, batch

    def __enter__(self):
        m, batch = self.module, self.batch
        opts = _as_optimizer_list(m.configure_optimizers())
        self.saved = {name: m.__dict__[name] for name in self.patched if name in m.__dict__}
        m.optimizers = lambda use_pl_optimizer=True: opts if len(opts) > 1 else opts[0]
        m.manual_backward = lambda loss, *args, **kwargs: loss.backward()
        m.log = m.log_dict = lambda *args, **kwargs: None
        m.clip_gradients = lambda optimizer, gradient_clip_val=None, gradient_clip_algorithm=None: \
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], gradient_clip_val)
        m.train()

        def step():
            out = m.training_step(batch, 0)
            if m.automatic_optimization:
                loss = out["loss"] if isinstance(out, dict) else out
                opts[0].zero_grad(set_to_none=True)
                loss.backward()
                opts[0].step()
        return step

    def __exit__(self, *exc):
        for name in self.patched:
            self.module.__dict__.pop(name, None)
        self.module.__dict__.update(self.saved)
        return False


def perf_report(overrides: list[str], baselines: tuple[str, ...] = ("regressor", "flow"), repeats: int = 5,
                num_samples: int = 10) -> dict:
    """The cGML step against the baselines' on the same nets, data and batch (ratios), its phases, and
    sampling throughput; `overrides` compose the training config as on the cgml-train command line."""
    from hydra import compose, initialize_config_module

    from cgml_lightning.runs import build_datamodule, build_module

    with initialize_config_module("cgml_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
        datamodule = build_datamodule(cfg)
        modules = {"cgml": build_module(cfg, datamodule)}
        shared = [o for o in overrides if not o.lstrip("+~").startswith("model")]     # model.* keys are cGML's
        for name in baselines:
            modules[name] = build_module(compose("train", overrides=[*shared, f"model={name}"]), datamodule)
    batch = next(iter(datamodule.train_dataloader()))
    steps = train_step_seconds(modules, batch, repeats)
    cgml, k = modules["cgml"], modules["cgml"].hparams.z_steps
    x = batch["x"][:16]
    report = {
        "batch_size": len(batch["x"]), "z_steps": k, "start_candidates": cgml.hparams.start_candidates,
        "threads": torch.get_num_threads(),
        "train_s_per_step": steps,
        "step_ratio_to_regressor": {n: t / steps["regressor"] for n, t in steps.items()} if "regressor" in steps else {},
        "goal_ratio": 1 + 0.4 * k,
        "peak_step_memory_mb": peak_step_memory_mb(modules, batch),
        "phases_s": phase_profile(cgml, batch, repeats),
        "samples_per_s": {n: samples_per_second(m, x, num_samples) for n, m in modules.items()},
    }
    return report


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(perf_report(sys.argv[1:]), indent=2))
