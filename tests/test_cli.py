"""Configs compose, the `_target_` allowlist holds, and the console scripts leave the promised files behind.

The subprocess tests run the installed console scripts (cgml-train, cgml-eval, cgml-sample) from a temporary
working directory, with W&B disabled. They are the slow part of the suite, so each run is made once (module-scoped
fixtures) and checked by several tests.
"""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict
from PIL import Image

from cgml_lightning.instantiate import check_targets, find_targets, instantiate

TOY_KEYS = {"mode_near_fraction", "mode_coverage"}
IMAGE_KEYS = {"psnr_best_of_n", "psnr_mean", "ssim_best_of_n", "diversity"}
CONF = resources.files("cgml_lightning.conf")


def group_options(group: str) -> list[str]:
    """The options a user picks: the group's yaml files but the bases they build on (names starting with _)."""
    return sorted(p.name[: -len(".yaml")] for p in (CONF / group).iterdir()
                  if p.name.endswith(".yaml") and not p.name.startswith("_"))


# ---- composing configs ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose_train(tmp_path_factory):
    out = tmp_path_factory.mktemp("compose")

    def _compose(*overrides: str):
        """The job's config as the task sees it: Hydra's own node is set aside (HydraConfig), as at run time."""
        cfg = compose("train", overrides=[*overrides, f"paths.output_dir={out}"], return_hydra_config=True)
        HydraConfig().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg

    with initialize_config_module(config_module="cgml_lightning.conf", version_base="1.3"):
        yield _compose


def test_conf_ships_in_the_package():
    names = {p.name for p in CONF.iterdir()}
    assert {"train.yaml", "eval.yaml", "sample.yaml"} <= names
    for group in ("data", "model", "net", "trainer", "logger", "callbacks", "experiment", "debug", "paths", "hydra"):
        assert group_options(group), group


