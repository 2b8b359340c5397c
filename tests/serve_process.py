"""A server (``finetune serve``) in a process of its own, for the tests and the benchmarks (scripts/bench_*.py):
:func:`start_server` starts it and waits until it answers, :func:`wait_until_up` only waits, :func:`stop_server`
stops it. Loopback only; the wait is bounded in time and in tries, and a server that does not come up ends the
wait with one line that names its log (and quotes the log's last line).

Not collected by pytest.
"""

from __future__ import annotations

import http.client
import ipaddress
import math
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

# No proxy: the server is on this machine, and an http_proxy in the environment must not see the requests.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerNotUp(SystemExit):
    """The server exited or did not answer in time. A ``SystemExit``: a benchmark that meets it ends with its
    one line (exit status 1), as it would with ``raise SystemExit(...)``."""


def _check_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"{url}: not a loopback address (the servers these helpers start answer on 127.0.0.1)")


def _last_line(log: Path) -> str:
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1].strip()[-300:] if lines else "(empty)"


def _answers(url: str, headers: Mapping[str, str], timeout_s: float) -> bool:
    """Whether ``url`` answers without a server error (a 401 or 404 is an answer: the server is up)."""
    try:
        with _OPENER.open(urllib.request.Request(url, headers=dict(headers)), timeout=timeout_s) as response:
            return response.status < 500
    except urllib.error.HTTPError as e:
        return e.code < 500
    except (OSError, http.client.HTTPException):  # refused, reset, timed out, half an answer: not up yet
        return False


def wait_until_up(proc: subprocess.Popen, url: str, log: Path, *, probe: str = "/v1/hardware",
                  headers: Mapping[str, str] | None = None, timeout_s: float = 180.0,
                  interval_s: float = 0.2) -> None:
    """Wait until ``GET url+probe`` answers (below 500); raise :class:`ServerNotUp` naming ``log`` if ``proc``
    exits first, or after ``timeout_s`` seconds or ``timeout_s / interval_s`` tries."""
    _check_loopback(url)
    deadline = time.monotonic() + timeout_s
    for _ in range(max(1, math.ceil(timeout_s / interval_s))):
        if proc.poll() is not None:
            raise ServerNotUp(f"the server at {url} exited with {proc.returncode}; its log {log} ends: "
                              f"{_last_line(log)}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        if _answers(url + probe, headers or {}, min(2.0, remaining)):
            return
        time.sleep(interval_s)
    raise ServerNotUp(f"the server at {url} did not answer {probe} in {timeout_s:.0f} s; its log {log} ends: "
                      f"{_last_line(log)}")


def start_server(command: Sequence[str], url: str, log: Path, *, probe: str = "/v1/hardware",
                 headers: Mapping[str, str] | None = None, timeout_s: float = 180.0, interval_s: float = 0.2,
                 output: str = "all", env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """Run ``command`` (a server that listens at ``url``) in a session of its own and wait until it answers
    (:func:`wait_until_up` with ``probe``, ``headers``, ``timeout_s``, ``interval_s``); its process. Its output
    is appended to ``log``: stdout and stderr (``output="all"``), or stderr only (``output="errors"``: stdout, an
    access log, is dropped). A server that does not come up is stopped before :class:`ServerNotUp` is raised."""
    _check_loopback(url)
    if output not in ("all", "errors"):
        raise ValueError(f"output: 'all' or 'errors', not {output!r}")
    with open(log, "a") as out:
        proc = subprocess.Popen(list(command), stdout=out if output == "all" else subprocess.DEVNULL,
                                stderr=subprocess.STDOUT if output == "all" else out, start_new_session=True,
                                env=None if env is None else dict(env))
    try:
        wait_until_up(proc, url, log, probe=probe, headers=headers, timeout_s=timeout_s, interval_s=interval_s)
    except BaseException:
        stop_server(proc)
        raise
    return proc


def stop_server(proc: subprocess.Popen | None, timeout_s: float = 60.0, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` (SIGTERM: a graceful stop) to a server still running, wait ``timeout_s`` seconds for it, then
    kill it."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

