"""The cGML algorithm as plain torch functions (no Lightning): readable on one screen, testable alone.

Shapes: B inputs, d = latent_dim, k = z-steps, M = start candidates.
A "loss_fn" maps latents z[B, d] to one distance per input [B]; it closes over the (detached)
encoder features and the targets, so these functions never see the networks' weights.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

LossFn = Callable[[Tensor], Tensor]


def project(z: Tensor, eps: float = 1e-8) -> Tensor:
    """Back onto the unit sphere S^{d-1} (last axis)."""
    return z / z.norm(dim=-1, keepdim=True).clamp_min(eps)


def sphere_sample(*shape: int, dim: int, generator: torch.Generator | None = None,
                  device=None, dtype=None) -> Tensor:
    """Uniform points on S^{dim-1}: Tensor[*shape, dim]."""
    return project(torch.randn(*shape, dim, generator=generator, device=device, dtype=dtype))


def distance(pred: Tensor, target: Tensor, kind: str = "l1", weight: Tensor | None = None) -> Tensor:
    """Per-sample distance [B], summed over the output elements (optionally weighted, e.g. a hole mask)."""
    if kind == "l1":
        err = (pred - target).abs()
    elif kind == "l2":
        err = (pred - target).pow(2)
    elif kind == "smooth_l1":
        err = F.smooth_l1_loss(pred, target, reduction="none")
    else:
        raise ValueError(f"distance must be one of l1, l2, smooth_l1; got {kind!r}")
    if weight is not None:
        err = err * weight
    return err.flatten(1).sum(dim=1)


@torch.no_grad()
def start_losses(loss_fn: LossFn, candidates: Tensor, batched: bool = False) -> Tensor:
    """The distance of each candidate z[M, B, d]'s output to y: Tensor[M, B].

    batched=False: one decoder pass of B rows per candidate; loss_fn maps [B, d] -> [B]. On CPU this is
    faster than one pass of M*B rows, and memory stays flat.
    batched=True: one pass over all M*B rows, row m*B + b holding candidate m of input b; loss_fn maps
    [M*B, d] -> [M*B], so it closes over the features and targets repeated M times. Fewer, larger kernels,
    which a GPU may run faster than M small passes. Both give the same losses up to float rounding, as long
    as the decoder treats rows independently (group norm does; batch norm in training mode does not).
    """
    if batched:
        m, b, d = candidates.shape
        return loss_fn(candidates.reshape(m * b, d)).view(m, b)
    return torch.stack([loss_fn(z) for z in candidates])


@torch.no_grad()
def select_starts(loss_fn: LossFn, candidates: Tensor, batched: bool = False) -> Tensor:
    """Mode-consistent starts: per input, the candidate z[M, B, d] whose output is closest to y
    (loss_fn and batched as in start_losses).

    Choosing the start makes the dynamics network's regression targets consistent: a start in
    one mode's basin is paired with targets of that mode, so Z stops averaging between modes.
    """
    losses = start_losses(loss_fn, candidates, batched)                 # [M, B]
    best = losses.argmin(dim=0)                                          # [B]
    return candidates[best, torch.arange(candidates.shape[1], device=candidates.device)]  # [B, d]


def z_descent(loss_fn: LossFn, z0: Tensor, steps: int, lr: float, momentum: float = 0.0,
              normalized: bool = False, path: bool = True) -> Tensor:
    """Projected gradient descent on z only: the trajectory [k+1, B, d], or with path=False the last z [B, d].

    The z-phase of training takes the trajectory (Z regresses on it); guided sampling takes the last z, descending
    a guide's penalty (loss_fn may then return one scalar for all rows: it is summed either way).
    Gradients are taken w.r.t. z alone (autograd.grad), so no weight gradient is formed; each step
    starts from a fresh leaf, so no graph survives from one step to the next.
    normalized: step along the unit gradient with a linearly decaying length lr * (1 - t/k), so z moves
    as far where the outputs' scale (and thus the gradient) is tiny as where it is large.
    """
    z, velocity, visited = z0.detach(), torch.zeros_like(z0), [z0.detach()]
    for t in range(steps):
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(loss_fn(z).sum(), z)
        if normalized:
            grad = (1 - t / steps) * grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        velocity = momentum * velocity + grad
        z = project(z.detach() - lr * velocity)
        if path:
            visited.append(z)
    return torch.stack(visited).detach() if path else z.detach()


def dynamics_targets(path: Tensor, target: str = "next") -> tuple[Tensor, Tensor, Tensor]:
    """Regression pairs for Z from a trajectory [k+1, B, d]: (z_t, r_t, rho_t), each flattened to k*B rows.

    target="next": r_t = z_{t+1} (the paper's step-by-step dynamics);
    target="final": r_t = z_k (every point of the path points at where it converged).
    """
    z_t = path[:-1]
    r_t = path[1:] if target == "next" else path[-1:].expand_as(z_t)
    if target not in ("next", "final"):
        raise ValueError(f"dynamics target must be 'next' or 'final'; got {target!r}")
    rho_t = (r_t - z_t).norm(dim=-1, keepdim=True)
    d = path.shape[-1]
    return z_t.reshape(-1, d), r_t.reshape(-1, d), rho_t.reshape(-1, 1)


def dynamics_step(z: Tensor, r: Tensor, rho: Tensor, eps: float = 1e-8) -> Tensor:
    """Z's update rule: move rho along the direction to r, then back onto the sphere (a negative rho: no move)."""
    direction = r - z
    return project(z + rho.clamp_min(0) * direction / direction.norm(dim=-1, keepdim=True).clamp_min(eps))


def dynamics_loss(r_pred: Tensor, rho_pred: Tensor, r: Tensor, rho: Tensor) -> Tensor:
    """MSE of Z's predictions against the recorded (r, rho)."""
    return F.mse_loss(r_pred, r) + F.mse_loss(rho_pred, rho)


def lipschitz_penalty(fn: Callable[..., Tensor], inputs: tuple[Tensor, ...], sigma: float = 1e-3) -> Tensor:
    """Perturbation form of the Lipschitz condition: E ||f(u + eps) - f(u)||^2 / sigma^2, eps ~ N(0, sigma^2)."""
    out = fn(*inputs)
    noisy = fn(*(u + sigma * torch.randn_like(u) for u in inputs))
    return ((noisy - out).flatten(1).pow(2).sum(dim=1) / sigma**2).mean()


def medoids(distances: Tensor, k: int, refine_steps: int = 10) -> Tensor:
    """k-medoids: per input, which k of its P samples to keep, from their pairwise distances [B, P, P]: Tensor[B, k].

    Minimises the summed distance from every sample to its nearest kept one (greedy additions, then alternating
    refinement), so the k kept samples cover where the P samples lie instead of k independent draws repeating the
    most likely outputs. Model-agnostic: applies to any module's samples.
    """
    b, p, _ = distances.shape
    rows = torch.arange(b, device=distances.device)
    nearest = torch.full((b, p), float("inf"), device=distances.device, dtype=distances.dtype)
    taken = torch.zeros(b, p, dtype=torch.bool, device=distances.device)
    picked = []
    for _ in range(k):
        total = torch.minimum(nearest[:, :, None], distances).sum(dim=1)   # [B, P]: the objective with each added
        choice = total.masked_fill(taken, float("inf")).argmin(dim=1)        # k distinct samples, even among equals
        taken[rows, choice] = True
        picked.append(choice)
        nearest = torch.minimum(nearest, distances[rows, choice])
    keep = torch.stack(picked, dim=1)                                          # [B, k]
    for _ in range(refine_steps):
        to_kept = distances.gather(1, keep[:, :, None].expand(b, k, p))       # [B, k, P]
        members = F.one_hot(to_kept.argmin(dim=1), k).to(distances)           # [B, P, k]: each sample's cluster
        cost = distances @ members                                             # [B, P, k]: summed distance to a cluster
        cost = cost.masked_fill(members == 0, float("inf"))                    # a medoid is one of its cluster
        keep = torch.where(members.sum(dim=1) > 0, cost.argmin(dim=1), keep)  # an empty cluster keeps its medoid
    return keep
