"""CGMLModule / RegressorModule: phase separation, latent table, sampling API, checkpoints, completion composite."""
from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import torch

from cgml_lightning import CGMLModule, RegressorModule
from cgml_lightning import algorithm as A
from cgml_lightning.data import ImageFolderDataModule
from cgml_lightning.evaluation.metrics import pairwise_l1_diversity

MLP_NET = {"name": "mlp", "width": 32, "depth": 2}
UNET_NET = {"name": "unet", "width": 8, "depth": 2}
SMALL = dict(z_phase="paper", latent_dim=4, z_steps=3, start_candidates=4, dynamics_net={"width": 32, "depth": 2})


def tiny_trainer(max_epochs: int = 2, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                     num_sanity_val_steps=0, **kwargs)


def make_module(case: str, toy_dm, digits_dm, **kwargs) -> tuple[CGMLModule, dict]:
    torch.manual_seed(0)
    if case == "mlp":
        dm, net = toy_dm, MLP_NET
    else:
        dm, net = digits_dm, UNET_NET
    module = CGMLModule(dm.info(), net, **{**SMALL, **kwargs})
    batch = next(iter(dm.train_dataloader()))
    return module, batch


def snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def fitted(toy_dm, tmp_path_factory):
    """A CGMLModule fitted 2 tiny epochs on the toy, its latent table before the fit, and a saved checkpoint."""
    L.seed_everything(0)
    module = CGMLModule(toy_dm.info(), MLP_NET, **SMALL)
    before = snapshot(module)
    trainer = tiny_trainer(max_epochs=2)
    trainer.fit(module, datamodule=toy_dm)
    path = tmp_path_factory.mktemp("ckpt") / "toy.ckpt"
    trainer.save_checkpoint(path)
    return module, before, path


# ---- the phases touch only their own parameters --------------------------------------------------------------
@pytest.mark.parametrize("case", ["mlp", "unet"])
def test_z_phase_changes_no_weight(case, toy_dm, digits_dm):
    module, batch = make_module(case, toy_dm, digits_dm)
    module.train()
    x, y, index = batch["x"], batch["y"], batch["index"]
    before = snapshot(module)
    feats = module.generator.encode(x)
    path = module.z_phase(feats, y, x, index)
    assert path.shape == (SMALL["z_steps"] + 1, len(x), SMALL["latent_dim"])
    torch.testing.assert_close(path.norm(dim=-1), torch.ones(path.shape[:2]))
    for name, p in module.named_parameters():
        assert p.grad is None, name
    for name, value in module.state_dict().items():
        assert torch.equal(value, before[name]), name        # weights, and the latent table (written later)


@pytest.mark.parametrize("case", ["mlp", "unet"])
def test_z_phase_returns_plain_data(case, toy_dm, digits_dm):
    module, batch = make_module(case, toy_dm, digits_dm)
    x, y, index = batch["x"], batch["y"], batch["index"]
    path = module.z_phase(module.generator.encode(x), y, x, index)
    assert not path.requires_grad and path.grad_fn is None


@pytest.mark.parametrize("case", ["mlp", "unet"])
def test_z_phase_start_is_no_worse_than_warm_start(case, toy_dm, digits_dm):
    module, batch = make_module(case, toy_dm, digits_dm)
    x, y, index = batch["x"], batch["y"], batch["index"]
    with torch.no_grad():
        feats = module.generator.encode(x)
        loss_fn = module.loss_fn(feats, y, x)
        module.hparams.restart_prob = 0.0                         # the warm start must be among the candidates
        start = module.initial_latents(feats, y, x, index)
        assert (loss_fn(start) <= loss_fn(module.latents[index]) + 1e-5).all()


def backward_after_z_phase(module_and_batch, phase: str):
    """Run the z-phase, then backward one phase's loss ("dynamics" or "generator"); returns the module."""
    module, batch = module_and_batch
    x, y, index = batch["x"], batch["y"], batch["index"]
    feats = module.generator.encode(x)
    path = module.z_phase(feats, y, x, index)
    if phase == "dynamics":
        loss = module.dynamics_phase_loss(module.generator.summarize(feats), path)
    else:
        loss = module.generator_phase_loss(feats, path[-1], y, x)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    return module


