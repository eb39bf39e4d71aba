"""cgml-bench: the quick path end to end on tiny data over two seeds (one subprocess, checked by several tests), the
fallback when the task's data is absent, the profiles, the seed summary and the goal checks of bench.md."""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from PIL import Image

from cgml_lightning.benchmark import (LIVE_KEYS, averaging_table, bench_seeds, goals, load_task, seed_summary,
                                      train_config)

MODELS = ["cgml", "regressor", "cvae", "cgan", "flow", "cimle"]
REQUIRED = {"psnr_best_of_n", "psnr_mean", "ssim_best_of_n", "diversity", "diversity_hole", "diversity_features", "fid",
            "probe_acc", "train_s_per_step", "samples_per_s"}
PER_SEED = REQUIRED - {"train_s_per_step", "samples_per_s"}             # timings: first seed only
BUDGET_S = 1.0
TINY = [f"profile.budget_s={BUDGET_S}", "profile.curve_every_s=0.5", "profile.curve_num_inputs=8",
        "profile.num_inputs=12", "profile.num_samples=3", "profile.probe_train=120", "profile.probe_test=60",
        "profile.timing_warmup=1", "profile.timing_batches=2", "profile.speed_inputs=2", "profile.speed_repeats=1",
        "profile.picture_inputs=3", "profile.picture_samples=2", "feature_net.classifier.steps=60", "feature_net.classifier.width=4",
        'overrides=["+data.max_train_samples=128","+trainer.enable_progress_bar=false","model.ema_decay=0.9"]']


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """cgml-bench profile=quick on digits over seeds 0 and 1, shrunk to seconds (every model trains ~1 s per seed),
    with weight averaging, logging to W&B offline."""
    root = tmp_path_factory.mktemp("bench")
    out = root / "run"
    args = ["profile=quick", "task=digits_completion", *TINY, "seeds=2", "logger=wandb",
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
    assert report["models"]["regressor"]["diversity_features"] == 0.0
    assert all(report["models"][n]["diversity"] > 0 for n in MODELS if n != "regressor")
    assert "cnn-classifier" in report["feature_nets"] and "accuracy on the real test images" in report["feature_nets"]
    assert "LPIPS: none" in report["feature_nets"] or "LPIPS: alex" in report["feature_nets"]


def test_bench_json_keeps_every_seed_and_their_mean_and_spread(bench_run):
    report = json.loads((bench_run / "bench.json").read_text())
    assert report["seeds"] == [0, 1] and [run["seed"] for run in report["per_seed"]] == [0, 1]
    for name in MODELS:
        runs = [run["models"][name] for run in report["per_seed"]]
        summary = report["models"][name]
        for key in PER_SEED:
            values = [r[key] for r in runs]
            assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in values), (name, key, values)
            assert summary[key] == pytest.approx(statistics.fmean(values)), (name, key)
            assert summary["std"][key] == pytest.approx(statistics.stdev(values), abs=1e-12), (name, key)
        assert summary["std"]["num_inputs"] == 0.0 and summary["num_inputs"] == 12
        assert "curve" not in runs[0] and "train_s_per_step" not in runs[0]        # first seed's, in the summary
    # a model's two seeds train different weights: its samples differ
    assert report["per_seed"][0]["models"]["cgml"]["psnr_mean"] != report["per_seed"][1]["models"]["cgml"]["psnr_mean"]
    protocol = report["protocol"]
    assert protocol["seeds"] == [0, 1] and protocol["fid_reference"] == "test targets"
    assert (protocol["fid_num_real"], protocol["fid_num_fake"]) == (12, 36)
    assert "cnn-classifier" in protocol["fid_feature_net"]
    assert protocol["diversity_feature_net"] == protocol["fid_feature_net"]