def test_paths_follow_the_working_directory_not_the_shells_pwd(compose_train, tmp_path, monkeypatch):
    """A command started with another working directory than $PWD says (subprocess cwd=, notebooks, make -C)
    writes under the working directory, where its relative data paths are read too."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PWD", "/somewhere/else")
    cfg = compose_train()
    assert cfg.paths.log_dir == f"{tmp_path}/outputs" and cfg.paths.data_dir == f"{tmp_path}/data"


def test_default_config_composes(compose_train):
    cfg = compose_train()
    assert cfg.data._target_ == "cgml_lightning.data.DigitsDataModule"
    assert cfg.model._target_ == "cgml_lightning.CGMLModule"
    assert cfg.net.name == "unet"
    check_targets(cfg)


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_experiment_composes(compose_train, experiment):
    cfg = compose_train(f"experiment={experiment}")
    assert cfg.task_name == experiment
    for key in ("data", "model", "net", "trainer"):
        assert key in cfg, key
    assert cfg.trainer._target_ == "lightning.Trainer"
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert container["trainer"]["default_root_dir"] == cfg.paths.output_dir
    check_targets(cfg)
    # only user-provided data locations may be left for the command line
    missing = sorted(OmegaConf.missing_keys(cfg))
    assert all(k.startswith("data.") for k in missing), missing


@pytest.mark.parametrize("experiment", ["toy", "digits_completion"])
def test_offline_experiment_builds_module(compose_train, experiment):
    from cgml_lightning.runs import build_datamodule, build_module

    cfg = compose_train(f"experiment={experiment}")
    assert not OmegaConf.missing_keys(cfg)
    dm = build_datamodule(cfg)
    module = build_module(cfg, dm)
    assert module.hparams.latent_dim == cfg.model.latent_dim
    batch = next(iter(dm.train_dataloader()))
    out = module.sample(batch["x"][:2], num_samples=2, seed=0)
    assert out.shape == (2, 2, *batch["y"].shape[1:])
    # hyperparameters are plain containers (loadable with weights_only=True), never OmegaConf objects
    for value in module.hparams.values():
        assert "omegaconf" not in type(value).__module__


@pytest.mark.parametrize("model", group_options("model"))
def test_model_configs_compose(compose_train, model):
    cfg = compose_train("experiment=toy", f"model={model}")
    assert cfg.model._target_.startswith("cgml_lightning.")
    check_targets(cfg)


def test_the_shared_model_keys_are_not_a_model(compose_train, toy_dm):
    """model=_shared (the keys each model's file starts from, listed by Hydra among the options) names the models
    instead of failing inside Lightning."""
    from cgml_lightning.runs import build_module

    with pytest.raises(ValueError, match="model= must name a model, one of cgml, regressor"):
        build_module(compose_train("experiment=toy", "model=_shared"), toy_dm)


def test_the_shared_model_keys_are_refused_before_the_data_is_read(compose_train, tmp_path):
    """cgml-train refuses model=_shared before it reads any data (a missing folder would otherwise speak first)."""
    from cgml_lightning.commands.train import run_train

    cfg = compose_train("data=image_folder", f"data.root={tmp_path / 'missing'}", "model=_shared")
    with pytest.raises(ValueError, match="model= must name a model"):
        run_train(cfg)


@pytest.mark.parametrize("model", group_options("model"))
def test_z_phase_presets_by_data_kind(compose_train, model, digits_dm, toy_dm):
    """cGML takes its z-phase and sampler settings from its z_phase preset, by data kind (images: three short
    unit-gradient steps, one Z-step at sampling, lr 0.002; vectors: table starts, no Z-step); an explicit key wins;
    the other models have no z-phase keys and keep their own learning rate."""
    from cgml_lightning.runs import build_module

    image_cfg = compose_train("experiment=digits_completion", f"model={model}")
    toy_cfg = compose_train("experiment=toy", f"model={model}")
    if model != "cgml":
        assert "z_steps" not in image_cfg.model and "z_phase" not in image_cfg.model
        own = compose_train("experiment=toy", f"model={model}").model.optimizer
        assert image_cfg.model.optimizer == own                               # the model's own learning rate
        return
    image, toy = build_module(image_cfg, digits_dm).hparams, build_module(toy_cfg, toy_dm).hparams
    assert (image.z_steps, image.z_normalized, image.z_lr, image.sample_steps) == (3, True, 0.05, 1)
    assert (image.sample_starts, image.start_candidates, image.optimizer["lr"]) == ("sphere", 2, 0.002)
    assert (toy.z_steps, toy.z_normalized, toy.sample_starts, toy.sample_steps) == (10, True, "table", 0)
    assert (toy.start_candidates, toy.optimizer["lr"]) == (4, 0.001)
    wins = build_module(compose_train("experiment=digits_completion", "model.z_steps=7", "model.optimizer.lr=0.01",
                                      "model.z_phase=paper"), digits_dm).hparams
    assert (wins.z_steps, wins.optimizer["lr"], wins.z_normalized, wins.sample_steps) == (7, 0.01, False, 5)


@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp", "ddp_sim"])
def test_trainer_configs_compose(compose_train, trainer):
    assert trainer in group_options("trainer")
    cfg = compose_train("experiment=toy", f"trainer={trainer}")
    assert cfg.trainer._target_ == "lightning.Trainer"
    expected = {"cpu": ("cpu", 1, None), "gpu": ("gpu", 1, None), "ddp": ("gpu", 4, "ddp"),
                "ddp_sim": ("cpu", 2, "ddp")}[trainer]
    assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.get("strategy")) == expected
    assert cfg.trainer.max_epochs == 40                               # the experiment's value survives
    check_targets(cfg)


def test_cpu_trainer_instantiates(compose_train):
    cfg = compose_train("experiment=toy", "trainer=cpu", "debug=fdr")
    trainer = instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    assert trainer.fast_dev_run in (True, 1)
    assert type(trainer.accelerator).__name__ == "CPUAccelerator"


@pytest.mark.parametrize("logger", ["none", "csv", "tensorboard", "wandb"])
def test_logger_configs_compose(compose_train, logger):
    assert logger in group_options("logger")
    cfg = compose_train("experiment=toy", f"logger={logger}")
    check_targets(cfg)
    loggers = cfg.get("logger") or {}
    if logger == "none":
        assert not loggers
        return
    (entry,) = loggers.values()
    assert entry._target_.startswith("lightning.pytorch.loggers.")
    if logger in ("csv", "tensorboard"):
        obj = instantiate(entry)
        assert str(cfg.paths.output_dir) in str(obj.save_dir)
    else:
        assert entry.log_model is False                               # offline + log_model errors
        assert not any("key" in k.lower() for k in entry)             # the API key never lives in a config


@pytest.mark.parametrize("debug", ["fdr", "limit"])
def test_debug_configs_compose(compose_train, debug):
    cfg = compose_train("experiment=toy", f"debug={debug}")
    if debug == "fdr":
        assert cfg.trainer.fast_dev_run
    else:
        assert cfg.trainer.max_epochs == 2


def test_eval_and_sample_configs_compose(compose_train):
    for name in ("eval", "sample"):                                   # (compose_train holds Hydra initialised)
        cfg = compose(name, overrides=["ckpt_path=/some/last.ckpt"])
        assert cfg.ckpt_path == "/some/last.ckpt"
        assert cfg.num_samples > 0
        assert "data" not in cfg or cfg.data is None                  # the checkpoint's data by default
        check_targets(cfg)


# ---- the _target_ allowlist ----------------------------------------------------------------------------------
def test_check_targets_refuses_os_system():
    with pytest.raises(ValueError) as err:
        check_targets({"_target_": "os.system", "command": "echo hi"})
    assert "os.system" in str(err.value) and "<root>" in str(err.value)


def test_check_targets_names_the_nested_key():
    cfg = {"model": {"_target_": "cgml_lightning.CGMLModule",
                     "optimizer": {"_target_": "torch.optim.Adam", "_partial_": True}},
           "callbacks": {"evil": [{"_target_": "torch.optim.SGD"}, {"_target_": "subprocess.run", "args": ["ls"]}]}}
    with pytest.raises(ValueError) as err:
        check_targets(OmegaConf.create(cfg))
    assert "callbacks.evil[1]._target_" in str(err.value) and "subprocess.run" in str(err.value)
    assert ("model.optimizer", "torch.optim.Adam") in find_targets(cfg)


def test_check_targets_accepts_the_shipped_prefixes():
    check_targets({"a": {"_target_": "torch.optim.Adam"}, "b": {"_target_": "lightning.Trainer"},
                   "c": {"_target_": "cgml_lightning.data.ToyDataModule"}})


@pytest.mark.parametrize("target", ["torch.os.system", "torch.sys.modules",
                                    "lightning.pytorch.trainer.trainer.os.system"])
def test_check_targets_refuses_modules_reached_through_allowed_ones(target):
    """`torch.os.system` starts with an allowed prefix, yet Hydra resolves it to os.system through torch's own
    `import os`: the allowlist must judge what a target resolves to, not how its name starts."""
    with pytest.raises(ValueError, match="refusing"):
        check_targets({"x": {"_target_": target}})


def test_instantiate_refuses_before_calling(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("still here")
    with pytest.raises(ValueError, match="os.remove"):
        instantiate({"_target_": "os.remove", "path": str(victim)})
    assert victim.exists()


def test_run_train_refuses_a_bad_target_before_anything_runs(compose_train, tmp_path):
    from cgml_lightning.commands.train import run_train

    flag = tmp_path / "pwned"
    cfg = compose_train("experiment=toy", "debug=fdr", "+callbacks.evil._target_=os.system",
                        f"+callbacks.evil.command='touch {flag}'")
    with pytest.raises(ValueError, match=r"callbacks\.evil\._target_"):
        run_train(cfg)
    assert not flag.exists()


# ---- console scripts as subprocesses -------------------------------------------------------------------------
from helpers import script_command  # noqa: E402


def run_cli(name: str, *args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PWD": str(cwd), "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([*script_command(name), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        pytest.fail(f"{name} {' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}"
                    f"\n--- stderr\n{proc.stderr[-5000:]}")
    return proc


NULLABLE_KEYS = {"fid", "diversity_features", "diversity_feature_net", "diversity_lpips"}   # null: no such net
TEXT_KEYS = {"fid_feature_net", "fid_reference", "diversity_feature_net", "lpips_net", "lpips_version", "weights"}


def read_metrics(run_dir: Path) -> dict:
    path = run_dir / "metrics.json"
    assert path.is_file(), f"no metrics.json in {run_dir}: {sorted(p.name for p in run_dir.iterdir())}"
    metrics = json.loads(path.read_text())
    assert isinstance(metrics, dict)
    for key, value in metrics.items():
        if value is None and key in NULLABLE_KEYS or isinstance(value, str) and key in TEXT_KEYS:
            continue
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value)
        assert math.isfinite(value), (key, value)
    return metrics


def assert_run_artifacts(run_dir: Path) -> None:
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert "state_dict" in state
    png = run_dir / "samples.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli_cwd")


@pytest.fixture(scope="module")
def toy_run(workdir) -> Path:
    run_dir = workdir / "toy_run"
    run_cli("cgml-train", "experiment=toy", "debug=fdr", f"hydra.run.dir={run_dir}", cwd=workdir)
    return run_dir


@pytest.fixture(scope="module")
def digits_run(workdir) -> Path:
    run_dir = workdir / "digits_run"
    run_cli("cgml-train", "experiment=digits_completion", "debug=fdr", "logger=tensorboard",
            f"hydra.run.dir={run_dir}", cwd=workdir)
    return run_dir


@pytest.fixture(scope="module")
def npz_file(workdir) -> Path:
    rng = np.random.default_rng(0)
    x = rng.random(300)
    y = np.stack([np.sign(rng.random(300) - 0.5) * x, x ** 2], axis=1)
    path = workdir / "my data.npz"                                    # a space in the name, as users have
    np.savez(path, x=x, y=y)
    return path


@pytest.fixture(scope="module")
def npz_run(workdir, npz_file) -> Path:
    run_dir = workdir / "npz_run"
    run_cli("cgml-train", "experiment=toy", "data=npz", f"data.path={npz_file}", "debug=limit",
            f"hydra.run.dir={run_dir}", cwd=workdir)
    return run_dir


def test_train_toy_fdr(toy_run):
    assert_run_artifacts(toy_run)
    metrics = read_metrics(toy_run)
    assert TOY_KEYS <= set(metrics)
    # the written figures are the evaluation of the saved model on its recorded data, not some other numbers
    from cgml_lightning.runs import load_checkpoint
    from cgml_lightning.evaluation import evaluate
    from cgml_lightning.instantiate import datamodule_from_record

    module = load_checkpoint(str(toy_run / "checkpoints" / "last.ckpt"))
    again = evaluate(module, datamodule_from_record(module.data_info["data"], "toy"), metrics["num_samples"],
                     metrics["num_inputs"], seed=0)
    assert (again["mode_near_fraction"], again["mode_coverage"]) == (metrics["mode_near_fraction"],
                                                                     metrics["mode_coverage"])
    ckpt = torch.load(toy_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    latents = [v for k, v in ckpt["state_dict"].items() if "latents" in k]
    assert latents and latents[0].shape[1] == 10                       # experiment=toy: latent_dim 10


def test_train_digits_completion_fdr(digits_run):
    assert_run_artifacts(digits_run)
    metrics = read_metrics(digits_run)
    assert IMAGE_KEYS <= set(metrics)
    # cGML's samples of one input differ, so the best of them beats their mean (a decoder ignoring z fails both)
    assert metrics["diversity"] > 0.0 and metrics["psnr_best_of_n"] > metrics["psnr_mean"]


def test_train_npz_limit_with_csv_logger(npz_run):
    assert_run_artifacts(npz_run)
    metrics = read_metrics(npz_run)
    assert metrics["epochs"] == 2
    assert {"l2_best_of_n", "l2_mean", "diversity"} <= set(metrics)
    csv_files = list(npz_run.rglob("metrics.csv"))                     # logger=csv is the default
    assert csv_files, sorted(str(p.relative_to(npz_run)) for p in npz_run.rglob("*"))
    header = csv_files[0].read_text().splitlines()[0].split(",")
    assert "val/best_of_n_distance" in header
    ckpt = torch.load(npz_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    (table,) = [v for k, v in ckpt["state_dict"].items() if "latents" in k]
    assert table.shape == (240, 10)                                     # 300 rows, 10% val, 10% test; latent_dim 10


def test_train_bad_npz_fails_fast(workdir):
    bad = workdir / "no_y.npz"
    np.savez(bad, x=np.zeros(20))
    run_dir = workdir / "bad_run"
    proc = run_cli("cgml-train", "experiment=toy", "data=npz", f"data.path={bad}", "debug=limit",
                   f"hydra.run.dir={run_dir}", cwd=workdir, check=False)
    assert proc.returncode == 1
    assert str(bad) in proc.stderr and "missing array 'y'" in proc.stderr, proc.stderr[-3000:]
    assert "\nError: " in f"\n{proc.stderr}" and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "missing array 'y'" in (run_dir / "train.log").read_text()
    assert not (run_dir / "checkpoints").exists()


def test_user_errors_end_a_single_run_with_the_message_alone(tmp_path, monkeypatch, capsys):
    """The package's checks end a single run with their message on stderr and exit status 1; errors raised outside
    the package, errors that are no check's, multiruns and HYDRA_FULL_ERROR=1 keep Hydra's report."""
    from cgml_lightning.data.folders import check_root
    from cgml_lightning.runs import user_errors

    missing = tmp_path / "missing"
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as stop, user_errors(multirun=False):
        check_root(missing)
    assert stop.value.code == 1
    assert capsys.readouterr().err.startswith(f"Error: data.root: no such folder: {missing}\n")
    with pytest.raises(SystemExit), user_errors(multirun=False):          # a constructor's check, through Hydra
        instantiate({"_target_": "cgml_lightning.data.ImageFolderDataModule", "root": str(tmp_path), "channels": 2})
    assert capsys.readouterr().err.startswith("Error: data.channels must be 1 (grey) or 3 (RGB); got 2\n")
    with pytest.raises(ValueError, match="batch_size"), user_errors(multirun=False):
        torch.utils.data.DataLoader([], batch_size=-3)                   # torch's own error: Hydra reports it
    with pytest.raises(TypeError), user_errors(multirun=False):
        check_root(3)                                                     # a bug's error, not a check's
    unset = OmegaConf.create({"data": {"path": "???"}})
    with pytest.raises(SystemExit), user_errors(multirun=False):          # a config's ??? left unset
        unset.data.path
    assert capsys.readouterr().err.startswith("Error: data.path is required: give it on the command line")
    handler = logging.FileHandler(tmp_path / "job.log")                   # a multirun job's log file
    logging.getLogger().addHandler(handler)
    try:
        with pytest.raises(FileNotFoundError), user_errors(multirun=True):
            check_root(missing)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert f"data.root: no such folder: {missing}" in (tmp_path / "job.log").read_text()
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(FileNotFoundError), user_errors(multirun=False):
        check_root(missing)


def test_a_check_raised_in_a_data_loader_worker_ends_with_its_message_alone(tmp_path, monkeypatch, capsys):
    """torch raises a worker's error again in the main process with the worker's traceback as its text: a check of
    the package's (here: every training image unreadable) still ends with its own message, and torch's own errors in
    a worker keep their report."""
    from cgml_lightning.data import ImageFolderDataModule
    from cgml_lightning.runs import user_errors

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=8, val_fraction=0, test_fraction=0, batch_size=2,
                               num_workers=1)
    dm.setup()
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(b"gone")                   # unreadable after setup
    with pytest.raises(SystemExit) as stop, user_errors(multirun=False):
        next(iter(dm.train_dataloader()))
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: no readable image left in the train split under ") and "Traceback" not in err
    from cgml_lightning.data.folders import split_pair

    odd = torch.utils.data.DataLoader([1, 2], num_workers=1, collate_fn=lambda items: split_pair(Image.new("L", (5, 4)),
                                                                                                 "odd.png"))
    with pytest.raises(SystemExit), user_errors(multirun=False):       # the package's own class, printed qualified
        next(iter(odd))
    assert capsys.readouterr().err.startswith("Error: odd.png: an A|B image needs an even width")
    loader = torch.utils.data.DataLoader([1, 2], num_workers=1, collate_fn=lambda items: int("not a number"))
    with pytest.raises(ValueError, match="Caught ValueError in DataLoader worker"), user_errors(multirun=False):
        next(iter(loader))                                                # raised outside the package: reported


def test_eval_from_checkpoint(toy_run, workdir):
    out = workdir / "eval_run"
    run_cli("cgml-eval", f"ckpt_path={toy_run / 'checkpoints' / 'last.ckpt'}", "num_samples=3", "sample_pool=6",
            f"hydra.run.dir={out}", cwd=workdir)
    metrics = read_metrics(out)
    assert TOY_KEYS <= set(metrics)
    assert metrics["num_samples"] == 3 and metrics["sample_pool"] == 6
    assert "ckpt_path" in (out / ".hydra" / "eval" / "config.yaml").read_text()    # its own record


def test_eval_and_sample_refuse_a_training_runs_folder(toy_run, workdir):
    """Pointed at the folder of a training run they would replace its metrics.json, samples.png and Hydra record:
    refused, naming the run, with every file of the run as it was."""
    before = {p: p.read_bytes() for p in toy_run.rglob("*") if p.is_file()}
    assert {"metrics.json", "samples.png", "config.yaml"} <= {p.name for p in before}
    for command in ("cgml-eval", "cgml-sample"):
        proc = run_cli(command, f"ckpt_path={toy_run / 'checkpoints' / 'last.ckpt'}", "num_samples=2",
                       f"hydra.run.dir={toy_run}", cwd=workdir, check=False)
        assert proc.returncode != 0
        assert "holds a cgml-train run" in proc.stderr and f"hydra.run.dir={toy_run}/" in proc.stderr, proc.stderr
    assert all(p.read_bytes() == data for p, data in before.items())
    added = {str(p.relative_to(toy_run)) for p in toy_run.rglob("*") if p.is_file() and p not in before}
    assert added <= {"eval.log", "sample.log"}                        # their Hydra records taken back


def test_a_resume_keeps_the_record_of_the_command_before_it(tmp_path):
    from cgml_lightning.runs import keep_earlier_record

    record = tmp_path / ".hydra"
    keep_earlier_record(record)                                               # nothing there yet
    assert not record.exists()
    for command in ("trained", "resumed"):
        record.mkdir(exist_ok=True)
        for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
            (record / name).write_text(command)
        keep_earlier_record(record)
    assert sorted(p.name for p in record.iterdir()) == ["earlier"]
    assert (record / "earlier" / "1" / "overrides.yaml").read_text() == "trained"
    assert (record / "earlier" / "2" / "config.yaml").read_text() == "resumed"


def test_an_empty_test_split_is_refused_before_training(compose_train, tmp_path):
    from PIL import Image

    from cgml_lightning.runs import build_datamodule

    for i in range(6):
        Image.fromarray(np.full((8, 8, 3), 30 * i, np.uint8)).save(tmp_path / f"{i}.png")
    cfg = compose_train("experiment=folder_completion", f"data.root={tmp_path}", "data.image_size=8",
                        "data.test_fraction=0", "data.num_workers=0")
    with pytest.raises(ValueError, match="the test split is empty, so the evaluation after training"):
        build_datamodule(cfg)


def test_a_fresh_training_run_refuses_a_training_runs_folder(toy_run, workdir, tmp_path):
    """cgml-train again into a training run's folder, without ckpt_path, would replace its checkpoints, metrics.json
    and Hydra record: refused before Hydra writes anything there, every file as it was; run_train's own check (for
    multirun jobs, which Hydra records before any callback) refuses the same and lets an empty folder through."""
    from cgml_lightning.runs import check_training_folder

    before = {p: p.read_bytes() for p in toy_run.rglob("*") if p.is_file()}
    proc = run_cli("cgml-train", "experiment=toy", "debug=fdr", f"hydra.run.dir={toy_run}", cwd=workdir, check=False)
    assert proc.returncode != 0
    assert "holds a training run's checkpoints (last.ckpt" in proc.stderr and "ckpt_path=last" in proc.stderr, \
        proc.stderr
    assert {p: p.read_bytes() for p in toy_run.rglob("*") if p.is_file()} == before
    with pytest.raises(ValueError, match="holds a training run's checkpoints"):
        check_training_folder(toy_run)
    (tmp_path / "checkpoints").mkdir()
    check_training_folder(tmp_path)


def test_resuming_another_folders_checkpoint_refuses_a_training_runs_folder(toy_run, workdir, tmp_path):
    """ckpt_path=FILE from another folder into a folder that holds a training run would replace that run's
    last.ckpt, metrics.json and samples.png: refused, every file as it was; the folder's own checkpoints (by path
    or ckpt_path=last) resume there, and another folder's checkpoint resumes into a new folder."""
    from cgml_lightning.runs import check_training_folder

    other = tmp_path / "other.ckpt"
    other.write_bytes((toy_run / "checkpoints" / "last.ckpt").read_bytes())          # a colleague's copy
    before = {p: p.read_bytes() for p in toy_run.rglob("*") if p.is_file()}
    proc = run_cli("cgml-train", "experiment=toy", "debug=fdr", f"ckpt_path={other}", f"hydra.run.dir={toy_run}",
                   cwd=workdir, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"ckpt_path={other} is another folder's" in proc.stderr and "new hydra.run.dir" in proc.stderr
    assert {p: p.read_bytes() for p in toy_run.rglob("*") if p.is_file()} == before
    check_training_folder(toy_run, "last")
    check_training_folder(toy_run, str(toy_run / "checkpoints" / "last.ckpt"))
    check_training_folder(tmp_path / "new", str(other))


def test_every_command_keeps_to_a_folder_of_its_own(compose_train, tmp_path):
    """A folder is its first command's: the same command may run there again (resume, a second evaluation); another
    is refused, naming the key that gives it a folder of its own, also for a record that holds job.name only."""
    from cgml_lightning.runs import check_output_dir

    def job(name: str, out: Path, *overrides: str) -> None:                # (compose_train holds Hydra initialised)
        cfg = compose(name, overrides=[*overrides, f"hydra.run.dir={out}"], return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(out)
        HydraConfig().set_config(cfg)

    train_run, eval_run = tmp_path / "train_run", tmp_path / "eval_run"
    (train_run / ".hydra").mkdir(parents=True)
    (train_run / ".hydra" / "hydra.yaml").write_text("hydra:\n  job:\n    name: train\n")
    (eval_run / ".hydra" / "eval").mkdir(parents=True)
    (eval_run / ".hydra" / "eval" / "hydra.yaml").write_text("hydra:\n  job:\n    config_name: eval\n")
    job("train", train_run)
    assert check_output_dir() == train_run
    job("eval", eval_run, "ckpt_path=x")
    assert check_output_dir() == eval_run
    job("eval", train_run, "ckpt_path=x")
    (train_run / ".hydra" / "eval").mkdir()                           # as Hydra writes it before the command runs
    (train_run / ".hydra" / "eval" / "hydra.yaml").write_text("hydra:\n  job:\n    config_name: eval\n")
    with pytest.raises(ValueError, match=f"holds a cgml-train run.*hydra.run.dir={train_run / 'eval'}"):
        check_output_dir()
    assert not (train_run / ".hydra" / "eval").exists()              # taken back: the folder stays the run's
    job("train", train_run)
    assert check_output_dir() == train_run
    job("train", eval_run)
    with pytest.raises(ValueError, match=f"holds a cgml-eval run.*hydra.run.dir={eval_run / 'train'}"):
        check_output_dir()
    job("bench", train_run, "hydra.mode=MULTIRUN", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    with pytest.raises(ValueError, match=f"hydra.sweep.dir={tmp_path / 'sweep' / 'bench'}"):
        check_output_dir()
    HydraConfig.instance().cfg = None                                 # no job config left for later tests


def test_sample_from_checkpoint(digits_run, workdir):
    out = workdir / "sample_run"
    run_cli("cgml-sample", f"ckpt_path={digits_run / 'checkpoints' / 'last.ckpt'}", "num_samples=3",
            "num_inputs=4", f"hydra.run.dir={out}", cwd=workdir)
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = torch.load(out / "samples.pt", map_location="cpu", weights_only=True)
    assert saved["samples"].shape == (4, 3, 1, 8, 8)
    assert saved["x"].shape == (4, 2, 8, 8)
    # completion: the visible pixels of every sample are the input's
    visible = (saved["x"][:, -1:] == 0).expand(4, 1, 8, 8)
    for i in range(3):
        assert torch.equal(saved["samples"][:, i][visible], saved["x"][:, :-1][visible])


def test_sample_picture_of_vector_data_shows_the_samples_it_saved(toy_run, tmp_path, monkeypatch):
    """cgml-sample on vector data plots the samples it wrote to samples.pt (num_inputs, pool, steps as given) with
    their inputs' truth, not fresh draws for other inputs."""
    import cgml_lightning.commands.sample as command

    drawn = {}
    monkeypatch.setattr(command, "check_output_dir", lambda: tmp_path)
    monkeypatch.setattr(command, "vector_plot", lambda x, samples, path, modes, truth: drawn.update(
        x=x, samples=samples, modes=modes, truth=truth))
    cfg = OmegaConf.create({"ckpt_path": str(toy_run / "checkpoints" / "last.ckpt"), "num_samples": 2,
                            "num_inputs": 4, "sample_pool": 5, "steps": 1, "seed": 0, "device": "cpu",
                            "input": None, "mask": None, "hint": None, "data": None})
    command.run_sample(cfg)
    saved = torch.load(tmp_path / "samples.pt", map_location="cpu", weights_only=True)
    assert saved["samples"].shape == (4, 2, 3) and torch.equal(drawn["samples"], saved["samples"])
    assert torch.equal(drawn["x"], saved["x"]) and torch.equal(drawn["truth"], saved["y"])
    assert drawn["modes"].shape == (4, 2, 3)                          # the toy's two branches at these inputs


def test_eval_on_data_of_another_shape_names_the_sizes(digits_run, tmp_path):
    """data=... overrides the checkpoint's data; where its samples differ in shape the error says how, before any
    sampling (not a reshape error deep inside it)."""
    from PIL import Image

    from cgml_lightning.runs import load_for_inference

    for i in range(8):
        Image.fromarray(np.full((16, 16, 3), 20 * i, np.uint8)).save(tmp_path / f"{i}.png")
    data = {"_target_": "cgml_lightning.data.ImageFolderDataModule", "root": str(tmp_path), "image_size": 16,
            "num_workers": 0, "val_fraction": 0.25, "test_fraction": 0.25}
    cfg = OmegaConf.create({"ckpt_path": str(digits_run / "checkpoints" / "last.ckpt"), "device": "cpu", "data": data})
    with pytest.raises(ValueError, match=r"data=... on the command line gives x \[4, 16, 16\].* trained on "
                                         r"x \[2, 8, 8\] .*data.image_size"):
        load_for_inference(cfg)


def test_eval_warns_when_the_recorded_folder_now_lists_another_split(tmp_path, caplog):
    """Files added or removed under data.root since training move images between the splits: evaluating on the
    checkpoint's own data config then says so instead of scoring a test split that may hold training images."""
    from types import SimpleNamespace

    from PIL import Image

    from cgml_lightning.data import ImageFolderDataModule
    from cgml_lightning.runs import checkpoint_datamodule

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(8):
        Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)).save(folder / f"{i}.png")
    record = {"_target_": "cgml_lightning.data.ImageFolderDataModule", "root": str(folder), "image_size": 8,
              "num_workers": 0, "val_fraction": 0.25, "test_fraction": 0.25, "split_seed": 0}
    trained = ImageFolderDataModule(**{k: v for k, v in record.items() if k != "_target_"}).info()
    module = SimpleNamespace(data_info={**trained, "data": record})
    cfg = OmegaConf.create({"ckpt_path": "run.ckpt"})
    checkpoint_datamodule(cfg, module)
    assert "another training split" not in caplog.text
    # the same data, moved: +data.root=NEW keeps every other recorded key, and the split
    moved = folder.rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match=r"no such folder.*\+data\.root=NEW_FOLDER"):
        checkpoint_datamodule(cfg, module)
    dm = checkpoint_datamodule(OmegaConf.create({"ckpt_path": "run.ckpt", "data": {"root": str(moved)}}), module)
    assert dm.info()["fingerprint"] == trained["fingerprint"] and "another training split" not in caplog.text
    # data=GROUP with another split of the same folder: named
    other = {**record, "root": str(moved), "split_seed": 1}
    checkpoint_datamodule(OmegaConf.create({"ckpt_path": "run.ckpt", "data": other}), module)
    assert "another training split than run.ckpt" in caplog.text and "data.split_seed=1 (trained with 0)" in caplog.text
    caplog.clear()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(moved / "added.png")
    checkpoint_datamodule(OmegaConf.create({"ckpt_path": "run.ckpt", "data": {"root": str(moved)}}), module)
    assert "the checkpoint's data config with +data.root gives another training split than run.ckpt" in caplog.text
    caplog.clear()                                  # a folder's fingerprint is its files': another mask hides nothing
    checkpoint_datamodule(OmegaConf.create({"ckpt_path": "run.ckpt", "data": {"root": str(moved), "mask": "box"}}),
                          module)
    assert "another training split" in caplog.text


