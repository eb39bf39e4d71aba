"""What the commands share: building data, modules and loggers from a composed config, loading and resuming
checkpoints, reporting results to every logger, and the task wrapper that ends a run (W&B finished, exit codes)."""
from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from cgml_lightning.data.base import IndexedDataset
from cgml_lightning.files import newest_checkpoint, read_checkpoint
from cgml_lightning.instantiate import datamodule_from_record, instantiate
from cgml_lightning.models import MODULES, ConditionalModule
from cgml_lightning.models.base import is_count, recorded_module

log = logging.getLogger("cgml_lightning")
PACKAGE_DIR = Path(__file__).resolve().parent
# what the package's own checks raise about a user's data, configs, files and runs
USER_ERRORS = (ValueError, OSError, FloatingPointError, ImportError, RuntimeError)
CONFIG_PATH = "pkg://cgml_lightning.conf"
WANDB_TARGET = "lightning.pytorch.loggers.WandbLogger"
# what a resume may change: how the module samples, checks, compiles or batches its work, how fast its average
# follows (whether it keeps one is checked), gradient clipping (the remedy a non-finite stop names), and where the
# data is read from (the training set's fingerprint vouches for it); every other model and data key continues the
# run as it was
RESUME_MAY_CHANGE = {"z_phase", "sample_steps", "sampler", "val_num_samples", "max_nonfinite_batches", "compile",
                     "channels_last", "start_batching", "table_neighbours", "ema_decay", "clip_grad_norm"}
DATA_MAY_CHANGE = {"_target_", "root", "input_dir", "path", "data_dir", "download", "num_workers", "eval_batch_size",
                   "check_files", "cache_dir", "max_cache_size", "storage_options"}
SPLIT_KEYS = ("split_seed", "val_fraction", "test_fraction", "max_images", "max_train_samples", "path", "root",
              "input_dir")                      # data keys that decide which samples a split holds


def plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def output_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def check_output_dir() -> Path:
    """The run's output folder, refused where it holds another command's run: cgml-train and cgml-eval both write
    metrics.json, cgml-train and cgml-sample samples.png. Every command but cgml-train keeps its Hydra record in
    .hydra/<command>/ (hydra.output_subdir), so that Hydra, which writes it before any command runs, never replaces
    a training run's .hydra/. A refused run takes its record back, so that it never counts as the folder's run, and
    leaves only its log file there."""
    out, hydra_cfg = output_dir(), HydraConfig.get()
    ours = hydra_cfg.job.config_name
    for record in sorted((out / ".hydra").glob("**/hydra.yaml")):
        job = OmegaConf.load(record).hydra.job
        other = job.get("config_name") or job.get("name")       # the config its command composed: train, eval, ...
        if other != ours:
            if hydra_cfg.output_subdir is not None:
                own = out / hydra_cfg.output_subdir
                for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):   # what Hydra wrote for this run
                    (own / name).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    own.rmdir()                                                  # where nothing else is in it
            multirun = hydra_cfg.mode == RunMode.MULTIRUN
            key = f"hydra.sweep.dir={Path(hydra_cfg.sweep.dir) / ours}" if multirun else f"hydra.run.dir={out / ours}"
            raise ValueError(f"{out} holds a cgml-{other} run ({record}); cgml-{ours} would mix its files with that "
                             f"run's or replace them. Give it a folder of its own, e.g. {key}")
    return out


SHARDED_STRATEGIES = ("fsdp", "deepspeed")      # they split parameters across ranks; the latent table must stay whole


def device_count(devices: Any, accelerator: str) -> int:
    """How many devices Lightning's `devices` asks for: a count, a list or "0,1" of ids, or -1 / "auto" (every GPU;
    one process where torch sees none: the CPU, or Apple's MPS)."""
    if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        return len(devices)
    text = str(devices).strip()
    if "," in text:
        return len([part for part in text.split(",") if part.strip()])
    if text in ("-1", "auto"):
        return max(1, torch.cuda.device_count()) if accelerator in ("gpu", "cuda", "auto") else 1
    return int(text) if text.isdigit() else 1


def process_count(trainer: DictConfig) -> int:
    """How many training processes the trainer config starts: devices x nodes."""
    return (device_count(trainer.get("devices", "auto"), str(trainer.get("accelerator", "auto")))
            * int(trainer.get("num_nodes") or 1))


