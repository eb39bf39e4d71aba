"""Safety and recovery: no code from a config or a checkpoint, signals that leave a resumable checkpoint (alone and
under DDP), NaN weights that never reach a checkpoint, ckpt_path=last, atomic result files, and bad inputs and
checkpoints named in their errors."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from PIL import Image

from cgml_lightning import CGMLModule, RegressorModule
from cgml_lightning.callbacks import Preempted, PreemptionCheckpoint
from cgml_lightning.files import atomic_path, read_checkpoint, write_json
from cgml_lightning.instantiate import check_targets, datamodule_from_record, instantiate

from helpers import TOY, cli_env, compose_job, load, run_cli, script_command

DANGEROUS = ["torch.load", "torch.hub.load", "torch.fx.graph_module._exec_with_source",
             "torch.utils.cpp_extension.load_inline", "lightning.pytorch.core.saving.load_hparams_from_yaml",
             "hydra.utils.call", "builtins.eval", "torch.os.system"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("safety_cwd")


@pytest.fixture(scope="module")
def toy_ckpt(workdir) -> Path:
    run = workdir / "toy"
    run_cli("cgml-train", *TOY, "trainer.max_epochs=1", f"hydra.run.dir={run}", cwd=workdir)
    return run / "checkpoints" / "last.ckpt"


# ---- 1. instantiation from a registry of exact names ------------------------------------------------------------
@pytest.mark.parametrize("target", DANGEROUS)
def test_dangerous_targets_inside_allowed_packages_are_refused(target):
    with pytest.raises(ValueError, match=r"model\.optimizer\._target_=.*not a registered target"):
        check_targets({"model": {"optimizer": {"_target_": target}}})


def test_a_refused_target_never_runs(tmp_path):
    flag = tmp_path / "flag"
    code = f"open({str(flag)!r}, 'w').close()"
    with pytest.raises(ValueError, match="_exec_with_source"):
        instantiate({"_target_": "torch.fx.graph_module._exec_with_source", "src": code, "globals": {}})
    assert not flag.exists()


def test_the_shipped_and_package_targets_are_registered():
    check_targets({"a": {"_target_": "torch.optim.AdamW"}, "b": {"_target_": "lightning.Trainer"},
                   "c": {"_target_": "cgml_lightning.data.ToyDataModule"},
                   "d": {"_target_": "cgml_lightning.models.flow.FlowModule"},
                   "e": {"_target_": "cgml_lightning.callbacks.PreemptionCheckpoint"},
                   "f": {"_target_": "lightning.pytorch.loggers.WandbLogger"}})
    with pytest.raises(ValueError, match="not a registered target"):      # a package function is not a class
        check_targets({"x": {"_target_": "cgml_lightning.data.load_npz"}})


def test_cli_refuses_a_dangerous_target_on_the_command_line(workdir, tmp_path):
    flag = tmp_path / "flag"
    proc = run_cli("cgml-train", "experiment=toy", "debug=fdr", "+callbacks.evil._target_=torch.fx.graph_module._exec_with_source",
                   f"+callbacks.evil.src='open(\"{flag}\", \"w\")'", "+callbacks.evil.globals={}",
                   f"hydra.run.dir={tmp_path / 'run'}", cwd=workdir, check=False)
    assert proc.returncode != 0 and "callbacks.evil._target_" in proc.stderr, proc.stderr[-2000:]
    assert not flag.exists() and not (tmp_path / "run" / "checkpoints").exists()


def with_data_record(ckpt: Path, out: Path, data: object) -> Path:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state["hyper_parameters"]["data_info"]["data"] = data
    torch.save(state, out)
    return out


@pytest.mark.parametrize("record", [
    {"_target_": "torch.fx.graph_module._exec_with_source", "src": "open(FLAG, 'w')", "globals": {}},
    {"_target_": "cgml_lightning.data.ToyDataModule", "num_samples": {"_target_": "torch.fx.graph_module._exec_with_source",
                                                                      "src": "open(FLAG, 'w')", "globals": {}}},
])
def test_a_checkpoints_data_record_never_runs_code(toy_ckpt, tmp_path, workdir, record):
    flag = tmp_path / "flag"
    record = json.loads(json.dumps(record).replace("FLAG", repr(str(flag)).replace("'", '\\"')))
    trap = with_data_record(toy_ckpt, tmp_path / "trap.ckpt", record)
    with pytest.raises(ValueError, match="trap.ckpt.*(not one of the package's datamodules|_target_)"):
        datamodule_from_record(load(trap)["hyper_parameters"]["data_info"]["data"], str(trap))
    proc = run_cli("cgml-eval", f"ckpt_path={trap}", f"hydra.run.dir={tmp_path / 'eval'}", cwd=workdir, check=False)
    assert proc.returncode != 0 and "trap.ckpt" in proc.stderr, proc.stderr[-2000:]
    assert not flag.exists() and not (tmp_path / "eval" / "metrics.json").exists()


def test_a_checkpoints_data_record_is_rebuilt_by_name(toy_ckpt):
    dm = datamodule_from_record(load(toy_ckpt)["hyper_parameters"]["data_info"]["data"], "x.ckpt")
    assert type(dm).__name__ == "ToyDataModule" and dm.num_samples == 512


# ---- 2. signals: a resumable checkpoint at a step boundary, with the shipped callbacks ---------------------------
def wait_for(predicate, proc: subprocess.Popen, log: Path, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"run ended early ({proc.returncode}) waiting for {what}:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"no {what} after {timeout}s:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def start_long_run(workdir: Path, run_dir: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    log = run_dir.parent / f"{run_dir.name}.log"
    out = open(log, "w")
    proc = subprocess.Popen([*script_command("cgml-train"), *TOY, "trainer.max_epochs=100000", "model.scheduler=null",
                             *extra, f"hydra.run.dir={run_dir}"],
                            cwd=workdir, env=cli_env(workdir), stdout=out, stderr=subprocess.STDOUT)
    out.close()
    return proc, log


def finish(proc: subprocess.Popen, timeout: float = 120) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("name", ["SIGUSR2", "SIGUSR1", "SIGINT"])
def test_signal_saves_a_resumable_checkpoint(workdir, name):
    if not hasattr(signal, name):
        pytest.skip(f"no {name} on this platform")
    signum = getattr(signal, name)
    run_dir = workdir / name.lower()
    proc, log = start_long_run(workdir, run_dir)
    epoch_ckpt = lambda: list((run_dir / "checkpoints").glob("epoch_*.ckpt"))     # noqa: E731
    try:
        wait_for(epoch_ckpt, proc, log, "epoch checkpoint")
        time.sleep(0.5)
        proc.send_signal(signum)
    finally:
        code = finish(proc)
    output = log.read_text()
    assert code == 128 + signum, f"exit {code}:\n{output[-3000:]}"
    assert f"{name}: saved" in output and not (run_dir / "metrics.json").exists(), output[-3000:]
    logged = re.search(rf"{name}: saved .* after (\d+) training batches \(epoch \d+\)",
                       (run_dir / "train.log").read_text())
    saved = load(run_dir / "checkpoints" / "last.ckpt")
    assert saved["global_step"] % 2 == 0 and saved["global_step"] > 0    # two optimizer steps a batch: a boundary
    assert logged and int(logged.group(1)) == saved["global_step"] // 2   # the batches trained, as the logs count
    # nothing written after it (the cut epoch's validation and checkpoints would count the epoch as done)
    newest = max((run_dir / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns)
    assert newest.name == "last.ckpt", sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    # the same command with ckpt_path=last resumes from it, in the same run directory, and trains every batch of
    # every epoch: the cut epoch's rest included
    epochs = saved["epoch"] + 2
    run_cli("cgml-train", *TOY, "model.scheduler=null", "ckpt_path=last", f"trainer.max_epochs={epochs}",
            f"hydra.run.dir={run_dir}", cwd=workdir)
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == epochs
    best = load(next((run_dir / "checkpoints").glob("epoch_*.ckpt")))         # saved at the end of its epoch
    per_epoch = batches_done(best) // (best["epoch"] + 1)
    assert batches_done(best) == (best["epoch"] + 1) * per_epoch
    assert batches_done(load(run_dir / "checkpoints" / "last.ckpt")) == epochs * per_epoch


def batches_done(checkpoint: dict) -> int:
    return checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"]


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc to find the DDP rank's process")
def test_a_signal_to_one_ddp_rank_saves_on_all_and_exits(workdir, tmp_path):
    """ddp_sim: SIGUSR1 reaches rank 1 only; rank 0, which writes checkpoints, saves too, and both exit."""
    run_dir = tmp_path / "ddp"
    proc, log = start_long_run(workdir, run_dir, "trainer=ddp_sim")
    try:
        wait_for(lambda: list((run_dir / "checkpoints").glob("epoch_*.ckpt")), proc, log, "epoch checkpoint")
        (rank1,) = [c for c in children(proc.pid) if "LOCAL_RANK=1" in Path(f"/proc/{c}/environ").read_text()]
        os.kill(rank1, signal.SIGUSR1)
    finally:
        code = finish(proc)
    output = log.read_text()
    assert code == 128 + signal.SIGUSR1, f"exit {code}:\n{output[-3000:]}"
    assert "SIGUSR1: saved" in output, output[-3000:]
    assert load(run_dir / "checkpoints" / "last.ckpt")["global_step"] > 0
    assert not [c for c in children(proc.pid)]


class SignalAt(L.Callback):
    """Sends a signal to this process at the end of training batch `batch`."""

    def __init__(self, signum: int, batch: int):
        self.signum, self.batch = signum, batch

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == self.batch:
            os.kill(os.getpid(), self.signum)


def toy_fit(tmp_path: Path, callbacks: list, batches: int = 4, **trainer) -> tuple[L.Trainer, CGMLModule]:
    from cgml_lightning.data import ToyDataModule

    dm = ToyDataModule(num_samples=256, batch_size=32)
    dm.setup()
    module = CGMLModule(dm.info(), {"name": "mlp", "width": 16, "depth": 2}, z_phase="paper", latent_dim=4, z_steps=2,
                        start_candidates=1, dynamics_net={"width": 16, "depth": 2})
    fit = L.Trainer(accelerator="cpu", devices=1, limit_train_batches=batches, limit_val_batches=0,
                    logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                    callbacks=callbacks, **{"enable_checkpointing": False, "max_epochs": 1, **trainer})
    fit.fit(module, datamodule=dm)
    return fit, module


@pytest.mark.skipif(not hasattr(signal, "SIGUSR2"), reason="no SIGUSR2 on this platform")
def test_sigusr2_saves_then_hands_on_to_the_earlier_handler_which_is_restored(tmp_path):
    """submitit's SIGUSR2 handler re-queues the job: it must run after the checkpoint is on disk, once."""
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    seen = []

    def earlier(signum, frame):
        seen.append((signum, ckpt.is_file()))

    before = signal.signal(signal.SIGUSR2, earlier)
    usr1 = signal.getsignal(signal.SIGUSR1)
    try:
        with pytest.raises(Preempted) as stop:     # straight out: no end-of-epoch validation or checkpoint after it
            toy_fit(tmp_path, [PreemptionCheckpoint(tmp_path / "checkpoints"), SignalAt(signal.SIGUSR2, 1)])
        assert seen == [(signal.SIGUSR2, True)] and stop.value.signum == signal.SIGUSR2
        # signalled after batch 1's check: saved and stopped at the end of batch 2 (two optimizer steps a batch)
        assert load(ckpt)["global_step"] == 6
        assert signal.getsignal(signal.SIGUSR2) is earlier and signal.getsignal(signal.SIGUSR1) == usr1
    finally:
        signal.signal(signal.SIGUSR2, before)


