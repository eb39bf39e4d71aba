"""Writes the notebooks in this folder (without outputs) from the cells below: `python notebooks/make_notebooks.py`.

Edit the cells here, not in the .ipynb files, then re-run this script; tests/test_notebooks.py executes every
notebook top to bottom and checks that the committed files carry no outputs. Each notebook is sized for a CPU
laptop and for CI (a few epochs on small subsets): its pictures show the pipeline, not the quality of a full run
(the README gives the full runs and their figures).
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
KERNEL = {"kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
          "language_info": {"name": "python"}}

SETUP = """\
import logging
import warnings

import lightning as L
import matplotlib.pyplot as plt
import torch

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)     # keep the notebook's output to the point
warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)
QUIET = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
             enable_model_summary=False)


def show(image, title: str, width: float = 9.0):
    \"\"\"A PIL image (e.g. cgml_lightning.plots.image_grid) inline, at its own aspect ratio.\"\"\"
    plt.figure(figsize=(width, width * image.height / image.width))
    plt.imshow(image)
    plt.axis("off")
    plt.title(title)
    plt.show()"""


# ---- 01: quickstart --------------------------------------------------------------------------------------------
QUICKSTART = [
    ("md", """\
# 01 · Quickstart: complete handwritten digits

cGML learns **one input, many right answers** with regression losses only: a generator `G(x, z)`, and a
latent-dynamics network `Z` that walks a random `z` on the sphere to a mode of the answers.

This notebook trains on scikit-learn's bundled 8×8 digits with the bottom half hidden (offline, no download),
samples several completions per input and measures them. It trains **3 epochs** (about a minute on a CPU), so
the completions are rough; `cgml-train hydra.run.dir=outputs/digits` trains the shipped 60 epochs."""),
    ("code", SETUP),
    ("code", """\
from cgml_lightning import CGMLModule
from cgml_lightning.data import DigitsDataModule
from cgml_lightning.evaluation import evaluate
from cgml_lightning.plots import image_grid

L.seed_everything(0)
data = DigitsDataModule(batch_size=64)          # the embedded default: x = top half + mask channel, y = digit
data.setup()
batch = next(iter(data.train_dataloader()))
print({key: tuple(value.shape) for key, value in batch.items()})   # index addresses the per-sample latent table"""),
    ("md", """\
## Train

The same U-Net and settings as `cgml-train` (`net=unet_small`; `z_phase` picks the image settings);
`z` lives on the sphere S¹⁵. Each training step runs the z-phase (3 short gradient steps on `z` only), regresses
`Z` on the path, and updates the generator at the converged `z`."""),
    ("code", """\
unet = {"name": "unet", "width": 32, "depth": 2, "decoder_convs": 1}
model = CGMLModule(data.info(), net=unet, latent_dim=16)    # image data: the image z_phase
L.Trainer(max_epochs=3, **QUIET).fit(model, data)"""),
    ("md", """\
## Sample

`model.sample(x, num_samples=N)` returns `[B, N, *y.shape]`: every sample starts at its own random point on the
sphere and walks `sample_steps` dynamics steps. The visible half is kept from the input."""),
    ("code", """\
test = next(iter(data.test_dataloader()))
x, y = test["x"][:8], test["y"][:8]
samples = model.sample(x, num_samples=8, seed=0)
print(tuple(samples.shape))
show(image_grid(x, samples, y), "input (hidden half grey) | 8 samples | truth")"""),
    ("code", """\
metrics = evaluate(model, data, num_samples=10, num_inputs=100)
{key: round(value, 3) for key, value in metrics.items() if isinstance(value, float)}"""),
    ("md", """\
`psnr_best_of_n` is the best of 10 samples per input, `diversity` the mean pixel L1 between samples of one
input (a regressor scores 0). The same from the command line:

```bash
cgml-train hydra.run.dir=outputs/digits                                 # 60 epochs, about 2 minutes on a CPU
cgml-sample ckpt_path=outputs/digits/checkpoints/last.ckpt input=my_digit.png   # your own image
```"""),
]


