"""Evaluation of trained modules: `evaluate` (here) gives the flat metrics dict written to metrics.json for a
datamodule's test inputs.

metrics: PSNR, SSIM, the diversity measures, FID and the mode metrics on samples [B, N, ...].
feature_nets: the networks evaluation looks through: FID features (Inception-v3 or the dataset classifier's) and
  the dataset classifier behind sample_class_acc.
probe: linear-probe accuracy on a module's frozen encoder features.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from contextlib import closing
from typing import Any

import torch

from cgml_lightning.evaluation.feature_nets import EvalNets
from cgml_lightning.evaluation.metrics import (feature_diversity, fid_metric, image_metrics, lpips_diversity,
                                               mode_metrics, vector_metrics)
from cgml_lightning.progress import track

log = logging.getLogger(__name__)
FID_REFERENCE = "test targets"       # what FID compares the samples with: the clean images of the evaluated inputs


def data_kind(module, datamodule) -> str | None:
    """image or vector: the datamodule's kind, else the one the module recorded (a user's own datamodule)."""
    return getattr(datamodule, "kind", None) or (getattr(module, "data_info", None) or {}).get("kind")


def first_inputs(batches: Iterable[dict[str, Any]], num_inputs: int) -> Iterator[dict[str, Any]]:
    """The batches cut to their first num_inputs inputs (every tensor of a batch sliced alike); no batch is drawn
    after the last one needed."""
    seen = 0
    for batch in batches:
        batch = {k: v[: num_inputs - seen] if torch.is_tensor(v) else v for k, v in batch.items()}
        seen += len(batch["x"])
        yield batch
        if seen >= num_inputs:
            return


def warn_degradation_changes(module, datamodule) -> None:
    """Name each setting of the datamodule's degradation (the task, its mask, noise or scale) that differs from the
    one the module was trained with: its metrics then measure another task than the one it learned."""
    trained = (getattr(module, "data_info", None) or {}).get("degradation")
    now = datamodule.info().get("degradation") if callable(getattr(datamodule, "info", None)) else None
    if not (trained and now):
        return
    keys = ["task", *sorted((set(trained) | set(now)) - {"task"})]
    changed = [f"data.{k}={now.get(k)} (trained with {trained.get(k)})" for k in keys if now.get(k) != trained.get(k)]
    if changed:
        log.warning("the test inputs are degraded unlike training: %s; set those keys as in training to evaluate "
                    "the task the model learned", ", ".join(changed))


@torch.no_grad()
def evaluate(module, datamodule, num_samples: int = 10, num_inputs: int = 200, seed: int = 0,
             nets: EvalNets | None = None, sample_pool: int | None = None) -> dict[str, float | str | None]:
    """Images: best-of-N / mean PSNR, best-of-N SSIM, diversity (mean pairwise pixel L1 of an input's samples;
    completion adds PSNR and diversity_hole on the hole only), and `fid` (None without a feature net in `nets`).
    diversity_features: mean pairwise Euclidean distance of the samples' unit-normalised features in FID's feature
    net (named in diversity_feature_net; both None without one). diversity_lpips: mean pairwise LPIPS where
    `nets` has an LPIPS distance (with lpips_net and lpips_version), else None and the reason logged.
    FID compares the num_inputs real test targets (fid_reference) with their num_inputs x N samples; fid_num_real
    and fid_num_fake count the images fed, fid_feature_net names the net. With the dataset classifier in `nets`
    and labelled data, also sample_class_acc: the share of samples the classifier puts in their input's true class
    (a completed shirt stays a shirt), and classifier_test_acc, its accuracy on the real test images (the ceiling).
    Vector data with known modes (the toy): mode_near_fraction, mode_coverage on a grid of num_inputs x N samples.
    Other vector data: best-of-N and mean L2 error, diversity.
    sample_pool: the N samples are the medoids of this many per input (ConditionalModule.sample's pool).
    A progress bar (cgml_lightning.progress) follows the test batches."""
    from cgml_lightning.models.base import is_count        # models import evaluation's metrics: imported here

    if not is_count(num_inputs) or num_inputs < 1:         # num_samples: sample() checks it
        raise ValueError(f"evaluate: num_inputs must be a positive whole number; got {num_inputs!r}")
    datamodule.setup("test")
    warn_degradation_changes(module, datamodule)
    generator = torch.Generator().manual_seed(seed)
    if hasattr(datamodule, "modes"):
        x = datamodule.grid(num_inputs)
        samples = module.sample(x, num_samples, generator=generator, pool=sample_pool).cpu()
        return {**mode_metrics(samples, datamodule.modes(x)), "num_inputs": len(x), "num_samples": num_samples,
                **pool_key(sample_pool)}
    image = data_kind(module, datamodule) == "image"
    nets = nets or EvalNets()
    fid = fid_metric(nets.fid_features).to(module.device) if image and nets.fid_features is not None else None
    classifier = nets.classifier.to(module.device) if image and nets.classifier is not None else None
    features = nets.fid_features if fid is not None else None               # on the device with the FID metric
    lpips = nets.lpips if image else None
    totals: dict[str, float] = {}
    seen = correct = num_real = num_fake = 0
    labelled = False
    loader = datamodule.test_dataloader()
    description = f"evaluate: {num_samples} samples x {num_inputs} inputs" + (
        f" (medoids of {sample_pool} per input)" if sample_pool is not None else "")
    with closing(track(loader, description, total=num_batches(loader, num_inputs))) as batches:
        for batch in first_inputs(batches, num_inputs):
            x, y = batch["x"], batch["y"]
            trained = getattr(module, "y_shape", None)           # other shapes: distances would broadcast
            if trained is not None and tuple(y.shape[1:]) != tuple(trained):
                raise ValueError(f"{type(datamodule).__name__}: its test targets y are {list(y.shape[1:])} per sample, "
                                 f"but the model was trained on y {list(trained)}")
            samples = module.sample(x, num_samples, generator=generator, pool=sample_pool)   # [B, N, ...] on the device
            flat = samples.flatten(0, 1)
            if fid is not None:
                fid.update(y.to(flat.device), real=True)
                fid.update(flat, real=False)
                num_real, num_fake = num_real + len(y), num_fake + len(flat)
            on_device = {}
            if features is not None:
                on_device["diversity_features"] = feature_diversity(samples, features)
            if lpips is not None:
                on_device["diversity_lpips"] = lpips_diversity(samples, lpips)
            labelled = "label" in batch
            if classifier is not None and labelled:
                truth = batch["label"].to(flat.device).repeat_interleave(num_samples)
                correct += (classifier.predict(flat) == truth).sum().item()
            samples = samples.cpu()
            per_input = image_metrics(samples, y, hole=module.hole(x)) if image else vector_metrics(samples, y)
            for key, value in {**per_input, **on_device}.items():
                totals[key] = totals.get(key, 0.0) + value.sum().item()
            seen += len(x)
    if seen == 0:
        raise ValueError(f"{type(datamodule).__name__}: the test split is empty, so there is nothing to evaluate "
                         f"(raise data.test_fraction or add data)")
    if seen < num_inputs:
        log.info("evaluated all %d inputs of the test split (num_inputs=%d asked for more)", seen, num_inputs)
    metrics: dict[str, float | str | None] = {key: value / seen for key, value in totals.items()}
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"non-finite metrics {bad}: the model produced NaN/Inf samples")
    if image:
        if fid is not None and seen < 2:
            raise ValueError(f"FID needs at least 2 test inputs; got num_inputs={num_inputs} ({seen} evaluated)")
        metrics["fid"] = fid.compute().item() if fid is not None else None
        if fid is not None:
            metrics.update(fid_feature_net=nets.fid_name, fid_reference=FID_REFERENCE, fid_num_real=num_real,
                           fid_num_fake=num_fake)
        metrics.setdefault("diversity_features", None)
        metrics["diversity_feature_net"] = nets.fid_name if features is not None else None
        metrics.setdefault("diversity_lpips", None)
        if lpips is not None:
            metrics.update(lpips_net=nets.lpips_net, lpips_version=nets.lpips_version)
        else:
            log.info("diversity_lpips: null (%s)", nets.lpips_reason or "no LPIPS net in this evaluation")
        if classifier is not None and labelled:
            metrics["sample_class_acc"] = correct / (seen * num_samples)
            metrics["classifier_test_acc"] = nets.classifier_test_acc
    return {**metrics, "num_inputs": seen, "num_samples": num_samples, **pool_key(sample_pool)}


def vector_metric_keys(datamodule) -> set[str] | None:
    """The numeric keys evaluate() (and cgml-train, adding epochs) reports for the datamodule's vector data, known
    before any training; None for images, whose keys depend on the evaluation nets found."""
    if datamodule.kind == "image":
        return None
    if hasattr(datamodule, "modes"):
        modes = datamodule.modes(datamodule.grid(2))                                 # [2, K, D]
        keys = mode_metrics(modes[:, :1], modes).keys()
    else:
        y = torch.zeros(1, *datamodule.info()["y_shape"])
        keys = vector_metrics(y[:, None].expand(1, 2, *y.shape[1:]), y).keys()
    return {*keys, "num_inputs", "num_samples", "epochs"}


def pool_key(sample_pool: int | None) -> dict[str, int]:
    """metrics.json records the pool only when one was used (its values stay numbers)."""
    return {} if sample_pool is None else {"sample_pool": sample_pool}


def num_batches(loader, num_inputs: int) -> int | None:
    """How many test batches evaluate() reads for num_inputs inputs: ceil(num_inputs / batch size), at most the
    loader's length (None where the loader has no length)."""
    try:
        length = len(loader)
    except TypeError:
        return None
    batch_size = getattr(loader, "batch_size", None)
    return min(length, math.ceil(num_inputs / batch_size)) if batch_size else length
