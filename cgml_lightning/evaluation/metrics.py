"""Evaluation metrics on samples [B, N, ...] against targets [B, ...].

PSNR, SSIM and FID come from torchmetrics; the diversity measures and the mode metrics are a few lines of torch.
Every diversity measure is `pairwise_mean` of one distance over the N(N-1)/2 pairs of an input's samples: pixel L1
(whole image or hole only), Euclidean distance of unit-normalised features, LPIPS.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance

Distance = Callable[[Tensor, Tensor], Tensor]     # (a [P, ...], b [P, ...]) -> [P]: one distance per pair


def pairwise_mean(samples: Tensor, dist_fn: Distance, max_elements: int = 2**24) -> Tensor:
    """Mean of dist_fn over the N(N-1)/2 unordered pairs of each input's samples.

    samples [B, N, ...]; dist_fn(a [P, ...], b [P, ...]) -> [P], a symmetric distance between a[p] and b[p], gets
    the pairs in chunks of at most about max_elements numbers per side. Returns [B] in samples' floating dtype
    (float32 for other dtypes), zeros when N < 2."""
    b, n = samples.shape[:2]
    dtype = samples.dtype if samples.is_floating_point() else torch.float32
    if n < 2:
        return torch.zeros(b, dtype=dtype, device=samples.device)
    first, second = torch.triu_indices(n, n, offset=1, device=samples.device)        # [P] each, P = N(N-1)/2
    per_pair = max(1, max_elements // max(1, b * samples[0, 0].numel()))
    total = torch.zeros(b, dtype=dtype, device=samples.device)
    for start in range(0, len(first), per_pair):
        i, j = first[start:start + per_pair], second[start:start + per_pair]
        a, c = samples[:, i].flatten(0, 1), samples[:, j].flatten(0, 1)               # [B * p, ...]
        total += dist_fn(a, c).to(dtype).view(b, len(i)).sum(1)
    return total / len(first)


def pairwise_l1_diversity(samples: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean pairwise L1 distance per element between the N samples of each input: samples [B, N, ...] -> [B].
    Zero for a regressor.

    weight [B, 1|C, H, W] (a hole mask, 1 = a pixel to fill): the mean over the weighted elements only,
    sum(w |a - b|) / sum(w) over every channel, zero for an input whose weight is all zero."""
    if weight is None:
        return pairwise_mean(samples, lambda a, b: (a - b).abs().flatten(1).mean(1))
    w = weight.to(samples.dtype).expand(samples.shape[0], *samples.shape[2:])           # [B, C, H, W]
    total = pairwise_mean(samples * w[:, None], lambda a, b: (a - b).abs().flatten(1).sum(1))
    count = w.flatten(1).sum(1).to(total.dtype)
    return torch.where(count > 0, total / count.clamp_min(1e-12), torch.zeros_like(total))


def feature_diversity(samples: Tensor, features: Callable[[Tensor], Tensor], batch_size: int = 1024) -> Tensor:
    """Mean pairwise Euclidean distance between the unit-normalised feature vectors of each input's samples: [B],
    in [0, 2]. samples [B, N, C, H, W]; features(images [M, C, H, W]) -> [M, F] (an FID feature net), run on
    chunks of batch_size images. An all-zero feature vector stays zero (distance 1 to any unit vector)."""
    b, n = samples.shape[:2]
    if n < 2:
        return torch.zeros(b, device=samples.device)
    flat = samples.flatten(0, 1)
    feats = torch.cat([features(chunk).flatten(1).float() for chunk in flat.split(batch_size)])   # [B * N, F]
    feats = F.normalize(feats, dim=1).view(b, n, -1)
    return pairwise_mean(feats, lambda a, c: (a - c).norm(dim=1))


def lpips_diversity(samples: Tensor, lpips: Distance) -> Tensor:
    """Mean pairwise LPIPS between the N samples of each input: samples [B, N, C, H, W] -> [B].
    lpips(a [P, C, H, W], b [P, C, H, W]) -> [P] (feature_nets.LpipsDistance, or any callable in tests)."""
    return pairwise_mean(samples, lpips)


