"""cgml-bench: the quick path end to end on tiny data (one subprocess, checked by several tests), the fallback when
the task's data is absent, the profiles, and the goal checks of bench.md."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module
from PIL import Image

from cgml_lightning.benchmark import goals, load_task

MODELS = ["cgml", "regressor", "cvae", "cgan", "flow", "cimle"]
REQUIRED = {"psnr_best_of_n", "psnr_mean", "ssim_best_of_n", "diversity", "fid", "probe_acc", "train_s_per_step",
            "samples_per_s"}
BUDGET_S = 1.0
TINY = [f"profile.budget_s={BUDGET_S}", "profile.curve_every_s=0.5", "profile.curve_num_inputs=8",
        "profile.num_inputs=12", "profile.num_samples=3", "profile.probe_train=120", "profile.probe_test=60",
        "profile.timing_warmup=1", "profile.timing_batches=2", "profile.speed_inputs=2", "profile.speed_repeats=1",
        "profile.picture_inputs=3", "profile.picture_samples=2", "feature_net.classifier.steps=60", "feature_net.classifier.width=4",
        'overrides=["+data.max_train_samples=128","+trainer.enable_progress_bar=false"]']


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """cgml-bench profile=quick on digits, shrunk to seconds (every model trains ~1 s), logging to W&B offline."""
    root = tmp_path_factory.mktemp("bench")
    out = root / "run"
    args = ["profile=quick", "task=digits_completion", *TINY, "logger=wandb",
            f"feature_net.cache_dir={root / 'cache'}", f"hydra.run.dir={out}"]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "cgml_lightning.commands.bench", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"cgml-bench exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n"
                    f"{proc.stderr[-5000:]}")
    return out


def test_bench_json_has_every_model_and_key(bench_run):
    report = json.loads((bench_run / "bench.json").read_text())
    assert report["task"] == "digits_completion" and report["z_steps"] == 3         # the image z_phase preset
    assert set(report["models"]) == set(MODELS)
    for name, result in report["models"].items():
        assert REQUIRED <= set(result), (name, REQUIRED - set(result))
        for key in REQUIRED:
            assert isinstance(result[key], (int, float)) and math.isfinite(result[key]), (name, key, result[key])
        assert result["probe_acc"] > 0.4                  # chance is 0.1 (10 digits); broken encoder features stay near it
        assert result["train_s_per_step"] > 0 and result["samples_per_s"] > 0 and result["fid"] >= 0
        assert result["num_inputs"] == 12 and result["num_samples"] == 3
    # completed digits stay the digits they were more often than chance (0.1), averaged over the models
    assert sum(r["sample_class_acc"] for r in report["models"].values()) / len(MODELS) > 0.2
    assert report["models"]["regressor"]["diversity"] == 0.0
    assert all(report["models"][n]["diversity"] > 0 for n in MODELS if n != "regressor")
    assert "cnn-classifier" in report["feature_nets"] and "accuracy on the real test images" in report["feature_nets"]


def test_every_model_trained_for_the_same_budget(bench_run):
    models = json.loads((bench_run / "bench.json").read_text())["models"]
    for name, result in models.items():
        curve = result["curve"]
        assert curve[0]["seconds"] == 0.0 and curve[0]["batches"] == 0, name
        assert curve[-1]["batches"] == result["batches_trained"] >= 1, name
        assert [p["seconds"] for p in curve] == sorted(p["seconds"] for p in curve), name
        # Lightning's max_time stops at the first batch end past the budget: over by at most about one step
        assert 0.5 * BUDGET_S <= result["train_s"] <= BUDGET_S + 5 * result["train_s_per_step"] + 1.0, name
        assert (bench_run / "models" / name / "csv").is_dir(), name


def test_bench_md_table_curves_and_phase_profile(bench_run):
    text = (bench_run / "bench.md").read_text()
    assert text.startswith("# cgml-bench: digits_completion")
    assert "cgml-bench profile=quick task=digits_completion" in text
    for name in MODELS:
        assert f"\n| {name} | " in text, name
    assert "![val best-of-N PSNR against training seconds](convergence.png)" in text
    assert "## cGML against the peers" in text and "samples/s >= 10x the flow's" in text
    with Image.open(bench_run / "convergence.png") as image:
        assert image.format == "PNG" and image.width > 100
    assert "## cGML training step, per phase" in text and "| z_steps |" in text


@pytest.fixture
def compose_bench(tmp_path):
    def _compose(*overrides: str):
        return compose("bench", overrides=[*overrides, f"paths.data_dir={tmp_path / 'data'}"])

    with initialize_config_module(config_module="cgml_lightning.conf", version_base="1.3"):
        yield _compose


def test_profiles_compose(compose_bench):
    quick, full = compose_bench(), compose_bench("profile=full")
    assert quick.models == MODELS and quick.task == "fmnist_completion"
    assert quick.feature_net.fid == "classifier" and full.feature_net.fid == "auto"
    assert quick.profile.budget_s * len(quick.models) <= 10 * 60 < full.profile.budget_s * len(full.models)
    assert set(quick.profile) == set(full.profile)


def test_falls_back_to_digits_without_fashion_mnist(compose_bench, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("cgml_lightning.data.fashion_mnist.DEBIAN_DIR", tmp_path / "nowhere")
    cfg = compose_bench()
    task, datamodule = load_task(cfg, tmp_path / "out")
    assert task == "digits_completion" and type(datamodule).__name__ == "DigitsDataModule"
    assert "the data of task=fmnist_completion is not here, so the bench runs task=digits_completion" in caplog.text
    with pytest.raises(FileNotFoundError, match="Fashion-MNIST not found"):
        load_task(compose_bench("fallback_task=null"), tmp_path / "out")


def result(psnr, fid, diversity, probe, speed, curve):
    return {"psnr_best_of_n": psnr, "fid": fid, "diversity": diversity, "probe_acc": probe, "samples_per_s": speed,
            "curve": [{"seconds": s, "psnr_best_of_n": p} for s, p in curve]}


def test_goals_are_checked_against_the_numbers():
    models = {"cgml": result(20.0, 5.0, 0.1, 0.8, 1000.0, [(0, 10.0), (40, 17.0), (100, 20.0)]),
              "regressor": result(18.5, 9.0, 0.0, 0.7, 3000.0, [(0, 10.0), (100, 18.5)]),
              "cvae": result(18.0, 6.0, 0.2, 0.7, 900.0, [(0, 10.0), (100, 18.0)]),
              "cgan": result(19.0, 7.0, 0.1, 0.7, 900.0, [(0, 10.0), (100, 16.0)]),
              "flow": result(19.5, 4.0, 0.2, 0.7, 150.0, [(0, 10.0), (100, 19.5)])}
    # PSNR best and >= 18.5 + 1; FID 5 < 6, 7; diversity 0.1 > 0.01; probe 0.8 >= 0.7; samples/s only 6.7x the
    # flow's; the cGAN's final 16 dB reached at 40 s <= 100 / 2
    assert [ok for _, ok, _ in goals(models)] == [True, True, True, True, False, True]
    models["regressor"]["psnr_best_of_n"] = 19.2                  # now within 1 dB of the regressor
    models["cgan"]["fid"] = None                                  # no feature net: the FID goal cannot be judged
    models["cgml"]["curve"][1]["psnr_best_of_n"] = 15.0           # reaches the cGAN's 16 dB only at 100 s
    ok = [ok for _, ok, _ in goals(models)]
    assert ok[0] is False and ok[1] is None and ok[5] is False
    assert [g for g, _, _ in goals({"cgml": models["cgml"]})] == []


def test_eval_config_feeds_the_evaluation_nets(compose_bench, tmp_path):
    """cgml-eval's feature_net block is build_eval_nets' keyword arguments (what commands.eval.run_eval passes on)."""
    from cgml_lightning.evaluation.feature_nets import build_eval_nets
    from cgml_lightning.runs import plain
    from cgml_lightning.data import DigitsDataModule

    cfg = compose("eval", overrides=["ckpt_path=unused.ckpt", "feature_net.classifier.steps=20",
                                     f"feature_net.cache_dir={tmp_path}"])
    dm = DigitsDataModule(max_train_samples=64)
    nets = build_eval_nets(dm, **plain(cfg.feature_net))
    assert nets.classifier is not None and nets.fid_features is not None
    assert nets.classifier_test_acc > 0.3                # 20 steps: well above chance (0.1), far from perfect
    assert len(list(tmp_path.glob("classifier-*.pt"))) == 1
    none = build_eval_nets(dm, **{**plain(cfg.feature_net), "fid": "none"})
    assert none.fid_features is None and none.classifier is None and "FID: none" in none.describe()


def test_bench_reaches_wandb_with_its_table_and_pictures(bench_run):
    from PIL import Image

    from tests.helpers import wandb_runs

    report = json.loads((bench_run / "bench.json").read_text())
    (run,) = wandb_runs(bench_run / "wandb")
    assert run["job_type"] == "bench"
    for name in MODELS:
        assert run["summary"][f"test/{name}/psnr_best_of_n"] == pytest.approx(report["models"][name]["psnr_best_of_n"])
    assert run["summary"]["bench/results/_type"] == "table-file"
    for key in ("bench/convergence", "bench/samples"):
        assert run["summary"][f"{key}/count"] == 1 and run["summary"][f"{key}/captions"][0], key
    assert any(m.startswith("media/images/bench/samples") for m in run["media"]), run["media"]
    with Image.open(bench_run / "bench_samples.png") as picture:            # input | 5 models x 2 samples | truth
        assert picture.width == (2 + 2 * len(MODELS)) * (8 + 2) * 4
    assert "bench_samples.png" in (bench_run / "bench.md").read_text()
