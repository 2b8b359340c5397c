"""Which process runs a piece of work: a pid, and a mark that tells that process from a later one with its pid.

A pid alone is not an identity: once a process exits, the kernel hands its number to the next process that
starts, and a registry record that only says ``pid 4242`` would make ``trainings cancel`` SIGTERM whatever runs
under that number now. A :class:`ProcessRef` is the pid together with the process's *start mark*: the machine's
boot and the process's start time (on Linux, read from ``/proc``: exact clock ticks since boot; elsewhere from
psutil). A reused pid carries another start time, so it is never taken for the work's process, and a signal
goes to the process the ref names or to none (on Linux through a pidfd, so the check and the signal see the
same process).

Refs written before marks existed hold only a pid: such a ref is trusted only if its process started before the
work's own file was last written (the process doing the work wrote it, so it was running then; a process that
took the pid later started after that write).
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import sys
from dataclasses import dataclass
from functools import lru_cache

# Clocks disagree by up to a tick (and /proc/stat's boot time moves with clock adjustments): a process that
# started within this many seconds after a file was written is still taken as the file's writer.
_START_SLACK_S = 1.0


def process_alive(pid: int) -> bool:
    """Whether some process ``pid`` runs on this host (one owned by another user counts as running).

    This says nothing about *which* process: use :func:`start_mark` / :class:`ProcessRef` to know it is the
    one that was meant."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:  # a pid no process can have (a hand-edited record)
        return False
    return True


@lru_cache(maxsize=1)
def _boot() -> str:
    """This machine's current boot: a process start time means something only within one boot."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        pass
    try:
        import psutil

        return f"{socket.gethostname()}@{int(psutil.boot_time())}"
    except Exception:  # psutil missing or unsupported here: the host name still keeps other machines apart
        return socket.gethostname()


def _linux_start_ticks(pid: int) -> str | None:
    """The start time of a running process in clock ticks since boot; None for none, or for a zombie (it ended;
    only its parent has not collected its exit status yet)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces or ')': the fields after the last ')'
    # are state (3), ppid (4), ... starttime (22).
    fields = stat[stat.rfind(b")") + 2:].split()
    if len(fields) <= 19 or fields[0] in (b"Z", b"X"):
        return None
    return fields[19].decode()


def start_mark(pid: int) -> str | None:
    """An identity of process ``pid`` that a later process reusing the pid does not share; None when no such
    process runs (or, on a platform with neither ``/proc`` nor psutil, when it cannot be told)."""
    if sys.platform.startswith("linux") and os.path.isdir("/proc/self"):
        ticks = _linux_start_ticks(pid)
        return f"{_boot()}:{ticks}" if ticks is not None else None
    try:
        import psutil

        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return f"{_boot()}:{proc.create_time():.2f}"
    except Exception:  # no such process, no psutil, no permission
        return None


def mark_tag(pid: int) -> str | None:
    """:func:`start_mark` as 8 hex digits, short enough for a file name (work folders named after their process
    can carry it beside the pid: :func:`tag_alive` then tells a live owner from a reused pid)."""
    mark = start_mark(pid)
    return hashlib.sha256(mark.encode()).hexdigest()[:8] if mark is not None else None


def tag_alive(pid: int, tag: str) -> bool:
    """Whether process ``pid`` runs and is the one :func:`mark_tag` gave ``tag`` for."""
    return process_alive(pid) and mark_tag(pid) == tag


