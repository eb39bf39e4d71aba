"""The lean z-phase: what a z-step may and may not run, and the timing helpers.
Behaviour only; the speed itself is measured by `python -m cgml_lightning.timing`, never by a timed test."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from cgml_lightning import CGMLModule, RegressorModule
from cgml_lightning import algorithm as A
from cgml_lightning.nets.unet import UNetGenerator
from cgml_lightning.timing import samples_per_second, step_profile

UNET_NET = {"name": "unet", "width": 8, "depth": 2}
SMALL = dict(z_phase="paper", latent_dim=4, z_steps=3, start_candidates=4, dynamics_net={"width": 32, "depth": 2})


def count_calls(modules: list[nn.Module]) -> list[int]:
    calls = [0]
    for m in modules:
        m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_z_steps_run_neither_encoder_nor_skip_convs(digits_dm):
    """A z-step runs only the z-dependent part of the decoder: the skips' share of each level's first conv
    (lateral) is part of encode(), computed once per batch."""
    torch.manual_seed(0)
    module = CGMLModule(digits_dm.info(), UNET_NET, **SMALL)
    batch = next(iter(digits_dm.train_dataloader()))
    g = module.generator
    encoder_calls = count_calls([g.stem, *g.down, *g.lateral])
    decoder_calls = count_calls(list(g.up_in))
    module.z_phase(g.encode(batch["x"]), batch["y"], batch["x"], batch["index"])
    assert encoder_calls[0] == 1 + len(g.down) + len(g.lateral)            # the one encode() above
    runs = 1 + SMALL["start_candidates"] + SMALL["z_steps"]                   # candidates + z-steps
    assert decoder_calls[0] == runs * len(g.up_in)


def test_split_skip_conv_equals_conv_of_concatenation():
    """up_in(h) + lateral(skip) is the U-Net's conv of [h, skip] with the two weights side by side."""
    torch.manual_seed(0)
    g = UNetGenerator((2, 8, 8), (1, 8, 8), latent_dim=3, width=4, depth=1, upsample="nearest")
    h, skip = torch.randn(2, 8, 8, 8), torch.randn(2, 4, 8, 8)
    weight = torch.cat([g.up_in[0].weight, g.lateral[0].weight], dim=1)
    joint = torch.nn.functional.conv2d(torch.cat([h, skip], 1), weight, g.lateral[0].bias, padding=1)
    torch.testing.assert_close(g.up_in[0](h) + g.lateral[0](skip), joint, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("convs", [1, 2])
def test_decoder_convs(convs):
    g = UNetGenerator((2, 8, 8), (1, 8, 8), latent_dim=3, width=4, depth=2, decoder_convs=convs)
    assert sum(isinstance(m, nn.Conv2d) for m in g.up.modules()) == (convs - 1) * 2
    out = g.decode(g.encode(torch.rand(2, 2, 8, 8)), A.sphere_sample(2, dim=3))
    assert out.shape == (2, 1, 8, 8)


@pytest.mark.parametrize("upsample", ["transposed", "nearest"])
@pytest.mark.parametrize("size", [8, 28, 7])
def test_upsample_restores_every_level_size(upsample, size):
    """28 -> 14 -> 7 -> 4 on the way down; the transposed conv's 8 is cropped back to 7 on the way up."""
    g = UNetGenerator((2, size, size), (1, size, size), latent_dim=3, width=4, depth=3, upsample=upsample)
    assert g.decode(g.encode(torch.rand(2, 2, size, size)), A.sphere_sample(2, dim=3)).shape == (2, 1, size, size)
    assert all(isinstance(m, nn.ConvTranspose2d if upsample == "transposed" else nn.Conv2d) for m in g.up_in)


def test_decoder_convs_rejected():
    with pytest.raises(ValueError, match="decoder_convs"):
        UNetGenerator((2, 8, 8), (1, 8, 8), latent_dim=3, decoder_convs=3)
    with pytest.raises(ValueError, match="net.upsample"):
        UNetGenerator((2, 8, 8), (1, 8, 8), latent_dim=3, upsample="bilinear")


def test_z_steps_memory_is_flat():
    """No graph survives from one z-step to the next: each step's gradient sees a fresh leaf."""
    leaves = []

    def loss_fn(z):
        leaves.append(z)
        return (z * 2).pow(2).sum(dim=1)

    A.z_descent(loss_fn, A.sphere_sample(3, dim=4), steps=4, lr=0.1)
    assert all(z.is_leaf and z.grad_fn is None for z in leaves)
    assert len({id(z) for z in leaves}) == 4


def test_step_profile_times_the_modules_own_step_and_its_phases(digits_dm):
    """step_profile runs each kind of module's own training step (manual and automatic optimization) through a
    Trainer, and reads cGML's phase records from Lightning's profiler; sampling throughput is positive."""
    torch.manual_seed(0)
    cgml = CGMLModule(digits_dm.info(), UNET_NET, **SMALL)
    reg = RegressorModule(digits_dm.info(), UNET_NET)
    batches = [next(iter(digits_dm.train_dataloader()))] * 3
    before = {k: v.clone() for k, v in cgml.state_dict().items()}
    timed = {name: step_profile(m, batches, warmup=1) for name, m in {"cgml": cgml, "regressor": reg}.items()}
    assert all(t["step_s"] > 0 for t in timed.values())
    changed = [k for k, v in cgml.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("generator.") for k in changed) and "latents" in changed
    phases = timed["cgml"]["phases_s"]
    assert set(phases) == {"encoder", "start_selection", "z_steps", "dynamics_loss", "w_loss", "backward", "update"}
    assert 0 < sum(phases.values()) <= timed["cgml"]["step_s"] * 1.05
    assert timed["regressor"]["phases_s"] == {}                         # it records no sections
    assert samples_per_second(cgml, batches[0]["x"][:4], 3, repeats=1) > 0


def test_phase_records_reach_a_real_runs_profiler(toy_dm):
    """trainer.profiler=simple in a real run lists cGML's sections; without a profiler nothing is recorded."""
    from lightning.pytorch.profilers import SimpleProfiler

    module = CGMLModule(toy_dm.info(), {"name": "mlp", "width": 16, "depth": 2}, **SMALL)
    profiler = SimpleProfiler()
    L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              profiler=profiler).fit(module, toy_dm)
    assert len(profiler.recorded_durations["[cgml] z_steps"]) == 2
    with module.phase("anything"):                                     # the trainer's profiler is gone after fit
        pass


