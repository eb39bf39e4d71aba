"""The baselines (cvae, cgan, flow): fit, sampling API, checkpoints, the GAN's optimizer separation, the CLI."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from cgml_lightning.evaluation.metrics import pairwise_l1_diversity
from cgml_lightning.models import MODULES, CGANModule, CGMLModule, CIMLEModule, CVAEModule, FlowModule

NETS = {"mlp": {"name": "mlp", "width": 32, "depth": 2}, "unet": {"name": "unet", "width": 8, "depth": 2}}
SMALL = {
    "cvae": dict(latent_dim=4, kl_warmup_steps=2, posterior_net={"width": 16, "depth": 1}),
    "cgan": dict(latent_dim=4, discriminator={"width": 16, "depth": 2}, z_encoder={"width": 16, "depth": 1}),
    "flow": dict(time_dim=8, sample_steps=4),
}
CASES = [(name, net) for name in SMALL for net in NETS]
CGML_TRAIN = Path(sys.executable).with_name("cgml-train")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny nets on a shared CPU: several intra-op threads only contend (10-100x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(name: str, net: str, toy_dm, digits_dm, **kwargs):
    torch.manual_seed(0)
    dm = toy_dm if net == "mlp" else digits_dm
    return MODULES[name](dm.info(), NETS[net], **{**SMALL[name], **kwargs}), dm


def snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


class StepRecorder(L.Callback):
    """Before every optimizer step: the optimizer's parameters, those holding a gradient, and all weights."""

    def __init__(self):
        self.steps: list[dict] = []
        self.end: dict[str, torch.Tensor] | None = None

    def on_before_optimizer_step(self, trainer, module, optimizer):
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        names = {n for n, p in module.named_parameters() if id(p) in owned}
        with_grad = {n for n, p in module.named_parameters() if p.grad is not None}
        self.steps.append({"owned": names, "with_grad": with_grad, "weights": snapshot(module)})

    def on_train_batch_end(self, trainer, module, *args):
        self.end = snapshot(module)


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}-{c}" for n, c in CASES])
def fitted(request, toy_dm, digits_dm, tmp_path_factory):
    """A baseline fitted 1 epoch of 3 batches, its weights before, the recorder, and a saved checkpoint."""
    name, net = request.param
    L.seed_everything(0)
    module, dm = make(name, net, toy_dm, digits_dm)
    before = snapshot(module)
    recorder = StepRecorder()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=3, limit_val_batches=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[recorder])
    trainer.fit(module, datamodule=dm)
    path = tmp_path_factory.mktemp("ckpt") / f"{name}-{net}.ckpt"
    trainer.save_checkpoint(path)
    return {"name": name, "net": net, "module": module, "dm": dm, "before": before, "recorder": recorder,
            "metrics": dict(trainer.callback_metrics), "path": path}


def inputs(dm, n: int = 5) -> torch.Tensor:
    return next(iter(dm.val_dataloader()))["x"][:n]


# ---- fit ------------------------------------------------------------------------------------------------------
def test_fit_loss_finite_and_every_network_changes(fitted):
    module, metrics = fitted["module"], fitted["metrics"]
    losses = {k: v for k, v in metrics.items() if k.startswith("train/")}
    assert losses and all(math.isfinite(float(v)) for v in losses.values()), losses
    assert math.isfinite(float(metrics["val/best_of_n_distance"]))
    after = snapshot(module)
    for child, _ in module.named_children():
        keys = [k for k in after if k.startswith(child + ".")]
        assert keys and any(not torch.equal(after[k], fitted["before"][k]) for k in keys), child


# ---- sampling API --------------------------------------------------------------------------------------------
def test_sample_shape_reproducible_and_diverse(fitted):
    module, dm = fitted["module"], fitted["dm"]
    module.zero_grad(set_to_none=True)
    x = inputs(dm)
    a = module.sample(x, num_samples=4, seed=3)
    assert a.shape == (len(x), 4, *dm.info()["y_shape"])
    assert not a.requires_grad and torch.isfinite(a).all()
    assert all(p.grad is None for p in module.parameters())
    assert torch.equal(a, module.sample(x, num_samples=4, seed=3))
    assert torch.equal(a, module.sample(x, num_samples=4, generator=torch.Generator().manual_seed(3)))
    assert not torch.allclose(a, module.sample(x, num_samples=4, seed=4))
    assert (pairwise_l1_diversity(a) > 0).all()                    # different samples for every input
    if dm.kind == "image":
        assert a.min() >= 0 and a.max() <= 1
        visible = (x[:, -1:] == 0).expand(len(x), *a.shape[2:])    # completion: visible pixels are the input's
        for i in range(a.shape[1]):
            assert torch.equal(a[:, i][visible], x[:, :-1][visible])


