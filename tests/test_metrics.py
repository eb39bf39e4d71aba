"""Evaluation metrics (DESIGN.md section 4) against hand computations."""
from __future__ import annotations

import math

import pytest
import torch

from cgml_lightning.data import ToyDataModule
from cgml_lightning.metrics import (image_metrics, mode_metrics, mode_tolerance, pairwise_l1_diversity, psnr, ssim,
                                    vector_metrics)


# ---- diversity -----------------------------------------------------------------------------------------------
def test_diversity_hand_computed():
    a = torch.tensor([0.0, 0.0, 0.0, 0.0])
    b = torch.tensor([1.0, 0.0, 0.5, 0.5])                      # mean |a - b| = 0.5
    c = torch.tensor([1.0, 1.0, 1.0, 1.0])                      # mean |a - c| = 1, |b - c| = 0.5
    samples = torch.stack([torch.stack([a, b]), torch.stack([a, a]), torch.stack([a, c])])   # [3, 2, 4]
    torch.testing.assert_close(pairwise_l1_diversity(samples), torch.tensor([0.5, 0.0, 1.0]))
    three = torch.stack([a, b, c])[None]                         # pairs: 0.5, 1.0, 0.5 -> mean 2/3
    torch.testing.assert_close(pairwise_l1_diversity(three), torch.tensor([2.0 / 3.0]))


