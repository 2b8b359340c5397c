"""``finetune serve`` and ``finetune tokens`` as a user runs them: a real process, real signals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import assert_one_line_error
from serve_process import start_server, stop_server
from service import TLS

from finetune.cli import main
from finetune.launch import free_port
from finetune.registry import Registry
from finetune.registry.accounts import Accounts
from finetune.registry.jobs import Trainings


def test_tokens_create_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    root = str(tmp_path / "registry")
    assert main(["--registry", root, "tokens", "create", "alice", "--label", "laptop"]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("ft_") and len(token) > 40
    assert Accounts(Registry(root)).resolve(token).username == "alice"
    assert main(["--registry", root, "tokens", "list"]) == 0
    listing = capsys.readouterr().out
    assert "alice" in listing and "laptop" in listing and token not in listing
    token_id = Accounts(Registry(root)).list_tokens()[0].id
    assert main(["--registry", root, "tokens", "revoke", token_id]) == 0
    assert Accounts(Registry(root)).resolve(token) is None
    rc = main(["--registry", root, "tokens", "revoke", token_id])
    assert_one_line_error(rc, capsys.readouterr().err, "no token")
    rc = main(["--registry", root, "tokens", "create", "Not/Valid"])
    assert rc == 2


def test_the_server_imports_no_torch():
    code = "import sys, finetune.cli, finetune.app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_answers_then_stops_cleanly_on_a_signal(tmp_path: Path, sig: int):
    root = tmp_path / "registry"
    token = Accounts(Registry(root)).create_token("alice")
    port = free_port()
    url, log = f"http://127.0.0.1:{port}", tmp_path / "serve.log"
    env = {**os.environ, "FINETUNE_HOME": str(root)}
    proc = start_server([sys.executable, "-m", "finetune", "serve", "--port", str(port), "--no-access-log"], url,
                        log, probe="/v1/account", timeout_s=60, interval_s=0.05, env=env)
    try:
        r = httpx.get(f"{url}/v1/account", headers={"Authorization": f"Bearer {token}"}, verify=TLS)
        assert r.status_code == 200 and r.json()["username"] == "alice"
        proc.send_signal(sig)
        proc.wait(timeout=30)
    finally:
        stop_server(proc, timeout_s=0)
    out = log.read_text()
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "Shutting down" in out


def test_serve_refuses_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    root = str(tmp_path / "registry")
    rc = main(["--registry", root, "serve", "--allow-data-dir", str(tmp_path / "missing")])
    assert_one_line_error(rc, capsys.readouterr().err, "not a folder")
    rc = main(["--registry", root, "serve", "--max-upload-size", "lots"])
    assert_one_line_error(rc, capsys.readouterr().err, "invalid size")
    for flag, value, needle in (("--max-training-time", "forever", "not a duration"),
                                ("--max-training-time", "-5m", "not a duration"),
                                ("--max-trainings-per-account", "-1", "must be 0 (no limit) or more")):
        rc = main(["--registry", root, "serve", f"{flag}={value}"])
        assert_one_line_error(rc, capsys.readouterr().err, flag, needle)
        assert rc == 2


def test_serve_limits_have_defaults_and_0_lifts_them():
    from finetune.cli import build_parser
    from finetune.cli.serve import settings_from_args

    defaults = settings_from_args(build_parser().parse_args(["serve"]))
    assert (defaults.max_trainings_per_account, defaults.max_training_steps, defaults.max_training_time_s) == \
        (10, 100_000, 24 * 3600)
    chosen = settings_from_args(build_parser().parse_args(
        ["serve", "--max-trainings-per-account", "0", "--max-training-steps", "500", "--max-training-time", "90m"]))
    assert (chosen.max_trainings_per_account, chosen.max_training_steps, chosen.max_training_time_s) == \
        (None, 500, 5400)
    lifted = settings_from_args(build_parser().parse_args(["serve", "--max-training-time", "0"]))
    assert lifted.max_training_time_s is None


def test_generation_defaults_in_the_schema_match_inference():
    from finetune.inference import GenerationSettings
    from finetune.server.objects import GENERATION_DEFAULTS

    defaults = GenerationSettings()
    assert GENERATION_DEFAULTS == {k: getattr(defaults, k) for k in GENERATION_DEFAULTS}


# ---------------------------------------------------------------------------------------------- whose work
@pytest.fixture(scope="module")
def cli_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real `finetune train` run (long: it trains until stopped) on a registry no server serves yet:
    ``(registry, training id, process)``. Once it runs it is paused (SIGSTOP): it stays alive and leaves the
    CPU to the tests, and a signal sent to it stays pending, where :func:`_untouched` sees it."""
    from finetune.registry.sources import import_base
    from finetune.tiny import sample_data_path

    root = tmp_path_factory.mktemp("cli-run") / "registry"
    reg = Registry(root)
    base = import_base(reg, "base/x", str(tiny_model_dir), visibility="public")
    config = root.parent / "long.yaml"
    config.write_text(f"base_model: {base.ref}\ndata:\n  path: {sample_data_path()}\n  max_seq_len: 128\n"
                      f"train:\n  max_steps: 100000\n  batch_size: 4\n")
    env = {**_serve_env(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "finetune", "train", str(config), "--destination", "alice/cli",
                             "--create-destination", "--quiet"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            records = Trainings(reg).list()
            if records and records[0].status == "processing":
                break
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the CLI run did not start"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGSTOP)
        yield reg, records[0].id, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _serve_env(root: Path) -> dict[str, str]:
    return {**os.environ, "FINETUNE_HOME": str(root), "FINETUNE_FSYNC": "0"}


def _serve(root: Path, port: int) -> subprocess.CompletedProcess:
    """`finetune serve` that is expected not to start: it must end by itself (within the timeout)."""
    return subprocess.run([sys.executable, "-m", "finetune", "serve", "--port", str(port), "--no-access-log"],
                          env=_serve_env(root), capture_output=True, text=True, timeout=60)


def _pending_signals(pid: int) -> set[int]:
    """The signals sent to a paused process that wait for it to continue (Linux: /proc/PID/status)."""
    pending = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("SigPnd:", "ShdPnd:")):
            pending |= int(line.split()[1], 16)
    return {sig for sig in range(1, 65) if pending >> (sig - 1) & 1}


def _untouched(reg: Registry, training_id: str, proc: subprocess.Popen) -> None:
    record = Trainings(reg).get(training_id)
    assert proc.poll() is None, "the CLI run ended"
    assert signal.SIGTERM not in _pending_signals(proc.pid), "the CLI run was sent SIGTERM"
    assert record.status == "processing" and record.pid == proc.pid and record.runner is None


def test_a_busy_port_is_one_line_and_touches_no_training(cli_run) -> None:
    reg, training_id, proc = cli_run
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = _serve(reg.root, port)
    assert out.returncode == 1 and out.stdout == "", out.stdout + out.stderr  # 1: "otherwise" in the README
    assert_one_line_error(None, out.stderr, f"port {port} on 127.0.0.1 is already in use", "--port")
    time.sleep(0.3)
    _untouched(reg, training_id, proc)


def test_a_server_leaves_cli_runs_alone_and_a_second_server_is_refused(cli_run, fake_executor) -> None:
    """Server 1 adopts the run a previous server's queue started (a stand-in process), never the CLI run; a second
    server on the registry is refused in one line naming the first, touching nothing; stopping server 1 stops
    its own run only. Then `trainings cancel` stops the real CLI run, found by its pid and start mark."""
    from service import running_server

    from finetune.processes import start_mark
    from finetune.registry.jobs import TrainingRecord, new_record_id

    reg, training_id, proc = cli_run
    queue_run = subprocess.Popen(["sleep", "60"])
    try:
        adopted = Trainings(reg).create(TrainingRecord(
            id=new_record_id(), destination="alice/cli", source="api", status="processing", pid=queue_run.pid,
            pid_mark=start_mark(queue_run.pid), runner="queue"))
        with running_server(reg) as server:
            assert server.app.state.trainings.queue.running() == [adopted.id]
            out = _serve(reg.root, free_port())
            assert out.returncode == 1 and out.stdout == "", out.stdout + out.stderr
            assert_one_line_error(None, out.stderr, f"{reg.root} is already served by process {os.getpid()} "
                                                    f"at {server.url}", "one server per registry")
            time.sleep(0.3)
            assert queue_run.poll() is None and Trainings(reg).get(adopted.id).status == "processing"
            _untouched(reg, training_id, proc)
        assert queue_run.wait(timeout=10) == -signal.SIGTERM  # the server's own run: stopped, queued again
        assert Trainings(reg).get(adopted.id).status == "starting"
        time.sleep(0.3)
        _untouched(reg, training_id, proc)
    finally:
        if queue_run.poll() is None:
            queue_run.kill()
        queue_run.wait()
    assert main(["--registry", str(reg.root), "trainings", "cancel", training_id]) == 0
    assert signal.SIGTERM in _pending_signals(proc.pid)
    os.kill(proc.pid, signal.SIGCONT)
    assert proc.wait(timeout=120) == 130
    assert Trainings(reg).get(training_id).status == "canceled"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # uvicorn's exit, in its thread
def test_a_start_that_fails_leaves_the_runs_it_adopted_alone(tmp_path: Path, fake_executor,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A service after the queue fails to start (here: the inference workers): the run the queue adopted from a
    previous server is left running, its record as it was, and the registry's server lock is given back."""
    from service import running_server

    from finetune.processes import start_mark
    from finetune.registry.jobs import TrainingRecord, new_record_id
    from finetune.server import app as app_module

    class Broken:
        def start(self) -> None:
            raise RuntimeError("no device for the inference workers")

        def stop(self) -> None:
            pass

    reg = Registry(tmp_path / "registry")
    queue_run = subprocess.Popen(["sleep", "60"])
    try:
        record = Trainings(reg).create(TrainingRecord(
            id=new_record_id(), destination="alice/y", source="api", status="processing", pid=queue_run.pid,
            pid_mark=start_mark(queue_run.pid), runner="queue"))
        with monkeypatch.context() as patch:
            patch.setattr(app_module, "_prediction_service", lambda *args: Broken())
            with pytest.raises(RuntimeError, match="did not start"), running_server(reg):
                pass
        time.sleep(0.3)
        assert queue_run.poll() is None and Trainings(reg).get(record.id).status == "processing"
        with running_server(reg) as server:  # the lock was given back; this one adopts the run
            assert server.app.state.trainings.queue.running() == [record.id]
    finally:
        if queue_run.poll() is None:
            queue_run.kill()
        queue_run.wait()