@pytest.mark.parametrize("lipschitz", [None, {"kind": "perturbation", "weight": 0.1}])
@pytest.mark.parametrize("case", ["mlp", "unet"])
def test_dynamics_phase_grads_only_dynamics(case, lipschitz, toy_dm, digits_dm):
    module = backward_after_z_phase(make_module(case, toy_dm, digits_dm, lipschitz=lipschitz), "dynamics")
    for name, p in module.generator.named_parameters():
        assert p.grad is None, f"generator.{name} got a gradient from the dynamics loss"
    assert module.latents.grad is None
    grads = [p.grad for p in module.dynamics.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("lipschitz", [None, {"kind": "perturbation", "weight": 0.1}])
@pytest.mark.parametrize("case", ["mlp", "unet"])
def test_generator_phase_grads_no_dynamics(case, lipschitz, toy_dm, digits_dm):
    module = backward_after_z_phase(make_module(case, toy_dm, digits_dm, lipschitz=lipschitz), "generator")
    for name, p in module.dynamics.named_parameters():
        assert p.grad is None, f"dynamics.{name} got a gradient from the generator loss"
    assert module.latents.grad is None
    for name, p in module.generator.named_parameters():
        assert p.grad is not None, f"generator.{name} got no gradient"


def test_unknown_lipschitz_kind_rejected(toy_dm):
    with pytest.raises(ValueError, match="lipschitz.kind"):
        CGMLModule(toy_dm.info(), MLP_NET, **SMALL, lipschitz={"kind": "bogus"})


def test_masked_distance_ignores_visible_pixels(digits_dm):
    module = CGMLModule(digits_dm.info(), UNET_NET, **SMALL)
    batch = next(iter(digits_dm.train_dataloader()))
    x, y = batch["x"], batch["y"]
    hole = x[:, -1:]
    pred = y + 0.5 * (1 - hole)                                  # wrong only where the pixels are visible
    torch.testing.assert_close(module.distance(pred, y, x), torch.zeros(len(x)))
    assert (module.distance(y + 0.5 * hole, y, x) > 0).all()     # wrong in the hole: counted


# ---- a full (tiny) fit -------------------------------------------------------------------------------------------
def test_fit_updates_latents_of_seen_rows_and_keeps_them_on_sphere(fitted, toy_dm):
    module, before, _ = fitted
    after = module.latents.detach()
    n = toy_dm.info()["num_train_samples"]
    assert after.shape == (n, SMALL["latent_dim"])
    # 2 epochs over every training row: every row was written
    changed = (after - before["latents"]).norm(dim=1) > 1e-6
    assert changed.all(), f"{int((~changed).sum())} of {n} rows never updated"
    torch.testing.assert_close(after.norm(dim=1), torch.ones(n))
    assert not module.latents.requires_grad


def test_fit_updates_both_networks(fitted):
    module, before, _ = fitted
    state = module.state_dict()
    for prefix in ("generator.", "dynamics."):
        keys = [k for k in state if k.startswith(prefix)]
        assert keys and any(not torch.equal(state[k], before[k]) for k in keys), prefix


def test_fit_unet_updates_latents(digits_dm):
    L.seed_everything(0)
    module = CGMLModule(digits_dm.info(), UNET_NET, **SMALL)
    before = module.latents.detach().clone()
    tiny_trainer(max_epochs=1).fit(module, datamodule=digits_dm)
    changed = (module.latents.detach() - before).norm(dim=1) > 1e-6
    assert changed.all()
    torch.testing.assert_close(module.latents.detach().norm(dim=1), torch.ones(64))


class CountSteps(L.Callback):
    """How often each optimizer stepped (the generator's first, the dynamics net's second)."""
    def on_train_start(self, trainer, pl_module):
        self.counts = [0] * len(trainer.optimizers)
        for i, optimizer in enumerate(trainer.optimizers):
            optimizer.register_step_post_hook(lambda *_, i=i: self.counts.__setitem__(i, self.counts[i] + 1))


def test_w_steps_update_the_generator_again_at_the_same_latents(digits_dm):
    """w_steps=2: two generator updates per batch and one dynamics update; after one batch the dynamics net and the
    latent table equal those of w_steps=1 (the z-phase ran once, on the same weights) and the generator does not."""
    runs = {}
    for w_steps in (1, 2):
        L.seed_everything(0)
        module = CGMLModule(digits_dm.info(), UNET_NET, **{**SMALL, "w_steps": w_steps})
        counter = CountSteps()
        tiny_trainer(max_epochs=1, limit_train_batches=1, callbacks=[counter]).fit(module, datamodule=digits_dm)
        runs[w_steps] = snapshot(module), counter.counts
    (one, counts_one), (two, counts_two) = runs[1], runs[2]
    assert counts_one == [1, 1] and counts_two == [2, 1]
    for key in one:
        if key.startswith("generator."):
            continue
        assert torch.equal(one[key], two[key]), key
    assert any(not torch.equal(one[k], two[k]) for k in one if k.startswith("generator."))
    with pytest.raises(ValueError, match="model.w_steps must be a whole number, at least 1; got 0"):
        CGMLModule(digits_dm.info(), UNET_NET, **{**SMALL, "w_steps": 0})


def test_nonfinite_extra_w_step_is_skipped(digits_dm):
    """A NaN loss in a further w-step leaves the weights as the batch's first, finite w-step made them."""
    states = []
    for w_steps, poison in ((1, False), (2, True)):
        L.seed_everything(0)
        module = CGMLModule(digits_dm.info(), UNET_NET, **{**SMALL, "w_steps": w_steps})
        calls, loss_of = [], module.generator_phase_loss

        def phase_loss(*args, loss_of=loss_of, calls=calls, poison=poison):
            calls.append(1)
            loss = loss_of(*args)
            return loss * float("nan") if poison and len(calls) == 2 else loss

        module.generator_phase_loss = phase_loss
        tiny_trainer(max_epochs=1, limit_train_batches=1).fit(module, datamodule=digits_dm)
        states.append(snapshot(module))
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


def test_resume_refuses_another_w_steps(fitted, toy_dm, tmp_path):
    """Resuming with another number of w-steps would not continue the same run; a checkpoint from before w_steps
    existed made one."""
    from cgml_lightning.runs import check_resume

    _, _, path = fitted
    with pytest.raises(ValueError, match="model.w_steps=1 in the checkpoint vs 2 now.*init_from"):
        check_resume(str(path), CGMLModule(toy_dm.info(), MLP_NET, **{**SMALL, "w_steps": 2}))
    check_resume(str(path), CGMLModule(toy_dm.info(), MLP_NET, **SMALL))
    old = torch.load(path, map_location="cpu", weights_only=True)
    del old["hyper_parameters"]["w_steps"]
    torch.save(old, tmp_path / "old.ckpt")
    with pytest.raises(ValueError, match="model.w_steps=1 in the checkpoint vs 2 now"):
        check_resume(str(tmp_path / "old.ckpt"), CGMLModule(toy_dm.info(), MLP_NET, **{**SMALL, "w_steps": 2}))


def test_checkpoints_from_before_rho_output_sample_as_they_were_trained(fitted, toy_dm, tmp_path):
    """A checkpoint whose Z was trained with rho = softplus(unit) (before dynamics_net.rho_output existed) loads
    with softplus, samples exactly as before, and refuses a resume or a fine-tuning under the linear rho; new
    checkpoints record the rule (here the paper preset's, softplus)."""
    from cgml_lightning.runs import check_resume

    _, _, path = fitted
    assert CGMLModule.load_from_checkpoint(path).hparams.dynamics_net["rho_output"] == "softplus"
    old = torch.load(path, map_location="cpu", weights_only=True)
    del old["hyper_parameters"]["dynamics_net"]["rho_output"]
    torch.save(old, tmp_path / "old.ckpt")
    loaded = CGMLModule.load_from_checkpoint(tmp_path / "old.ckpt")
    assert loaded.dynamics.rho_output == "softplus"
    hbar, z = torch.randn(6, loaded.generator.feature_dim), A.sphere_sample(6, dim=SMALL["latent_dim"])
    unit = loaded.dynamics.net(torch.cat([hbar, z], dim=1))[:, -1:]
    torch.testing.assert_close(loaded.dynamics(hbar, z)[1], torch.nn.functional.softplus(unit))
    linear = {**SMALL, "dynamics_net": {**SMALL["dynamics_net"], "rho_output": "linear"}}
    with pytest.raises(ValueError, match="rho_output=softplus in the checkpoint vs linear now"):
        check_resume(str(tmp_path / "old.ckpt"), CGMLModule(toy_dm.info(), MLP_NET, **linear))
    check_resume(str(tmp_path / "old.ckpt"), CGMLModule(toy_dm.info(), MLP_NET, **SMALL))
    with pytest.raises(ValueError, match="init_from=.*old.ckpt: its dynamics net was trained with .*=softplus"):
        CGMLModule(toy_dm.info(), MLP_NET, **linear).init_weights_from(str(tmp_path / "old.ckpt"))
    CGMLModule(toy_dm.info(), MLP_NET, **SMALL).init_weights_from(str(tmp_path / "old.ckpt"))


def test_a_checkpoint_keeps_its_training_runs_record_as_plain_values(fitted, tmp_path):
    """run_info (cgml-train's task, seed and W&B group) is saved and loaded back; a record holding anything but
    words and numbers loads without those entries."""
    module, _, path = fitted
    assert CGMLModule.load_from_checkpoint(path).run_info == {}                     # none was set
    module.run_info = {"task_name": "toy", "seed": 3, "group": "toy_sweep"}
    saved = torch.load(path, map_location="cpu", weights_only=True)
    module.on_save_checkpoint(saved)
    saved["cgml_run"]["odd"], saved["cgml_run"]["flag"] = [1, 2], True
    torch.save(saved, tmp_path / "run.ckpt")
    assert CGMLModule.load_from_checkpoint(tmp_path / "run.ckpt").run_info == {"task_name": "toy", "seed": 3,
                                                                             "group": "toy_sweep"}
    module.on_load_checkpoint({})                     # resuming a checkpoint without a record keeps the run's own
    assert module.run_info == {"task_name": "toy", "seed": 3, "group": "toy_sweep"}
    module.run_info = {}


def test_the_batch_contract_is_checked_and_float64_is_taken(toy_dm):
    """A training batch that breaks the contract is named before it reaches the nets: its keys, its shapes, its
    dtype, and an index outside the latent table; sample() takes numpy's float64 and checks x's shape."""
    module = CGMLModule(toy_dm.info(), MLP_NET, **SMALL)
    x, y, index = torch.rand(4, 1), torch.rand(4, 3), torch.arange(4)
    module.on_train_batch_start({"x": x, "y": y, "index": index}, 0)
    with pytest.raises(ValueError, match=r"must be a dict with 'x', 'y' and 'index'.*\['x', 'y'\]"):
        module.on_train_batch_start({"x": x, "y": y}, 0)
    with pytest.raises(ValueError, match=r"batch\['y'\] has shape \[4, 2\]; this model takes \[B, 3\]"):
        module.on_train_batch_start({"x": x, "y": y[:, :2], "index": index}, 0)
    with pytest.raises(ValueError, match=r"batch\['x'\] is torch.float64 \(numpy's default\); give float32"):
        module.on_train_batch_start({"x": x.double(), "y": y, "index": index}, 0)
    rows = toy_dm.info()["num_train_samples"]
    with pytest.raises(ValueError, match=rf"rows of the latent table, 0 to {rows - 1}"):
        module.on_train_batch_start({"x": x, "y": y, "index": index + rows}, 0)
    assert module.sample(x.double(), num_samples=2, seed=0).dtype == torch.float32
    with pytest.raises(ValueError, match=r"x has shape \[4, 2\]; this model takes .*\[1\]"):
        module.sample(torch.rand(4, 2), num_samples=2)
    with pytest.raises(ValueError, match="num_samples must be a positive number"):
        module.sample(x, num_samples=0)


def test_evaluate_takes_a_users_own_datamodule(toy_dm):
    """evaluate() needs only the test loader of a datamodule: a user's own, without this package's attributes."""
    from torch.utils.data import DataLoader

    from cgml_lightning.data.base import IndexedDataset
    from cgml_lightning.evaluation import evaluate

    class Own(L.LightningDataModule):
        def test_dataloader(self):
            return DataLoader(IndexedDataset(torch.rand(12, 1), torch.rand(12, 3)), batch_size=4)

    metrics = evaluate(CGMLModule(toy_dm.info(), MLP_NET, **SMALL), Own(), num_samples=2, num_inputs=8)
    assert metrics["num_inputs"] == 8 and metrics["l2_best_of_n"] > 0
    with pytest.raises(ValueError, match="num_inputs must be a positive whole number; got 0"):
        evaluate(CGMLModule(toy_dm.info(), MLP_NET, **SMALL), Own(), num_samples=2, num_inputs=0)


def test_fine_tuning_names_another_model_or_kind_of_data(fitted, toy_dm, tmp_path):
    """init_from a checkpoint of another model, or of another kind of data, says which, before listing weights."""
    _, _, path = fitted
    with pytest.raises(ValueError, match=r"is a model=cgml checkpoint, this run is model=regressor"):
        RegressorModule(toy_dm.info(), MLP_NET).init_weights_from(str(path))
    image = {**toy_dm.info(), "kind": "image"}
    with pytest.raises(ValueError, match=r"trained on vector data, this run is on image data"):
        CGMLModule(image, MLP_NET, **SMALL).init_weights_from(str(path))
    with pytest.raises(ValueError, match=r"matches no parameter; the trained ones start with .*generator\."):
        CGMLModule(toy_dm.info(), MLP_NET, **SMALL).freeze_prefixes(["generatr"])


def test_a_checkpoint_that_does_not_fit_names_what_it_was_trained_with(digits_dm, tmp_path):
    """A colleague holding only the file learns its net (by preset name), latent_dim and channels, and how many
    weights differ, the list cut with a count."""
    from omegaconf import OmegaConf

    preset = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[1] / "conf" / "net" / "unet_small.yaml"))
    module = CGMLModule(digits_dm.info(), preset, **SMALL)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "cgml_module": "cgml"},
               tmp_path / "small.ckpt")
    here = CGMLModule(digits_dm.info(), {**preset, "width": 16}, **{**SMALL, "latent_dim": 6})
    with pytest.raises(ValueError) as err:
        here.init_weights_from(str(tmp_path / "small.ckpt"))
    message = str(err.value)
    assert "it was trained with net=unet_small; model.latent_dim=4 (here 6): set them as it was trained" in message
    assert re.search(r"(\d+) weight\(s\) differ", message) and re.search(r"\.\.\. and \d+ more$", message)
    other = CGMLModule(digits_dm.info(), {**UNET_NET, "width": 4}, **SMALL)
    torch.save({"state_dict": other.state_dict(), "hyper_parameters": dict(other.hparams), "cgml_module": "cgml"},
               tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match=r"the net net.width=4 \(here 8\)"):
        CGMLModule(digits_dm.info(), UNET_NET, **SMALL).init_weights_from(str(tmp_path / "other.ckpt"))