def check_trainer(trainer: DictConfig) -> None:
    """Refuse, before anything is built, a trainer this machine or the module cannot run: a GPU accelerator where
    torch sees no GPU, a sharded strategy, a max_time Lightning cannot read (its message is no one-line error), or a
    multirun job of several processes under submitit's local launcher
    (Lightning starts the other ranks with a command line that submitit's job runner rejects)."""
    accelerator, strategy = str(trainer.get("accelerator", "auto")), str(trainer.get("strategy", "auto")).lower()
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available() and not (
            accelerator == "gpu" and torch.backends.mps.is_available()):
        raise ValueError(f"trainer.accelerator={accelerator} (trainer=gpu, trainer=ddp): this torch "
                         f"({torch.__version__}) sees no GPU; train on the CPU with trainer=cpu, or in two CPU "
                         f"processes with trainer=ddp_sim")
    if any(name in strategy for name in SHARDED_STRATEGIES):
        raise ValueError(f"trainer.strategy={strategy}: a sharded strategy would split the per-sample latent table "
                         f"across ranks, whose row writes must stay whole on every rank; use trainer=ddp")
    max_time = trainer.get("max_time")                   # Lightning's own reading: DD:HH:MM:SS, or a mapping
    if not (max_time is None or isinstance(max_time, Mapping)
            or isinstance(max_time, str) and re.fullmatch(r"\d+:\d\d:\d\d:\d\d", max_time.strip())):
        raise ValueError(f"trainer.max_time must be DD:HH:MM:SS (00:00:10:00 is 10 minutes) or null; got {max_time!r}")
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    launcher = str(HydraConfig.get().launcher.get("_target_", ""))
    processes = process_count(trainer)
    launched = not any(name in strategy for name in ("spawn", "fork", "notebook"))   # by a command line
    if launcher.endswith("LocalLauncher") and "submitit" in launcher and processes > 1 and launched:
        raise ValueError(f"hydra/launcher=submitit_local runs each job as one process, and trainer.devices="
                         f"{trainer.get('devices')} asks Lightning to start more; use a one-process trainer "
                         f"(trainer=cpu, trainer=gpu) under submitit_local, or hydra/launcher=slurm, which starts one "
                         f"task per device")


def check_training_folder(out: Path, ckpt_path: str | None = None) -> None:
    """cgml-train refuses a folder that holds a training run's checkpoints when it is not resuming that run: a fresh
    run (no ckpt_path) or one resuming a checkpoint from another folder would replace that run's last.ckpt,
    metrics.json and samples.png with its own. ckpt_path=last and a checkpoint of the folder's own pass."""
    found = sorted(p.name for p in (out / "checkpoints").glob("*.ckpt"))
    if not found or ckpt_path == "last":
        return
    shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
    if ckpt_path is None:
        raise ValueError(f"{out} holds a training run's checkpoints ({shown}); a fresh cgml-train there would replace "
                         f"them. Resume that run with ckpt_path=last, fine-tune from it with "
                         f"init_from={out / 'checkpoints' / 'last.ckpt'} into a new hydra.run.dir, or train into a "
                         f"new hydra.run.dir")
    if Path(ckpt_path).expanduser().resolve().parent != (out / "checkpoints").resolve():
        raise ValueError(f"{out} holds a training run's checkpoints ({shown}), and ckpt_path={ckpt_path} is another "
                         f"folder's: resuming it there would replace that run's files with another run's. Resume "
                         f"{ckpt_path} into a new hydra.run.dir, or the folder's own run with ckpt_path=last")


def check_manual_steps(module: ConditionalModule, trainer: DictConfig) -> None:
    """cGML and the cGAN step their optimizers themselves (Lightning's manual optimization): Lightning refuses its
    own clipping and accumulation for them, so name what to use instead."""
    if module.automatic_optimization:
        return
    if (trainer.get("gradient_clip_val") or 0) > 0:
        raise ValueError(f"trainer.gradient_clip_val: model={module.module_name} steps its optimizers itself, which "
                         f"Lightning's clipping does not reach; clip with model.clip_grad_norm")
    if trainer.get("accumulate_grad_batches", 1) != 1:
        raise ValueError(f"trainer.accumulate_grad_batches: model={module.module_name} steps its optimizers itself, "
                         f"after every batch; raise data.batch_size instead")


