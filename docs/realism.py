"""Why are single samples further from y than a regressor's output? The squared error of a sample s of input x
splits exactly into the error of the samples' mean m(x) and their spread around it:

    E_s ||s - y||^2 = ||m - y||^2 + E_s ||s - m||^2        (the mean over one input's N samples)

A regressor trained toward the conditional mean has the first term alone; a perfect sampler of p(y | x) has a spread
equal to that term, which puts the error of its single samples at twice the mean's (3.01 dB lower PSNR). This
script measures both terms (per-pixel MSE, averaged over the test inputs) and the metrics of evaluate(), for each
checkpoint, its averaged and live weights (when it was trained with model.ema_decay) and, for cGML, each number of
dynamics steps in --steps:

    python docs/realism.py RUN_A/checkpoints/last.ckpt [RUN_B/...] [--num-inputs 500] [--steps 0,1,3]
                           [--centre REG/checkpoints/last.ckpt]

--centre moves each sampler's samples onto another model's answer (s - mean of the N samples + the answer, and the
same at half the spread), a second table: do the samples' deviations from their mean point toward y from a better
mean too, or is the better mean all a sampler would gain?

The data and feature nets are cgml-eval's: the checkpoint's data, and FID's features (Inception where its weights are
on disk, else the dataset classifier's), built once for the first checkpoint, so give checkpoints of the same data.
Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import contextlib

import torch

from cgml_lightning.evaluation import evaluate, first_inputs
from cgml_lightning.evaluation.feature_nets import build_eval_nets
from cgml_lightning.evaluation.metrics import image_metrics, pairwise_l1_diversity
from cgml_lightning.runs import load_with_data, plain


def decomposition(module, datamodule, num_samples: int, num_inputs: int, seed: int) -> dict[str, float]:
    """Per-pixel MSE of single samples, of the samples' mean and the spread around it, averaged over the inputs."""
    generator = torch.Generator().manual_seed(seed)
    totals = {"mse_single": 0.0, "mse_of_mean": 0.0, "spread": 0.0}
    seen = 0
    for batch in first_inputs(datamodule.test_dataloader(), num_inputs):
        x, y = batch["x"], batch["y"]
        s = module.sample(x, num_samples, generator=generator).cpu()          # [B, N, C, H, W]
        mean = s.mean(1)
        totals["mse_single"] += (s - y[:, None]).pow(2).flatten(2).mean(-1).mean(1).sum().item()
        totals["mse_of_mean"] += (mean - y).pow(2).flatten(1).mean(-1).sum().item()
        totals["spread"] += (s - mean[:, None]).pow(2).flatten(2).mean(-1).mean(1).sum().item()
        seen += len(x)
    return {key: value / seen for key, value in totals.items()}


@torch.no_grad()
def recentred(module, answer_module, datamodule, num_samples: int, num_inputs: int, seed: int) -> dict[str, dict]:
    """evaluate()'s PSNRs and pixel diversity of the samples s moved onto answer_module's output a: a + (s - mean(s))
    ("moved") and a + (s - mean(s)) / 2 ("half spread"), pixels clipped to [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    totals: dict[str, dict[str, float]] = {"moved": {}, "half spread": {}}
    seen = 0
    for batch in first_inputs(datamodule.test_dataloader(), num_inputs):
        x, y = batch["x"], batch["y"]
        s = module.sample(x, num_samples, generator=generator).cpu()
        answer = answer_module.sample(x, 1, seed=seed).cpu()
        for name, scale in (("moved", 1.0), ("half spread", 0.5)):
            moved = (answer + scale * (s - s.mean(1, keepdim=True))).clamp(0, 1)
            per_input = {**image_metrics(moved, y, hole=module.hole(x)), "diversity": pairwise_l1_diversity(moved)}
            for key, value in per_input.items():
                totals[name][key] = totals[name].get(key, 0.0) + value.sum().item()
        seen += len(x)
    return {name: {key: value / seen for key, value in metrics.items()} for name, metrics in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--num-inputs", type=int, default=500)
    parser.add_argument("--num-samples", type=int, default=10)
    parser.add_argument("--steps", default="0,1,3", help="cGML's dynamics steps at sampling, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--centre", help="a checkpoint whose answer the samples are moved onto (a second table)")
    args = parser.parse_args()
    print("| checkpoint | weights | steps | best-of-N PSNR | mean PSNR | FID | feature diversity | MSE of a sample "
          "| = MSE of the mean | + spread |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    nets = None
    for path in args.checkpoints:
        module, datamodule, cfg = load_with_data(path)                # cgml-eval's data and feature nets
        nets = nets or build_eval_nets(datamodule, **plain(cfg.feature_net))
        for weights in ("averaged", "live") if module.ema is not None else ("live",):
            with module.live_weights() if weights == "live" else contextlib.nullcontext():
                steps = [int(s) for s in args.steps.split(",")] if module.module_name == "cgml" else [None]
                for k in steps:
                    if k is not None:
                        module.hparams.sample_steps = k
                    m = evaluate(module, datamodule, args.num_samples, args.num_inputs, args.seed, nets)
                    d = decomposition(module, datamodule, args.num_samples, args.num_inputs, args.seed)
                    fid, features = ("-" if m.get(key) is None else f"{m[key]:.4g}"
                                     for key in ("fid", "diversity_features"))
                    print(f"| {module.module_name} {path} | {weights} | {'-' if k is None else k} | "
                          f"{m['psnr_best_of_n']:.2f} | {m['psnr_mean']:.2f} | {fid} | {features} | "
                          f"{d['mse_single']:.5f} | {d['mse_of_mean']:.5f} | {d['spread']:.5f} |", flush=True)
    if args.centre:
        answer_module = load_with_data(args.centre)[0]
        print(f"\nSamples moved onto the answer of {args.centre}:\n")
        print("| checkpoint | samples | best-of-N PSNR | mean PSNR | hole best-of-N | diversity |")
        print("|---|---|---|---|---|---|")
        for path in args.checkpoints:
            module = load_with_data(path)[0]
            if path == args.centre or module.module_name == "regressor":
                continue
            rows = recentred(module, answer_module, datamodule, args.num_samples, args.num_inputs, args.seed)
            for name, m in rows.items():
                hole = f"{m['psnr_hole_best_of_n']:.2f}" if "psnr_hole_best_of_n" in m else "-"
                print(f"| {module.module_name} {path} | {name} | {m['psnr_best_of_n']:.2f} | {m['psnr_mean']:.2f} | "
                      f"{hole} | {m['diversity']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
