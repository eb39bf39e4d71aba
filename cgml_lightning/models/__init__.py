from cgml_lightning.models.base import ConditionalModule
from cgml_lightning.models.cgan import CGANModule
from cgml_lightning.models.cgml import CGMLModule
from cgml_lightning.models.cimle import CIMLEModule
from cgml_lightning.models.cvae import CVAEModule
from cgml_lightning.models.flow import FlowModule
from cgml_lightning.models.regressor import RegressorModule

MODULES = {"cgml": CGMLModule, "regressor": RegressorModule, "cvae": CVAEModule, "cgan": CGANModule,
           "flow": FlowModule, "cimle": CIMLEModule}

__all__ = ["ConditionalModule", "CGMLModule", "RegressorModule", "CVAEModule", "CGANModule", "FlowModule", "CIMLEModule", "MODULES"]
