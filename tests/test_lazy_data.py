"""Lazy image folders and per-draw degradations: setup reads headers only and keeps no pixels, each file keeps its
row, training draws get a fresh mask per (index, epoch) that workers, resumed runs and DDP ranks agree on, val/test
stay fixed, paired augmentations keep A and B aligned, corrupt files are skipped and named, bad inputs are refused
by name, and the image presets compose. Small generated folders only."""
from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from PIL import Image, ImageFile
from torch.utils.data import DataLoader

from cgml_lightning.data import (ArrayDataModule, FashionMNISTDataModule, ImageFolderDataModule,
                                 PairedFolderDataModule, ToyDataModule)
from cgml_lightning.data.base import DegradedDataset, DrawSampler, IndexedDataset
from cgml_lightning.data.folders import FileTable, ImageDataError, walk_images
from cgml_lightning.models.cgml import z_phase_settings
from cgml_lightning.instantiate import instantiate

sys.path.insert(0, str(Path(__file__).parent))
from test_image_data import fashion_mnist, pixels, write_fake_fmnist, write_images  # noqa: E402

SMALL = {"batch_size": 4, "eval_batch_size": 4, "val_fraction": 0.2, "test_fraction": 0.2, "num_workers": 0}


def make(cls, root, **kwargs):
    dm = cls(root=str(root), **{**SMALL, **kwargs})
    dm.setup()
    return dm


def epoch_batches(dm, epoch: int, loader: DataLoader | None = None) -> list[dict]:
    loader = loader or dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return list(loader)


def by_index(batches: list[dict], key: str = "x") -> dict[int, torch.Tensor]:
    return {int(i): b[key][j] for b in batches for j, i in enumerate(b["index"])}


@pytest.fixture
def folder(tmp_path) -> Path:
    write_images(tmp_path / "imgs" / "a", 6, size=(20, 16))
    write_images(tmp_path / "imgs" / "b", 6, size=(18, 18), ext="jpg", seed=1)
    return tmp_path / "imgs"


@pytest.fixture
def no_decoding(monkeypatch):
    """Make any pixel decoding fail: what runs under it reads headers only."""
    def refuse(self, *args, **kwargs):
        raise AssertionError(f"decoded {self.filename} where only headers may be read")
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


# ---- setup keeps names, not pixels ---------------------------------------------------------------------------------
def test_setup_and_info_read_headers_only(folder, no_decoding):
    dm = make(ImageFolderDataModule, folder, image_size=16, mask="strokes")
    info = dm.info()
    assert info["x_shape"] == [4, 16, 16] and info["y_shape"] == [3, 16, 16] and info["num_train_samples"] == 8
    for data in dm.splits.values():                    # no tensor, and no array bigger than the names need
        held = [v for v in vars(data).values() if isinstance(v, (torch.Tensor, np.ndarray))]
        assert not any(isinstance(v, torch.Tensor) for v in held)
        table_bytes = sum(a.nbytes for a in vars(data.names).values())
        assert table_bytes < 64 * len(data) and sum(a.nbytes for a in held) <= 8 * len(data)


