"""Reliability: exact resume, fine-tuning, resume data check, DDP-safe latents, preemption, sweeps, safe loading,
W&B hygiene and the NaN guard.

Subprocess tests run the installed console scripts from a temporary working directory with one thread and W&B
disabled; the in-process tests compose the shipped Hydra configs and call `cgml_lightning.commands.train.run_train`. Data is
the toy (512 samples, 4 batches an epoch) or a 301-row .npz file, so every run takes seconds.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict
from torch.utils.data import DataLoader

from cgml_lightning import CGMLModule
from cgml_lightning.data.base import IndexedDataset

torch.set_num_threads(1)

ATOL = 1e-5


# ---- helpers ---------------------------------------------------------------------------------------------------
from helpers import TOY, cli_env, compose_job, load, run_cli, script_command  # noqa: E402


def latent_table(state_dict: dict) -> torch.Tensor:
    (table,) = [v for k, v in state_dict.items() if "latents" in k]
    return table


def max_abs_diff(a, b, where: str = "") -> float:
    """Largest |a - b| over two nested containers of tensors; any structural or non-tensor mismatch fails."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, f"{where}: {a!r:.80} vs {b!r:.80}"
        return 0.0 if a.numel() == 0 else (a.double() - b.double()).abs().max().item()
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        return max([max_abs_diff(a[k], b[k], f"{where}.{k}") for k in a], default=0.0)
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: {a!r:.80} vs {b!r:.80}"
        return max([max_abs_diff(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b))], default=0.0)
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b)
    assert a == b, f"{where}: {a!r} vs {b!r}"
    return 0.0


@pytest.fixture
def hydra_job():
    """compose_job, and HydraConfig cleared afterwards (Lightning's DDP launcher looks at it)."""
    yield compose_job
    HydraConfig.instance().cfg = None


def in_process_overrides(*extra: str) -> list[str]:
    return [*TOY, "~callbacks.rich_progress_bar", "logger=none", *extra]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reliability_cwd")


# ---- 1. exact resume -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resume_runs(workdir) -> dict[str, Path]:
    """A deterministic 2-epoch run (with weight averaging) keeping its per-epoch checkpoints, and the same command
    resumed from the checkpoint of its first epoch."""
    common = [*TOY, "seed=7", "trainer.deterministic=true", "trainer.max_epochs=2", "model.ema_decay=0.9"]
    runs = {name: workdir / name for name in ("straight", "resumed")}
    run_cli("cgml-train", *common, "callbacks.model_checkpoint.save_top_k=-1", f"hydra.run.dir={runs['straight']}",
            cwd=workdir)
    first = runs["straight"] / "checkpoints" / "epoch_000.ckpt"
    run_cli("cgml-train", *common, f"ckpt_path={first}", f"hydra.run.dir={runs['resumed']}", cwd=workdir)
    return runs


@pytest.fixture(scope="module")
def trained_ckpt(resume_runs) -> Path:
    return resume_runs["straight"] / "checkpoints" / "last.ckpt"


def assert_same_state(a: dict, b: dict) -> None:
    """Weights, latent table, optimizer and scheduler states and loop counters equal within ATOL."""
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    assert set(a["state_dict"]) == set(b["state_dict"])
    diffs = {key: max_abs_diff(a["state_dict"][key], b["state_dict"][key], key) for key in a["state_dict"]}
    bad = {k: v for k, v in diffs.items() if v > ATOL}
    assert not bad, f"weights/latents differ after resume: {bad}"
    assert max_abs_diff(latent_table(a["state_dict"]), latent_table(b["state_dict"])) <= ATOL
    assert len(a["optimizer_states"]) == len(b["optimizer_states"]) == 2
    for i, (x, y) in enumerate(zip(a["optimizer_states"], b["optimizer_states"])):
        assert x["state"], f"optimizer {i} has no state"
        assert max_abs_diff(x, y, f"optimizer_states[{i}]") <= ATOL
    assert max_abs_diff(a.get("lr_schedulers", []), b.get("lr_schedulers", []), "lr_schedulers") <= ATOL


