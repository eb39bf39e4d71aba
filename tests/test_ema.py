"""Weight averaging (model.ema_decay): the averaged weights move slower than the live ones, are the ones sampling
and evaluation use, stay out of the optimizers, and save and load with the module."""
from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from cgml_lightning.models import MODULES
from cgml_lightning.models.base import ConditionalModule, ema_update

MLP = {"name": "mlp", "width": 32, "depth": 2}
SMALL = {
    "cgml": dict(latent_dim=4, z_steps=2, start_candidates=2, dynamics_net={"width": 16, "depth": 2}),
    "regressor": {},
    "cvae": dict(latent_dim=4, kl_warmup_steps=2, posterior_net={"width": 16, "depth": 1}),
    "cgan": dict(latent_dim=4, discriminator={"width": 16, "depth": 2}, z_encoder={"width": 16, "depth": 1}),
    "flow": dict(time_dim=8, sample_steps=4),
    "cimle": dict(latent_dim=4, num_draws=3),
}
BATCHES = 3


def trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=BATCHES, limit_val_batches=1,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, **kwargs)


@pytest.fixture(scope="module", params=sorted(SMALL))
def fitted(request, toy_dm, tmp_path_factory):
    name = request.param
    L.seed_everything(0)
    module = MODULES[name](toy_dm.info(), MLP, **SMALL[name], ema_decay=0.5)
    fit = trainer()
    fit.fit(module, datamodule=toy_dm)
    path = tmp_path_factory.mktemp("ema") / f"{name}.ckpt"
    fit.save_checkpoint(path)
    return module, path


def live_and_averaged(module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    live = [p.detach().clone() for p in module.nets_to_average().parameters()]
    return live, [p.detach().clone() for p in module.ema.module.parameters()]


def test_averaged_weights_differ_from_the_live_ones(fitted):
    module, _ = fitted
    assert int(module.ema.n_averaged) == BATCHES                     # one update per training batch
    live, averaged = live_and_averaged(module)
    assert len(live) == len(averaged) > 0
    assert any(not torch.equal(a, b) for a, b in zip(live, averaged))
    assert all(not p.requires_grad for p in module.ema.parameters())


def test_the_optimizers_hold_no_averaged_weight(fitted):
    module, _ = fitted
    averaged = {id(p) for p in module.ema.parameters()}
    optimizers = module.optimizers()
    for optimizer in optimizers if isinstance(optimizers, list) else [optimizers]:
        assert not averaged & {id(p) for group in optimizer.param_groups for p in group["params"]}


def test_sampling_uses_the_averaged_weights_and_restores_the_live_ones(fitted, toy_dm):
    module, _ = fitted
    x = toy_dm.grid(4)
    live, averaged = live_and_averaged(module)
    samples = module.sample(x, num_samples=3, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(live, [p for p in module.nets_to_average().parameters()]))
    # the same module without EMA, its nets holding the averaged weights, draws the same samples
    plain = copy.deepcopy(module)
    plain.ema = None
    with torch.no_grad():
        for p, a in zip(plain.nets_to_average().parameters(), averaged):
            p.copy_(a)
    assert torch.allclose(plain.sample(x, num_samples=3, seed=1), samples, atol=1e-6)
    # and with the live weights it draws other samples: the averaged ones were really in use
    module.ema, held = None, module.ema
    try:
        assert not torch.allclose(module.sample(x, num_samples=3, seed=1), samples, atol=1e-6)
    finally:
        module.ema = held


def test_checkpoint_holds_both_and_loads_them(fitted, toy_dm):
    module, path = fitted
    loaded = ConditionalModule.load_from_checkpoint(path)
    assert loaded.ema is not None and int(loaded.ema.n_averaged) == BATCHES
    for a, b in zip(live_and_averaged(module), live_and_averaged(loaded)):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    x = toy_dm.grid(4)
    assert torch.equal(loaded.sample(x, num_samples=2, seed=3), module.sample(x, num_samples=2, seed=3))


def test_ema_update_warms_up_then_holds_the_decay():
    net = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(net.weight)
    avg = AveragedModel(net, multi_avg_fn=ema_update(0.9), use_buffers=False)
    avg.update_parameters(net)                                       # the first update copies
    expected = 0.0
    for n, value in enumerate([1.0, 2.0, 3.0, 4.0, 5.0], start=1):
        with torch.no_grad():
            net.weight.fill_(value)
        avg.update_parameters(net)
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * value
        assert avg.module.weight.item() == pytest.approx(expected, rel=1e-6)
    for _ in range(200):                                             # later updates: the decay itself
        avg.update_parameters(net)
    assert avg.module.weight.item() == pytest.approx(5.0, abs=1e-6)


def test_bad_decay_rejected_and_none_keeps_no_copy(toy_dm):
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="ema_decay"):
            MODULES["regressor"](toy_dm.info(), MLP, ema_decay=bad)
    module = MODULES["regressor"](toy_dm.info(), MLP)
    module.configure_model()
    assert module.ema is None and not any(k.startswith("ema.") for k in module.state_dict())


