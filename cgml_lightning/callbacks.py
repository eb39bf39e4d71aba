"""Callbacks: sample pictures written each validation epoch, into the run dir and to loggers that take images."""
from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from cgml_lightning.plots import save_samples_png


class SampleGrid(L.Callback):
    """Writes DIRPATH/epoch_XXX.png (input | N samples | truth, or the toy plot) after each validation epoch."""

    def __init__(self, dirpath: str, num_inputs: int = 8, num_samples: int = 8, seed: int = 0):
        self.dirpath, self.num_inputs, self.num_samples, self.seed = Path(dirpath), num_inputs, num_samples, seed

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.datamodule is None:
            return
        path = save_samples_png(module, trainer.datamodule, self.dirpath / f"epoch_{trainer.current_epoch:03d}.png",
                                self.num_inputs, self.num_samples, self.seed)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):                      # W&B
                logger.log_image(key="samples", images=[str(path)], step=trainer.global_step)
