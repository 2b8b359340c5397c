"""tests/serve_process.py, the one way the tests and benchmarks start a server process and wait for it."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from serve_process import ServerNotUp, start_server, stop_server

from finetune.launch import free_port


def test_a_server_that_answers_is_up_and_stops(tmp_path: Path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], url,
                        tmp_path / "server.log", timeout_s=60)
    try:
        assert proc.poll() is None  # its 404 for /v1/hardware is an answer
    finally:
        stop_server(proc, timeout_s=10)
    assert proc.poll() is not None


def test_a_server_that_exits_is_one_line_naming_its_log(tmp_path: Path):
    log = tmp_path / "server.log"
    command = [sys.executable, "-c", "import sys; print('port 1 is taken'); sys.exit(3)"]
    with pytest.raises(ServerNotUp) as e:
        start_server(command, f"http://127.0.0.1:{free_port()}", log, timeout_s=60)
    message = str(e.value)
    assert "\n" not in message and "exited with 3" in message and str(log) in message, message
    assert message.endswith("port 1 is taken"), message


def test_a_server_that_never_answers_is_stopped_after_the_time_given(tmp_path: Path):
    log = tmp_path / "server.log"
    pid_file = tmp_path / "pid"
    command = [sys.executable, "-c", f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
                                     f"time.sleep(60)"]
    started = time.monotonic()
    with pytest.raises(ServerNotUp, match=r"did not answer /v1/hardware in 1 s; its log .*server\.log ends"):
        start_server(command, f"http://127.0.0.1:{free_port()}", log, timeout_s=1.0)
    assert time.monotonic() - started < 30
    from finetune.processes import process_alive

    assert not pid_file.exists() or not process_alive(int(pid_file.read_text()))


def test_only_loopback(tmp_path: Path):
    with pytest.raises(ValueError, match="not a loopback address"):
        start_server([sys.executable, "-c", "pass"], "http://example.com:8000", tmp_path / "server.log")
    assert not (tmp_path / "server.log").exists()
