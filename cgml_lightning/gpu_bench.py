"""GPU benchmark: cGML against the regressor at 64 and 128 px, in fp32, bf16-mixed and bf16-mixed + torch.compile.

    python -m cgml_lightning.gpu_bench [--out DIR] [--tiny] [train overrides, e.g. model.start_candidates=4]

Per (model, size, precision) it measures training samples/s (the module's full step through a Lightning
Trainer at that precision, timing.step_profile), the cgml / regressor step ratio, the peak memory
one step adds (the same run), and cGML's sampling samples/s (module.sample, 10 samples per input).
Per size it times cGML's start selection both ways (one decoder pass per candidate, or one pass over all of them),
checks the two pick the same starts and names the faster one for this device (model.start_batching).

The batches are synthetic (random images with a random rectangular hole, inputs = visible pixels + mask channel):
the data pipeline is not what is timed. bf16-mixed is Lightning's bf16-mixed precision for the training steps and
torch.autocast(bfloat16) around sampling and start selection. The full run is sized for at most 8 minutes on
one GPU (batches of 64 at 64 px and 32 at 128 px, 5 timed steps; --budget-s stops starting rows as the time runs out);
--tiny shrinks images, nets and batches so the same code runs on a CPU in seconds (a smoke test, not a measurement).
Writes DIR/gpu_bench.json and DIR/gpu_bench.md.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cgml_lightning import algorithm as A
from cgml_lightning.files import write_json, write_text
from cgml_lightning.timing import median_seconds, samples_per_second, step_profile

MODELS = ("cgml", "regressor")
PRECISIONS = ("fp32", "bf16-mixed", "bf16-mixed+compile")
FULL = {"batch_sizes": {64: 64, 128: 32}, "repeats": 5, "warmup": 2, "sample_inputs": 16, "num_train_samples": 10_000}
# tiny: the same rows at CPU-smoke scale: each size's preset at a quarter of the side, its depth kept, its width 4
TINY = {"batch_sizes": {64: 4, 128: 2}, "repeats": 1, "warmup": 1, "sample_inputs": 2, "num_train_samples": 64,
        "image_scale": 4, "net_overrides": ["net.width=4"]}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m cgml_lightning.gpu_bench", description=__doc__.split("\n")[0],
                                     epilog="Other arguments are train overrides (KEY=VALUE), applied to both models; "
                                            "model.* keys only to cGML.")
    parser.add_argument("--out", default="outputs/gpu_bench", help="folder for gpu_bench.json and gpu_bench.md")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes and 1 repeat: a CPU smoke run")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128],
                        help="image sides in px, each with its preset net=unet_<px> (default 64 128)")
    parser.add_argument("--batch-size", type=int, default=None, help="one batch size for every size "
                                                                      "(default 64 at 64 px, 32 at 128 px)")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per row (default 5; 1 with --tiny)")
    parser.add_argument("--num-samples", type=int, default=10, help="samples per input when timing sampling")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="run the compile rows: auto = except with --tiny (inductor's compile time would swamp "
                             "a smoke run)")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="no new row starts once this many seconds minus its reserve have passed "
                             "(reserve: 200 s for a compile row, 15 s otherwise); skipped rows say so")
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    for name in ("sizes", "batch_size", "repeats", "num_samples", "budget_s"):
        values = getattr(args, name)
        if any(v is not None and v <= 0 for v in (values if isinstance(values, list) else [values])):
            parser.error(f"--{name.replace('_', '-')} must be positive; got {values}")
    if args.device not in (None, "cpu", "cuda") and not str(args.device).startswith("cuda:"):
        parser.error(f"--device must be cpu or cuda (or cuda:N); got {args.device}")
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA GPU")
    return args, rest


def settings_for(args: argparse.Namespace) -> dict[str, Any]:
    preset = TINY if args.tiny else FULL
    sizes, default_batch = args.sizes, preset["batch_sizes"]
    batch_sizes = {s: args.batch_size or default_batch.get(s, default_batch[min(default_batch)]) for s in sizes}
    image_px = {s: max(8, s // preset.get("image_scale", 1)) for s in sizes}
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return {"tiny": args.tiny, "device": device, "sizes": sizes, "batch_sizes": batch_sizes, "image_px": image_px,
            "precisions": args.precisions, "repeats": args.repeats or preset["repeats"], "warmup": preset["warmup"],
            "num_samples": args.num_samples, "sample_inputs": preset["sample_inputs"],
            "num_train_samples": preset["num_train_samples"], "net_overrides": preset.get("net_overrides", []),
            "compile": args.compile == "on" or (args.compile == "auto" and not args.tiny),
            "budget_s": args.budget_s}


# ---- configs, modules and batches -------------------------------------------------------------------------------
def compose_model(model: str, size: int, overrides: list[str], settings: dict) -> tuple[Any, str, str | None]:
    """The train config of `model` with the U-Net preset for `size` px (net=unet_<size>; unet_base where no such
    preset exists, with a note). Returns (cfg, net name, note)."""
    from hydra import compose, initialize_config_module
    from hydra.errors import MissingConfigException

    own = [o for o in overrides if model == "cgml" or not o.lstrip("+~").startswith("model")]   # model.*: cGML's
    extra = [f"model={model}", *settings["net_overrides"], *own]
    with initialize_config_module("cgml_lightning.conf", version_base="1.3"):
        try:
            return compose("train", overrides=[f"net=unet_{size}", *extra]), f"unet_{size}", None
        except MissingConfigException:
            note = f"no net preset unet_{size}: unet_base used"
            return compose("train", overrides=["net=unet_base", *extra]), "unet_base", note


class SyntheticData:
    """Stands in for a datamodule where build_module asks for info(): RGB completion at `size` px."""

    def __init__(self, size: int, num_train_samples: int):
        self.size, self.num_train_samples = size, num_train_samples

    def info(self) -> dict[str, Any]:
        s = self.size
        return {"kind": "image", "x_shape": [4, s, s], "y_shape": [3, s, s], "mask_channel": True,
                "num_train_samples": self.num_train_samples, "fingerprint": f"synthetic-{s}px"}

    def batch(self, batch_size: int, device: torch.device, seed: int = 0) -> dict[str, Tensor]:
        """Random images, each with a random rectangular hole (a quarter to a half of each side)."""
        g, s = torch.Generator().manual_seed(seed), self.size
        y = torch.rand(batch_size, 3, s, s, generator=g)
        hole = torch.zeros(batch_size, 1, s, s)
        for i in range(batch_size):
            h, w = torch.randint(s // 4, s // 2 + 1, (2,), generator=g).tolist()
            top, left = torch.randint(0, s - h + 1, (1,), generator=g).item(), torch.randint(0, s - w + 1, (1,), generator=g).item()
            hole[i, :, top:top + h, left:left + w] = 1
        x = torch.cat([y * (1 - hole), hole], dim=1)
        index = torch.randperm(self.num_train_samples, generator=g)[:batch_size]
        return {"x": x.to(device), "y": y.to(device), "index": index.to(device)}


def build(cfg, data: SyntheticData, device: torch.device, compile: bool) -> tuple[Any, str | None]:
    """The module of cfg on device (model.compile as asked); where compile is unavailable, the warning that says
    why comes back instead of being raised."""
    from omegaconf import open_dict

    from cgml_lightning.runs import build_module

    with open_dict(cfg):
        cfg.model.compile = compile
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = build_module(cfg, data).to(device)
    unavailable = next((str(w.message) for w in caught if "model.compile=true ignored" in str(w.message)), None)
    return module, unavailable


def autocast(precision: str, device: torch.device):
    if precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---- measurements -----------------------------------------------------------------------------------------------
def start_selection(module, batch: dict[str, Tensor], repeats: int, warmup: int, check: bool) -> dict[str, Any]:
    """cGML's start selection timed both ways on the same batch, and (check) whether both pick the same starts."""
    x, y, index = batch["x"], batch["y"], batch["index"]
    module.train()
    with torch.no_grad():
        feats = tuple(f.detach() for f in module.generator.encode(x))
    saved, seconds = module.hparams.start_batching, {}
    try:
        for mode in ("loop", "batched"):
            module.hparams.start_batching = mode
            generator = lambda: torch.Generator().manual_seed(0)                                 # noqa: E731
            seconds[mode] = median_seconds(lambda: module.initial_latents(feats, y, x, index, generator()),
                                           repeats, warmup)
    finally:
        module.hparams.start_batching = saved
    out = {"loop_ms": 1e3 * seconds["loop"], "batched_ms": 1e3 * seconds["batched"],
           "faster": min(seconds, key=seconds.get), "candidates": module.hparams.start_candidates + 1}
    if check:
        out.update(starts_agree(module, feats, y, x))
    return out


