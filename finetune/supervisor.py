"""One supervisor for worker processes: a child process with a job, messages in, events out.

The training queue's workers (:mod:`finetune.queue.executor`) and the inference worker
(:mod:`finetune.serving.worker`) are both a :class:`Child`: started (perhaps ahead of need, as a spare that has
done its imports), sent messages (written by a thread of its own: a sender never waits for the child to read),
read by one thread that hands each event to a callback and notices the exit within :data:`DEATH_POLL_S`,
reporting how it ended (:func:`describe_exit`), stopped with SIGTERM and then SIGKILL after a grace period.

Transport: JSON lines over the child's own stdin and stdout pipes (:mod:`subprocess`). Pipes work for every
child we start: a ``python -m`` worker, and ``python -m finetune.launch``, whose training processes inherit the
stdout pipe (a ``multiprocessing`` connection would not reach them). A child is a fresh interpreter in a session
of its own, so nothing is inherited from the server (no CUDA state, no locks) and Ctrl-C in the server's terminal
reaches the server first, which then stops its children in order. End of input is how a child learns that it is
not needed or that its parent is gone (the parent's end of the pipe closes when it dies, however it dies), so no
child outlives a server by waiting on it. A line that is not a JSON object (a library printing to stdout) is
passed to stderr, never taken for an event.

The child's side is :class:`Channel`: :meth:`Channel.open` takes over stdout for events (the process's own prints
go to stderr from then on). Code deep in a run (a record update, a metrics row, a log line) reports through
:func:`notify`, which does nothing unless the process runs under a supervisor (``FINETUNE_EVENTS=stdout``): files
stay the truth, events only say that something changed.
"""

from __future__ import annotations

import json
import os
import queue
import selectors
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

DEATH_POLL_S = 0.2  # how long an exit can go unnoticed when the pipe stays open (a grandchild holds it)
EVENTS_ENV = "FINETUNE_EVENTS"  # "stdout": this process runs under a supervisor and reports events on stdout
_MAX_LINE = 1 << 20

OnEvent = Callable[[dict[str, Any]], None]
OnExit = Callable[[int], None]


