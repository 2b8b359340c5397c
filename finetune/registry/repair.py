"""Rebuilding what damage destroyed in a model's folder, from what is left (``finetune registry gc``).

* A ``model.json`` that cannot be read: rebuilt as a private model with no description (the safe choice: a
  public model becomes private, never the reverse); the damaged file is kept as ``model.json.damaged`` so its
  owner can restore what it said.
* A damaged ``next_version`` counter: rebuilt from the highest number ever given, so no number is handed out
  twice: versions on disk, tombstones of deleted ones (:mod:`.deletion`), aliases, and the versions training
  records say they published.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .. import atomic
from ..errors import IntegrityError
from .aliases import read_aliases
from .deletion import retired_numbers
from .disk import ensure_writable, model_lock
from .manifest import FORMAT_VERSION, utc_now

if TYPE_CHECKING:
    from .store import Registry


def repair_models(reg: Registry, dry_run: bool, published: Callable[[str], list[int]]) -> list[Path]:
    """Rebuild every damaged ``model.json`` and ``next_version``; returns the files rebuilt (or, with
    ``dry_run``, those that would be). ``published(model)``: the numbers records outside the model's folder say
    were handed out (training records: :func:`finetune.registry.policy.numbers_in_records`)."""
    repaired = []
    layout, versions = reg.layout, reg.version_store
    for name in reg.model_store.names():
        path = reg.model_store.dir(name)
        try:
            reg.get_model(name)
        except IntegrityError:
            repaired.append(layout.model_file(path))
            if not dry_run:
                _rebuild_model_json(reg, path)
        try:
            versions.next_number(path)
            continue
        except IntegrityError:
            pass
        repaired.append(layout.counter(path))
        if dry_run:
            continue
        ensure_writable(layout)
        with model_lock(layout, path):
            try:
                kept = list(read_aliases(layout.aliases_file(path)).values())
            except IntegrityError:
                kept = []
            highest = max([0, *versions.numbers(path), *retired_numbers(layout, path), *kept, *published(name)])
            atomic.replace_file(layout.counter(path), f"{highest + 1}\n".encode(), layout.staging)
    return repaired


def _rebuild_model_json(reg: Registry, path: Path) -> None:
    ensure_writable(reg.layout)
    with model_lock(reg.layout, path):
        try:
            reg.get_model(f"{path.parent.name}/{path.name}")
            return  # rebuilt by another process meanwhile
        except IntegrityError:
            pass
        damaged = reg.layout.model_file(path)
        keep = damaged.with_name(damaged.name + ".damaged")
        if not keep.exists():
            os.link(damaged, keep)
        info = {"format": FORMAT_VERSION, "owner": path.parent.name, "name": path.name, "description": "",
                "visibility": "private", "hardware": "auto", "created_at": utc_now()}
        atomic.replace_file(damaged, atomic.pretty_json(info), reg.layout.staging)
