"""Housekeeping: the names of work-in-progress folders, and removing the ones their process abandoned.

Every folder under ``.staging`` and ``.trash`` is named after its process (``PURPOSE-PID-TAGRAND@HOST``, see
:mod:`finetune.processes`), so :func:`collect_leftovers` (``Registry.gc``, ``finetune registry gc``) can tell a live
process's work from a crashed one's, also when a later process took the crashed one's pid.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from .. import atomic, processes
from .disk import listdir, work_name

__all__ = ["collect_leftovers", "work_name"]


def collect_leftovers(areas: list[Path], older_than_hours: float, dry_run: bool) -> list[Path]:
    """Remove (or with ``dry_run`` only list) entries of ``areas`` whose owner is gone: at once when the entry
    names a process of this host that no longer runs, after ``older_than_hours`` when its owner cannot be told
    (another host, an unknown name)."""
    cutoff = time.time() - older_than_hours * 3600
    host = socket.gethostname()
    removed = []
    for area in areas:
        for entry in listdir(area):
            if processes.work_owner_alive(entry.name, host):
                continue
            if processes.work_owner(entry.name, host) is None:  # another host's, or not named by us: wait
                try:
                    if entry.stat(follow_symlinks=False).st_mtime > cutoff:
                        continue
                except FileNotFoundError:
                    continue
            removed.append(Path(entry.path))
            if not dry_run:
                atomic.remove_tree(Path(entry.path))
    return removed