def test_another_degradation_of_in_memory_data_is_not_another_split(digits_run, caplog):
    """Digits held in memory fingerprint their masked inputs: +data.mask_side=top changes that fingerprint, and
    the evaluation names the mask, not a split."""
    from cgml_lightning.runs import checkpoint_datamodule, load_checkpoint

    module = load_checkpoint(str(digits_run / "checkpoints" / "last.ckpt"))
    with caplog.at_level("WARNING", logger="cgml_lightning"):
        checkpoint_datamodule(OmegaConf.create({"ckpt_path": "run.ckpt", "data": {"mask_side": "top"}}), module)
    assert "another training split" not in caplog.text


def test_checkpoints_record_local_data_folders_absolute(tmp_path, monkeypatch):
    from cgml_lightning.runs import recorded_data

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    record = recorded_data(OmegaConf.create({"root": "photos", "input_dir": "~/chunks", "path": "data.npz",
                                             "image_size": 64}))
    home = tmp_path / "home"
    assert record == {"root": str(tmp_path / "photos"), "input_dir": str(home / "chunks"),
                      "path": str(tmp_path / "data.npz"), "image_size": 64}
    assert recorded_data(OmegaConf.create({"input_dir": "s3://bucket/set"}))["input_dir"] == "s3://bucket/set"
    assert recorded_data(OmegaConf.create({"input_dir": "local:/data/set"}))["input_dir"] == "local:/data/set"