def test_resume_refuses_another_model_net_or_optimizer(fitted, toy_dm):
    """Lightning would fail on the weights' shapes, or load the old optimizer's state over the new one: named."""
    from cgml_lightning.runs import check_resume

    _, _, path = fitted
    with pytest.raises(ValueError, match="holds a model=cgml run, not model=regressor; resume with model=cgml"):
        check_resume(str(path), RegressorModule(toy_dm.info(), MLP_NET))
    with pytest.raises(ValueError, match=r"net.width=32 in the checkpoint vs 48 now; resume with net.width=32"):
        check_resume(str(path), CGMLModule(toy_dm.info(), {**MLP_NET, "width": 48}, **SMALL))
    with pytest.raises(ValueError, match=r"model.optimizer.lr=0.001 in the checkpoint vs 0.01 now"):
        check_resume(str(path), CGMLModule(toy_dm.info(), MLP_NET, **SMALL, optimizer={"lr": 0.01}))


def test_resume_refuses_other_z_phase_or_data_settings_and_takes_sampling_ones(fitted, toy_dm):
    """A resumed run continues the same one: z-phase settings and the data's batches are refused by name (the
    checkpoint would record the new ones over weights trained with the old); how it samples and where the data is
    read from may change."""
    from cgml_lightning.runs import check_resume

    _, _, path = fitted
    info = {**toy_dm.info(), "data": {"_target_": "cgml_lightning.data.ToyDataModule", "batch_size": 64}}
    saved = torch.load(path, map_location="cpu", weights_only=True)
    saved["hyper_parameters"]["data_info"] = info
    torch.save(saved, path.parent / "recorded.ckpt")
    path = path.parent / "recorded.ckpt"
    z_lr = SMALL.get("z_lr", 0.1)
    with pytest.raises(ValueError, match=rf"model.z_lr={z_lr} in the checkpoint vs 5.0 now; resume with model.z_lr"):
        check_resume(str(path), CGMLModule(info, MLP_NET, **{**SMALL, "z_lr": 5.0}))
    with pytest.raises(ValueError, match=r"data.batch_size=64 in the checkpoint vs 16 now"):
        check_resume(str(path), CGMLModule({**info, "data": {**info["data"], "batch_size": 16}}, MLP_NET, **SMALL))
    moved = {**info, "data": {**info["data"], "num_workers": 4, "path": "/elsewhere"}}
    check_resume(str(path), CGMLModule(moved, MLP_NET, **{**SMALL, "sample_steps": 2, "val_num_samples": 2,
                                                          "clip_grad_norm": 1.0}))


