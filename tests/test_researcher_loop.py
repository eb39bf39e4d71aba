"""The researcher's loop: sweeps on every kind of experiment, results and pictures in the loggers (W&B offline,
TensorBoard, CSV), one W&B group per sweep, and a missing optimized metric failing with the keys that exist."""
import json
import logging
from pathlib import Path

import pytest
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from tests.helpers import TOY, compose_job, run_cli, wandb_runs

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
# a couple of batches, one validation batch, a small evaluation: a sweep trial takes seconds
TINY = ["trainer.max_epochs=1", "++trainer.limit_train_batches=2", "++trainer.limit_val_batches=1",
        "eval.num_samples=2", "eval.num_inputs=8", "~callbacks.rich_progress_bar", "logger=csv"]
SEARCH = {"toy": "cgml_vectors", "digits_completion": "cgml_images", "fmnist_completion": "cgml_images"}
METRIC = {"toy": "mode_near_fraction", "digits_completion": "psnr_best_of_n", "fmnist_completion": "psnr_best_of_n"}


@pytest.mark.parametrize("experiment", list(SEARCH))
def test_optuna_sweep_returns_the_experiments_metric(experiment, tmp_path):
    if experiment == "fmnist_completion" and not FMNIST.is_file():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    extra = ["data.num_samples=512"] if experiment == "toy" else ["++data.max_train_samples=256"]
    run_cli("cgml-train", "-m", f"hparams_search={SEARCH[experiment]}", f"experiment={experiment}", *TINY, *extra,
            "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path}", cwd=tmp_path)
    result = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert isinstance(result["best_value"], float)
    assert {"model.z_lr", "model.z_steps", "model.start_candidates"} <= set(result["best_params"])
    trials = [json.loads((tmp_path / str(i) / "metrics.json").read_text()) for i in range(2)]
    assert result["best_value"] == max(t[METRIC[experiment]] for t in trials)       # every experiment maximizes
    assert (tmp_path / "0" / "train.log").is_file()                                   # the job is named train


def test_basic_sweep_is_one_wandb_group_with_runs_named_from_overrides(tmp_path):
    proc = run_cli("cgml-train", "-m", *TOY, *TINY[:5], "logger=wandb", "tags=[sweep-test]", "model.z_lr=0.05,0.2",
                   "logger.wandb.tags=[extra]",
                   f"hydra.sweep.dir={tmp_path / 'sweep_0042'}", cwd=tmp_path, env={"WANDB_MODE": "offline"})
    runs = wandb_runs(tmp_path)
    assert len(runs) == 2, proc.stderr[-2000:]
    assert {r["group"] for r in runs} == {"toy_sweep_0042"}                          # one group per sweep
    names = sorted(r["name"] for r in runs)
    assert all(n.startswith("toy_") and "logger" not in n and "sweep" not in n for n in names), names
    assert "model.z_lr=0.05" in names[0] and "model.z_lr=0.2" in names[1]
    for run in runs:
        assert run["job_type"] == "train" and "sweep-test" in run["tags"]
        assert run["config"]["sweep_id"] == "sweep_0042" and run["config"]["params/total"] > 0
        assert run["config"]["config"]["model"]["z_lr"] in (0.05, 0.2)              # the whole composed config
        assert 0.0 <= run["summary"]["test/mode_near_fraction"] <= 1.0
        assert run["summary"]["test/samples/count"] == 1                          # the final picture


def test_a_missing_optimized_metric_names_the_keys_there_are(tmp_path):
    """Under Optuna a job without the optimized metric fails, naming the metrics there are; a grid (Hydra's basic
    sweeper, which consumes no value) warns the same and keeps going."""
    from cgml_lightning.runs import optimized_value, user_errors

    proc = run_cli("cgml-train", "-m", *TOY, *TINY, "optimized_metric=psnr_best_of_n", f"hydra.sweep.dir={tmp_path}",
                   cwd=tmp_path)
    log = (tmp_path / "0" / "train.log").read_text()
    assert "optimized_metric=psnr_best_of_n" in log and "mode_near_fraction" in log, proc.stdout[-2000:]
    assert (tmp_path / "0" / "metrics.json").is_file()
    cfg = compose_job(tmp_path / "optuna", "experiment=toy", "hparams_search=cgml_vectors",
                      "optimized_metric=psnr_best_of_n")
    assert HydraConfig.get().mode == RunMode.MULTIRUN
    with pytest.raises(ValueError, match=r"optimized_metric=psnr_best_of_n: .*\['mode_near_fraction'\]"):
        optimized_value(cfg, {"mode_near_fraction": 0.9, "model": "cgml"})
    handler = logging.FileHandler(tmp_path / "job.log")                   # the job's log file records why it failed
    logging.getLogger().addHandler(handler)
    try:
        with pytest.raises(ValueError), user_errors(multirun=True):
            optimized_value(cfg, {"mode_near_fraction": 0.9})
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert "optimized_metric=psnr_best_of_n" in (tmp_path / "job.log").read_text()


