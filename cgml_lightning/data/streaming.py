"""data=streaming: train from Lightning's litdata chunks, on local disk or in a bucket (s3://...), with litdata's own
DDP / multi-node sharding. Needs the `streaming` extra and litdata itself (docs/data.md: `pip install --no-deps
litdata`, because litdata's wheel names torchvision, which this package neither needs nor installs).

Convert an image folder (or a paired folder) once:

    python -m cgml_lightning.data.streaming convert --root DIR --out OUT [--paired] [--val-fraction 0.05 ...]

OUT gets train/, val/ and test/ (litdata's chunks; the split of data=image_folder with the same fractions and
split_seed) and cgml.json (the split sizes, the training fingerprint). Each item stores the file's encoded bytes,
its relative name, its row in its split and its position in the sorted file list, as bytes, str and int only:
nothing is pickled, and a dataset whose chunks declare any other format is refused. Then train with
`data=streaming data.input_dir=OUT` (or s3://bucket/OUT once uploaded): workers decode, crop and degrade exactly as
data=image_folder does, so a streamed sample equals the folder's (row for row, draw for draw).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any


from cgml_lightning.data.base import SplitDataModule
from cgml_lightning.data.degradations import Degradation
from cgml_lightning.data.folders import (UNREADABLE, Augment, ImageBatch, ImageFolderDataModule,
                                         PairedFolderDataModule, check_root, decode_sample, make_item)

MANIFEST = "cgml.json"
FORMAT = "cgml-streaming-1"
SPLITS = ("train", "val", "test")
SAFE_FORMATS = {"int", "str", "bytes"}             # what the items hold: litdata's plain serializers, no pickle
INSTALL_HINT = ("data=streaming needs litdata: pip install 'cgml-lightning[streaming]' && pip install --no-deps "
                "litdata (see docs/data.md)")


def require_litdata():
    try:
        import litdata
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return litdata


# ---- convert ------------------------------------------------------------------------------------------------------
def encode_item(row_key_names: tuple[int, int, str, str], root: str) -> dict[str, Any]:
    """One stored item: the file's (or the pair's) encoded bytes as they are on disk, never decoded pixels."""
    row, key, name_a, name_b = row_key_names
    with open(os.path.join(root, name_a), "rb") as f:
        a = f.read()
    b = b""
    if name_b:
        with open(os.path.join(root, name_b), "rb") as f:
            b = f.read()
    # the name only labels warnings; litdata stores str as UTF-8, which a file name need not be
    return {"index": row, "key": key, "name": os.fsencode(name_a).decode("utf-8", "backslashreplace"), "a": a, "b": b}


def convert(root: str | Path, out: str | Path, paired: bool = False, layout: str = "auto", val_fraction: float = 0.05,
            test_fraction: float = 0.05, split_seed: int = 0, max_images: int | None = None, num_workers: int = 1,
            chunk_bytes: str = "64MB", overwrite: bool = False) -> dict[str, Any]:
    """Write OUT/{train,val,test} (litdata chunks) and OUT/cgml.json from an image folder; returns the manifest.
    The folder is listed and split exactly as data=image_folder (or data=paired_folder) lists and splits it. An
    OUT that holds anything is refused unless overwrite."""
    litdata = require_litdata()
    options = dict(root=str(root), val_fraction=val_fraction, test_fraction=test_fraction, split_seed=split_seed,
                   max_images=max_images, num_workers=0)
    folder = PairedFolderDataModule(layout=layout, **options) if paired else ImageFolderDataModule(**options)
    out = Path(out).expanduser()
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        what = "an earlier conversion" if MANIFEST in held else f"other files ({', '.join(held[:5])})"
        raise FileExistsError(f"--out {out} holds {what}; give an empty or new folder, or --overwrite to replace "
                              f"its chunks and {MANIFEST}")
    folder.setup()
    out.mkdir(parents=True, exist_ok=True)
    # written into a hidden folder inside OUT (one file system), then swapped in: the earlier parts move aside first
    # and come back if the swap fails, so a conversion that fails leaves OUT as it was
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=out))
    try:
        sizes = {}
        for split in SPLITS:
            data = folder.splits[split]
            sizes[split] = len(data)
            if not len(data):
                continue
            inputs = [(row, int(data.keys[row]), data.names.name(row), data.names_b.name(row) if data.names_b else "")
                      for row in range(len(data))]
            litdata.optimize(fn=functools.partial(encode_item, root=str(folder.root)), inputs=inputs,
                             output_dir=str(staging / split), chunk_bytes=chunk_bytes, num_workers=num_workers,
                             mode="overwrite", verbose=False)
        manifest = {"format": FORMAT, "paired": paired, "side_by_side": bool(paired and folder.side_by_side),
                    "splits": sizes, "fingerprint": folder.info()["fingerprint"], "split_seed": split_seed,
                    "val_fraction": val_fraction, "test_fraction": test_fraction, "source": str(Path(root).resolve())}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        swap_in(staging, out, (*SPLITS, MANIFEST))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def swap_in(staging: Path, out: Path, names: tuple[str, ...]) -> None:
    """Replace out/NAME by staging/NAME for each name (a name staging lacks is removed from out): out's parts move
    to staging/earlier first, and back if a move fails."""
    earlier = staging / "earlier"
    earlier.mkdir()
    for name in names:
        if (out / name).exists():
            os.replace(out / name, earlier / name)
    try:
        for name in names:
            if (staging / name).exists():
                os.replace(staging / name, out / name)
    except OSError:
        for name in names:
            if (earlier / name).exists():
                if (out / name).is_dir():
                    shutil.rmtree(out / name)
                os.replace(earlier / name, out / name)
        raise


# ---- read ---------------------------------------------------------------------------------------------------------
def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("local:")


def fetch_json(input_dir: str, relative: str, storage_options: dict | None) -> dict[str, Any]:
    """A small JSON file of the converted dataset: read in place, or fetched with litdata's own downloader."""
    if not is_remote(input_dir):
        path = Path(input_dir).expanduser() / relative
        if not Path(input_dir).expanduser().is_dir():
            raise FileNotFoundError(f"data.input_dir: no such folder: {Path(input_dir).expanduser().resolve()}")
        if not path.is_file():
            raise FileNotFoundError(f"data.input_dir: no {relative} in {Path(input_dir).expanduser().resolve()}; "
                                    "make it with: python -m cgml_lightning.data.streaming convert --root DIR --out OUT")
        return json.loads(path.read_text())
    require_litdata()
    from litdata.streaming.downloader import get_downloader

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, os.path.basename(relative))
        get_downloader(input_dir, tmp, [], storage_options).download_file(f"{input_dir.rstrip('/')}/{relative}", local)
        with open(local) as f:
            return json.load(f)


