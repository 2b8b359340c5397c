"""What every storage module does with the registry's disk: list a folder, take a model's lock, make sure a
write can start, and hand out staging folders. One clear error for each way the disk can refuse."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from filelock import FileLock

from .. import processes
from ..errors import RegistryAccessError
from ..names import check_name
from .layout import Layout

LOCK_TIMEOUT_S = 120


def work_name(purpose: str) -> str:
    """A unique folder name for work in progress that records who does it (see :func:`finetune.processes.work_name`)."""
    return processes.work_name(check_name(purpose, "purpose"))


def listdir(path: Path) -> list[os.DirEntry[str]]:
    """The entries of ``path`` (none when it does not exist); a folder that cannot be read is one clear error."""
    try:
        with os.scandir(path) as it:
            return list(it)
    except FileNotFoundError:
        return []
    except (PermissionError, NotADirectoryError) as err:
        raise RegistryAccessError(f"cannot read {path}: {err.strerror}",
                                  "check FINETUNE_HOME and permissions") from None


def not_writable(root: Path, err: OSError) -> RegistryAccessError:
    """The one error for a registry that cannot be written (read-only mount, permissions, full disk)."""
    why = err.strerror or type(err).__name__
    if err.errno == errno.ENOSPC:
        return RegistryAccessError(f"the registry at {root} is out of space ({why})",
                                   "free space on its disk, or point FINETUNE_HOME (or --registry) at another disk")
    return RegistryAccessError(f"the registry at {root} is not writable ({why})",
                               "point FINETUNE_HOME (or --registry) at a writable folder, or make this one writable")


def ensure_writable(layout: Layout) -> None:
    """Refuse, in one clear line, to start a write the registry's filesystem would refuse half-way.

    Creating folders that exist succeeds even on a read-only mount, so a probe file is created and removed."""
    try:
        layout.root.mkdir(parents=True, exist_ok=True)
        for folder in (layout.models, layout.staging, layout.trash):
            folder.mkdir(exist_ok=True)
        probe = layout.staging / work_name("probe")  # named by its process, so `gc` leaves it alone
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        probe.unlink(missing_ok=True)
    except OSError as err:
        raise not_writable(layout.root, err) from None


def staging_dir(layout: Layout, purpose: str) -> Path:
    """A new empty folder under ``.staging`` for work in progress; `gc` removes it if abandoned."""
    ensure_writable(layout)
    path = layout.staging / work_name(purpose)
    try:
        path.mkdir(parents=True)
    except OSError as err:
        raise RegistryAccessError(
            f"cannot write to registry root {layout.root}: {err.strerror}", "check FINETUNE_HOME and permissions"
        ) from None
    return path


def model_lock(layout: Layout, model_dir: Path) -> FileLock:
    """The lock that orders a model's changes (numbers, aliases, deletions) across processes."""
    return FileLock(str(layout.lock_file(model_dir)), timeout=LOCK_TIMEOUT_S)