def starts_agree(module, feats: tuple[Tensor, ...], y: Tensor, x: Tensor, seed: int = 0) -> dict[str, Any]:
    """Both ways on the same candidates: the share of inputs whose chosen candidate is the same, and the largest
    difference of their losses relative to the loss."""
    from cgml_lightning.models.base import repeat_feats

    b = len(y)
    m = module.hparams.start_candidates + 1
    candidates = A.sphere_sample(m, b, dim=module.hparams.latent_dim,
                                 generator=torch.Generator().manual_seed(seed)).to(y)
    rows = torch.arange(b, device=y.device).repeat(m)
    loop = A.start_losses(module.loss_fn(feats, y, x), candidates)
    batched = A.start_losses(module.loss_fn(repeat_feats(feats, rows), y[rows], x[rows]), candidates, batched=True)
    rel = ((loop - batched).abs() / loop.abs().clamp_min(1e-12)).max().item()
    same = (loop.argmin(0) == batched.argmin(0)).float().mean().item()
    return {"same_choice": same, "max_rel_loss_diff": rel}


def measure(size: int, precision: str, overrides: list[str], settings: dict) -> tuple[list[dict], dict | None]:
    """One (size, precision): a row per model, and cGML's start selection (None for the compile rows)."""
    device = torch.device(settings["device"])
    data = SyntheticData(settings["image_px"][size], settings["num_train_samples"])
    batch_size, repeats, warmup = settings["batch_sizes"][size], settings["repeats"], settings["warmup"]
    compile = precision.endswith("+compile")
    modules, notes = {}, {}
    for model in MODELS:
        cfg, net, note = compose_model(model, size, overrides, settings)
        modules[model], unavailable = build(cfg, data, device, compile)
        notes[model] = [n for n in (note, unavailable) if n]
        if compile and model == "cgml":
            notes[model].append("sampling and start selection not timed under compile (new shapes compile again)")
        if unavailable:                                   # the module fell back to eager: no compile row to measure
            return [{"model": m, "size": size, "image_px": data.size, "precision": precision,
                     "batch_size": batch_size, "net": net,
                     "status": "unavailable", "note": unavailable} for m in MODELS], None
    batch = data.batch(batch_size, device)
    trainer = {"accelerator": device.type, "precision": "bf16-mixed" if precision.startswith("bf16") else "32-true"}
    start = time.perf_counter()
    timing = {model: step_profile(module, [batch] * (warmup + repeats), warmup, **trainer)
              for model, module in modules.items()}
    step_s = {model: t["step_s"] for model, t in timing.items()}
    peak = {model: t["peak_mb"] for model, t in timing.items()}
    with autocast(precision, device):
        sampling = None
        if not compile:                                   # compiled sampling would compile new shapes again
            sampling = samples_per_second(modules["cgml"], batch["x"][: settings["sample_inputs"]],
                                          settings["num_samples"], repeats)
        starts = None if compile else start_selection(modules["cgml"], batch, repeats, warmup,
                                                      check=precision == "fp32")
        seconds = time.perf_counter() - start
    rows = []
    for model, module in modules.items():
        rows.append({
            "model": model, "size": size, "image_px": data.size, "precision": precision, "batch_size": batch_size,
            "net": net,
            "status": "ok", "note": "; ".join(notes[model]) or None,
            "parameters": sum(p.numel() for p in module.parameters() if p.requires_grad),
            "step_ms": 1e3 * step_s[model], "train_samples_per_s": batch_size / step_s[model],
            "step_ratio_to_regressor": step_s[model] / step_s["regressor"],
            "peak_step_memory_mb": peak[model],
            "sampling_samples_per_s": sampling if model == "cgml" else None,
            "start_batching": module.hparams.get("start_batching"),
            "row_seconds": seconds,                       # including warm-up (and, for compile rows, compilation)
        })
    return rows, starts


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_bench(argv: list[str]) -> dict[str, Any]:
    args, overrides = parse_args(argv)
    settings = settings_for(args)
    device = torch.device(settings["device"])
    began = time.perf_counter()
    rows: list[dict] = []
    starts: dict[str, dict] = {}
    groups = [(p, s) for p in settings["precisions"] for s in settings["sizes"]]     # compile rows last
    for precision, size in groups:
        compile = precision.endswith("+compile")
        skip = None
        if compile and not settings["compile"]:
            skip = "compile rows not run (--tiny, or --compile off); pass --compile on to run them"
        elif time.perf_counter() - began > settings["budget_s"] - (200 if compile else 15):
            skip = f"time budget: {settings['budget_s']:.0f} s (--budget-s) nearly spent"
        if skip:
            rows += [{"model": m, "size": size, "precision": precision, "batch_size": settings["batch_sizes"][size],
                      "status": "skipped", "note": skip} for m in MODELS]
            continue
        print(f"[gpu_bench] {size} px {precision} ...", file=sys.stderr, flush=True)
        try:
            measured, start_sel = measure(size, precision, overrides, settings)
        except Exception as err:                          # an OOM or a compiler error: recorded, the run goes on
            message = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:500]
            measured, start_sel = [{"model": m, "size": size, "precision": precision,
                                    "batch_size": settings["batch_sizes"][size], "status": "failed",
                                    "note": message} for m in MODELS], None
        rows += measured
        if start_sel is not None:
            starts[f"{size}/{precision}"] = {"size": size, "precision": precision, **start_sel}
        if compile:
            torch._dynamo.reset()
        release(device)
    choice = {}
    for size in settings["sizes"]:
        timed = [s for s in starts.values() if s["size"] == size]
        if timed:
            loop = statistics.median(s["loop_ms"] for s in timed)
            batched = statistics.median(s["batched_ms"] for s in timed)
            choice[str(size)] = "batched" if batched < loop else "loop"
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "device_type": device.type,
        "torch": torch.__version__, "python": platform.python_version(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        "threads": torch.get_num_threads(),
        "settings": {**{k: v for k, v in settings.items() if k not in ("batch_sizes", "image_px")},
                     "batch_sizes": {str(k): v for k, v in settings["batch_sizes"].items()},
                     "image_px": {str(k): v for k, v in settings["image_px"].items()},
                     "overrides": overrides},
        "rows": rows, "start_selection": list(starts.values()), "start_batching_choice": choice,
        "total_seconds": time.perf_counter() - began,
    }