@pytest.mark.parametrize("decay", [0.5, None])
def test_fine_tuning_starts_from_the_averaged_weights(fitted, toy_dm, decay):
    module, path = fitted
    name = module.module_name
    L.seed_everything(5)
    fresh = MODULES[name](toy_dm.info(), MLP, **SMALL[name], ema_decay=decay)
    fresh.configure_model()
    fresh.init_weights_from(str(path))
    copied = [p.detach() for p in fresh.nets_to_average().parameters()]
    source_live, source_averaged = live_and_averaged(module)
    assert all(torch.equal(a, b) for a, b in zip(copied, source_averaged))     # what the checkpoint was evaluated with
    assert any(not torch.equal(a, b) for a, b in zip(copied, source_live))
    if decay:                                                                   # the new average restarts from them
        assert int(fresh.ema.n_averaged) == 0
        assert all(torch.equal(a, b) for a, b in zip(copied, live_and_averaged(fresh)[1]))


def test_fine_tuning_copies_averaged_parameters_and_live_buffers(digits_dm, tmp_path):
    """With BatchNorm (net.norm=batch) the average holds parameters only: init_from copies the averaged parameters
    and the live running statistics, the pair that evaluation uses."""
    net = {"name": "unet", "width": 8, "depth": 2, "norm": "batch"}
    L.seed_everything(0)
    module = MODULES["regressor"](digits_dm.info(), net, ema_decay=0.5)
    fit = trainer()
    fit.fit(module, datamodule=digits_dm)
    fit.save_checkpoint(tmp_path / "bn.ckpt")
    fresh = MODULES["regressor"](digits_dm.info(), net, ema_decay=0.5)
    fresh.configure_model()
    fresh.init_weights_from(str(tmp_path / "bn.ckpt"))
    live = dict(module.generator.named_buffers())
    assert any("running_mean" in name and live[name].abs().sum() > 0 for name in live)     # statistics were kept
    assert all(torch.equal(b, live[n]) for n, b in fresh.generator.named_buffers())
    averaged = dict(module.ema.module.generator.named_parameters())
    assert all(torch.equal(p, averaged[n]) for n, p in fresh.generator.named_parameters())
    assert any(not torch.equal(p, q) for p, q in zip(averaged.values(), module.generator.parameters()))


def test_eval_and_sample_choose_the_weights(fitted, toy_dm):
    from omegaconf import OmegaConf

    from cgml_lightning.runs import inference_module, weights_in_use

    module, path = fitted
    cfg = lambda weights: OmegaConf.create({"ckpt_path": str(path), "weights": weights, "device": "cpu"})  # noqa: E731
    averaged, live = inference_module(cfg("averaged")), inference_module(cfg("live"))
    assert (weights_in_use(averaged), weights_in_use(live)) == ("averaged", "live")
    x = toy_dm.grid(4)
    module.ema, held = None, module.ema
    try:                                   # weights=live samples as the live nets do
        assert torch.equal(live.sample(x, num_samples=2, seed=3), module.sample(x, num_samples=2, seed=3))
    finally:
        module.ema = held
    with pytest.raises(ValueError, match="weights must be averaged or live; got 'best'"):
        inference_module(cfg("best"))


def test_live_weights_come_back_when_sampling_raises(fitted, toy_dm):
    module, _ = fitted
    live, averaged = live_and_averaged(module)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    module._sample = broken                                   # an instance attribute shadows the method
    try:
        with pytest.raises(RuntimeError, match="boom"):
            module.sample(toy_dm.grid(2), num_samples=2)
    finally:
        del module._sample
    after_live, after_averaged = live_and_averaged(module)
    assert all(torch.equal(a, b) for a, b in zip(live, after_live))
    assert all(torch.equal(a, b) for a, b in zip(averaged, after_averaged))
    assert not module.averaging


class SaveInsideBatch(L.Callback):
    """Saves a checkpoint from on_train_batch_end of batch 1 (callbacks run before the module's own hook, as a
    preemption or an every-n-steps checkpoint does), and records the EMA once batch 1 is over."""

    def __init__(self, path):
        self.path, self.after_batch_1 = path, None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == 1:
            trainer.save_checkpoint(self.path)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 2:
            self.after_batch_1 = {k: v.clone() for k, v in module.ema.state_dict().items()}


@pytest.mark.parametrize("name", ["cgml", "regressor"])
def test_a_checkpoint_saved_inside_a_batch_holds_that_batchs_average(name, toy_dm, tmp_path):
    L.seed_everything(0)
    module = MODULES[name](toy_dm.info(), MLP, **SMALL[name], ema_decay=0.5)
    saver = SaveInsideBatch(tmp_path / "inside.ckpt")
    trainer(callbacks=[saver]).fit(module, datamodule=toy_dm)
    saved = torch.load(tmp_path / "inside.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert int(saved["ema.n_averaged"]) == 2 == int(saver.after_batch_1["n_averaged"])
    for key, value in saver.after_batch_1.items():
        assert torch.equal(saved[f"ema.{key}"], value), key
    assert int(module.ema.n_averaged) == BATCHES                 # one update per batch all the same


def test_resume_refuses_another_averaging_setting(fitted, toy_dm):
    from cgml_lightning.runs import check_resume

    module, path = fitted
    name = module.module_name
    plain = MODULES[name](toy_dm.info(), MLP, **SMALL[name])
    with pytest.raises(ValueError, match="ema_decay=0.5 in the checkpoint vs None now.*init_from"):
        check_resume(str(path), plain)
    check_resume(str(path), MODULES[name](toy_dm.info(), MLP, **SMALL[name], ema_decay=0.9))   # on both: fine
