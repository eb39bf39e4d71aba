"""Progress bars (cgml_lightning.progress) over evaluation and the dataset classifier, and the classifier's device."""
from __future__ import annotations

import pytest
import rich
import torch
from rich.console import Console
from rich.errors import LiveError
from rich.live import Live
from rich.progress import Progress

from cgml_lightning import CGMLModule
from cgml_lightning.evaluation import evaluate, num_batches
from cgml_lightning.evaluation.feature_nets import build_eval_nets, load_or_train_classifier, train_classifier
from cgml_lightning.progress import track

TINY_CLASSIFIER = {"steps": 5, "width": 4, "feature_dim": 8}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class Items:
    """An iterable without a length."""

    def __iter__(self):
        return iter("abcde")


# ---- track ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("setting", [None, "1", "0", "off"])
def test_track_yields_every_item_in_order(setting, monkeypatch, capsys):
    if setting is None:
        monkeypatch.delenv("CGML_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("CGML_PROGRESS", setting)
    assert list(track(range(7), "counting")) == list(range(7))
    assert list(track(Items(), "letters")) == list("abcde")
    assert list(track([], "nothing")) == []
    err = capsys.readouterr().err
    if setting in ("0", "off"):
        assert err == ""
    else:                    # stderr is no terminal here: one final line per bar, no redraws
        lines = err.splitlines()
        assert len(lines) == 3, err
        assert "counting" in lines[0] and "7/7" in lines[0]
        assert "letters" in lines[1] and "5/?" in lines[1]


def test_track_with_a_live_display_already_active(monkeypatch):
    monkeypatch.delenv("CGML_PROGRESS", raising=False)
    with Live("outer", console=rich.get_console()):
        assert list(track(range(5), "inner")) == list(range(5))
    with Live("outer", console=Console(stderr=True)):
        assert list(track(range(5), "beside")) == list(range(5))

    def refuse(self):                                   # what Rich before nesting raises for a second live display
        raise LiveError("Only one live display may be active at once")

    monkeypatch.setattr(Progress, "start", refuse)
    assert list(track(range(5), "refused")) == list(range(5))


def test_track_stops_its_bar_when_the_loop_breaks(monkeypatch, capsys):
    monkeypatch.delenv("CGML_PROGRESS", raising=False)
    items = track(range(10), "early stop")
    for i in items:
        if i == 2:
            break
    items.close()
    err = capsys.readouterr().err
    assert "early stop" in err and "3/10" in err


def test_num_batches_bounds_the_evaluation_bar(digits_dm):
    loader = digits_dm.test_dataloader()                # batches of 32
    assert num_batches(loader, 40) == 2 and num_batches(loader, 32) == 1
    assert num_batches(loader, 10**6) == len(loader)
    assert num_batches(Items(), 40) is None


# ---- evaluate ----------------------------------------------------------------------------------------------------
def test_evaluate_same_metrics_with_progress_on_and_off(digits_dm, monkeypatch, capsys):
    torch.manual_seed(0)
    module = CGMLModule(digits_dm.info(), {"name": "unet", "width": 8, "depth": 1}, z_phase="paper", latent_dim=4)
    runs = {}
    for setting in ("1", "0"):
        monkeypatch.setenv("CGML_PROGRESS", setting)
        runs[setting] = evaluate(module, digits_dm, num_samples=2, num_inputs=40, sample_pool=3)
        runs[setting + "-err"] = capsys.readouterr().err
    assert runs["1"] == runs["0"] and runs["1"]["num_inputs"] == 40
    assert "evaluate: 2 samples x 40 inputs (medoids of 3 per input)" in runs["1-err"] and "2/2" in runs["1-err"]
    assert runs["0-err"] == ""


# ---- the dataset classifier on a given device -------------------------------------------------------------------
def on(net: torch.nn.Module) -> set[torch.device]:
    return {p.device for p in net.parameters()} | {b.device for b in net.buffers()}


def test_classifier_trains_on_the_given_device_with_progress(digits_dm, monkeypatch, capsys):
    monkeypatch.delenv("CGML_PROGRESS", raising=False)
    y, labels = digits_dm.splits["train"].y, digits_dm.splits["train"].label
    net = train_classifier(y, labels, 10, width=4, feature_dim=8, steps=5, device="cpu")
    assert on(net) == {torch.device("cpu")} and not net.training
    err = capsys.readouterr().err
    assert "classifier: 5 steps on 64 images (cpu)" in err and "5/5" in err
    default = train_classifier(y, labels, 10, width=4, feature_dim=8, steps=5)
    for (name, p), q in zip(net.state_dict().items(), default.state_dict().values()):
        assert torch.equal(p, q), name                  # device="cpu" is the default, to the bit


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_eval_nets_classifier_on_the_given_device_trained_and_cached(device, digits_dm, tmp_path):
    nets = build_eval_nets(digits_dm, fid="classifier", cache_dir=tmp_path, classifier=TINY_CLASSIFIER,
                           device=device)
    assert {d.type for d in on(nets.classifier)} == {device}
    assert {d.type for d in on(nets.fid_features)} == {device}
    saved = torch.load(next(tmp_path.glob("classifier-*.pt")), weights_only=True)   # no map_location needed
    assert {t.device.type for t in saved["state_dict"].values()} == {"cpu"}
    x = digits_dm.splits["test"].y[:16]
    predicted = nets.classifier.predict(x)
    assert predicted.device == x.device and predicted.shape == (16,)

    for target in ("cpu", device):                      # the cached file loads onto either device, unchanged
        again, _ = load_or_train_classifier(digits_dm, tmp_path, device=target, **TINY_CLASSIFIER)
        assert {d.type for d in on(again)} == {target} and again.predict(x).device == x.device
        for (name, p), q in zip(again.state_dict().items(), nets.classifier.state_dict().values()):
            assert torch.equal(p.cpu(), q.cpu()), name
