"""CGMLModule: orchestrates the z-phase, dynamics phase, table write-back and w-phase of cGML."""
from __future__ import annotations

import warnings

from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from cgml_lightning import algorithm as A
from cgml_lightning.models.base import (DEFAULT_OPTIMIZER, ConditionalModule, in_chunks, is_count, repeat_feats,
                                         sample_rows)
from cgml_lightning.nets import DynamicsNet


# The z-phase and sampler settings that go together (model.z_phase; an explicit key wins over its preset's value).
# image: an L1 summed over hundreds of pixels has a gradient of norm ~24 in z, so plain steps of z_lr x gradient
#   jump across the sphere and Z cannot predict where such paths end: three short unit-gradient steps, one dynamics step
#   at sampling, fresh sphere starts, and twice the baselines' learning rate; Z's rho is its last unit as it is
#   (linear), since on such short moves a softplus can sink to where it stops Z for the rest of a run.
# vector: unit-gradient steps move z as far where the outputs are tiny as where they are large, so every branch
#   gets its own region of the sphere; sampling draws the table latents of the training inputs nearest in encoder
#   features (Z walking uniform starts pulls them between branches).
# paper: the paper's settings (plain gradient steps, five dynamics steps from uniform sphere starts).
# vector and paper keep rho = softplus(unit): with five dynamics steps on the toy, the linear rho's longer moves
#   carried guided samples back off their constraint (docs/results.md).
Z_PHASES: dict[str, dict[str, Any]] = {
    "image": {"z_steps": 3, "z_lr": 0.05, "z_normalized": True, "start_candidates": 2, "sample_steps": 1,
              "sample_starts": "sphere", "lr": 2e-3, "rho_output": "linear"},
    "vector": {"z_steps": 10, "z_lr": 0.1, "z_normalized": True, "start_candidates": 4, "sample_steps": 0,
               "sample_starts": "table", "lr": 1e-3, "rho_output": "softplus"},
    "paper": {"z_steps": 10, "z_lr": 0.1, "z_normalized": False, "start_candidates": 4, "sample_steps": 5,
              "sample_starts": "sphere", "lr": 1e-3, "rho_output": "softplus"},
}


def z_phase_settings(z_phase: str, kind: str | None, **given: Any) -> dict[str, Any]:
    """The preset's settings (auto: image for image data, vector otherwise) with every given non-None value on top."""
    name = ("image" if kind == "image" else "vector") if z_phase == "auto" else z_phase
    if name not in Z_PHASES:
        raise ValueError(f"model.z_phase must be auto, {', '.join(Z_PHASES)}; got {z_phase!r}")
    return {**Z_PHASES[name], **{k: v for k, v in given.items() if v is not None}}


