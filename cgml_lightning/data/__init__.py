from cgml_lightning.data.base import ArrayDataModule, DegradedDataset, IndexedDataset
from cgml_lightning.data.degradations import Degradation, degrade
from cgml_lightning.data.digits import DigitsDataModule
from cgml_lightning.data.fashion_mnist import FashionMNISTDataModule
from cgml_lightning.data.folders import ImageFolderDataModule, PairedFolderDataModule
from cgml_lightning.data.npz import NpzDataModule, load_npz
from cgml_lightning.data.toy import ToyDataModule

__all__ = ["ArrayDataModule", "IndexedDataset", "DegradedDataset", "DigitsDataModule", "NpzDataModule", "ToyDataModule",
           "load_npz", "Degradation", "degrade", "FashionMNISTDataModule", "ImageFolderDataModule",
           "PairedFolderDataModule", "StreamingDataModule"]


def __getattr__(name: str):
    """StreamingDataModule on first use: `python -m cgml_lightning.data.streaming` then runs a module that this package
    has not imported yet (runpy warns otherwise)."""
    if name == "StreamingDataModule":
        from cgml_lightning.data.streaming import StreamingDataModule
        return StreamingDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
