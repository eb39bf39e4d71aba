"""Does the data loader keep up with training? Images per second the training loader delivers (decode, crop,
degrade in its workers) against images per second a training step of the model consumes, side by side in one
process, on the same config:

    python docs/loader_bench.py experiment=folder_completion data.root=DIR data.num_workers=2 [model=regressor]

Prints both rates and their ratio (above 1: the loader is ahead). Override keys as on the cgml-train command
line; `+bench.batches=N` sets how many loader batches are timed (default 40, after 5 untimed ones).
"""
from __future__ import annotations

import sys
import time
from itertools import islice

import torch
from hydra import compose, initialize_config_module

from cgml_lightning.runs import build_datamodule, build_module
from cgml_lightning.timing import step_profile


def main(overrides: list[str]) -> dict[str, float]:
    with initialize_config_module(config_module="cgml_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    batches = int((cfg.get("bench") or {}).get("batches", 40))
    torch.manual_seed(cfg.seed)
    datamodule = build_datamodule(cfg)
    loader = datamodule.train_dataloader()
    it = iter(loader)
    first = [next(it) for _ in range(5)]                       # workers started and warmed up: untimed
    start = time.perf_counter()
    seen = sum(len(batch["index"]) for batch in islice(it, batches))
    loader_rate = seen / (time.perf_counter() - start)
    del it, loader
    module = build_module(cfg, datamodule)
    step_s = step_profile(module, first, warmup=2)["step_s"]
    step_rate = len(first[0]["index"]) / step_s
    result = {"loader_images_per_s": loader_rate, "step_images_per_s": step_rate, "ratio": loader_rate / step_rate,
              "num_workers": cfg.data.num_workers, "batch_size": cfg.data.batch_size,
              "torch_threads": torch.get_num_threads()}
    for key, value in result.items():
        print(f"{key}: {value:.2f}" if isinstance(value, float) else f"{key}: {value}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
