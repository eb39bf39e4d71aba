"""cgml-lightning: Conditional Generative Modeling via Learning the Latent Space (ICLR 2021) on PyTorch Lightning."""
from cgml_lightning.models import CGMLModule, ConditionalModule, RegressorModule

__version__ = "0.1.0"
__all__ = ["CGMLModule", "ConditionalModule", "RegressorModule", "__version__"]
