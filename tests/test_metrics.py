"""Evaluation metrics against hand computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cgml_lightning.data import DigitsDataModule, ToyDataModule
from cgml_lightning.evaluation import evaluate, first_inputs
from cgml_lightning.evaluation.feature_nets import (InceptionFeatures, build_eval_nets, has_labels, inception_weights,
                                                    load_or_train_classifier, train_classifier)
from cgml_lightning.evaluation.metrics import (fid_metric, image_metrics, mode_metrics, mode_tolerance,
                                               pairwise_l1_diversity, psnr, ssim, vector_metrics)
from cgml_lightning.evaluation.probe import encoder_features, linear_probe, linear_probe_accuracy
from cgml_lightning.models import MODULES


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
                        "psnr_hole_mean", "diversity_hole"}
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


# ---- FID (torchmetrics, pluggable feature net) ------------------------------------------------------------------
class FlatFeatures(torch.nn.Module):
    """The pixels themselves as features: FID then has a closed form on the tensors we feed it."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, imgs):
        return imgs.flatten(1).double()


def fid_of(real, fake) -> float:
    metric = fid_metric(FlatFeatures(real[0].numel()))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return metric.compute().item()


def test_fid_identical_sets_is_zero_and_mean_shift_is_its_squared_norm():
    torch.manual_seed(0)
    real = torch.randn(300, 1, 2, 2)
    assert fid_of(real, real) == pytest.approx(0.0, abs=1e-6)
    shift = torch.tensor([0.5, -1.0, 2.0, 0.0]).view(1, 1, 2, 2)       # same covariance: FID = ||shift||^2 = 5.25
    assert fid_of(real, real + shift) == pytest.approx(5.25, abs=1e-6)


def test_fid_one_dimensional_gaussians_by_hand():
    # 1-d: FID = (mu1 - mu2)^2 + (sigma1 - sigma2)^2 with the sample means and unbiased standard deviations
    torch.manual_seed(1)
    real, fake = torch.randn(500, 1, 1, 1), 3.0 + 2.0 * torch.randn(400, 1, 1, 1)
    r, f = real.flatten().double(), fake.flatten().double()
    expected = (r.mean() - f.mean()) ** 2 + (r.std() - f.std()) ** 2
    assert fid_of(real, fake) == pytest.approx(expected.item(), rel=1e-6)


def test_fid_matches_the_frechet_formula():
    from scipy.linalg import sqrtm

    torch.manual_seed(2)
    real = torch.randn(400, 1, 1, 3) @ torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 0.7]])
    fake = 0.3 + 1.5 * torch.randn(350, 1, 1, 3)
    a, b = real.flatten(1).double().numpy(), fake.flatten(1).double().numpy()
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * sqrtm(ca @ cb).real)
    assert fid_of(real, fake) == pytest.approx(expected, rel=1e-5)


def test_fid_metric_needs_the_feature_width():
    with pytest.raises(ValueError, match="num_features"):
        fid_metric(torch.nn.Flatten())


def test_inception_features_get_uint8_rgb():
    seen = {}

    def fake_inception(x):
        seen["x"] = x
        return torch.zeros(len(x), 2048)

    net = InceptionFeatures(net=fake_inception)
    grey = torch.tensor([0.0, 0.5, 1.0, 1.2]).view(1, 1, 2, 2)
    assert net(grey).shape == (1, 2048)
    assert seen["x"].dtype == torch.uint8 and seen["x"].shape == (1, 3, 2, 2)
    assert seen["x"][0, :, 0, 1].tolist() == [128, 128, 128] and seen["x"].max() == 255   # 0.5 -> 128, clamped
    with pytest.raises(ValueError, match=r"\[B, 1\|3, H, W\]; got \(1, 2, 2, 2\)"):
        net(torch.rand(1, 2, 2, 2))


def test_no_local_inception_means_classifier_or_a_clear_error(tmp_path, monkeypatch, digits_full, classifier_cache):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))          # an empty torch.hub cache
    assert inception_weights() is None
    with pytest.raises((ModuleNotFoundError, FileNotFoundError), match="feature_net.inception_weights_path"):
        inception_weights(tmp_path / "missing.pth")                    # no torch-fidelity, or no such file
    with pytest.raises(FileNotFoundError, match="no usable local Inception weights"):
        build_eval_nets(digits_full, fid="inception", cache_dir=classifier_cache, classifier=FAST_CLASSIFIER)
    with pytest.raises(ValueError, match="feature_net.fid must be"):
        build_eval_nets(digits_full, fid="incepton")


# ---- class labels, the dataset classifier, sample class accuracy ------------------------------------------------
FAST_CLASSIFIER = {"steps": 150, "width": 8, "feature_dim": 32}


@pytest.fixture(scope="module")
def digits_full():
    dm = DigitsDataModule(batch_size=64, eval_batch_size=64)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def classifier_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("classifiers")


