"""The benchmark behind cgml-bench: every module side by side on one task.

Each model (cgml, regressor, cvae, cgan, flow, cimle) is composed from the train config (experiment=TASK model=NAME: the
same data and nets) and trained in this process, one after the other, for the same wall-clock budget (Lightning's
trainer.max_time). A callback copies the weights every few seconds of training; the convergence curve (val best-of-N
PSNR against training seconds) is evaluated from those copies afterwards, so it costs no training time. Then every
model is evaluated on the same test inputs (evaluation.evaluate: PSNR, SSIM, diversity, FID, sample class accuracy),
probed (probe.linear_probe) and timed: train_s_per_step is the median over the same fixed batches, after warm-up;
samples_per_s one batched sample() call of N samples per input, after warm-up. Only ratios mean much: these
machines are noisy. The command (cgml_lightning.commands.bench) writes the reports.
"""
from __future__ import annotations

import logging
import time
from datetime import timedelta
from itertools import islice
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import DataLoader

from cgml_lightning.runs import build_datamodule, build_module
from cgml_lightning.files import save_figure
from cgml_lightning.instantiate import instantiate
from cgml_lightning.evaluation.metrics import psnr
from cgml_lightning.timing import step_profile

log = logging.getLogger("cgml_lightning")

# bench settings of every model's train config (the user's `overrides` come after them and win)
TRAIN_OVERRIDES = ("callbacks=none",       # the bench takes its own snapshots; no checkpoints of a val metric
                   "logger=csv",           # training losses per model in models/NAME/csv
                   "model.scheduler=null")  # constant learning rates: an epoch schedule means nothing under max_time


class Snapshots(L.Callback):
    """Copies the module's weights (to CPU) when training starts, every `every_s` seconds of it and when it ends,
    with the training seconds and batches so far: `points` = [(seconds, batches, state_dict)]."""

    def __init__(self, every_s: float):
        self.every_s = every_s
        self.points: list[tuple[float, int, dict[str, Tensor]]] = []
        self.batches = 0
        self.start = 0.0

    def take(self, module: L.LightningModule) -> None:
        elapsed = time.perf_counter() - self.start
        state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        self.points.append((elapsed, self.batches, state))

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.start = time.perf_counter()
        self.take(module)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args) -> None:
        self.batches += 1
        if time.perf_counter() - self.start >= self.every_s * len(self.points):
            self.take(module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.points[-1][1] != self.batches:
            self.take(module)


# ---- training --------------------------------------------------------------------------------------------------
def train_config(cfg: DictConfig, task: str, model: str, out: Path) -> DictConfig:
    """cgml-train's config for one model of the bench (Hydra compose: the same groups, experiment and overrides)."""
    overrides = [f"experiment={task}", f"model={model}", f"seed={cfg.seed}", *TRAIN_OVERRIDES,
                 f"paths.output_dir='{out / 'models' / model}'", *cfg.overrides]
    return compose(config_name="train", overrides=overrides)


def load_task(cfg: DictConfig, out: Path) -> tuple[str, Any]:
    """(the task that runs, its datamodule set up): cfg.task, or cfg.fallback_task when the task's data is absent."""
    task = cfg.task
    try:
        datamodule = build_datamodule(train_config(cfg, task, cfg.models[0], out))
    except FileNotFoundError as err:
        if not cfg.fallback_task or cfg.fallback_task == task:
            raise
        log.warning("bench: the data of task=%s is not here, so the bench runs task=%s instead "
                    "(fallback_task=null fails instead):\n%s", task, cfg.fallback_task, err)
        task = cfg.fallback_task
        datamodule = build_datamodule(train_config(cfg, task, cfg.models[0], out))
    if datamodule.kind != "image":
        raise ValueError(f"cgml-bench compares image tasks; task={task} gives {datamodule.kind} data")
    return task, datamodule


def train_model(train_cfg: DictConfig, datamodule, budget_s: float, every_s: float):
    """Train one model for budget_s seconds of wall clock: (module, snapshots, device it trained on)."""
    L.seed_everything(train_cfg.seed, workers=True)
    module = build_module(train_cfg, datamodule)
    snapshots = Snapshots(every_s)
    loggers = [instantiate(c) for c in (train_cfg.get("logger") or {}).values() if c]
    trainer: L.Trainer = instantiate(train_cfg.trainer, callbacks=[snapshots], logger=loggers or False,
                                     max_time=timedelta(seconds=budget_s), max_epochs=-1, limit_val_batches=0,
                                     num_sanity_val_steps=0, enable_checkpointing=False)
    trainer.fit(module, datamodule=datamodule)
    if trainer.interrupted:
        raise KeyboardInterrupt(f"bench: training of model={type(module).module_name} interrupted")
    return module, snapshots, trainer.strategy.root_device


# ---- measurements ----------------------------------------------------------------------------------------------
def first_batches(datamodule, split: str, batch_size: int, count: int) -> list[dict[str, Tensor]]:
    """The first `count` batches of a split in its own order (each sample's fixed degradation): the same inputs
    for every model."""
    data = datamodule.splits[split]
    if len(data) == 0:
        raise ValueError(f"cgml-bench: the {split} split it measures on is empty")
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=datamodule.collate)
    return list(islice(loader, count))


