"""Housekeeping: the names of work-in-progress folders, and removing the ones their process abandoned.

Every folder under ``.staging`` and ``.trash`` is named ``PURPOSE-PID-RAND@HOST``, so :func:`collect_leftovers`
(``Registry.gc``, ``finetune registry gc``) can tell a live process's work from a crashed one's.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .. import atomic
from ..names import check_name

if TYPE_CHECKING:
    from .store import Registry


def work_name(purpose: str) -> str:
    """A unique folder name for work in progress that records who does it."""
    return f"{check_name(purpose, 'purpose')}-{os.getpid()}-{os.urandom(4).hex()}@{socket.gethostname()}"


def owner_alive(entry_name: str, host: str) -> bool:
    """Work names are PURPOSE-PID-RAND@HOST; true when that process still runs on ``host`` (this one)."""
    head, _, entry_host = entry_name.rpartition("@")
    # PURPOSE may itself contain '-' (any valid name does), so split from the right.
    parts = head.rsplit("-", 2)
    return entry_host == host and len(parts) == 3 and parts[1].isdigit() and process_alive(int(parts[1]))


def owner_known(entry_name: str, host: str) -> bool:
    """Whether a work name names a process of this host (so its being alive or not can be told)."""
    head, _, entry_host = entry_name.rpartition("@")
    parts = head.rsplit("-", 2)
    return entry_host == host and len(parts) == 3 and parts[1].isdigit()


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (one owned by another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def collect_leftovers(reg: Registry, areas: list[Path], older_than_hours: float, dry_run: bool) -> list[Path]:
    """Remove (or with ``dry_run`` only list) entries of ``areas`` whose owner is gone: at once when the entry
    names a process of this host that no longer runs, after ``older_than_hours`` when its owner cannot be told
    (another host, an unknown name)."""
    cutoff = time.time() - older_than_hours * 3600
    host = socket.gethostname()
    removed = []
    for area in areas:
        for entry in reg._listdir(area):
            if owner_alive(entry.name, host):
                continue
            if not owner_known(entry.name, host):
                try:
                    if entry.stat(follow_symlinks=False).st_mtime > cutoff:
                        continue
                except FileNotFoundError:
                    continue
            removed.append(Path(entry.path))
            if not dry_run:
                atomic.remove_tree(Path(entry.path))
    return removed