def test_resume_matches_uninterrupted_run(resume_runs):
    straight = load(resume_runs["straight"] / "checkpoints" / "last.ckpt")
    resumed = load(resume_runs["resumed"] / "checkpoints" / "last.ckpt")
    first = load(resume_runs["straight"] / "checkpoints" / "epoch_000.ckpt")
    assert resumed["global_step"] > first["global_step"] > 0
    # the resumed run really trained on: its weights moved away from the checkpoint it started from
    assert max_abs_diff({k: v for k, v in first["state_dict"].items() if "latents" not in k},
                        {k: v for k, v in resumed["state_dict"].items() if "latents" not in k}) > 1e-4
    assert_same_state(straight, resumed)
    assert any(k.startswith("ema.module.generator.") for k in straight["state_dict"])   # the EMA resumed exactly too


def test_resume_with_more_epochs_keeps_training(hydra_job, tmp_path):
    """`cgml-train ... trainer.max_epochs=1`, then `ckpt_path=RUN1/checkpoints/last.ckpt trainer.max_epochs=2` with a
    constant learning rate: the extra epoch trains, and the result equals a straight 2-epoch run."""
    from cgml_lightning.commands.train import run_train

    common = in_process_overrides("seed=7", "model.scheduler=null")
    run_train(hydra_job(tmp_path / "one", *common, "trainer.max_epochs=1"))
    first = tmp_path / "one" / "checkpoints" / "last.ckpt"
    run_train(hydra_job(tmp_path / "more", *common, f"ckpt_path={first}", "trainer.max_epochs=2"))
    before, after = load(first), load(tmp_path / "more" / "checkpoints" / "last.ckpt")
    assert after["global_step"] > before["global_step"]
    moved = max_abs_diff({k: v for k, v in before["state_dict"].items() if "latents" not in k},
                         {k: v for k, v in after["state_dict"].items() if "latents" not in k})
    assert moved > 1e-4, f"the resumed epoch did not change any weight (max |dw| = {moved:.2e})"
    run_train(hydra_job(tmp_path / "two", *common, "trainer.max_epochs=2"))
    assert_same_state(load(tmp_path / "two" / "checkpoints" / "last.ckpt"), after)


def test_resume_with_another_schedule_length_is_refused(hydra_job, tmp_path):
    """With the default cosine schedule, more epochs on resume would restore a schedule already annealed to 0:
    refused before training, naming max_epochs and init_from."""
    from cgml_lightning.commands.train import run_train

    common = in_process_overrides("seed=7")
    run_train(hydra_job(tmp_path / "one", *common, "trainer.max_epochs=1"))
    first = tmp_path / "one" / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=r"T_max=1 .* asks for 2.*trainer\.max_epochs.*init_from"):
        run_train(hydra_job(tmp_path / "more", *common, f"ckpt_path={first}", "trainer.max_epochs=2"))
    assert not (tmp_path / "more" / "checkpoints").exists()


# ---- 2. fine-tuning --------------------------------------------------------------------------------------------
def toy_module(num_samples: int, width: int = 128, seed: int = 0) -> CGMLModule:
    from cgml_lightning.data import ToyDataModule

    dm = ToyDataModule(num_samples=num_samples, seed=seed, val_fraction=0.05, test_fraction=0.05)
    torch.manual_seed(123)
    return CGMLModule(dm.info(), {"name": "mlp", "width": width, "depth": 3, "spectral_norm": False}, z_phase="paper",
                      latent_dim=10)


def copied_by_init_from(saved: dict) -> dict:
    """What init_from copies from a checkpoint's state_dict: its averaged weights where it kept them."""
    return {key: saved.get(f"ema.module.{key}", value) for key, value in saved.items()}


