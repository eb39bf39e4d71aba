"""Console scripts cgml-train, cgml-eval, cgml-sample: Hydra apps over the configs shipped in cgml_lightning.conf."""
from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from cgml_lightning.evaluation import evaluate as evaluate_module
from cgml_lightning.files import atomic_path, newest_checkpoint, read_checkpoint, save_image, write_json
from cgml_lightning.instantiate import check_targets, datamodule_from_record, instantiate
from cgml_lightning.modules import ConditionalModule
from cgml_lightning.plots import first_test_batch, image_grid, save_samples_png
from cgml_lightning.user_inputs import (UserInputs, build_inputs, check_image_model, hint_guide, image_files,
                                        input_channels, load_hint, load_images, load_mask, task_degradation)

log = logging.getLogger("cgml_lightning")
CONFIG_PATH = "pkg://cgml_lightning.conf"


def plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def output_dir() -> Path:
    return Path(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)


def build_datamodule(cfg: DictConfig):
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def build_module(cfg: DictConfig, datamodule) -> ConditionalModule:
    info = {**datamodule.info(), "data": plain(cfg.data)}
    return instantiate(cfg.model, data_info=info, net=plain(cfg.net), _recursive_=False, _convert_="all")


def run_train(cfg: DictConfig) -> dict[str, float]:
    check_targets(cfg)                                           # refuse a bad _target_ before anything runs
    L.seed_everything(cfg.seed, workers=True)
    out = output_dir()
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    freeze = list((cfg.get("finetune") or {}).get("freeze") or [])
    ckpt_path = resume_path(cfg.get("ckpt_path"), out / "checkpoints")
    if ckpt_path:
        check_resume(ckpt_path, module, cfg)
    elif cfg.get("init_from"):
        module.init_weights_from(cfg.init_from)
        log.info("initialised weights from %s (fresh latent table, optimizers and loop)", cfg.init_from)
    module.freeze_prefixes(freeze)                               # on resume too: a fine-tune stays frozen
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    try:
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        except SIGTERMException as err:                          # checkpoint saved by PreemptionCheckpoint
            raise SystemExit(128 + signal.SIGTERM) from err
        stopped_on = next((c.preempted for c in callbacks if getattr(c, "preempted", None)), None)
        if stopped_on:
            raise SystemExit(128 + int(stopped_on))              # saved and stopped on a signal: not a finished run
        trainer.save_checkpoint(out / "checkpoints" / "last.ckpt")          # full state: resumable
        metrics: dict[str, float] = {}
        if trainer.is_global_zero:
            metrics = evaluate_module(module, datamodule, cfg.eval.num_samples, cfg.eval.num_inputs, cfg.eval.seed)
            metrics["epochs"] = trainer.current_epoch
            write_json(out / "metrics.json", metrics)
            save_samples_png(module, datamodule, out / "samples.png", seed=cfg.eval.seed)
        return metrics
    finally:
        for logger in loggers:                                   # W&B: never let one job bleed into the next
            if type(logger).__name__ == "WandbLogger":
                import wandb

                wandb.finish()


def resume_path(ckpt_path: str | None, folder: Path) -> str | None:
    """ckpt_path as given, or for ckpt_path=last the newest checkpoint in the run's checkpoint folder (None when
    there is none yet: a re-queued job that never saved starts from scratch)."""
    if ckpt_path != "last":
        return ckpt_path
    newest = newest_checkpoint(folder)
    if newest is None:
        log.info("ckpt_path=last: no checkpoint in %s yet; training from scratch", folder)
        return None
    log.info("ckpt_path=last: resuming from %s", newest)
    return str(newest)


def check_resume(path: str, module: ConditionalModule, cfg: DictConfig | None = None) -> None:
    """Resuming continues the same run: refuse a checkpoint made on other data, with another latent table, or
    with another schedule length (Lightning would restore the old scheduler state over the new one)."""
    checkpoint = read_checkpoint(path)
    saved = checkpoint.get("hyper_parameters", {})
    old, new = saved.get("data_info", {}), module.data_info
    for key in ("num_train_samples", "fingerprint", "x_shape", "y_shape"):
        if key in old and old[key] != new.get(key):
            raise ValueError(f"ckpt_path={path} was trained on other data: {key} {old[key]} in the checkpoint vs "
                             f"{new.get(key)} now. Resume on the same data, or fine-tune with init_from={path}.")
    if saved.get("latent_dim", module.latent_dim) != module.latent_dim:
        raise ValueError(f"ckpt_path={path}: latent_dim {saved.get('latent_dim')} in the checkpoint vs "
                         f"{module.latent_dim} now")
    t_max = (cfg.model.get("scheduler") or {}).get("T_max") if cfg is not None else None
    for state in checkpoint.get("lr_schedulers", []):
        if t_max is not None and "T_max" in state and state["T_max"] != t_max:
            raise ValueError(f"ckpt_path={path}: its scheduler has T_max={state['T_max']} but this run asks for "
                             f"{t_max}; resume with the original trainer.max_epochs, or fine-tune with "
                             f"init_from={path} for a new schedule")


def load_checkpoint(ckpt_path: str) -> ConditionalModule:
    """The module a checkpoint holds, of the class it records (never a `_target_`), loaded with weights_only."""
    return ConditionalModule.load_from_checkpoint(ckpt_path, map_location="cpu")