@pytest.fixture(scope="module")
def eval_nets(digits_full, classifier_cache):
    return build_eval_nets(digits_full, fid="auto", cache_dir=classifier_cache, classifier=FAST_CLASSIFIER)


def test_batches_carry_labels_without_changing_the_contract():
    from sklearn.datasets import load_digits

    dm = DigitsDataModule(max_train_samples=40, batch_size=16)
    dm.setup()
    batch = next(iter(dm.test_dataloader()))
    assert {"x", "y", "index"} <= set(batch) and batch["label"].dtype == torch.int64
    digits = load_digits()
    images = torch.from_numpy(digits.images).float().flatten(1) / 16.0
    for i in range(5):                                            # each label is the class of its own image
        row = (images - batch["y"][i].flatten()).abs().sum(1).argmin()
        assert digits.target[row] == batch["label"][i]
    assert len(dm.labels["train"]) == len(dm.splits["train"]) == 40
    toy = ToyDataModule(num_samples=32)
    toy.setup()
    assert "label" not in next(iter(toy.train_dataloader())) and not has_labels(toy)


def test_classifier_is_trained_once_cached_and_accurate(digits_full, classifier_cache, eval_nets, monkeypatch):
    files = list(classifier_cache.glob("classifier-*.pt"))
    assert len(files) == 1
    y, labels = digits_full.splits["test"].y, digits_full.splits["test"].label
    acc = (eval_nets.classifier.predict(y) == labels).float().mean().item()
    assert eval_nets.classifier_test_acc == pytest.approx(acc) and acc > 0.8
    assert eval_nets.fid_name == eval_nets.classifier_name and "cnn-classifier" in eval_nets.fid_name
    assert "accuracy on the real test images" in eval_nets.describe()

    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier should have been loaded")

    monkeypatch.setattr("cgml_lightning.evaluation.feature_nets.train_classifier", no_training)
    again, info = load_or_train_classifier(digits_full, classifier_cache, **FAST_CLASSIFIER)
    assert info["path"] == str(files[0]) and info["test_acc"] == pytest.approx(acc)
    assert torch.equal(again.predict(y), eval_nets.classifier.predict(y))


def test_classifier_training_is_deterministic(digits_full):
    y, labels = digits_full.splits["train"].y[:256], digits_full.splits["train"].label[:256]
    a = train_classifier(y, labels, 10, width=4, feature_dim=8, steps=5, seed=3)
    b = train_classifier(y, labels, 10, width=4, feature_dim=8, steps=5, seed=3)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_classifier_settings_are_checked(digits_full, tmp_path):
    with pytest.raises(ValueError, match=r"unknown keys \['depth'\]"):
        load_or_train_classifier(digits_full, tmp_path, depth=3)


class LookupModule:
    """Samples every input's true completion (found by its visible pixels) dimmed by 2% (an exact match would give an
    infinite PSNR), or a blank image: known answers."""

    device = torch.device("cpu")

    def __init__(self, datamodule, blank: bool = False):
        self.test, self.blank = datamodule.splits["test"], blank

    def hole(self, x):
        return x[:, -1:]

    def sample(self, x, num_samples, generator=None, pool=None):
        rows = torch.cdist(x.flatten(1), self.test.x.flatten(1)).argmin(1)
        y = torch.zeros_like(self.test.y[rows]) if self.blank else 0.98 * self.test.y[rows]
        return y[:, None].expand(-1, num_samples, *y.shape[1:])


def test_evaluate_reports_fid_and_sample_class_accuracy(digits_full, eval_nets):
    n = 60
    labels, y = digits_full.splits["test"].label[:n], digits_full.splits["test"].y[:n]
    truth = evaluate(LookupModule(digits_full), digits_full, num_samples=3, num_inputs=n, nets=eval_nets)
    blank = evaluate(LookupModule(digits_full, blank=True), digits_full, num_samples=3, num_inputs=n, nets=eval_nets)
    expected = (eval_nets.classifier.predict(0.98 * y) == labels).float().mean().item()
    assert truth["sample_class_acc"] == pytest.approx(expected) and expected > 0.7
    blank_class = eval_nets.classifier.predict(torch.zeros(1, 1, 8, 8))
    assert blank["sample_class_acc"] == pytest.approx((labels == blank_class).float().mean().item())
    assert truth["classifier_test_acc"] == eval_nets.classifier_test_acc
    assert truth["fid_feature_net"] == truth["diversity_feature_net"] == eval_nets.fid_name
    assert truth["fid_reference"] == "test targets" and (truth["fid_num_real"], truth["fid_num_fake"]) == (n, 3 * n)
    # the 3 samples of an input are one image: no diversity in pixels, on the hole or in the classifier's features
    assert truth["diversity"] == truth["diversity_hole"] == truth["diversity_features"] == 0.0
    assert 0 <= truth["fid"] < 0.1 * blank["fid"]                   # the (dimmed) truth repeated 3 times vs all-blank
    plain = evaluate(LookupModule(digits_full), digits_full, num_samples=3, num_inputs=n)
    assert plain["fid"] is None and "sample_class_acc" not in plain and "fid_num_real" not in plain
    assert plain["diversity_features"] is None and plain["diversity_feature_net"] is None
    assert plain["psnr_best_of_n"] == truth["psnr_best_of_n"]