def test_init_weights_from_copies_weights_and_keeps_a_fresh_table(trained_ckpt):
    saved = load(trained_ckpt)["state_dict"]
    module = toy_module(num_samples=300)
    fresh = module.latents.detach().clone()
    assert fresh.shape == (270, 10) and latent_table(saved).shape == (460, 10)
    keys = module.init_weights_from(str(trained_ckpt), freeze=["generator.encoder"])
    assert keys and not any("latents" in k for k in keys)
    assert any(k.startswith("ema.module.") for k in saved)
    for key, value in module.state_dict().items():
        if "latents" not in key:                                  # the averaged weights, where the run kept them
            assert torch.equal(value, copied_by_init_from(saved)[key]), key
    assert torch.equal(module.latents, fresh)                     # the table is sized and drawn for the new data
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in module.named_parameters() if n.startswith("generator.encoder")} | {"latents"}

    # same data size: the checkpoint's table is still not copied (fine-tuning starts a fresh table)
    same = toy_module(num_samples=512)
    table = same.latents.detach().clone()
    same.init_weights_from(str(trained_ckpt))
    assert torch.equal(same.latents, table) and not torch.equal(same.latents, latent_table(saved))


def test_init_weights_from_refuses_other_shapes(trained_ckpt):
    module = toy_module(num_samples=300, width=32)
    first = next(k for k in module.state_dict() if k.startswith("generator.encoder") and k.endswith("weight"))
    with pytest.raises(ValueError) as err:
        module.init_weights_from(str(trained_ckpt))
    msg = str(err.value)
    assert f"{first}: checkpoint (128, 1) vs model (32, 1)" in msg, msg
    assert str(trained_ckpt) in msg


def test_init_weights_from_refuses_a_freeze_prefix_matching_nothing(trained_ckpt):
    module = toy_module(num_samples=300)
    with pytest.raises(ValueError, match=r"generator\.encodr.*matches no parameter"):
        module.init_weights_from(str(trained_ckpt), freeze=["generator.encodr"])


FINETUNE = ("data.num_samples=300", "data.seed=5", "finetune.freeze=[generator.encoder]", "trainer.max_epochs=2")


@pytest.fixture(scope="module")
def finetune_run(trained_ckpt, tmp_path_factory) -> Path:
    """`cgml-train init_from=CKPT finetune.freeze=[generator.encoder]` on a toy of another size, in-process,
    keeping its per-epoch checkpoints."""
    from cgml_lightning.commands.train import run_train

    out = tmp_path_factory.mktemp("finetune")
    cfg = compose_job(out, *in_process_overrides(*FINETUNE, f"init_from={trained_ckpt}",
                                                 "callbacks.model_checkpoint.save_top_k=-1"))
    try:
        run_train(cfg)
    finally:
        HydraConfig.instance().cfg = None
    return out


def test_finetune_freezes_and_sizes_the_table(trained_ckpt, finetune_run):
    init = copied_by_init_from(load(trained_ckpt)["state_dict"])
    tuned = load(finetune_run / "checkpoints" / "last.ckpt")
    state = tuned["state_dict"]
    assert latent_table(state).shape == (270, 10)                  # 300 rows - 5% val - 5% test
    assert tuned["global_step"] > 0 and tuned["epoch"] == 2
    encoder = [k for k in state if k.startswith("generator.encoder")]
    assert encoder
    for key in encoder:
        assert torch.equal(state[key], init[key]), f"frozen {key} changed"
    moved = [k for k in state if k.startswith("generator.decoder") and not torch.equal(state[k], init[k])]
    assert moved, "the decoder did not train"


