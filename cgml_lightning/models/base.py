"""What every conditional module shares: data description, generator, training plumbing (optimizers, schedulers,
manual steps, gradient clipping, the NaN/Inf guard), checkpoints, the sampling API and validation.
A model file holds its method only: its losses, its training step and its `_sample`."""
from __future__ import annotations

import contextlib
import inspect
import io
import os
import shutil
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Iterable

import lightning as L
from lightning.pytorch.profilers import PassThroughProfiler
import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from cgml_lightning import nets
from cgml_lightning.algorithm import distance, medoids
from cgml_lightning.evaluation.metrics import pairwise_l1_diversity
from cgml_lightning.files import read_checkpoint, read_checkpoint_bytes
from cgml_lightning.instantiate import instantiate

DEFAULT_OPTIMIZER = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}
UNGUIDED = "guided sampling needs model=cgml (its latent dynamics); model={name} samples unguided only"


def compiled(fn: Callable) -> Callable:
    """torch.compile(fn), or fn itself with a warning where this platform cannot compile (the model still trains)."""
    from torch._dynamo import is_dynamo_supported

    if not is_dynamo_supported():
        reason = "torch.compile is not supported on this Python/platform"
    elif not torch.cuda.is_available() and not shutil.which(os.environ.get("CXX", "g++")):
        reason = "TorchInductor needs a C++ compiler on CPU (none found; set CXX)"
    else:
        return torch.compile(fn)
    warnings.warn(f"model.compile=true ignored: {reason}", stacklevel=2)
    return fn


def repeat_feats(feats: tuple[Tensor, ...], rows: Tensor) -> tuple[Tensor, ...]:
    """The encoder features of the inputs `rows` names, one row each (an input appears as often as named)."""
    return tuple(f[rows] for f in feats)


def recorded_module(checkpoint: dict, source: str, required: bool = False) -> str | None:
    """The model name a checkpoint records (None where it records none and none is required); an error naming source
    for a name that is no module's."""
    from cgml_lightning.models import MODULES

    name = checkpoint.get("cgml_module")
    if (name is not None or required) and name not in MODULES:
        raise ValueError(f"{source}: not a cgml-lightning checkpoint (it records module {name!r}; known: "
                         f"{sorted(MODULES)})")
    return name


def is_count(value: Any) -> bool:
    """A whole number (a Python or numpy integer), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def net_preset(net: Mapping[str, Any]) -> str | None:
    """The name of the shipped net preset (conf/net/NAME.yaml, net=NAME) whose settings are exactly `net`, if any."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    for preset in sorted(files("cgml_lightning.conf").joinpath("net").iterdir(), key=lambda p: p.name):
        if preset.name.endswith(".yaml") and OmegaConf.to_container(OmegaConf.create(preset.read_text())) == dict(net):
            return preset.name.removesuffix(".yaml")
    return None


def check_flags(flags: dict[str, Any]) -> None:
    """Refuse a yes/no setting given as anything but true or false (`crop=no` arrives as the string 'no', which
    would count as true), naming its key."""
    for key, value in flags.items():
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{key} must be true or false; got {value!r}")


def sample_rows(num_inputs: int, num_samples: int, device: torch.device) -> Tensor:
    """Which input each of B*N sample rows belongs to: row b*N + i -> input b."""
    return torch.arange(num_inputs, device=device).repeat_interleave(num_samples)


def in_chunks(fn: Callable[[Tensor], Tensor], num_rows: int, chunk_size: int, device: torch.device) -> Tensor:
    """fn over the row indices 0..num_rows-1, chunk_size indices at a time, concatenated: memory bounded by the
    chunk, however many rows (B*N samples) there are."""
    return torch.cat([fn(chunk) for chunk in torch.arange(num_rows, device=device).split(chunk_size)])


