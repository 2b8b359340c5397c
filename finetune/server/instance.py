"""One registry, one server: the lock a server holds on its registry for as long as it serves it.

Two servers on one registry would both run its queue: each would adopt the other's runs and stop them when it
stops. So a server takes the registry's server lock (an OS file lock: it is released when the process ends,
however it ends) before anything else, and writes who it is beside it; a second server is refused in one line
that names the first one's process and address. ``finetune serve`` takes the lock before it binds its port and
prints nothing before both succeeded; an app served some other way takes it when its lifespan starts (the first
of ``app.state.services``).
"""

from __future__ import annotations

import json

from filelock import FileLock, Timeout

from .. import atomic
from ..errors import ConflictError
from ..processes import ProcessRef
from ..registry import Registry
from ..registry.disk import not_writable
from ..registry.manifest import utc_now


class ServerLock:
    """The registry's server lock, held by this process while it serves the registry at ``address``."""

    def __init__(self, registry: Registry, address: str):
        self.registry = registry
        self.address = address
        self.lock_path, self.info_path = registry.server_files()
        self._lock: FileLock | None = None

    @property
    def held(self) -> bool:
        return self._lock is not None

    def acquire(self) -> None:
        """Take the lock (nothing happens when this object holds it already); :class:`ConflictError` naming the
        server that holds it otherwise."""
        if self._lock is not None:
            return
        try:
            self.registry.root.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(self.lock_path), timeout=0)
            lock.acquire()
        except Timeout:
            raise ConflictError(f"the registry {self.registry.root} is already served {self._holder()}",
                                "one server per registry: stop that one first, or serve another registry "
                                "(--registry or FINETUNE_HOME)") from None
        except OSError as err:
            raise not_writable(self.registry.root, err) from None
        self._lock = lock
        me = ProcessRef.current()
        info = {"pid": me.pid, "pid_mark": me.mark, "address": self.address, "started_at": utc_now()}
        try:
            atomic.replace_file(self.info_path, atomic.pretty_json(info), self.registry.layout.staging)
        except OSError as err:
            self.release()
            raise not_writable(self.registry.root, err) from None

    def release(self) -> None:
        """Give the lock back (the file naming this server goes first, so it never names a later one)."""
        if self._lock is None:
            return
        try:
            self.info_path.unlink(missing_ok=True)
        except OSError:
            pass
        self._lock.release()
        self._lock = None

    def _holder(self) -> str:
        try:
            info = json.loads(self.info_path.read_bytes())
            pid, address, since = int(info["pid"]), str(info["address"]), str(info["started_at"])
        except (OSError, ValueError, KeyError, TypeError):
            return "by another process"  # it has the lock but has not written its name yet (or it was removed)
        return f"by process {pid} at {address} (since {since[:19].replace('T', ' ')} UTC)"

    # a service of the app (see finetune.server.app): first to start, last to stop
    def start(self) -> None:
        self.acquire()

    def stop(self) -> None:
        self.release()
