"""The evaluation protocol: the pairwise diversity measures (pixel, hole, features, LPIPS) against hand computations,
LPIPS only from files on disk (null with the reason otherwise), and the protocol keys evaluate() writes."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from cgml_lightning.data import ToyDataModule
from cgml_lightning.evaluation import FID_REFERENCE, evaluate
from cgml_lightning.evaluation import feature_nets
from cgml_lightning.evaluation.feature_nets import EvalNets, build_eval_nets, build_lpips
from cgml_lightning.evaluation.metrics import (feature_diversity, image_metrics, lpips_diversity, pairwise_l1_diversity,
                                               pairwise_mean)


# ---- pairwise_mean ------------------------------------------------------------------------------------------------
def absolute(a, b):
    return (a - b).abs().flatten(1).sum(1)


def test_pairwise_mean_over_unordered_pairs():
    samples = torch.tensor([[0.0, 1.0, 3.0], [2.0, 2.0, 2.0]])[..., None]        # [B=2, N=3, 1]
    # input 0: pairs |0-1|, |0-3|, |1-3| = 1, 3, 2 -> 2; input 1: all equal -> 0
    torch.testing.assert_close(pairwise_mean(samples, absolute), torch.tensor([2.0, 0.0]))
    four = torch.tensor([[0.0, 1.0, 3.0, 6.0]])[..., None]                          # 6 pairs: 1,3,6,2,5,3 -> 20/6
    torch.testing.assert_close(pairwise_mean(four, absolute), torch.tensor([20.0 / 6.0]))
    # chunked pairs (one pair at a time) give the same means
    torch.testing.assert_close(pairwise_mean(four, absolute, max_elements=1), torch.tensor([20.0 / 6.0]))
    torch.testing.assert_close(pairwise_mean(torch.rand(3, 1, 4), absolute), torch.zeros(3))   # N = 1


def test_pairwise_mean_hands_each_pair_once():
    seen = []

    def record(a, b):
        seen.extend(zip(a.flatten().tolist(), b.flatten().tolist()))
        return torch.zeros(len(a))

    pairwise_mean(torch.tensor([[[0.0], [1.0], [2.0]]]), record)
    assert sorted(seen) == [(0.0, 1.0), (0.0, 2.0), (1.0, 2.0)]


# ---- pixel diversity, whole image and hole ------------------------------------------------------------------------
def test_hole_diversity_hand_computed():
    a = torch.zeros(1, 2, 2)
    b = torch.tensor([[[0.4, 0.0], [1.0, 1.0]]])                 # differs in the top row by 0.4, bottom by 1, 1
    samples = torch.stack([a, b])[None]                          # [B=1, N=2, C=1, 2, 2]
    top = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])              # hole: the top row
    torch.testing.assert_close(pairwise_l1_diversity(samples), torch.tensor([2.4 / 4]))
    torch.testing.assert_close(pairwise_l1_diversity(samples, weight=top), torch.tensor([0.4 / 2]))
    # two samples that differ only outside the hole: no hole diversity, yet pixel diversity
    outside = torch.stack([a, torch.tensor([[[0.0, 0.0], [0.5, 0.0]]])])[None]
    assert pairwise_l1_diversity(outside, weight=top).item() == 0.0
    assert pairwise_l1_diversity(outside).item() == pytest.approx(0.5 / 4)
    assert pairwise_l1_diversity(samples, weight=torch.zeros(1, 1, 2, 2)).item() == 0.0     # no hole at all


def test_hole_diversity_counts_every_channel_and_each_input_alone():
    samples = torch.zeros(2, 3, 2, 1, 2)                         # B=2, N=3, C=2, 1 x 2
    samples[0, 1, :, 0, 0] = 1.0                                 # input 0: sample 1 differs by 1 at the hole pixel
    samples[1, 2, 0, 0, 1] = 0.6                                 # input 1: sample 2, channel 0, outside its hole
    hole = torch.tensor([[[[1.0, 0.0]]], [[[1.0, 0.0]]]])        # [2, 1, 1, 2]: the left pixel
    # input 0: pairs (0,1) and (1,2) differ by 2 channels x 1 over 2 hole elements = 1, (0,2) by 0 -> 2/3
    torch.testing.assert_close(pairwise_l1_diversity(samples, weight=hole), torch.tensor([2.0 / 3.0, 0.0]))
    # whole image: input 0 differs by 2 over 4 elements in 2 of 3 pairs; input 1 by 0.6 / 4 in 2 of 3 pairs
    torch.testing.assert_close(pairwise_l1_diversity(samples), torch.tensor([1.0 / 3.0, 0.1]))


def test_image_metrics_adds_hole_diversity_for_completion_only():
    samples = torch.rand(2, 3, 1, 4, 4)
    hole = torch.zeros(2, 1, 4, 4)
    hole[..., 2:, :] = 1
    out = image_metrics(samples, torch.rand(2, 1, 4, 4), hole=hole)
    torch.testing.assert_close(out["diversity_hole"], pairwise_l1_diversity(samples, weight=hole))
    torch.testing.assert_close(out["diversity"], pairwise_l1_diversity(samples))
    assert "diversity_hole" not in image_metrics(samples, torch.rand(2, 1, 4, 4))


# ---- feature diversity ----------------------------------------------------------------------------------------------
class FirstPixels(torch.nn.Module):
    """A hand-built linear feature net: the first two pixels of a 1 x 2 x 2 image."""

    num_features = 2

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 2, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]))

    def forward(self, images):
        return self.linear(images.flatten(1))


def image(*pixels: float) -> torch.Tensor:
    return torch.tensor(pixels, dtype=torch.float32).view(1, 2, 2)


def test_feature_diversity_is_the_distance_of_unit_features():
    net = FirstPixels()
    # features [1, 0], [0, 2], [3, 0] -> unit [1, 0], [0, 1], [1, 0]: pairs sqrt 2, 0, sqrt 2
    samples = torch.stack([image(1, 0, 0.3, 0), image(0, 2, 0, 0.9), image(3, 0, 0, 0)])[None]
    torch.testing.assert_close(feature_diversity(samples, net), torch.tensor([2 * math.sqrt(2) / 3]))
    # scale and the pixels the net ignores change nothing; opposite features are 2 apart
    same = torch.stack([image(1, 1, 0, 0), image(5, 5, 1, 1)])[None]
    opposite = torch.stack([image(1, 0, 0, 0), image(-1, 0, 0, 0)])[None]
    torch.testing.assert_close(feature_diversity(torch.cat([same, opposite]), net, batch_size=1),
                               torch.tensor([0.0, 2.0]))


# ---- LPIPS ----------------------------------------------------------------------------------------------------------
def fake_lpips(a, b):
    """A stand-in LPIPS distance: the largest pixel difference of each pair."""
    return (a - b).abs().flatten(1).amax(1)


def test_lpips_diversity_averages_an_injected_distance():
    samples = torch.stack([image(0, 0, 0, 0), image(0.2, 0, 0, 0), image(0, 0, 0, 0.5)])[None]
    # pairs: max |diff| 0.2, 0.5, 0.5 -> 0.4
    torch.testing.assert_close(lpips_diversity(samples, fake_lpips), torch.tensor([0.4]))


def test_lpips_is_null_with_the_reason_when_it_cannot_be_built_offline(monkeypatch):
    monkeypatch.setattr(feature_nets, "has_module", lambda name: name != "torchvision")
    distance, info = build_lpips("vgg")
    assert distance is None and "torchvision is not installed" in info["reason"] and "vgg16" in info["reason"]
    assert build_lpips(None) == (None, {"reason": "feature_net.lpips_net=null"})
    with pytest.raises(ValueError, match="lpips_net must be one of"):
        build_lpips("resnet")


def test_lpips_never_downloads(monkeypatch, tmp_path):
    """With torchvision installed but no backbone weights in torch.hub's dir: a reason, and no download attempt."""
    pytest.importorskip("torchvision")

    def no_download(*args, **kwargs):
        raise AssertionError("LPIPS tried to download weights")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    distance, info = build_lpips("alex")
    assert distance is None and "nothing is downloaded" in info["reason"] and str(tmp_path / "hub") in info["reason"]


