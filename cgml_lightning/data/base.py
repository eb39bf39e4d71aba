"""In-memory datamodules: any (x, y) arrays become batches {"x", "y", "index"} with deterministic splits."""
from __future__ import annotations

import hashlib
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler


class IndexedDataset(Dataset):
    """Pairs (x[i], y[i]) with their row number, which addresses the per-sample latent table. With class labels
    (LongTensor[N]) each item also carries "label" (for the evaluation's classifier and the linear probe)."""

    def __init__(self, x: Tensor, y: Tensor, label: Tensor | None = None):
        if label is not None and len(label) != len(x):
            raise ValueError(f"IndexedDataset: {len(label)} labels for {len(x)} samples")
        self.x, self.y, self.label = x, y, label

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {"x": self.x[i], "y": self.y[i], "index": i}
        if self.label is not None:
            item["label"] = self.label[i]
        return item


class EpochRandomSampler(RandomSampler):
    """Shuffles with a generator re-seeded from (seed, epoch): a run resumed at epoch e sees the order the
    uninterrupted run saw. Lightning calls set_epoch each epoch, and swaps in its DistributedSampler under DDP."""

    def __init__(self, data_source, seed: int):
        super().__init__(data_source, generator=torch.Generator().manual_seed(seed))
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed((self.seed + epoch) % 2**63)


def fingerprint(*tensors: Tensor) -> str:
    """A short content hash of the training set, recorded in checkpoints to catch resuming on other data."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class ArrayDataModule(L.LightningDataModule):
    """Subclasses implement `load_arrays() -> (x, y)` (and optionally `load_labels()`); this class splits, validates
    and serves them. Class labels, where the data has them, stay in `self.labels[split]` and ride in the batches as
    the optional key "label" (the contract {"x", "y", "index"} is unchanged).

    kind: "vector" or "image" (images are [C, H, W] in [0, 1]); it picks nets and metrics downstream.
    """

    kind = "vector"
    mask_channel = False        # True when x's last channel marks the hidden pixels (completion)

    def __init__(self, batch_size: int = 128, eval_batch_size: int | None = None, val_fraction: float = 0.1,
                 test_fraction: float = 0.1, split_seed: int = 0, num_workers: int = 0, max_train_samples: int | None = None):
        super().__init__()
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        self.num_workers, self.max_train_samples = num_workers, max_train_samples
        self.splits: dict[str, IndexedDataset] | None = None
        self.labels: dict[str, Tensor] = {}

    def load_arrays(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def load_labels(self) -> Tensor | None:
        """Override to give every sample of load_arrays() its class (LongTensor[N], same order); None: no labels."""
        return None

    def load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Override when the data comes with its own train/test split."""
        x, y = self.load_arrays()
        n = len(x)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed))
        n_val, n_test = int(round(n * self.val_fraction)), int(round(n * self.test_fraction))
        parts = {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}
        labels = self.load_labels()
        if labels is not None:
            if len(labels) != n:
                raise ValueError(f"{type(self).__name__}.load_labels gave {len(labels)} labels for {n} samples")
            self.labels = {k: labels[idx] for k, idx in parts.items()}
        return {k: (x[idx], y[idx]) for k, idx in parts.items()}

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        splits = self.load_splits()
        x, y = splits["train"]
        if self.max_train_samples is not None:
            splits["train"] = (x[: self.max_train_samples], y[: self.max_train_samples])
            if "train" in self.labels:
                self.labels["train"] = self.labels["train"][: self.max_train_samples]
        if len(splits["train"][0]) == 0:
            raise ValueError(f"{type(self).__name__}: the training split is empty")
        self.splits = {k: IndexedDataset(x.float(), y.float(), self.labels.get(k)) for k, (x, y) in splits.items()}

    def info(self) -> dict[str, Any]:
        """What a module needs to build its nets and latent table: plain containers only."""
        self.setup()
        train = self.splits["train"]
        return {"kind": self.kind, "x_shape": list(train.x.shape[1:]), "y_shape": list(train.y.shape[1:]),
                "num_train_samples": len(train), "mask_channel": self.mask_channel, "fingerprint": fingerprint(train.x, train.y)}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        data = self.splits[split]
        sampler = EpochRandomSampler(data, seed=torch.initial_seed()) if shuffle else None
        return DataLoader(data, batch_size=self.batch_size if shuffle else self.eval_batch_size, sampler=sampler,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
