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

from finetune.cli import main
from finetune.registry import Registry
from finetune.registry.accounts import Accounts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    code = "import sys, finetune.cli, finetune.server.app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_answers_then_stops_cleanly_on_a_signal(tmp_path: Path, sig: int):
    root = tmp_path / "registry"
    token = Accounts(Registry(root)).create_token("alice")
    port = free_port()
    env = {**os.environ, "FINETUNE_HOME": str(root)}
    proc = subprocess.Popen([sys.executable, "-m", "finetune", "serve", "--port", str(port), "--no-access-log"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/v1/account", headers={"Authorization": f"Bearer {token}"})
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
                time.sleep(0.05)
        assert r.status_code == 200 and r.json()["username"] == "alice"
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "Shutting down" in out


def test_serve_refuses_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    root = str(tmp_path / "registry")
    rc = main(["--registry", root, "serve", "--allow-data-dir", str(tmp_path / "missing")])
    assert_one_line_error(rc, capsys.readouterr().err, "not a folder")
    rc = main(["--registry", root, "serve", "--max-upload-size", "lots"])
    assert_one_line_error(rc, capsys.readouterr().err, "invalid size")


def test_generation_defaults_in_the_schema_match_inference():
    from finetune.inference import GenerationSettings
    from finetune.server.objects import GENERATION_DEFAULTS

    defaults = GenerationSettings()
    assert GENERATION_DEFAULTS == {k: getattr(defaults, k) for k in GENERATION_DEFAULTS}
