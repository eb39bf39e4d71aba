"""Datamodules' shared parts: batches {"x", "y", "index"}, deterministic splits, and the training sampler that tells
every draw its epoch.

A training draw of sample i is the key (i, epoch, seed) that `DrawSampler` yields; validation, test and any plain
DataLoader pass the plain row number i. Datasets with random degradations (or augmentations) draw a fresh one per
training draw, from a generator seeded by (seed, i, epoch), and one fixed one per plain index. The epoch travels with
the index, so it reaches persistent DataLoader workers (which keep their own copy of the dataset), a resumed run
draws what the uninterrupted run drew, and DDP ranks agree.
"""
from __future__ import annotations

import hashlib
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from cgml_lightning.data.degradations import Degradation, sample_seed


def draw_key(key: int | tuple[int, int, int]) -> tuple[int, int | None, int | None]:
    """(row, epoch, seed) of a dataset key: a DrawSampler's (row, epoch, seed), or a plain row (epoch, seed None)."""
    if isinstance(key, (tuple, list)):
        row, epoch, seed = key
        return int(row), int(epoch), int(seed)
    return int(key), None, None


class IndexedDataset(Dataset):
    """Pairs (x[i], y[i]) with their row number, which addresses the per-sample latent table. With class labels
    (LongTensor[N]) each item also carries "label" (for the evaluation's classifier and the linear probe)."""

    def __init__(self, x: Tensor, y: Tensor, label: Tensor | None = None):
        if label is not None and len(label) != len(x):
            raise ValueError(f"IndexedDataset: {len(label)} labels for {len(x)} samples")
        self.x, self.y, self.label = x, y, label

    def __len__(self) -> int:
        return len(self.x)

    def head(self, n: int) -> "IndexedDataset":
        return IndexedDataset(self.x[:n], self.y[:n], None if self.label is None else self.label[:n])

    def __getitem__(self, key) -> dict[str, Any]:
        i = draw_key(key)[0]
        return labelled({"x": self.x[i], "y": self.y[i], "index": i}, self.label, i)


def labelled(item: dict[str, Any], labels, i: int) -> dict[str, Any]:
    """The item with its class label (row i of labels) when the data has labels."""
    if labels is not None:
        item["label"] = labels[i]
    return item


class DegradedDataset(Dataset):
    """Clean images y [N, C, H, W] in memory and x = degradation(y[i]) made per item: a training draw (row, epoch,
    seed) gets its own mask / noise from sample_seed(seed, keys[row], stream, epoch); a plain row gets its fixed one
    from sample_seed(fixed_seed, keys[row], stream). keys: each row's stable number in its source file."""

    def __init__(self, y: Tensor, degradation: Degradation, fixed_seed: int = 0, stream: int = 0,
                 keys: Tensor | None = None, label: Tensor | None = None):
        keys = torch.arange(len(y)) if keys is None else keys
        if len(keys) != len(y) or (label is not None and len(label) != len(y)):
            raise ValueError(f"DegradedDataset: {len(keys)} keys and {None if label is None else len(label)} labels "
                             f"for {len(y)} samples")
        self.y, self.degradation, self.fixed_seed, self.stream = y, degradation, fixed_seed, stream
        self.keys, self.label = keys, label

    def __len__(self) -> int:
        return len(self.y)

    def head(self, n: int) -> "DegradedDataset":
        return DegradedDataset(self.y[:n], self.degradation, self.fixed_seed, self.stream, self.keys[:n],
                               None if self.label is None else self.label[:n])

    def seed_for(self, key) -> tuple[int, int]:
        """(row, generator seed) of a key: per draw for (row, epoch, seed), fixed for a plain row."""
        row, epoch, seed = draw_key(key)
        sample = int(self.keys[row])
        if epoch is None:
            return row, sample_seed(self.fixed_seed, sample, self.stream)
        return row, sample_seed(seed, sample, self.stream, epoch)

    def __getitem__(self, key) -> dict[str, Any]:
        i, seed = self.seed_for(key)
        x = self.degradation(self.y[i], torch.Generator().manual_seed(seed))
        return labelled({"x": x, "y": self.y[i], "index": i}, self.label, i)


