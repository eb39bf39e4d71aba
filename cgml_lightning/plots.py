"""Pictures of samples: image grids (input | N samples | truth) with PIL, and the toy's samples-vs-x plot."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from cgml_lightning.evaluation import data_kind
from cgml_lightning.files import save_figure, save_image


def to_rgb(img: Tensor) -> Tensor:
    """[C, H, W] in [0, 1] -> [3, H, W]; a trailing mask channel (completion input) is shown as grey."""
    if img.shape[0] in (2, 4):                                 # visible pixels + mask channel
        visible, mask = img[:-1], img[-1:]
        img = visible * (1 - mask) + 0.5 * mask
    return img.expand(3, *img.shape[1:]) if img.shape[0] == 1 else img[:3]


def image_grid(x: Tensor, samples: Tensor, y: Tensor | None = None, scale: int = 4, pad: int = 1) -> Image.Image:
    """One row per input: input | N samples | truth. x [B, Cx, H, W], samples [B, N, C, H, W], y [B, C, H, W]."""
    rows = []
    for b in range(len(samples)):
        tiles = [to_rgb(x[b])] + [to_rgb(s) for s in samples[b]] + ([to_rgb(y[b])] if y is not None else [])
        tiles = [torch.nn.functional.pad(t, (pad, pad, pad, pad), value=1.0) for t in tiles]
        rows.append(torch.cat(tiles, dim=2))
    grid = torch.cat(rows, dim=1).clamp(0, 1)
    array = (grid.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    image = Image.fromarray(array)
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


MAX_PANELS = 8                  # y dimensions drawn for vector data without known modes


def draw_toy(ax, x: Tensor, samples: Tensor, modes: Tensor | None, dim: int = 0, truth: Tensor | None = None) -> None:
    """On a matplotlib axis: output dimension `dim` of the samples [B, N, D] (red) against x [B, 1], the true
    modes [B, K, D] as black lines (None: no modes) and each input's given y [B, D] as a black cross."""
    if modes is not None:
        for k in range(modes.shape[1]):
            ax.plot(x[:, 0].cpu(), modes[:, k, dim].cpu(), color="black", lw=1, alpha=0.6)
    xs = x[:, :1].expand(-1, samples.shape[1]).cpu()
    ax.scatter(xs.flatten(), samples[..., dim].detach().flatten().cpu(), s=3, alpha=0.4, color="tab:red")
    if truth is not None:
        ax.scatter(x[:, 0].cpu(), truth[:, dim].cpu(), s=12, marker="x", color="black")
    ax.set_xlabel("x")
    ax.set_ylabel(f"y[{dim}]")


def toy_plot(x: Tensor, samples: Tensor, modes: Tensor | None, path: str | Path, title: str = "",
             truth: Tensor | None = None) -> None:
    """Samples against x for each output dimension, with the true modes as lines and the given y as crosses.
    x [B, 1], samples [B, N, D], truth [B, D]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = samples.shape[-1]
    fig, axes = plt.subplots(1, dims, figsize=(4 * dims, 3.2), squeeze=False)
    for d, ax in enumerate(axes[0]):
        draw_toy(ax, x, samples, modes, d, truth)
    fig.suptitle(title or "samples (red) and true modes (black)")
    save_figure(fig, path)


def save_samples_png(module, datamodule, path: str | Path, num_inputs: int = 8, num_samples: int = 8,
                     seed: int = 0) -> Path:
    """The picture a run leaves behind: toy plot for vector data with known modes, image grid for images."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if data_kind(module, datamodule) == "image":
        batch = first_test_batch(datamodule)
        x, y = batch["x"][:num_inputs], batch["y"][:num_inputs]
        save_image(image_grid(x, module.sample(x, num_samples, seed=seed).cpu(), y), path)
    elif hasattr(datamodule, "grid"):
        x = datamodule.grid(100)
        toy_plot(x, module.sample(x, num_samples, seed=seed).cpu(), datamodule.modes(x), path)
    else:
        batch = first_test_batch(datamodule)
        x = batch["x"][:100]
        vector_plot(x, module.sample(x, num_samples, seed=seed).cpu(), path, truth=batch["y"][:100])
    return path


def vector_plot(x: Tensor, samples: Tensor, path: str | Path, modes: Tensor | None = None,
                truth: Tensor | None = None) -> Path:
    """Vector samples [B, N, ...] against the first value of x [B, ...], one panel per y dimension (the first
    MAX_PANELS), with the true modes [B, K, D] as lines where known and the given y [B, ...] as crosses."""
    order = x.flatten(1)[:, 0].argsort()
    samples = samples[order].flatten(2)
    modes = None if modes is None else modes[order][..., :MAX_PANELS]
    truth = None if truth is None else truth[order].flatten(1)[:, :MAX_PANELS]
    more = f" (the first {MAX_PANELS} of {samples.shape[-1]})" if samples.shape[-1] > MAX_PANELS else ""
    toy_plot(x[order].flatten(1)[:, :1], samples[..., :MAX_PANELS], modes, path,
             f"samples (red), truth (black x) against x[0], per y dimension{more}", truth)
    return Path(path)


def first_test_batch(datamodule) -> dict[str, Tensor]:
    """The first batch of the test split; a ValueError naming the datamodule when the split is empty."""
    batch = next(iter(datamodule.test_dataloader()), None)
    if batch is None:
        raise ValueError(f"{type(datamodule).__name__}: the test split is empty (raise data.test_fraction or add data)")
    return batch


def models_grid(x: Tensor, samples: dict[str, Tensor], y: Tensor | None = None, scale: int = 4,
                pad: int = 1) -> Image.Image:
    """Several models' samples for the same inputs, side by side: one row per input, input | each model's N samples
    | truth, under a header naming the columns. x [B, Cx, H, W], samples {name: [B, N, C, H, W]}, y [B, C, H, W]."""
    from PIL import ImageDraw

    names = list(samples)
    grid = image_grid(x, torch.cat([samples[n] for n in names], dim=1), y, scale=scale, pad=pad)
    tile = (x.shape[-1] + 2 * pad) * scale
    header = Image.new("RGB", (grid.width, 14), "white")
    draw = ImageDraw.Draw(header)
    columns = [("input", 1)] + [(n, samples[n].shape[1]) for n in names] + ([("truth", 1)] if y is not None else [])
    left = 0
    for name, width in columns:
        draw.text((left + 2, 1), name, fill="black")
        left += width * tile
    out = Image.new("RGB", (grid.width, grid.height + header.height), "white")
    out.paste(header, (0, 0))
    out.paste(grid.convert("RGB"), (0, header.height))
    return out
