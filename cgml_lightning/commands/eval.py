"""cgml-eval ckpt_path=...: the metrics of a checkpoint on its test inputs, into metrics.json and every logger."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from cgml_lightning.evaluation import evaluate
from cgml_lightning.files import write_json
from cgml_lightning.runs import (CONFIG_PATH, build_loggers, check_output_dir, checkpoint_run_name, load_for_inference,
                                 log_results, plain, run_record, task, user_errors, weights_in_use)


def run_eval(cfg: DictConfig) -> dict[str, float]:
    from cgml_lightning.evaluation.feature_nets import build_eval_nets

    out = check_output_dir()
    module, dm = load_for_inference(cfg)
    loggers = build_loggers(cfg, about=checkpoint_run_name(cfg.ckpt_path), group=module.run_info.get("group"))
    with task(loggers):
        for logger in loggers:
            logger.log_hyperparams({**run_record(cfg, module), "checkpoint_module": plain(module.hparams),
                                    "checkpoint_run": module.run_info})
        nets = build_eval_nets(dm, **plain(cfg.feature_net), device=module.device) if cfg.get("feature_net") else None
        metrics = evaluate(module, dm, cfg.num_samples, cfg.num_inputs, cfg.seed, nets, cfg.get("sample_pool"))
        metrics["weights"] = weights_in_use(module)
        write_json(out / "metrics.json", metrics)
        log_results(loggers, metrics)
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def main(cfg: DictConfig) -> None:
    with user_errors():
        run_eval(cfg)


if __name__ == "__main__":
    main()