# ---- linear probe ---------------------------------------------------------------------------------------------
def test_linear_probe_separable_and_random_features():
    torch.manual_seed(0)
    labels = torch.arange(400) % 4
    centres = 6.0 * torch.eye(4, 16)
    feats = centres[labels] + torch.randn(400, 16)
    assert linear_probe_accuracy(feats[:300], labels[:300], feats[300:], labels[300:]) == 1.0
    noise = torch.randn(400, 16)
    assert linear_probe_accuracy(noise[:300], labels[:300], noise[300:], labels[300:]) < 0.5
    with pytest.raises(ValueError, match="need 2"):
        linear_probe_accuracy(feats[:10], torch.zeros(10, dtype=torch.long), feats[10:20], labels[10:20])


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_exposes_encoder_features(name, digits_dm):
    module = MODULES[name](data_info=digits_dm.info(), net={"name": "unet", "width": 8, "depth": 1}, latent_dim=4)
    x = digits_dm.splits["test"].x[:5]
    feats = encoder_features(module, x)
    assert feats.shape == (5, module.generator.feature_dim)
    acc = linear_probe(module, digits_dm, num_train=64, num_test=32)
    assert acc > 0.25                      # chance is 0.1 (10 digits); a probe on broken features stays near it


def test_linear_probe_needs_labels(toy_dm):
    from cgml_lightning.models import RegressorModule

    module = RegressorModule(data_info=toy_dm.info(), net={"name": "mlp", "width": 8, "depth": 1})
    with pytest.raises(ValueError, match="ToyDataModule has no class labels"):
        linear_probe(module, toy_dm, num_train=10, num_test=10)


# ---- docs/headroom.py: the colour-offset oracle ------------------------------------------------------------------
def test_headroom_oracle_moves_the_hole_by_its_mean_error():
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("headroom", Path(__file__).parents[1] / "docs" / "headroom.py")
    headroom = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(headroom)
    answer = torch.zeros(1, 2, 4, 4)
    y = torch.zeros(1, 2, 4, 4)
    y[..., :2], y[..., 2:] = 0.2, 0.6                             # left half 0.2, right half 0.6, both channels
    y[:, 1] += 0.1                                                # channel 1 a little brighter
    hole = torch.zeros(1, 1, 4, 4)
    hole[..., 1:3, :] = 1                                         # rows 1-2 to fill
    whole = headroom.oracle_offset(answer, y, hole, block=0)
    torch.testing.assert_close(whole[0, :, 1, :], torch.tensor([[0.4] * 4, [0.5] * 4]))   # one offset per channel
    assert whole[..., 0, :].abs().sum() == 0 and whole[..., 3, :].abs().sum() == 0          # visible pixels kept
    halves = headroom.oracle_offset(answer, y, hole, block=2)     # 2x2 blocks: each half its own offset
    torch.testing.assert_close(halves * hole, y * hole)
    assert psnr(halves[:, None], y, weight=hole) > psnr(whole[:, None], y, weight=hole)
    # borrowed offsets: with two inputs, each one's samples take the other's offset field, in its own hole
    answers, ys, holes = torch.cat([answer, answer]), torch.cat([y, 1 - y]), torch.cat([hole, hole.flip(2)])
    borrowed = headroom.borrowed_offsets(answers, ys, holes, 0, 3, torch.Generator().manual_seed(0))
    assert borrowed.shape == (2, 3, 2, 4, 4)
    fields = headroom.offset_field(answers, ys, holes, 0)
    torch.testing.assert_close(borrowed[0], (answers[0] + holes[0] * fields[1]).expand(3, -1, -1, -1))
    torch.testing.assert_close(borrowed[1], (answers[1] + holes[1] * fields[0]).expand(3, -1, -1, -1))


def test_first_inputs_cuts_the_batches_and_draws_no_more():
    def batches():
        for start in (0, 3):
            yield {"x": torch.arange(start, start + 3), "label": torch.arange(start, start + 3) * 10, "name": "b"}
        raise AssertionError("a batch drawn after the last one needed")
    got = list(first_inputs(batches(), 5))
    assert [b["x"].tolist() for b in got] == [[0, 1, 2], [3, 4]]
    assert got[1]["label"].tolist() == [30, 40] and got[1]["name"] == "b"          # every tensor sliced alike
