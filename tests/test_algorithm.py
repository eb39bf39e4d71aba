"""The plain-torch algorithm pieces (cgml_lightning.algorithm), tested alone on tiny hand-made problems."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cgml_lightning import algorithm as A


def unit_norms(z: torch.Tensor) -> torch.Tensor:
    return z.norm(dim=-1)


# ---- sphere ops ---------------------------------------------------------------------------------------------
def test_project_unit_norm_and_direction():
    torch.manual_seed(0)
    z = torch.randn(7, 5) * torch.tensor([1e-3, 1.0, 10.0, 1e3, 0.5, 2.0, 1e-5])[:, None]
    out = A.project(z)
    assert out.shape == z.shape
    torch.testing.assert_close(unit_norms(out), torch.ones(7))
    # same direction: cosine 1 with the input
    cos = (out * z).sum(-1) / z.norm(dim=-1)
    torch.testing.assert_close(cos, torch.ones(7))


def test_project_tiny_vectors_stay_finite_and_unit():
    z = torch.tensor([[1e-6, 0.0, 0.0], [0.0, -3e-7, 4e-7], [1e-4, 1e-4, 0.0]])
    out = A.project(z)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(unit_norms(out), torch.ones(3))
    torch.testing.assert_close(out[0], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(out[1], torch.tensor([0.0, -0.6, 0.8]))


def test_project_batched_last_axis():
    z = torch.randn(3, 4, 6)
    torch.testing.assert_close(unit_norms(A.project(z)), torch.ones(3, 4))


def test_sphere_sample_shape_norm_and_generator():
    s = A.sphere_sample(4, 3, dim=5)
    assert s.shape == (4, 3, 5)
    torch.testing.assert_close(unit_norms(s), torch.ones(4, 3))
    a = A.sphere_sample(10, dim=8, generator=torch.Generator().manual_seed(123))
    b = A.sphere_sample(10, dim=8, generator=torch.Generator().manual_seed(123))
    c = A.sphere_sample(10, dim=8, generator=torch.Generator().manual_seed(124))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # the points are spread over the sphere, not all the same
    assert (a[0] - a[1:]).norm(dim=-1).min() > 1e-3


def test_sphere_sample_dtype():
    s = A.sphere_sample(5, dim=3, dtype=torch.float64)
    assert s.dtype == torch.float64
    torch.testing.assert_close(unit_norms(s), torch.ones(5, dtype=torch.float64))


# ---- distance ----------------------------------------------------------------------------------------------
PRED = torch.tensor([[0.0, 2.0, -1.0], [0.5, 0.5, 3.0]])
TARGET = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.5]])
# differences: [[-1, 2, 0], [0.5, -0.5, 2.5]]


def test_distance_l1():
    torch.testing.assert_close(A.distance(PRED, TARGET, "l1"), torch.tensor([3.0, 3.5]))


def test_distance_l2():
    torch.testing.assert_close(A.distance(PRED, TARGET, "l2"), torch.tensor([5.0, 0.25 + 0.25 + 6.25]))


def test_distance_smooth_l1():
    # beta = 1: 0.5 d^2 where |d| < 1, |d| - 0.5 elsewhere
    expected = torch.tensor([(1 - 0.5) + (2 - 0.5) + 0.0, 0.125 + 0.125 + (2.5 - 0.5)])
    torch.testing.assert_close(A.distance(PRED, TARGET, "smooth_l1"), expected)


def test_distance_default_is_l1_and_images_sum_over_all_elements():
    pred, target = torch.zeros(2, 1, 3, 3), torch.ones(2, 1, 3, 3)
    target[1] *= 2
    torch.testing.assert_close(A.distance(pred, target), torch.tensor([9.0, 18.0]))


def test_distance_weight_mask():
    weight = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(A.distance(PRED, TARGET, "l1", weight=weight), torch.tensor([2.0, 0.5]))
    torch.testing.assert_close(A.distance(PRED, TARGET, "l2", weight=weight), torch.tensor([4.0, 0.25]))
    # a broadcast image mask [B, 1, H, W] against [B, C, H, W]
    pred, target = torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2)
    hole = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    torch.testing.assert_close(A.distance(pred, target, "l1", weight=hole), torch.tensor([2.0]))


def test_distance_bad_kind():
    with pytest.raises(ValueError, match="l1, l2, smooth_l1.*'huber'"):
        A.distance(PRED, TARGET, "huber")


# ---- z-phase -----------------------------------------------------------------------------------------------
def linear_problem(b: int = 6, d: int = 4, out: int = 5, seed: int = 0):
    """A linear decoder y = W z + c and targets made at random sphere points; loss = sum of squares."""
    torch.manual_seed(seed)
    decoder = nn.Linear(d, out)
    z_true = A.sphere_sample(b, dim=d)
    with torch.no_grad():
        y = decoder(z_true)
    loss_fn = lambda z: (decoder(z) - y).pow(2).sum(dim=1)  # noqa: E731
    return decoder, loss_fn, z_true, y


def test_z_descent_lowers_loss_and_stays_on_sphere():
    decoder, loss_fn, _, _ = linear_problem()
    z0 = A.sphere_sample(6, dim=4, generator=torch.Generator().manual_seed(1))
    path = A.z_descent(loss_fn, z0, steps=20, lr=0.05)
    assert path.shape == (21, 6, 4)
    torch.testing.assert_close(path[0], z0)
    torch.testing.assert_close(unit_norms(path), torch.ones(21, 6))
    with torch.no_grad():
        before, after = loss_fn(path[0]), loss_fn(path[-1])
    assert after.sum() < 0.7 * before.sum()
    assert (after <= before + 1e-6).all()


def test_z_descent_momentum_also_descends():
    _, loss_fn, _, _ = linear_problem(seed=3)
    z0 = A.sphere_sample(6, dim=4, generator=torch.Generator().manual_seed(2))
    path = A.z_descent(loss_fn, z0, steps=10, lr=0.02, momentum=0.9)
    assert path.shape == (11, 6, 4)
    torch.testing.assert_close(unit_norms(path), torch.ones(11, 6))
    with torch.no_grad():
        assert loss_fn(path[-1]).sum() < loss_fn(path[0]).sum()


def test_z_descent_quadratic_converges_to_target_direction():
    # loss = ||z - t||^2 with t on the sphere: the projected descent heads straight for t
    t = A.project(torch.tensor([[1.0, 2.0, -1.0], [0.0, -1.0, 0.0]]))
    z0 = A.project(torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.2, 0.0]]))
    path = A.z_descent(lambda z: (z - t).pow(2).sum(1), z0, steps=30, lr=0.1)
    cos = (path * t).sum(-1)                                   # [k+1, B]
    assert (cos[1:] >= cos[:-1] - 1e-6).all()                  # monotone approach
    assert (cos[-1] > 0.99).all()


def test_z_descent_normalized_ignores_gradient_scale():
    """normalized=True: unit-gradient steps of decaying length, so a loss scaled by 1e-6 takes the same path."""
    _, loss_fn, _, _ = linear_problem(seed=4)
    z0 = A.sphere_sample(6, dim=4, generator=torch.Generator().manual_seed(0))
    big = A.z_descent(loss_fn, z0, steps=4, lr=0.2, normalized=True)
    tiny = A.z_descent(lambda z: 1e-6 * loss_fn(z), z0, steps=4, lr=0.2, normalized=True)
    torch.testing.assert_close(big, tiny, rtol=1e-4, atol=1e-5)
    assert (big[1] - z0).norm(dim=-1).mean() > 0.1                # it really moves despite the scale
    plain = A.z_descent(lambda z: 1e-6 * loss_fn(z), z0, steps=4, lr=0.2)
    assert (plain[-1] - z0).norm(dim=-1).max() < 1e-4             # unnormalised: the tiny gradient barely moves
    with torch.no_grad():
        assert loss_fn(big[-1]).sum() < loss_fn(big[0]).sum()


def test_z_descent_zero_steps():
    _, loss_fn, _, _ = linear_problem()
    z0 = A.sphere_sample(6, dim=4)
    path = A.z_descent(loss_fn, z0, steps=0, lr=0.1)
    assert path.shape == (1, 6, 4)
    torch.testing.assert_close(path[0], z0)


def test_z_descent_touches_no_weights():
    decoder, loss_fn, _, _ = linear_problem()
    weights = [p.detach().clone() for p in decoder.parameters()]
    z0 = A.sphere_sample(6, dim=4).requires_grad_(True)
    A.z_descent(loss_fn, z0, steps=5, lr=0.1)
    for p, w in zip(decoder.parameters(), weights):
        assert p.grad is None
        assert torch.equal(p, w)
    assert z0.grad is None


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_z_descent_keeps_no_graph(steps):
    """The trajectory is plain data: no grad_fn, no leaf that requires grad (neither the stack nor its points)."""
    _, loss_fn, _, _ = linear_problem()
    path = A.z_descent(loss_fn, A.sphere_sample(6, dim=4), steps=steps, lr=0.1)
    assert not path.requires_grad
    assert path.grad_fn is None


def test_z_descent_works_inside_no_grad():
    # sampling code calls z-steps under torch.no_grad(); the steps must still compute gradients w.r.t. z
    _, loss_fn, _, _ = linear_problem()
    z0 = A.sphere_sample(6, dim=4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        path = A.z_descent(loss_fn, z0, steps=5, lr=0.05)
        assert loss_fn(path[-1]).sum() < loss_fn(path[0]).sum()


# ---- mode-consistent starts ----------------------------------------------------------------------------------
def test_select_starts_picks_argmin_candidate_per_input():
    m, b, d = 5, 4, 3
    candidates = A.sphere_sample(m, b, dim=d, generator=torch.Generator().manual_seed(0))
    target = A.sphere_sample(b, dim=d, generator=torch.Generator().manual_seed(1))
    calls = []

    def loss_fn(z):                                              # z: [B, d], one candidate per input
        calls.append(z.shape)
        return (z - target).norm(dim=1)

    chosen = A.select_starts(loss_fn, candidates)
    assert chosen.shape == (b, d)
    assert calls == [torch.Size([b, d])] * m                     # one pass of B rows per candidate
    expected_idx = (candidates - target[None]).norm(dim=-1).argmin(dim=0)
    torch.testing.assert_close(chosen, candidates[expected_idx, torch.arange(b)])
    # and it is really the best: no candidate of any input is closer
    best = (chosen - target).norm(dim=-1)
    assert (best[None] <= (candidates - target[None]).norm(dim=-1) + 1e-7).all()


def test_select_starts_planted_winner():
    m, b, d = 3, 2, 2
    candidates = torch.zeros(m, b, d)
    candidates[:, 0] = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    candidates[:, 1] = torch.tensor([[0.0, -1.0], [1.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([[-0.9, 0.1], [0.1, 0.9]])             # wants candidate 2 for input 0 and 2 for input 1
    chosen = A.select_starts(lambda z: (z - target).abs().sum(1), candidates)
    torch.testing.assert_close(chosen, torch.tensor([[-1.0, 0.0], [0.0, 1.0]]))


# ---- dynamics targets and update rule --------------------------------------------------------------------------
def make_path(k=3, b=2, d=4, seed=0):
    return A.sphere_sample(k + 1, b, dim=d, generator=torch.Generator().manual_seed(seed))


def test_dynamics_targets_next():
    path = make_path()
    z_t, r_t, rho_t = A.dynamics_targets(path, "next")
    assert z_t.shape == (6, 4) and r_t.shape == (6, 4) and rho_t.shape == (6, 1)
    # row t*B + b
    torch.testing.assert_close(z_t, path[:-1].reshape(6, 4))
    torch.testing.assert_close(r_t, path[1:].reshape(6, 4))
    torch.testing.assert_close(z_t[1 * 2 + 1], path[1, 1])
    torch.testing.assert_close(r_t[1 * 2 + 1], path[2, 1])
    torch.testing.assert_close(rho_t[:, 0], (r_t - z_t).norm(dim=-1))


def test_dynamics_targets_final():
    path = make_path()
    z_t, r_t, rho_t = A.dynamics_targets(path, "final")
    assert z_t.shape == (6, 4) and r_t.shape == (6, 4) and rho_t.shape == (6, 1)
    torch.testing.assert_close(z_t, path[:-1].reshape(6, 4))
    torch.testing.assert_close(r_t, path[-1:].expand(3, 2, 4).reshape(6, 4))
    torch.testing.assert_close(rho_t[:, 0], (r_t - z_t).norm(dim=-1))
    # the last step's target is its own next point
    torch.testing.assert_close(r_t[-2:], path[-1])


def test_dynamics_targets_bad_target():
    with pytest.raises(ValueError, match="'next' or 'final'.*'mean'"):
        A.dynamics_targets(make_path(), "mean")


def test_dynamics_step_moves_rho_towards_r():
    z = A.project(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    r = A.project(torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    rho = torch.tensor([[0.3], [0.05]])
    out = A.dynamics_step(z, r, rho)
    # before projection: z + rho (r - z)/||r - z||, a move of exactly rho along the chord to r
    moved = z + rho * (r - z) / (r - z).norm(dim=-1, keepdim=True)
    torch.testing.assert_close((moved - z).norm(dim=-1), rho[:, 0])
    torch.testing.assert_close(out, moved / moved.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(unit_norms(out), torch.ones(2))
    # it heads toward r: closer in angle than z was, and stays in the plane of z and r
    assert ((out * r).sum(-1) > (z * r).sum(-1)).all()
    torch.testing.assert_close(out[0, 2], torch.tensor(0.0))
    torch.testing.assert_close(out[1, 0], torch.tensor(0.0))
    # the hand-computed first row: z=(1,0,0), r=(0,1,0): move 0.3 along (-1,1)/sqrt2
    s = 0.3 / math.sqrt(2)
    expected = torch.tensor([1 - s, s, 0.0])
    torch.testing.assert_close(out[0], expected / expected.norm())


def test_dynamics_step_rho_zero_and_r_equal_z():
    z = A.sphere_sample(4, dim=5, generator=torch.Generator().manual_seed(0))
    r = A.sphere_sample(4, dim=5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(A.dynamics_step(z, r, torch.zeros(4, 1)), z)
    # r == z: no direction; must not produce NaN
    out = A.dynamics_step(z, z.clone(), torch.full((4, 1), 0.5))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, z)


def test_dynamics_step_negative_rho_is_no_move():
    z = A.sphere_sample(4, dim=5, generator=torch.Generator().manual_seed(0))
    r = A.sphere_sample(4, dim=5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(A.dynamics_step(z, r, torch.full((4, 1), -0.3)), z)


def test_dynamics_rho_follows_when_the_moves_shrink():
    """Z's move length after its targets drop from long early moves (0.5) to the image z-phase's short ones (0.05):
    the linear rho follows within 50 Adam steps. (rho_output=softplus, the earlier rule, is at ~0.002 here: it
    overshoots to where its gradient sigmoid(unit) is tiny against the early gradients Adam still scales by.)"""
    from cgml_lightning.nets import DynamicsNet

    torch.manual_seed(0)
    net = DynamicsNet(32, 8, width=64, depth=3, rho_output="linear")
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    hbar, z = torch.randn(64, 32), A.sphere_sample(64, dim=8)
    for step in range(100):
        r, rho = net(hbar, z)
        loss = A.dynamics_loss(r, rho, z, torch.full((64, 1), 0.5 if step < 50 else 0.05))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert abs(rho.mean().item() - 0.05) < 0.01, rho.mean().item()


def test_dynamics_step_iterates_to_r():
    z = A.sphere_sample(3, dim=4, generator=torch.Generator().manual_seed(0))
    r = A.sphere_sample(3, dim=4, generator=torch.Generator().manual_seed(5))
    for _ in range(100):
        z = A.dynamics_step(z, r, torch.full((3, 1), 0.05))
    assert ((z * r).sum(-1) > 0.99).all()


def test_dynamics_loss_zero_at_targets_positive_elsewhere():
    r, rho = A.sphere_sample(5, dim=3), torch.rand(5, 1)
    assert A.dynamics_loss(r, rho, r, rho).item() == 0.0
    assert A.dynamics_loss(r, rho + 1, r, rho).item() == pytest.approx(1.0)


# ---- Lipschitz penalty ---------------------------------------------------------------------------------------
def test_lipschitz_penalty_constant_function_is_zero():
    u = torch.randn(64, 4)
    pen = A.lipschitz_penalty(lambda v: torch.ones(len(v), 3), (u,))
    assert pen.item() == pytest.approx(0.0, abs=1e-6)


def test_lipschitz_penalty_linear_map_is_frobenius_norm_squared():
    torch.manual_seed(0)
    a = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]])           # ||A||_F^2 = 1 + 4 + .25 + 9 + 1 = 15.25
    u = torch.randn(8192, 3, dtype=torch.float64)
    a64 = a.double()
    pen = A.lipschitz_penalty(lambda v: v @ a64.T, (u,), sigma=1e-3)
    assert pen.item() == pytest.approx(15.25, rel=0.05)
    pen2 = A.lipschitz_penalty(lambda v: v @ (2 * a64).T, (u,), sigma=1e-3)
    assert pen2.item() == pytest.approx(4 * 15.25, rel=0.05)
    assert pen2 > pen > 0


def test_lipschitz_penalty_several_inputs_and_gradients():
    torch.manual_seed(0)
    lin = nn.Linear(5, 2)
    h, z = torch.randn(4096, 3), torch.randn(4096, 2)
    pen = A.lipschitz_penalty(lambda h_, z_: lin(torch.cat([h_, z_], 1)), (h, z), sigma=1e-2)
    assert pen.item() == pytest.approx(lin.weight.pow(2).sum().item(), rel=0.1)
    pen.backward()                                                   # differentiable w.r.t. the weights
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


# ---- medoids: which k of P samples to keep ------------------------------------------------------------------
def clustered(sizes: list[int], spread: float = 0.01, gap: float = 10.0, seed: int = 0) -> tuple[torch.Tensor, list]:
    """Points in tight clusters of the given sizes, far apart: (points [P, 2], the cluster of each point)."""
    g = torch.Generator().manual_seed(seed)
    points, labels = [], []
    for c, size in enumerate(sizes):
        points.append(torch.tensor([gap * c, -gap * c]) + spread * torch.randn(size, 2, generator=g))
        labels += [c] * size
    return torch.cat(points), labels


def test_medoids_one_per_cluster_however_unequal():
    points, labels = clustered([40, 5, 2])           # independent draws of 3 would mostly repeat the big cluster
    keep = A.medoids(torch.cdist(points, points)[None].square(), 3)
    assert keep.shape == (1, 3)
    assert sorted(labels[i] for i in keep[0].tolist()) == [0, 1, 2]


def test_medoids_are_central_and_batched():
    """Per input of a batch: a line of 5 points keeps its middle one; clusters keep their own central point."""
    line = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]])
    points, _ = clustered([3, 2])
    d = torch.stack([torch.cdist(line, line).square(), torch.cdist(points, points).square()])
    keep = A.medoids(d, 1)
    assert keep[0].tolist() == [2]
    assert keep.shape == (2, 1)
    assert keep[1].item() in (0, 1, 2)                # the bigger cluster


def test_medoids_distinct_even_for_identical_samples():
    keep = A.medoids(torch.zeros(2, 6, 6), 4)        # a deterministic model: six equal samples
    assert all(len(set(row)) == 4 for row in keep.tolist())


def test_medoids_cover_better_than_the_first_k():
    g = torch.Generator().manual_seed(1)
    points = torch.randn(8, 60, 3, generator=g)
    d = torch.cdist(points, points).square()
    coverage = lambda keep: d.gather(1, keep[:, :, None].expand(8, 5, 60)).amin(1).sum(1)  # noqa: E731
    first = torch.arange(5).expand(8, 5)
    assert (coverage(A.medoids(d, 5)) < coverage(first)).all()


def test_start_losses_batched_equals_loop():
    """One pass over all M*B rows (row m*B + b: candidate m of input b) gives each candidate's loss as the
    per-candidate passes do, and select_starts picks the same starts."""
    m, b, d = 4, 5, 3
    candidates = A.sphere_sample(m, b, dim=d, generator=torch.Generator().manual_seed(0))
    target = A.sphere_sample(b, dim=d, generator=torch.Generator().manual_seed(1))
    calls = []

    def loss_fn(z, target):
        calls.append(len(z))
        return (z - target).abs().sum(1)

    loop = A.start_losses(lambda z: loss_fn(z, target), candidates)
    batched = A.start_losses(lambda z: loss_fn(z, target.repeat(m, 1)), candidates, batched=True)
    assert calls == [b] * m + [m * b]
    torch.testing.assert_close(batched, loop)
    chosen = A.select_starts(lambda z: loss_fn(z, target.repeat(m, 1)), candidates, batched=True)
    assert torch.equal(chosen, A.select_starts(lambda z: loss_fn(z, target), candidates))