class CGMLModule(ConditionalModule):
    """cGML: per batch, a z-phase (gradient steps on z alone from mode-consistent starts), a dynamics phase (the dynamics
    net regresses the z-trajectory), the converged z written to the latent table, and a w-phase (encoder + decoder
    fitted at the converged z; w_steps updates). Sampling walks sphere or table starts with Z, optionally guided.

    z_phase names the z-phase and sampler settings that go together (Z_PHASES: image, vector, paper; auto picks
    image for image data, vector otherwise); z_steps, z_lr, z_normalized, start_candidates, sample_steps,
    sample_starts, optimizer["lr"] and dynamics_net["rho_output"] left at None take the preset's value, and hparams
    record the values in force.

    The latent table `latents` [num_train_samples, d] holds, per training example, the z its last z-phase converged
    to (written whenever the example is in a finite training batch; every rank holds the whole table). Its uses:
    - the z-phase's warm start: the example's row is one start candidate, unless replaced by a fresh sphere point
      with probability restart_prob. At restart_prob=1 (the default, which every shipped setting keeps) it is
      always replaced, so no row ever becomes a training start;
    - sample_starts=table (the vector z_phase): sampling starts from the rows of the
      training inputs whose encoder summaries (`latent_keys`, written with the rows) are nearest the input's;
    - guided sampling with table starts: the guided latents are snapped back onto those neighbours' rows;
    - resume: the table is checkpointed, so a resumed run holds the rows written before the interruption.
    Fine-tuning (init_from) never copies it: its rows belong to the old training data, so the fine-tuned model
    starts a fresh table sized for the new data.
    """

    module_name = "cgml"
    guide_error = None
    averaged_nets = ("generator", "dynamics")       # Z walks the starts at sampling

    def __init__(self, data_info: dict[str, Any], net: dict[str, Any], dynamics_net: dict[str, Any] | None = None,
                 latent_dim: int = 16, z_phase: str = "auto", z_steps: int | None = None, z_lr: float | None = None,
                 momentum: float = 0.0, z_normalized: bool | None = None, start_candidates: int | None = None,
                 restart_prob: float = 1.0, sample_steps: int | None = None, dynamics_target: str = "final",
                 sample_starts: str | None = None, table_neighbours: int = 32,
                 distance: str = "l1", distance_region: str = "auto",
                 lipschitz: dict[str, Any] | None = None, optimizer: dict | None = None,
                 dynamics_optimizer: dict | None = None, scheduler: dict | None = None,
                 clip_grad_norm: float | None = None, max_nonfinite_batches: int = 10, val_num_samples: int = 4,
                 compile: bool = False, channels_last: bool = False, ema_decay: float | None = None,
                 start_batching: str = "loop", inference_steps: int | None = None, w_steps: int = 1):
        if inference_steps is not None:               # the name checkpoints before `sample_steps` recorded
            warnings.warn("CGMLModule(inference_steps=...) is now sample_steps=...", FutureWarning, stacklevel=2)
            sample_steps = inference_steps if sample_steps is None else sample_steps
        settings = z_phase_settings(z_phase, data_info.get("kind"), z_steps=z_steps, z_lr=z_lr,
                                    z_normalized=z_normalized, start_candidates=start_candidates,
                                    sample_steps=sample_steps, sample_starts=sample_starts,
                                    lr=(optimizer or {}).get("lr"), rho_output=(dynamics_net or {}).get("rho_output"))
        optimizer = {**DEFAULT_OPTIMIZER, **(optimizer or {}), "lr": settings.pop("lr")}
        dynamics_net = {**(dynamics_net or {}), "rho_output": settings.pop("rho_output")}
        super().__init__(data_info, net, latent_dim, distance, distance_region, optimizer, scheduler, val_num_samples,
                         compile=compile, channels_last=channels_last, ema_decay=ema_decay)
        self.hparams.pop("inference_steps", None)
        # the settings in force, as checkpoints record them
        self.hparams.update(settings, optimizer=optimizer, dynamics_net=dynamics_net)
        counts = {"w_steps": (w_steps, 1), "z_steps": (settings["z_steps"], 1),
                  "start_candidates": (settings["start_candidates"], 0), "sample_steps": (settings["sample_steps"], 0),
                  "table_neighbours": (table_neighbours, 1), "max_nonfinite_batches": (max_nonfinite_batches, 1)}
        for key, (value, least) in counts.items():
            if not is_count(value) or value < least:
                raise ValueError(f"model.{key} must be a whole number, at least {least}; got {value!r}")
        if not (isinstance(settings["z_lr"], (int, float)) and settings["z_lr"] > 0):
            raise ValueError(f"model.z_lr must be a positive step length; got {settings['z_lr']!r}")
        if not 0 <= restart_prob <= 1:
            raise ValueError(f"model.restart_prob must be a probability in [0, 1]; got {restart_prob!r}")
        sample_starts = settings["sample_starts"]
        self.automatic_optimization = False                     # z-, Z- and w-steps alternate by hand
        self.lipschitz = {"kind": "none", "weight": 0.0, "sigma": 1e-3, **(lipschitz or {})}
        if self.lipschitz["kind"] not in ("none", "perturbation", "spectral"):
            raise ValueError(f"model.lipschitz.kind must be none, perturbation or spectral; got {self.lipschitz['kind']!r}")
        self.dynamics = DynamicsNet(self.generator.feature_dim, latent_dim, **dynamics_net,
                                    spectral_norm=self.lipschitz["kind"] == "spectral")
        n = int(data_info["num_train_samples"])
        # One z per training example, on the sphere. A frozen Parameter, not a buffer: DDP re-broadcasts
        # buffers from rank 0 on every forward, which would overwrite rows other ranks just wrote.
        self.latents = nn.Parameter(A.sphere_sample(n, dim=latent_dim), requires_grad=False)
        if start_batching not in ("auto", "loop", "batched"):
            raise ValueError(f"model.start_batching must be auto, loop or batched; got {start_batching!r}")
        if sample_starts not in ("sphere", "table"):
            raise ValueError(f"model.sample_starts must be sphere or table; got {sample_starts!r}")
        if sample_starts == "table":
            # each row's encoder summary hbar, written with its latent: sampling looks up the input's neighbours.
            # NaN marks rows not yet written (they sort last, and their latents are still uniform sphere points).
            self.latent_keys = nn.Parameter(torch.full((n, self.generator.feature_dim), float("nan")),
                                            requires_grad=False)
        self.nonfinite_streak = 0

    @classmethod
    def legacy_hparams(cls, saved: dict[str, Any]) -> dict[str, Any]:
        """Checkpoints written before dynamics_net.rho_output existed hold a Z with rho = softplus(unit); those
        written before w_steps existed made one w-step per batch."""
        dynamics_net = saved.get("dynamics_net") or {}
        legacy = {} if "rho_output" in dynamics_net else {"dynamics_net": {**dynamics_net, "rho_output": "softplus"}}
        return legacy if "w_steps" in saved or "z_steps" not in saved else {**legacy, "w_steps": 1}

    def check_init_source(self, path: str, saved: dict[str, Any]) -> None:
        """Z's last unit is rho itself (linear) or rho before a softplus: copied into the other setting, it moves
        nothing (a softplus unit sits near -3) or every step far too long."""
        if saved.get("dynamics_net") is None and "z_steps" not in saved:
            return                                       # not a cGML checkpoint: it has no dynamics net to copy
        was = {**saved, **self.legacy_hparams(saved)}["dynamics_net"]["rho_output"]
        now = self.hparams.dynamics_net["rho_output"]
        if was != now:
            raise ValueError(f"init_from={path}: its dynamics net was trained with "
                             f"model.dynamics_net.rho_output={was}, this run has {now}; fine-tune with "
                             f"model.dynamics_net.rho_output={was}")

    # ---- the phases (each touches only its own parameters) --------------------------------------------------
    def initial_latents(self, feats: tuple[Tensor, ...], y: Tensor, x: Tensor, index: Tensor,
                        generator: torch.Generator | None = None) -> Tensor:
        """z_0 per input (mode-consistent starts): the best of M fresh sphere points and the table's warm start, which
        one more fresh point replaces with probability restart_prob (always, at the default 1)."""
        hp, b = self.hparams, len(y)
        sphere = lambda *shape: A.sphere_sample(*shape, dim=hp.latent_dim, generator=generator).to(y)  # noqa: E731
        warm = self.latents[index]                                                      # [B, d]
        if hp.restart_prob > 0:
            fresh = torch.rand(b, 1, generator=generator).to(y.device) < hp.restart_prob
            warm = torch.where(fresh, sphere(b), warm)
        if hp.start_candidates <= 0:
            return warm
        candidates = torch.cat([warm[None], sphere(hp.start_candidates, b)])            # [M+1, B, d]
        if not self.batched_starts(y.device):
            return A.select_starts(self.loss_fn(feats, y, x), candidates)
        rows = torch.arange(b, device=y.device).repeat(len(candidates))                 # row m*B + b -> input b
        return A.select_starts(self.loss_fn(repeat_feats(feats, rows), y[rows], x[rows]), candidates, batched=True)

    def batched_starts(self, device: torch.device) -> bool:
        """Whether start selection decodes all candidates in one pass (batched) or one candidate per pass (loop);
        auto: batched on CUDA, where larger kernels pay, loop elsewhere."""
        mode = self.hparams.start_batching
        return mode == "batched" or (mode == "auto" and device.type == "cuda")

    def loss_fn(self, feats: tuple[Tensor, ...], y: Tensor, x: Tensor) -> Callable[[Tensor], Tensor]:
        return lambda z: self.distance(self.generator.decode(feats, z), y, x)

    def z_phase(self, feats: tuple[Tensor, ...], y: Tensor, x: Tensor, index: Tensor,
                generator: torch.Generator | None = None) -> Tensor:
        """k projected gradient steps on z only, from the chosen start: the trajectory [k+1, B, d]."""
        feats = tuple(f.detach() for f in feats)
        with self.phase("start_selection"):
            z0 = self.initial_latents(feats, y, x, index, generator)
        hp = self.hparams
        with self.phase("z_steps"):
            return A.z_descent(self.loss_fn(feats, y, x), z0, hp.z_steps, hp.z_lr, hp.momentum, hp.z_normalized)

    def dynamics_phase_loss(self, hbar: Tensor, path: Tensor) -> Tensor:
        """Regress Z on every step of the trajectory, all k*B pairs in one batch."""
        z_t, r_t, rho_t = A.dynamics_targets(path, self.hparams.dynamics_target)
        hbar = hbar.detach().repeat(len(path) - 1, 1)                                   # row t*B + b -> input b
        r_pred, rho_pred = self.dynamics(hbar, z_t)
        loss = A.dynamics_loss(r_pred, rho_pred, r_t, rho_t)
        if self.lipschitz["kind"] == "perturbation" and self.lipschitz["weight"] > 0:
            step = lambda h, z: torch.cat(self.dynamics(h, z), dim=1)                   # noqa: E731
            loss = loss + self.lipschitz["weight"] * A.lipschitz_penalty(step, (hbar, z_t), self.lipschitz["sigma"])
        return loss

    def generator_phase_loss(self, feats: tuple[Tensor, ...], z: Tensor, y: Tensor, x: Tensor) -> Tensor:
        """Fit encoder + decoder at the converged latents, plus the decoder's Lipschitz penalty."""
        loss = self.distance(self.generator.decode(feats, z), y, x).mean()
        if self.lipschitz["kind"] == "perturbation" and self.lipschitz["weight"] > 0:
            decode = lambda z_, *f: self.generator.decode(f, z_)                         # noqa: E731
            fixed = tuple(f.detach() for f in feats)
            loss = loss + self.lipschitz["weight"] * A.lipschitz_penalty(decode, (z, *fixed), self.lipschitz["sigma"])
        return loss

    @torch.no_grad()
    def write_latents(self, index: Tensor, z: Tensor, keys: Tensor | None = None) -> None:
        """Store the converged z (and, for table starts, the inputs' hbar as their keys); gathered from every rank
        so all ranks hold the same table."""
        if self._trainer is not None and self.trainer.world_size > 1:
            index, z, keys = self.gather_rows(index, z, keys)
        self.latents[index] = z.to(self.latents.dtype)
        if keys is not None:
            self.latent_keys[index] = keys.detach().to(self.latent_keys.dtype)

    # ---- Lightning hooks --------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        x, y, index = batch["x"], batch["y"], batch["index"]
        opt_w, opt_z = self.optimizers()
        with self.phase("encoder"):
            feats = self.generator.encode(x)                                            # once per batch
        path = self.z_phase(feats, y, x, index, self.step_generator())                  # [k+1, B, d]
        with self.phase("dynamics_loss"):
            hbar = self.generator.summarize(feats)
            dyn_loss = self.dynamics_phase_loss(hbar, path)
        with self.phase("w_loss"):
            w_loss = self.generator_phase_loss(feats, path[-1], y, x)
        with self.phase("backward"):
            # Disjoint parameters and graphs: one backward serves both steps (one gradient sync under DDP).
            self.zero_grads()
            self.manual_backward(w_loss + dyn_loss)
        if not self.all_finite(w_loss, dyn_loss, path[-1], self.gradient_norm()):
            return self.skip_nonfinite(batch_idx)
        with self.phase("update"):
            self.write_latents(index, path[-1], hbar if self.hparams.sample_starts == "table" else None)
            self.clip(opt_w)                                                            # encoder + decoder only
            opt_w.step()
            opt_z.step()
        for _ in range(self.hparams.w_steps - 1):
            # further w-steps at the same latents: the z-phase's work serves several updates (data echoing); the
            # encoder runs again, since its weights just moved
            with self.phase("more_w_steps"):
                loss = self.generator_phase_loss(self.generator.encode(x), path[-1], y, x)
                self.zero_grads()
                self.manual_backward(loss)
                if not self.all_finite(loss, self.gradient_norm()):      # leave the weights as the last finite step did
                    break
                self.clip(opt_w)
                opt_w.step()
        self.nonfinite_streak = 0
        self.log_dict({"train/w_loss": w_loss.detach(), "train/dynamics_loss": dyn_loss.detach()},
                      prog_bar=True, batch_size=len(x))

    def skip_nonfinite(self, batch_idx: int) -> None:
        """Skip the batch (no step, no table write); after max_nonfinite_batches in a row, save and stop. The weights
        are then those after the last finite update (a step that makes them non-finite stops the run at once)."""
        self.nonfinite_streak += 1
        self.log("train/skipped_nonfinite", float(self.nonfinite_streak), batch_size=1)
        if self.nonfinite_streak >= self.hparams.max_nonfinite_batches:
            path = Path(self.trainer.default_root_dir) / "checkpoints" / "nonfinite_stop.ckpt"
            self.trainer.save_checkpoint(path)
            raise FloatingPointError(
                f"{self.nonfinite_streak} batches in a row gave NaN/Inf losses, latents or gradients (last: batch "
                f"{batch_idx}); saved {path}: the weights, latent table and optimizers after the last finite update "
                f"(step {self.global_step}), the loop at this batch. Resume from it with model.clip_grad_norm set "
                f"(ckpt_path={path}), fine-tune from it with lower learning rates or z_lr (init_from={path}), or "
                f"run with debug=anomaly to find the op.")

    def optimizer_groups(self):
        """opt_w: encoder + decoder; opt_z: the dynamics net (dynamics_optimizer, else the same optimizer)."""
        hp = self.hparams
        return [(self.generator.parameters(), hp.optimizer),
                (self.dynamics.parameters(), hp.dynamics_optimizer or hp.optimizer)]

    # ---- inference ----------------------------------------------------------------------------------------
    def _sample(self, x: Tensor, num_samples: int, steps: int | None, guide, generator, chunk_size: int = 8192,
                guide_steps: int = 20, guide_lr: float = 0.2) -> Tensor:
        steps = self.hparams.sample_steps if steps is None else steps
        b, n = len(x), num_samples
        feats = self.generator.encode(x)                                                # once per input
        hbar = self.generator.summarize(feats)
        table = self.hparams.sample_starts == "table"
        if table:
            neighbours = self.table_neighbours(hbar, max(n, self.hparams.table_neighbours))  # [B, k]: N distinct
            z = self.table_starts(neighbours, n, generator)                             # row b*N + i -> input b
        else:
            z = A.sphere_sample(b * n, dim=self.latent_dim, generator=generator).to(x)
        rows = sample_rows(b, n, x.device)
        if guide is not None:
            # steer the starting points toward the constraint through G, then back onto a learned mode: the
            # nearest of the neighbours' table latents (table starts), or Z's walk
            z = self.guided_latents(feats, z, rows, guide, (b, n), guide_steps, guide_lr)
            if table:
                z = self.snap_to_table(feats, z, neighbours)
        z = self.walk(z, hbar, rows, steps, chunk_size)
        return self.decode_rows(feats, z, rows, chunk_size).view(b, n, *self.y_shape)

    def table_neighbours(self, hbar: Tensor, count: int | None = None, chunk_size: int = 256) -> Tensor:
        """Rows [B, k] of the `count` (default `table_neighbours`) training inputs whose keys (encoder summaries) are
        nearest each input's; rows not yet written (NaN keys) come last."""
        k = min(count or self.hparams.table_neighbours, len(self.latent_keys))
        keys = self.latent_keys.to(hbar.dtype)
        return torch.cat([torch.cdist(h, keys).nan_to_num(float("inf")).topk(k, largest=False).indices
                          for h in hbar.split(chunk_size)])

    def table_starts(self, neighbours: Tensor, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """N starting latents per input [B*N, d]: the table latents of N of the input's neighbours, distinct when
        N <= k (sampling asks for k >= N neighbours, so only a table of fewer than N rows repeats a latent). The
        table holds, per training input, a latent that decodes to its own target; inputs alike share how the latent
        space splits into branches, so their latents land on this input's branches, each in its share."""
        b, k = neighbours.shape
        if num_samples <= k:
            pick = torch.rand(b, k, generator=generator).argsort(dim=1)[:, :num_samples]
        else:
            pick = torch.randint(k, (b, num_samples), generator=generator)
        return self.latents[neighbours.gather(1, pick.to(neighbours.device))].flatten(0, 1)

    def snap_to_table(self, feats: tuple[Tensor, ...], z: Tensor, neighbours: Tensor, chunk_size: int = 8192) -> Tensor:
        """Each latent [B*N, d] replaced by the one of its input's neighbours' table latents whose output is nearest
        its own output (guided latents may leave every branch; the table's outputs lie on them)."""
        (b, k), d = neighbours.shape, z.shape[-1]
        z = z.view(b, -1, d)                                                            # [B, N, d]
        n = z.shape[1]

        def snap(inputs: Tensor) -> Tensor:
            candidates = self.latents[neighbours[inputs]].to(z.dtype)                   # [b', k, d]
            both = torch.cat([z[inputs], candidates], dim=1)                            # [b', N + k, d]
            decoded = self.generator.decode(repeat_feats(feats, inputs.repeat_interleave(n + k)), both.flatten(0, 1))
            decoded = decoded.reshape(len(inputs), n + k, -1)                           # [b', N + k, D]
            best = torch.cdist(decoded[:, :n], decoded[:, n:]).argmin(dim=-1)           # [b', N]
            return candidates.gather(1, best[..., None].expand(-1, -1, d))

        return in_chunks(snap, b, max(1, chunk_size // (n + k)), z.device).flatten(0, 1)   # whole inputs per chunk

    def walk(self, z: Tensor, hbar: Tensor, rows: Tensor, steps: int, chunk_size: int) -> Tensor:
        """`steps` moves of Z's update rule, on the small latent path only (chunked over the B*N rows)."""
        def walk_chunk(chunk: Tensor) -> Tensor:
            z_c, h_c = z[chunk], hbar[rows[chunk]]
            for _ in range(steps):
                z_c = A.dynamics_step(z_c, *self.dynamics(h_c, z_c))
            return z_c

        return in_chunks(walk_chunk, len(z), chunk_size, z.device)

    def guided_latents(self, feats, z, rows, guide, bn, steps: int, lr: float) -> Tensor:
        """Steer z by normalized gradient steps (length lr, decaying; algorithm.z_descent) on a differentiable
        penalty guide(samples[B, N, ...]) -> scalar; normalized, so the penalty's scale does not matter.

        _sample guides the starting points (fresh sphere points, or the drawn table latents, which snap_to_table
        then puts back onto a branch), before any dynamics step, then walks them with Z (`steps`, default the module's
        sample_steps). Guiding after the dynamics steps instead would start every latent at a mode, where the decoder
        is flat in z, and fewer samples reach the constraint (docs/results.md, guided sampling)."""
        feats = repeat_feats(feats, rows)

        def check_latents(z_: Tensor) -> Tensor:                      # a step on a NaN/Inf gradient leaves NaN
            if not torch.isfinite(z_).all():
                raise ValueError("guide's gradient is NaN or Inf for these samples (its value is finite): it must "
                                 "be differentiable where the samples lie (e.g. no sqrt of 0)")
            return z_

        def penalty(z_: Tensor) -> Tensor:
            value = guide(self.generator.decode(feats, check_latents(z_)).view(*bn, *self.y_shape))
            if not (isinstance(value, Tensor) and value.requires_grad):
                got = "a tensor without a gradient" if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"guide returned {got}: it must be a differentiable torch function of the samples "
                                 "it is given (a scalar, or one penalty per input or per sample: they are summed)")
            if not torch.isfinite(value.detach()).all():
                raise ValueError("guide returned NaN or Inf for these samples: it must give a finite penalty "
                                 "(check for divisions by zero, logs of 0)")
            return value

        return check_latents(A.z_descent(penalty, z, steps, lr, normalized=True, path=False))