def test_hparams_search_without_a_metric_fails_before_training(tmp_path):
    from cgml_lightning.commands.train import run_train

    cfg = compose_job(tmp_path, "experiment=toy", "hparams_search=cgml_vectors", "optimized_metric=null")
    with pytest.raises(ValueError, match="hparams_search needs optimized_metric"):
        run_train(cfg)
    assert not (tmp_path / "checkpoints").exists()


def test_a_metric_the_vector_data_never_reports_fails_before_training(tmp_path):
    """Under Optuna, vector data whose metrics lack optimized_metric (the toy's mode_near_fraction on a user's npz
    file, psnr on the toy) fails at setup, naming the keys it will report, before a trial trains."""
    from cgml_lightning.commands.train import run_train

    cfg = compose_job(tmp_path, "experiment=toy", "hparams_search=cgml_vectors", "optimized_metric=psnr_best_of_n")
    with pytest.raises(ValueError, match=r"optimized_metric=psnr_best_of_n: .*'mode_coverage', 'mode_near_fraction'"):
        run_train(cfg)
    assert not (tmp_path / "checkpoints").exists()


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """cgml-train on the toy with csv, W&B (offline) and TensorBoard, then cgml-eval of it with W&B."""
    root = tmp_path_factory.mktemp("loggers")
    run_cli("cgml-train", *TOY, "trainer.max_epochs=2", "logger=[csv,wandb,tensorboard]", "tags=[loop]",
            f"hydra.run.dir={root / 'train'}", cwd=root, env={"WANDB_MODE": "offline"})
    run_cli("cgml-eval", f"ckpt_path={root / 'train' / 'checkpoints' / 'last.ckpt'}", "num_samples=2",
            "num_inputs=8", "logger=wandb", f"hydra.run.dir={root / 'eval'}", cwd=root, env={"WANDB_MODE": "offline"})
    return root


def test_train_results_reach_every_logger(logged_run):
    train = logged_run / "train"
    metrics = json.loads((train / "metrics.json").read_text())
    (run,) = wandb_runs(train)
    assert run["summary"]["test/mode_near_fraction"] == pytest.approx(metrics["mode_near_fraction"])
    assert run["summary"]["test/samples/captions"][0].startswith("samples (red)")
    assert run["summary"]["samples/captions"][0].startswith("epoch 1: ")     # the grid of each validation
    assert any(m.startswith("media/images/test/samples") for m in run["media"]), run["media"]
    assert {"config", "seed", "overrides", "params/total", "params/trainable"} <= set(run["config"])
    assert any(k.startswith("lr-") for k in run["summary"]), sorted(run["summary"])   # the learning-rate monitor
    assert run["name"].startswith("toy_") and "trainer.max_epochs=2" in run["name"], run["name"]
    assert "logger" not in run["name"] and "tags" not in run["name"] and "hydra" not in run["name"], run["name"]
    (csv,) = train.glob("csv/version_*/metrics.csv")
    header = csv.read_text().splitlines()[0].split(",")
    assert "test/mode_near_fraction" in header and "lr-Adam" in header
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: dict[str, set] = {"images": set(), "scalars": set()}
    for path in train.glob("tensorboard/*/events.out.tfevents.*"):            # one file per writer session
        events = EventAccumulator(str(path), size_guidance={"images": 0})
        events.Reload()
        for kind in tags:
            tags[kind] |= set(events.Tags()[kind])
    assert {"samples", "test/samples"} <= tags["images"]
    assert "test/mode_near_fraction" in tags["scalars"]


def test_eval_results_reach_wandb(logged_run):
    metrics = json.loads((logged_run / "eval" / "metrics.json").read_text())
    (run,) = wandb_runs(logged_run / "eval")
    (trained,) = wandb_runs(logged_run / "train")
    assert run["job_type"] == "eval" and run["group"] == trained["group"] == "toy"    # beside the run it evaluates
    assert run["config"]["checkpoint_run"] == {"task_name": "toy", "seed": trained["config"]["seed"], "group": "toy"}
    assert run["name"].startswith("eval_train_"), run["name"]           # the checkpoint's run folder: train
    assert run["summary"]["test/mode_coverage"] == pytest.approx(metrics["mode_coverage"])
    assert run["config"]["checkpoint_module"]["latent_dim"] == 10
    assert (logged_run / "eval" / "eval.log").is_file()
