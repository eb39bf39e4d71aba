"""Each command's own --help, your configs through --config-dir, the debug presets, LICENSE and CITATION.cff.

Three subprocesses run the console script beside this interpreter (cgml-train --help, --cfg job with --config-dir,
debug=default end to end); everything else composes in-process."""
import json
import os
import re
import string
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module

import cgml_lightning.conf

ROOT = Path(__file__).resolve().parents[1]
CONF = Path(cgml_lightning.conf.__path__[0])
PAPER = "Conditional Generative Modeling via Learning the Latent Space"
# the groups a user picks on each command, as its help lists them (internal groups such as paths,
# feature_net stay out)
HELP_GROUPS = {
    "train": ["experiment", "data", "model", "net", "trainer", "logger", "callbacks", "hparams_search", "debug",
              "hydra/launcher"],
    "eval": ["data", "logger"],
    "sample": ["data"],
    "bench": ["profile", "logger"],
}
INTERNAL_GROUPS = {"paths", "feature_net", "profile", "local"}


def script(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: install the package (pip install -e .) into this interpreter's environment")
    return str(path)


def run(name: str, *args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PWD": str(cwd), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([script(name), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"{name} {' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}"
                                  f"\n--- stderr\n{proc.stderr[-5000:]}")
    return proc


def compose_cfg(name: str, *overrides: str, hydra_cfg: bool = False):
    with initialize_config_module(config_module="cgml_lightning.conf", version_base="1.3"):
        return compose(name, overrides=list(overrides), return_hydra_config=hydra_cfg)


def render_help(name: str) -> str:
    """The --help text as Hydra builds it (hydra._internal.hydra.Hydra.get_help), without starting a process."""
    help_cfg = compose_cfg(name, hydra_cfg=True).hydra.help
    return string.Template(help_cfg.template).substitute(FLAGS_HELP="", HYDRA_CONFIG_GROUPS="", APP_CONFIG_GROUPS="",
                                                         CONFIG="")


def options(group: str) -> list[str]:
    """A group's option names; an option's _128/_256 variants fold into it (the help names them so)."""
    names = {p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_")}   # _shared: a base, no option
    return sorted({base if (base := re.sub(r"_(128|256)$", "", n)) in names else n for n in names})


@pytest.mark.parametrize("name", ["train", "eval", "sample", "bench"])
def test_help_lists_the_groups_and_every_option(name):
    text = render_help(name)
    assert text.startswith(f"cgml-{name}: "), text[:200]
    assert "powered by hydra" not in text.lower()
    assert "--hydra-help" in text and "== Examples ==" in text and "== Outputs ==" in text
    assert "$" not in text and "${" not in text                       # every placeholder filled
    assert f"outputs/{compose_cfg(name).task_name}/runs/" in text      # where this run goes, resolved
    groups = text.split("== Config groups")[1].split("==")[1]
    for group in HELP_GROUPS[name]:
        assert re.search(rf"^  {re.escape(group)} ", groups, re.M), f"cgml-{name} --help does not list {group}="
        for option in options(group):
            assert re.search(rf"\b{option}\b", groups), f"cgml-{name} --help misses {group}={option}"
    for group in INTERNAL_GROUPS - set(HELP_GROUPS[name]):
        assert not re.search(rf"^  {group} ", groups, re.M), f"cgml-{name} --help lists the internal group {group}"


def test_train_help_from_the_console_script(tmp_path):
    out = run("cgml-train", "--help", cwd=tmp_path, timeout=120).stdout
    assert out.startswith("cgml-train: ")
    assert "powered by hydra" not in out.lower()
    for group in ("experiment", "model", "data", "debug"):
        assert re.search(rf"^  {group} ", out, re.M), f"{group} missing from cgml-train --help:\n{out}"
    assert f"This run: {tmp_path}/outputs/digits_completion/runs/" in out


def test_config_dir_experiment(tmp_path):
    experiment = tmp_path / "my_configs" / "experiment"
    experiment.mkdir(parents=True)
    (experiment / "my_task.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n  - override /data: toy\n  - override /net: mlp\n"
        "task_name: my_task_from_config_dir\n"
        "data:\n  num_modes: 3\nnet:\n  width: 48\nmodel:\n  latent_dim: 7\ntrainer:\n  max_epochs: 3\n")
    out = run("cgml-train", "--config-dir", "my_configs", "experiment=my_task", "--cfg", "job", cwd=tmp_path,
              timeout=120).stdout
    cfg = yaml.safe_load(out)
    assert cfg["task_name"] == "my_task_from_config_dir"
    assert cfg["data"]["_target_"].endswith("ToyDataModule") and cfg["data"]["num_modes"] == 3
    assert cfg["net"]["name"] == "mlp" and cfg["net"]["width"] == 48
    assert cfg["model"]["latent_dim"] == 7 and cfg["trainer"]["max_epochs"] == 3


@pytest.mark.parametrize("preset, experiment, expected", [
    ("default", "digits_completion", {"max_epochs": 1, "accelerator": "cpu", "devices": 1, "detect_anomaly": True}),
    ("overfit", "toy", {"overfit_batches": 1, "max_epochs": 30}),
    ("profiler", "digits_completion", {"profiler": "simple", "max_epochs": 1, "limit_train_batches": 10}),
])
def test_debug_presets_compose(preset, experiment, expected):
    cfg = compose_cfg("train", f"experiment={experiment}", f"debug={preset}", "logger=[csv,wandb]")
    assert {k: cfg.trainer.get(k) for k in expected} == expected
    assert cfg.logger is None                                          # whatever logger= asked for
    assert (cfg.eval.num_samples, cfg.eval.num_inputs) == (2, 8)
    if preset == "default":
        assert cfg.data.num_workers == 0
    if preset == "overfit":
        assert cfg.model.scheduler is None
        assert cfg.callbacks.sample_grid.every_n_epochs == 10


def test_several_loggers_compose():
    cfg = compose_cfg("train", "logger=[csv,tensorboard,wandb]")
    assert sorted(cfg.logger) == ["csv", "tensorboard", "wandb"]


def test_debug_default_runs_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    run("cgml-train", "debug=default", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and metrics["num_samples"] == 2 and metrics["num_inputs"] == 8
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert not (run_dir / "csv").exists()                             # no loggers


def test_license_and_citation():
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License")
    assert "Copyright (c) 2026 the cgml-lightning authors" in license_text
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert cff["cff-version"] == "1.2.0" and cff["title"] == "cgml-lightning" and cff["license"] == "MIT"
    assert str(cff["version"]) == version
    paper = cff["preferred-citation"]
    assert paper["type"] == "conference-paper" and paper["title"] == PAPER and paper["year"] == 2021
    assert [a["family-names"] for a in paper["authors"]] == ["Ramasinghe", "Ranasinghe", "Khan", "Barnes", "Gould"]
    assert "ICLR" in paper["conference"]["name"]