def check_safe_formats(input_dir: str, split: str, storage_options: dict | None) -> None:
    """Refuse chunks whose items are anything but int, str and bytes (litdata would unpickle a 'pickle' field)."""
    index = fetch_json(input_dir, f"{split}/index.json", storage_options)
    formats = set((index.get("config") or {}).get("data_format") or [])
    if not formats or not formats <= SAFE_FORMATS:
        raise ValueError(f"data.input_dir={input_dir}: {split}/index.json declares item formats {sorted(formats)}; "
                         f"only {sorted(SAFE_FORMATS)} (what the convert command writes) are read, never pickled objects")


@functools.cache
def streaming_dataset_class():
    """StreamingDataset whose items are decoded, cropped and made into the folder datasets' uint8 items; a training
    draw uses litdata's epoch counter (the loader starts it at the trainer's epoch). Made once, on first use (litdata
    is optional), and named as this module's ImageStreamingDataset: DataLoader workers started by spawn or
    forkserver unpickle it by that name (the module's __getattr__)."""
    from litdata import StreamingDataset

    class ImageStreamingDataset(StreamingDataset):
        def __init__(self, input_dir: str, reader: dict[str, Any], train: bool, **kwargs):
            super().__init__(input_dir, shuffle=train, **kwargs)
            self.reader, self.train = reader, train
            self.label = None                                    # no class labels

        def __getitem__(self, index):
            raw = super().__getitem__(index)
            r = self.reader
            try:                                         # the checks and decoding of the folder datasets
                files = [raw["a"], raw["b"]] if r["two_files"] else [raw["a"]]
                images = decode_sample(files, r["channels"], r["side_by_side"], raw["name"])
            except UNREADABLE as err:
                what = "pair" if r["two_files"] else "image"
                where = self.input_dir.url or self.input_dir.path
                warnings.warn(f"skipping unreadable {what} {raw['name']} in {where} ({type(err).__name__}: {err})",
                              stacklevel=2)
                return None                                      # the collate function drops it
            epoch = self.current_epoch - 1 if self.train else None       # litdata counts epochs from 1
            return make_item(images, int(raw["index"]), int(raw["key"]), epoch, r["seed"], r["fixed_seed"], r["size"],
                             r["augment"] if self.train else None, r["swap"])

    ImageStreamingDataset.__qualname__ = "ImageStreamingDataset"
    return ImageStreamingDataset


