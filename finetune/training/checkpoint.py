"""Checkpoints of a training run: what ``finetune train --resume`` needs to continue exactly where it stopped.

A checkpoint holds only what training changes: the trainable (LoRA) weights, the optimizer and scheduler
states, every process's random number generators, and the position (step) with running figures. The frozen
base is reloaded from its source. Each checkpoint is written to a temp folder and renamed into place, so a kill
at any moment leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .. import atomic
from ..errors import IntegrityError

KEEP = 2  # older checkpoints are removed; two survive a crash during the newest one's pruning


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
    step: int,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    rank: int,
    is_main: bool,
    barrier: Callable[[], None],
    extra: dict[str, Any],
) -> Path:
    """Write checkpoint ``step`` under ``root`` (collective: every process calls it)."""
    tmp = root / f".tmp-step-{step:08d}"
    final = root / f"step-{step:08d}"
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
        atomic.write_bytes_durable(tmp / "state.json", atomic.pretty_json({"step": step, **extra}))
        for f in tmp.iterdir():
            atomic.fsync_file(f)
        atomic.fsync_dir(tmp)
        tmp.rename(final)
        atomic.fsync_dir(root)
        for old in sorted(root.glob("step-*"))[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint (temp folders of an interrupted save are ignored)."""
    done = [p for p in sorted(root.glob("step-*")) if (p / "state.json").is_file()]
    return done[-1] if done else None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, rank: int) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and this process's RNG; return the saved position and figures."""
    weights = load_file(str(path / "adapter.safetensors"))
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
    return json.loads((path / "state.json").read_text())