# ---- 02: the toy -----------------------------------------------------------------------------------------------
TOY = [
    ("md", """\
# 02 · The paper's toy: y = ±4 (x, x², x³)

Every input `x` has two right answers. A regressor settles on one curve between them; cGML should put each sample
near one of the two modes. This notebook trains both on 2000 points (about 20 s), looks at how `Z` moves the
latents (the paper's sampler: uniform starts walked by Z), measures mode coverage, and steers samples with a
guide. The shipped `cgml-train experiment=toy` (20000 points, 40 epochs, about 2 minutes) takes unit-gradient
z-steps and draws its starts from the latent table (`sample_starts="table"`): 0.97 of samples near a mode, also
with three or four branches; this quick one less."""),
    ("code", SETUP),
    ("code", """\
from cgml_lightning import CGMLModule, RegressorModule
from cgml_lightning import algorithm as A
from cgml_lightning.data import ToyDataModule
from cgml_lightning.evaluation import evaluate

EPOCHS = 20
L.seed_everything(0)
data = ToyDataModule(num_samples=2000, batch_size=32)
adam = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 3e-3}
cosine = {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "_partial_": True, "T_max": EPOCHS}
mlp = {"name": "mlp", "width": 64}

cgml = CGMLModule(data.info(), mlp, z_phase="paper", latent_dim=10, z_steps=5, dynamics_net={"width": 64},
                  optimizer=adam, scheduler=cosine)
regressor = RegressorModule(data.info(), mlp, optimizer=adam, scheduler=cosine)
for model in (cgml, regressor):
    L.Trainer(max_epochs=EPOCHS, limit_val_batches=0, num_sanity_val_steps=0, **QUIET).fit(model, data)"""),
    ("md", "## Samples against x: cGML finds both branches, the regressor one curve between them"),
    ("code", """\
from cgml_lightning.plots import draw_toy

x = data.grid(100)                               # 100 inputs in [0, 1]
modes = data.modes(x)                            # [100, 2, 3]: the two true answers
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
for ax, (name, model) in zip(axes, [("cGML", cgml), ("regressor", regressor)]):
    draw_toy(ax, x, model.sample(x, num_samples=20, seed=0), modes)
    ax.set_title(f"{name}: 20 samples per x (red), true modes (black)")
plt.show()"""),
    ("code", """\
rows = {name: evaluate(model, data, num_samples=20, num_inputs=100) for name, model in
        [("cGML", cgml), ("regressor", regressor)]}
print(f"{'':10s} {'near a mode':>12s} {'coverage':>9s} {'balance':>8s}")
for name, m in rows.items():
    print(f"{name:10s} {m['mode_near_fraction']:12.2f} {m['mode_coverage']:9.2f} {m['mode_balance']:8.2f}")"""),
    ("md", """\
`near a mode`: share of samples within 10% of the nearer true mode; `coverage`: share of inputs whose 20
samples hit both modes; `balance`: the rarer mode's share of the hits (0.5 is perfect).

## Latent trajectories under Z

At inference each sample starts at a random point on the sphere S⁹ and takes dynamics steps
`z ← normalize(z + ρ (r − z)/‖r − z‖)` with `(r, ρ) = Z(h̄, z)`. Below: 40 starts for the input x = 0.7,
decoded after every step. The walk carries each start into one of the two modes."""),
    ("code", """\
STEPS = 8
x0 = torch.tensor([[0.7]]).expand(40, 1)
with torch.no_grad():
    feats = cgml.generator.encode(x0)
    hbar = cgml.generator.summarize(feats)
    z = A.sphere_sample(40, dim=cgml.latent_dim, generator=torch.Generator().manual_seed(0))
    path = [z]
    for _ in range(STEPS):
        z = A.dynamics_step(z, *cgml.dynamics(hbar, z))
        path.append(z)
    path = torch.stack(path)                                            # [STEPS + 1, 40, 10]
    outputs = torch.stack([cgml.generator.decode(feats, z_t) for z_t in path])   # [STEPS + 1, 40, 3]

# the latents in the plane of their first two principal directions, coloured by the mode they reach
flat = path.reshape(-1, path.shape[-1])
_, _, v = torch.pca_lowrank(flat - flat.mean(0), q=2)
plane = (path - flat.mean(0)) @ v                                       # [STEPS + 1, 40, 2]
colour = ["tab:blue" if y0 > 0 else "tab:orange" for y0 in outputs[-1, :, 0]]
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
for i in range(40):
    left.plot(plane[:, i, 0], plane[:, i, 1], color=colour[i], lw=0.8, alpha=0.7)
    left.scatter(plane[-1, i, 0], plane[-1, i, 1], color=colour[i], s=12)
    right.plot(range(STEPS + 1), outputs[:, i, 0], color=colour[i], lw=0.8, alpha=0.7)
left.set_title("z_t (PCA of S⁹), dot = after the last step")
for k in range(2):
    right.axhline(float(data.modes(torch.tensor([[0.7]]))[0, k, 0]), color="black", lw=1, ls="--")
right.set_xlabel("dynamics step")
right.set_ylabel("decoded y[0]")
right.set_title("decoded y[0] along the walk; dashed: the true modes")
plt.show()"""),
    ("md", """\
## Guided sampling

Any differentiable penalty on the samples can steer them: a few normalized gradient steps on the starting
points through `G`, then the usual dynamics steps carry them onto a learned mode. Here the guide penalises negative
first coordinates, so the samples should all land on the + branch, and on it, not between the branches."""),
    ("code", """\
from cgml_lightning.evaluation.metrics import mode_distances, mode_tolerance

guide = lambda s: torch.relu(-s[..., 0]).sum()                           # s: [B, N, 3] -> scalar
free = cgml.sample(x, 20, seed=0)
guided = cgml.sample(x, 20, seed=0, guide=guide)
near_plus = lambda s: (mode_distances(s, modes[:, 1:])[..., 0] <= mode_tolerance(modes)[:, None]).float().mean()
for name, s in [("free", free), ("guided", guided)]:
    print(f"{name:7s} y[0] > 0: {(s[..., 0] > 0).float().mean():.2f}   within 10% of the + mode: {near_plus(s):.2f}")
fig, ax = plt.subplots(figsize=(6, 3.8))
draw_toy(ax, x, guided, modes)
ax.set_title("guided by relu(-y[0]): 20 samples per x")
plt.show()"""),
]