def test_sample_restores_mode_and_rejects_guide(fitted):
    module, x = fitted["module"], inputs(fitted["dm"], 3)
    module.train()
    with pytest.raises(ValueError, match="guided sampling needs model=cgml"):
        module.sample(x, num_samples=2, guide=lambda s: s.mean())
    module.sample(x, num_samples=2, seed=0)
    assert module.training
    module.eval()


# ---- checkpoints ---------------------------------------------------------------------------------------------
def test_checkpoint_round_trip(fitted):
    from cgml_lightning.runs import load_checkpoint

    module, path, cls = fitted["module"], fitted["path"], MODULES[fitted["name"]]
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["cgml_module"] == fitted["name"]
    loaded = cls.load_from_checkpoint(path, map_location="cpu")
    assert type(loaded) is cls and type(load_checkpoint(str(path))) is cls
    x = inputs(fitted["dm"])
    assert torch.equal(loaded.sample(x, num_samples=3, seed=1), module.sample(x, num_samples=3, seed=1))


# ---- the GAN step: each optimizer touches only its own parameters ------------------------------------------------
@pytest.mark.parametrize("fitted", [("cgan", "mlp"), ("cgan", "unet")], ids=["mlp", "unet"], indirect=True)
def test_gan_optimizers_touch_only_their_own_parameters(fitted):
    module, rec = fitted["module"], fitted["recorder"]
    names = {n for n, _ in module.named_parameters()}
    d = {n for n in names if n.startswith("discriminator.")}
    assert len(rec.steps) >= 4 and len(rec.steps) % 2 == 0         # (D, G) per batch
    assert rec.steps[0]["owned"] == d and rec.steps[1]["owned"] == names - d
    weights = [s["weights"] for s in rec.steps] + [rec.end]
    for i, step in enumerate(rec.steps):
        assert step["with_grad"] and step["with_grad"] <= step["owned"], (i, step["with_grad"] - step["owned"])
        changed = {n for n in names if not torch.equal(weights[i][n], weights[i + 1][n])}
        assert changed and changed <= step["owned"], (i, changed - step["owned"])


@pytest.mark.parametrize("encoded_branch", [False, True])
@pytest.mark.parametrize("net", list(NETS))
def test_gan_losses_reach_only_their_networks(net, encoded_branch, toy_dm, digits_dm):
    module, dm = make("cgan", net, toy_dm, digits_dm, encoded_branch=encoded_branch)
    batch = next(iter(dm.train_dataloader()))
    x, y = batch["x"], batch["y"]
    out = module.forward_pass(x, y)
    assert len(out["fakes"]) == (2 if encoded_branch else 1)
    g_params = [*module.generator.parameters(), *module.z_encoder.parameters()]
    module.discriminator_loss(x, y, out).backward(retain_graph=True)
    assert all(p.grad is None for p in g_params)
    assert all(p.grad is not None for p in module.discriminator.parameters())
    module.zero_grad(set_to_none=True)
    loss, parts = module.generator_loss(x, y, out)
    assert set(parts) == {"adv", "l1", "z"} | ({"kl"} if encoded_branch else set())
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in g_params)


# ---- module specifics --------------------------------------------------------------------------------------------
def test_cvae_kl_annealing_and_free_bits(toy_dm, digits_dm):
    module, dm = make("cvae", "mlp", toy_dm, digits_dm, kl_warmup_steps=10, beta=2.0, free_bits=0.5)
    assert module.kl_weight() == pytest.approx(0.2)               # step 0 of 10: beta / 10
    batch = next(iter(dm.train_dataloader()))
    total, recon, kl = module.loss(batch["x"], batch["y"])
    # free bits: the KL term counts >= 0.5 nats per dimension
    assert float((total - recon).detach()) >= 0.2 * 0.5 * SMALL["cvae"]["latent_dim"] - 1e-6
    assert kl >= 0


def test_flow_velocity_net_and_steps(toy_dm, digits_dm):
    module, dm = make("flow", "unet", toy_dm, digits_dm)
    assert isinstance(module.generator.out_activation, torch.nn.Identity)      # velocities are unbounded
    assert module.generator.stem[0].in_channels == 2 + 1                       # concat(x, x_t)
    x = inputs(dm, 3)
    one, four = module.sample(x, 2, steps=1, seed=0), module.sample(x, 2, steps=4, seed=0)
    assert not torch.allclose(one, four)
    assert torch.equal(module.sample(x, 2, seed=0), four)                     # default sample_steps=4
    heun = FlowModule(dm.info(), NETS["unet"], **{**SMALL["flow"], "sampler": "heun"})
    assert heun.sample(x, 2, seed=0).shape == four.shape
    with pytest.raises(ValueError, match="time_dim"):
        FlowModule(dm.info(), NETS["unet"], time_dim=7)