def __getattr__(name: str):
    if name == "ImageStreamingDataset":
        try:
            return streaming_dataset_class()
        except ImportError as err:                  # hasattr() answers False without litdata
            raise AttributeError(f"{name} needs litdata: {err}") from err
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def stored_items(dataset) -> int:
    """The items a StreamingDataset's chunks hold, over every process (its len() is one DDP rank's share); 0 for an
    empty split."""
    if isinstance(dataset, NoItems):
        return 0
    return sum(end - start for start, end in dataset.region_of_interest)      # (first, end) item of each chunk


class EvaluationItems:
    """A val or test split read by index (litdata's random access) in a plain map-style dataset: every item once, and
    under DDP Lightning's distributed sampler gives each rank an equal share, as for folders. litdata's own sharding
    of an iterable split evens the ranks' shares by dropping items, up to all of a small split, and evaluate() on rank
    0 alone would see that rank's share only."""

    def __init__(self, dataset) -> None:
        self.dataset, self.length = dataset, stored_items(dataset)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return self.dataset[index]


class NoItems(list):
    """An empty split (a converted folder without val or test)."""

    label = None


class StreamingDataModule(SplitDataModule):
    """data=streaming: the output of `python -m cgml_lightning.data.streaming convert` (local folder or s3:// URL),
    served as data=image_folder / data=paired_folder serve the folder it came from. Unpaired data takes the task
    keys (task, mask, ...); paired data takes direction. image_size is required (one size for every sample)."""

    kind = "image"

    def __init__(self, input_dir: str | None = None, channels: int = 3, image_size: int = 64,
                 direction: str | None = None, augment: Mapping | None = None, cache_dir: str | None = None,
                 max_cache_size: str = "50GB", storage_options: Mapping | None = None, **kwargs):
        # task (single images) and direction (pairs) default to None: which applies is the chunks' to say (setup)
        self.task_given, self.direction_given = kwargs.get("task"), direction
        kwargs["task"] = kwargs.get("task") or "completion"
        direction = direction or "AtoB"
        self.degradation = Degradation.pop_from(kwargs)
        super().__init__(**kwargs)
        if input_dir is None or str(input_dir) in ("", "???"):
            raise ValueError("data.input_dir is required: the output folder (or s3:// URL) of "
                             "python -m cgml_lightning.data.streaming convert")
        if channels not in (1, 3):
            raise ValueError(f"data.channels must be 1 (grey) or 3 (RGB); got {channels!r}")
        if not isinstance(image_size, int) or image_size < 2:
            raise ValueError(f"data.image_size must be a number of pixels (at least 2); got {image_size!r}")
        if direction not in ("AtoB", "BtoA"):
            raise ValueError(f"data.direction must be AtoB or BtoA; got {direction!r}")
        if self.max_train_samples is not None:
            raise ValueError("data=streaming: max_train_samples is not supported (convert with --max-images instead)")
        input_dir = str(input_dir) if is_remote(str(input_dir)) else str(Path(input_dir).expanduser())
        self.input_dir, self.channels, self.image_size, self.direction = input_dir, channels, image_size, direction
        self.augment = Augment.parse(augment)
        self.cache_dir, self.max_cache_size = cache_dir, max_cache_size
        self.storage_options = dict(storage_options or {})
        self.manifest: dict[str, Any] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        require_litdata()
        manifest = fetch_json(self.input_dir, MANIFEST, self.storage_options)
        if manifest.get("format") != FORMAT:
            raise ValueError(f"data.input_dir={self.input_dir}: {MANIFEST} has format {manifest.get('format')!r}, "
                             f"expected {FORMAT!r}")
        self.manifest = manifest
        paired = bool(manifest["paired"])
        if paired and self.task_given not in (None, "identity"):
            raise ValueError(f"data.input_dir={self.input_dir} holds A|B pairs (converted with --paired), but "
                             f"data.task={self.task_given} is a task on single images: train the pairs with "
                             f"experiment=paired_translation data=streaming, or convert the folder without --paired")
        if not paired and self.direction_given is not None:
            raise ValueError(f"data.input_dir={self.input_dir} holds single images (converted without --paired), but "
                             f"data.direction={self.direction_given} is for A|B pairs: train them with an experiment "
                             f"on single images (folder_completion, colorization, ...), or convert pairs with --paired")
        self.mask_channel = not paired and self.degradation.mask_channel
        if not paired and self.degradation.task == "colorization" and self.channels != 3:
            raise ValueError(f"data.task=colorization needs data.channels=3 (RGB targets); got {self.channels}")
        self.collate = ImageBatch(None if paired else self.degradation)
        self.splits = {}
        for split in SPLITS:
            if manifest["splits"][split]:
                check_safe_formats(self.input_dir, split, self.storage_options)
                self.splits[split] = self.make_dataset(split, train=split == "train")
            else:
                self.splits[split] = NoItems()
        held = stored_items(self.splits["train"])            # len() would count this process's share under DDP
        if held != manifest["splits"]["train"]:
            raise ValueError(f"data.input_dir={self.input_dir}: train/ holds {held} items but {MANIFEST} says "
                             f"{manifest['splits']['train']}")

    def make_dataset(self, split: str, train: bool, seed: int = 0):
        """A split's StreamingDataset; seed: litdata's shuffle seed and the training draws' (the run's)."""
        side_by_side = bool(self.manifest["side_by_side"])
        reader = {"channels": self.channels, "size": (self.image_size, self.image_size), "side_by_side": side_by_side,
                  "two_files": bool(self.manifest["paired"]) and not side_by_side, "swap": self.direction == "BtoA",
                  "augment": self.augment, "fixed_seed": int(self.manifest["split_seed"]), "seed": seed}
        return streaming_dataset_class()(f"{self.input_dir.rstrip('/')}/{split}", reader, train, seed=seed,
                                         cache_dir=self.cache_dir, max_cache_size=self.max_cache_size,
                                         storage_options=self.storage_options)

    def info(self) -> dict[str, Any]:
        self.setup()
        size, c = self.image_size, self.channels
        if self.manifest["paired"]:
            x_shape = [c, size, size]
        else:
            import torch

            x_shape = list(self.degradation(torch.zeros(1, c, size, size), torch.Generator().manual_seed(0)).shape[1:])
        degradation = Degradation(task="identity") if self.manifest["paired"] else self.degradation
        return {"kind": self.kind, "x_shape": x_shape, "y_shape": [c, size, size],
                "num_train_samples": int(self.manifest["splits"]["train"]), "mask_channel": self.mask_channel,
                "fingerprint": self.manifest["fingerprint"], "degradation": degradation.record()}

    def _loader(self, split: str, shuffle: bool):
        import torch
        from litdata import StreamingDataLoader
        from torch.utils.data import DataLoader

        self.setup()
        # each loader reads a dataset of its own, made here, in the process that iterates it: litdata reads the DDP
        # ranks when a dataset is made (setup may run before the launch), and a reader left open by an earlier pass
        # (first batches read in this process) is not shared with forked workers
        if not shuffle:                         # val and test: every item once, read by index (EvaluationItems)
            data = self.splits[split]
            data = data if isinstance(data, NoItems) else self.make_dataset(split, train=False)
            return DataLoader(EvaluationItems(data), batch_size=self.eval_batch_size, num_workers=self.num_workers,
                              collate_fn=self.collate)
        # litdata's shuffle seed is the run's, as the folders' sampler's (numpy's seeds: 32-bit)
        data = self.make_dataset(split, train=True, seed=torch.initial_seed() % 2**32)
        self.check_readers(data)
        loader = StreamingDataLoader(data, batch_size=self.batch_size, num_workers=self.num_workers,
                                     collate_fn=self.collate)
        # litdata counts the epochs a loader starts (from 1, adding 1 as each starts) and draws the order and the
        # degradations from that count: a resumed run's goes on from the checkpoint's epoch
        loader.current_epoch = self.start_epoch()
        return loader

    def check_readers(self, data) -> None:
        """Refuse a DDP run with more readers (processes x workers) than training chunks on local disk: litdata
        gives each reader of local chunks whole chunks, so a reader without one would end the epoch early and the
        other ranks would wait for it."""
        processes, _ = self.world()
        per_process = max(1, self.num_workers)
        readers, chunks = processes * per_process, len(data.subsampled_files)
        if processes > 1 and not is_remote(self.input_dir) and chunks < readers:
            raise ValueError(f"data.input_dir={self.input_dir}: train/ holds {chunks} chunk(s) but this run reads it "
                             f"with {readers} readers ({processes} processes x {per_process}: data.num_workers, or 1 "
                             f"without workers), and litdata gives each reader of local chunks whole chunks: convert "
                             f"again with a smaller --chunk-bytes, so that train/ holds at least {readers} chunks"
                             + (", or lower data.num_workers" if self.num_workers > 1 else ""))