# ---- 03: Fashion-MNIST completion ------------------------------------------------------------------------------
FMNIST = [
    ("md", """\
# 03 · Fashion-MNIST: diverse completions and guided hints

Complete the hidden bottom half of 28×28 clothes: several plausible completions per input, then steer them
with a **hint** (a few known pixels) through guided sampling.

Fashion-MNIST is read from `/usr/share/datasets/fashion-mnist` (`apt-get install dataset-fashion-mnist`) or
a folder of its idx files; without it the notebook prints how to get it and skips its steps. To look at a real
run instead of the quick one trained here, point `CGML_FMNIST_CKPT` at its `last.ckpt`:
`cgml-train experiment=fmnist_completion hydra.run.dir=outputs/fm` trains one."""),
    ("code", SETUP),
    ("code", """\
import os

from cgml_lightning import CGMLModule
from cgml_lightning.data import FashionMNISTDataModule
from cgml_lightning.data.fashion_mnist import CLASSES, find_files, missing_message
from cgml_lightning.evaluation.metrics import pairwise_l1_diversity
from cgml_lightning.plots import image_grid

AVAILABLE = find_files(None) is not None
if not AVAILABLE:
    print("SKIPPED: Fashion-MNIST is not installed, so this notebook only prints this message.\\n"
          + missing_message(None))"""),
    ("md", """\
## Train (or load a checkpoint)

A deliberately small run: 1000 training images, 2 epochs, a narrow U-Net, the image z-phase (3 short
unit-gradient z-steps, as `cgml-train` sets for U-Nets) from the best of 2 starts — about half a minute on a CPU.
Expect soft completions: the diversity printed below says how much this little run uses `z`. The README's
4-minute runs reach diversity 0.05 and a best-of-10 PSNR 0.8-1.2 dB above the regressor's; with a longer run
loaded through `CGML_FMNIST_CKPT` the same cells show what that run learned."""),
    ("code", """\
if AVAILABLE:
    L.seed_everything(0)
    data = FashionMNISTDataModule(task="completion", mask="half", mask_side="bottom", batch_size=64,
                                  eval_batch_size=64, max_train_samples=1000)
    data.setup()
    checkpoint = os.environ.get("CGML_FMNIST_CKPT")
    if checkpoint:
        model = CGMLModule.load_from_checkpoint(checkpoint, map_location="cpu")
        print("loaded", checkpoint)
    else:
        model = CGMLModule(data.info(), net={"name": "unet", "width": 16, "depth": 2}, latent_dim=16)  # image z_phase
        L.Trainer(max_epochs=2, limit_val_batches=2, **QUIET).fit(model, data)"""),
    ("md", """\
## Diverse completions

One row per test input: the input (hidden half grey), 8 samples, the truth. The top half of every sample is the
input's own."""),
    ("code", """\
if AVAILABLE:
    test = next(iter(data.test_dataloader()))
    x, y = test["x"][:6], test["y"][:6]
    samples = model.sample(x, num_samples=8, seed=0)
    print("classes:", [CLASSES[int(c)] for c in data.labels["test"][:6]])
    print(f"diversity (mean pixel L1 between samples of one input): {pairwise_l1_diversity(samples).mean():.4f}")
    show(image_grid(x, samples, y, scale=3), "input | 8 samples | truth")"""),
    ("md", """\
## Guided hints

A hint is an image whose *known* pixels the samples should follow: here a bright vertical bar down the middle of
the hidden half (e.g. to ask for a long garment), a dark gap between two bars (trousers) on the next input. The
guide is a masked L1 distance to the hint on its known pixels inside the hole —
`cgml_lightning.user_inputs.hint_guide`, what `cgml-sample hint=FILE` uses. Each pair of rows: unguided, then
guided, from the same starting points. A guide can only move what `z` controls: on a model whose samples all
look alike (low diversity above) it changes little, and the printed distance to the hint says by how much."""),
    ("code", """\
from cgml_lightning.user_inputs import hint_guide

if AVAILABLE:
    hint = torch.zeros(2, 1, 28, 28)                 # per input: the target value of the known pixels
    known = torch.zeros(2, 1, 28, 28)
    known[0, :, 16:27, 12:16] = 1
    hint[0, :, 16:27, 12:16] = 1.0                   # input 0: a bright bar down the middle
    known[1, :, 16:27, 8:20] = 1
    hint[1, :, 16:27, 8:12] = hint[1, :, 16:27, 16:20] = 1.0   # input 1: two bars with a dark gap
    xs = x[:2]
    guide = hint_guide(hint, known * model.hole(xs))
    free = model.sample(xs, 6, seed=1)
    guided = model.sample(xs, 6, seed=1, guide=guide)
    error = lambda s: ((s - hint[:, None]).abs() * known[:, None]).sum() / (known.sum() * s.shape[1])
    print(f"mean L1 to the hint on its known pixels: free {error(free):.3f}, guided {error(guided):.3f}")
    shown_hint = hint * known + 0.5 * (1 - known)     # grey where the hint says nothing
    rows = torch.stack([free[0], guided[0], free[1], guided[1]])
    inputs = xs.repeat_interleave(2, 0)
    show(image_grid(inputs, rows, shown_hint.repeat_interleave(2, 0), scale=3),
         "input | 6 samples (rows: free, guided, free, guided) | hint (grey = no hint)")"""),
    ("md", """\
The same from the command line, on your own picture and hint (white = the hint's pixels when it has no
transparency; with an alpha channel, its opaque pixels):

```bash
cgml-sample ckpt_path=outputs/fm/checkpoints/last.ckpt input=my_shirt.png hint=my_hint.png num_samples=8
cgml-sample ckpt_path=outputs/fm/checkpoints/last.ckpt input=my_shirt.png mask=my_mask.png   # white = hole
```"""),
]