def psnr(samples: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """PSNR in dB of every sample, pixels in [0, 1]: [B, N]. With weight (a hole mask), on the weighted pixels only."""
    b, n = samples.shape[:2]
    preds, tgt = samples.flatten(0, 1), target.repeat_interleave(n, dim=0)
    if weight is None:
        out = peak_signal_noise_ratio(preds, tgt, data_range=1.0, reduction="none", dim=(1, 2, 3))
    else:
        w = weight.repeat_interleave(n, dim=0).expand_as(tgt)
        mse = ((preds - tgt).pow(2) * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1)
        out = 10 * torch.log10(1.0 / mse.clamp_min(1e-10))
    return out.view(b, n)


def ssim(samples: Tensor, target: Tensor) -> Tensor:
    """SSIM of every sample, pixels in [0, 1]: [B, N]. The Gaussian window shrinks to fit small images."""
    b, n = samples.shape[:2]
    side = min(target.shape[-2:])
    kernel = min(11, side - 1 if side % 2 == 0 else side)
    out = structural_similarity_index_measure(
        samples.flatten(0, 1), target.repeat_interleave(n, dim=0), data_range=1.0, reduction="none",
        kernel_size=kernel, sigma=1.5 * kernel / 11)
    return out.view(b, n)


def mode_distances(samples: Tensor, modes: Tensor) -> Tensor:
    """Euclidean distance of every sample [B, N, D] to every true mode [B, K, D]: [B, N, K]."""
    return torch.cdist(samples.flatten(2), modes.flatten(2))


def mode_tolerance(modes: Tensor, rel: float = 0.1) -> Tensor:
    """rel x the modes' spread around their mean, per input [B]: for the symmetric toy, rel x ||mode||."""
    centre = modes.mean(dim=1, keepdim=True)
    return rel * (modes - centre).flatten(2).norm(dim=-1).amax(dim=1)


def mode_metrics(samples: Tensor, modes: Tensor, rel: float = 0.1) -> dict[str, float]:
    """mode_near_fraction: share of samples within tolerance of the nearer true mode;
    mode_coverage: share of inputs whose samples hit every mode; mode_balance: the rarest mode's share of hits."""
    dist = mode_distances(samples, modes)                                     # [B, N, K]
    hit = dist <= mode_tolerance(modes, rel)[:, None, None]                   # [B, N, K]
    nearest = dist.argmin(dim=-1)                                             # [B, N]
    near = hit.gather(-1, nearest[..., None]).squeeze(-1)                     # [B, N]
    k = modes.shape[1]
    counts = torch.stack([(near & (nearest == i)).sum() for i in range(k)]).float()
    return {"mode_near_fraction": near.float().mean().item(),
            "mode_coverage": hit.any(dim=1).all(dim=-1).float().mean().item(),
            "mode_balance": (counts.min() / counts.sum().clamp_min(1)).item()}


def image_metrics(samples: Tensor, target: Tensor, hole: Tensor | None = None) -> dict[str, Tensor]:
    """Per-input image metrics [B] (averaged by the caller): best-of-N and mean PSNR, best-of-N SSIM, diversity
    (pairwise pixel L1). With hole [B, 1, H, W] (1 = pixels to fill) also PSNR and diversity on the hole only."""
    p = psnr(samples, target)
    out = {"psnr_best_of_n": p.amax(1), "psnr_mean": p.mean(1), "ssim_best_of_n": ssim(samples, target).amax(1),
           "diversity": pairwise_l1_diversity(samples)}
    if hole is not None:
        ph = psnr(samples, target, weight=hole)
        out.update(psnr_hole_best_of_n=ph.amax(1), psnr_hole_mean=ph.mean(1),
                   diversity_hole=pairwise_l1_diversity(samples, weight=hole))
    return out


def vector_metrics(samples: Tensor, target: Tensor) -> dict[str, Tensor]:
    """Per-input metrics [B] for vector data without known modes: best-of-N and mean L2 error, diversity."""
    err = (samples - target[:, None]).flatten(2).norm(dim=-1)                 # [B, N]
    return {"l2_best_of_n": err.amin(1), "l2_mean": err.mean(1), "diversity": pairwise_l1_diversity(samples)}


def fid_metric(features: nn.Module) -> FrechetInceptionDistance:
    """torchmetrics' FID over a pluggable feature net: `features(images) -> [B, F]` gets the images as they are
    (the net does its own preprocessing) and states its width as `features.num_features`.
    Feed it with .update(images, real=True|False), read it with .compute()."""
    if not isinstance(getattr(features, "num_features", None), int):
        raise ValueError(f"fid_metric: {type(features).__name__} must state its feature width as an int "
                         "attribute num_features")
    return FrechetInceptionDistance(feature=features, reset_real_features=True)