def test_every_model_trained_for_the_same_budget(bench_run):
    report = json.loads((bench_run / "bench.json").read_text())
    models = report["models"]
    for name, result in models.items():
        curve = result["curve"]                                                  # the first seed's
        assert curve[0]["seconds"] == 0.0 and curve[0]["batches"] == 0, name
        assert curve[-1]["batches"] == report["per_seed"][0]["models"][name]["batches_trained"] >= 1, name
        assert [p["seconds"] for p in curve] == sorted(p["seconds"] for p in curve), name
        for run in report["per_seed"]:
            # Lightning's max_time stops at the first batch end past the budget: over by at most about one step
            train_s = run["models"][name]["train_s"]
            assert 0.5 * BUDGET_S <= train_s <= BUDGET_S + 5 * result["train_s_per_step"] + 1.0, (name, run["seed"])
        assert (bench_run / "models" / name / "csv").is_dir(), name
        assert (bench_run / "models" / name / "seed_1" / "csv").is_dir(), name


def test_bench_md_table_curves_and_phase_profile(bench_run):
    text = (bench_run / "bench.md").read_text()
    assert text.startswith("# cgml-bench: digits_completion")
    assert "cgml-bench profile=quick task=digits_completion" in text
    for name in MODELS:
        assert f"\n| {name} | " in text, name
    assert "![val best-of-N PSNR against training seconds](convergence.png)" in text
    assert "## cGML against the peers" in text and "samples/s >= 10x the flow's" in text
    assert "2 seeds (0, 1)" in text and "On the seed means" in text
    assert "FID of the 36 samples against the 12 test targets in the FID features above" in text
    assert "FID features: cnn-classifier" in text and "feature diversity in the same features" in text
    assert "Each model's own settings (`model_overrides`): cgml: `model.w_steps=2 model.start_candidates=4`." in text
    report = json.loads((bench_run / "bench.json").read_text())
    own = {"cgml": ["model.w_steps=2", "model.start_candidates=4"], **{name: [] for name in MODELS[1:]}}
    assert report["model_overrides"] == own
    cgml = report["models"]["cgml"]
    row = next(line for line in text.splitlines() if line.startswith("| cgml | "))
    assert f"| {cgml['psnr_best_of_n']:.2f} ± {cgml['std']['psnr_best_of_n']:.2f} |" in row
    assert f"| {cgml['diversity_features']:.4f} ± {cgml['std']['diversity_features']:.4f} |" in row
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
    assert quick.models == MODELS and quick.task == "fmnist_completion" and list(quick.seeds) == [0]
    assert bench_seeds(quick.seeds) == [0] and bench_seeds(compose_bench("seeds=3").seeds) == [0, 1, 2]
    assert bench_seeds(compose_bench("seeds=[4,2]").seeds) == [4, 2]
    with pytest.raises(ValueError, match="each seed once"):
        bench_seeds([1, 1])
    with pytest.raises(ValueError, match="sets each model's seed from seeds=; pass seeds"):   # would collapse them
        train_config(compose_bench('overrides=["seed=5"]'), "digits_completion", "cgml", Path("out"), 0)
    assert quick.feature_net.lpips_net == "alex"
    assert quick.feature_net.fid == "classifier" and full.feature_net.fid == "auto"
    assert quick.profile.budget_s * len(quick.models) <= 10 * 60 < full.profile.budget_s * len(full.models)
    assert set(quick.profile) == set(full.profile)


def test_model_overrides_reach_their_model_only(compose_bench):
    default = compose_bench()
    cgml = train_config(default, "digits_completion", "cgml", Path("out"), 0)
    regressor = train_config(default, "digits_completion", "regressor", Path("out"), 0)
    assert cgml.model.w_steps == 2 and cgml.model.start_candidates == 4          # the bench's default for cGML
    assert "w_steps" not in regressor.model
    cfg = compose_bench('model_overrides.cimle=["model.num_draws=3"]', "model_overrides.cgml=[]",
                        'overrides=["model.ema_decay=0.9"]')
    cimle = train_config(cfg, "digits_completion", "cimle", Path("out"), 0)
    cgml = train_config(cfg, "digits_completion", "cgml", Path("out"), 0)
    assert cimle.model.num_draws == 3 and cimle.model.ema_decay == 0.9
    assert cgml.model.w_steps == 1 and cgml.model.start_candidates is None and cgml.model.ema_decay == 0.9
    with pytest.raises(ValueError, match=r"model_overrides: \['cgmll'\] name no model"):
        train_config(compose_bench('+model_overrides.cgmll=["model.w_steps=2"]'), "digits_completion", "cgml",
                     Path("out"), 0)
    with pytest.raises(ValueError, match="sets each model's seed from seeds="):
        train_config(compose_bench('model_overrides.cgml=["seed=3"]'), "digits_completion", "cgml", Path("out"), 0)
    with pytest.raises(ValueError, match="model_overrides.cgml: a list of overrides"):
        train_config(compose_bench("model_overrides.cgml=model.w_steps"), "digits_completion", "cgml", Path("out"), 0)