def test_file_table_is_compact_and_ordered(tmp_path):
    names = [f"d{i % 7}/sub/img_{i:06d}.png" for i in range(5000)]
    table = FileTable.build((n, i) for i, n in enumerate(names))
    assert len(table) == 5000 and table.name(1234) == names[1234] and list(table)[:3] == names[:3]
    nbytes = table.blob.nbytes + table.offsets.nbytes + table.sizes.nbytes
    assert nbytes <= sum(len(n) for n in names) + 16 * 5001                    # no Python object per file
    rows = np.array([4999, 0, 17])
    sub = table.take(rows)
    assert list(sub) == [names[r] for r in rows] and sub.sizes.tolist() == rows.tolist()
    for name in ("b.png", "a/z.png", "a.png", "a/b/c.jpg", "ä.webp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("no")
    listed = [name for name, _ in walk_images(tmp_path)]
    assert listed == [str(p.relative_to(tmp_path)) for p in sorted(tmp_path.rglob("*")) if p.suffix != ".txt" and p.is_file()]


def test_fingerprint_from_names_and_sizes(folder, no_decoding):
    first = make(ImageFolderDataModule, folder, image_size=16).info()["fingerprint"]
    assert make(ImageFolderDataModule, folder, image_size=8).info()["fingerprint"] == first    # pixels not involved
    victim = folder / "b" / "img_1_005.jpg"
    victim.write_bytes(victim.read_bytes() + b"\0")                             # one file one byte longer
    assert make(ImageFolderDataModule, folder, image_size=16).info()["fingerprint"] != first
    victim.rename(folder / "b" / "renamed.jpg")
    assert make(ImageFolderDataModule, folder, image_size=16).info()["fingerprint"] != first


# ---- per-draw degradations ------------------------------------------------------------------------------------------
def test_training_masks_are_fresh_per_epoch_and_val_test_fixed(folder):
    dm = make(ImageFolderDataModule, folder, image_size=16, mask="strokes")
    e0, e1, e0_again = (by_index(epoch_batches(dm, e)) for e in (0, 1, 0))
    assert set(e0) == set(range(8))
    assert all(torch.equal(e0[i], e0_again[i]) for i in e0)                     # a function of (index, epoch)
    assert sum(not torch.equal(e0[i][-1], e1[i][-1]) for i in e0) == 8          # each sample: a new mask
    y0, y1 = by_index(epoch_batches(dm, 0), "y"), by_index(epoch_batches(dm, 1), "y")
    assert all(torch.equal(y0[i], y1[i]) for i in y0)                          # no augmentation asked: same y
    for split in ("val", "test"):
        passes = [by_index(list(getattr(dm, f"{split}_dataloader")())) for _ in range(2)]
        assert all(torch.equal(passes[0][i], passes[1][i]) for i in passes[0])
    other_seed = dm.splits["train"][(0, 0, 99)]["seed"]
    assert other_seed != dm.splits["train"][(0, 0, 7)]["seed"]                 # the run seed matters too


def test_persistent_workers_see_the_epoch_and_resume_matches(folder):
    """Batches of epoch 1 after epoch 0 with persistent workers equal those of a fresh loader started at epoch 1
    (a resumed run), and those of the same loader without workers."""
    dm = make(ImageFolderDataModule, folder, image_size=16, mask="strokes", num_workers=1,
              augment={"crop_scale": 1.25, "hflip": True})
    torch.manual_seed(5)
    loader = dm.train_dataloader()
    assert loader.persistent_workers
    straight = [epoch_batches(dm, e, loader) for e in (0, 1)]
    torch.manual_seed(5)
    resumed = epoch_batches(dm, 1)
    dm.num_workers = 0
    torch.manual_seed(5)
    in_process = epoch_batches(dm, 1)
    for a, b, c in zip(straight[1], resumed, in_process):
        for key in ("x", "y", "index"):
            assert torch.equal(a[key], b[key]) and torch.equal(a[key], c[key])
    assert not torch.equal(by_index(straight[0])[0], by_index(straight[1])[0])


def test_two_ddp_ranks_agree_on_each_draw(folder):
    """Two ranks (two datamodules, two samplers, one seed): they split the rows between them, and any rank that
    draws (index, epoch) gets the same degradation and crop."""
    kwargs = dict(image_size=16, mask="mixed", augment={"crop_scale": 1.5, "hflip": True})
    ranks = [make(ImageFolderDataModule, folder, **kwargs) for _ in range(2)]
    samplers = [DrawSampler(dm.splits["train"], seed=11, num_replicas=2, rank=r) for r, dm in enumerate(ranks)]
    for epoch in (0, 3):
        keys = []
        for sampler in samplers:
            sampler.set_epoch(epoch)
            keys.append(list(sampler))
        assert {k[0] for k in keys[0]} | {k[0] for k in keys[1]} == set(range(8))
        assert not {k[0] for k in keys[0]} & {k[0] for k in keys[1]}           # 8 rows: no padding, no overlap
        assert all(k[1] == epoch and k[2] == 11 for k in keys[0] + keys[1])
        for key in keys[1]:                                                     # rank 0 redoing rank 1's draws
            mine, theirs = (dm.collate([dm.splits["train"][key]]) for dm in ranks)
            assert torch.equal(mine["x"], theirs["x"]) and torch.equal(mine["y"], theirs["y"])


def test_draw_sampler_order_is_seeded_by_seed_and_epoch():
    data = list(range(10))
    sampler = DrawSampler(data, seed=4)
    sampler.set_epoch(2)
    rows = [k[0] for k in sampler]
    assert rows == torch.randperm(10, generator=torch.Generator().manual_seed(6)).tolist()
    sampler.set_epoch(3)
    assert [k[0] for k in sampler] != rows and len(sampler) == 10


def test_in_memory_sets_draw_per_epoch_too(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "not-installed")
    write_fake_fmnist(tmp_path, n_train=40, n_test=10)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), task="completion", mask="strokes", val_fraction=0.25,
                                batch_size=8)
    dm.setup()
    assert isinstance(dm.splits["train"], DegradedDataset) and dm.info()["x_shape"] == [2, 28, 28]
    e0, e1 = by_index(epoch_batches(dm, 0)), by_index(epoch_batches(dm, 1))
    assert set(e0) == set(range(30)) and all(not torch.equal(e0[i][-1], e1[i][-1]) for i in e0)
    for split in ("val", "test"):
        passes = [by_index(list(getattr(dm, f"{split}_dataloader")())) for _ in range(2)]
        assert all(torch.equal(passes[0][i], passes[1][i]) for i in passes[0])
    half = FashionMNISTDataModule(data_dir=str(tmp_path), val_fraction=0.25)
    half.setup()
    assert isinstance(half.splits["train"], IndexedDataset)                     # a fixed task stays precomputed
    fixed = by_index(epoch_batches(half, 0)), by_index(epoch_batches(half, 1))
    assert all(torch.equal(fixed[0][i], fixed[1][i]) for i in fixed[0])