def test_handlers_are_restored_after_a_run_that_fails(tmp_path):
    class Boom(L.Callback):
        def on_train_batch_end(self, *args):
            raise RuntimeError("boom")

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    with pytest.raises(RuntimeError, match="boom"):
        toy_fit(tmp_path, [PreemptionCheckpoint(tmp_path / "checkpoints"), Boom()])
    assert {s: signal.getsignal(s) for s in before} == before


# ---- 3. NaN weights never reach a checkpoint ---------------------------------------------------------------------
class PoisonAt(L.Callback):
    """Writes NaN into one weight at the end of training batch `batch` (what an overflowing step does)."""

    def __init__(self, batch: int):
        self.batch = batch

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx == self.batch:
            with torch.no_grad():
                next(module.generator.parameters()).view(-1)[0] = float("nan")


def test_nan_weights_stop_the_run_and_last_ckpt_keeps_the_last_finite_state(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    # a checkpoint after every batch (two optimizer steps): the one after the poisoned batch is refused
    saver = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, every_n_train_steps=2, save_top_k=0)
    with pytest.raises(FloatingPointError, match="not saving a checkpoint at step 14: generator.* NaN/Inf"):
        toy_fit(tmp_path, [saver, PoisonAt(batch=2)], max_epochs=2, enable_checkpointing=True)
    last = load(tmp_path / "checkpoints" / "last.ckpt")
    assert all(torch.isfinite(v).all() for k, v in last["state_dict"].items() if v.is_floating_point())
    assert last["global_step"] == 2 * (4 + 2)               # epoch 0's 4 batches + batches 0 and 1 of epoch 1
    # without a checkpoint due, the weight check after the step stops the run
    with pytest.raises(FloatingPointError, match="an optimizer step made the weights NaN/Inf .batch 2, step 14"):
        toy_fit(tmp_path / "unsaved", [PoisonAt(batch=2)], max_epochs=2)


