"""The benchmark behind cgml-bench: every module side by side on one task, over one or more seeds.

Each model (cgml, regressor, cvae, cgan, flow, cimle) is composed from the train config (experiment=TASK model=NAME
seed=S: the same data and nets) and trained in this process, one after the other, for the same wall-clock budget
(Lightning's trainer.max_time), once per seed. A callback copies the weights every few seconds of training; the
convergence curve (val best-of-N PSNR against training seconds) is evaluated from those copies afterwards, so it
costs no training time. Every model of every seed is evaluated on the same test inputs (evaluation.evaluate: PSNR,
SSIM, the diversity measures, FID, sample class accuracy) and probed (probe.linear_probe); the models of the first
seed also give the curve and the timings: train_s_per_step is the median over the same fixed batches, after warm-up;
samples_per_s one batched sample() call of N samples per input, after warm-up. Only ratios mean much: these
machines are noisy. `seed_summary` folds a model's per-seed results into means and sample standard deviations;
`goals` judges the means. The command (cgml_lightning.commands.bench) writes the reports.
"""
from __future__ import annotations

import logging
import statistics
import time
from datetime import timedelta
from itertools import islice
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from hydra import compose
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import DataLoader

from cgml_lightning.models import MODULES
from cgml_lightning.runs import build_datamodule, build_module, check_trainer
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
        module.update_average()              # a snapshot inside a batch holds that batch's average too
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
def check_bench(cfg: DictConfig, out: Path) -> None:
    """Refuse, before any data is read, what would lose or mislabel results: a folder that holds an earlier bench
    report (it would be replaced), a model listed twice, a `model=` in the overrides (the rows would carry other
    models' names), a budget that trains nothing, fewer than two evaluation inputs."""
    if (out / "bench.json").exists():
        raise ValueError(f"{out} holds an earlier bench report (bench.json); give a new hydra.run.dir")
    models = [str(m) for m in cfg.models]
    if len(set(models)) != len(models):
        raise ValueError(f"models={models}: each model once")
    for name in ("overrides", *(f"model_overrides.{m}" for m in models)):
        given = cfg.overrides if name == "overrides" else model_overrides(cfg, name.split(".", 1)[1])
        if any(str(o).lstrip("+~").split("=", 1)[0] == "model" for o in given):
            raise ValueError(f"{name}: `model=` would train another model under this row's name; list the models "
                             f"in models=[...]")
    if not (isinstance(cfg.profile.budget_s, (int, float)) and cfg.profile.budget_s > 0):
        raise ValueError(f"profile.budget_s must be a positive number of seconds; got {cfg.profile.budget_s!r}")
    if not (isinstance(cfg.profile.num_inputs, int) and cfg.profile.num_inputs >= 2):
        raise ValueError(f"profile.num_inputs must be at least 2 (FID and diversity compare several); got "
                         f"{cfg.profile.num_inputs!r}")