def test_what_would_lose_or_mislabel_results_is_refused_before_training(compose_bench, tmp_path):
    from cgml_lightning.benchmark import build_every_model, check_bench

    for overrides, message in (
            (["models=[regressor,regressor]"], "each model once"),
            (['overrides=["model=cvae"]'], "overrides: `model=` would train another model"),
            (['model_overrides.regressor=["model=cimle"]'], "model_overrides.regressor: `model=`"),
            (["profile.budget_s=0"], "profile.budget_s must be a positive number"),
            (["profile.num_inputs=1"], "profile.num_inputs must be at least 2"),
            (["seeds=[-1]"], "seeds: a non-empty list of ints \\(0 or more\\)")):
        with pytest.raises(ValueError, match=message):
            check_bench(cfg := compose_bench(*overrides), tmp_path)
            bench_seeds(cfg.seeds)
    (tmp_path / "bench.json").write_text("{}")
    with pytest.raises(ValueError, match="holds an earlier bench report"):
        check_bench(compose_bench(), tmp_path)
    cfg = compose_bench("models=[cgml,regressor]", 'model_overrides.regressor=["model.optimizer.lr=-1"]')
    task, datamodule = load_task(compose_bench("task=digits_completion"), tmp_path / "out")
    with pytest.raises(ValueError, match="Invalid learning rate"):        # before cGML trains, not after
        build_every_model(cfg, task, datamodule, tmp_path / "out", 0)


def test_a_fid_the_data_cannot_have_is_refused_before_training(compose_bench, tmp_path):
    """profile=quick asks for the classifier's FID: on a folder of the user's images (no class labels) the bench
    stops before any model trains, naming feature_net.fid=none and auto."""
    from PIL import Image

    from cgml_lightning.commands.bench import bench

    (tmp_path / "imgs").mkdir()
    for i in range(12):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(
            tmp_path / "imgs" / f"{i}.png")
    cfg = compose_bench("task=folder_completion", f'overrides=["data.root={tmp_path / "imgs"}","data.image_size=8"]')
    with pytest.raises(ValueError, match="fid=classifier: ImageFolderDataModule has no class labels.*fid=none"):
        bench(cfg, tmp_path / "out", cfg.profile)
    assert not (tmp_path / "out" / "models").exists()


def test_falls_back_to_digits_without_fashion_mnist(compose_bench, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("cgml_lightning.data.fashion_mnist.DEBIAN_DIR", tmp_path / "nowhere")
    cfg = compose_bench()
    task, datamodule = load_task(cfg, tmp_path / "out")
    assert task == "digits_completion" and type(datamodule).__name__ == "DigitsDataModule"
    assert "the data of task=fmnist_completion is not here, so the bench runs task=digits_completion" in caplog.text
    with pytest.raises(FileNotFoundError, match="Fashion-MNIST not found"):
        load_task(compose_bench("fallback_task=null"), tmp_path / "out")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="trainer.accelerator=gpu .* sees no GPU"):               # before any data
        load_task(compose_bench('overrides=["trainer=gpu"]'), tmp_path / "out")


def test_seed_summary_means_and_sample_std():
    runs = [{"psnr": 20.0, "fid": 5.0, "n": 12, "net": "cnn", "lpips": None, "only_first": 1.0},
            {"psnr": 21.0, "fid": None, "n": 12, "net": "cnn", "lpips": None},
            {"psnr": 23.0, "fid": 6.0, "n": 12, "net": "cnn", "lpips": None}]
    out = seed_summary(runs)
    assert out["psnr"] == pytest.approx(64 / 3) and out["std"]["psnr"] == pytest.approx(math.sqrt(7 / 3))
    assert out["fid"] is None and out["std"]["fid"] is None          # a seed without FID: no mean to state
    assert out["only_first"] is None                                 # a number some seeds lack
    assert out["n"] == 12 and isinstance(out["n"], int) and out["std"]["n"] == 0.0
    assert out["net"] == "cnn" and out["lpips"] is None and "net" not in out["std"]
    one = seed_summary(runs[:1])
    assert one["psnr"] == 20.0 and one["std"]["psnr"] == 0.0