def test_a_nonfinite_state_is_never_saved(tmp_path):
    _, module = toy_fit(tmp_path, [], batches=1)
    trainer = module.trainer
    trainer.save_checkpoint(tmp_path / "good.ckpt")
    with torch.no_grad():
        next(module.dynamics.parameters()).view(-1)[0] = float("inf")
    good = (tmp_path / "good.ckpt").read_bytes()
    with pytest.raises(FloatingPointError, match="not saving a checkpoint.*dynamics"):
        trainer.save_checkpoint(tmp_path / "good.ckpt")
    assert (tmp_path / "good.ckpt").read_bytes() == good


# ---- 4. ckpt_path=last ------------------------------------------------------------------------------------------
def test_ckpt_path_last_starts_fresh_then_resumes(tmp_path):
    from cgml_lightning.commands.train import run_train

    common = [*TOY, "~callbacks.rich_progress_bar", "logger=none", "model.scheduler=null", "ckpt_path=last"]
    try:
        run_train(compose_job(tmp_path / "run", *common, "trainer.max_epochs=1"))          # nothing saved yet
        first = load(tmp_path / "run" / "checkpoints" / "last.ckpt")
        run_train(compose_job(tmp_path / "run", *common, "trainer.max_epochs=2"))          # the re-queued job
    finally:
        HydraConfig.instance().cfg = None
    second = load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert second["epoch"] == first["epoch"] + 1 and second["global_step"] == 2 * first["global_step"] > 0


