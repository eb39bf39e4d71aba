"""Evaluate a trained module on a datamodule's test inputs: the flat metrics dict written to metrics.json."""
from __future__ import annotations

import math

import torch

from cgml_lightning.classifier import EvalNets
from cgml_lightning.metrics import fid_metric, image_metrics, mode_metrics, vector_metrics


@torch.no_grad()
def evaluate(module, datamodule, num_samples: int = 10, num_inputs: int = 200, seed: int = 0,
             nets: EvalNets | None = None, sample_pool: int | None = None) -> dict[str, float | str | None]:
    """Images: best-of-N / mean PSNR, best-of-N SSIM, diversity (+ on the hole for completion), and `fid` (None
    without a feature net in `nets`). With the dataset classifier in `nets` and labelled data, also
    sample_class_acc: the share of samples the classifier puts in their input's true class (a completed shirt
    stays a shirt), and classifier_test_acc, its accuracy on the real test images (the ceiling).
    FID compares the num_inputs real test images with their num_inputs x N samples.
    Vector data with known modes (the toy): mode_near_fraction, mode_coverage on a grid of num_inputs x N samples.
    Other vector data: best-of-N and mean L2 error, diversity.
    sample_pool: the N samples are the medoids of this many per input (ConditionalModule.sample's pool)."""
    datamodule.setup("test")
    generator = torch.Generator().manual_seed(seed)
    if hasattr(datamodule, "modes"):
        x = datamodule.grid(num_inputs)
        samples = module.sample(x, num_samples, generator=generator, pool=sample_pool).cpu()
        return {**mode_metrics(samples, datamodule.modes(x)), "num_inputs": len(x), "num_samples": num_samples,
                **pool_key(sample_pool)}
    image = datamodule.kind == "image"
    nets = nets or EvalNets()
    fid = fid_metric(nets.fid_features).to(module.device) if image and nets.fid_features is not None else None
    classifier = nets.classifier.to(module.device) if image and nets.classifier is not None else None
    totals: dict[str, float] = {}
    seen = correct = 0
    labelled = False
    for batch in datamodule.test_dataloader():
        x, y = batch["x"][: num_inputs - seen], batch["y"][: num_inputs - seen]
        samples = module.sample(x, num_samples, generator=generator, pool=sample_pool)   # [B, N, ...] on the device
        flat = samples.flatten(0, 1)
        if fid is not None:
            fid.update(y.to(flat.device), real=True)
            fid.update(flat, real=False)
        labelled = "label" in batch
        if classifier is not None and labelled:
            truth = batch["label"][: len(x)].to(flat.device).repeat_interleave(num_samples)
            correct += (classifier.predict(flat) == truth).sum().item()
        samples = samples.cpu()
        per_input = image_metrics(samples, y, hole=module.hole(x)) if image else vector_metrics(samples, y)
        for key, value in per_input.items():
            totals[key] = totals.get(key, 0.0) + value.sum().item()
        seen += len(x)
        if seen >= num_inputs:
            break
    if seen == 0:
        raise ValueError(f"{type(datamodule).__name__}: the test split is empty, so there is nothing to evaluate "
                         f"(raise data.test_fraction or add data)")
    metrics: dict[str, float | str | None] = {key: value / seen for key, value in totals.items()}
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"non-finite metrics {bad}: the model produced NaN/Inf samples")
    if image:
        if fid is not None and seen < 2:
            raise ValueError(f"FID needs at least 2 test inputs; got num_inputs={num_inputs} ({seen} evaluated)")
        metrics["fid"] = fid.compute().item() if fid is not None else None
        if fid is not None:
            metrics["fid_feature_net"] = nets.fid_name
        if classifier is not None and labelled:
            metrics["sample_class_acc"] = correct / (seen * num_samples)
            metrics["classifier_test_acc"] = nets.classifier_test_acc
    return {**metrics, "num_inputs": seen, "num_samples": num_samples, **pool_key(sample_pool)}


def pool_key(sample_pool: int | None) -> dict[str, int]:
    """metrics.json records the pool only when one was used (its values stay numbers)."""
    return {} if sample_pool is None else {"sample_pool": sample_pool}
