"""Callbacks: sample pictures each validation epoch, a checkpoint on a cluster's stop signals, and Lightning's
ModelCheckpoint following a moved run folder."""
from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from cgml_lightning.plots import save_samples_png
from cgml_lightning.runs import log_picture, logged_step

__all__ = ["SampleGrid", "PreemptionCheckpoint", "RunCheckpoint"]

log = logging.getLogger("cgml_lightning")


class Preempted(Exception):
    """Training stopped on a signal after PreemptionCheckpoint saved; cgml-train exits 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(f"stopped on {signal.Signals(signum).name}")
        self.signum = signum


class SampleGrid(L.Callback):
    """Writes DIRPATH/epoch_XXX.png (input | N samples | truth, or the toy plot) every `every_n_epochs` validations and
    gives it, captioned, to the loggers that take images (W&B, TensorBoard)."""

    def __init__(self, dirpath: str, num_inputs: int = 8, num_samples: int = 8, seed: int = 0, every_n_epochs: int = 1):
        self.dirpath, self.num_inputs, self.num_samples, self.seed = Path(dirpath), num_inputs, num_samples, seed
        self.every_n_epochs = every_n_epochs

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        last = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
        if trainer.sanity_checking or trainer.datamodule is None or (
                (trainer.current_epoch + 1) % self.every_n_epochs and not last):
            return
        path = save_samples_png(module, trainer.datamodule, self.dirpath / f"epoch_{trainer.current_epoch:03d}.png",
                                self.num_inputs, self.num_samples, self.seed)
        rows = (f"one row per test input: input | {self.num_samples} samples | truth"
                if trainer.datamodule.kind == "image" else "samples (red) against x, true modes (black) where known")
        log_picture(trainer.loggers, "samples", path, f"epoch {trainer.current_epoch}: {rows}",
                    logged_step(trainer))


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint that follows its run folder when the folder moves: resuming a checkpoint that lies
    in this folder, though the state in it names another (the run was moved or copied), it takes over the files that
    state recorded under their new paths, so it replaces last.ckpt and the earlier best instead of writing
    last-v1.ckpt beside a stale best. A checkpoint from another run's folder keeps Lightning's own behaviour (only
    best_model_path is reloaded). Its state is saved under ModelCheckpoint's key, so either class resumes the
    other's."""

    PATH_KEYS = ("best_model_path", "kth_best_model_path", "last_model_path")

    @property
    def state_key(self) -> str:
        return "ModelCheckpoint" + super().state_key.removeprefix(type(self).__qualname__)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.run_trainer = trainer                     # its ckpt_path, set before the callbacks' states are restored

    def load_state_dict(self, state_dict: dict) -> None:
        was, now = state_dict.get("dirpath"), self.dirpath
        resumed = getattr(getattr(self, "run_trainer", None), "ckpt_path", None)
        if was and now and was != now and resumed and Path(resumed).resolve().parent == Path(now).resolve():
            def here(path: str) -> str:
                return str(Path(now) / Path(path).relative_to(was)) if path and Path(path).is_relative_to(was) else path

            state_dict = {**state_dict, "dirpath": now,
                          **{key: here(state_dict[key]) for key in self.PATH_KEYS if key in state_dict},
                          "best_k_models": {here(p): v for p, v in (state_dict.get("best_k_models") or {}).items()}}
        super().load_state_dict(state_dict)


def progress(trainer: L.Trainer, in_batch_end: bool = False) -> str:
    """Where a run stands, in the training batches its logs count (not optimizer steps, several per cGML batch);
    in a batch's end hook that batch is trained but not yet counted."""
    return f"after {logged_step(trainer) + int(in_batch_end)} training batches (epoch {trainer.current_epoch})"


class PreemptionCheckpoint(L.Callback):
    """Save DIRPATH/last.ckpt at the next training-step boundary and stop, on a cluster's warning signals
    (SIGUSR1; SIGUSR2, which submitit sends before a time limit; SIGTERM) and on Ctrl-C (SIGINT).

    Every rank decides together (one max-reduction of the request flag per step), so a signal that reaches one
    rank of a DDP job saves and stops them all at the same step. After the save, SIGUSR1 and SIGUSR2 go on to
    the handler that was there before (e.g. submitit's, which re-queues the job); a second Ctrl-C interrupts at
    once. The handlers are set when training starts (after Lightning's own) and the earlier ones come back
    when the run ends. `ckpt_path=last` resumes.
    """

    SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT")

    def __init__(self, dirpath: str, filename: str = "last.ckpt"):
        self.path = Path(dirpath) / filename
        self.received: int | None = None            # the signal number this process got, until the save
        self.preempted: int | None = None           # the signal the run stopped on (raised as Preempted)
        self._previous: dict[int, object] = {}

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.received = self.preempted = None
        if threading.current_thread() is not threading.main_thread():
            return                                   # signal handlers can only be set from the main thread
        for name in self.SIGNALS:
            if hasattr(signal, name):
                signum = getattr(signal, name)
                self._previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._request)

    def _request(self, signum: int, frame) -> None:
        if signum == signal.SIGINT:
            if self.received is not None:            # Ctrl-C twice: stop now, without a checkpoint
                raise KeyboardInterrupt
            print("\n[cgml] Ctrl-C: saving at the end of this training step (press again to abort)", flush=True)
        self.received = signum

    def restore_handlers(self) -> None:
        """Put back the earlier handlers where ours is still installed (Lightning's teardown may have already)."""
        for signum, handler in self._previous.items():
            if signal.getsignal(signum) == self._request:
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args) -> None:
        signum = self.received or 0
        if trainer.world_size > 1:                    # any rank's signal stops them all, at this same step
            got = torch.tensor(float(signum), device=module.device)
            signum = int(trainer.strategy.reduce(got, reduce_op="max").item())
        if not signum or self.preempted:
            return
        trainer.save_checkpoint(self.path)
        self.preempted, self.received = signum, None
        if trainer.is_global_zero:
            log.warning("%s: saved %s %s; resume with ckpt_path=last (or ckpt_path=%s)", signal.Signals(signum).name,
                        self.path, progress(trainer, in_batch_end=True), self.path)
        previous = self._previous.get(signum)
        self.restore_handlers()
        if callable(previous) and signum not in (signal.SIGINT, signal.SIGTERM):   # submitit re-queues on SIGUSR2
            previous(signum, None)
        # stop here: a stop request (should_stop) would still run the epoch's validation and checkpoints, whose
        # files, newer than this one and counting the cut epoch as done, ckpt_path=last would then resume from
        raise Preempted(signum)

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException) and not self.preempted:   # SIGTERM outside a training step
            trainer.save_checkpoint(self.path)
            self.preempted = signal.SIGTERM
            if trainer.is_global_zero:
                log.warning("SIGTERM: saved %s %s; resume with ckpt_path=last", self.path, progress(trainer))
        self.restore_handlers()

    def teardown(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        self.restore_handlers()
