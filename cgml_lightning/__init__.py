"""cgml-lightning: Conditional Generative Modeling via Learning the Latent Space (ICLR 2021) on PyTorch Lightning."""
import os

from omegaconf import OmegaConf

from cgml_lightning.models import CGMLModule, ConditionalModule, RegressorModule

OmegaConf.register_new_resolver("cgml.cwd", os.getcwd, replace=True)     # paths.root_dir in the configs

__version__ = "0.1.0"
__all__ = ["CGMLModule", "ConditionalModule", "RegressorModule", "__version__"]