def check_fresh_sweep_folder(sweep_dir: Path) -> None:
    """A fresh multirun refuses a hydra.sweep.dir whose job folders hold training runs' checkpoints: its jobs
    would rewrite those runs' records (.hydra/, multirun.yaml) with settings that never trained them."""
    found = sorted(str(p.parent.parent.relative_to(sweep_dir)) for p in sweep_dir.glob("**/checkpoints/*.ckpt"))
    if found:
        jobs = ", ".join(sorted(set(found))[:5]) + (", ..." if len(set(found)) > 5 else "")
        raise ValueError(f"hydra.sweep.dir={sweep_dir} holds training runs' checkpoints (jobs {jobs}); a fresh "
                         f"multirun there would rewrite their records. Resume its jobs with ckpt_path=last, or sweep "
                         f"into a new hydra.sweep.dir")


def keep_earlier_record(record: Path) -> None:
    """Before a resume (refused or not) writes its own Hydra record, the folder's record moves to
    record/earlier/N/ (N = 1, 2, ...): the command that trained the run stays on file."""
    names = [name for name in ("config.yaml", "hydra.yaml", "overrides.yaml") if (record / name).is_file()]
    if not names:
        return
    n = 1 + sum(1 for p in (record / "earlier").glob("*") if p.is_dir())
    (record / "earlier" / str(n)).mkdir(parents=True)
    for name in names:
        (record / name).rename(record / "earlier" / str(n) / name)


class TrainingFolderGuard(Callback):
    """cgml-train's Hydra callback, run before Hydra writes a record into the folder: a fresh run is refused where
    it would replace a training run (check_training_folder), so the earlier record stays as it was; a resume
    moves the earlier record to .hydra/earlier/N/ (keep_earlier_record); a fresh multirun is refused where its job
    folders hold checkpoints, before the sweep writes multirun.yaml and the jobs' records (check_fresh_sweep_folder;
    run_train checks each job's folder again, for folders a sweeper names otherwise)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        with user_errors(multirun=False):
            check_training_folder(Path(config.hydra.run.dir), config.get("ckpt_path"))
        if config.get("ckpt_path") is not None and config.hydra.output_subdir is not None:
            keep_earlier_record(Path(config.hydra.run.dir) / config.hydra.output_subdir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get("ckpt_path") is None:
            with user_errors(multirun=False):
                check_fresh_sweep_folder(Path(config.hydra.sweep.dir))


def logged_step(trainer: L.Trainer) -> int:
    """The step Lightning logs metrics at (training batches that stepped), for pictures and final results to line
    up with them: trainer.global_step counts optimizer steps, several per batch for cGML (Z's and each w-step)."""
    return getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)


# ---- data and modules -------------------------------------------------------------------------------------------
def build_datamodule(cfg: DictConfig):
    """The run's datamodule, set up; a test split left empty is refused before training, not after it (the final
    evaluation needs eval.num_inputs > 0 of its inputs)."""
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    test = (getattr(dm, "splits", None) or {}).get("test")
    if test is not None and len(test) == 0 and (cfg.get("eval") or {}).get("num_inputs", 1) > 0:
        raise ValueError(f"{type(dm).__name__}: the test split is empty, so the evaluation after training would have "
                         f"nothing to evaluate; raise data.test_fraction or add data")
    return dm


def check_model_config(model_cfg: DictConfig) -> None:
    """Refuse a model config that builds no module (model=_shared: the keys each model's file starts from)."""
    if "_target_" not in model_cfg:
        raise ValueError(f"model= must name a model, one of {', '.join(MODULES)}; the chosen model config builds none")


def build_module(cfg: DictConfig, datamodule) -> ConditionalModule:
    check_model_config(cfg.model)
    info = {**datamodule.info(), "data": recorded_data(cfg.data)}
    return instantiate(cfg.model, data_info=info, net=plain(cfg.net), _recursive_=False, _convert_="all")


