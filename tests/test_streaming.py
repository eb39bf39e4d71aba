"""data=streaming on litdata: convert a small generated folder, stream it back, and get the folder datamodule's
samples row for row (val/test fixed, training draws equal per (index, epoch)); paired folders too; unsafe chunk
formats and missing manifests are refused by name. Skipped without litdata (an optional extra)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from PIL import Image

pytest.importorskip("litdata")

from cgml_lightning.data import ImageFolderDataModule, PairedFolderDataModule, StreamingDataModule  # noqa: E402
from cgml_lightning.data.streaming import convert  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_image_data import pixels, write_images  # noqa: E402

SPLIT = {"val_fraction": 0.2, "test_fraction": 0.1, "split_seed": 3}
TASK = {"image_size": 16, "task": "completion", "mask": "strokes", "augment": {"crop_scale": 1.25, "hflip": True}}


def rows(batches: list[dict]) -> dict[int, dict[str, torch.Tensor]]:
    return {int(i): {k: b[k][j] for k in ("x", "y")} for b in batches for j, i in enumerate(b["index"])}


def assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b) and a
    for i in a:
        for key in ("x", "y"):
            assert torch.equal(a[i][key], b[i][key]), (i, key)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("folder")
    write_images(root / "a", 8, size=(20, 16))
    write_images(root / "b" / "c", 7, size=(18, 18), ext="jpg", seed=1)
    out = tmp_path_factory.mktemp("chunks")
    convert(root, out, **SPLIT)
    return root, out


def test_round_trip_equals_the_folder(converted):
    root, out = converted
    folder = ImageFolderDataModule(root=str(root), batch_size=4, eval_batch_size=4, **SPLIT, **TASK)
    folder.setup()
    stream = StreamingDataModule(input_dir=str(out), batch_size=4, eval_batch_size=4, num_workers=0, **TASK)
    assert stream.info() == folder.info()                                       # shapes, size, fingerprint
    assert json.loads((out / "cgml.json").read_text())["splits"] == {"train": 10, "val": 3, "test": 2}
    for split in ("val", "test"):                                               # fixed degradations, no augmentation
        assert_same(rows(list(getattr(stream, f"{split}_dataloader")())), rows(list(getattr(folder, f"{split}_dataloader")())))
    torch.manual_seed(9)
    loader = stream.train_dataloader()
    epochs = [rows(list(loader)) for _ in range(2)]                             # litdata's own order and epochs
    data = folder.splits["train"]
    for epoch, streamed in enumerate(epochs):
        expected = rows([folder.collate([data[(i, epoch, 9)] for i in range(len(data))])])
        assert_same(streamed, expected)                                          # each draw: the folder's draw
    assert any(not torch.equal(epochs[0][i]["x"], epochs[1][i]["x"]) for i in epochs[0])


def test_paired_round_trip(tmp_path):
    for i in range(6):
        a = pixels(i, (12, 10), 3)
        Image.fromarray(np.concatenate([a, 255 - a], axis=1)).save(tmp_path / f"{i:02d}.png")
    out = tmp_path / "out"
    convert(tmp_path, out, paired=True, val_fraction=0.2, test_fraction=0.2)
    kw = dict(image_size=8, direction="BtoA", batch_size=2, eval_batch_size=2)
    folder = PairedFolderDataModule(root=str(tmp_path), val_fraction=0.2, test_fraction=0.2, **kw)
    stream = StreamingDataModule(input_dir=str(out), num_workers=0, **kw)
    assert stream.info() == folder.info() and stream.info()["x_shape"] == [3, 8, 8]
    assert_same(rows(list(stream.val_dataloader())), rows(list(folder.val_dataloader())))
    for batch in stream.train_dataloader():
        assert torch.allclose(batch["x"], 1 - batch["y"], atol=1.5 / 255)        # BtoA: x = B = 1 - A, aligned


def test_convert_command_line(tmp_path):
    write_images(tmp_path / "imgs", 6, size=(8, 8))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "cgml_lightning.data.streaming", "convert", "--root",
                           str(tmp_path / "imgs"), "--out", str(out), "--val-fraction", "0.2", "--test-fraction", "0.2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "data=streaming data.input_dir=" in done.stdout and (out / "train" / "index.json").is_file()
    assert "(train: 1 chunk(s)," in done.stdout                                 # what a DDP run needs to know
    again = [sys.executable, "-m", "cgml_lightning.data.streaming", "convert", "--root", str(tmp_path / "imgs"),
             "--out", str(out)]
    manifest = (out / "cgml.json").read_bytes()
    refused = subprocess.run(again, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert f"Error: --out {out} holds an earlier conversion" in refused.stderr and "--overwrite" in refused.stderr
    assert (out / "cgml.json").read_bytes() == manifest                         # the earlier conversion, untouched
    done = subprocess.run([*again, "--overwrite"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_chunks_of_pairs_and_of_single_images_refuse_the_other_kind_of_task(converted, tmp_path):
    """An unpaired experiment on paired chunks (its task would be dropped) and a paired one on single images (they
    would train completion under its name) are refused, naming the chunks and the experiment to use."""
    _, single = converted
    for i in range(6):
        a = pixels(i, (12, 10), 3)
        Image.fromarray(np.concatenate([a, 255 - a], axis=1)).save(tmp_path / f"{i:02d}.png")
    paired = tmp_path / "paired"
    convert(tmp_path, paired, paired=True, val_fraction=0.2, test_fraction=0.2)
    with pytest.raises(ValueError, match=r"holds A\|B pairs .* data.task=completion .*experiment=paired_translation"):
        StreamingDataModule(input_dir=str(paired), image_size=8, task="completion").setup()
    with pytest.raises(ValueError, match=r"holds single images .* data.direction=AtoB is for A\|B pairs"):
        StreamingDataModule(input_dir=str(single), image_size=8, direction="AtoB").setup()
    StreamingDataModule(input_dir=str(paired), image_size=8, direction="BtoA").setup()          # what fits
    assert StreamingDataModule(input_dir=str(single), image_size=8).info()["mask_channel"]      # completion


def test_refuses_pickled_items_and_missing_manifest(converted, tmp_path):
    _, out = converted
    bad = tmp_path / "bad"
    (bad / "train").mkdir(parents=True)
    manifest = json.loads((out / "cgml.json").read_text())
    manifest["splits"] = {"train": 11, "val": 0, "test": 0}
    (bad / "cgml.json").write_text(json.dumps(manifest))
    index = json.loads((out / "train" / "index.json").read_text())
    index["config"]["data_format"] = ["int", "int", "str", "pickle", "bytes"]
    (bad / "train" / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"train/index.json declares item formats .*'pickle'"):
        StreamingDataModule(input_dir=str(bad)).setup()
    with pytest.raises(FileNotFoundError, match="no cgml.json in .*streaming convert"):
        StreamingDataModule(input_dir=str(tmp_path)).setup()
    with pytest.raises(FileNotFoundError, match="data.input_dir: no such folder: .*nowhere"):
        StreamingDataModule(input_dir=str(tmp_path / "nowhere")).setup()
    with pytest.raises(ValueError, match="data.input_dir is required"):
        StreamingDataModule()


@pytest.mark.parametrize("experiment", ["folder_completion", "colorization_128", "paired_translation"])
def test_image_experiments_train_from_chunks(converted, tmp_path, experiment):
    """`experiment=... data=streaming data.input_dir=OUT`, as docs/data.md shows: the experiment's data settings
    (task, masks, size) reach the streaming datamodule, and nothing asks for data.root; pairs from paired chunks."""
    from hydra import compose, initialize_config_module

    from cgml_lightning.instantiate import instantiate

    _, out = converted
    if experiment == "paired_translation":
        for i in range(15):
            a = pixels(i, (12, 10), 3)
            Image.fromarray(np.concatenate([a, 255 - a], axis=1)).save(tmp_path / f"{i:02d}.png")
        out = tmp_path / "paired"
        convert(tmp_path, out, paired=True, **SPLIT)
    with initialize_config_module(config_module="cgml_lightning.conf", version_base="1.3"):
        cfg = compose("train", [f"experiment={experiment}", "data=streaming", f"data.input_dir={out}",
                                "data.num_workers=0", "data.image_size=16", "data.batch_size=4"])
    dm = instantiate(cfg.data)
    batch = next(iter(dm.train_dataloader()))
    assert batch["y"].shape == (4, 3, 16, 16) and dm.info()["num_train_samples"] == 10
    assert batch["x"].shape[1] == {"folder_completion": 4, "colorization_128": 1, "paired_translation": 3}[experiment]


def test_input_dir_with_a_tilde_is_the_home_folder(converted, monkeypatch):
    _, out = converted
    monkeypatch.setenv("HOME", str(out.parent))
    stream = StreamingDataModule(input_dir=f"~/{out.name}", batch_size=4, eval_batch_size=4, num_workers=0, **TASK)
    assert stream.input_dir == str(out) and len(next(iter(stream.train_dataloader()))["y"]) == 4


def test_chunks_skip_what_the_folder_skips(tmp_path):
    """A streamed item passes the folder datasets' checks: a pair with an empty B file, a pair whose sides differ
    in size and a fully transparent image are skipped with a warning naming them, as the folder skips them."""
    for i in range(6):
        for side in ("A", "B"):
            (tmp_path / "pairs" / side).mkdir(parents=True, exist_ok=True)
            size = (14, 10) if (side, i) == ("B", 4) else (12, 10)                 # pair 4: sides differ in size
            Image.fromarray(pixels(i, size, 3)).save(tmp_path / "pairs" / side / f"{i}.png")
    (tmp_path / "pairs" / "B" / "5.png").write_bytes(b"")                          # pair 5: an empty B file
    convert(tmp_path / "pairs", tmp_path / "paired", paired=True, val_fraction=0, test_fraction=0)
    stream = StreamingDataModule(input_dir=str(tmp_path / "paired"), image_size=8, direction="AtoB")
    stream.setup()
    with pytest.warns(UserWarning, match="skipping unreadable pair A/[45].png") as caught:
        items = [stream.splits["train"][i] for i in range(6)]
    assert sum(item is None for item in items) == 2 and len(caught) == 2
    assert any("A and B differ in size" in str(w.message) for w in caught)

    write_images(tmp_path / "single", 4, size=(8, 8))
    clear = np.zeros((8, 8, 4), dtype=np.uint8)
    Image.fromarray(clear).save(tmp_path / "single" / "clear.png")                # fully transparent
    convert(tmp_path / "single", tmp_path / "chunks", val_fraction=0, test_fraction=0)
    stream = StreamingDataModule(input_dir=str(tmp_path / "chunks"), image_size=8)
    stream.setup()
    with pytest.warns(UserWarning, match="skipping unreadable image clear.png .*fully transparent"):
        items = [stream.splits["train"][i] for i in range(5)]
    assert sum(item is None for item in items) == 1


def test_a_failed_conversion_keeps_the_earlier_one(tmp_path, monkeypatch):
    """--overwrite writes beside OUT and moves the result in: a conversion that fails leaves OUT as it was."""
    import litdata

    write_images(tmp_path / "imgs", 6, size=(8, 8))
    out = tmp_path / "out"
    convert(tmp_path / "imgs", out, val_fraction=0.2, test_fraction=0.2)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def broken(*args, output_dir, **kwargs):                                       # fails half-way through
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "chunk-0-0.bin").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(litdata, "optimize", broken)
    with pytest.raises(OSError, match="disk full"):
        convert(tmp_path / "imgs", out, val_fraction=0.2, test_fraction=0.2, overwrite=True)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in out.iterdir()) == ["cgml.json", "test", "train", "val"]   # no staging folder left
    monkeypatch.undo()
    replace = os.replace

    def fails_on_val(src, dst):                                     # the swap itself fails half-way
        if Path(dst) == out / "val" and ".converting-" in str(src) and "earlier" not in str(src):
            raise OSError("cross-device link")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", fails_on_val)
    with pytest.raises(OSError, match="cross-device"):
        convert(tmp_path / "imgs", out, val_fraction=0.5, test_fraction=0.0, overwrite=True)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    monkeypatch.undo()
    convert(tmp_path / "imgs", out, val_fraction=0.5, test_fraction=0.0, overwrite=True)
    assert json.loads((out / "cgml.json").read_text())["splits"] == {"train": 3, "val": 3, "test": 0}
    assert not (out / "test").exists()                                              # the earlier split, gone


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS file systems refuse names that are not UTF-8")
def test_a_file_name_that_is_not_utf8_converts(tmp_path):
    write_images(tmp_path / "imgs", 5, size=(8, 8))
    odd = os.fsdecode(b"caf\xe9.png")                                               # Latin-1, as old archives hold
    first = sorted((tmp_path / "imgs").iterdir())[0]
    first.rename(tmp_path / "imgs" / odd)
    convert(tmp_path / "imgs", tmp_path / "out", val_fraction=0, test_fraction=0)
    stream = StreamingDataModule(input_dir=str(tmp_path / "out"), image_size=8, num_workers=0, batch_size=5)
    assert len(next(iter(stream.train_dataloader()))["y"]) == 5


# ---- training from chunks: exact resume, and DDP ranks -------------------------------------------------------------
TRAIN = ["experiment=folder_completion", "data=streaming", "data.image_size=8", "net=unet_small", "data.batch_size=4",
         "seed=3", "trainer.max_epochs=2", "logger=none", "~callbacks.rich_progress_bar", "~callbacks.sample_grid",
         "eval.num_samples=2", "callbacks.model_checkpoint.save_top_k=-1"]


def test_a_resumed_run_streams_the_epoch_it_resumes(converted, tmp_path):
    """Two epochs straight and one + a resume from its epoch checkpoint end equal: litdata's loader counts the
    epochs it starts itself, so a loader made for the resumed run must start at the checkpoint's epoch."""
    from helpers import compose_job

    from cgml_lightning.commands.train import run_train

    _, out = converted

    def job(run: Path, *extra: str) -> dict:
        try:
            run_train(compose_job(run, *TRAIN, f"data.input_dir={out}", "data.num_workers=1", *extra))
        finally:
            HydraConfig.instance().cfg = None
        return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)

    straight = job(tmp_path / "straight")
    resumed = job(tmp_path / "resumed", f"ckpt_path={tmp_path / 'straight' / 'checkpoints' / 'epoch_000.ckpt'}")
    assert straight["global_step"] == resumed["global_step"] > 0
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key


