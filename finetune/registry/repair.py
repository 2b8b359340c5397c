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
from pathlib import Path
from typing import TYPE_CHECKING

from .. import atomic
from ..errors import IntegrityError
from .aliases import read_aliases
from .deletion import retired_numbers
from .manifest import FORMAT_VERSION, utc_now

if TYPE_CHECKING:
    from .store import Registry


def repair_models(reg: Registry, dry_run: bool) -> list[Path]:
    """Rebuild every damaged ``model.json`` and ``next_version``; returns the files rebuilt (or, with
    ``dry_run``, those that would be)."""
    repaired = []
    for name in reg._model_names():
        path = reg._model_dir(*name.split("/"))
        try:
            reg.get_model(name)
        except IntegrityError:
            repaired.append(path / "model.json")
            if not dry_run:
                _rebuild_model_json(reg, path)
        try:
            reg._next_number(path)
            continue
        except IntegrityError:
            pass
        repaired.append(path / "next_version")
        if dry_run:
            continue
        reg._ensure_writable()
        with reg._lock(path):
            try:
                kept = list(read_aliases(path).values())
            except IntegrityError:
                kept = []
            highest = max([0, *reg._version_numbers(path), *retired_numbers(path), *kept,
                           *_numbers_in_records(reg, name)])
            atomic.replace_file(path / "next_version", f"{highest + 1}\n".encode(), reg._staging)
    return repaired


def _rebuild_model_json(reg: Registry, path: Path) -> None:
    reg._ensure_writable()
    with reg._lock(path):
        try:
            reg.get_model(f"{path.parent.name}/{path.name}")
            return  # rebuilt by another process meanwhile
        except IntegrityError:
            pass
        damaged = path / "model.json"
        keep = path / "model.json.damaged"
        if not keep.exists():
            os.link(damaged, keep)
        info = {"format": FORMAT_VERSION, "owner": path.parent.name, "name": path.name, "description": "",
                "visibility": "private", "hardware": "auto", "created_at": utc_now()}
        atomic.replace_file(damaged, atomic.pretty_json(info), reg._staging)


def _numbers_in_records(reg: Registry, model: str) -> list[int]:
    """Version numbers of ``model`` that training records say they published."""
    from .jobs import Trainings  # jobs builds on the store

    out = []
    for record in Trainings(reg).list():
        ref = str((record.output or {}).get("version") or "")
        head, _, number = ref.rpartition(":")
        if head == model and number.isdigit():
            out.append(int(number))
    return out
