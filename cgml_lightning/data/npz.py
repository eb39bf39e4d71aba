"""A user's own arrays: an .npz file with float arrays `x` and `y`, first axis = samples; shapes inferred."""
from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cgml_lightning.data.base import ArrayDataModule

log = logging.getLogger("cgml_lightning")
SCALE_LIMIT = 20.0              # a column's |mean| or std beyond this (or std below its inverse): warned


class NpzDataModule(ArrayDataModule):
    kind = "vector"

    def __init__(self, path: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.path = path

    def load_arrays(self) -> tuple[Tensor, Tensor]:
        return load_npz(self.path)


def load_npz(path: str | None) -> tuple[Tensor, Tensor]:
    """Read and check x, y from an .npz file; every problem is a ValueError naming the file and the array."""
    if path is None:
        raise ValueError("data=npz needs data.path=FILE.npz (an .npz file with float arrays 'x' and 'y')")
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"data.path: no such file: {file.resolve()}")
    if not zipfile.is_zipfile(file):               # a .npy array, text, a file cut short (np.load's message misleads)
        raise ValueError(f"{file}: not an .npz archive (np.savez writes one, with arrays named x and y)")
    arrays = {}
    try:
        with np.load(file, allow_pickle=False) as archive:
            names = archive.files
            for name in ("x", "y"):                    # only these are read: other arrays may hold anything
                if name not in names:
                    raise ValueError(f"{file}: missing array {name!r} (found: {sorted(names) or 'none'})")
                try:
                    arrays[name] = archive[name]
                except (ValueError, OSError, zipfile.BadZipFile):
                    # numpy's text suggests allow_pickle=True, which would run the file's code: not passed on
                    raise ValueError(f"{file}: array {name!r} is not a readable array of plain numbers (it holds "
                                     f"pickled objects, or is damaged); nothing in it was run") from None
    except (OSError, zipfile.BadZipFile):
        raise ValueError(f"{file}: not a readable .npz file (damaged); nothing in it was run") from None
    for name in ("x", "y"):
        a = arrays[name]
        if a.ndim == 0:
            raise ValueError(f"{file}: array {name!r} is a scalar; the first axis must index samples")
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
            raise ValueError(f"{file}: array {name!r} has non-numeric dtype {a.dtype}")
        if a.ndim > 1 and 0 in a.shape[1:]:
            raise ValueError(f"{file}: array {name!r} has shape {a.shape}: no values per sample")
        with np.errstate(over="ignore"):                                   # float64 beyond float32 becomes Inf
            bad = ~np.isfinite(a.astype(np.float32))
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise ValueError(f"{file}: array {name!r} has {int(bad.sum())} NaN/Inf value(s) or value(s) beyond "
                             f"float32's range (|v| > 3.4e38), first in sample {row}")
    x, y = arrays["x"], arrays["y"]
    if len(x) != len(y):
        raise ValueError(f"{file}: arrays 'x' and 'y' differ in length ({len(x)} vs {len(y)} samples)")
    if len(x) < 3:
        raise ValueError(f"{file}: needs at least 3 samples to split into train/val/test; got {len(x)}")
    as_2d = lambda a: a.reshape(len(a), -1) if a.ndim == 1 else a          # noqa: E731  (N,) -> (N, 1)
    x, y = torch.from_numpy(as_2d(x).astype(np.float32)), torch.from_numpy(as_2d(y).astype(np.float32))
    warn_scale(file, x, y)
    return x, y


def warn_scale(file: Path, x: Tensor, y: Tensor) -> None:
    """The nets, the z-phase's step sizes and the distances are set for values of order 1: arrays far from that
    (a mean or spread beyond SCALE_LIMIT, or a spread below 1 / SCALE_LIMIT) train poorly, so say so."""
    for name, a in (("x", x), ("y", y)):
        mean, std = a.mean(0), a.std(0)
        far = (mean.abs() > SCALE_LIMIT) | (std > SCALE_LIMIT) | ((std < 1 / SCALE_LIMIT) & (std > 0))
        if far.any():
            i = int(far.nonzero()[0][0])
            log.warning("%s: array %r is far from unit scale (column %d: mean %.3g, std %.3g); the models are set "
                        "for values of order 1, so standardise x and y (subtract each column's mean, divide by its "
                        "std) before saving, and scale the samples back", file, name, i, float(mean[i]), float(std[i]))