def load_for_inference(cfg: DictConfig):
    """The checkpoint's module, and the data it was trained on unless cfg.data overrides it."""
    module = load_checkpoint(cfg.ckpt_path)
    return module, checkpoint_datamodule(cfg, module)


def checkpoint_datamodule(cfg: DictConfig, module: ConditionalModule):
    """data=... from the command line (through the registry), else the checkpoint's recorded data config, rebuilt
    by datamodule name (a stored `_target_` is never instantiated)."""
    if cfg.get("data"):
        dm = instantiate(cfg.data)
    elif module.data_info.get("data"):
        dm = datamodule_from_record(module.data_info["data"], f"{cfg.ckpt_path}")
    else:
        raise ValueError(f"{cfg.ckpt_path}: the checkpoint records no data config; pass data=... on the command line")
    dm.prepare_data()
    dm.setup("test")
    return dm


def run_eval(cfg: DictConfig) -> dict[str, float]:
    from cgml_lightning.classifier import build_eval_nets

    module, dm = load_for_inference(cfg)
    nets = build_eval_nets(dm, **plain(cfg.feature_net)) if cfg.get("feature_net") else None
    metrics = evaluate_module(module, dm, cfg.num_samples, cfg.num_inputs, cfg.seed, nets, cfg.get("sample_pool"))
    write_json(output_dir() / "metrics.json", metrics)
    return metrics


def sample_inputs(cfg: DictConfig, module: ConditionalModule) -> tuple[UserInputs, Any]:
    """What to condition on: the user's images (input=), else the checkpoint's test inputs, re-masked by mask=.
    Returns them with the checkpoint's datamodule when it was loaded (None for input=: no training data needed)."""
    info = module.data_info
    if cfg.get("input") or cfg.get("mask"):
        channels, height, width = check_image_model(info, "input" if cfg.get("input") else "mask")
        degradation = task_degradation(info.get("data"), info)
        mask = load_mask(cfg.mask, (height, width), cfg.crop) if cfg.get("mask") else None
    if not cfg.get("input"):
        dm = checkpoint_datamodule(cfg, module)
        batch = first_test_batch(dm)
        x, y = batch["x"][: cfg.num_inputs], batch["y"][: cfg.num_inputs]
        if not cfg.get("mask"):
            return UserInputs(x, y, []), dm
        return build_inputs(info, degradation, y, [], mask, degrade=True, seed=cfg.seed), dm   # test images, user mask
    files = image_files(cfg.input)
    if len(files) > cfg.num_inputs:
        log.warning("input: sampling the first %d of %d images under %s (num_inputs=%d; raise it for more)",
                    cfg.num_inputs, len(files), cfg.input, cfg.num_inputs)
        files = files[: cfg.num_inputs]
    images = load_images(files, input_channels(info, degradation, cfg.degrade), (height, width), cfg.crop)
    return build_inputs(info, degradation, images, [str(f) for f in files], mask, cfg.degrade, cfg.seed), None


def hint_kwargs(cfg: DictConfig, module: ConditionalModule, x: Tensor) -> dict[str, Any]:
    """guide= from hint=FILE (masked L1 to its known pixels; for completion only those inside the hole)."""
    channels, height, width = check_image_model(module.data_info, "hint")
    hint, known = load_hint(cfg.hint, channels, (height, width), cfg.crop)
    hole = module.hole(x)
    if hole is not None:                                        # completion: only hidden pixels can follow a hint
        known = known * hole
        if not known.any():
            raise ValueError(f"hint: {cfg.hint} has no known pixel inside the hidden region of any input; "
                             "draw the hint where the mask is white")
    return {"guide": hint_guide(hint, known), "hint": hint, "hint_known": known}


def run_sample(cfg: DictConfig) -> Path:
    """samples.png (input | N samples | the image given, or the truth) and samples.pt (x, samples, y, files, hint)."""
    module = load_checkpoint(cfg.ckpt_path)
    inputs, dm = sample_inputs(cfg, module)
    out = output_dir()
    kwargs = {k: cfg[k] for k in ("guide_steps", "guide_lr", "guide_settle_steps") if cfg.get(k) is not None}
    payload: dict[str, Any] = {"x": inputs.x, "files": inputs.files}
    if cfg.get("hint"):
        guided = hint_kwargs(cfg, module, inputs.x)
        kwargs["guide"] = guided.pop("guide")
        payload.update(guided)
    samples = module.sample(inputs.x, cfg.num_samples, generator=torch.Generator().manual_seed(cfg.seed),
                            pool=cfg.get("sample_pool"), **kwargs)
    payload["samples"] = samples.cpu()
    if inputs.given is not None:
        payload["y"] = inputs.given
    with atomic_path(out / "samples.pt") as tmp:
        torch.save(payload, tmp)
    log.info("wrote %s", out / "samples.pt")
    path = out / "samples.png"
    if module.data_info.get("kind") == "image":
        save_image(image_grid(inputs.x, payload["samples"], inputs.given), path)
        log.info("wrote %s", path)
        return path
    return save_samples_png(module, dm, path, cfg.num_inputs, cfg.num_samples, cfg.seed)   # vector data: a plot


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def train(cfg: DictConfig) -> float | None:
    metrics = run_train(cfg)
    return metrics.get(cfg.get("optimized_metric", ""), None)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def evaluate(cfg: DictConfig) -> None:
    run_eval(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="sample")
def sample(cfg: DictConfig) -> None:
    run_sample(cfg)