def test_peak_step_memory_grows_with_the_batch(digits_dm):
    """The step's peak memory is measured per module and scales with what the step holds (16x the rows)."""
    torch.manual_seed(0)
    net = {"name": "unet", "width": 32, "depth": 2, "decoder_convs": 1}
    modules = {"cgml": CGMLModule(digits_dm.info(), net, z_phase="paper", latent_dim=16, z_steps=3),
               "regressor": RegressorModule(digits_dm.info(), net)}
    train = digits_dm.splits["train"]
    rows = torch.arange(256) % len(train)
    big = {"x": train.x[rows], "y": train.y[rows], "index": rows}
    small = {k: v[:16] for k, v in big.items()}
    peak_big = {n: step_profile(m, [big] * 2, warmup=1)["peak_mb"] for n, m in modules.items()}
    peak_small = {n: step_profile(m, [small] * 2, warmup=1)["peak_mb"] for n, m in modules.items()}
    if peak_big["cgml"] is None:
        pytest.skip("neither CUDA nor /proc/self/clear_refs: peak memory is not readable here")
    assert peak_big["cgml"] > 3 * peak_small["cgml"] > 0 and peak_big["regressor"] > 3 * peak_small["regressor"] > 0


# ---- speed options from config: model.compile, model.channels_last, trainer.precision -----------------------------
def test_compile_wraps_encode_and_decode_and_keeps_state_dict_keys(digits_dm):
    plain = CGMLModule(digits_dm.info(), UNET_NET, **SMALL)
    module = CGMLModule(digits_dm.info(), UNET_NET, **SMALL, compile=True)
    assert module.generator.decode is not module.generator.__class__.decode
    assert hasattr(module.generator.decode, "_torchdynamo_orig_callable")
    assert list(module.state_dict()) == list(plain.state_dict())          # checkpoints stay interchangeable