def test_a_moved_run_folder_resumes_into_its_own_checkpoints(tmp_path):
    """A run folder moved (or copied) elsewhere and resumed there replaces its last.ckpt and its earlier best, as
    it would have in place: no last-v1.ckpt beside them, no stale best left over."""
    import shutil

    from cgml_lightning.commands.train import run_train

    common = [*TOY, "~callbacks.rich_progress_bar", "logger=none", "model.scheduler=null", "ckpt_path=last"]
    try:
        run_train(compose_job(tmp_path / "run", *common, "trainer.max_epochs=1"))
        shutil.move(tmp_path / "run", tmp_path / "moved")
        run_train(compose_job(tmp_path / "moved", *common, "trainer.max_epochs=3"))
    finally:
        HydraConfig.instance().cfg = None
    names = sorted(p.name for p in (tmp_path / "moved" / "checkpoints").glob("*.ckpt"))
    assert names[-1] == "last.ckpt" and len(names) == 2 and names[0].startswith("epoch_"), names
    assert load(tmp_path / "moved" / "checkpoints" / "last.ckpt")["epoch"] == 3


def test_run_checkpoint_state_resumes_across_classes_and_never_takes_over_another_run(tmp_path):
    """A run saved with Lightning's ModelCheckpoint resumes in place under RunCheckpoint with its state (no
    last-v1.ckpt); a checkpoint of run A resumed into run B's folder is refused, every file of B's as it was."""
    from cgml_lightning.commands.train import run_train

    common = [*TOY, "~callbacks.rich_progress_bar", "logger=none", "model.scheduler=null"]
    plain = "callbacks.model_checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint"
    try:
        run_train(compose_job(tmp_path / "plain", *common, plain, "trainer.max_epochs=1"))
        run_train(compose_job(tmp_path / "plain", *common, "ckpt_path=last", "trainer.max_epochs=2"))
        for run in ("a", "b"):
            run_train(compose_job(tmp_path / run, *common, "trainer.max_epochs=1"))
        b_files = {p: p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()}
        with pytest.raises(ValueError, match="is another folder's"):
            run_train(compose_job(tmp_path / "b", *common, f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}",
                                  "trainer.max_epochs=4"))
    finally:
        HydraConfig.instance().cfg = None
    assert not (tmp_path / "plain" / "checkpoints" / "last-v1.ckpt").exists()
    assert {p: p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()} == b_files