def result(psnr, fid, diversity, probe, speed, curve, mean=None, features=None):
    return {"psnr_best_of_n": psnr, "psnr_mean": psnr - 2 if mean is None else mean, "fid": fid,
            "diversity": diversity, "diversity_features": features, "probe_acc": probe, "samples_per_s": speed,
            "curve": [{"seconds": s, "psnr_best_of_n": p} for s, p in curve]}


def test_goals_are_checked_against_the_numbers():
    models = {"cgml": result(20.0, 5.0, 0.1, 0.8, 1000.0, [(0, 10.0), (40, 17.0), (100, 20.0)], 17.6, 0.30),
              "regressor": result(18.5, 9.0, 0.0, 0.7, 3000.0, [(0, 10.0), (100, 18.5)], 18.5, 0.0),
              "cvae": result(18.0, 6.0, 0.2, 0.7, 900.0, [(0, 10.0), (100, 18.0)]),
              "cgan": result(19.0, 7.0, 0.1, 0.7, 900.0, [(0, 10.0), (100, 16.0)], features=0.20),
              "flow": result(19.5, 4.0, 0.2, 0.7, 150.0, [(0, 10.0), (100, 19.5)]),
              "cimle": result(19.9, 5.0, 0.3, 0.7, 900.0, [(0, 10.0), (100, 19.9)], features=0.25)}
    # PSNR 20 best and >= 18.5 + 1; FID 5 not <= the flow's 4; mean PSNR 17.6 within 1 dB of 18.5; feature
    # diversity 0.30 >= 0.20, 0.25; probe 0.8 >= 0.7; samples/s only 6.7x the flow's; the cGAN's final 16 dB
    # reached at 40 s <= 100 / 2
    ok = [ok for _, ok, _ in goals(models)]
    assert ok == [True, False, True, True, True, False, True]
    models["flow"]["fid"] = 5.0                                   # a tie counts as <=
    models["cimle"]["psnr_best_of_n"] = 20.1                      # cIMLE now ahead of cGML
    models["regressor"]["psnr_mean"] = 18.7                       # 1.1 dB above cGML's mean
    models["cimle"]["diversity_features"] = 0.35
    ok = [ok for _, ok, _ in goals(models)]
    assert ok[:4] == [False, True, False, False]
    models["cgan"]["diversity_features"] = None                   # feature diversity null: pixel diversity instead
    (detail,) = [d for g, _, d in goals(models) if "feature diversity" in g]
    assert goals(models)[3][1] is False and "diversity: cgml 0.1000, cgan 0.1000, cimle 0.3000" in detail
    assert "stands in" in detail
    models["cgan"]["fid"] = None                                  # no feature net: the FID goal cannot be judged
    assert goals(models)[1][1] is None
    models["cgml"]["curve"][1]["psnr_best_of_n"] = 15.0           # reaches the cGAN's 16 dB only at 100 s
    assert goals(models)[-1][1] is False
    alone = goals({"cgml": models["cgml"]})                       # models missing: unknown, not a crash
    assert [ok for _, ok, _ in alone] == [None, None, None, None]
    assert "regressor not in this run" in alone[0][2] and "cgan, cimle not in this run" in alone[3][2]


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


def test_averaged_and_live_weights_side_by_side(bench_run):
    report = json.loads((bench_run / "bench.json").read_text())
    for name, result in report["models"].items():
        for key in LIVE_KEYS:
            assert isinstance(result[f"live_{key}"], (int, float)), (name, key)
        assert any(result[key] != result[f"live_{key}"] for key in LIVE_KEYS if key != "diversity" or name != "regressor")
    text = (bench_run / "bench.md").read_text()
    section = text.split("## Averaged weights (EMA) against the live ones of the same runs")[1].split("## ")[0]
    assert all(f"| {name} | " in section for name in MODELS)
    assert text.index("## Averaged weights") < text.index("## cGML against the peers")
    assert averaging_table({"cgml": {"psnr_best_of_n": 20.0}}) == []       # no EMA: no section