def first_inputs(datamodule, split: str, count: int) -> dict[str, Tensor]:
    return first_batches(datamodule, split, count, 1)[0]


@torch.no_grad()
def convergence_curve(module, snapshots: Snapshots, batch: dict[str, Tensor], num_samples: int,
                      seed: int) -> list[dict[str, float]]:
    """Best-of-N PSNR on fixed val inputs at each snapshot; leaves the module at the last one (its trained weights)."""
    curve = []
    for seconds, batches, state in snapshots.points:
        module.load_state_dict(state)
        samples = module.sample(batch["x"], num_samples, seed=seed).cpu()
        curve.append({"seconds": round(seconds, 3), "batches": batches,
                      "psnr_best_of_n": psnr(samples, batch["y"]).amax(1).mean().item()})
    return curve


def step_timing(module, train_cfg: DictConfig, batches: list[dict[str, Tensor]], warmup: int) -> dict[str, Any]:
    """timing.step_profile over the given batches on the model's own accelerator and precision: the median step
    (every module's own training_step, as in training), its peak memory and cGML's phases. The weights change."""
    trainer = train_cfg.trainer
    return step_profile(module, batches, warmup, accelerator=trainer.get("accelerator", "auto"),
                        precision=trainer.get("precision") or "32-true")


# ---- reports ---------------------------------------------------------------------------------------------------
def plot_curves(models: dict[str, dict], path: Path, num_samples: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, result in models.items():
        curve = result["curve"]
        ax.plot([p["seconds"] for p in curve], [p["psnr_best_of_n"] for p in curve], marker="o", label=name)
    ax.set_xlabel("training wall-clock (s)")
    ax.set_ylabel(f"val best-of-{num_samples} PSNR (dB)")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def goals(models: dict[str, dict]) -> list[tuple[str, bool | None, str]]:
    """The benchmark's goals: (goal, met or None when a model it needs is missing, the numbers)."""
    def get(name: str, key: str):
        return models.get(name, {}).get(key)

    def fmt(value, spec: str = ".2f") -> str:
        return "n/a" if value is None else format(value, spec)

    out = []
    cg = get("cgml", "psnr_best_of_n")
    peers = {n: r["psnr_best_of_n"] for n, r in models.items() if n != "cgml"}
    if cg is not None and peers and "regressor" in peers:
        ok = all(cg >= p for p in peers.values()) and cg >= peers["regressor"] + 1
        out.append(("cGML best-of-N PSNR >= every peer's and >= the regressor's + 1 dB", ok,
                    ", ".join(f"{n} {v:.2f}" for n, v in {"cgml": cg, **peers}.items())))
    fids = {n: get(n, "fid") for n in ("cgml", "cvae", "cgan")}
    if all(n in models for n in fids):
        ok = None if None in fids.values() else fids["cgml"] < min(fids["cvae"], fids["cgan"])
        out.append(("cGML FID lower than cVAE's and cGAN's", ok, ", ".join(f"{n} {fmt(v)}" for n, v in fids.items())))
    if "cgml" in models and "regressor" in models:
        div = get("cgml", "diversity"), get("regressor", "diversity")
        out.append(("cGML diversity well above the regressor's (by > 0.01 mean pixel L1)", div[0] > div[1] + 0.01,
                    f"cgml {div[0]:.4f}, regressor {div[1]:.4f}"))
        probe = get("cgml", "probe_acc"), get("regressor", "probe_acc")
        out.append(("cGML probe accuracy >= the regressor's", None if None in probe else probe[0] >= probe[1],
                    f"cgml {fmt(probe[0], '.3f')}, regressor {fmt(probe[1], '.3f')}"))
    if "cgml" in models and "flow" in models:
        ratio = get("cgml", "samples_per_s") / get("flow", "samples_per_s")
        out.append(("cGML samples/s >= 10x the flow's (default steps)", ratio >= 10, f"{ratio:.1f}x"))
    if "cgml" in models and "cgan" in models:
        target = models["cgan"]["curve"][-1]["psnr_best_of_n"]
        cgan_s = models["cgan"]["curve"][-1]["seconds"]
        reached = next((p["seconds"] for p in models["cgml"]["curve"] if p["psnr_best_of_n"] >= target), None)
        out.append(("cGML reaches the cGAN's final val best-of-N PSNR in <= half the cGAN's training time",
                    reached is not None and reached <= cgan_s / 2,
                    f"cGAN final {target:.2f} dB at {cgan_s:.0f} s; cGML "
                    + (f"reaches it at {reached:.0f} s" if reached is not None else "never reaches it")))
    return out


def markdown(report: dict[str, Any], phases: dict[str, float] | None) -> str:
    models, n = report["models"], report["num_samples"]
    base = models.get("cgml")

    def cell(value, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    lines = [f"# cgml-bench: {report['task']}", "",
             f"`{report['command']}` (profile {report['profile']}, {report['date']}).", "",
             f"Every model trained for {report['budget_s']:g} s of wall clock on {report['device']} "
             f"(torch threads: {report['torch_threads']}), with the same data, net "
             f"({', '.join(f'{k}={v}' for k, v in report['net'].items())}) and seed; metrics on "
             f"the same {report['num_inputs']} test inputs x N = {n} samples. {report['task_note']}", "",
             f"Evaluation nets: {report['feature_nets']}.", "",
             f"| model | best-of-{n} PSNR | mean PSNR | best-of-{n} SSIM | diversity | FID | sample class acc | "
             "probe acc | s/step | s/step / cgml's | samples/s | samples/s / cgml's | batches trained |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in models.items():
        step_ratio = r["train_s_per_step"] / base["train_s_per_step"] if base else None
        speed_ratio = r["samples_per_s"] / base["samples_per_s"] if base else None
        lines.append(f"| {name} | {r['psnr_best_of_n']:.2f} | {r['psnr_mean']:.2f} | {r['ssim_best_of_n']:.3f} | "
                     f"{r['diversity']:.4f} | {cell(r['fid'], '.2f')} | {cell(r.get('sample_class_acc'), '.3f')} | "
                     f"{cell(r['probe_acc'], '.3f')} | {r['train_s_per_step']:.3f} | {cell(step_ratio, '.2f')} | "
                     f"{r['samples_per_s']:.0f} | {cell(speed_ratio, '.2f')} | {r['batches_trained']} |")
    lines += ["", "PSNR in dB on the whole image (completion: visible pixels kept from the input); diversity: mean "
              "pairwise L1 of the N samples; sample class acc: share of samples the classifier puts in the input's "
              "class; probe acc: logistic regression on frozen encoder features; s/step: median over the same "
              f"{report['timing_batches']} training batches after warm-up.", "",
              "## Quality against training time", "", "![val best-of-N PSNR against training seconds](convergence.png)",
              "", "## Samples of every model for the same test inputs", "",
              "![input | each model's samples | truth](bench_samples.png)", "", "## cGML against the peers", ""]
    for goal, ok, detail in goals(models):
        lines.append(f"- {'n/a' if ok is None else 'met' if ok else 'NOT met'}: {goal} ({detail})")
    if phases:
        total = sum(phases.values())
        lines += ["", "## cGML training step, per phase", "",
                  f"The sections cGML's training step records (`phase()`, Lightning's SimpleProfiler), median over "
                  f"the {report['timing_batches']} timed steps.", "", "| phase | seconds | share |", "|---|---|---|"]
        lines += [f"| {k} | {v:.4f} | {v / total:.0%} |" for k, v in phases.items()]
    return "\n".join(lines) + "\n"
