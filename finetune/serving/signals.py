"""A one-shot signal that threads wait on and asyncio tasks await, without a thread per waiter.

The prediction service sets one when a worker admits a prediction and one when it ends. An HTTP request held open
by ``Prefer: wait`` awaits it on the event loop: a thousand open waits cost a thousand futures, not a thousand
threads of the server's pool (which reads need).
"""

from __future__ import annotations

import asyncio
import threading


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class Signal:
    """Set once (from any thread); :meth:`wait` blocks a thread, :meth:`wait_async` suspends a task."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []

    def set(self) -> None:
        with self._lock:
            self._event.set()
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            try:
                loop.call_soon_threadsafe(_resolve, future)
            except RuntimeError:  # that event loop is closed: nobody waits there any more
                pass

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block this thread until set or ``timeout`` seconds pass; whether it is set."""
        return self._event.wait(timeout)

    async def wait_async(self, timeout: float | None = None) -> bool:
        """Suspend this task until set or ``timeout`` seconds pass; whether it is set. Holds no thread."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if self._event.is_set():
                return True
            self._waiters.append((loop, future))
        try:
            await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            with self._lock:
                if (loop, future) in self._waiters:
                    self._waiters.remove((loop, future))
        return self._event.is_set()