def test_ckpt_path_last_skips_a_checkpoint_cut_short(tmp_path, caplog):
    """A job killed while saving leaves last.ckpt cut short: ckpt_path=last resumes from the newest whole one and
    names the other; with no whole one it refuses rather than training from scratch over them."""
    import os

    from cgml_lightning.files import newest_checkpoint

    torch.save({"state_dict": {"w": torch.ones(3)}}, tmp_path / "epoch_001.ckpt")
    whole = (tmp_path / "epoch_001.ckpt").read_bytes()
    (tmp_path / "last.ckpt").write_bytes(whole[: len(whole) // 2])
    os.utime(tmp_path / "epoch_001.ckpt", (1, 1))                             # the older file
    assert newest_checkpoint(tmp_path) == tmp_path / "epoch_001.ckpt"
    assert "last.ckpt: not a whole checkpoint" in caplog.text
    (tmp_path / "epoch_001.ckpt").write_bytes(whole[:-10])
    with pytest.raises(ValueError, match=r"none of its checkpoints is whole \(epoch_001.ckpt, last.ckpt\)"):
        newest_checkpoint(tmp_path)
    assert newest_checkpoint(tmp_path / "empty") is None


def test_ckpt_path_last_takes_the_checkpoint_with_the_most_training(tmp_path):
    """A copy that does not keep file times can make an earlier epoch's checkpoint the newest file: ckpt_path=last
    still resumes from the one whose global_step is highest; of equal steps, the newer file."""
    import os

    from cgml_lightning.files import newest_checkpoint

    for name, step, mtime in (("last.ckpt", 56, 1), ("epoch_003.ckpt", 48, 3), ("epoch_002.ckpt", 32, 2)):
        torch.save({"global_step": step, "state_dict": {"w": torch.ones(3)}}, tmp_path / name)
        os.utime(tmp_path / name, (mtime, mtime))
    assert newest_checkpoint(tmp_path) == tmp_path / "last.ckpt"
    torch.save({"global_step": 56, "state_dict": {}}, tmp_path / "epoch_004.ckpt")
    os.utime(tmp_path / "epoch_004.ckpt", (5, 5))
    assert newest_checkpoint(tmp_path) == tmp_path / "epoch_004.ckpt"
    torch.save({"global_step": 60, "state_dict": {}, "hook": os.getcwd}, tmp_path / "foreign.ckpt")   # pickled code
    with pytest.raises(ValueError, match=r"foreign.ckpt: holds objects that a weights-only load refuses"):
        newest_checkpoint(tmp_path)


# ---- 5. atomic result files -------------------------------------------------------------------------------------
def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"psnr": 20.0})
    with pytest.raises(TypeError):
        write_json(path, {"psnr": object()})                 # fails half-way through serialising
    assert json.loads(path.read_text()) == {"psnr": 20.0}
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "grid.png") as tmp:
        Image.new("RGB", (4, 4)).save(tmp)
        raise RuntimeError("interrupted")
    assert not (tmp_path / "grid.png").exists() and list(tmp_path.iterdir()) == [path]