# ---- 04: fine-tuning with W&B offline --------------------------------------------------------------------------
FINETUNE = [
    ("md", """\
# 04 · Fine-tune from a checkpoint, logged to W&B offline

`init_from=CKPT` copies a checkpoint's weights (never its latent table, optimizers or loop state) into a new run
on new data or a new task; `finetune.freeze=[...]` keeps parameter groups fixed. Here: train on digits with the
**bottom** half hidden, then fine-tune to complete the **top** half with the encoder's first block frozen,
logging to Weights & Biases in offline mode (nothing leaves the machine; `wandb sync` uploads later).
Both runs go to a temporary folder and use tiny budgets (about a minute in all)."""),
    ("code", SETUP),
    ("code", """\
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

os.environ["WANDB_MODE"] = "offline"                       # W&B writes its run files locally, no network
root = Path(tempfile.mkdtemp(prefix="cgml-finetune-"))


def cgml_train(*overrides: str) -> None:
    \"\"\"Run the installed cgml-train (the one next to this kernel's Python) and show the end of its log.\"\"\"
    script = Path(sys.executable).parent / "cgml-train"
    command = [str(script) if script.is_file() else shutil.which("cgml-train"), *overrides]
    proc = subprocess.run(command, cwd=root, capture_output=True, text=True)
    print("$ cgml-train", " ".join(overrides))
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:])
        raise RuntimeError(f"cgml-train exited {proc.returncode}")


TINY = ["trainer.max_epochs=2", "+data.max_train_samples=320", "eval.num_inputs=100", "callbacks.rich_progress_bar=null"]"""),
    ("code", """\
base = root / "base"
cgml_train("experiment=digits_completion", *TINY, "logger=none", f"hydra.run.dir={base}")
print(json.dumps(json.loads((base / "metrics.json").read_text()), indent=1))"""),
    ("md", """\
## Fine-tune: a new task, the first encoder block frozen, W&B offline"""),
    ("code", """\
tuned = root / "tuned"
cgml_train("experiment=digits_completion", *TINY, "data.mask_side=top", f"init_from={base}/checkpoints/last.ckpt",
           "finetune.freeze=[generator.stem]", "logger=wandb", f"hydra.run.dir={tuned}")
print(json.dumps(json.loads((tuned / "metrics.json").read_text()), indent=1))"""),
    ("code", """\
before = torch.load(base / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
after = torch.load(tuned / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
frozen = [k for k in before if k.startswith("generator.stem")]
trained = [k for k in before if k.startswith("generator.head")]
print("frozen block unchanged:", all(torch.equal(before[k], after[k]) for k in frozen))
print("head changed:", any(not torch.equal(before[k], after[k]) for k in trained))
print("latent table sized for the new run:", after["latents"].shape)"""),
    ("code", """\
fig, axes = plt.subplots(1, 2, figsize=(12, 6))
for ax, (name, run) in zip(axes, [("base: bottom half hidden", base), ("fine-tuned: top half hidden", tuned)]):
    ax.imshow(Image.open(run / "samples.png"))
    ax.set_title(f"{name}\\ninput | 8 samples | truth")
    ax.axis("off")
plt.show()"""),
    ("code", """\
runs = sorted((tuned / "wandb").glob("offline-run-*"))
print("W&B offline run:", runs[-1].relative_to(root) if runs else "none found")
print("upload later with: wandb sync", runs[-1] if runs else tuned / "wandb")"""),
    ("code", """\
shutil.rmtree(root)                                         # drop this line to keep both runs and the W&B files
print("removed", root)"""),
]

NOTEBOOKS = {"01_quickstart.ipynb": QUICKSTART, "02_toy.ipynb": TOY, "03_fmnist_completion.ipynb": FMNIST,
             "04_finetune.ipynb": FINETUNE}


def build(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = new_notebook(metadata=KERNEL)
    for i, (kind, source) in enumerate(cells):
        cell = new_markdown_cell(textwrap.dedent(source)) if kind == "md" else new_code_cell(textwrap.dedent(source))
        cell.id = f"cell-{i:02d}"                   # stable ids: regenerating leaves the files unchanged
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        nbformat.write(build(cells), HERE / name)
        print("wrote", HERE / name)


if __name__ == "__main__":
    main()