def test_bad_options_rejected(toy_dm):
    info, net = toy_dm.info(), NETS["mlp"]
    with pytest.raises(ValueError, match="gan_loss"):
        CGANModule(info, net, gan_loss="wgan")
    with pytest.raises(ValueError, match="latent_prior"):
        CGANModule(info, net, latent_prior="uniform")
    with pytest.raises(ValueError, match="encoded_branch"):
        CGANModule(info, net, latent_prior="sphere", encoded_branch=True)
    for module, dim in ((CVAEModule, 0), (CGANModule, -1), (CIMLEModule, 0), (CGMLModule, 0), (CGMLModule, 2.5)):
        with pytest.raises(ValueError, match=f"latent_dim must be a whole number, at least 1, for model=.*{dim}"):
            module(info, net, latent_dim=dim)
    with pytest.raises(ValueError, match="sampler"):
        FlowModule(info, net, sampler="rk4")
    with pytest.raises(ValueError, match="model.time_dim must be even"):
        FlowModule(info, net, time_dim=4.0)
    with pytest.raises(ValueError, match="net must be a mapping of the net's settings.*got 'mlp'"):
        CGMLModule(info, "mlp")


# ---- CLI: one fast_dev_run per baseline ---------------------------------------------------------------------------
@pytest.mark.parametrize("name,experiment", [("cvae", "toy"), ("cgan", "digits_completion"), ("flow", "toy")])
def test_cli_train(name, experiment, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(CGML_TRAIN), f"experiment={experiment}", f"model={name}", "debug=fdr",
                           f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["num_samples"] == 2


def test_gan_encoded_branch_fits(toy_dm):
    L.seed_everything(0)
    module = CGANModule(toy_dm.info(), NETS["mlp"], **{**SMALL["cgan"], "encoded_branch": True})
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=toy_dm)
    assert math.isfinite(float(trainer.callback_metrics["train/g_kl"]))
    assert module.sample(toy_dm.grid(3), num_samples=2, seed=0).shape == (3, 2, 3)


# ---- conditional IMLE ------------------------------------------------------------------------------------------
def test_cimle_keeps_the_nearest_of_its_draws_and_regresses_on_it(toy_dm):
    """A hand-built case: a decoder that outputs z itself, so the nearest draw is the one closest to y; rows not due
    keep their stored latent; a few training steps lower the loss; samples have the sampling API's shape."""
    import torch

    from cgml_lightning.models import CIMLEModule

    torch.manual_seed(0)
    module = CIMLEModule(toy_dm.info(), {"name": "mlp", "width": 16, "depth": 2}, latent_dim=3, num_draws=64,
                         resample_every=2, distance="l2", distance_region="all")
    module.generator.decode = lambda feats, z: z                        # output = latent: "nearest" is checkable
    y = torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    index = torch.tensor([0, 1])
    draws_seed = 7
    z = module.chosen_latents((), y, y, index, torch.Generator().manual_seed(draws_seed))
    draws = torch.randn(64, 2, 3, generator=torch.Generator().manual_seed(draws_seed))
    best = ((draws - y) ** 2).sum(-1).argmin(0)
    assert torch.equal(z, draws[best, torch.arange(2)])
    assert torch.equal(module.latents[index], z) and module.latents_epoch[index].tolist() == [0, 0]
    again = module.chosen_latents((), -y, -y, index, torch.Generator().manual_seed(1))   # epoch 0: not due yet
    assert torch.equal(again, z)


def test_cimle_trains_and_samples(toy_dm):
    import lightning as L
    import torch

    from cgml_lightning.models import CIMLEModule

    torch.manual_seed(0)
    module = CIMLEModule(toy_dm.info(), {"name": "mlp", "width": 32, "depth": 2}, latent_dim=4, num_draws=4)
    before = module.latents.clone()
    L.Trainer(accelerator="cpu", max_epochs=2, limit_val_batches=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(module, toy_dm)
    assert not torch.equal(module.latents, before) and (module.latents_epoch >= 0).any()
    x = toy_dm.grid(5)
    samples = module.sample(x, num_samples=3, seed=0)
    assert samples.shape == (5, 3, *module.y_shape) and samples.std(1).mean() > 0
    assert torch.equal(samples, module.sample(x, num_samples=3, seed=0))
