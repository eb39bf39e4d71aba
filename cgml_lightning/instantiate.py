"""Hydra instantiation from an explicit registry of exact names, checked before anything is imported.

A config or a checkpoint is data: its `_target_` may only name one of the classes listed here (the package's
datamodules, modules and callbacks, and the optimizers, schedulers, loggers, callbacks and profilers that
configs use). A name prefix is no allowlist: `torch.load`, `torch.hub.load` and
`torch.utils.cpp_extension.load_inline` all live under `torch.`. Code that builds its own objects in Python
can add names with `register`.
"""
from __future__ import annotations

import importlib
import re
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

EXTERNAL_TARGETS = frozenset({
    *(f"torch.optim.{name}" for name in ("Adam", "AdamW", "SGD", "RMSprop", "NAdam", "RAdam", "Adagrad")),
    *(f"torch.optim.lr_scheduler.{name}" for name in (
        "CosineAnnealingLR", "CosineAnnealingWarmRestarts", "StepLR", "MultiStepLR", "ExponentialLR", "LinearLR",
        "ConstantLR", "OneCycleLR")),
    "lightning.Trainer", "lightning.pytorch.Trainer",
    *(f"lightning.pytorch.callbacks.{name}" for name in (
        "ModelCheckpoint", "RichProgressBar", "TQDMProgressBar", "LearningRateMonitor", "EarlyStopping",
        "ModelSummary", "RichModelSummary", "Timer", "DeviceStatsMonitor")),
    *(f"lightning.pytorch.loggers.{name}" for name in ("CSVLogger", "TensorBoardLogger", "WandbLogger")),
    *(f"lightning.pytorch.profilers.{name}" for name in ("SimpleProfiler", "AdvancedProfiler", "PyTorchProfiler")),
    "lightning.pytorch.plugins.environments.SLURMEnvironment",
})
# Packages whose exported LightningDataModule / LightningModule / Callback classes are instantiable.
PACKAGE_EXPORTS = ("cgml_lightning", "cgml_lightning.data", "cgml_lightning.models", "cgml_lightning.callbacks")
_registered: set[str] = set()


def package_classes(kind: type | tuple[type, ...] | None = None) -> dict[str, type]:
    """{name: class} for the package's exported Lightning classes, under each exporting package's name and the
    defining module's name (e.g. cgml_lightning.CGMLModule and cgml_lightning.models.cgml.CGMLModule)."""
    import lightning as L

    kind = kind or (L.LightningDataModule, L.LightningModule, L.Callback)
    found = {}
    for package in PACKAGE_EXPORTS:
        module = importlib.import_module(package)
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if isinstance(obj, type) and issubclass(obj, kind):
                found[f"{package}.{name}"] = obj
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


def registered_targets() -> frozenset[str]:
    return frozenset(EXTERNAL_TARGETS | _registered | set(package_classes()))


def register(*objects: Any) -> None:
    """Allow more classes or callables by object (not by name), e.g. a callback of your own in your own script."""
    for obj in objects:
        _registered.add(f"{obj.__module__}.{obj.__qualname__}")


def find_targets(cfg: Any, path: str = "") -> list[tuple[str, str]]:
    """Every (config path, `_target_`) in a config tree."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        cfg = OmegaConf.to_container(cfg, resolve=False)
    found = []
    if isinstance(cfg, dict):
        if "_target_" in cfg:
            found.append((path or "<root>", cfg["_target_"]))
        for key, value in cfg.items():
            found += find_targets(value, f"{path}.{key}" if path else str(key))
    elif isinstance(cfg, list):
        for i, value in enumerate(cfg):
            found += find_targets(value, f"{path}[{i}]")
    return found


def check_targets(cfg: Any) -> None:
    """Refuse any `_target_` that is not exactly a registered name, naming the key; nothing is imported first."""
    allowed = registered_targets()
    for path, target in find_targets(cfg):
        if not isinstance(target, str) or target not in allowed:
            raise ValueError(f"refusing to instantiate {path}._target_={target!r}: not a registered target. "
                             f"Configs may name the package's datamodules, modules and callbacks and the "
                             f"optimizers, schedulers, loggers, callbacks and profilers listed in "
                             f"cgml_lightning.instantiate (Python code can add its own with register())")


def instantiate(cfg: Any, *args, **kwargs) -> Any:
    check_targets(cfg)
    return hydra.utils.instantiate(cfg, *args, **kwargs)


def datamodule_from_record(record: Any, source: str):
    """Rebuild a datamodule from a data config recorded in a checkpoint: the class is looked up by name among the
    package's datamodules only, and called with the recorded keyword arguments; no stored `_target_` is handed
    to Hydra, and a nested `_target_` anywhere in the record is refused."""
    import lightning as L

    if not isinstance(record, dict):
        raise ValueError(f"{source}: the recorded data config is a {type(record).__name__}, not a mapping; "
                         "pass data=... on the command line")
    kwargs = {k: v for k, v in record.items() if k != "_target_"}
    name = record.get("_target_")
    datamodules = package_classes(L.LightningDataModule)
    if not isinstance(name, str) or name not in datamodules:
        raise ValueError(f"{source}: the recorded data config names {name!r}, which is not one of the package's "
                         f"datamodules; pass data=... on the command line")
    nested = find_targets(kwargs)
    if nested or any(str(k).startswith("_") for k in kwargs):
        bad = nested[0][0] + "._target_" if nested else next(k for k in kwargs if str(k).startswith("_"))
        raise ValueError(f"{source}: the recorded data config holds {bad!r}, which a datamodule never takes; "
                         "pass data=... on the command line")
    try:
        return datamodules[name](**kwargs)
    except TypeError as err:                              # a key given as +data.KEY that the datamodule does not take
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if unknown is None:
            raise
        raise ValueError(f"{source}: data.{unknown[1]} is not a setting of {name.rsplit('.', 1)[-1]}: check the "
                         f"spelling of +data.{unknown[1]}, or, where the checkpoint recorded it (an earlier version of "
                         f"this package), give the data with data=GROUP") from None