def test_resuming_a_finetune_keeps_the_freeze(trained_ckpt, finetune_run, hydra_job, tmp_path, caplog):
    """Resuming a fine-tuning run with the same command plus ckpt_path must not unfreeze the frozen layers; init_from
    is then not applied, and a warning says so."""
    from cgml_lightning.commands.train import run_train

    start = finetune_run / "checkpoints" / "epoch_000.ckpt"
    cfg = hydra_job(tmp_path / "resumed", *in_process_overrides(*FINETUNE, f"init_from={trained_ckpt}",
                                                                f"ckpt_path={start}"))
    with caplog.at_level(logging.WARNING, logger="cgml_lightning"):
        run_train(cfg)
    assert f"resuming {start}: init_from={trained_ckpt} is not applied" in caplog.text
    state = load(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["state_dict"]
    at_start, init = load(start)["state_dict"], copied_by_init_from(load(trained_ckpt)["state_dict"])
    assert [k for k in state if k.startswith("generator.decoder") and not torch.equal(state[k], at_start[k])], \
        "the resumed fine-tune did not train at all"
    changed = [k for k in state if k.startswith("generator.encoder") and not torch.equal(state[k], init[k])]
    assert not changed, f"finetune.freeze was dropped on resume: {changed} trained"


# ---- 3. resume data check ----------------------------------------------------------------------------------------
def test_resume_on_other_data_is_refused(trained_ckpt, hydra_job, tmp_path):
    from cgml_lightning.commands.train import run_train

    cfg = hydra_job(tmp_path / "run", *in_process_overrides("seed=7", "data.seed=1", f"ckpt_path={trained_ckpt}",
                                                            "trainer.max_epochs=3"))
    with pytest.raises(ValueError) as err:
        run_train(cfg)
    msg = str(err.value)
    assert "other data" in msg and "fingerprint" in msg and "init_from" in msg, msg
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_on_another_number_of_processes_is_refused(trained_ckpt, hydra_job, tmp_path):
    """Each process takes its own batch: a one-process run resumed on two would go on with twice the total batch.
    devices=auto (Lightning's default) is one process where torch sees no GPU, as Lightning counts it."""
    from cgml_lightning.commands.train import run_train
    from cgml_lightning.runs import process_count

    gpus = torch.cuda.device_count()
    assert process_count(OmegaConf.create({})) == process_count(OmegaConf.create({"devices": "auto"})) == max(1, gpus)
    assert process_count(OmegaConf.create({"devices": "0,1", "num_nodes": 2, "accelerator": "gpu"})) == 4
    assert process_count(OmegaConf.create({"devices": 2, "accelerator": "cpu"})) == 2

    assert load(trained_ckpt)["world_size"] == 1
    cfg = hydra_job(tmp_path / "run", *in_process_overrides("seed=7", f"ckpt_path={trained_ckpt}", "trainer=ddp_sim",
                                                            "trainer.max_epochs=2", "model.ema_decay=0.9"))
    with pytest.raises(ValueError, match=r"trained on 1 process\(es\), this run starts 2 .*init_from"):
        run_train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_freeze_without_init_from_is_refused(trained_ckpt, hydra_job, tmp_path, caplog):
    """finetune.freeze without init_from= (or a resume) would freeze random weights; ckpt_path=last with init_from=
    fine-tunes on a fresh start (nothing to resume yet)."""
    from cgml_lightning.commands.train import run_train

    frozen = hydra_job(tmp_path / "frozen", *in_process_overrides("finetune.freeze=[generator]"))
    with pytest.raises(ValueError, match=r"finetune.freeze=\['generator'\] keeps the weights init_from= loads"):
        run_train(frozen)
    assert not (tmp_path / "frozen" / "checkpoints").exists()
    with caplog.at_level(logging.INFO, logger="cgml_lightning"):
        run_train(hydra_job(tmp_path / "last", *in_process_overrides("ckpt_path=last", f"init_from={trained_ckpt}",
                                                                     "trainer.max_epochs=1", "model.scheduler=null")))
    assert f"initialised weights from {trained_ckpt}" in caplog.text


# ---- 4. DDP on CPU: latent rows from every rank reach the checkpoint ------------------------------------------
def test_ddp_sim_saves_latents_from_every_rank(workdir, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random(301)
    y = np.stack([np.sign(rng.random(301) - 0.5) * x, x ** 2], axis=1)
    data = tmp_path / "ddp.npz"
    np.savez(data, x=x, y=y)
    run_dir = tmp_path / "ddp_run"
    overrides = ["experiment=toy", "data=npz", f"data.path={data}", "trainer=ddp_sim", "trainer.max_epochs=1"]
    t0 = time.time()
    run_cli("cgml-train", *overrides, f"hydra.run.dir={run_dir}", "eval.num_samples=2", "eval.num_inputs=8",
            cwd=workdir)
    elapsed = time.time() - t0
    ckpt = load(run_dir / "checkpoints" / "last.ckpt")
    table = latent_table(ckpt["state_dict"])

    # the initial state exactly as run_train builds it (seed_everything, datamodule, module)
    from cgml_lightning.runs import build_datamodule, build_module

    cfg = compose_job(tmp_path / "rebuild", *overrides)
    try:
        L.seed_everything(cfg.seed, workers=True)
        module = build_module(cfg, build_datamodule(cfg))
    finally:
        HydraConfig.instance().cfg = None
    initial = module.latents.detach()
    assert table.shape == initial.shape == (241, 10)
    # the rebuild is the real start: weights moved by at most ~lr per Adam step (1 step per rank here)
    assert ckpt["global_step"] == 2                                  # one batch per rank, two optimizers
    gen = {k: v for k, v in module.state_dict().items() if "latents" not in k and "latent_keys" not in k}
    assert max_abs_diff(gen, {k: ckpt["state_dict"][k] for k in gen}) < 2e-3
    unchanged = (table - initial).abs().amax(1) < 1e-6
    assert not unchanged.any(), (f"{int(unchanged.sum())}/{len(table)} latent rows kept their initial value: "
                                 f"rows updated on rank 1 were not saved")
    assert torch.allclose(table.norm(dim=1), torch.ones(len(table)), atol=1e-4)
    keys = ckpt["state_dict"]["latent_keys"]                         # table starts (MLP): each row's key, every rank's
    assert keys.shape[0] == 241 and torch.isfinite(keys).all()
    print(f"ddp_sim run took {elapsed:.1f}s")


# ---- 5. preemption -----------------------------------------------------------------------------------------------
def preempt(workdir: Path, run_dir: Path, signum: int) -> tuple[subprocess.Popen, str]:
    """Start a long toy run, wait until it finished an epoch, send signum, wait for the process to end."""
    log = run_dir.parent / f"{run_dir.name}.log"
    ckpts = run_dir / "checkpoints"
    with open(log, "w") as out:
        proc = subprocess.Popen([*script_command("cgml-train"), *TOY, "trainer.max_epochs=100000",
                                 "model.scheduler=null", "callbacks.model_checkpoint.save_last=false", f"hydra.run.dir={run_dir}"],
                                cwd=workdir, env=cli_env(workdir), stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 180
            while not list(ckpts.glob("epoch_*.ckpt")):
                assert proc.poll() is None, f"run ended early ({proc.returncode}):\n{log.read_text()[-3000:]}"
                assert time.time() < deadline, f"no epoch checkpoint after 180s:\n{log.read_text()[-3000:]}"
                time.sleep(0.2)
            time.sleep(0.5)
            assert not (ckpts / "last.ckpt").exists()                  # save_last=false: only preemption writes it
            proc.send_signal(signum)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return proc, log.read_text()


def resume_after_preemption(workdir: Path, run_dir: Path, output: str, name: str) -> None:
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file(), f"no last.ckpt after {name}:\n{output[-3000:]}"
    assert f"{name}: saved" in output, output[-3000:]
    state = load(last)
    assert state["global_step"] > 0 and state["optimizer_states"]
    epochs = state["epoch"] + 2
    resumed = run_dir.parent / f"{run_dir.name}_resumed"
    run_cli("cgml-train", *TOY, "model.scheduler=null", f"ckpt_path={last}", f"trainer.max_epochs={epochs}",
            f"hydra.run.dir={resumed}",
            cwd=workdir)
    metrics = json.loads((resumed / "metrics.json").read_text())
    assert metrics["epochs"] == epochs
    assert load(resumed / "checkpoints" / "last.ckpt")["global_step"] > state["global_step"]


def test_sigterm_saves_last_and_resumes(workdir):
    run_dir = workdir / "sigterm"
    proc, output = preempt(workdir, run_dir, signal.SIGTERM)
    assert not (run_dir / "metrics.json").exists()
    resume_after_preemption(workdir, run_dir, output, "SIGTERM")
    # a preempted run must not report success to the scheduler / workflow manager that started it
    assert proc.returncode != 0, f"preempted by SIGTERM yet exited {proc.returncode}"


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="no SIGUSR1 on this platform")
def test_sigusr1_saves_last_and_resumes(workdir):
    run_dir = workdir / "sigusr1"
    proc, output = preempt(workdir, run_dir, signal.SIGUSR1)
    assert proc.returncode != -signal.SIGUSR1, "SIGUSR1 killed the run (no handler installed)"
    resume_after_preemption(workdir, run_dir, output, "SIGUSR1")


# ---- 6. Optuna sweep (test_cli covers the plain -m sweep) ------------------------------------------------------
# ---- 7. safety -------------------------------------------------------------------------------------------------
def test_cli_refuses_os_system_callback(workdir, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    run_dir = tmp_path / "evil_run"
    proc = run_cli("cgml-train", "experiment=toy", "debug=fdr", "+callbacks.evil._target_=os.system",
                   "+callbacks.evil.command='touch PWNED'", f"hydra.run.dir={run_dir}", cwd=cwd, check=False)
    assert proc.returncode != 0
    assert "callbacks.evil._target_" in proc.stderr and "os.system" in proc.stderr, proc.stderr[-3000:]
    assert not (cwd / "PWNED").exists() and not (run_dir / "PWNED").exists()
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.json").exists()


class Booby:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __init__(self, flag: Path):
        self.flag = flag

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.flag))}",)