def recorded_data(data: DictConfig) -> dict[str, Any]:
    """The data config as checkpoints record it, its local paths (data.root, data.input_dir, data.path,
    data.data_dir) made absolute: an evaluation started from another directory finds them. A value with a scheme
    (s3://..., litdata's local:...) stays as given."""
    record = plain(data)
    for key in ("root", "input_dir", "path", "data_dir"):
        value = record.get(key)
        if isinstance(value, str) and value not in ("", "???") and ":" not in value.split("/", 1)[0]:
            record[key] = str(Path(value).expanduser().absolute())
    return record


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
    """Resuming continues the same run: refuse a checkpoint of another model, made on other data, with another
    latent table, net, optimizer or scheduler (Lightning would load the old states over the new ones, or fail on
    their shapes), with another schedule length or number of processes."""
    checkpoint = read_checkpoint(path)
    saved = checkpoint.get("hyper_parameters", {})
    recorded = recorded_module(checkpoint, f"ckpt_path={path}")
    if recorded is not None and recorded != module.module_name:
        raise ValueError(f"ckpt_path={path} holds a model={recorded} run, not model={module.module_name}; resume "
                         f"with model={recorded}")
    old, new = saved.get("data_info", {}), module.data_info
    for key in ("num_train_samples", "fingerprint", "x_shape", "y_shape"):
        if key in old and old[key] != new.get(key):
            raise ValueError(f"ckpt_path={path} was trained on other data: {key} {old[key]} in the checkpoint vs "
                             f"{new.get(key)} now. Resume on the same data, or fine-tune with init_from={path}.")
    if bool(saved.get("ema_decay")) != bool(module.hparams.get("ema_decay")):
        raise ValueError(f"ckpt_path={path}: model.ema_decay={saved.get('ema_decay')} in the checkpoint vs "
                         f"{module.hparams.get('ema_decay')} now; resume with the checkpoint's setting, or fine-tune "
                         f"with init_from={path} (the average restarts from its weights)")
    as_saved = {**saved, **module.legacy_hparams(saved)}
    for key, name in (("net", "net"), ("dynamics_net", "model.dynamics_net"), ("optimizer", "model.optimizer"),
                      ("dynamics_optimizer", "model.dynamics_optimizer"), ("scheduler", "model.scheduler")):
        was, now = as_saved.get(key) or {}, module.hparams.get(key) or {}
        differs = sorted(k for k in set(was) | set(now) if k != "T_max" and was.get(k) != now.get(k))  # T_max: below
        if key in saved and differs:
            k = differs[0]
            raise ValueError(f"ckpt_path={path}: {name}.{k}={was.get(k)} in the checkpoint vs {now.get(k)} now; "
                             f"resume with {name}.{k}={was.get(k)} (a resumed run continues the same one)")
    checked = {"data_info", "net", "dynamics_net", "optimizer", "dynamics_optimizer", "scheduler"}
    for key in sorted(set(as_saved) & set(module.hparams) - checked - RESUME_MAY_CHANGE):
        if None not in (as_saved[key], module.hparams[key]) and as_saved[key] != module.hparams[key]:   # None: unset
            raise ValueError(f"ckpt_path={path}: model.{key}={as_saved[key]} in the checkpoint vs "
                             f"{module.hparams[key]} now; resume with model.{key}={as_saved[key]} (a resumed run "
                             f"continues the same one), or fine-tune with init_from={path}")
    was, now = old.get("data") or {}, new.get("data") or {}
    for key in sorted(set(was) & set(now) - DATA_MAY_CHANGE):
        if was[key] != now[key]:
            raise ValueError(f"ckpt_path={path}: data.{key}={was[key]} in the checkpoint vs {now[key]} now; resume "
                             f"with data.{key}={was[key]} (a resumed run continues the same one), or fine-tune with "
                             f"init_from={path}")
    processes = process_count(cfg.trainer) if cfg is not None else None
    if processes is not None and checkpoint.get("world_size", processes) != processes:
        raise ValueError(f"ckpt_path={path} trained on {checkpoint['world_size']} process(es), this run starts "
                         f"{processes} (trainer.devices x trainer.num_nodes): each process takes its own batch of "
                         f"data.batch_size, so the run would go on with another total batch; resume on "
                         f"{checkpoint['world_size']}, or fine-tune with init_from={path}")
    t_max = (cfg.model.get("scheduler") or {}).get("T_max") if cfg is not None else None
    for state in checkpoint.get("lr_schedulers", []):
        if t_max is not None and "T_max" in state and state["T_max"] != t_max:
            raise ValueError(f"ckpt_path={path}: its scheduler has T_max={state['T_max']} but this run asks for "
                             f"{t_max}; resume with the original trainer.max_epochs, or fine-tune with "
                             f"init_from={path} for a new schedule")