def ema_update(decay: float) -> Callable:
    """AveragedModel's multi_avg_fn for an exponential moving average: averaged <- averaged + (1 - d) (live -
    averaged) with d = min(decay, (1 + n) / (10 + n)) after n updates, so that the first averages are not held back
    by the initial weights (short runs on a CPU take a few thousand steps in all)."""
    def update(averaged: list[Tensor], live: list[Tensor], num_averaged: Tensor) -> None:
        d = ((1 + num_averaged) / (10 + num_averaged)).clamp(max=decay).to(averaged[0].dtype)
        for a, w in zip(averaged, live):
            a.lerp_(w, 1 - d)
    return update


@contextlib.contextmanager
def synced_section(section, device: torch.device):
    """`section` (a profiler record) entered and left after the queued GPU work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with section:
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)


class ConditionalModule(L.LightningModule):
    """Base for cGML and its baselines. Hyperparameters are plain containers, so checkpoints load with
    `torch.load(weights_only=True)` and `load_from_checkpoint(path)` needs no other argument.

    data_info: {"kind", "x_shape", "y_shape", "num_train_samples", "fingerprint", "mask_channel"?}, from the datamodule.
    net: plain generator config ({"name": "mlp"|"unet", ...}); optimizer/scheduler: `_partial_` factories.

    ema_decay: keep an exponential moving average of the weights of the nets sampling uses (`averaged_nets`) and
    sample, validate and evaluate with it; None trains and samples with the live weights only.

    Hooks a module overrides: build_generator (a net reading other inputs than (x, z)), optimizer_groups (more than
    one optimizer), probe_features (an encoder reading more than x), guide_error (None where guided sampling works),
    averaged_nets (more nets than the generator at sampling).
    """

    module_name: str = ""       # the registry key (model=NAME); stored in checkpoints to pick the class on load
    latent_dim: int = 0
    takes_latent: bool = True           # its generator decodes a latent: model.latent_dim must be at least 1
    guide_error: str | None = UNGUIDED  # why sample(guide=...) is refused ({name}: module_name); None: guidable
    averaged_nets: tuple[str, ...] = ("generator",)     # the nets sampling runs: what ema_decay averages

    def __init__(self, data_info: dict[str, Any], net: dict[str, Any], latent_dim: int = 0, distance: str = "l1",
                 distance_region: str = "auto", optimizer: dict | None = None, scheduler: dict | None = None,
                 val_num_samples: int = 4, compile: bool = False, channels_last: bool = False,
                 ema_decay: float | None = None):
        super().__init__()
        if not isinstance(net, Mapping):
            raise ValueError(f"net must be a mapping of the net's settings, e.g. {{'name': 'mlp', 'width': 128}} "
                             f"(net= on the command line); got {net!r}")
        check_flags({"model.compile": compile, "model.channels_last": channels_last})
        if self.takes_latent and (not is_count(latent_dim) or latent_dim < 1):
            raise ValueError(f"model.latent_dim must be a whole number, at least 1, for model={self.module_name}; "
                             f"got {latent_dim!r}")
        # hparams: the arguments of the module's own __init__ (the one calling this), as it received them
        self.save_hyperparameters(frame=inspect.currentframe().f_back)
        self.data_info = dict(data_info)
        self.x_shape, self.y_shape = tuple(data_info["x_shape"]), tuple(data_info["y_shape"])
        self.latent_dim = latent_dim
        self.generator = self.build_generator(net)
        if channels_last:            # channels-last weights make every conv's output channels-last, inputs included
            self.generator.to(memory_format=torch.channels_last)
        if compile:                   # encode/decode, not forward: those are what training and sampling call
            self.generator.encode = compiled(self.generator.encode)
            self.generator.decode = compiled(self.generator.decode)
        if distance_region not in ("auto", "all", "hole"):
            raise ValueError(f"model.distance_region must be auto, all or hole; got {distance_region!r}")
        self.loss_in_hole = bool(data_info.get("mask_channel")) and distance_region in ("auto", "hole")
        if ema_decay is not None and not 0 < ema_decay < 1:
            raise ValueError(f"model.ema_decay must be in (0, 1) or null; got {ema_decay}")
        self.ema: AveragedModel | None = None        # built by configure_model, once every net exists
        self.ema_step = -1                           # global_step of the last EMA update (one per optimizer step)
        self.averaging = False                       # the averaged weights are in the nets (averaged_weights())
        self.run_info: dict[str, Any] = {}           # the training run (cgml-train sets it): checkpoint["cgml_run"]

    def build_generator(self, net: dict[str, Any]) -> nn.Module:
        """The generator G(x, z) from the plain net config; called once in __init__, after x_shape, y_shape and
        latent_dim are set and before channels_last/compile are applied to what it returns."""
        return nets.build_generator(net, self.x_shape, self.y_shape, self.latent_dim)

    # ---- weight averaging (EMA) ----------------------------------------------------------------------------
    def configure_model(self) -> None:
        """The EMA copy of the averaged nets (model.ema_decay), made before a Trainer or load_from_checkpoint restores
        a state, so that its weights save and resume with the module's. Frozen Parameters, not buffers: DDP neither
        syncs gradients for them nor re-broadcasts them. Only parameters are averaged; buffers stay the live ones."""
        decay = self.hparams.get("ema_decay")
        if decay and self.ema is None:
            self.ema = AveragedModel(self.nets_to_average(), multi_avg_fn=ema_update(decay), use_buffers=False)
            self.ema.requires_grad_(False)

    def nets_to_average(self) -> nn.ModuleDict:
        return nn.ModuleDict({name: getattr(self, name) for name in self.averaged_nets})

    def update_average(self) -> None:
        """Move the EMA toward the current weights, once per optimizer step (global_step): after every training
        batch, and before a checkpoint or snapshot taken inside one (callbacks see a batch's end before the
        module does), so that a saved state never lags the run it came from."""
        if self.ema is not None and self.global_step != self.ema_step:
            self.ema.update_parameters(self.nets_to_average())
            self.ema_step = self.global_step

    @contextlib.contextmanager
    def averaged_weights(self):
        """Inside the block the averaged nets hold the EMA weights (sampling, validation, evaluation, the probe);
        the live ones are back after it, also when the block raises. Nothing without EMA; nested blocks swap once."""
        if self.ema is None or self.averaging:
            yield
            return
        self.averaging = True
        try:
            self.swap_averaged()
            yield
        finally:
            self.swap_averaged()
            self.averaging = False

    @contextlib.contextmanager
    def live_weights(self):
        """Inside the block the module samples with its live weights, as if it kept no EMA."""
        held, self.ema = self.ema, None
        try:
            yield
        finally:
            self.ema = held

    def swap_averaged(self) -> None:
        """Exchange the averaged and the live values of the averaged nets' parameters: their storage, in O(1)."""
        for averaged, live in zip(self.ema.module.parameters(), self.nets_to_average().parameters()):
            averaged.data, live.data = live.data, averaged.data

    def phase(self, name: str):
        """A section of the training step, recorded by the Trainer's profiler as `[<module>] <name>`
        (`trainer.profiler=simple` lists them; timing.step_profile reads them); nothing without a profiler. On CUDA
        the section waits for its kernels, so a record covers their work, not their launch."""
        trainer = self._trainer
        if trainer is None or isinstance(trainer.profiler, PassThroughProfiler):
            return contextlib.nullcontext()
        return synced_section(trainer.profiler.profile(f"[{self.module_name}] {name}"), self.device)

    def step_generator(self) -> torch.Generator:
        """Randomness of one training step, derived from (seed, rank, step): a resumed run draws what the
        uninterrupted run would have drawn (Lightning restores no RNG state)."""
        rank = self.trainer.global_rank if self._trainer is not None else 0
        step = self.trainer.global_step if self._trainer is not None else 0
        return torch.Generator().manual_seed((torch.initial_seed() + 1_000_003 * rank + 7_919 * step) % 2**63)

    def probe_features(self, x: Tensor) -> Tensor:
        """Frozen encoder features of inputs x [B, *x_shape]: Tensor[B, generator.feature_dim], the generator's
        summary of its encoding (the U-Net's pooled bottleneck, the MLP's hidden layer); what a linear probe reads."""
        return self.generator.summarize(self.generator.encode(x))

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None,
                             weights_only: bool = True, **kwargs):
        """Lightning's loader, safe by default (weights_only=True: our checkpoints hold plain containers only).
        The class comes from the name the checkpoint records: ConditionalModule.load_from_checkpoint loads any
        cgml-lightning checkpoint; a subclass refuses another module's checkpoint, naming the one to use."""
        from cgml_lightning.models import MODULES

        checkpoint, data = read_checkpoint_bytes(checkpoint_path)
        recorded = recorded_module(checkpoint, str(checkpoint_path), required=True)
        target = MODULES[recorded]
        if not issubclass(target, cls):
            raise ValueError(f"{checkpoint_path}: holds a {target.__name__} (model={recorded}), not a {cls.__name__}; "
                             f"load it with {target.__name__}.load_from_checkpoint(path) or "
                             f"ConditionalModule.load_from_checkpoint(path)")
        if target is not cls:
            return target.load_from_checkpoint(checkpoint_path, map_location, hparams_file, strict, weights_only, **kwargs)
        kwargs = {**cls.legacy_hparams(checkpoint.get("hyper_parameters") or {}), **kwargs}
        try:
            return super().load_from_checkpoint(io.BytesIO(data), map_location=map_location, hparams_file=hparams_file,
                                                strict=strict, weights_only=weights_only, **kwargs)
        except (RuntimeError, TypeError, KeyError) as err:
            raise ValueError(f"{checkpoint_path}: does not load into {cls.__name__}: {err}") from err

    @classmethod
    def legacy_hparams(cls, saved: dict[str, Any]) -> dict[str, Any]:
        """The arguments that rebuild a checkpoint's module as it was saved, where the checkpoint predates a setting
        whose default has changed since (saved: the checkpoint's hyper_parameters). None by default."""
        return {}

    def check_init_source(self, path: str, saved: dict[str, Any]) -> None:
        """Refuse a checkpoint to fine-tune from whose weights would mean something else here (saved: its
        hyper_parameters). Nothing to check by default."""

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record the module's name, the training run (run_info) and the number of processes; bring the EMA up to
        date when saving inside a training batch; refuse to write a state with NaN/Inf in it, so no checkpoint on disk
        (last.ckpt included) is ever replaced by a non-finite one."""
        checkpoint["cgml_module"] = self.module_name
        if self.run_info:
            checkpoint["cgml_run"] = dict(self.run_info)
        if self._trainer is not None:                # each process takes its own batch: part of what a run is
            checkpoint["world_size"] = self.trainer.world_size
        if self.ema is not None and self._trainer is not None and self.trainer.training:
            self.update_average()            # saved inside a batch: the average of that batch's weights too
            checkpoint["state_dict"].update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        bad = [k for k, v in checkpoint["state_dict"].items()       # latent_keys: NaN marks rows not yet written
               if "latent_keys" not in k and v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise FloatingPointError(f"not saving a checkpoint at step {self.global_step}: {', '.join(bad[:5])} hold "
                                     f"NaN/Inf; the checkpoints already on disk are unchanged")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """run_info from the checkpoint's record of its training run, where it has one: plain words and numbers only,
        anything else (a record written by other code) left out."""
        record = checkpoint.get("cgml_run")
        if isinstance(record, Mapping):             # none recorded (an older checkpoint): the run_info already set
            self.run_info = {str(k): v for k, v in record.items()
                             if isinstance(v, (str, int)) and not isinstance(v, bool)}

    def gather_rows(self, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
        """Every rank's rows of each tensor, concatenated in rank order. The ranks' batches may differ in size (a file
        skipped as unreadable makes one smaller), and all_gather takes equal shapes: each pads to the largest."""
        sizes = self.all_gather(torch.tensor(len(tensors[0]), device=self.device)).tolist()
        keep = torch.cat([torch.arange(n, device=self.device) + rank * max(sizes) for rank, n in enumerate(sizes)])
        gathered = []
        for t in tensors:
            if t is not None:
                padded = torch.cat([t, t.new_zeros(max(sizes) - len(t), *t.shape[1:])])
                t = self.all_gather(padded).flatten(0, 1)[keep]
            gathered.append(t)
        return tuple(gathered)

    # ---- NaN/Inf guard: the same decision on every rank -----------------------------------------------------
    def all_finite(self, *tensors: Tensor) -> bool:
        ok = torch.tensor(float(all(torch.isfinite(t).all() for t in tensors)), device=self.device)
        if self._trainer is not None and self.trainer.world_size > 1:
            ok = self.trainer.strategy.reduce(ok, reduce_op="min")
        return bool(ok.item())

    def trainable_norm(self) -> Tensor:
        """The total 2-norm of the trained weights (the latent table is not trained by gradients and is left out:
        its rows are checked where they are written)."""
        return torch.nn.utils.get_total_norm([p.detach() for p in self.parameters() if p.requires_grad])

    def gradient_norm(self) -> Tensor:
        """The total 2-norm of the gradients the last backward left (parameters without one are skipped)."""
        return torch.nn.utils.get_total_norm([p.grad for p in self.parameters() if p.grad is not None])

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """Stop as soon as an optimizer step has written NaN/Inf into the weights (nothing is saved from that state;
        the newest checkpoint on disk holds the last finite one); else move the EMA toward the new weights."""
        if not self.all_finite(self.trainable_norm()):
            raise FloatingPointError(
                f"an optimizer step made the weights NaN/Inf (batch {batch_idx}, step {self.global_step}); no "
                f"checkpoint was written from that state. Resume from the newest checkpoint with a lower learning "
                f"rate or model.clip_grad_norm, or run with debug=anomaly to find the op.")
        self.update_average()

    def init_weights_from(self, path: str, freeze: list[str] | tuple[str, ...] = ()) -> list[str]:
        """Fine-tuning: copy the weights of a checkpoint (never its latent table, optimizers or loop state), then
        freeze the parameters whose names start with any prefix in `freeze`. Returns the copied keys. Where the
        checkpoint keeps averaged weights (ema_decay), those are the parameters copied: the ones it was evaluated
        and sampled with. Loads with weights_only=True and never instantiates anything named in the checkpoint."""
        checkpoint = read_checkpoint(path)
        saved = checkpoint.get("hyper_parameters") or {}
        was = (saved.get("data_info") or {}).get("kind")
        if was and was != self.data_info.get("kind"):
            raise ValueError(f"init_from={path} was trained on {was} data, this run is on {self.data_info.get('kind')} "
                             f"data: fine-tune from a checkpoint of the same kind of data")
        source = recorded_module(checkpoint, f"init_from={path}")
        if source is not None and source != self.module_name:
            raise ValueError(f"init_from={path} is a model={source} checkpoint, this run is model={self.module_name}: "
                             f"fine-tune with model={source}")
        self.check_init_source(path, saved)
        state = checkpoint["state_dict"]
        params = {name for name, _ in self.named_parameters()}            # buffers are never averaged
        state = {**state, **{k.removeprefix("ema.module."): v for k, v in state.items()
                             if k.startswith("ema.module.") and k.removeprefix("ema.module.") in params}}
        own = self.state_dict()
        # per-sample tables are data-bound; the EMA restarts from the copied weights
        keys = [k for k in own if "latents" not in k and "latent_keys" not in k and not k.startswith("ema.")]
        missing = [k for k in keys if k not in state]
        wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in keys if k in state and state[k].shape != own[k].shape]
        if missing or wrong:
            lines = [f"{k}: missing in checkpoint" for k in missing] + wrong
            raise ValueError(f"init_from={path} does not fit this model: {self.init_differences(saved)}. "
                             f"{len(lines)} weight(s) differ:\n  " + "\n  ".join(lines[:12])
                             + (f"\n  ... and {len(lines) - 12} more" if len(lines) > 12 else ""))
        self.load_state_dict({k: state[k] for k in keys}, strict=False)
        self.ema = None
        self.configure_model()
        self.freeze_prefixes(freeze)
        return keys

    def init_differences(self, saved: dict[str, Any]) -> str:
        """What a checkpoint to fine-tune from was trained with, where this model differs (saved: its
        hyper_parameters): the net (by its preset's name where one matches), latent_dim, the channels of x and y."""
        was_net, now_net = dict(saved.get("net") or {}), dict(self.hparams.get("net") or {})
        was_info, now_info = saved.get("data_info") or {}, self.data_info
        found = []
        if was_net != now_net:
            name = net_preset(was_net)
            found.append(f"net={name}" if name else "the net " + ", ".join(
                f"net.{k}={was_net.get(k)} (here {now_net.get(k)})" for k in sorted(set(was_net) | set(now_net))
                if was_net.get(k) != now_net.get(k)))
        if saved.get("latent_dim") != self.hparams.get("latent_dim"):
            found.append(f"model.latent_dim={saved.get('latent_dim')} (here {self.hparams.get('latent_dim')})")
        unit = "channels (here {now}: data.task, data.channels)" if now_info.get("kind") == "image" else \
            "features (here {now})"
        for key, what in (("x_shape", "input"), ("y_shape", "output")):
            was, now = list(was_info.get(key) or [None])[0], list(now_info.get(key) or [None])[0]
            if was != now:
                found.append(f"{was} {what} " + unit.format(now=now))
        if not found:
            return "its weights have other shapes than this model's"
        return "it was trained with " + "; ".join(found) + ": set them as it was trained"

    def freeze_prefixes(self, prefixes: list[str] | tuple[str, ...]) -> list[str]:
        """Stop training the parameters whose names start with any of the prefixes; returns their names."""
        frozen = [n for n, _ in self.named_parameters() if any(n.startswith(p) for p in prefixes)]
        if prefixes and not frozen:
            groups = sorted({".".join(n.split(".")[:2]) for n, p in self.named_parameters() if p.requires_grad})
            raise ValueError(f"finetune.freeze={list(prefixes)} matches no parameter; the trained ones start with "
                             f"{', '.join(groups[:30])}")
        for name, param in self.named_parameters():
            if name in frozen:
                param.requires_grad_(False)
        return frozen

    # ---- the batch contract -------------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """A training batch breaking the contract is named before it reaches the nets: a dict with x and y of the
        model's shapes (not float64), and `index` rows of the latent table (0 <= index < num_train_samples)."""
        if not isinstance(batch, Mapping) or not {"x", "y", "index"} <= set(batch):
            got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise ValueError(f"a batch must be a dict with 'x', 'y' and 'index' (the sample's row of the latent "
                             f"table); got {got}")
        for key, shape in (("x", self.x_shape), ("y", self.y_shape)):
            if tuple(batch[key].shape[1:]) != shape:
                raise ValueError(f"batch[{key!r}] has shape {list(batch[key].shape)}; this model takes "
                                 f"[B, {', '.join(map(str, shape))}]")
            if batch[key].dtype == torch.float64:          # numpy's default; the precision plugins cast the others
                raise ValueError(f"batch[{key!r}] is torch.float64 (numpy's default); give float32 tensors, e.g. "
                                 f"torch.from_numpy(a).float()")
        index, rows = batch["index"], int(self.data_info["num_train_samples"])
        low, high = torch.stack(torch.aminmax(index)).tolist() if len(index) else (0, 0)   # one device sync a step
        if index.is_floating_point() or low < 0 or high >= rows:
            raise ValueError(f"batch['index'] must hold integer rows of the latent table, 0 to {rows - 1} "
                             f"(num_train_samples={rows}): each training sample's own row; got {low} to {high}")

    # ---- data helpers -------------------------------------------------------------------------------------
    def hole(self, x: Tensor) -> Tensor | None:
        """The mask of the hole [B, 1, H, W] (1 = a pixel to fill) when the input carries it as its last channel."""
        return x[:, -1:] if self.data_info.get("mask_channel") else None

    def composite(self, out: Tensor, x: Tensor) -> Tensor:
        """For completion, keep the input's visible pixels and take only the hole from the generator."""
        hole = self.hole(x)
        return out if hole is None else x[:, :-1] * (1 - hole) + out * hole

    def distance(self, pred: Tensor, y: Tensor, x: Tensor) -> Tensor:
        return distance(pred, y, self.hparams.distance, weight=self.hole(x) if self.loss_in_hole else None)

    # ---- optimizers, schedulers and manual steps ------------------------------------------------------------
    def build_optimizer(self, params, cfg: dict | None):
        """(optimizer, its scheduler or None): the optimizer from cfg (Adam, lr 1e-3 when None), model.scheduler."""
        optimizer = instantiate(cfg or DEFAULT_OPTIMIZER)(params)
        scheduler = instantiate(self.hparams.scheduler)(optimizer) if self.hparams.scheduler else None
        return optimizer, scheduler

    def optimizer_groups(self) -> list[tuple[Iterable[nn.Parameter], dict | None]]:
        """(parameters, optimizer config) per optimizer, in the order self.optimizers() returns them. One group under
        automatic optimization; a module stepping by hand (automatic_optimization = False) may have several."""
        return [([p for n, p in self.named_parameters() if not n.startswith("ema.")], self.hparams.optimizer)]

    def configure_optimizers(self):
        built = [self.build_optimizer(params, cfg) for params, cfg in self.optimizer_groups()]
        optimizers, schedulers = [o for o, _ in built], [s for _, s in built if s is not None]
        if self.automatic_optimization:                 # Lightning steps the one scheduler, once per epoch
            return optimizers[0] if not schedulers else {"optimizer": optimizers[0], "lr_scheduler": schedulers[0]}
        return optimizers, schedulers

    def on_train_epoch_end(self) -> None:
        """Under manual optimization Lightning steps no scheduler: step every one once per epoch here."""
        if self.automatic_optimization:
            return
        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers] if schedulers else []:
            scheduler.step()

    def zero_grads(self) -> None:
        """Clear every optimizer's gradients (set to None), so no stale gradient of another step lingers."""
        for optimizer in self.optimizers():
            optimizer.zero_grad(set_to_none=True)

    def clip(self, optimizer) -> None:
        """Clip the gradients of the optimizer's parameters to model.clip_grad_norm (manual optimization: the
        trainer's gradient_clip_val does not apply); nothing when it is unset."""
        if self.hparams.get("clip_grad_norm"):
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.clip_grad_norm,
                                gradient_clip_algorithm="norm")

    def manual_step(self, loss: Tensor, optimizer) -> None:
        """One step of one optimizer by hand: clear all gradients, backward the loss, clip, step."""
        self.zero_grads()
        self.manual_backward(loss)
        self.clip(optimizer)
        optimizer.step()

    # ---- sampling -----------------------------------------------------------------------------------------
    def sample(self, x: Tensor, num_samples: int = 10, steps: int | None = None,
               guide: Callable[[Tensor], Tensor] | None = None, generator: torch.Generator | None = None,
               seed: int | None = None, pool: int | None = None, **kwargs) -> Tensor:
        """num_samples outputs per input: Tensor[B, N, *y_shape], in eval mode, without gradients.

        pool: draw this many per input and keep the num_samples medoids of them (squared L2 between outputs;
        algorithm.medoids): a set that covers the sample distribution rather than independent draws."""
        if not is_count(num_samples) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive number of samples per input; got {num_samples!r}")
        for key, value in (("steps", steps), *((k, kwargs[k]) for k in ("guide_steps",) if k in kwargs)):
            if value is not None and (not is_count(value) or value < 0):
                raise ValueError(f"{key} must be a whole number of steps, 0 or more; got {value!r}")
        if generator is not None and seed is not None:
            raise ValueError("give seed= or generator=, not both: each sets where the samples' randomness starts")
        if guide is not None and self.guide_error:
            raise ValueError(self.guide_error.format(name=self.module_name))
        params = inspect.signature(self._sample).parameters.values()
        options = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in
                   ("x", "num_samples", "steps", "guide", "generator")]
        unknown = sorted(set(kwargs) - set(options))
        if unknown and not any(p.kind == p.VAR_KEYWORD for p in params):
            raise ValueError(f"sample() got an unexpected keyword argument {unknown[0]!r} (model={self.module_name} "
                             f"also takes: {', '.join(options) or 'nothing more'})")
        x = x if isinstance(x, Tensor) else torch.as_tensor(x)                       # numpy arrays too
        if not x.is_floating_point() and self.data_info.get("kind") == "image":
            raise ValueError(f"x is {x.dtype}: image inputs are floats in [0, 1] (x.float() / 255 for 8-bit pixels)")
        if tuple(x.shape[1:]) != self.x_shape:
            raise ValueError(f"x has shape {list(x.shape)}; this model takes a batch of inputs of shape "
                             f"{list(self.x_shape)}: [B, {', '.join(map(str, self.x_shape))}]")
        if x.is_floating_point() and not (finite := torch.isfinite(x.flatten(1)).all(dim=1)).all():
            rows = (~finite).nonzero().flatten().tolist()
            raise ValueError(f"x holds NaN or Inf in {len(rows)} input(s), rows {rows[:5]}: their samples would be too")
        drawn = num_samples if pool is None else pool
        if drawn < num_samples:
            raise ValueError(f"pool={pool} (sample_pool in cgml-eval and cgml-sample) must be at least "
                             f"num_samples={num_samples}")
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(seed)
        was_training = self.training
        self.eval()
        try:
            x = x.to(self.device, self.dtype)                 # float64, and whole numbers as vector inputs
            with torch.no_grad(), self.averaged_weights():
                out = self._sample(x, drawn, steps, guide, generator, **kwargs)
                out = self.composite(out.flatten(0, 1), x.repeat_interleave(drawn, 0)).view(out.shape)
                if drawn > num_samples:
                    flat = out.flatten(2).float()
                    keep = medoids(torch.cdist(flat, flat).square(), num_samples)
                    out = out[torch.arange(len(x), device=out.device)[:, None], keep]
            return out
        finally:
            self.train(was_training)

    def _sample(self, x, num_samples, steps, guide, generator, **kwargs) -> Tensor:
        """num_samples outputs per input x [B, ...]: Tensor[B, N, *y_shape], before the completion composite.
        Randomness from `generator` only; guide is None unless guide_error is None."""
        raise NotImplementedError

    def decode_rows(self, feats: tuple[Tensor, ...], z: Tensor, rows: Tensor, chunk_size: int) -> Tensor:
        """G's outputs [R, *y_shape] for latents z [R, d], row r decoded with the features of input rows[r];
        chunk_size rows per decoder pass."""
        return in_chunks(lambda c: self.generator.decode(repeat_feats(feats, rows[c]), z[c]), len(z), chunk_size,
                         rows.device)

    # ---- validation: best-of-N distance (lower is better) and diversity ----------------------------------------
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        x, y = batch["x"], batch["y"]
        n = self.hparams.val_num_samples
        samples = self.sample(x, num_samples=n, seed=batch_idx)
        dist = self.distance(samples.flatten(0, 1), y.repeat_interleave(n, 0), x.repeat_interleave(n, 0)).view(len(x), n)
        self.log("val/best_of_n_distance", dist.amin(1).mean(), prog_bar=True, batch_size=len(x), sync_dist=True)
        self.log("val/diversity", pairwise_l1_diversity(samples).mean(), batch_size=len(x), sync_dist=True)

    test_step = validation_step