class DrawSampler(DistributedSampler):
    """The training sampler: shuffles with a generator seeded by (seed, epoch), shares the rows out among DDP ranks
    (num_replicas, rank; 1 and 0 on one process), and yields (row, epoch, seed) so the dataset can draw this epoch's
    degradation. Lightning calls set_epoch every epoch and, this being a DistributedSampler, keeps it under DDP."""

    def __init__(self, data_source, seed: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(data_source, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed % 2**63,
                         drop_last=False)

    def __iter__(self):
        epoch, seed = self.epoch, self.seed
        return ((row, epoch, seed) for row in super().__iter__())


def fingerprint(*tensors: Tensor) -> str:
    """A short content hash of the training set, recorded in checkpoints to catch resuming on other data."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def split_sizes(n: int, val_fraction: float, test_fraction: float, what: str, unit: str = "sample") -> tuple[int, int]:
    """(n_val, n_test): each non-zero fraction takes at least one sample; an error when no training sample is left."""
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= f < 1:
            raise ValueError(f"data.{name} must be in [0, 1); got {f}")
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"{what}: data.val_fraction={val_fraction} and data.test_fraction={test_fraction} add up to "
                         f"{val_fraction + test_fraction:g}, leaving nothing for training; together they must stay "
                         f"below 1")
    n_val, n_test = (max(1, round(n * f)) if f > 0 else 0 for f in (val_fraction, test_fraction))
    if n - n_val - n_test < 1:
        raise ValueError(f"{what}: {n} {unit}(s) are too few for val_fraction={val_fraction} and "
                         f"test_fraction={test_fraction} (val {n_val} + test {n_test} leave {n - n_val - n_test} "
                         f"for training; each non-zero split takes at least one {unit})")
    return n_val, n_test


class SplitDataModule(L.LightningDataModule):
    """Batch sizes, split fractions and the loaders shared by every datamodule; subclasses fill `self.splits`
    (split name -> Dataset) in setup(). `collate` (None: PyTorch's default) turns a list of items into a batch."""

    kind = "vector"
    mask_channel = False        # True when x's last channel marks the hole (completion)
    degradation: Degradation | None = None      # how x is made from y (image data); None: not declared
    collate = None

    def __init__(self, batch_size: int = 128, eval_batch_size: int | None = None, val_fraction: float = 0.1,
                 test_fraction: float = 0.1, split_seed: int = 0, num_workers: int = 0, max_train_samples: int | None = None):
        from cgml_lightning.models.base import is_count        # models import data: imported here

        super().__init__()
        eval_size = batch_size if eval_batch_size is None else eval_batch_size
        for key, value, least in (("batch_size", batch_size, 1), ("eval_batch_size", eval_size, 1),
                                  ("num_workers", num_workers, 0)):
            if not is_count(value) or value < least:
                raise ValueError(f"data.{key} must be a whole number, at least {least}; got {value!r}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_size
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        self.num_workers, self.max_train_samples = num_workers, max_train_samples
        self.splits: dict[str, Dataset] | None = None

    def degradation_info(self) -> dict[str, Any]:
        """info()'s {"degradation": {"task": ..., its settings}} (Degradation.record), which cgml-sample applies to
        users' images; {} where the datamodule declares no degradation (vector data)."""
        return {} if self.degradation is None else {"degradation": self.degradation.record()}

    def world(self) -> tuple[int, int]:
        """(number of DDP processes, this one's rank) from the attached trainer; (1, 0) without one."""
        trainer = getattr(self, "trainer", None)
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def start_epoch(self) -> int:
        """The epoch the trainer is about to run (0 without one): what it will pass to set_epoch."""
        trainer = getattr(self, "trainer", None)
        return int(trainer.fit_loop.epoch_progress.current.processed) if trainer is not None else 0

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        data = self.splits[split]
        sampler = None
        if shuffle:
            num_replicas, rank = self.world()
            sampler = DrawSampler(data, seed=torch.initial_seed(), num_replicas=num_replicas, rank=rank)
            # Lightning creates the first iterator before its first set_epoch call, and DataLoader workers fetch
            # indices as soon as the iterator exists: start at the epoch the trainer runs next (a resumed run's)
            sampler.set_epoch(self.start_epoch())
        return DataLoader(data, batch_size=self.batch_size if shuffle else self.eval_batch_size, sampler=sampler,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0, drop_last=False,
                          collate_fn=self.collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


class ArrayDataModule(SplitDataModule):
    """Subclasses implement `load_arrays() -> (x, y)` (and optionally `load_labels()`); this class splits, validates
    and serves them. Class labels, where the data has them, stay in `self.labels[split]` and ride in the batches as
    the optional key "label" (the contract {"x", "y", "index"} is unchanged).

    kind: "vector" or "image" (images are [C, H, W] in [0, 1]); it picks nets and metrics downstream.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.labels: dict[str, Tensor] = {}

    def load_arrays(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def load_labels(self) -> Tensor | None:
        """Override to give every sample of load_arrays() its class (LongTensor[N], same order); None: no labels."""
        return None

    def load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Override when the data comes with its own train/test split."""
        x, y = self.load_arrays()
        check_features(type(self).__name__, x, y)
        n = len(x)
        n_val, n_test = split_sizes(n, self.val_fraction, self.test_fraction, type(self).__name__)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed))
        parts = {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}
        labels = self.load_labels()
        if labels is not None:
            if len(labels) != n:
                raise ValueError(f"{type(self).__name__}.load_labels gave {len(labels)} labels for {n} samples")
            self.labels = {k: labels[idx] for k, idx in parts.items()}
        return {k: (x[idx], y[idx]) for k, idx in parts.items()}

    def load_datasets(self) -> dict[str, Dataset]:
        """Override to serve other datasets (e.g. degradations drawn per item); they need len, y, label and head."""
        return {k: IndexedDataset(x.float(), y.float(), self.labels.get(k)) for k, (x, y) in self.load_splits().items()}

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        splits = self.load_datasets()
        if self.max_train_samples is not None:
            splits["train"] = splits["train"].head(self.max_train_samples)
        if len(splits["train"]) == 0:
            raise ValueError(f"{type(self).__name__}: the training split is empty")
        self.labels = {k: s.label for k, s in splits.items() if s.label is not None}
        self.splits = splits

    def info(self) -> dict[str, Any]:
        """What a module needs to build its nets and latent table: plain containers only."""
        self.setup()
        train = self.splits["train"]
        x = train.x if isinstance(train, IndexedDataset) else None
        x_shape = list(x.shape[1:]) if x is not None else list(train[0]["x"].shape)
        return {"kind": self.kind, "x_shape": x_shape, "y_shape": list(train.y.shape[1:]),
                "num_train_samples": len(train), "mask_channel": self.mask_channel,
                "fingerprint": fingerprint(x, train.y) if x is not None else fingerprint(train.y),
                **self.degradation_info()}


def check_features(what: str, x: Tensor, y: Tensor) -> None:
    """x and y need a sample axis and at least one value per sample."""
    for name, a in (("x", x), ("y", y)):
        if a.dim() < 1 or (a.dim() > 1 and a[0].numel() == 0):
            raise ValueError(f"{what}: {name} has shape {tuple(a.shape)}: no features per sample "
                             f"(need shape (N, D) with D >= 1, or (N, C, H, W))")