def load_checkpoint(ckpt_path: str) -> ConditionalModule:
    """The module a checkpoint holds, of the class it records (never a `_target_`), loaded with weights_only."""
    return ConditionalModule.load_from_checkpoint(ckpt_path, map_location="cpu")


def load_with_data(ckpt_path: str) -> tuple[ConditionalModule, Any, DictConfig]:
    """A checkpoint's module (on the CPU, averaged weights where it has them), cgml-eval's data for it and cgml-eval's
    config, outside a Hydra run: for scripts and notebooks that study checkpoints."""
    from hydra import compose, initialize_config_module
    with initialize_config_module(config_module="cgml_lightning.conf", version_base="1.3"):
        cfg = compose("eval", overrides=[f"ckpt_path={ckpt_path}"])
    module = load_checkpoint(ckpt_path)
    return module, checkpoint_datamodule(cfg, module), cfg


def load_for_inference(cfg: DictConfig):
    """The checkpoint's module (inference_module) and the data it was trained on unless cfg.data overrides it."""
    module = inference_module(cfg)
    return module, checkpoint_datamodule(cfg, module)


def inference_module(cfg: DictConfig) -> ConditionalModule:
    """The checkpoint's module on cfg.device (auto: CUDA where there is one); weights=live drops the averaged
    weights of a model trained with model.ema_decay."""
    weights = cfg.get("weights", "averaged")
    if weights not in ("averaged", "live"):
        raise ValueError(f"weights must be averaged or live; got {weights!r}")
    for key in ("num_samples", "num_inputs"):
        value = cfg.get(key)
        if value is not None and (not is_count(value) or value < 1):
            raise ValueError(f"{key} must be a positive whole number; got {value!r}")
    module = load_checkpoint(cfg.ckpt_path).to(inference_device(cfg.get("device", "auto")))
    if weights == "live":
        module.ema = None
    elif module.ema is None:
        log.info("%s keeps no averaged weights (trained without model.ema_decay): using its live weights",
                 cfg.ckpt_path)
    return module


def weights_in_use(module: ConditionalModule) -> str:
    """What metrics.json records as `weights`: averaged (the EMA) or live."""
    return "live" if module.ema is None else "averaged"


def inference_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device={name}: not a device (auto, cpu, cuda, cuda:1, mps)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name}: this torch sees no CUDA device (a CPU build, or no GPU); use device=cpu "
                         f"or device=auto")
    return device


def checkpoint_datamodule(cfg: DictConfig, module: ConditionalModule):
    """data=GROUP from the command line (through the registry); else the checkpoint's recorded data config, rebuilt
    by datamodule name (a stored `_target_` is never instantiated), with any keys given as +data.KEY=VALUE in
    place of the recorded ones (data that moved: +data.root=NEW)."""
    given, recorded = plain(cfg.get("data")) or {}, module.data_info.get("data")
    if "_target_" in given:
        dm, source = instantiate(cfg.data), "data=... on the command line"
    elif recorded:
        dm = datamodule_from_record({**recorded, **given}, f"{cfg.ckpt_path}")
        source = "the checkpoint's data config" + (f" with {', '.join(f'+data.{k}' for k in given)}" if given else "")
    else:
        raise ValueError(f"{cfg.ckpt_path}: the checkpoint records no data config; pass data=... on the command line")
    dm.prepare_data()
    try:
        dm.setup("test")
    except FileNotFoundError as err:
        if "_target_" in given:
            raise
        raise FileNotFoundError(f"{err} ({source}). Data that moved: +data.root=NEW_FOLDER (or +data.path=, "
                                f"+data.input_dir=); other data: data=GROUP with its keys; your own images "
                                f"(cgml-sample): input=") from err
    trained, now = module.data_info, dm.info()
    shapes = {k: list(trained[k]) for k in ("x_shape", "y_shape") if k in trained}
    now_shapes = {k: list(now[k]) for k in shapes}
    if now_shapes != shapes:
        fix = ("set data.image_size (and data.channels, data.task) as in training" if trained.get("kind") == "image"
               else "give data with arrays of those shapes per sample")
        raise ValueError(f"{source} gives x {now_shapes.get('x_shape')} and y {now_shapes.get('y_shape')} per sample, "
                         f"but {cfg.ckpt_path} was trained on x {shapes.get('x_shape')} and y {shapes.get('y_shape')}; "
                         f"{fix}")
    recorded = recorded or {}
    used = given if "_target_" in given else {**recorded, **given}
    changed = "".join(f"; data.{k}={used[k]} (trained with {recorded[k]})" for k in SPLIT_KEYS
                      if k in used and k in recorded and used[k] != recorded[k])
    # a training split of in-memory inputs (IndexedDataset) fingerprints x: another degradation alone changes that
    # fingerprint (the evaluation names it), not the split; other datamodules fingerprint the targets or the files
    degraded_only = (isinstance((getattr(dm, "splits", None) or {}).get("train"), IndexedDataset)
                     and trained.get("degradation") != now.get("degradation") and not changed
                     and trained.get("num_train_samples") == now.get("num_train_samples"))
    if trained.get("fingerprint") and now.get("fingerprint") != trained["fingerprint"] and not degraded_only:
        log.warning("%s gives another training split than %s was trained on (%s training samples, %s then%s): "
                    "where it holds the training data, changed since or split otherwise, its test split may hold "
                    "samples the model trained on", source, cfg.ckpt_path, now.get("num_train_samples"),
                    trained.get("num_train_samples"), changed)
    return dm