# ---- sampling API --------------------------------------------------------------------------------------------
def test_sample_shape_and_no_grad(fitted, toy_dm):
    module, _, _ = fitted
    module.zero_grad(set_to_none=True)
    x = toy_dm.grid(5)
    out = module.sample(x, num_samples=4, seed=0)
    assert out.shape == (5, 4, 3)
    assert not out.requires_grad and out.grad_fn is None
    assert torch.isfinite(out).all()
    assert all(p.grad is None for p in module.parameters())


@pytest.mark.parametrize("mode", [True, False])
def test_sample_restores_training_mode(fitted, toy_dm, mode):
    module, _, _ = fitted
    module.train(mode)
    module.sample(toy_dm.grid(3), num_samples=2, seed=0)
    assert module.training is mode
    assert all(m.training is mode for m in module.modules())
    module.eval()


def test_sample_reproducible_with_seed_and_generator(fitted, toy_dm):
    module, _, _ = fitted
    x = toy_dm.grid(6)
    a = module.sample(x, num_samples=5, seed=3)
    b = module.sample(x, num_samples=5, seed=3)
    c = module.sample(x, num_samples=5, generator=torch.Generator().manual_seed(3))
    d = module.sample(x, num_samples=5, seed=4)
    assert torch.equal(a, b)
    assert torch.equal(a, c)
    assert not torch.allclose(a, d)