# ---- 6. bad data, named -------------------------------------------------------------------------------------------
def test_npz_values_beyond_float32_are_refused(tmp_path):
    from cgml_lightning.data import load_npz

    x = np.linspace(0, 1, 10)
    y = np.ones((10, 2))
    y[4, 1] = 1e39                                             # finite in float64, Inf in float32
    np.savez(tmp_path / "big.npz", x=x, y=y)
    with pytest.raises(ValueError, match=r"big\.npz: array 'y' .*float32.*sample 4"):
        load_npz(tmp_path / "big.npz")
    np.savez(tmp_path / "empty.npz", x=np.zeros((10, 0)), y=y[:, :1])
    with pytest.raises(ValueError, match=r"empty\.npz: array 'x' has shape \(10, 0\)"):
        load_npz(tmp_path / "empty.npz")


def test_evaluating_an_empty_test_split_is_an_error():
    from cgml_lightning.data import DigitsDataModule
    from cgml_lightning.evaluation import evaluate
    from cgml_lightning.plots import save_samples_png

    dm = DigitsDataModule(max_train_samples=16, test_fraction=0.0)
    dm.setup()
    module = RegressorModule(dm.info(), {"name": "unet", "width": 8, "depth": 1})
    with pytest.raises(ValueError, match="DigitsDataModule: the test split is empty"):
        evaluate(module, dm, num_samples=2, num_inputs=4)
    with pytest.raises(ValueError, match="DigitsDataModule: the test split is empty"):
        save_samples_png(module, dm, "unused.png")


def test_crop_keeps_masks_and_hints_sharp(tmp_path):
    from cgml_lightning.user_inputs import load_hint, load_mask

    mask = np.zeros((32, 48), np.uint8)                         # a 2x2 hidden patch in a 48x32 (W x H) picture
    mask[10:12, 20:22] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    hole = load_mask(tmp_path / "mask.png", (16, 16), crop=True)   # shorter side 32 -> 16: the patch becomes 1x1
    assert hole.shape == (1, 16, 16) and int(hole.sum()) == 1
    hint = np.zeros((32, 48, 4), np.uint8)
    hint[10:12, 20:22] = [255, 0, 0, 255]
    Image.fromarray(hint, "RGBA").save(tmp_path / "hint.png")
    colour, known = load_hint(tmp_path / "hint.png", 3, (16, 16), crop=True)
    assert int(known.sum()) == 1 and colour[0][known[0] > 0].item() == 1.0
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "square.png")
    with pytest.raises(Exception, match=r"mask: .*square\.png"):
        load_mask(tmp_path / "square.png", (16, 16), crop=True)      # all black: hides nothing, named


# ---- 7. checkpoint errors name the file and the cause -------------------------------------------------------------
def test_checkpoint_errors_name_the_file(toy_ckpt, tmp_path):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(toy_ckpt.read_bytes()[:2000])
    with pytest.raises(ValueError, match=r"truncated\.ckpt: not a readable checkpoint"):
        CGMLModule.load_from_checkpoint(truncated)
    listed = tmp_path / "list.ckpt"
    torch.save([1, 2, 3], listed)
    with pytest.raises(ValueError, match=r"list\.ckpt: holds a list, not a checkpoint"):
        read_checkpoint(listed)
    with pytest.raises(FileNotFoundError, match=r"missing\.ckpt: no such checkpoint"):
        CGMLModule.load_from_checkpoint(tmp_path / "missing.ckpt")
    for name, data in (("random.ckpt", b"q" + bytes(100)), ("text.ckpt", b"hi\n")):
        (tmp_path / name).write_bytes(data)                 # torch's legacy loader: IndexError, KeyError
        with pytest.raises(ValueError, match=rf"{name}: not a readable checkpoint"):
            read_checkpoint(tmp_path / name)
    with pytest.raises(IsADirectoryError, match=rf"a folder, not a checkpoint file.*{tmp_path / 'checkpoints'}"):
        read_checkpoint(tmp_path)                           # a run's folder given for its checkpoint
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "image.png")
    with pytest.raises(ValueError, match=r"image\.png: not a cgml-lightning checkpoint") as err:
        read_checkpoint(tmp_path / "image.png")            # a weights-only load refuses it, as an unpickler error
    assert "weights_only" not in str(err.value)            # torch's advice to load it without the guard: not passed on


