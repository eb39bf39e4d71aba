from cgml_lightning.data.base import ArrayDataModule, DegradedDataset, IndexedDataset
from cgml_lightning.data.degradations import Degradation, degrade
from cgml_lightning.data.digits import DigitsDataModule
from cgml_lightning.data.fashion_mnist import FashionMNISTDataModule
from cgml_lightning.data.folders import ImageFolderDataModule, PairedFolderDataModule
from cgml_lightning.data.npz import NpzDataModule, load_npz
from cgml_lightning.data.streaming import StreamingDataModule
from cgml_lightning.data.toy import ToyDataModule

__all__ = ["ArrayDataModule", "IndexedDataset", "DegradedDataset", "DigitsDataModule", "NpzDataModule", "ToyDataModule",
           "load_npz", "Degradation", "degrade", "FashionMNISTDataModule", "ImageFolderDataModule",
           "PairedFolderDataModule", "StreamingDataModule"]