def test_sample_refuses_what_is_no_count_and_takes_numpy(fitted, toy_dm):
    module, _, _ = fitted
    x = toy_dm.grid(3)
    for kwargs, key in (({"num_samples": True}, "num_samples"), ({"steps": -1}, "steps"), ({"steps": 1.5}, "steps"),
                        ({"guide_steps": -5}, "guide_steps")):
        with pytest.raises(ValueError, match=f"{key} must be"):
            module.sample(x, **{"num_samples": 2, **kwargs})
    with pytest.raises(ValueError, match="give seed= or generator=, not both"):
        module.sample(x, 2, seed=0, generator=torch.Generator())
    with pytest.raises(ValueError, match="unexpected keyword argument 'guide_step' .*takes: chunk_size, guide_steps"):
        module.sample(x, 2, guide_step=3)
    torch.testing.assert_close(module.sample(x.double().numpy(), 2, seed=1), module.sample(x, 2, seed=1))
    with pytest.raises(ValueError, match=r"x holds NaN or Inf in 1 input\(s\), rows \[1\]"):
        module.sample(torch.tensor([[0.5], [float("nan")], [0.1]]), 2)
    whole = torch.tensor([[-1], [0], [2]])                              # whole-number vector inputs are values
    torch.testing.assert_close(module.sample(whole, 2, seed=1), module.sample(whole.float(), 2, seed=1))


def test_yes_no_settings_refuse_anything_but_true_or_false(toy_dm, tmp_path):
    with pytest.raises(ValueError, match="model.compile must be true or false; got 'no'"):
        CGMLModule(toy_dm.info(), MLP_NET, compile="no")
    with pytest.raises(ValueError, match="data.check_files must be true or false; got 'yes'"):
        ImageFolderDataModule(root=str(tmp_path), check_files="yes")


@pytest.mark.parametrize("key, value", [("z_steps", 0), ("z_steps", -1), ("start_candidates", -3),
                                        ("sample_steps", -1), ("w_steps", 0), ("z_lr", 0.0), ("restart_prob", 1.5)])
def test_settings_that_would_train_nothing_are_refused_by_name(toy_dm, key, value):
    with pytest.raises(ValueError, match=f"model.{key} must be"):
        CGMLModule(toy_dm.info(), MLP_NET, **{**SMALL, key: value})


def test_sample_steps_argument(fitted, toy_dm):
    module, _, _ = fitted
    x = toy_dm.grid(4)
    zero = module.sample(x, num_samples=3, seed=0, steps=0)
    five = module.sample(x, num_samples=3, seed=0, steps=5)
    assert zero.shape == five.shape == (4, 3, 3)
    assert not torch.allclose(zero, five)                       # the Z-steps move the latents
    assert torch.equal(module.sample(x, num_samples=3, seed=0), five)   # the paper z_phase: sample_steps=5