# ---- loggers ------------------------------------------------------------------------------------------------------
def sweep_id() -> str | None:
    """The multirun's folder name (its timestamp), shared by every job of one sweep; None in a single run."""
    hydra_cfg = HydraConfig.get()
    return Path(hydra_cfg.sweep.dir).name if hydra_cfg.mode == RunMode.MULTIRUN else None


def experiment_overrides(hydra_cfg: DictConfig) -> str:
    """The command line's overrides that change the experiment, sorted and joined as Hydra's override_dirname joins
    them: its exclude_keys left out, and every logger.* key (where and how a run logs is not what it runs)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    spec = hydra_cfg.job.config.override_dirname
    lines = sorted(o.input_line for o in OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task))
                   if o.key_or_group not in spec.exclude_keys and not o.key_or_group.startswith("logger."))
    return spec.item_sep.join(lines).replace("=", spec.kv_sep)


def run_group(cfg: DictConfig) -> str:
    """The W&B group of a run: the group a W&B logger's config names, else `<task>` or, in a multirun,
    `<task>_<sweep id>`, so that each sweep is one group."""
    for logger_cfg in (cfg.get("logger") or {}).values():
        if logger_cfg and logger_cfg.get("_target_") == WANDB_TARGET and logger_cfg.get("group"):
            return str(logger_cfg.group)
    return "_".join(p for p in (cfg.task_name, sweep_id()) if p)


def training_run_info(cfg: DictConfig) -> dict[str, Any]:
    """What a checkpoint records of the cgml-train run that wrote it (ConditionalModule.run_info)."""
    return {"task_name": str(cfg.task_name), "seed": int(cfg.seed), "group": run_group(cfg)}


def build_loggers(cfg: DictConfig, about: str | None = None, resumed: bool = False, group: str | None = None) -> list:
    """The run's loggers. A W&B run left unnamed gets `<task>_<about>_<overrides>` (logger keys excluded; about:
    cgml-eval's checkpoint run), the group `group` (cgml-eval: its checkpoint's training run's) or run_group's,
    job_type = the command, and the top-level `tags`. A resumed training run (resumed) goes on in the W&B run its
    folder last logged to, unless logger.wandb.id names one."""
    loggers = []
    for name, logger_cfg in (cfg.get("logger") or {}).items():
        if not logger_cfg:
            continue
        if logger_cfg.get("_target_") == WANDB_TARGET:
            hydra_cfg = HydraConfig.get()
            overrides = experiment_overrides(hydra_cfg)
            with open_dict(logger_cfg):
                logger_cfg.name = logger_cfg.get("name") or "_".join(p for p in (cfg.task_name, about, overrides) if p)
                logger_cfg.group = logger_cfg.get("group") or group or run_group(cfg)
                logger_cfg.job_type = logger_cfg.get("job_type") or hydra_cfg.job.name
                logger_cfg.tags = [*tag_list(logger_cfg.get("tags")), *tag_list(cfg.get("tags"))]
                previous = previous_wandb_id(logger_cfg.get("save_dir")) if resumed else None
                if previous and not logger_cfg.get("id"):
                    logger_cfg.id, logger_cfg.resume = previous, "allow"
        loggers.append(instantiate(logger_cfg))
    return loggers


def previous_wandb_id(save_dir: str | None) -> str | None:
    """The id of the newest W&B run under save_dir/wandb, whose folders are named [offline-]run-DATE_TIME-ID."""
    runs = [p for p in Path(save_dir or ".", "wandb").glob("*run-*-*") if p.is_dir() and not p.is_symlink()]
    newest = max(runs, key=lambda p: p.name.split("run-", 1)[1], default=None)
    return newest.name.rsplit("-", 1)[1] if newest else None


def checkpoint_run_name(ckpt_path: str | None) -> str | None:
    """The run a checkpoint belongs to: RUN for RUN/checkpoints/NAME.ckpt, else the file's name without .ckpt."""
    if not ckpt_path or ckpt_path == "last":
        return None
    path = Path(ckpt_path)
    return path.parent.parent.name if path.parent.name == "checkpoints" and path.parent.parent.name else path.stem