def test_a_regressor_checkpoint_names_the_class_to_use(tmp_path):
    from cgml_lightning.data import ToyDataModule
    from cgml_lightning.models import ConditionalModule

    dm = ToyDataModule(num_samples=64)
    module = RegressorModule(dm.info(), {"name": "mlp", "width": 8, "depth": 1})
    trainer = L.Trainer(accelerator="cpu", max_epochs=0, logger=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "regressor.ckpt")
    with pytest.raises(ValueError, match=r"regressor\.ckpt: holds a RegressorModule \(model=regressor\), not a "
                                         r"CGMLModule; load it with RegressorModule\.load_from_checkpoint"):
        CGMLModule.load_from_checkpoint(tmp_path / "regressor.ckpt")
    assert type(ConditionalModule.load_from_checkpoint(tmp_path / "regressor.ckpt")) is RegressorModule


def test_the_slurm_launcher_runs_one_task_per_device():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher not installed")
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="cgml_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8",
                                          "trainer.num_nodes=2"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (8, 8, 2)
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0      # re-queued after a timeout signal


def test_a_trainer_this_machine_or_the_module_cannot_run_is_refused_first(tmp_path, monkeypatch):
    """A GPU trainer without a GPU, a sharded strategy, and a multirun of several processes per job under submitit's
    local launcher are named before any data is read, each with the trainer to use instead."""
    from cgml_lightning.runs import check_trainer, device_count

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [device_count(d, "gpu") for d in (2, [0, 1, 3], "0,1", "-1", -1, "auto", "3")] == [2, 3, 2, 4, 4, 4, 3]
    assert device_count("auto", "cpu") == 1
    try:
        cfg = compose_job(tmp_path / "gpu", "trainer=ddp")
        with pytest.raises(ValueError, match=r"trainer.accelerator=gpu .* sees no GPU; .* trainer=cpu"):
            check_trainer(cfg.trainer)
        cfg = compose_job(tmp_path / "fsdp", "trainer=ddp_sim", "trainer.strategy=fsdp")
        with pytest.raises(ValueError, match=r"trainer.strategy=fsdp: a sharded strategy .* use trainer=ddp"):
            check_trainer(cfg.trainer)
        check_trainer(compose_job(tmp_path / "sim", "trainer=ddp_sim").trainer)          # two CPU processes: fine
        for value, shown in (("30s", "'30s'"), ("600", "600"), ("0:0:10:0", "'0:0:10:0'")):   # Lightning's reading
            cfg = compose_job(tmp_path / "time", f"trainer.max_time={value}")
            with pytest.raises(ValueError, match=f"trainer.max_time must be DD:HH:MM:SS .*; got {shown}$"):
                check_trainer(cfg.trainer)
        check_trainer(compose_job(tmp_path / "ten", "trainer.max_time=00:00:10:00").trainer)
        if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher"):
            local = ["hydra/launcher=submitit_local", "trainer=ddp_sim"]
            check_trainer(compose_job(tmp_path / "single", *local).trainer)         # no multirun: no launcher
            cfg = compose_job(tmp_path / "local", *local, "hydra.mode=MULTIRUN")
            with pytest.raises(ValueError, match=r"submitit_local runs each job as one process, and "
                                                 r"trainer.devices=2 .*\(trainer=cpu"):
                check_trainer(cfg.trainer)
            check_trainer(compose_job(tmp_path / "one", "hydra/launcher=submitit_local", "hydra.mode=MULTIRUN").trainer)
    finally:
        HydraConfig.instance().cfg = None


def test_a_negative_seed_is_refused_before_training(tmp_path):
    from cgml_lightning.commands.train import run_train

    try:
        with pytest.raises(ValueError, match="seed must be a whole number, 0 or more; got -1"):
            run_train(compose_job(tmp_path / "run", *TOY, "seed=-1"))
    finally:
        HydraConfig.instance().cfg = None
    assert not (tmp_path / "run" / "checkpoints").exists()