# ---- command line ---------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cgml_lightning.data.streaming",
                                     description="Convert an image folder into litdata chunks for data=streaming.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="image folder -> OUT/{train,val,test} + OUT/cgml.json")
    c.add_argument("--root", required=True, help="the image folder (as data.root)")
    c.add_argument("--out", required=True, help="output folder (upload it to a bucket afterwards if you like)")
    c.add_argument("--paired", action="store_true", help="a paired folder (A|B images, or A/ and B/)")
    c.add_argument("--layout", default="auto", choices=("auto", "side_by_side", "folders"))
    c.add_argument("--val-fraction", type=float, default=0.05)
    c.add_argument("--test-fraction", type=float, default=0.05)
    c.add_argument("--split-seed", type=int, default=0)
    c.add_argument("--max-images", type=int, default=None)
    c.add_argument("--num-workers", type=int, default=1, help="litdata.optimize worker processes")
    c.add_argument("--chunk-bytes", default="64MB")
    c.add_argument("--overwrite", action="store_true", help="replace what --out holds (refused otherwise)")
    args = parser.parse_args(argv)
    try:
        check_root(args.root, key="--root")
    except OSError as err:                                      # no such folder, or a file: usage and the reason
        parser.error(str(err))
    try:
        manifest = convert(args.root, args.out, args.paired, args.layout, args.val_fraction, args.test_fraction,
                           args.split_seed, args.max_images, args.num_workers, args.chunk_bytes, args.overwrite)
    except (ValueError, OSError) as err:                        # the folder's files, named: the message alone
        print(f"Error: {err}", file=sys.stderr)
        return 1
    experiment = "paired_translation" if args.paired else "folder_completion"          # or colorization, ..._128
    chunks = len(list(Path(args.out, "train").expanduser().glob("chunk-*.bin")))   # DDP: a local reader's are whole
    print(f"wrote {args.out}: {manifest['splits']} (train: {chunks} chunk(s), fingerprint {manifest['fingerprint']}); "
          f"train with: cgml-train experiment={experiment} data=streaming data.input_dir={args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