def test_eval_missing_checkpoint_fails(tmp_path):
    from cgml_lightning.runs import inference_device, load_for_inference

    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_for_inference(OmegaConf.create({"ckpt_path": str(tmp_path / "nope.ckpt")}))
    for key, value in (("num_samples", 0), ("num_inputs", -2)):
        with pytest.raises(ValueError, match=f"{key} must be a positive whole number; got {value}"):
            load_for_inference(OmegaConf.create({"ckpt_path": str(tmp_path / "nope.ckpt"), key: value}))
    with pytest.raises(ValueError, match="device=tpu9: not a device"):
        inference_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device=cuda: this torch sees no CUDA device"):
            inference_device("cuda")


def test_multirun_sweep(workdir):
    """-m over two values: two job dirs, each with its own metrics and checkpoint. A fresh sweep into the same
    hydra.sweep.dir is refused before it writes anything: every file of the first sweep stays as it was."""
    sweep = workdir / "sweep"
    run_cli("cgml-train", "-m", "experiment=toy", "model.z_steps=1,2", "debug=fdr", f"hydra.sweep.dir={sweep}",
            cwd=workdir)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "metrics.json").exists())
    assert [p.name for p in jobs] == ["0", "1"]
    for job, z_steps in zip(jobs, (1, 2)):
        assert TOY_KEYS <= set(read_metrics(job))
        ckpt = torch.load(job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert ckpt["hyper_parameters"]["z_steps"] == z_steps
    before = {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file()}
    proc = run_cli("cgml-train", "-m", "experiment=toy", "model.z_steps=3,4", "debug=fdr", f"hydra.sweep.dir={sweep}",
                   cwd=workdir, check=False)
    assert proc.returncode == 1 and "holds training runs' checkpoints (jobs 0, 1)" in proc.stderr, proc.stderr
    assert {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file()} == before


def test_train_regressor_fdr(workdir):
    """The deterministic baseline on the same experiment (the experiment sets model.latent_dim for cgml)."""
    run_dir = workdir / "regressor_run"
    run_cli("cgml-train", "experiment=toy", "model=regressor", "debug=fdr", f"hydra.run.dir={run_dir}", cwd=workdir)
    assert_run_artifacts(run_dir)
    metrics = read_metrics(run_dir)
    assert TOY_KEYS <= set(metrics)
    assert metrics["mode_coverage"] == 0.0                          # N identical samples never cover both modes
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert not any("latents" in k for k in ckpt["state_dict"])


# ---- cgml-sample on users' files ---------------------------------------------------------------------------------
def write_png(path: Path, array: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def ramp(size: int, channels: int = 1) -> np.ndarray:
    """A diagonal grey ramp [size, size] (or [size, size, 3]) in uint8: a resize or mix-up would show."""
    a = (np.add.outer(np.arange(size), np.arange(size)) * 255 // (2 * size - 2)).astype(np.uint8)
    return np.stack([a] * 3, axis=-1) if channels == 3 else a


@pytest.fixture(scope="module")
def user_folder(workdir) -> Path:
    folder = workdir / "my images"
    write_png(folder / "a_small.png", ramp(8))                              # the model's size: used as it is
    write_png(folder / "b_big_rgb.png", ramp(32, channels=3))               # RGB, 4x: converted and resized
    write_png(folder / "nested" / "c.png", 255 - ramp(16))
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_sample_on_a_folder_of_user_images(digits_run, workdir, user_folder):
    out = workdir / "sample_folder"
    run_cli("cgml-sample", f"ckpt_path={digits_run / 'checkpoints' / 'last.ckpt'}", f"input={user_folder}",
            "num_samples=3", f"hydra.run.dir={out}", cwd=workdir)
    saved = torch.load(out / "samples.pt", map_location="cpu", weights_only=True)
    assert [Path(f).relative_to(user_folder).as_posix() for f in saved["files"]] == [
        "a_small.png", "b_big_rgb.png", "nested/c.png"]
    assert saved["x"].shape == (3, 2, 8, 8) and saved["samples"].shape == (3, 3, 1, 8, 8)
    given = saved["y"]
    assert given.shape == (3, 1, 8, 8)
    torch.testing.assert_close(given[0, 0], torch.from_numpy(ramp(8)).float() / 255)
    # the checkpoint's task (digits: the bottom half hidden) was applied; samples keep the visible top half
    assert saved["x"][:, 1, 4:].eq(1).all() and saved["x"][:, 1, :4].eq(0).all()
    torch.testing.assert_close(saved["x"][:, 0, :4], given[:, 0, :4])
    for i in range(3):
        torch.testing.assert_close(saved["samples"][:, i, :, :4], given[:, :, :4])
    from PIL import Image

    with Image.open(out / "samples.png") as grid:                           # input | 3 samples | given, 3 rows
        assert grid.size == (5 * 10 * 4, 3 * 10 * 4)


def test_sample_with_a_mask_file_and_a_hint(digits_run, workdir, user_folder):
    from cgml_lightning.runs import load_checkpoint

    mask = np.zeros((16, 16), np.uint8)
    mask[:, 8:] = 255                                                        # white = hole: the right half
    mask_file = write_png(workdir / "mask.png", mask)
    hint = np.zeros((8, 8, 2), np.uint8)                                      # grey + alpha
    hint[2:6, 5:7] = (255, 255)                                               # white strokes, opaque, in the hole
    hint_file = write_png(workdir / "hint.png", hint)
    out = workdir / "sample_mask"
    ckpt = digits_run / "checkpoints" / "last.ckpt"
    run_cli("cgml-sample", f"ckpt_path={ckpt}", f"input={user_folder / 'a_small.png'}", f"mask={mask_file}",
            f"hint={hint_file}", "steps=0", "num_samples=4", f"hydra.run.dir={out}", cwd=workdir)
    saved = torch.load(out / "samples.pt", map_location="cpu", weights_only=True)
    assert saved["x"].shape == (1, 2, 8, 8)
    expected_mask = torch.zeros(8, 8)
    expected_mask[:, 4:] = 1
    assert torch.equal(saved["x"][0, 1], expected_mask)                       # the user's mask, not the task's
    known = saved["hint_known"]
    assert known.shape == (1, 1, 8, 8) and known.sum() == 8 and known[0, 0, 2:6, 5:7].eq(1).all()
    # the hint pulled the hidden pixels it covers toward white, compared with unguided samples of the same start
    module = load_checkpoint(str(ckpt))
    free = module.sample(saved["x"], 4, generator=torch.Generator().manual_seed(0))
    on_hint = known.bool().expand(1, 1, 8, 8)
    guided_err = (saved["samples"][:, :, on_hint[0]] - 1).abs().mean()
    free_err = (free[:, :, on_hint[0]] - 1).abs().mean()
    assert guided_err < free_err


def test_sample_mask_on_the_checkpoint_test_images(digits_run, workdir):
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 2:6] = 255
    out = workdir / "sample_mask_test_images"
    run_cli("cgml-sample", f"ckpt_path={digits_run / 'checkpoints' / 'last.ckpt'}",
            f"mask={write_png(workdir / 'box.png', mask)}", "num_inputs=5", "num_samples=2", f"hydra.run.dir={out}",
            cwd=workdir)
    saved = torch.load(out / "samples.pt", map_location="cpu", weights_only=True)
    assert saved["x"].shape == (5, 2, 8, 8) and saved["y"].shape == (5, 1, 8, 8)
    assert torch.equal(saved["x"][:, 1].sum((1, 2)), torch.full((5,), 16.0))
    torch.testing.assert_close(saved["samples"][:, :, :, :2], saved["y"][:, None, :, :2].expand(5, 2, 1, 2, 8))


def test_sample_errors_name_the_file(digits_run, toy_run, workdir):
    wide = write_png(workdir / "wide image.png", np.zeros((8, 24), np.uint8))
    proc = run_cli("cgml-sample", f"ckpt_path={digits_run / 'checkpoints' / 'last.ckpt'}", f"input={wide}",
                   f"hydra.run.dir={workdir / 'sample_bad'}", cwd=workdir, check=False)
    assert proc.returncode != 0
    assert str(wide) in proc.stderr and "24x8" in proc.stderr and "crop=true" in proc.stderr, proc.stderr[-3000:]

    from cgml_lightning.commands.sample import run_sample

    def sample_cfg(**keys):
        return OmegaConf.create({"num_samples": 2, "num_inputs": 4, "seed": 0, "input": None, "degrade": True,
                                 "crop": False, "mask": None, "hint": None, "data": None, **keys})

    digits_ckpt, toy_ckpt = digits_run / "checkpoints" / "last.ckpt", toy_run / "checkpoints" / "last.ckpt"
    with pytest.raises(FileNotFoundError, match="missing.png"):
        run_sample(sample_cfg(ckpt_path=str(digits_ckpt), input=str(workdir / "missing.png")))
    with pytest.raises(FileNotFoundError, match="no_mask.png"):
        run_sample(sample_cfg(ckpt_path=str(digits_ckpt), mask=str(workdir / "no_mask.png")))
    with pytest.raises(ValueError, match="input= takes images.*vector data"):
        run_sample(sample_cfg(ckpt_path=str(toy_ckpt), input=str(wide)))
    for key in ("crop", "degrade"):                      # crop=no arrives as the string 'no': not taken as true
        with pytest.raises(ValueError, match=f"{key} must be true or false; got 'no'"):
            run_sample(sample_cfg(ckpt_path=str(digits_ckpt), input=str(wide), **{key: "no"}))


def test_evaluation_names_the_degradation_it_changes(caplog):
    """Data given for evaluation (data=GROUP, +data.KEY, or a datamodule in Python) whose degradation differs from
    training's: each changed setting is named, for any datamodule that records one (digits record no data.task);
    the folder, the loader and the same degradation say nothing."""
    from cgml_lightning.data import DigitsDataModule
    from cgml_lightning.evaluation import warn_degradation_changes

    class Trained:
        data_info = DigitsDataModule().info()

    with caplog.at_level("WARNING", logger="cgml_lightning"):
        warn_degradation_changes(Trained(), DigitsDataModule(mask_side="top", batch_size=7))
    assert "data.mask_side=top (trained with bottom)" in caplog.text and "batch_size" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="cgml_lightning"):
        warn_degradation_changes(Trained(), DigitsDataModule(batch_size=7))
    assert caplog.text == ""