def describe_exit(code: int) -> str:
    """``exited with code 3`` or ``was killed by SIGKILL``."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class Child:
    """A supervised child process running ``argv``: :meth:`send` writes a JSON message to its stdin, each JSON
    line it writes to stdout goes to ``on_event`` (on the reader thread), and ``on_exit(code)`` is called once,
    soon after it ends (negative code: killed by that signal). ``events=False``: its stdout is not read (a child
    that reports nothing); its exit is still noticed. Callbacks must return quickly and must not raise."""

    def __init__(self, argv: list[str], *, env: dict[str, str] | None = None, on_event: OnEvent | None = None,
                 on_exit: OnExit | None = None, events: bool = True, stdin: bool = True, name: str = "worker"):
        self.argv, self.env, self.name = argv, env, name
        self.on_event, self.on_exit = on_event, on_exit
        self.events, self.stdin = events, stdin
        self.work: str | None = None  # what the child works on (the caller's name for its job; None: a spare)
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        self._lock = threading.Lock()
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()  # messages the writer thread sends
        self._input_closed = False
        self._ended = threading.Event()

    def start(self) -> Child:
        """Start the process and its reader thread (nothing waits for the child to be ready)."""
        env = dict(os.environ if self.env is None else self.env)
        if self.events:
            env[EVENTS_ENV] = "stdout"
        with self._lock:
            self.proc = subprocess.Popen(
                self.argv, env=env, start_new_session=True,
                stdin=subprocess.PIPE if self.stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE if self.events else subprocess.DEVNULL,
            )
        threading.Thread(target=self._read, name=f"finetune-{self.name}-events", daemon=True).start()
        if self.proc.stdin is not None:
            threading.Thread(target=self._write, args=(self.proc.stdin,), name=f"finetune-{self.name}-input",
                             daemon=True).start()
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def poll(self) -> int | None:
        """None while it runs; its exit code once it ended."""
        return self.proc.poll() if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send(self, message: dict[str, Any]) -> bool:
        """Queue one message for the child's input (never waits for the child to read it, even while it still
        starts); False when it can take no more (it ended, or its input was closed)."""
        line = (json.dumps(message, separators=(",", ":")) + "\n").encode()
        with self._lock:
            if self.proc is None or not self.stdin or self._input_closed or self.returncode is not None:
                return False
            self._outbox.put(line)
            return True

    def close_input(self) -> None:
        """End the child's input once the messages sent before are written: a child waiting for work exits
        (see :meth:`Channel.messages`)."""
        with self._lock:
            if not self._input_closed:
                self._input_closed = True
                self._outbox.put(None)

    def _write(self, stdin: Any) -> None:
        """The writer thread: the queued messages to the child's input, in order, then end of input."""
        while (line := self._outbox.get()) is not None:
            try:
                stdin.write(line)
                stdin.flush()
            except (OSError, ValueError):  # it ended: what is left has nobody to read it
                with self._lock:
                    self._input_closed = True
                break
        try:
            stdin.close()
        except OSError:
            pass

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the child if it still runs."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait until the child ended and its exit was reported; its code, or None on timeout."""
        self._ended.wait(timeout)
        return self.returncode

    def stop(self, grace_s: float = 2.0) -> int | None:
        """SIGTERM, then SIGKILL if it still runs after ``grace_s``; waits until its end was reported."""
        self.signal(signal.SIGTERM)
        if self.wait(grace_s) is None:
            self.signal(signal.SIGKILL)
            self.wait(5.0)
        return self.returncode

    def _read(self) -> None:
        proc = self.proc
        assert proc is not None
        if proc.stdout is not None:
            self._read_events(proc)
        code = proc.wait()
        self.returncode = code
        self.close_input()
        if self.on_exit is not None:
            try:
                self.on_exit(code)
            except Exception:  # a callback's bug must not hide the next child's exit
                import traceback

                traceback.print_exc()
        self._ended.set()

    def _read_events(self, proc: subprocess.Popen) -> None:
        """Hand each line to ``on_event`` until the pipe closes or the process ended (whichever comes first: a
        grandchild may hold the pipe open after the child died)."""
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        pending = b""
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while True:
                if not selector.select(DEATH_POLL_S):
                    if proc.poll() is not None:
                        break
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                if len(pending) > _MAX_LINE:
                    lines.append(pending)
                    pending = b""
                for line in lines:
                    self._dispatch(line)
        if pending:
            self._dispatch(pending)
        proc.stdout.close()

    def _dispatch(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            if line.strip():  # a library's print: keep it where the child's other output goes
                sys.stderr.write(line.decode("utf-8", errors="replace") + "\n")
            return
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:
                import traceback

                traceback.print_exc()


# ---------------------------------------------------------------------------------------------- the child's side
class Channel:
    """The child's end of a :class:`Child`: :meth:`messages` reads its input, :meth:`send` writes events (from
    any thread). A parent gone means no error: events are then dropped, and input ends."""

    _current: Channel | None = None
    _opening = threading.Lock()

    def __init__(self, out_fd: int):
        self._out = os.fdopen(out_fd, "wb", buffering=0)
        self._lock = threading.Lock()
        self._broken = False

    @classmethod
    def open(cls) -> Channel:
        """This process's channel: stdout becomes the event pipe, and fd 1 (prints) goes to stderr."""
        with cls._opening:
            if cls._current is None:
                sys.stdout.flush()
                out = os.dup(1)
                os.dup2(2, 1)
                os.environ.pop(EVENTS_ENV, None)  # this process's own children report to nobody
                cls._current = cls(out)
            return cls._current

    @classmethod
    def current(cls) -> Channel | None:
        """The channel, when this process runs under a supervisor (opened at the first use); None otherwise."""
        if cls._current is None and os.environ.get(EVENTS_ENV) == "stdout":
            return cls.open()
        return cls._current

    def send(self, kind: str, **fields: Any) -> None:
        """Report one event (``{"kind": kind, **fields}``) to the parent; one write, so lines never interleave."""
        if self._broken:
            return
        line = (json.dumps({"kind": kind, **fields}, separators=(",", ":"), default=str) + "\n").encode()
        with self._lock:
            try:
                self._out.write(line)
            except (BrokenPipeError, OSError):  # the parent is gone: the work goes on, its files say the rest
                self._broken = True

    def messages(self) -> Iterator[dict[str, Any]]:
        """The parent's messages, until the end of input (the parent closed it, or died)."""
        for line in sys.stdin.buffer:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict):
                yield message


def notify(kind: str, **fields: Any) -> None:
    """Tell this process's supervisor (if any) that something changed; a no-op in an unsupervised process."""
    channel = Channel.current()
    if channel is not None:
        channel.send(kind, **fields)