def tag_list(tags: Any) -> list[str]:
    """tags=[a,b] as a list, and tags=a (a single word, which Hydra reads as a string) as [a]."""
    if not tags:
        return []
    return [str(tags)] if isinstance(tags, (str, int, float)) else [str(t) for t in tags]


def run_record(cfg: DictConfig, module: torch.nn.Module | None = None) -> dict[str, Any]:
    """What a logger's hyperparameters hold: the composed config, seed, command and overrides, parameter counts."""
    hydra_cfg = HydraConfig.get()
    seed = cfg.get("seed") if "seed" in cfg else plain(cfg.get("seeds"))          # the bench: its seeds
    record: dict[str, Any] = {"config": plain(cfg), "seed": seed, "command": hydra_cfg.job.name,
                              "overrides": list(hydra_cfg.overrides.task), "sweep_id": sweep_id()}
    if module is not None:
        params = list(module.parameters())
        record["params/total"] = sum(p.numel() for p in params)
        record["params/trainable"] = sum(p.numel() for p in params if p.requires_grad)
    return record


def log_results(loggers: list, metrics: dict[str, Any], step: int = 0, prefix: str = "test/") -> None:
    """Final metrics to every logger as `test/<key>` (numbers) and, for W&B, into the run summary (all values)."""
    named = {f"{prefix}{k}": v for k, v in metrics.items()}
    numbers = {k: float(v) for k, v in named.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    for logger in loggers:
        logger.log_metrics(numbers, step=step)
        if is_wandb(logger):
            logger.experiment.summary.update({k: v for k, v in named.items() if v is not None})
        logger.save()


def is_wandb(logger) -> bool:
    from lightning.pytorch.loggers import WandbLogger

    return isinstance(logger, WandbLogger)


def log_picture(loggers: list, key: str, path: Path, caption: str, step: int = 0) -> None:
    """A PNG from the run dir to the loggers that take images: W&B (captioned) and TensorBoard."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in loggers:
        if is_wandb(logger):
            logger.log_image(key=key, images=[str(path)], caption=[caption], step=step)
        elif isinstance(logger, TensorBoardLogger):
            import numpy as np
            from PIL import Image

            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"))
            logger.experiment.add_image(key, array, step, dataformats="HWC")
            logger.experiment.add_text(f"{key}/caption", caption, step)


# ---- the task wrapper -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def user_errors(multirun: bool | None = None) -> Iterator[None]:
    """A single run that one of the package's checks refuses (USER_ERRORS raised in this package: a missing folder,
    a bad key, a checkpoint of another task) ends with the message alone, on stderr and in the run's log file, and
    exit status 1, instead of Hydra's traceback around it. A multirun's job writes the message to its log file and
    leaves the error to Hydra (its sweepers and launchers handle failed jobs); HYDRA_FULL_ERROR=1 and errors raised
    outside the package keep Hydra's report. Inside it Python warnings (the data checks' "skipping unreadable
    image ...", Lightning's) are logged, so the run's log file keeps them as well as the console."""
    from hydra.errors import InstantiationException
    from omegaconf.errors import MissingMandatoryValue

    showing = warnings.showwarning
    logging.captureWarnings(True)                 # forked DataLoader workers inherit it (spawned ones print them)
    try:
        yield
    except (*USER_ERRORS, InstantiationException, MissingMandatoryValue) as caught:
        err = caught.__cause__ if isinstance(caught, InstantiationException) else caught   # a constructor's check
        if isinstance(err, MissingMandatoryValue):                    # a config's ??? left unset
            key = err.full_key or "a required key"
            err = ValueError(f"{key} is required: give it on the command line ({key}=...)")
        elif isinstance(err, USER_ERRORS) and (message := worker_message(err)) is not None:
            err = type(err)(message)                                  # torch built it from one message too
        elif not isinstance(err, USER_ERRORS) or not raised_in_package(err):
            raise
        record = log.makeRecord(log.name, logging.ERROR, __file__, 0, str(err), None, None)
        for handler in logging.getLogger().handlers:              # the run's log file; the console gets it once
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
        if multirun is None:
            multirun = HydraConfig.get().mode == RunMode.MULTIRUN
        if multirun or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"Error: {err}\n(set HYDRA_FULL_ERROR=1 to see where it was raised)", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        if warnings.showwarning is not showing:   # captured here: as it was before (a caller's capture stays)
            logging.captureWarnings(False)


