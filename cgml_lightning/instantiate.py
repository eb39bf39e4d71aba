"""Hydra instantiation limited to an allowlist of `_target_` prefixes, checked before anything runs."""
from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

ALLOWED_TARGET_PREFIXES = ("cgml_lightning.", "torch.", "lightning.", "pytorch_lightning.", "torchmetrics.",
                           "hydra_plugins.", "builtins.dict", "builtins.list")


def find_targets(cfg: Any, path: str = "") -> list[tuple[str, str]]:
    """Every (config path, `_target_`) in a config tree."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        cfg = OmegaConf.to_container(cfg, resolve=False)
    found = []
    if isinstance(cfg, dict):
        if isinstance(cfg.get("_target_"), str):
            found.append((path or "<root>", cfg["_target_"]))
        for key, value in cfg.items():
            found += find_targets(value, f"{path}.{key}" if path else str(key))
    elif isinstance(cfg, list):
        for i, value in enumerate(cfg):
            found += find_targets(value, f"{path}[{i}]")
    return found


def allowed(name: str) -> bool:
    return name.startswith(ALLOWED_TARGET_PREFIXES)


def resolves_inside_allowlist(target: str) -> bool:
    """Walk the dotted name as Hydra would; every module passed through and the object reached must belong to an
    allowed package (so `torch.os.system`, which starts like an allowed name, is refused)."""
    import importlib
    import types

    parts = target.split(".")
    obj, i = None, len(parts)
    while i > 0:                                                     # the longest importable module prefix
        try:
            obj = importlib.import_module(".".join(parts[:i]))
            break
        except ImportError:
            i -= 1
    if obj is None:
        return False
    for part in parts[i:]:
        obj = getattr(obj, part, None)
        if obj is None:
            return False
        if isinstance(obj, types.ModuleType) and not allowed(obj.__name__ + "."):
            return False
    home = getattr(obj, "__module__", None) or ""
    return allowed(f"{home}.{getattr(obj, '__qualname__', '')}")


def check_targets(cfg: Any) -> None:
    """Refuse any `_target_` outside the allowlist, naming the key (e.g. a YAML pointing at os.system).
    Names outside the allowed prefixes are refused without importing anything."""
    for path, target in find_targets(cfg):
        if not (allowed(target) and resolves_inside_allowlist(target)):
            raise ValueError(f"refusing to instantiate {path}._target_={target!r}: only targets inside "
                             f"{', '.join(ALLOWED_TARGET_PREFIXES)} are allowed")


def instantiate(cfg: Any, *args, **kwargs) -> Any:
    check_targets(cfg)
    return hydra.utils.instantiate(cfg, *args, **kwargs)
