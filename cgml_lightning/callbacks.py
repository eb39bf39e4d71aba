"""Callbacks: sample pictures written each validation epoch, into the run dir and to loggers that take images."""
from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from cgml_lightning.plots import save_samples_png


class SampleGrid(L.Callback):
    """Writes DIRPATH/epoch_XXX.png (input | N samples | truth, or the toy plot) every `every_n_epochs` validations."""

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
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):                      # W&B
                logger.log_image(key="samples", images=[str(path)], step=trainer.global_step)


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM or SIGUSR1, save DIRPATH/last.ckpt at the next step boundary (never between the z- and
    w-phases: both run inside one training_step) and stop; `ckpt_path=DIRPATH/last.ckpt` resumes.

    SIGTERM: Lightning notes it, finishes the step and raises SIGTERMException, which reaches on_exception.
    SIGUSR1: under SLURM with auto-requeue Lightning saves and requeues by itself; elsewhere this callback
    catches it and stops after the step.
    """

    def __init__(self, dirpath: str, filename: str = "last.ckpt"):
        self.path = Path(dirpath) / filename
        self.requested = False
        self.preempted = False          # read by cgml-train: a preempted run exits non-zero, without metrics

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        import signal

        from lightning.fabric.plugins.environments import SLURMEnvironment

        env = trainer._accelerator_connector.cluster_environment
        if not (isinstance(env, SLURMEnvironment) and env.auto_requeue) and hasattr(signal, "SIGUSR1"):
            previous = signal.getsignal(signal.SIGUSR1)

            def request(signum, frame):
                self.requested = True
                if callable(previous):
                    previous(signum, frame)

            signal.signal(signal.SIGUSR1, request)

    def _save_and_report(self, trainer: L.Trainer, why: str) -> None:
        trainer.save_checkpoint(self.path)
        if trainer.is_global_zero:
            print(f"[cgml] {why}: saved {self.path} at step {trainer.global_step}; resume with ckpt_path={self.path}",
                  flush=True)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args) -> None:
        if self.requested:
            self.requested = False
            self._save_and_report(trainer, "SIGUSR1")
            self.preempted = True
            trainer.should_stop = True

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException):
            self._save_and_report(trainer, "SIGTERM")