def worker_message(err: BaseException) -> str | None:
    """The message of an error this package raised in a DataLoader worker, which torch raises again in the main
    process with the worker's traceback as its whole text; None for any other error."""
    lines = str(err).splitlines()
    if not (lines and lines[0].startswith("Caught ") and len(lines) > 1 and lines[1].startswith("Original Traceback")):
        return None
    frames = [i for i, line in enumerate(lines) if line.lstrip().startswith('File "')]
    if not frames or not Path(lines[frames[-1]].split('"')[1]).resolve().is_relative_to(PACKAGE_DIR):
        return None
    names = {type(err).__name__, f"{type(err).__module__}.{type(err).__qualname__}"}   # how Python prints its type
    for i in range(frames[-1] + 1, len(lines)):
        name, _, message = lines[i].partition(": ")
        if name in names:
            return "\n".join([message, *lines[i + 1:]])
    return None


def raised_in_package(err: BaseException) -> bool:
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR)


@contextlib.contextmanager
def task(loggers: list) -> Iterator[None]:
    """Ends every run the same way: a stop on a signal (Lightning's SIGTERM stop, or the preemption callback's after
    its save) becomes exit 128 + the signal, every logger is finalized (what was logged after training is flushed),
    and W&B runs are finished so that one job never bleeds into the next."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from cgml_lightning.callbacks import Preempted

    status = "failed"
    try:
        yield
        status = "success"
    except SIGTERMException as err:
        raise SystemExit(128 + signal.SIGTERM) from err
    except Preempted as err:                                      # saved and stopped on a signal: not finished
        raise SystemExit(128 + err.signum) from err
    finally:
        for logger in loggers:                                    # flush what was logged after training ended
            logger.finalize(status)
        if any(is_wandb(logger) for logger in loggers):
            import wandb

            wandb.finish(exit_code=0 if status == "success" else 1)     # a failed run shows as failed


def optimized_value(cfg: DictConfig, metrics: dict[str, Any], grid_warns: bool = True) -> float | None:
    """The metric a sweeper optimizes (cfg.optimized_metric) in a multirun; a missing or non-numeric one fails the
    job under a sweeper that optimizes (Optuna), naming the keys there are, and is a warning in a grid (Hydra's
    basic sweeper consumes nothing; grid_warns=False: silent). A single run returns None (nothing consumes it)."""
    key, hydra_cfg = cfg.get("optimized_metric"), HydraConfig.get()
    if not key or hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    value = metrics.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        numeric = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        message = (f"optimized_metric={key}: this run's metrics have no number under that key; the metrics are "
                   f"{numeric}. Set optimized_metric= (and optimized_direction=) to one of them.")
        if str(hydra_cfg.sweeper.get("_target_", "")).endswith("BasicSweeper"):
            if not grid_warns:
                return None
            log.warning("%s (a grid uses no optimized value; its results are in metrics.json)", message)
            return None
        raise ValueError(message)
    return float(value)