def test_cgml_samples_are_diverse(fitted, toy_dm):
    module, _, _ = fitted
    samples = module.sample(toy_dm.grid(8), num_samples=6, seed=0)
    assert (pairwise_l1_diversity(samples) > 0).all()
    assert not torch.allclose(samples[:, 0], samples[:, 1])


def test_regressor_samples_identical_and_unguidable(toy_dm):
    torch.manual_seed(0)
    module = RegressorModule(toy_dm.info(), MLP_NET)
    x = toy_dm.grid(5)
    out = module.sample(x, num_samples=4, seed=0)
    assert out.shape == (5, 4, 3)
    assert torch.equal(out, out[:, :1].expand_as(out))
    assert (pairwise_l1_diversity(out) == 0).all()
    assert not out.requires_grad
    with pytest.raises(ValueError, match="guid"):
        module.sample(x, num_samples=2, guide=lambda s: s.mean())


def test_sample_pool_keeps_medoids_of_the_drawn_samples(fitted, toy_dm):
    """pool=P: the N samples returned are N distinct ones of the P drawn with the same seed, chosen by medoids."""
    module, _, _ = fitted
    x = toy_dm.grid(5)
    drawn = module.sample(x, num_samples=12, seed=2)
    kept = module.sample(x, num_samples=4, seed=2, pool=12)
    assert kept.shape == (5, 4, 3)
    for b in range(5):
        rows = [int((drawn[b] - s).abs().sum(-1).argmin()) for s in kept[b]]
        assert torch.equal(drawn[b, rows], kept[b]) and len(set(rows)) == 4
        d = torch.cdist(drawn[b], drawn[b]).square()
        assert sorted(rows) == sorted(A.medoids(d[None], 4)[0].tolist())
    assert torch.equal(module.sample(x, num_samples=4, seed=2, pool=4), module.sample(x, num_samples=4, seed=2))
    with pytest.raises(ValueError, match=r"pool=3 \(sample_pool in .*\) must be at least num_samples=4"):
        module.sample(x, num_samples=4, pool=3)


def test_sample_pool_on_completion_keeps_visible_pixels(digits_dm):
    torch.manual_seed(0)
    module = CGMLModule(digits_dm.info(), UNET_NET, **SMALL)
    x = next(iter(digits_dm.test_dataloader()))["x"][:3]
    kept = module.sample(x, num_samples=3, seed=0, pool=9)
    assert kept.shape == (3, 3, 1, 8, 8)
    visible = (x[:, -1:] == 0).expand_as(kept[:, 0])
    assert all(torch.equal(kept[:, i][visible], x[:, :-1][visible]) for i in range(3))


@pytest.mark.parametrize("steps", [0, None])
def test_guided_sampling_moves_samples_the_right_way(fitted, toy_dm, steps):
    """A guide penalising the samples' sum must lower the samples' mean, raising it when negated, with or without
    the inference Z-steps (steps=None: the module's default sample_steps)."""
    module, _, _ = fitted
    module.zero_grad(set_to_none=True)
    was_training = module.training
    x = toy_dm.grid(8)
    free = module.sample(x, num_samples=6, seed=0, steps=steps)
    # no settling Z-steps after the guide: this tiny model's Z is untrained and would scatter the guided latents
    down = module.sample(x, num_samples=6, seed=0, guide=lambda s: s.sum(), steps=0)
    up = module.sample(x, num_samples=6, seed=0, guide=lambda s: -s.sum(), steps=0)
    assert down.shape == up.shape == free.shape
    assert not down.requires_grad
    assert down.mean() < free.mean() < up.mean()
    assert all(p.grad is None for p in module.parameters())
    assert module.training == was_training
    per_sample = module.sample(x, num_samples=6, seed=0, guide=lambda s: s.flatten(2).sum(-1), steps=0)   # [B, N]
    torch.testing.assert_close(per_sample, down)                                  # per-sample penalties are summed
    for bad in (lambda s: float(s.sum()), lambda s: s.detach().sum()):
        with pytest.raises(ValueError, match="guide returned .*: it must be a differentiable torch function"):
            module.sample(x, num_samples=2, seed=0, guide=bad, steps=0)
    with pytest.raises(ValueError, match="guide returned NaN or Inf"):
        module.sample(x, num_samples=2, seed=0, guide=lambda s: s.sum() * float("nan"))
    with pytest.raises(ValueError, match="guide's gradient is NaN or Inf"):              # sqrt at 0: inf slope
        module.sample(x, num_samples=2, seed=0, guide=lambda s: (s - s.detach()).abs().sqrt().sum())


# ---- table starts: sampling from the latents of the nearest training inputs ---------------------------------
def table_module(toy_dm, **kwargs) -> CGMLModule:
    torch.manual_seed(0)
    return CGMLModule(toy_dm.info(), MLP_NET, **{**SMALL, "sample_starts": "table", **kwargs})