def started_at(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None when that cannot be told."""
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:
        return None


@dataclass(frozen=True)
class ProcessRef:
    """The process doing a piece of work: ``pid``, and the ``mark`` :func:`start_mark` gave when it claimed the
    work. Without a mark (written before marks existed), ``written_at`` (a time the process is known to have
    been running: the mtime of a file only it writes) stands in for it."""

    pid: int
    mark: str | None = None
    written_at: float | None = None
    host: str | None = None  # the machine it runs on (None: this one, for refs written before hosts were noted)

    @classmethod
    def current(cls) -> ProcessRef:
        """This process."""
        pid = os.getpid()
        return cls(pid, start_mark(pid), host=socket.gethostname())

    @property
    def local(self) -> bool:
        """Whether the process runs on this machine, where its pid means something."""
        return self.host is None or self.host == socket.gethostname()

    def alive(self) -> bool:
        """Whether the process this ref names still runs (not merely some process with its pid); False for a
        process of another machine, which cannot be seen from here (check :attr:`local` first)."""
        if not self.local or not process_alive(self.pid):
            return False
        now = start_mark(self.pid)
        if now is None:
            # A zombie (it ended; its parent has not collected it yet), or a platform where no mark can be taken,
            # where the pid is all there is to go on.
            return not _can_mark()
        if self.mark is not None:
            return now == self.mark
        if self.written_at is not None:
            began = started_at(self.pid)
            if began is not None and began > self.written_at + _START_SLACK_S:
                return False  # it started after the work's file was last written: it took a dead run's pid
        return True

    def send(self, sig: int) -> bool:
        """Send ``sig`` to the process this ref names; False (nothing sent) when it no longer runs."""
        if not self.local:
            return False
        pidfd = _pidfd(self.pid)
        try:
            # With a pidfd open, the pid cannot pass to another process until it is closed: the check below and
            # the signal are about the same process.
            if not self.alive():
                return False
            try:
                if pidfd is not None:
                    signal.pidfd_send_signal(pidfd, sig)
                else:
                    os.kill(self.pid, sig)
            except ProcessLookupError:
                return False
            return True
        finally:
            if pidfd is not None:
                os.close(pidfd)


@lru_cache(maxsize=1)
def _can_mark() -> bool:
    return start_mark(os.getpid()) is not None


def _pidfd(pid: int) -> int | None:
    opener = getattr(os, "pidfd_open", None)
    if opener is None or pid <= 0:
        return None
    try:
        return opener(pid)
    except (OSError, OverflowError):
        return None


# ------------------------------------------------------------------------------------------------- work names
# Work in progress (the registry's staging and trash folders, atomic writes' temp files) is named after the process
# doing it, PURPOSE-PID-TAGRAND@HOST: TAG is :func:`mark_tag` (8 hex digits), RAND 8 more that keep one process's
# names apart. `registry gc` removes an entry at once when its process is gone, so the name must tell that process
# from a later one that took its pid. Names written before tags existed (RAND alone, 8 or 12 digits) are judged by
# the pid alone: their process is taken as alive while any process has that pid, which keeps the entry.
_TAG_DIGITS = 8


def work_name(purpose: str) -> str:
    """A unique name for a piece of work in progress that records which process of which host does it."""
    tag = mark_tag(os.getpid()) or ""
    return f"{purpose}-{os.getpid()}-{tag}{os.urandom(4).hex()}@{socket.gethostname()}"


def work_owner(name: str, host: str) -> tuple[int, str | None] | None:
    """The process a work name names, as (pid, tag or None for names without one), if it is one of ``host``'s;
    None for another host's work or a name not of this form."""
    head, _, entry_host = name.rpartition("@")
    parts = head.rsplit("-", 2)  # PURPOSE may itself contain '-': split from the right
    if entry_host != host or len(parts) != 3 or not parts[1].isdigit():
        return None
    tagged = len(parts[2]) == 2 * _TAG_DIGITS
    return int(parts[1]), parts[2][:_TAG_DIGITS] if tagged else None


def work_owner_alive(name: str, host: str) -> bool:
    """Whether the process a work name names still runs on ``host`` (the very process, not a reuser of its pid)."""
    owner = work_owner(name, host)
    if owner is None:
        return False
    pid, tag = owner
    return tag_alive(pid, tag) if tag is not None else process_alive(pid)
