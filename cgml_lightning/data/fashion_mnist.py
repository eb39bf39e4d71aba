"""Fashion-MNIST (28x28 grey, 10 classes) from its idx files, without torchvision; any image task via data.task.

Looks in data_dir, data_dir/FashionMNIST/raw (torchvision's layout) and Debian's /usr/share/datasets/fashion-mnist
(`apt-get install dataset-fashion-mnist`); `download=true` fetches the four files into data_dir.
Official train/test split; val is carved from train with split_seed. Labels stay in `self.labels[split]` and
ride in the batches as "label". Random degradations (rects, strokes, noise) are drawn per training draw and fixed
per sample for val and test (see data/base.py).
"""
from __future__ import annotations

import gzip
import hashlib
import logging
import struct
import urllib.request
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from cgml_lightning.data.base import ArrayDataModule, DegradedDataset, IndexedDataset
from cgml_lightning.data.degradations import Degradation

log = logging.getLogger(__name__)

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
MIRRORS = ("https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
           "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/")
FILES = {                                   # name -> md5 of the published .gz file
    "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def read_idx(path: str | Path) -> np.ndarray:
    """An idx file (gzipped or raw) as a uint8 array: images [N, H, W], labels [N]."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: not a readable idx file ({err})") from err
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic bytes {data[:4].hex() or 'missing'})")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header]) if len(data) >= header else ()
    if len(shape) != ndim or len(data) != header + int(np.prod(shape)):
        raise ValueError(f"{path}: idx header says shape {shape} but the file holds {len(data) - header} bytes of data")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def candidate_dirs(data_dir: str | Path | None) -> list[Path]:
    dirs = [Path(data_dir).expanduser(), Path(data_dir).expanduser() / "FashionMNIST" / "raw"] if data_dir else []
    return dirs + [DEBIAN_DIR]


def find_files(data_dir: str | Path | None) -> dict[str, Path] | None:
    """The first candidate folder holding all four files (each .gz or raw): {name: path}, or None."""
    for folder in candidate_dirs(data_dir):
        found = {}
        for name in FILES:
            for path in (folder / f"{name}.gz", folder / name):
                if path.is_file():
                    found[name] = path
                    break
        if len(found) == len(FILES):
            return found
    return None


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def download(data_dir: str | Path) -> None:
    """Fetch the four .gz files into data_dir from the first mirror that answers, checking their md5."""
    folder = Path(data_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    for name, checksum in FILES.items():
        target = folder / f"{name}.gz"
        if target.is_file() and md5(target) == checksum:
            continue
        errors = []
        for mirror in MIRRORS:
            log.info("downloading %s%s.gz -> %s", mirror, name, target)
            partial = target.with_suffix(".gz.part")
            try:
                urllib.request.urlretrieve(f"{mirror}{name}.gz", partial)
            except OSError as err:
                errors.append(f"{mirror}: {err}")
                continue
            if md5(partial) != checksum:
                errors.append(f"{mirror}: md5 mismatch")
                partial.unlink()
                continue
            partial.replace(target)
            break
        else:
            raise RuntimeError(f"could not download {name}.gz into {folder}: " + "; ".join(errors))


def missing_message(data_dir: str | Path | None) -> str:
    looked = "\n".join(f"  - {d}" for d in candidate_dirs(data_dir))
    names = ", ".join(f"{n}[.gz]" for n in FILES)
    return (f"Fashion-MNIST not found: need {names} in one of\n{looked}\n"
            "Get them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or run with data.download=true "
            "(fetches them into data.data_dir), or point data.data_dir=DIR at a folder that holds them.")


class FashionMNISTDataModule(ArrayDataModule):
    kind = "image"
    classes = CLASSES

    def __init__(self, data_dir: str | None = None, download: bool = False, **kwargs):
        self.degradation = Degradation.pop_from(kwargs)     # task, mask, noise_sigma, scale, ... (data.* keys)
        if self.degradation.task == "colorization":
            raise ValueError("data.task=colorization needs RGB images; Fashion-MNIST is grey (try data=image_folder)")
        super().__init__(**kwargs)
        self.data_dir, self.download = data_dir, download
        self.mask_channel = self.degradation.mask_channel

    def prepare_data(self) -> None:
        if self.download and find_files(self.data_dir) is None:
            if not self.data_dir:
                raise ValueError("data.download=true needs data.data_dir (where to put the files)")
            download(self.data_dir)

    def read(self, prefix: str, files: dict[str, Path]) -> tuple[Tensor, Tensor]:
        images, labels = read_idx(files[f"{prefix}-images-idx3-ubyte"]), read_idx(files[f"{prefix}-labels-idx1-ubyte"])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{files[f'{prefix}-images-idx3-ubyte']}: images {images.shape} do not match "
                             f"labels {labels.shape} in {files[f'{prefix}-labels-idx1-ubyte']}")
        return torch.from_numpy(images.copy()).float()[:, None] / 255.0, torch.from_numpy(labels.astype(np.int64))

    def load_datasets(self) -> dict[str, Dataset]:
        self.prepare_data()                                 # a no-op unless download=true and the files are missing
        files = find_files(self.data_dir)
        if files is None:
            raise FileNotFoundError(missing_message(self.data_dir))
        log.info("Fashion-MNIST from %s", files["train-images-idx3-ubyte"].parent)
        (y_train, c_train), (y_test, c_test) = self.read("train", files), self.read("t10k", files)  # y: [N, 1, 28, 28]
        seed = self.split_seed
        order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(seed))
        n_val = int(round(len(y_train) * self.val_fraction))
        parts = {"train": order[n_val:].sort().values, "val": order[:n_val]}
        if self.degradation.random:
            # x drawn per item: per training draw, fixed per sample for val and test (seeded by the row in its file)
            made = {k: DegradedDataset(y_train[idx], self.degradation, seed, 0, idx, c_train[idx]) for k, idx in parts.items()}
            made["test"] = DegradedDataset(y_test, self.degradation, seed, 1, None, c_test)
            return made
        x_train, x_test = self.degradation.apply(y_train), self.degradation.apply(y_test)      # the same every draw
        made = {k: IndexedDataset(x_train[idx], y_train[idx], c_train[idx]) for k, idx in parts.items()}
        made["test"] = IndexedDataset(x_test, y_test, c_test)
        return made