def bench_seeds(seeds) -> list[int]:
    """The bench's `seeds`: a list of distinct ints as given, or an int N for the seeds 0 .. N-1."""
    if isinstance(seeds, bool):
        raise ValueError(f"seeds: a list of ints or a count N (seeds 0..N-1); got {seeds!r}")
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"seeds={seeds}: a count of seeds must be at least 1")
        return list(range(seeds))
    if isinstance(seeds, str) or not isinstance(seeds, Sequence):
        raise ValueError(f"seeds: a list of ints or a count N (seeds 0..N-1); got {seeds!r}")
    out = list(seeds)
    if not out or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in out):
        raise ValueError(f"seeds: a non-empty list of ints (0 or more) or a count N (seeds 0..N-1); got {out!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"seeds: each seed once; got {out}")
    return out


def model_overrides(cfg: DictConfig, model: str) -> list[str]:
    """The bench's `model_overrides` for one model (a list of cgml-train overrides; none when the model has no entry).
    Every key must name a model config, so that a misspelt name fails instead of silently benching the defaults."""
    given = cfg.get("model_overrides") or {}
    unknown = sorted(set(given) - set(MODULES))
    if unknown:
        raise ValueError(f"model_overrides: {unknown} name no model; the models are {sorted(MODULES)}")
    entry = given.get(model) or []
    if isinstance(entry, str):
        raise ValueError(f"model_overrides.{model}: a list of overrides, e.g. '[\"model.w_steps=2\"]'; "
                         f"got {entry!r}")
    return [str(o) for o in entry]


def train_config(cfg: DictConfig, task: str, model: str, out: Path, seed: int) -> DictConfig:
    """cgml-train's config for one model and seed of the bench (Hydra compose: the same groups and experiment, then
    `overrides` for every model, then the model's own `model_overrides`). The training logs go to models/NAME/, and
    to models/NAME/seed_S/ for the seeds after the first."""
    extra = [*cfg.overrides, *model_overrides(cfg, model)]
    if any(str(o).lstrip("+~").startswith("seed=") for o in extra):
        raise ValueError(f"overrides={extra}: the bench sets each model's seed from seeds=; "
                         "pass seeds=[...] instead of seed=")
    folder = out / "models" / model
    if seed != bench_seeds(cfg.seeds)[0]:
        folder = folder / f"seed_{seed}"
    overrides = [f"experiment={task}", f"model={model}", f"seed={seed}", *TRAIN_OVERRIDES,
                 f"paths.output_dir='{folder}'", *extra]
    return compose(config_name="train", overrides=overrides)


def load_task(cfg: DictConfig, out: Path) -> tuple[str, Any]:
    """(the task that runs, its datamodule set up): cfg.task, or cfg.fallback_task when the task's data is absent."""
    task, seed = cfg.task, bench_seeds(cfg.seeds)[0]
    first = train_config(cfg, task, cfg.models[0], out, seed)
    check_trainer(first.trainer)
    try:
        datamodule = build_datamodule(first)
    except FileNotFoundError as err:
        if not cfg.fallback_task or cfg.fallback_task == task:
            raise
        log.warning("bench: the data of task=%s is not here, so the bench runs task=%s instead "
                    "(fallback_task=null fails instead):\n%s", task, cfg.fallback_task, err)
        task = cfg.fallback_task
        datamodule = build_datamodule(train_config(cfg, task, cfg.models[0], out, seed))
    if datamodule.kind != "image":
        raise ValueError(f"cgml-bench compares image tasks; task={task} gives {datamodule.kind} data")
    return task, datamodule


def build_every_model(cfg: DictConfig, task: str, datamodule, out: Path, seed: int) -> None:
    """Build each model and its optimizers once before any trains: a setting one of them refuses (a negative
    learning rate, an unknown key) fails the bench before other models' results exist to be lost."""
    for name in cfg.models:
        module = build_module(train_config(cfg, task, name, out, seed), datamodule)
        module.configure_optimizers()
        del module


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


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def seed_summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One model's results of every seed -> {key: mean over the seeds, ..., "std": {key: sample standard deviation
    over the seeds (0 for one seed)}} for every numeric key. A key that some seed lacks or reports as null gets
    null mean and std; a value every seed agrees on is kept as it is (counts stay ints). Other keys (names) keep
    the first seed's value."""
    out: dict[str, Any] = {}
    std: dict[str, float | None] = {}
    keys = list(dict.fromkeys(k for r in results for k in r))
    for key in keys:
        values = [r.get(key) for r in results]
        if not any(is_number(v) for v in values):
            out[key] = values[0]
        elif not all(is_number(v) for v in values):
            out[key], std[key] = None, None
        elif all(v == values[0] for v in values):
            out[key], std[key] = values[0], 0.0
        else:
            out[key] = statistics.fmean(values)
            std[key] = statistics.stdev(values)
    return {**out, "std": std}


# what the bench also measures on the live weights of a model trained with model.ema_decay (as live_<key>)
LIVE_KEYS = ("psnr_best_of_n", "psnr_mean", "diversity", "diversity_features", "fid")

