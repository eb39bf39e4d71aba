from cgml_lightning.modules.base import ConditionalModule
from cgml_lightning.modules.cgml import CGMLModule
from cgml_lightning.modules.regressor import RegressorModule

MODULES = {"cgml": CGMLModule, "regressor": RegressorModule}

__all__ = ["ConditionalModule", "CGMLModule", "RegressorModule", "MODULES"]
