"""Files a run reads and leaves behind: checkpoints read safely (weights only, errors naming the file) and
result files written atomically (a temporary file beside the target, renamed over it when complete), so an
interrupted write never leaves a truncated metrics.json or picture in place of a good one."""
from __future__ import annotations

import io
import json
import logging
import os
import pickle
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

log = logging.getLogger("cgml_lightning")

STOP_CHECKPOINTS = ("nonfinite_stop.ckpt",)    # written when training gives up: never resumed by ckpt_path=last


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path (same folder and suffix, so writers that infer the format from the name work);
    it replaces `path` only when the block finishes without an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, payload: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    log.info("wrote %s", path)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_image(image, path: str | Path) -> Path:
    """A PIL image written atomically."""
    with atomic_path(path) as tmp:
        image.save(tmp)
    return Path(path)


def read_checkpoint_bytes(path: str | Path) -> tuple[dict[str, Any], bytes]:
    """The checkpoint dict (loaded with weights_only=True) and the file's bytes; every problem is a ValueError
    (FileNotFoundError for a missing file) naming the file and the cause."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"{path.resolve()}: a folder, not a checkpoint file; give a checkpoint in it, e.g. "
                                f"{path / 'checkpoints' / 'last.ckpt'} for a cgml-train run")
    if not path.is_file():
        raise FileNotFoundError(f"{path.resolve()}: no such checkpoint")
    data = path.read_bytes()
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's own text suggests loading without weights_only, which would run the file's code: not passed on
        raise ValueError(f"{path}: not a cgml-lightning checkpoint: it holds objects that a weights-only load "
                         "refuses (pickled code or classes, or bytes that are not a pickle). Nothing in it was run, "
                         "and it is not loaded") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError, IndexError) as err:
        # what torch's loaders raise on a file they cannot parse (the legacy one: KeyError, IndexError)
        raise ValueError(f"{path}: not a readable checkpoint (truncated, or not a file torch.save wrote): "
                         f"{type(err).__name__}: {err}") from err
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: holds a {type(checkpoint).__name__}, not a checkpoint (a dict with a state_dict)")
    if not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(f"{path}: holds no state_dict (keys: {sorted(map(str, checkpoint))[:10]}); "
                         "not a Lightning checkpoint")
    return checkpoint, data


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    return read_checkpoint_bytes(path)[0]


def recorded_step(path: Path) -> int:
    """The training step a checkpoint file records (its global_step; -1 where it records none), read from the
    archive's record only (mmap, weights only); what torch raises where the file is not a whole checkpoint."""
    if not zipfile.is_zipfile(path):                 # torch.save's archive ends with its directory: cut short, none
        raise EOFError("no archive directory at its end")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    step = checkpoint.get("global_step") if isinstance(checkpoint, dict) else None
    return step if isinstance(step, int) else -1                    # whole, but from no Lightning run: ranked last


def newest_checkpoint(folder: str | Path) -> Path | None:
    """The whole checkpoint in folder that records the most training (its global_step; the most recently written
    of equals), stop checkpoints aside, or None when there is none. File times alone would pick an older one after
    a copy that does not keep them. A file cut short (a job killed while it saved) is skipped with a warning; a
    folder of such files only is an error, so that a run never restarts from scratch over them, and so is a whole
    file that a weights-only load refuses."""
    found = [p for p in Path(folder).glob("*.ckpt") if p.is_file() and p.name not in STOP_CHECKPOINTS]
    whole = []
    for path in found:
        try:
            whole.append((recorded_step(path), path.stat().st_mtime_ns, path))
        except pickle.UnpicklingError:
            raise ValueError(f"{path}: holds objects that a weights-only load refuses (pickled code or classes); "
                             f"nothing in it was run. Move it out of {folder}, or resume with ckpt_path=PATH"
                             ) from None
        except Exception as err:                     # noqa: BLE001 - whatever torch raises on a damaged archive
            log.warning("%s: not a whole checkpoint (cut short while saving?): %s: %s; passed over", path,
                        type(err).__name__, err)
    if whole:
        return max(whole)[2]
    if found:
        raise ValueError(f"{folder}: none of its checkpoints is whole ({', '.join(p.name for p in found[:5])}); "
                         f"resume from another copy with ckpt_path=PATH")
    return None


def save_figure(fig, path: str | Path) -> Path:
    """A matplotlib figure to a PNG, laid out tight and written atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return Path(path)
