"""The guided-sampling figure of the README: free vs guided samples on the toy, and the measured shares.

    cgml-train experiment=toy hydra.run.dir=outputs/toy
    python docs/guided_toy.py outputs/toy/checkpoints/last.ckpt docs/toy_guided.png

Guide: relu(-y[0]) summed (penalise negative first coordinates), on a grid of 100 inputs x 20 samples, seed 0.
Prints the share of samples with y[0] > 0 and within 10% of the + mode (the README's metric), free and guided.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from cgml_lightning import CGMLModule  # noqa: E402
from cgml_lightning.data import ToyDataModule  # noqa: E402
from cgml_lightning.evaluation.metrics import mode_distances, mode_metrics, mode_tolerance  # noqa: E402
from cgml_lightning.plots import draw_toy  # noqa: E402


def shares(samples: torch.Tensor, modes: torch.Tensor) -> dict[str, float]:
    near_plus = mode_distances(samples, modes[:, 1:2])[..., 0] <= mode_tolerance(modes)[:, None]
    return {"y0_positive": (samples[..., 0] > 0).float().mean().item(),
            "near_plus_mode": near_plus.float().mean().item(),
            "mode_near_fraction": mode_metrics(samples, modes)["mode_near_fraction"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", type=Path, help="a toy checkpoint (cgml-train experiment=toy)")
    parser.add_argument("out", type=Path, help="where to write the PNG")
    args = parser.parse_args()
    model = CGMLModule.load_from_checkpoint(args.ckpt, map_location="cpu")
    data = ToyDataModule(num_modes=2)
    x = data.grid(100)
    modes = data.modes(x)
    guide = lambda s: torch.relu(-s[..., 0]).sum()                                  # noqa: E731
    runs = {"free": model.sample(x, 20, seed=0), "guided by relu(-y[0])": model.sample(x, 20, seed=0, guide=guide)}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, (name, samples) in zip(axes, runs.items()):
        measured = shares(samples, modes)
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in measured.items()))
        draw_toy(ax, x, samples, modes)
        ax.set_title(f"{name}: y[0] > 0 {measured['y0_positive']:.2f}, near + mode {measured['near_plus_mode']:.2f}")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
