"""cgml-bench [profile=quick|full] [seeds=[0,1,2]|seeds=3] [logger=wandb]: every model trained on one task for the
same wall clock, once per seed, then evaluated, probed and timed side by side (cgml_lightning.benchmark). Writes
bench.json (every seed's results, their means and spreads), bench.md, convergence.png and bench_samples.png (every
model's samples for the same inputs, first seed) into the run dir, and gives the table and the pictures to the
loggers."""
from __future__ import annotations

import logging
import math
from datetime import datetime
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cgml_lightning.benchmark import (LIVE_KEYS, bench_seeds, build_every_model, check_bench, convergence_curve,
                                      first_batches, first_inputs, load_task, markdown, model_overrides, plot_curves,
                                      protocol, seed_summary, step_timing, train_config, train_model)
from cgml_lightning.evaluation import evaluate
from cgml_lightning.evaluation.feature_nets import build_eval_nets, check_fid
from cgml_lightning.evaluation.probe import linear_probe
from cgml_lightning.files import save_image, write_json, write_text
from cgml_lightning.plots import models_grid
from cgml_lightning.runs import (CONFIG_PATH, build_loggers, check_output_dir, is_wandb, log_picture, log_results,
                                 plain, run_record, task, user_errors)
from cgml_lightning.timing import samples_per_second

log = logging.getLogger("cgml_lightning")
TABLE_KEYS = ("psnr_best_of_n", "psnr_mean", "ssim_best_of_n", "diversity", "diversity_hole", "diversity_features",
              "diversity_lpips", "fid", "sample_class_acc", "probe_acc", "train_s_per_step", "samples_per_s",
              "batches_trained")


def run_bench(cfg: DictConfig) -> dict[str, Any]:
    out, prof = check_output_dir(), cfg.profile
    if not cfg.models:
        raise ValueError("models: the bench needs at least one model")
    check_bench(cfg, out)
    loggers = build_loggers(cfg)
    with task(loggers):
        report = bench(cfg, out, prof)
        for logger in loggers:
            logger.log_hyperparams(run_record(cfg))
        log_results(loggers, {f"{name}/{key}": result.get(key) for name, result in report["models"].items()
                              for key in TABLE_KEYS})
        for logger in loggers:
            if is_wandb(logger):
                logger.log_table(key="bench/results", columns=["model", *TABLE_KEYS],
                                 data=[[name, *(result.get(k) for k in TABLE_KEYS)]
                                       for name, result in report["models"].items()])
        log_picture(loggers, "bench/convergence", out / "convergence.png",
                    "validation best-of-N PSNR against training seconds, every model")
        log_picture(loggers, "bench/samples", out / "bench_samples.png",
                    "one row per test input: input | each model's samples (columns named above) | truth")
    return report


