from cgml_lightning.modules.base import ConditionalModule
from cgml_lightning.modules.cgan import CGANModule
from cgml_lightning.modules.cgml import CGMLModule
from cgml_lightning.modules.cvae import CVAEModule
from cgml_lightning.modules.flow import FlowModule
from cgml_lightning.modules.regressor import RegressorModule

MODULES = {"cgml": CGMLModule, "regressor": RegressorModule, "cvae": CVAEModule, "cgan": CGANModule,
           "flow": FlowModule}

__all__ = ["ConditionalModule", "CGMLModule", "RegressorModule", "CVAEModule", "CGANModule", "FlowModule", "MODULES"]