def test_diversity_images_and_single_sample():
    samples = torch.zeros(2, 2, 1, 4, 4)
    samples[0, 1] = 1.0
    torch.testing.assert_close(pairwise_l1_diversity(samples), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(pairwise_l1_diversity(torch.rand(3, 1, 5)), torch.zeros(3))


# ---- PSNR / SSIM -----------------------------------------------------------------------------------------------
def test_psnr_matches_hand_computation():
    torch.manual_seed(0)
    target = torch.rand(2, 1, 8, 8)
    samples = (target[:, None] + 0.05 * torch.randn(2, 3, 1, 8, 8)).clamp(0, 1)
    out = psnr(samples, target)
    assert out.shape == (2, 3)
    mse = (samples - target[:, None]).pow(2).flatten(2).mean(-1)
    torch.testing.assert_close(out, 10 * torch.log10(1.0 / mse), rtol=1e-4, atol=1e-4)


def test_psnr_known_value():
    target = torch.zeros(1, 1, 4, 4)
    samples = torch.full((1, 1, 1, 4, 4), 0.1)                  # mse 0.01 -> 20 dB
    assert psnr(samples, target).item() == pytest.approx(20.0, abs=1e-4)


def test_psnr_hole_weight():
    target = torch.zeros(1, 1, 4, 4)
    samples = torch.zeros(1, 2, 1, 4, 4)
    samples[0, :, :, 2:] = 0.1                                    # error only in the bottom half
    samples[0, 1, :, :2] = 0.5                                    # sample 1 also wrong outside the hole
    hole = torch.zeros(1, 1, 4, 4)
    hole[..., 2:, :] = 1
    out = psnr(samples, target, weight=hole)
    torch.testing.assert_close(out, torch.full((1, 2), 20.0), rtol=1e-4, atol=1e-4)   # only the hole counts
    whole = psnr(samples, target)
    assert whole[0, 0].item() == pytest.approx(10 * math.log10(1 / 0.005), abs=1e-3)
    assert whole[0, 1] < whole[0, 0]


def test_ssim_identical_is_one_and_noise_lowers_it():
    torch.manual_seed(0)
    for size in (8, 16, 28):
        target = torch.rand(3, 1, size, size)
        same = ssim(target[:, None].expand(3, 2, 1, size, size), target)
        assert same.shape == (3, 2)
        torch.testing.assert_close(same, torch.ones(3, 2), rtol=1e-4, atol=1e-4)
        noisy = (target[:, None] + 0.3 * torch.randn(3, 2, 1, size, size)).clamp(0, 1)
        assert (ssim(noisy, target) < 0.95).all()


def test_image_metrics_keys_and_best_of_n():
    torch.manual_seed(0)
    target = torch.rand(2, 1, 8, 8)
    samples = torch.stack([target, (target + 0.2).clamp(0, 1)], dim=1)   # sample 0 is perfect-ish
    samples[:, 0] += 0.01
    hole = torch.ones(2, 1, 8, 8)
    out = image_metrics(samples, target, hole=hole)
    assert set(out) == {"psnr_best_of_n", "psnr_mean", "ssim_best_of_n", "diversity", "psnr_hole_best_of_n",
                        "psnr_hole_mean"}
    p = psnr(samples, target)
    torch.testing.assert_close(out["psnr_best_of_n"], p.amax(1))
    torch.testing.assert_close(out["psnr_mean"], p.mean(1))
    assert (out["psnr_best_of_n"] > out["psnr_mean"]).all()
    assert (out["diversity"] > 0).all()
    assert set(image_metrics(samples, target)) == {"psnr_best_of_n", "psnr_mean", "ssim_best_of_n", "diversity"}


# ---- toy mode metrics -----------------------------------------------------------------------------------------
@pytest.fixture
def toy_modes():
    dm = ToyDataModule(num_samples=16)
    x = dm.grid(10)
    return dm.modes(x)                                           # [10, 2, 3]


def test_mode_metrics_samples_at_modes(toy_modes):
    samples = toy_modes.repeat_interleave(2, dim=1) + 1e-4       # [10, 4, 3]: 2 at each mode
    out = mode_metrics(samples, toy_modes)
    assert out["mode_near_fraction"] == pytest.approx(1.0)
    assert out["mode_coverage"] == pytest.approx(1.0)
    assert out["mode_balance"] == pytest.approx(0.5)


def test_mode_metrics_samples_at_the_mean(toy_modes):
    samples = toy_modes.mean(dim=1, keepdim=True).expand(-1, 4, -1)   # the regressor's blur, between modes
    out = mode_metrics(samples, toy_modes)
    assert out["mode_near_fraction"] == pytest.approx(0.0)
    assert out["mode_coverage"] == pytest.approx(0.0)


def test_mode_metrics_collapse_onto_one_mode(toy_modes):
    samples = toy_modes[:, :1].expand(-1, 5, -1)
    out = mode_metrics(samples, toy_modes)
    assert out["mode_near_fraction"] == pytest.approx(1.0)
    assert out["mode_coverage"] == pytest.approx(0.0)
    assert out["mode_balance"] == pytest.approx(0.0)


def test_mode_metrics_tolerance_is_ten_percent(toy_modes):
    # for the symmetric toy the tolerance is 0.1 * ||mode||: just inside counts, just outside does not
    tol = mode_tolerance(toy_modes)
    torch.testing.assert_close(tol, 0.1 * toy_modes[:, 0].norm(dim=-1))
    direction = torch.tensor([1.0, 0.0, 0.0])
    inside = toy_modes + 0.9 * tol[:, None, None] * direction
    outside = toy_modes + 1.1 * tol[:, None, None] * direction
    assert mode_metrics(inside, toy_modes)["mode_near_fraction"] == pytest.approx(1.0)
    assert mode_metrics(outside, toy_modes)["mode_near_fraction"] == pytest.approx(0.0)


def test_mode_metrics_partial(toy_modes):
    samples = torch.cat([toy_modes, toy_modes.mean(1, keepdim=True).expand(-1, 2, -1)], dim=1)  # 2 hits, 2 misses
    samples[5:, 1] = toy_modes[5:, 0]                             # half the inputs lose their second mode
    out = mode_metrics(samples, toy_modes)
    assert out["mode_near_fraction"] == pytest.approx(0.5)
    assert out["mode_coverage"] == pytest.approx(0.5)


# ---- vector metrics -------------------------------------------------------------------------------------------
def test_vector_metrics_hand_computed():
    target = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    samples = torch.tensor([[[3.0, 4.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, 3.0]]])   # errors: [5, 1], [0, 2]
    out = vector_metrics(samples, target)
    assert set(out) == {"l2_best_of_n", "l2_mean", "diversity"}
    torch.testing.assert_close(out["l2_best_of_n"], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(out["l2_mean"], torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(out["diversity"], torch.tensor([3.0, 1.0]))   # mean |3-0|,|4-1| = 3; |0|,|2| -> 1