@pytest.fixture
def booby_ckpt(tmp_path) -> tuple[Path, Path]:
    flag = tmp_path / "PWNED"
    path = tmp_path / "trap.ckpt"
    torch.save({"cgml_module": "cgml", "epoch": 0, "global_step": 0, "hyper_parameters": {}, "state_dict": {},
                "payload": Booby(flag)}, path)
    torch.load(path, map_location="cpu", weights_only=False)           # the trap is armed ...
    assert flag.exists()
    flag.unlink()                                                      # ... and reset
    return path, flag


def test_booby_trapped_checkpoint_is_refused_in_process(booby_ckpt):
    from cgml_lightning.runs import check_resume, load_checkpoint

    path, flag = booby_ckpt
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|unsupported global"):
        load_checkpoint(str(path))
    assert not flag.exists()
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|unsupported global"):
        CGMLModule.load_from_checkpoint(path, map_location="cpu")
    assert not flag.exists()
    module = toy_module(num_samples=512)
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|unsupported global"):
        check_resume(str(path), module)
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|unsupported global"):
        module.init_weights_from(str(path))
    assert not flag.exists()


def test_booby_trapped_checkpoint_is_refused_by_cgml_eval(booby_ckpt, workdir):
    path, flag = booby_ckpt
    proc = run_cli("cgml-eval", f"ckpt_path={path}", f"hydra.run.dir={path.parent / 'eval'}", cwd=workdir,
                   check=False)
    assert proc.returncode != 0
    assert not flag.exists() and not (workdir / "PWNED").exists()
    assert not (path.parent / "eval" / "metrics.json").exists()


