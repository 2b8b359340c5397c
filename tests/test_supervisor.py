"""The one supervisor of worker processes (finetune.supervisor): start, messages, events, exits, stop, spares."""

from __future__ import annotations

import signal
import sys
import threading
import time

from finetune.supervisor import Child, describe_exit

# A child that echoes each message as an event, prints a stray line (a library's print), and dies on "die".
_ECHO = """
import os, sys
from finetune.supervisor import Channel
channel = Channel.open()
print("a library's print")
channel.send("ready", pid=os.getpid())
for message in channel.messages():
    if message.get("op") == "die":
        os._exit(int(message["code"]))
    channel.send("echo", message=message)
"""


class Recorder:
    def __init__(self) -> None:
        self.events: list[dict] = []
        self.exits: list[int] = []
        self.changed = threading.Condition()

    def event(self, event: dict) -> None:
        with self.changed:
            self.events.append(event)
            self.changed.notify_all()

    def exit(self, code: int) -> None:
        with self.changed:
            self.exits.append(code)
            self.changed.notify_all()

    def wait_for(self, test, timeout: float = 20.0) -> None:
        with self.changed:
            assert self.changed.wait_for(test, timeout), (self.events, self.exits)


def _echo(recorder: Recorder) -> Child:
    return Child([sys.executable, "-c", _ECHO], on_event=recorder.event, on_exit=recorder.exit, name="test")


def test_messages_in_events_out_and_the_exit_reported_with_its_reason() -> None:
    recorder = Recorder()
    child = _echo(recorder).start()
    assert child.send({"op": "hello", "n": 1})
    recorder.wait_for(lambda: any(e["kind"] == "echo" for e in recorder.events))
    assert recorder.events[0]["kind"] == "ready" and recorder.events[0]["pid"] == child.pid
    assert [e["message"] for e in recorder.events if e["kind"] == "echo"] == [{"op": "hello", "n": 1}]
    child.send({"op": "die", "code": 3})
    recorder.wait_for(lambda: recorder.exits)
    assert recorder.exits == [3] and child.poll() == 3 and describe_exit(3) == "exited with code 3"
    assert not child.send({"op": "hello"})  # nobody reads any more: refused, no error


def test_a_killed_child_is_noticed_promptly_and_says_by_what() -> None:
    recorder = Recorder()
    child = _echo(recorder).start()
    recorder.wait_for(lambda: recorder.events)
    killed = time.monotonic()
    child.signal(signal.SIGKILL)
    recorder.wait_for(lambda: recorder.exits, timeout=5)
    assert time.monotonic() - killed < 1.0
    assert recorder.exits == [-signal.SIGKILL] and describe_exit(recorder.exits[0]) == "was killed by SIGKILL"


def test_end_of_input_ends_a_waiting_child() -> None:
    """A spare that is not needed (or whose parent died: its input closes too) exits by itself."""
    recorder = Recorder()
    child = _echo(recorder).start()
    child.close_input()
    assert child.wait(20) == 0 and recorder.exits == [0]


def test_stop_terminates_then_kills_after_the_grace_period() -> None:
    stubborn = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "print('{\"kind\": \"up\"}', flush=True); time.sleep(60)")
    recorder = Recorder()
    child = Child([sys.executable, "-c", stubborn], on_event=recorder.event, on_exit=recorder.exit).start()
    recorder.wait_for(lambda: recorder.events)
    started = time.monotonic()
    assert child.stop(grace_s=0.3) == -signal.SIGKILL
    assert 0.3 <= time.monotonic() - started < 3


def test_a_spare_started_ahead_is_ended_at_once_while_it_imports() -> None:
    """A spare still importing (here: sleeping) is ended by SIGTERM at once, without waiting for its imports."""
    recorder = Recorder()
    child = Child([sys.executable, "-c", "import time; time.sleep(30)"], on_exit=recorder.exit).start()
    time.sleep(0.2)
    started = time.monotonic()
    assert child.stop(grace_s=2) == -signal.SIGTERM
    assert time.monotonic() - started < 1.0


def test_a_child_runs_in_a_session_of_its_own() -> None:
    """Ctrl-C in the server's terminal reaches the server, not its workers."""
    import os

    child = Child([sys.executable, "-c", "import time; time.sleep(30)"], events=False).start()
    try:
        assert os.getsid(child.pid) == child.pid != os.getsid(0)
    finally:
        child.stop(0.5)


def test_a_child_whose_parent_dies_exits_by_itself(tmp_path) -> None:
    """The server killed (SIGKILL, out of memory): its waiting worker sees its input end and exits, orphaned."""
    import json
    import os
    import subprocess

    parent = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from finetune.supervisor import Child
child = Child([sys.executable, "-c", {_ECHO!r}]).start()
print(child.pid, flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        pid = json.loads(parent.stdout.readline())
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError("the orphaned child still runs")
    finally:
        if parent.poll() is None:
            parent.kill()


def test_sending_never_waits_for_a_child_that_still_starts() -> None:
    """A request is never held while a worker imports its libraries: a megabyte of messages (far over a pipe's
    buffer) is queued at once, and the child reads it all, in order, once it reads."""
    recorder = Recorder()
    slow = "import time; time.sleep(1.5)\n" + _ECHO
    child = Child([sys.executable, "-c", slow], on_event=recorder.event, on_exit=recorder.exit).start()
    started = time.monotonic()
    for n in range(8):
        assert child.send({"op": "big", "n": n, "text": "x" * 128 * 1024})
    assert time.monotonic() - started < 0.5
    recorder.wait_for(lambda: sum(e["kind"] == "echo" for e in recorder.events) == 8, timeout=30)
    assert [e["message"]["n"] for e in recorder.events if e["kind"] == "echo"] == list(range(8))
    child.close_input()
    assert child.wait(20) == 0