def bench(cfg: DictConfig, out, prof) -> dict[str, Any]:
    seeds = bench_seeds(cfg.seeds)
    task_name, datamodule = load_task(cfg, out)
    task_note = "" if task_name == cfg.task else f"(Ran {task_name}: the data of {cfg.task} was not found.)"
    datamodule.setup()
    check_fid(datamodule, cfg.feature_net.fid)                 # before any model trains
    build_every_model(cfg, task_name, datamodule, out, seeds[0])
    curve_batch = first_inputs(datamodule, "val", prof.curve_num_inputs)
    speed_x = first_inputs(datamodule, "test", prof.speed_inputs)["x"]
    picture_batch = first_inputs(datamodule, "test", prof.picture_inputs)
    timing_batches = first_batches(datamodule, "train", datamodule.batch_size,
                                   prof.timing_warmup + prof.timing_batches)

    per_seed: list[dict[str, Any]] = []
    curves, timings, pictures, nets, phases, first = {}, {}, {}, None, None, {}
    for k, seed in enumerate(seeds):
        configs = {name: train_config(cfg, task_name, name, out, seed) for name in cfg.models}
        for name, train_cfg in configs.items():
            if plain(train_cfg.data) != plain(configs[cfg.models[0]].data):
                raise ValueError(f"overrides: model={name} composes other data than model={cfg.models[0]}; "
                                 "the bench trains every model on the same data")
        results: dict[str, dict[str, Any]] = {}
        models = {}
        for i, (name, train_cfg) in enumerate(configs.items(), 1):
            stage = f"bench [{i}/{len(configs)}] model={name}" + (f" seed={seed} [{k + 1}/{len(seeds)}]"
                                                                  if len(seeds) > 1 else "")
            log.info("%s: training for %g s", stage, prof.budget_s)
            every_s = prof.curve_every_s if k == 0 else math.inf      # the curve: first seed only
            module, snapshots, device = train_model(train_cfg, datamodule, prof.budget_s, every_s)
            module.to(device)
            if k == 0:
                log.info("%s: convergence curve over %d snapshots", stage, len(snapshots.points))
                curves[name] = convergence_curve(module, snapshots, curve_batch, prof.curve_num_samples, seed)
            if nets is None:                                       # on the device the models train on
                nets = build_eval_nets(datamodule, **plain(cfg.feature_net), device=device)
            seconds, batches = snapshots.points[-1][:2]
            results[name] = {**score(module, datamodule, prof, seed, nets, stage), "train_s": round(seconds, 3),
                             "batches_trained": batches}
            log.info("%s: trained %d batches in %.0f s; best-of-%d PSNR %.2f, FID %s, probe %s", stage, batches,
                     seconds, prof.num_samples, results[name]["psnr_best_of_n"], results[name].get("fid"),
                     results[name]["probe_acc"])
            if k == 0:
                pictures[name] = module.sample(picture_batch["x"], prof.picture_samples, seed=seed).cpu()
                models[name] = module
            del module, snapshots
        if k == 0:
            first = {"device": str(next(iter(models.values())).device),
                     "z_steps": models["cgml"].hparams.z_steps if "cgml" in models else None,
                     "net": plain(configs[cfg.models[0]].net)}
            for i, (name, module) in enumerate(models.items(), 1):   # timings after the first seed's training,
                log.info("bench timing [%d/%d] model=%s", i, len(models), name)   # one model at a time
                speed = samples_per_second(module, speed_x, prof.num_samples, prof.speed_repeats)
                timing = step_timing(module, configs[name], timing_batches, prof.timing_warmup)
                timings[name] = {"train_s_per_step": timing["step_s"], "samples_per_s": speed}
                phases = timing["phases_s"] if name == "cgml" else phases
                log.info("bench timing model=%s: %.3f s/step, %.0f samples/s", name, timing["step_s"], speed)
        models.clear()
        per_seed.append({"seed": seed, "models": results})

    summary = {name: {**seed_summary([run["models"][name] for run in per_seed]), **timings[name],
                      "curve": curves[name]} for name in cfg.models}
    first_result = per_seed[0]["models"][cfg.models[0]]
    hydra_cfg = HydraConfig.get()
    report = {"task": task_name, "z_steps": first["z_steps"], "seeds": seeds, "models": summary,
              "per_seed": per_seed, "protocol": protocol(first_result, seeds),
              "profile": hydra_cfg.runtime.choices.get("profile"), "budget_s": prof.budget_s,
              "command": " ".join(["cgml-bench", *hydra_cfg.overrides.task]),
              "model_overrides": {name: model_overrides(cfg, name) for name in cfg.models},
              "date": datetime.now().isoformat("T", "seconds"),
              "device": first["device"], "torch_threads": torch.get_num_threads(),
              "net": first["net"], "num_inputs": first_result["num_inputs"],
              "num_samples": prof.num_samples, "feature_nets": nets.describe(), "task_note": task_note,
              "timing_batches": prof.timing_batches}
    write_json(out / "bench.json", report)
    plot_curves(summary, out / "convergence.png", prof.curve_num_samples)
    save_image(models_grid(picture_batch["x"], pictures, picture_batch["y"]), out / "bench_samples.png")
    write_text(out / "bench.md", markdown(report, phases))
    log.info("wrote %s", out / "bench.md")
    return report


def score(module, datamodule, prof, seed: int, nets, stage: str) -> dict[str, Any]:
    """One trained model's evaluation (evaluate()), with live_<key> for the live weights of a model that averages
    them (model.ema_decay), and probe_acc (None without class labels)."""
    log.info("%s: evaluating", stage)
    metrics = evaluate(module, datamodule, prof.num_samples, prof.num_inputs, seed, nets)
    if module.ema is not None:
        with module.live_weights():
            live = evaluate(module, datamodule, prof.num_samples, prof.num_inputs, seed, nets)
        metrics.update({f"live_{key}": live.get(key) for key in LIVE_KEYS})
    labelled = getattr(datamodule.splits["train"], "label", None) is not None
    if labelled:
        log.info("%s: linear probe", stage)
    probe = linear_probe(module, datamodule, prof.probe_train, prof.probe_test, seed) if labelled else None
    return {**metrics, "probe_acc": probe}


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="bench")
def main(cfg: DictConfig) -> None:
    with user_errors():
        run_bench(cfg)


if __name__ == "__main__":
    main()