# the goals of cGML against the peers, as bench.md words them
GOALS = {"psnr": "cGML best-of-N PSNR >= every other model's and >= the regressor's + 1 dB",
         "fid": "cGML FID <= every other model's (regressor included)",
         "mean_psnr": "cGML mean PSNR within 1.0 dB of the regressor's (at most 1.0 dB below it)",
         "diversity": "cGML feature diversity >= the cGAN's and >= cIMLE's"}


def goals(models: dict[str, dict]) -> list[tuple[str, bool | None, str]]:
    """The benchmark's goals on the models' results (the seed means): (goal, met, or None when unknown: a model it
    needs is not in the run or a figure is null, the figures)."""
    def get(name: str, key: str):
        return models.get(name, {}).get(key)

    def fmt(value, spec: str = ".2f") -> str:
        return "n/a" if value is None else format(value, spec)

    def figures(values: dict[str, Any], spec: str = ".2f") -> str:
        return ", ".join(f"{n} {fmt(v, spec)}" for n, v in values.items())

    def missing(*names: str) -> str | None:
        absent = [n for n in names if n not in models]
        return f"{', '.join(absent)} not in this run" if absent else None

    out = []
    absent = missing("cgml", "regressor")
    psnr_best = {n: r.get("psnr_best_of_n") for n, r in models.items()}
    if absent:
        out.append((GOALS["psnr"], None, absent))
    else:
        cg, peers = psnr_best["cgml"], {n: v for n, v in psnr_best.items() if n != "cgml"}
        ok = None if None in psnr_best.values() else (all(cg >= v for v in peers.values())
                                                     and cg >= peers["regressor"] + 1)
        out.append((GOALS["psnr"], ok, figures(psnr_best)))
    fids = {n: r.get("fid") for n, r in models.items()}
    if absent:
        out.append((GOALS["fid"], None, absent))
    else:
        ok = None if None in fids.values() else all(fids["cgml"] <= v for v in fids.values())
        out.append((GOALS["fid"], ok, figures(fids) + ("" if ok is not None else " (FID null: no feature net)")))
    if absent:
        out.append((GOALS["mean_psnr"], None, absent))
    else:
        means = {n: get(n, "psnr_mean") for n in ("cgml", "regressor")}
        ok = None if None in means.values() else means["cgml"] >= means["regressor"] - 1.0
        out.append((GOALS["mean_psnr"], ok, figures(means)))
    absent_div = missing("cgml", "cgan", "cimle")
    if absent_div:
        out.append((GOALS["diversity"], None, absent_div))
    else:
        names = ("cgml", "cgan", "cimle")
        key = "diversity_features" if all(get(n, "diversity_features") is not None for n in names) else "diversity"
        div = {n: get(n, key) for n in names}
        ok = None if None in div.values() else div["cgml"] >= max(div["cgan"], div["cimle"])
        note = "" if key == "diversity_features" else (
            "; diversity_features is null, so pixel diversity stands in")
        out.append((GOALS["diversity"], ok, f"{key}: {figures(div, '.4f')}{note}"))
    if "cgml" in models and "regressor" in models:
        probe = get("cgml", "probe_acc"), get("regressor", "probe_acc")
        out.append(("cGML probe accuracy >= the regressor's", None if None in probe else probe[0] >= probe[1],
                    f"cgml {fmt(probe[0], '.3f')}, regressor {fmt(probe[1], '.3f')}"))
    if "cgml" in models and "flow" in models:
        speeds = get("cgml", "samples_per_s"), get("flow", "samples_per_s")
        ratio = None if None in speeds else speeds[0] / speeds[1]
        out.append(("cGML samples/s >= 10x the flow's (default steps)", None if ratio is None else ratio >= 10,
                    f"{fmt(ratio, '.1f')}x"))
    if "cgml" in models and "cgan" in models and get("cgml", "curve") and get("cgan", "curve"):
        target = models["cgan"]["curve"][-1]["psnr_best_of_n"]
        cgan_s = models["cgan"]["curve"][-1]["seconds"]
        reached = next((p["seconds"] for p in models["cgml"]["curve"] if p["psnr_best_of_n"] >= target), None)
        out.append(("cGML reaches the cGAN's final val best-of-N PSNR in <= half the cGAN's training time",
                    reached is not None and reached <= cgan_s / 2,
                    f"cGAN final {target:.2f} dB at {cgan_s:.0f} s; cGML "
                    + (f"reaches it at {reached:.0f} s" if reached is not None else "never reaches it")))
    return out