def test_table_starts_draw_distinct_latents_of_the_nearest_written_rows(toy_dm):
    module = table_module(toy_dm, table_neighbours=4)
    n, f = module.latent_keys.shape
    assert torch.isnan(module.latent_keys).all()                      # no row written yet
    with torch.no_grad():                                              # rows 0..9 written, keys on a line: row j at j
        module.latent_keys[:10] = torch.arange(10.0)[:, None] * torch.ones(f)
    hbar = torch.tensor([[2.0], [7.4]]) * torch.ones(f)                # nearest rows {1,2,3,0|4} and {6,7,8,5|9}
    starts = module.table_starts(module.table_neighbours(hbar), 4, torch.Generator().manual_seed(0)).view(2, 4, -1)
    rows = [[int((module.latents - z).norm(dim=1).argmin()) for z in per_input] for per_input in starts]
    assert len(set(rows[0])) == len(set(rows[1])) == 4                # without replacement when N <= k
    assert set(rows[0]) in ({0, 1, 2, 3}, {1, 2, 3, 4}) and set(rows[1]) in ({5, 6, 7, 8}, {6, 7, 8, 9})
    more = module.table_starts(module.table_neighbours(hbar), 9, torch.Generator().manual_seed(0)).view(2, 9, -1)
    assert {int((module.latents - z).norm(dim=1).argmin()) for z in more[1]} <= {5, 6, 7, 8, 9}   # N > k


def test_table_starts_fit_writes_keys_and_samples_reproducibly(toy_dm):
    module = table_module(toy_dm, sample_steps=0)
    tiny_trainer(max_epochs=1, limit_train_batches=3).fit(module, datamodule=toy_dm)
    written = ~torch.isnan(module.latent_keys).any(dim=1)
    assert written.sum() == 3 * toy_dm.batch_size                     # exactly the rows of the 3 batches seen
    x = toy_dm.grid(5)
    a, b = module.sample(x, num_samples=6, seed=1), module.sample(x, num_samples=6, seed=1)
    assert a.shape == (5, 6, 3) and torch.equal(a, b) and torch.isfinite(a).all()
    with torch.no_grad():
        feats = module.generator.encode(x)
        table = module.generator.decode(tuple(f.repeat_interleave(6, 0) for f in feats),
                                        module.table_starts(module.table_neighbours(module.generator.summarize(feats)),
                                                            6, torch.Generator().manual_seed(1)))
    # steps=0: the decoded table latents (float32 results depend on the CPU's kernels and the batch: tolerance)
    torch.testing.assert_close(a.flatten(0, 1), table, rtol=1e-4, atol=1e-4)
    guided = module.sample(x, num_samples=6, seed=1, guide=lambda s: -s[..., 0].sum())
    with torch.no_grad():                                              # guided samples are decoded neighbour latents
        neighbours = module.table_neighbours(module.generator.summarize(feats))
        options = module.generator.decode(tuple(f.repeat_interleave(neighbours.shape[1], 0) for f in feats),
                                          module.latents[neighbours].flatten(0, 1)).view(5, -1, 3)
    picked = torch.cdist(guided, options).argmin(dim=-1)                # [5, 6]: which neighbour latent each is
    torch.testing.assert_close(guided, options.gather(1, picked[..., None].expand(-1, -1, 3)), rtol=1e-4, atol=1e-4)
    assert guided[..., 0].mean() >= a[..., 0].mean()                  # and the guide's side is preferred
    z = torch.randn(5 * 6, module.latent_dim)
    torch.testing.assert_close(module.snap_to_table(feats, z, neighbours, chunk_size=1),   # one input per chunk
                               module.snap_to_table(feats, z, neighbours))


def test_table_starts_more_samples_than_neighbours_stay_distinct(toy_dm):
    module = table_module(toy_dm, sample_steps=0, table_neighbours=4)
    tiny_trainer(max_epochs=1, limit_train_batches=2).fit(module, datamodule=toy_dm)
    samples = module.sample(toy_dm.grid(3), num_samples=12, seed=0)              # N = 3 x table_neighbours
    for per_input in samples:                                                     # 12 different table latents each
        assert len(torch.unique(per_input.round(decimals=5), dim=0)) == 12


def test_table_starts_on_images(toy_dm, digits_dm):
    module, batch = make_module("unet", toy_dm, digits_dm, sample_starts="table", sample_steps=1)
    tiny_trainer(max_epochs=1, limit_train_batches=1).fit(module, datamodule=digits_dm)
    x = batch["x"][:3]
    free = module.sample(x, num_samples=4, seed=0)
    guided = module.sample(x, num_samples=4, seed=0, guide=lambda s: (s - 1).abs().sum())
    assert free.shape == guided.shape == (3, 4, *batch["y"].shape[1:]) and torch.isfinite(guided).all()
    with pytest.raises(ValueError, match=r"x is torch.uint8: image inputs are floats in \[0, 1\]"):
        module.sample((x * 255).to(torch.uint8), num_samples=2)


def test_sample_starts_must_be_known(toy_dm):
    with pytest.raises(ValueError, match="sample_starts"):
        CGMLModule(toy_dm.info(), MLP_NET, **SMALL, sample_starts="prior")


# ---- checkpoints ---------------------------------------------------------------------------------------------
def test_checkpoint_round_trip(fitted, toy_dm):
    module, _, path = fitted
    loaded = CGMLModule.load_from_checkpoint(path, map_location="cpu")
    assert isinstance(loaded, CGMLModule)
    x = toy_dm.grid(6)
    assert torch.equal(loaded.sample(x, num_samples=4, seed=1), module.sample(x, num_samples=4, seed=1))
    assert torch.equal(loaded.latents, module.latents)
    assert loaded.hparams.latent_dim == SMALL["latent_dim"]


