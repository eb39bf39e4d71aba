"""cgml-sample ckpt_path=...: samples of a checkpoint for its test inputs or the user's images (input=, mask=,
hint=), as samples.png and samples.pt."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from torch import Tensor

from cgml_lightning.evaluation import warn_degradation_changes
from cgml_lightning.files import atomic_path, save_image
from cgml_lightning.models import ConditionalModule
from cgml_lightning.models.base import check_flags
from cgml_lightning.plots import first_test_batch, image_grid, vector_plot
from cgml_lightning.runs import CONFIG_PATH, check_output_dir, checkpoint_datamodule, inference_module, user_errors
from cgml_lightning.user_inputs import (UserInputs, build_inputs, check_image_model, hint_guide, image_files,
                                        input_channels, input_side, load_hint, load_images, load_mask,
                                        load_pair_inputs, paired_direction, readable_images, task_degradation)

log = logging.getLogger("cgml_lightning")


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
        warn_degradation_changes(module, dm)
        batch = first_test_batch(dm)
        x, y = batch["x"][: cfg.num_inputs], batch["y"][: cfg.num_inputs]
        if not cfg.get("mask"):
            return UserInputs(x, y, []), dm
        return build_inputs(info, degradation, y, [], mask, degrade=True, seed=cfg.seed), dm   # test images, user mask
    files, direction, folder = image_files(cfg.input), paired_direction(info), Path(cfg.input).expanduser().is_dir()
    if direction and folder:
        files = input_side(files, Path(cfg.input), direction)
    if len(files) > cfg.num_inputs:
        log.warning("input: sampling the first %d of %d images under %s (num_inputs=%d; raise it for more)",
                    cfg.num_inputs, len(files), cfg.input, cfg.num_inputs)
    if folder:                                                 # a folder's corrupt files are skipped, as in training
        files = readable_images(files, cfg.num_inputs)
    files = files[: cfg.num_inputs]
    if direction:                                  # pairs: A|B files give the input side and the truth
        x, truth = load_pair_inputs(files, channels, (height, width), direction, cfg.crop)
        x = build_inputs(info, degradation, x, [], mask, degrade=False).x          # shapes checked; no mask here
        return UserInputs(x, truth, [str(f) for f in files]), None
    images = load_images(files, input_channels(info, degradation, cfg.degrade), (height, width), cfg.crop)
    return build_inputs(info, degradation, images, [str(f) for f in files], mask, cfg.degrade, cfg.seed), None


def hint_kwargs(cfg: DictConfig, module: ConditionalModule, x: Tensor) -> dict[str, Any]:
    """guide= from hint=FILE (masked L1 to its known pixels; for completion only those inside the hole)."""
    channels, height, width = check_image_model(module.data_info, "hint")
    hint, known = load_hint(cfg.hint, channels, (height, width), cfg.crop)
    hole = module.hole(x)
    if hole is not None:                                        # completion: only the hole can follow a hint
        known = known * hole
        if not known.any():
            where = ("where the mask is white" if cfg.get("mask")
                     else "inside the hole this checkpoint's inputs have (or give mask=)")
            raise ValueError(f"hint: {cfg.hint} has no known pixel inside the hole of any input; draw the hint {where}")
    return {"guide": hint_guide(hint, known), "hint": hint, "hint_known": known}


def run_sample(cfg: DictConfig) -> Path:
    """samples.png (input | N samples | the image given, or the truth) and samples.pt (x, samples, y, files, hint)."""
    check_flags({"crop": cfg.get("crop", False), "degrade": cfg.get("degrade", True)})
    module = inference_module(cfg)
    inputs, dm = sample_inputs(cfg, module)
    out = check_output_dir()
    kwargs = {k: cfg[k] for k in ("steps", "guide_steps", "guide_lr") if cfg.get(k) is not None}
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
    modes = dm.modes(inputs.x) if hasattr(dm, "modes") else None                # vector data: a plot
    vector_plot(inputs.x.cpu(), payload["samples"], path, modes, inputs.given)
    log.info("wrote %s", path)
    return path


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="sample")
def main(cfg: DictConfig) -> None:
    with user_errors():
        run_sample(cfg)


if __name__ == "__main__":
    main()