def test_compile_skipped_with_warning_where_unsupported(digits_dm, monkeypatch):
    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    with pytest.warns(UserWarning, match="model.compile=true ignored"):
        module = CGMLModule(digits_dm.info(), UNET_NET, **SMALL, compile=True)
    assert not hasattr(module.generator.decode, "_torchdynamo_orig_callable")


def test_channels_last_gives_the_same_outputs(digits_dm):
    batch = next(iter(digits_dm.train_dataloader()))
    torch.manual_seed(0)
    plain = CGMLModule(digits_dm.info(), UNET_NET, **SMALL)
    torch.manual_seed(0)
    fast = CGMLModule(digits_dm.info(), UNET_NET, **SMALL, channels_last=True)
    assert fast.generator.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    feats = fast.generator.encode(batch["x"][:4])                          # a plain NCHW batch in
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in feats)
    a = plain.sample(batch["x"][:4], 3, seed=0)
    b = fast.sample(batch["x"][:4], 3, seed=0)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_bf16_mixed_precision_trains_cgml(toy_dm):
    import lightning as L

    module = CGMLModule(toy_dm.info(), {"name": "mlp", "width": 32, "depth": 2}, **SMALL)
    before = module.latents.detach().clone()
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", fast_dev_run=2, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=toy_dm)
    assert module.latents.dtype == torch.float32 and not torch.equal(module.latents, before)
    assert torch.isfinite(module.latents).all()


# ---- start selection: one decoder pass per candidate (loop) or one over all of them (batched) ----------------------
@pytest.mark.parametrize("net", [{"name": "mlp", "width": 32, "depth": 2}, UNET_NET], ids=["mlp", "unet"])
def test_batched_start_selection_picks_the_same_starts(net, toy_dm, digits_dm):
    dm = toy_dm if net["name"] == "mlp" else digits_dm
    modules = {}
    for mode in ("loop", "batched"):
        torch.manual_seed(0)
        modules[mode] = CGMLModule(dm.info(), net, **SMALL, start_batching=mode)
    loop, batched = modules["loop"], modules["batched"]
    assert all(torch.equal(a, b) for a, b in zip(loop.state_dict().values(), batched.state_dict().values()))
    batch = next(iter(dm.train_dataloader()))
    x, y, index = batch["x"], batch["y"], batch["index"]
    feats = tuple(f.detach() for f in loop.generator.encode(x))

    # the losses of the same candidates, both ways: the same choice for every input
    m, b = SMALL["start_candidates"] + 1, len(y)
    candidates = A.sphere_sample(m, b, dim=SMALL["latent_dim"], generator=torch.Generator().manual_seed(1))
    rows = torch.arange(b).repeat(m)
    per_candidate = A.start_losses(loop.loss_fn(feats, y, x), candidates)
    one_pass = A.start_losses(loop.loss_fn(tuple(f[rows] for f in feats), y[rows], x[rows]), candidates,
                              batched=True)
    torch.testing.assert_close(one_pass, per_candidate, rtol=1e-5, atol=1e-5)
    assert torch.equal(one_pass.argmin(0), per_candidate.argmin(0))

    # through the module setting: the same generator draws the same candidates, and the same z is chosen
    z_loop = loop.initial_latents(feats, y, x, index, torch.Generator().manual_seed(2))
    z_batched = batched.initial_latents(feats, y, x, index, torch.Generator().manual_seed(2))
    assert torch.equal(z_batched, z_loop)