def test_checkpoint_loads_weights_only_and_holds_latent_table(fitted, toy_dm):
    module, _, path = fitted
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    keys = [k for k in ckpt["state_dict"] if "latents" in k]
    assert keys, sorted(ckpt["state_dict"])
    table = ckpt["state_dict"][keys[0]]
    assert tuple(table.shape) == (toy_dm.info()["num_train_samples"], SMALL["latent_dim"])
    assert torch.equal(table, module.latents.detach())


def test_regressor_checkpoint_round_trip(toy_dm, tmp_path):
    L.seed_everything(0)
    module = RegressorModule(toy_dm.info(), MLP_NET)
    trainer = tiny_trainer(max_epochs=1)
    trainer.fit(module, datamodule=toy_dm)
    path = tmp_path / "reg.ckpt"
    trainer.save_checkpoint(path)
    torch.load(path, map_location="cpu", weights_only=True)
    loaded = RegressorModule.load_from_checkpoint(path, map_location="cpu")
    x = toy_dm.grid(4)
    assert torch.equal(loaded.sample(x, num_samples=2), module.sample(x, num_samples=2))


# ---- completion: the visible pixels are the input's ---------------------------------------------------------
def test_completion_keeps_visible_pixels_exactly(digits_dm):
    torch.manual_seed(0)
    module = CGMLModule(digits_dm.info(), UNET_NET, **SMALL)
    batch = next(iter(digits_dm.test_dataloader()))
    x, y = batch["x"][:6], batch["y"][:6]
    samples = module.sample(x, num_samples=3, seed=0)
    assert samples.shape == (6, 3, 1, 8, 8)
    visible = (x[:, -1:] == 0).expand_as(y)                       # mask channel: 1 = hidden
    assert visible.any() and (~visible).any()
    for i in range(3):
        assert torch.equal(samples[:, i][visible], x[:, :-1][visible])
        assert torch.equal(samples[:, i][visible], y[visible])
    # the hole is the generator's: it varies with z
    hole = ~visible
    assert not torch.equal(samples[:, 0][hole], samples[:, 1][hole])


def test_z_phase_presets_fill_what_is_not_given(toy_dm, digits_dm):
    """The Python API defaults to what the configs ship: the image preset on image data, the vector one otherwise;
    explicit values win, hparams record the values in force, and an unknown preset is named."""
    image = CGMLModule(digits_dm.info(), UNET_NET, latent_dim=4).hparams
    vector = CGMLModule(toy_dm.info(), MLP_NET, latent_dim=4, z_lr=0.3).hparams
    assert (image.z_steps, image.z_lr, image.z_normalized, image.sample_steps, image.optimizer["lr"]) == (3, 0.05, True, 1, 2e-3)
    assert (vector.z_lr, vector.sample_starts, vector.sample_steps, vector.optimizer["lr"]) == (0.3, "table", 0, 1e-3)
    assert (image.dynamics_net["rho_output"], vector.dynamics_net["rho_output"]) == ("linear", "softplus")
    with pytest.raises(ValueError, match="model.z_phase must be auto, image, vector, paper; got 'fast'"):
        CGMLModule(toy_dm.info(), MLP_NET, latent_dim=4, z_phase="fast")


def test_inference_steps_of_older_checkpoints_become_sample_steps(toy_dm):
    with pytest.warns(FutureWarning, match="sample_steps"):
        module = CGMLModule(toy_dm.info(), MLP_NET, latent_dim=4, inference_steps=2)
    assert module.hparams.sample_steps == 2 and "inference_steps" not in module.hparams


def test_sample_pictures_are_logged_at_the_step_of_the_metrics(toy_dm, tmp_path, monkeypatch):
    """Lightning logs metrics at the count of training batches; a cGML batch makes several optimizer steps (Z's and
    each w-step), so pictures logged at trainer.global_step would sit apart from the metrics of their epoch."""
    from lightning.pytorch.loggers import Logger

    from cgml_lightning import callbacks

    class Recorder(Logger):
        name, version = "recorder", 0

        def __init__(self):
            super().__init__()
            self.steps: dict[str, list[int]] = {}

        def log_metrics(self, metrics, step=None):
            for key in metrics:
                self.steps.setdefault(key, []).append(step)

        def log_hyperparams(self, *args, **kwargs):
            pass

    pictures: list[int] = []
    monkeypatch.setattr(callbacks, "log_picture", lambda loggers, key, path, caption, step: pictures.append(step))
    recorder = Recorder()
    module = CGMLModule(toy_dm.info(), MLP_NET, **SMALL, w_steps=2)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, limit_train_batches=3, limit_val_batches=1,
                        num_sanity_val_steps=0, logger=recorder, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callbacks.SampleGrid(str(tmp_path), num_inputs=2)])
    trainer.fit(module, datamodule=toy_dm)
    assert trainer.global_step == 2 * 3 * 3                  # 2 epochs x 3 batches x (Z + 2 w-steps)
    # validation (and so the picture) comes before Lightning counts the epoch's last batch
    assert pictures == recorder.steps["val/best_of_n_distance"] == [2, 5]