def test_lpips_checks_the_backbone_file_in_the_hub_dir(monkeypatch, tmp_path):
    """The file check against torchvision's weights URL, with a stand-in torchvision (none need be installed)."""
    import sys
    import types

    models = types.ModuleType("torchvision.models")
    models.AlexNet_Weights = types.SimpleNamespace(
        DEFAULT=types.SimpleNamespace(url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"))
    parent = types.ModuleType("torchvision")
    parent.models = models
    monkeypatch.setitem(sys.modules, "torchvision", parent)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    monkeypatch.setattr(feature_nets, "has_module", lambda name: True)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    weights = tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    assert feature_nets.lpips_backbone_file("alex") == weights
    reason = feature_nets.lpips_unavailable("alex")
    assert reason == f"no alexnet weights at {weights} (nothing is downloaded)"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"")
    assert feature_nets.lpips_unavailable("alex") is None             # every file on disk: LPIPS can be built


def test_lpips_distance_prepares_grey_small_images():
    seen = {}

    class Metric:
        def update(self, a, b):
            seen["shapes"] = (a.shape, b.shape)
            seen["scores"] = (a - b).abs().flatten(1).mean(1)

        def compute(self):
            return seen["scores"]

        def reset(self):
            pass

    distance = feature_nets.LpipsDistance(Metric(), batch_size=2)
    out = distance(torch.zeros(3, 1, 8, 8), torch.ones(3, 1, 8, 8))
    torch.testing.assert_close(out, torch.ones(3))                         # 3 pairs in chunks of 2
    assert seen["shapes"][0] == (1, 3, 64, 64)                              # RGB, resized up to 64 px


# ---- evaluate(): the protocol keys in metrics.json ------------------------------------------------------------------
class NoisyCompletion:
    """Completes the hole with seeded noise around 0.5 and keeps the visible pixels: samples differ in the hole only."""

    device = torch.device("cpu")

    def hole(self, x):
        return x[:, -1:]

    def sample(self, x, num_samples, generator=None, pool=None):
        hole, visible = x[:, -1:], x[:, :-1]
        noise = 0.5 + 0.2 * torch.randn(len(x), num_samples, *visible.shape[1:], generator=generator)
        return (visible[:, None] * (1 - hole[:, None]) + noise.clamp(0, 1) * hole[:, None])


class LinearFeatures(torch.nn.Module):
    """A fixed random linear feature net over 8 x 8 grey images (FID needs only num_features)."""

    num_features = 6

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(64, 6)
        torch.nn.init.normal_(self.linear.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, images):
        return self.linear(images.flatten(1))


def test_evaluate_writes_the_protocol_keys(digits_dm, caplog):
    nets = EvalNets(fid_features=LinearFeatures(), fid_name="linear-test", lpips=fake_lpips, lpips_net="alex",
                    lpips_version="test-version")
    n, inputs = 3, 20
    metrics = evaluate(NoisyCompletion(), digits_dm, num_samples=n, num_inputs=inputs, nets=nets)
    assert metrics["fid_reference"] == FID_REFERENCE == "test targets"
    assert (metrics["fid_num_real"], metrics["fid_num_fake"]) == (inputs, inputs * n)
    assert metrics["fid_feature_net"] == metrics["diversity_feature_net"] == "linear-test"
    assert isinstance(metrics["fid"], float) and metrics["fid"] >= 0
    for key in ("diversity", "diversity_hole", "diversity_features", "diversity_lpips"):
        assert isinstance(metrics[key], float) and 0 < metrics[key] < 2, (key, metrics[key])
    # digits: the hole is the bottom half, and the samples differ only there
    assert metrics["diversity"] == pytest.approx(0.5 * metrics["diversity_hole"], rel=1e-5)
    assert (metrics["lpips_net"], metrics["lpips_version"]) == ("alex", "test-version")

    # the same inputs and seed without LPIPS and feature nets: nulls, the reason logged at INFO
    plain = EvalNets(lpips_reason="torchvision is not installed")
    with caplog.at_level(logging.INFO, logger="cgml_lightning.evaluation"):
        bare = evaluate(NoisyCompletion(), digits_dm, num_samples=n, num_inputs=inputs, nets=plain)
    assert bare["diversity_features"] is None and bare["diversity_feature_net"] is None
    assert bare["diversity_lpips"] is None and "lpips_net" not in bare and "lpips_version" not in bare
    assert bare["fid"] is None and "fid_reference" not in bare and "fid_num_real" not in bare
    assert "diversity_lpips: null (torchvision is not installed)" in caplog.text
    assert bare["diversity_hole"] == metrics["diversity_hole"] and bare["diversity"] == metrics["diversity"]


def test_build_eval_nets_records_why_lpips_is_missing(digits_dm, monkeypatch):
    monkeypatch.setattr(feature_nets, "has_module", lambda name: name != "torchvision")
    nets = build_eval_nets(digits_dm, fid="none", lpips_net="squeeze")
    assert nets.lpips is None and "torchvision is not installed" in nets.lpips_reason
    assert "LPIPS: none (torchvision is not installed" in nets.describe()
    assert build_eval_nets(digits_dm, fid="none", lpips_net=None).lpips_reason == "feature_net.lpips_net=null"


def test_vector_data_keeps_its_own_keys():
    toy = ToyDataModule(num_samples=64)

    class Spread:
        device = torch.device("cpu")

        def sample(self, x, num_samples, generator=None, pool=None):
            return torch.randn(len(x), num_samples, 3, generator=generator)

    metrics = evaluate(Spread(), toy, num_samples=2, num_inputs=4)
    assert not any(key.startswith(("diversity", "fid", "lpips")) for key in metrics)