def test_start_batching_setting(toy_dm):
    net = {"name": "mlp", "width": 16, "depth": 2}
    assert CGMLModule(toy_dm.info(), net, **SMALL).hparams.start_batching == "loop"     # today's CPU path
    auto = CGMLModule(toy_dm.info(), net, **SMALL, start_batching="auto")
    assert not auto.batched_starts(torch.device("cpu")) and auto.batched_starts(torch.device("cuda"))
    assert CGMLModule(toy_dm.info(), net, **SMALL, start_batching="batched").batched_starts(torch.device("cpu"))
    with pytest.raises(ValueError, match="model.start_batching"):
        CGMLModule(toy_dm.info(), net, **SMALL, start_batching="sometimes")


def test_gpu_bench_tiny_runs_on_cpu(tmp_path):
    """The GPU benchmark's every row, at smoke scale on a CPU: JSON and Markdown written, speeds positive, the
    two ways of start selection agreeing. Its numbers are not checked: they mean something only on a GPU."""
    import json

    from cgml_lightning import gpu_bench

    assert gpu_bench.main(["--tiny", "--device", "cpu", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert report["device"] == "cpu" and report["torch"] == torch.__version__
    rows = {(r["model"], r["size"], r["precision"]): r for r in report["rows"]}
    assert set(rows) == {(m, s, p) for m in gpu_bench.MODELS for s in (64, 128) for p in gpu_bench.PRECISIONS}
    for (model, size, precision), row in rows.items():
        if precision.endswith("+compile"):                 # not run in --tiny: recorded as such
            assert row["status"] in ("skipped", "unavailable") and row["note"]
            continue
        assert row["status"] == "ok", row
        assert row["train_samples_per_s"] > 0 and row["step_ratio_to_regressor"] > 0
        assert row["sampling_samples_per_s"] > 0 if model == "cgml" else row["sampling_samples_per_s"] is None
    starts = {(t["size"], t["precision"]): t for t in report["start_selection"]}
    assert set(starts) == {(s, p) for s in (64, 128) for p in ("fp32", "bf16-mixed")}
    assert all(starts[(s, "fp32")]["same_choice"] == 1.0 for s in (64, 128))
    assert set(report["start_batching_choice"]) == {"64", "128"}
    table = (tmp_path / "gpu_bench.md").read_text()
    assert "Device: **cpu**" in table and "bf16-mixed+compile" in table


def test_gpu_bench_records_compile_unavailable(tmp_path, monkeypatch):
    """Where torch.compile cannot run, the compile rows say why instead of failing the run."""
    import json

    from cgml_lightning import gpu_bench

    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    argv = ["--tiny", "--device", "cpu", "--compile", "on", "--precisions", "bf16-mixed+compile", "--sizes", "64",
            "--out", str(tmp_path)]
    assert gpu_bench.main(argv) == 0
    rows = json.loads((tmp_path / "gpu_bench.json").read_text())["rows"]
    assert [(r["model"], r["status"]) for r in rows] == [("cgml", "unavailable"), ("regressor", "unavailable")]
    assert all("not supported" in r["note"] for r in rows)


def test_gpu_bench_refuses_arguments_that_measure_nothing(capsys, monkeypatch):
    from cgml_lightning import gpu_bench

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv, message in ((["--sizes", "-64"], "--sizes must be positive"), (["--repeats", "0"], "--repeats must be"),
                          (["--batch-size", "0"], "--batch-size must be"), (["--budget-s", "0"], "--budget-s must be"),
                          (["--device", "tpu"], "--device must be cpu or cuda"),
                          (["--device", "cuda"], "sees no CUDA GPU")):
        with pytest.raises(SystemExit):
            gpu_bench.parse_args(argv)
        assert message in capsys.readouterr().err


def test_timing_refuses_another_model_in_cgmls_place():
    from cgml_lightning.timing import perf_report

    with pytest.raises(ValueError, match="model= is no option here"):
        perf_report(["experiment=toy", "model=regressor"])