SECRET_WORDS = ("key", "token", "secret", "password", "api")


def config_keys(node, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in [f"{prefix}{key}", *config_keys(value, f"{prefix}{key}.")]]
    if isinstance(node, list):
        return [k for i, value in enumerate(node) for k in config_keys(value, f"{prefix}{i}.")]
    return []


def test_wandb_config_has_no_secret_and_run_is_finished(hydra_job, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from cgml_lightning.commands.train import run_train

    for name in ("WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = hydra_job(tmp_path / "run", "experiment=toy", "debug=fdr", "logger=wandb", "~callbacks.rich_progress_bar")
    logger_cfg = OmegaConf.to_container(cfg.logger, resolve=True)
    keys = config_keys(logger_cfg)
    assert "wandb.project" in keys
    assert not [k for k in keys if any(w in k.rsplit(".", 1)[-1].lower() for w in SECRET_WORDS)], keys
    assert logger_cfg["wandb"]["log_model"] is False
    calls = []
    real_finish = wandb.finish
    monkeypatch.setattr(wandb, "finish", lambda *a, **k: (calls.append(k.get("exit_code")), real_finish(*a, **k))[1])
    run_train(cfg)
    assert calls == [0], "wandb.finish() was not called after the job, or not as a success"
    assert (tmp_path / "run" / "metrics.json").is_file()

    def fails(*args, **kwargs):
        raise ValueError("evaluation refused")

    monkeypatch.setattr("cgml_lightning.commands.train.evaluate", fails)
    failing = hydra_job(tmp_path / "failing", "experiment=toy", "debug=fdr", "logger=wandb",
                        "~callbacks.rich_progress_bar")
    with pytest.raises(ValueError, match="evaluation refused"):
        run_train(failing)
    assert calls == [0, 1], "a failed run was finished as a success in W&B"


def test_a_resumed_run_goes_on_in_its_folders_last_wandb_run(tmp_path):
    from cgml_lightning.runs import previous_wandb_id

    assert previous_wandb_id(str(tmp_path)) is None                          # a fresh folder: a new W&B run
    for name in ("offline-run-20261207_171924-first1", "run-20261208_090000-second2", "debug-internal.log"):
        (tmp_path / "wandb" / name).mkdir(parents=True)
    (tmp_path / "wandb" / "latest-run").symlink_to(tmp_path / "wandb" / "offline-run-20261207_171924-first1")
    assert previous_wandb_id(str(tmp_path)) == "second2"


def test_tags_given_as_one_word_are_one_tag():
    from cgml_lightning.runs import tag_list

    assert tag_list("baseline") == ["baseline"]                 # tags=baseline, not its letters
    assert tag_list(OmegaConf.create(["a", "b"])) == ["a", "b"] and tag_list(None) == [] and tag_list([]) == []


# ---- 8. NaN guard ----------------------------------------------------------------------------------------------
def nan_setup(n: int = 64, batch_size: int = 16, **kwargs) -> tuple[CGMLModule, DataLoader]:
    torch.manual_seed(0)
    x = torch.rand(n, 1)
    y = torch.full((n, 3), float("nan"))
    info = {"kind": "vector", "x_shape": [1], "y_shape": [3], "num_train_samples": n, "mask_channel": False,
            "fingerprint": "nan-only"}
    module = CGMLModule(info, {"name": "mlp", "width": 16, "depth": 2}, z_phase="paper", latent_dim=4, z_steps=2, start_candidates=2,
                        dynamics_net={"width": 16, "depth": 2}, **kwargs)
    return module, DataLoader(IndexedDataset(x, y), batch_size=batch_size, shuffle=False)


def nan_trainer(root: Path, batches: int) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=batches, limit_val_batches=0,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=root)


def test_nonfinite_batch_is_skipped(tmp_path):
    module, loader = nan_setup(max_nonfinite_batches=1000)
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    trainer = nan_trainer(tmp_path, batches=1)
    trainer.fit(module, train_dataloaders=loader)
    assert trainer.state.finished and module.nonfinite_streak == 1
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed on a NaN batch"
    assert all(not opt.state for opt in trainer.optimizers), "an optimizer stepped on a NaN batch"


def test_nonfinite_streak_saves_and_stops(tmp_path):
    module, loader = nan_setup(max_nonfinite_batches=2)
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    trainer = nan_trainer(tmp_path, batches=4)
    with pytest.raises(FloatingPointError, match="2 batches in a row gave NaN/Inf") as err:
        trainer.fit(module, train_dataloaders=loader)
    path = tmp_path / "checkpoints" / "nonfinite_stop.ckpt"
    assert path.is_file() and str(path) in str(err.value)
    saved = load(path)
    for key, value in saved["state_dict"].items():
        assert torch.equal(value, before[key]), key                    # the last finite state