@pytest.mark.parametrize("model", ["cgml", "cimle"])
def test_ddp_ranks_train_on_their_shares_and_rank_0_evaluates_every_test_item(tmp_path, model):
    """trainer=ddp_sim on chunks whose training split holds an unreadable file: each rank streams its share (the
    datasets are made after the launch; the whole-set count is checked, not a rank's), the ranks' batches differ in
    size where the file is skipped and every rank's rows reach the latent table all the same, a validation split smaller
    than the ranks' batches still validates, and the final evaluation on rank 0 scores every test item, not rank 0's
    share."""
    from helpers import compose_job, load, run_cli

    from cgml_lightning.runs import build_datamodule, build_module

    write_images(tmp_path / "imgs", 19, size=(10, 10))
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    folder = ImageFolderDataModule(root=str(tmp_path / "imgs"), image_size=8, val_fraction=0.1, test_fraction=0.2)
    folder.setup()
    names = [folder.splits["train"].names.name(r) for r in range(len(folder.splits["train"]))]
    assert "broken.png" in names, names                          # the fixed split puts it among the training rows
    convert(tmp_path / "imgs", tmp_path / "chunks", val_fraction=0.1, test_fraction=0.2, chunk_bytes="1kb")
    overrides = [*TRAIN, f"data.input_dir={tmp_path / 'chunks'}", "data.num_workers=0", "trainer=ddp_sim",
                 "trainer.max_epochs=1", f"model={model}"]
    run_cli("cgml-train", *overrides, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=600)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["num_inputs"] == len(folder.splits["test"]) == 4
    try:
        cfg = compose_job(tmp_path / "rebuild", *overrides)
        L.seed_everything(cfg.seed, workers=True)
        initial = build_module(cfg, build_datamodule(cfg)).latents.detach()
    finally:
        HydraConfig.instance().cfg = None
    table = load(tmp_path / "run" / "checkpoints" / "last.ckpt")["state_dict"]["latents"]
    moved = (table - initial).abs().amax(1) > 1e-6
    # litdata evens the ranks by dropping items (drop_last under DDP): 4 of 7 chunks to one rank, 3 to the other,
    # then 4 items each (the smaller share, in whole batches). With seed 3 the unreadable file is among rank 0's:
    # its batch holds 3 rows against rank 1's 4. Both ranks' rows are written, each in its own row, and no padding
    # row is: 7 rows move, the unreadable file's row never moves, and cGML's rows stay unit vectors (a padding
    # row would be zeros; cIMLE's latents are Gaussian draws, not on the sphere).
    assert int(moved.sum()) == 7 and not moved[names.index("broken.png")]
    if model == "cgml":
        assert torch.allclose(table.norm(dim=1), torch.ones(len(table)), atol=1e-5)
    else:
        assert (table[moved].norm(dim=1) > 0.5).all()


def test_a_ddp_run_with_fewer_local_chunks_than_readers_is_refused(converted, tmp_path):
    """litdata gives each reader of local chunks whole chunks: with fewer chunks than processes x workers a rank
    would end its epoch early and the others would wait for it, so the run is refused, naming --chunk-bytes."""
    root, out = converted
    stream = StreamingDataModule(input_dir=str(out), batch_size=4, num_workers=2, **TASK)
    stream.world = lambda: (2, 0)
    with pytest.raises(ValueError, match=r"train/ holds 1 chunk\(s\) .* 4 readers .*--chunk-bytes"):
        stream.train_dataloader()
    convert(root, tmp_path / "small", **SPLIT, chunk_bytes="1kb")
    small = StreamingDataModule(input_dir=str(tmp_path / "small"), batch_size=4, num_workers=2, **TASK)
    small.world = lambda: (2, 0)
    assert len(small.train_dataloader().dataset.subsampled_files) >= 4
