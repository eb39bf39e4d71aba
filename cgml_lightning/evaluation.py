"""Evaluate a trained module on a datamodule's test inputs: the flat metrics dict written to metrics.json."""
from __future__ import annotations

import math

import torch

from cgml_lightning.metrics import image_metrics, mode_metrics, vector_metrics


@torch.no_grad()
def evaluate(module, datamodule, num_samples: int = 10, num_inputs: int = 200, seed: int = 0) -> dict[str, float]:
    """Images: best-of-N / mean PSNR, best-of-N SSIM, diversity (+ on the hole for completion).
    Vector data with known modes (the toy): mode_near_fraction, mode_coverage on a grid of num_inputs x N samples.
    Other vector data: best-of-N and mean L2 error, diversity."""
    datamodule.setup("test")
    generator = torch.Generator().manual_seed(seed)
    if hasattr(datamodule, "modes"):
        x = datamodule.grid(num_inputs)
        samples = module.sample(x, num_samples, generator=generator).cpu()
        return {**mode_metrics(samples, datamodule.modes(x)), "num_inputs": len(x), "num_samples": num_samples}
    totals: dict[str, float] = {}
    seen = 0
    for batch in datamodule.test_dataloader():
        x, y = batch["x"][: num_inputs - seen], batch["y"][: num_inputs - seen]
        samples = module.sample(x, num_samples, generator=generator).cpu()
        if datamodule.kind == "image":
            per_input = image_metrics(samples, y, hole=module.hole(x))
        else:
            per_input = vector_metrics(samples, y)
        for key, value in per_input.items():
            totals[key] = totals.get(key, 0.0) + value.sum().item()
        seen += len(x)
        if seen >= num_inputs:
            break
    metrics = {key: value / seen for key, value in totals.items()}
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"non-finite metrics {bad}: the model produced NaN/Inf samples")
    return {**metrics, "num_inputs": seen, "num_samples": num_samples}
