"""How much can the best of N samples gain over a completion model's single answer a, if the samples differ only in
the hole's colour? Two measures, per offset shape (one colour offset per channel over the whole hole, or one per
block of B x B pixels, which varies across the image):

- oracle: a moved by the hole's own mean error, a' = a + hole * mean_{hole pixels of the block}(y - a). The best
  that any sample varying only in such offsets can be, with infinitely many samples and the perfect one among them.
- borrowed: N samples a + hole * (another test input's offset field), with N donors drawn from the batch. Where a's
  errors do not depend on the input, these are draws from the true distribution of the offsets: what a sampler that
  knows that distribution exactly, and nothing more than a about the input, scores at best-of-N.

A sampler that gains more than the oracle must vary the hole's content itself (edges, texture), not only its
colour. Each PSNR is as evaluate() computes it (per input, then averaged), on the whole image and on the hole:

    python docs/headroom.py RUN/checkpoints/last.ckpt [RUN_B/...] [--num-inputs 200] [--blocks 0,16,8,4]

The answer is a deterministic model's output, or a sampler's mean of N samples. The data is cgml-eval's (the
checkpoint's test split). Prints a Markdown table.
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch
import torch.nn.functional as F

from cgml_lightning.evaluation import first_inputs
from cgml_lightning.evaluation.metrics import psnr
from cgml_lightning.runs import load_with_data


def offset_field(answer: torch.Tensor, y: torch.Tensor, hole: torch.Tensor, block: int) -> torch.Tensor:
    """The hole's mean error y - answer per channel and block of block x block pixels (0: the whole hole), as a
    per-pixel field [B, C, H, W] (or [B, C, 1, 1] for the whole hole); 0 in blocks with no hole pixel."""
    error = (y - answer) * hole
    if block == 0:
        return error.sum((2, 3), keepdim=True) / hole.sum((2, 3), keepdim=True).clamp_min(1)
    sums, counts = F.avg_pool2d(error, block), F.avg_pool2d(hole, block)        # per-block means of both
    return F.interpolate(sums / counts.clamp_min(1e-8), scale_factor=block, mode="nearest")


def oracle_offset(answer: torch.Tensor, y: torch.Tensor, hole: torch.Tensor, block: int) -> torch.Tensor:
    """answer [B, C, H, W] moved, in the hole [B, 1, H, W], by its own offset field: the best such a sample can be."""
    return answer + hole * offset_field(answer, y, hole, block)


def borrowed_offsets(answer: torch.Tensor, y: torch.Tensor, hole: torch.Tensor, block: int, n: int,
                     generator: torch.Generator) -> torch.Tensor:
    """n samples per input [B, n, C, H, W]: the answer moved in its hole by the offset fields of n other inputs of
    the batch (drawn with replacement). Where the answer's errors do not depend on the input, these are draws from
    the true distribution of the offsets: an offset sampler as good as the data allows, with no oracle."""
    b = len(answer)
    donors = (torch.arange(b)[:, None] + torch.randint(1, max(b, 2), (b, n), generator=generator)) % b
    return answer[:, None] + hole[:, None] * offset_field(answer, y, hole, block)[donors]


@torch.no_grad()
def headroom(module, datamodule, blocks: list[int], num_samples: int, num_inputs: int,
             seed: int) -> dict[tuple[int, str], float]:
    """Per block size (None: the answer itself): PSNR of the oracle, and best-of-N and mean PSNR of borrowed
    offsets; whole image and hole; averaged over the inputs."""
    generator = torch.Generator().manual_seed(seed)
    totals: defaultdict[tuple, float] = defaultdict(float)
    seen = 0
    for batch in first_inputs(datamodule.test_dataloader(), num_inputs):
        x, y = batch["x"], batch["y"]
        hole = module.hole(x)
        if hole is None:
            raise SystemExit("headroom.py measures completion checkpoints (a hole to fill); this one has none")
        answer = module.sample(x, num_samples, generator=generator).cpu().mean(1)      # [B, C, H, W]
        # every block size's oracle and borrowed samples once, scored on the whole image and on the hole
        candidates = {(None, "answer"): answer[:, None]}
        for block in blocks:
            candidates[block, "oracle"] = oracle_offset(answer, y, hole, block)[:, None]
            candidates[block, "borrowed"] = borrowed_offsets(answer, y, hole, block, num_samples, generator)
        for (block, kind), samples in candidates.items():
            for region, weight in (("image", None), ("hole", hole)):
                p = psnr(samples, y, weight=weight)                                    # [B, 1 or N]
                if kind == "borrowed":
                    totals[block, "best", region] += p.amax(1).sum().item()
                    totals[block, "mean", region] += p.mean(1).sum().item()
                else:
                    totals[block, kind, region] += p[:, 0].sum().item()
        seen += len(x)
    return {key: value / seen for key, value in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="completion checkpoints of the same data")
    parser.add_argument("--blocks", default="0,16,8,4", help="block sizes in pixels, comma-separated; 0: whole hole")
    parser.add_argument("--num-samples", type=int, default=10,
                        help="N: borrowed offsets per input, and the samples averaged into a sampler's answer")
    parser.add_argument("--num-inputs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    blocks = [int(b) for b in args.blocks.split(",")]
    n = args.num_samples
    print(f"| checkpoint | offset per | PSNR (hole) | oracle | borrowed, best of {n} | borrowed, mean of {n} |")
    print("|---|---|---|---|---|---|")
    for path in args.checkpoints:
        module, datamodule, _ = load_with_data(path)
        r = headroom(module, datamodule, blocks, n, args.num_inputs, args.seed)
        cell = lambda *key: f"{r[(*key, 'image')]:.2f} ({r[(*key, 'hole')]:.2f})"   # noqa: E731
        print(f"| {module.module_name} {path} | (the answer) | {cell(None, 'answer')} | | | |")
        for b in blocks:
            print(f"| | {'whole hole' if b == 0 else f'{b}x{b} block'} | | {cell(b, 'oracle')} | {cell(b, 'best')} | "
                  f"{cell(b, 'mean')} |", flush=True)


if __name__ == "__main__":
    main()