def protocol(metrics: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """The evaluation protocol of a bench run, from one evaluate() result: seeds, inputs and samples, FID's
    reference and feature net and counts, the feature net of diversity_features, LPIPS (null when it did not run)."""
    keys = ("num_inputs", "num_samples", "fid_reference", "fid_num_real", "fid_num_fake", "fid_feature_net",
            "diversity_feature_net", "lpips_net", "lpips_version")
    return {"seeds": seeds, **{key: metrics.get(key) for key in keys}}


def averaging_table(models: dict[str, dict]) -> list[str]:
    """bench.md's section on weight averaging: each model trained with model.ema_decay, its averaged against its live
    weights (the live_<key> results of the same run); nothing when no model averaged."""
    averaged = [name for name, r in models.items() if r.get("live_psnr_best_of_n") is not None]
    if not averaged:
        return []

    def pair(r: dict[str, Any], key: str) -> str:
        spec = ".4f" if "diversity" in key else ".2f"
        return " / ".join("n/a" if r.get(k) is None else format(r[k], spec) for k in (key, f"live_{key}"))

    return ["## Averaged weights (EMA) against the live ones of the same runs", "",
            "| model | " + " | ".join(f"{key}: averaged / live" for key in LIVE_KEYS) + " |",
            "|---|" + "---|" * len(LIVE_KEYS),
            *[f"| {name} | " + " | ".join(pair(models[name], key) for key in LIVE_KEYS) + " |" for name in averaged],
            "", "The other tables and the goals use the averaged weights.", ""]


def own_settings(overrides: dict[str, list[str]]) -> list[str]:
    """bench.md's line on the models' own settings (model_overrides), with its blank line; none when all are empty."""
    given = {name: entry for name, entry in overrides.items() if entry}
    if not given:
        return []
    return ["Each model's own settings (`model_overrides`): "
            + "; ".join(f"{name}: `{' '.join(entry)}`" for name, entry in given.items()) + ".", ""]


def markdown(report: dict[str, Any], phases: dict[str, float] | None) -> str:
    """bench.md: the run, the protocol, the table (mean ± sample std over the seeds when there are several), the
    pictures and the goals."""
    models, n, seeds, proto = report["models"], report["num_samples"], report["seeds"], report["protocol"]
    base = models.get("cgml")
    several = len(seeds) > 1

    def cell(value, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    def spread(r: dict[str, Any], key: str, spec: str) -> str:
        value, std = r.get(key), r.get("std", {}).get(key)
        if value is None or not several or std is None:
            return cell(value, spec)
        return f"{value:{spec}} ± {std:{spec}}"

    seed_text = (f"seed {seeds[0]}" if not several else
                 f"{len(seeds)} seeds ({', '.join(map(str, seeds))}): every cell of the evaluation is the mean ± the "
                 "sample standard deviation over the seeds; the training curve, timings and pictures are of the "
                 f"first seed ({seeds[0]})")
    fid_net, div_net = proto.get("fid_feature_net"), proto.get("diversity_feature_net")
    fid_text = ("FID: none (no feature net)" if fid_net is None else
                f"FID of the {proto['fid_num_fake']} samples against the {proto['fid_num_real']} "
                f"{proto['fid_reference']} in the FID features above")
    div_text = ("feature diversity: null (no feature net)" if div_net is None else
                "feature diversity in the same features" if div_net == fid_net else f"feature diversity in {div_net}")
    lpips_text = (f"LPIPS diversity through {proto['lpips_net']} (torchmetrics {proto['lpips_version']})"
                  if proto.get("lpips_net") else "LPIPS diversity: null (the reason is with the evaluation nets)")
    lines = [f"# cgml-bench: {report['task']}", "",
             f"`{report['command']}` (profile {report['profile']}, {report['date']}).", "",
             f"Every model trained for {report['budget_s']:g} s of wall clock on {report['device']} "
             f"(torch threads: {report['torch_threads']}), with the same data and net "
             f"({', '.join(f'{k}={v}' for k, v in report['net'].items())}); {seed_text}. Metrics on "
             f"the same {report['num_inputs']} test inputs x N = {n} samples. {report['task_note']}", "",
             *own_settings(report.get("model_overrides") or {}),
             f"Evaluation nets: {report['feature_nets']}.", "",
             f"Protocol (docs/evaluation.md): {fid_text}; {div_text}; {lpips_text}.", "",
             f"| model | best-of-{n} PSNR | mean PSNR | best-of-{n} SSIM | diversity | feature diversity | FID | "
             "sample class acc | probe acc | s/step | s/step / cgml's | samples/s | samples/s / cgml's | "
             "batches trained |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in models.items():
        step_ratio = r["train_s_per_step"] / base["train_s_per_step"] if base else None
        speed_ratio = r["samples_per_s"] / base["samples_per_s"] if base else None
        lines.append(f"| {name} | {spread(r, 'psnr_best_of_n', '.2f')} | {spread(r, 'psnr_mean', '.2f')} | "
                     f"{spread(r, 'ssim_best_of_n', '.3f')} | {spread(r, 'diversity', '.4f')} | "
                     f"{spread(r, 'diversity_features', '.4f')} | {spread(r, 'fid', '.2f')} | "
                     f"{spread(r, 'sample_class_acc', '.3f')} | {spread(r, 'probe_acc', '.3f')} | "
                     f"{r['train_s_per_step']:.3f} | {cell(step_ratio, '.2f')} | {r['samples_per_s']:.0f} | "
                     f"{cell(speed_ratio, '.2f')} | {spread(r, 'batches_trained', '.1f' if several else '.0f')} |")
    lines += ["", "PSNR in dB on the whole image (completion: visible pixels kept from the input); diversity: mean "
              "pairwise pixel L1 of the N samples; feature diversity: mean pairwise distance of their unit-normalised "
              "features in FID's feature net; sample class acc: share of samples the classifier puts in the input's "
              "class; probe acc: logistic regression on frozen encoder features; s/step: median over the same "
              f"{report['timing_batches']} training batches after warm-up"
              + (", timed on the first seed's models; samples/s likewise." if several else "."), "",
              "## Quality against training time", "", "![val best-of-N PSNR against training seconds](convergence.png)",
              "", "## Samples of every model for the same test inputs", "",
              "![input | each model's samples | truth](bench_samples.png)", "", "## cGML against the peers", "",
              ("On the seed means (the training-time goal on the first seed's curves)." if several else
               f"On the results of seed {seeds[0]}."), ""]
    at = lines.index("## cGML against the peers")
    lines[at:at] = averaging_table(models)
    for goal, ok, detail in goals(models):
        lines.append(f"- {'unknown' if ok is None else 'met' if ok else 'NOT met'}: {goal} ({detail})")
    if phases:
        total = sum(phases.values())
        lines += ["", "## cGML training step, per phase", "",
                  f"The sections cGML's training step records (`phase()`, Lightning's SimpleProfiler), median over "
                  f"the {report['timing_batches']} timed steps.", "", "| phase | seconds | share |", "|---|---|---|"]
        lines += [f"| {k} | {v:.4f} | {v / total:.0%} |" for k, v in phases.items()]
    return "\n".join(lines) + "\n"
