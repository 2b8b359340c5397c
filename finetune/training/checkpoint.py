"""Checkpoints of a training run: what ``finetune train --resume`` needs to continue exactly where it stopped.

A checkpoint holds only what training changes: the trainable (LoRA) weights, the optimizer and scheduler
states, every process's random number generators, and the position (step) with running figures. The frozen
base is reloaded from its source. Each checkpoint is written like a version: staged in a temp folder, fsynced,
with ``state.json`` (holding every other file's size and sha256) written last, then renamed into place. A kill
leaves the previous checkpoint or the new one; a checkpoint damaged afterwards (a torn disk write, a full disk,
a hand edit) fails :func:`check_checkpoint`, and resuming falls back to the one before it.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .. import atomic
from ..errors import IntegrityError, RegistryAccessError
from ..registry.layout import CHECKPOINT_STATE as STATE  # written last: the position, every other file's sha256
from ..registry.layout import completed_checkpoints

KEEP = 2  # older checkpoints are removed; two survive a crash during the newest one's pruning


@dataclass
class Progress:
    """Where a run stands: what a checkpoint saves (as ``state.json``) and a resumed run continues from."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # real (non-padding) tokens trained on, all processes
    best_eval: float | None = None  # the lowest eval loss so far
    bad_evals: int = 0  # evaluations since the best one (early stopping counts these)
    seconds: float = 0.0  # wall time of the run so far, earlier processes included
    done: bool = False  # training finished (last step or early stop): a resume only publishes

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Progress:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: Path,
    progress: Progress,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    rank: int,
    is_main: bool,
    barrier: Callable[[], None],
) -> Path:
    """Write the checkpoint of ``progress.step`` under ``root`` (collective: every process calls it)."""
    tmp = root / f".tmp-step-{progress.step:08d}"
    final = root / f"step-{progress.step:08d}"
    try:
        if is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            save_file(_trainable_state(model), str(tmp / "adapter.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        barrier()
        torch.save(_rng_state(), tmp / f"rng-{rank}.pt")
        barrier()
        if is_main:
            files = {}
            for f in sorted(tmp.iterdir()):
                atomic.fsync_file(f)
                files[f.name] = {"size": f.stat().st_size, "sha256": atomic.sha256_file(f)}
            state = {**dataclasses.asdict(progress), "files": files}
            atomic.write_bytes_durable(tmp / STATE, atomic.pretty_json(state))  # last: its presence means complete
            atomic.fsync_dir(tmp)
            if final.exists():  # a damaged checkpoint of this step that a resume skipped: this one replaces it
                shutil.rmtree(final)
            tmp.rename(final)
            atomic.fsync_dir(root)
            for old in sorted(root.glob("step-*"))[:-KEEP]:
                shutil.rmtree(old, ignore_errors=True)
    except Exception as err:  # a full disk: torch.save raises RuntimeError, safetensors its own error, no errno
        full = atomic.out_of_space(err, root)
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # first: the record that says why must still fit
        if not full and not isinstance(err, OSError):
            raise
        why = "the disk is full" if full else (err.strerror or str(err))
        raise RegistryAccessError(f"cannot write checkpoint {final}: {why}",
                                  "free space on the registry's disk, then `finetune train --resume` the run") from None
    barrier()
    return final


def checkpoints(root: Path) -> list[Path]:
    """The checkpoints that were completed (``state.json`` written), newest first; temp folders are ignored."""
    return completed_checkpoints(root)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest completed checkpoint (it may still be damaged: see :func:`check_checkpoint`)."""
    done = checkpoints(root)
    return done[0] if done else None


def check_checkpoint(path: Path) -> str | None:
    """The first problem with a checkpoint's files (sizes and sha256 against ``state.json``), or None."""
    try:
        state = json.loads((path / STATE).read_bytes())
    except (OSError, ValueError) as err:
        return f"{STATE} is unreadable ({type(err).__name__})"
    files = state.get("files") if isinstance(state, dict) else None
    if not isinstance(files, dict):
        return None  # written before checkpoints listed their files: loading it is the check
    for name, info in sorted(files.items()):
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != info.get("size"):
            return f"{name} is {f.stat().st_size} bytes, {info.get('size')} were written"
        if atomic.sha256_file(f) != info.get("sha256"):
            return f"{name} differs from what was written"
    return None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, rank: int) -> Progress:
    """Restore weights, optimizer, scheduler and this process's RNG; return the saved progress.

    A damaged checkpoint raises :class:`IntegrityError` before anything is restored."""
    problem = check_checkpoint(path)
    if problem is not None:
        raise IntegrityError(f"checkpoint {path.name} is damaged: {problem}")
    try:
        weights = load_file(str(path / "adapter.safetensors"))
    except Exception as err:  # safetensors' own error types; an older checkpoint without checksums lands here
        raise IntegrityError(f"checkpoint {path.name} is damaged: {type(err).__name__}: {err}") from None
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing or any(n not in params for n in weights):
        raise IntegrityError(f"checkpoint {path} does not match the model ({len(missing)} trainable tensors missing)")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng = path / f"rng-{rank}.pt"
    if rng.exists():
        _set_rng_state(torch.load(rng, weights_only=False))
    return Progress.from_dict(json.loads((path / STATE).read_text()))