# ---- augmentation, paired data --------------------------------------------------------------------------------------
def write_twins(root: Path, n: int, size=(24, 20)) -> None:
    """A|B images whose halves are the same picture: after any shared crop and flip, x must equal y exactly."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = pixels(i, size, 3)
        Image.fromarray(np.concatenate([a, a], axis=1)).save(root / f"{i:02d}.png")


@pytest.mark.parametrize("layout", ["side_by_side", "folders"])
def test_paired_crops_and_flips_keep_a_and_b_aligned(tmp_path, layout):
    if layout == "side_by_side":
        write_twins(tmp_path, 10)
    else:
        for i in range(10):
            a = pixels(i, (24, 20), 3)
            for side in "AB":
                (tmp_path / side).mkdir(exist_ok=True)
                Image.fromarray(a).save(tmp_path / side / f"{i:02d}.png")
    dm = make(PairedFolderDataModule, tmp_path, image_size=16, augment={"crop_scale": 1.5, "hflip": True},
              val_fraction=0.1, test_fraction=0.1)
    draws = [by_index(epoch_batches(dm, e), key) for e in range(3) for key in ("x", "y")]
    for x, y in zip(draws[::2], draws[1::2]):
        assert all(torch.equal(x[i], y[i]) for i in x)
    centre = by_index([dm.collate([dm.splits["train"][i] for i in range(8)])])   # plain rows: centre crop
    assert sum(not torch.equal(draws[0][i], centre[i]) for i in centre) >= 6     # training draws move the crop
    flipped = [any(torch.equal(d[i], centre[i].flip(-1)) for d in draws[::2]) for i in centre]
    assert any(flipped) or sum(not torch.equal(draws[0][i], draws[2][i]) for i in centre) >= 6
    val = [by_index(list(dm.val_dataloader())) for _ in range(2)]
    assert all(torch.equal(val[0][i], val[1][i]) for i in val[0])


def test_augmentation_only_in_training(folder):
    dm = make(ImageFolderDataModule, folder, image_size=16, task="identity", augment={"crop_scale": 1.5, "hflip": True})
    plain = dm.collate([dm.splits["train"][i] for i in range(8)])
    drawn = by_index(epoch_batches(dm, 0), "y")
    assert sum(not torch.equal(drawn[i], plain["y"][i]) for i in range(8)) >= 6
    assert dm.splits["val"].augment is None and dm.splits["test"].augment is None


@pytest.mark.parametrize("value,message", [
    ({"crop_scale": 0.5}, r"data.augment.crop_scale must be a number in \[1, 4\]"),
    ({"hflip": "yes"}, "data.augment.hflip must be true or false"),
    ({"rotate": 10}, r"data.augment: unknown key\(s\) \['rotate'\]"),
])
def test_bad_augment_options(tmp_path, value, message):
    with pytest.raises(ValueError, match=message):
        ImageFolderDataModule(root=str(tmp_path), augment=value)


# ---- corrupt files, bad inputs -------------------------------------------------------------------------------------
def test_file_corrupted_after_setup_is_skipped_and_named(folder):
    dm = make(ImageFolderDataModule, folder, image_size=16, mask="strokes", val_fraction=0.0, test_fraction=0.0)
    victim = dm.files[5]
    victim.write_bytes(b"garbage now")
    with pytest.warns(UserWarning, match=rf"skipping unreadable image {victim}"):
        batches = epoch_batches(dm, 0)
    rows = torch.cat([b["index"] for b in batches]).tolist()
    assert len(rows) == 12 and 5 not in rows and len(set(rows)) == 11             # one row stood in, kept its row
    assert dm.info()["num_train_samples"] == 12                                    # no other file changed row


def test_stand_ins_are_spread_and_fixed_by_the_draw(tmp_path):
    """A run of unreadable files (sorted together, as macOS's ._ files are) does not pile its draws onto the one
    readable file after it, and which row stands in depends on the draw alone: the same in every fresh copy."""
    write_images(tmp_path / "imgs", 16, size=(8, 8))
    dm = make(ImageFolderDataModule, tmp_path / "imgs", image_size=8, val_fraction=0.0, test_fraction=0.0)
    for path in dm.files[4:10]:
        path.write_bytes(b"garbage now")
    with pytest.warns(UserWarning, match="a readable image drawn at random stands in"):
        rows = [torch.cat([b["index"] for b in epoch_batches(dm, epoch)]).tolist() for epoch in (0, 1)]
    for epoch_rows in rows:
        assert len(epoch_rows) == 16 and not set(epoch_rows) & set(range(4, 10))
        assert max(epoch_rows.count(r) for r in epoch_rows) <= 3      # the next-row rule gave row 10 seven draws
    fresh = make(ImageFolderDataModule, tmp_path / "imgs", image_size=8, val_fraction=0.0, test_fraction=0.0)
    with pytest.warns(UserWarning):
        assert torch.cat([b["index"] for b in epoch_batches(fresh, 1)]).tolist() == rows[1]


def test_file_corrupted_after_setup_in_a_worker(folder):
    dm = make(ImageFolderDataModule, folder, image_size=16, val_fraction=0.0, test_fraction=0.0, num_workers=1)
    dm.files[2].write_bytes(b"garbage now")
    rows = torch.cat([b["index"] for b in epoch_batches(dm, 0)]).tolist()        # the worker warns, never crashes
    assert len(rows) == 12 and 2 not in rows


def animated(path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)


@pytest.mark.parametrize("name,write,message", [
    ("anim.webp", animated, r"anim.webp: an animated image \(2 frames\)"),
    ("anim.png", animated, r"anim.png: an animated image \(2 frames\)"),
    ("clear.png", lambda p: Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(p), "clear.png: fully transparent"),
    ("dot.png", lambda p: Image.new("RGB", (1, 1)).save(p), r"dot.png: 1x1 pixels .W x H.; images need at least 2x2"),
    ("line.png", lambda p: Image.new("L", (9, 1)).save(p), r"line.png: 9x1 pixels"),
])
def test_bad_images_are_errors_naming_the_file(tmp_path, name, write, message):
    """data.check_files=true: an error at setup; by default (no header read at setup) the worker that reads the
    file skips it with a warning naming it and why, and another row stands in with its own index."""
    write_images(tmp_path, 4, size=(8, 8))
    write(tmp_path / name)
    with pytest.raises(ImageDataError, match=message):
        make(ImageFolderDataModule, tmp_path, image_size=8, check_files=True)
    dm = make(ImageFolderDataModule, tmp_path, image_size=8, val_fraction=0.0, test_fraction=0.0)
    row = [p.name for p in dm.files].index(name)
    with pytest.warns(UserWarning, match=f"skipping unreadable image .*{message}"):
        item = dm.splits["train"][row]
    assert item["index"] != row and 0 <= item["index"] < 5


def test_partly_transparent_and_grey_alpha_images_are_fine(tmp_path):
    write_images(tmp_path, 4, size=(8, 8))
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[2:4, 2:4] = 200
    Image.fromarray(rgba).save(tmp_path / "spot.png")
    Image.new("LA", (8, 8), (90, 255)).save(tmp_path / "la.png")
    assert make(ImageFolderDataModule, tmp_path, image_size=8).info()["num_train_samples"] == 4


def test_paired_halves_too_small(tmp_path):
    write_images(tmp_path, 4, size=(2, 6))
    with pytest.raises(ImageDataError, match=r"img_0_000.png: an A\|B image needs an even width .*halves of at least"):
        make(PairedFolderDataModule, tmp_path, check_files=True)


# ---- in-memory arrays: tiny sets and empty features ---------------------------------------------------------------
class Arrays(ArrayDataModule):
    def __init__(self, x, y, **kwargs):
        super().__init__(**kwargs)
        self.x, self.y = x, y

    def load_arrays(self):
        return self.x, self.y


@pytest.mark.parametrize("n", [3, 4, 5])
def test_tiny_arrays_give_every_split_a_sample(n):
    dm = Arrays(torch.rand(n, 2), torch.rand(n, 1), val_fraction=0.1, test_fraction=0.1)
    dm.setup()
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [n - 2, 1, 1]


def test_too_few_arrays_name_the_sizes():
    with pytest.raises(ValueError, match=r"Arrays: 2 sample\(s\) are too few for val_fraction=0.1 and "
                                         r"test_fraction=0.1 \(val 1 \+ test 1 leave 0 for training"):
        Arrays(torch.rand(2, 2), torch.rand(2, 1), val_fraction=0.1, test_fraction=0.1).setup()
    dm = Arrays(torch.rand(2, 2), torch.rand(2, 1), val_fraction=0.0, test_fraction=0.0)
    dm.setup()
    assert len(dm.splits["train"]) == 2 and len(dm.splits["val"]) == 0


@pytest.mark.parametrize("x,y,name,shape", [
    (torch.rand(6, 0), torch.rand(6, 1), "x", r"\(6, 0\)"), (torch.rand(6, 2), torch.rand(6, 0), "y", r"\(6, 0\)"),
])
def test_arrays_without_features_are_refused(x, y, name, shape):
    with pytest.raises(ValueError, match=rf"Arrays: {name} has shape {shape}: no features per sample"):
        Arrays(x, y).setup()


def test_toy_split_sizes_unchanged():
    dm = ToyDataModule(num_samples=512, val_fraction=0.05, test_fraction=0.05)
    dm.setup()
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [460, 26, 26]


# ---- presets -----------------------------------------------------------------------------------------------------
def compose_train(overrides: list[str]):
    with initialize_config_module(config_module="cgml_lightning.conf", version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.mark.parametrize("experiment,size,net,x_channels", [
    ("folder_completion", 64, "unet_64", 4), ("folder_completion_128", 128, "unet_128", 4),
    ("folder_completion_256", 256, "unet_256", 4), ("colorization", 64, "unet_64", 1),
    ("colorization_128", 128, "unet_128", 1), ("colorization_256", 256, "unet_256", 1),
    ("paired_translation", 64, "unet_64", 3), ("paired_translation_128", 128, "unet_128", 3),
    ("paired_translation_256", 256, "unet_256", 3),
])
def test_image_presets_compose_and_set_up(tmp_path, no_decoding, monkeypatch, experiment, size, net, x_channels):
    """Each preset composes and sets up reading headers only; colorization also decodes a bounded sample (at most
    COLOUR_CHECKS images, small) to check that the images have colour."""
    from cgml_lightning.data import folders

    checked = []
    monkeypatch.setattr(folders, "is_grey", lambda path: checked.append(path) or False)
    write_images(tmp_path, 6, size=(10, 8))
    cfg = compose_train([f"experiment={experiment}", f"data.root={tmp_path}", "data.num_workers=0"])
    assert cfg.data.image_size == size and cfg.net.name == "unet" and cfg.data.batch_size >= 8
    assert cfg.net.depth >= 4 and size // 2 ** cfg.net.depth >= 4                # a bottleneck of 4x4 or more
    assert cfg.model.z_phase == "auto" and cfg.model.z_steps is None              # from the preset, by data kind
    with initialize_config_module(config_module="cgml_lightning.conf", version_base="1.3"):
        assert compose("train", [f"experiment={experiment}"]).net == compose("train", [f"net={net}"]).net
    if experiment.startswith("paired"):
        return                                                                      # pairs: test_image_data.py
    dm = instantiate(cfg.data)
    dm.setup()
    assert dm.info()["x_shape"] == [x_channels, size, size] and dm.augment.active
    assert z_phase_settings("auto", dm.info()["kind"])["z_steps"] == 3              # cGML's image settings apply
    if experiment.startswith("folder_completion"):
        assert cfg.data.mask == "mixed"
    assert 0 < len(checked) <= folders.COLOUR_CHECKS if experiment.startswith("colorization") else not checked


@pytest.mark.slow
@pytest.mark.parametrize("w_steps", [1, 2])
def test_exact_resume_with_per_draw_masks(tmp_path, w_steps):
    """Two epochs straight and one + a resume from its checkpoint end equal (weights, latent table, optimizers)
    with fresh masks and crops per draw, also with two w-steps per batch."""
    from cgml_lightning.commands.train import run_train

    write_images(tmp_path / "imgs", 14, size=(10, 10))
    common = ["experiment=folder_completion", f"data.root={tmp_path / 'imgs'}", "data.image_size=8", "net=unet_small",
              "data.num_workers=1", "data.batch_size=4", "seed=3", "trainer.deterministic=true", "trainer.max_epochs=2",
              "logger=none", "~callbacks.rich_progress_bar", "~callbacks.sample_grid", "eval.num_samples=2",
              "eval.num_inputs=2", "callbacks.model_checkpoint.save_top_k=-1", f"model.w_steps={w_steps}"]

    def job(out: Path, *extra: str) -> Path:
        with initialize_config_module(config_module="cgml_lightning.conf", version_base="1.3"):
            cfg = compose("train", overrides=[*common, *extra, f"hydra.run.dir={out}"], return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(out)
        HydraConfig().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        try:
            run_train(cfg)
        finally:
            HydraConfig.instance().cfg = None
        return out / "checkpoints"

    straight = job(tmp_path / "straight")
    resumed = job(tmp_path / "resumed", f"ckpt_path={straight / 'epoch_000.ckpt'}")
    a, b = (torch.load(d / "last.ckpt", map_location="cpu", weights_only=True) for d in (straight, resumed))
    assert a["global_step"] == b["global_step"] > 0
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for x, y in zip(a["optimizer_states"], b["optimizer_states"]):
        for k, state in x["state"].items():
            assert all(torch.equal(state[s], y["state"][k][s]) for s in state if isinstance(state[s], torch.Tensor))
    L.seed_everything(0)
