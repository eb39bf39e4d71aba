"""cgml-train: compose a run from the configs, train it, evaluate it, and report to the run dir and every logger."""
from __future__ import annotations

import logging

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig

from cgml_lightning.evaluation import evaluate, vector_metric_keys
from cgml_lightning.files import write_json
from cgml_lightning.instantiate import check_targets, instantiate
from cgml_lightning.models.base import is_count
from cgml_lightning.plots import save_samples_png
from cgml_lightning.runs import (CONFIG_PATH, build_datamodule, build_loggers, build_module, check_manual_steps,
                                 check_model_config, check_output_dir, check_resume, check_trainer,
                                 check_training_folder, log_picture, log_results, logged_step, optimized_value,
                                 resume_path, run_record, task, training_run_info, user_errors,
                                 weights_in_use)

log = logging.getLogger("cgml_lightning")


def run_train(cfg: DictConfig) -> dict[str, float]:
    check_targets(cfg)                                           # refuse a bad _target_ before anything runs
    check_model_config(cfg.model)
    check_trainer(cfg.trainer)
    if HydraConfig.get().runtime.choices.get("hparams_search") and not cfg.get("optimized_metric"):
        raise ValueError("hparams_search needs optimized_metric= (a key of metrics.json) and optimized_direction=")
    if not is_count(cfg.seed) or cfg.seed < 0:                  # the per-draw degradations seed numpy with it
        raise ValueError(f"seed must be a whole number, 0 or more; got {cfg.seed!r}")
    L.seed_everything(cfg.seed, workers=True)
    out = check_output_dir()
    check_training_folder(out, cfg.get("ckpt_path"))
    ckpt_path = resume_path(cfg.get("ckpt_path"), out / "checkpoints")
    freeze = list((cfg.get("finetune") or {}).get("freeze") or [])
    if freeze and not (ckpt_path or cfg.get("init_from")):
        raise ValueError(f"finetune.freeze={freeze} keeps the weights init_from= loads; without init_from= it would "
                         f"freeze randomly initialised ones")
    datamodule = build_datamodule(cfg)
    keys = vector_metric_keys(datamodule)
    if keys is not None:                                  # a sweep's metric this data never reports: before training
        optimized_value(cfg, dict.fromkeys(keys, 0.0), grid_warns=False)
    module = build_module(cfg, datamodule)
    check_manual_steps(module, cfg.trainer)
    if ckpt_path:
        check_resume(ckpt_path, module, cfg)
        if cfg.get("init_from"):
            log.warning("resuming %s: init_from=%s is not applied (it starts a fine-tune; a resume goes on from the "
                        "checkpoint's own weights)", ckpt_path, cfg.init_from)
    elif cfg.get("init_from"):
        module.init_weights_from(cfg.init_from)
        log.info("initialised weights from %s (fresh latent table, optimizers and loop)", cfg.init_from)
    module.freeze_prefixes(freeze)                                                  # on resume too
    module.run_info = training_run_info(cfg)
    loggers = build_loggers(cfg, resumed=bool(ckpt_path))
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    if not loggers:                                              # it logs to loggers and refuses to run without
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    with task(loggers):
        for logger in loggers:
            logger.log_hyperparams(run_record(cfg, module))
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        trainer.save_checkpoint(out / "checkpoints" / "last.ckpt")          # full state: resumable
        metrics: dict[str, float] = {}
        if trainer.is_global_zero:
            metrics = evaluate(module, datamodule, cfg.eval.num_samples, cfg.eval.num_inputs, cfg.eval.seed)
            metrics["epochs"] = trainer.current_epoch
            metrics["weights"] = weights_in_use(module)
            write_json(out / "metrics.json", metrics)
            picture = save_samples_png(module, datamodule, out / "samples.png", seed=cfg.eval.seed)
            log_results(loggers, metrics, logged_step(trainer))
            log_picture(loggers, "test/samples", picture, sample_caption(datamodule, 8), logged_step(trainer))
        return metrics


def sample_caption(datamodule, num_samples: int) -> str:
    if datamodule.kind == "image":
        return f"one row per test input: input | {num_samples} samples | truth"
    return "samples (red) against x, true modes (black lines) or the test targets (black x)"


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> float | None:
    with user_errors():
        metrics = run_train(cfg)
        return optimized_value(cfg, metrics) if metrics else None


if __name__ == "__main__":
    main()