# ---- report -----------------------------------------------------------------------------------------------------
def _num(value, fmt: str = "{:.1f}") -> str:
    return "–" if value is None else fmt.format(value)


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"# GPU benchmark: cGML vs regressor{' (--tiny smoke run: not a measurement)' if s['tiny'] else ''}",
        "",
        f"Device: **{report['device']}**; torch {report['torch']}"
        + (f", CUDA {report['cuda']}" if report["cuda"] else "") + f", Python {report['python']}; "
        f"TF32 matmul {report['tf32']['matmul']}, cuDNN {report['tf32']['cudnn']}; {report['threads']} CPU threads.",
        f"Synthetic RGB completion batches (batch sizes {s['batch_sizes']} by preset px"
        + (f"; --tiny: images of {s['image_px']} px, nets {' '.join(s['net_overrides'])}" if s["tiny"] else "")
        + f"); {s['repeats']} timed steps after "
        f"{s['warmup']} warm-up; sampling: {s['num_samples']} samples per input on {s['sample_inputs']} inputs; "
        f"overrides: {' '.join(s['overrides']) or 'none'}; total {report['total_seconds']:.0f} s.",
        "",
        "| model | preset px | net | batch | precision | train samples/s | step ms | step / regressor | peak step MiB "
        "| sampling samples/s | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['size']} | {r.get('net', '–')} | {r['batch_size']} | {r['precision']} "
                         f"| – | – | – | – | – | {r['status']}: {r['note']} |")
            continue
        lines.append(f"| {r['model']} | {r['size']} | {r['net']} | {r['batch_size']} | {r['precision']} "
                     f"| {_num(r['train_samples_per_s'])} | {_num(r['step_ms'])} "
                     f"| {_num(r['step_ratio_to_regressor'], '{:.2f}')} | {_num(r['peak_step_memory_mb'])} "
                     f"| {_num(r['sampling_samples_per_s'])} | {r['note'] or ''} |")
    if report["start_selection"]:
        lines += ["", "Start selection (cGML, one batch): one decoder pass per candidate (loop) or one over all "
                      "(batched); same choice = share of inputs given the same start both ways (fp32).", "",
                  "| preset px | precision | candidates | loop ms | batched ms | faster | same choice | max rel. loss diff |",
                  "|---|---|---|---|---|---|---|---|"]
        for t in report["start_selection"]:
            lines.append(f"| {t['size']} | {t['precision']} | {t['candidates']} | {_num(t['loop_ms'], '{:.2f}')} "
                         f"| {_num(t['batched_ms'], '{:.2f}')} | {t['faster']} | {_num(t.get('same_choice'), '{:.3f}')} "
                         f"| {_num(t.get('max_rel_loss_diff'), '{:.1e}')} |")
        lines += ["", "Faster start selection on this device, by px: "
                  + ", ".join(f"{px}: `model.start_batching={m}`" for px, m in report["start_batching_choice"].items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(parse_args(argv)[0].out)
    report = run_bench(argv)
    write_json(out / "gpu_bench.json", report)
    table = markdown(report)
    write_text(out / "gpu_bench.md", table)
    print(table)
    print(f"wrote {out / 'gpu_bench.json'} and {out / 'gpu_bench.md'}", file=sys.stderr)
    failed = [r for r in report["rows"] if r["status"] == "failed" and not r["precision"].endswith("+compile")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
