"""Housekeeping and hand edits: damage stays local, concurrent housekeeping is quiet, small rules hold.

One damaged ``model.json`` or ``aliases.json`` is named with the way out and never hides the rest; two
``registry gc`` or two deletions of one version at once end without a traceback; options that would remove
more than asked, ignore a setting or print raw control characters are refused or escaped.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from filelock import FileLock
from helpers import assert_one_line_error

from finetune.cli import main
from finetune.registry import Registry

HUB = {"hub_id": "o/base", "revision": "0" * 40}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    """o/m with versions 1-3 (adapters on a hub base), and o/n with one."""
    reg = Registry(tmp_path / "registry")
    src = tmp_path / "src"
    src.mkdir()
    (src / "adapter_config.json").write_text("{}")
    for name in ("o/m", "o/n"):
        reg.create_model(name, description=f"model {name}")
    for _ in range(3):
        reg.publish("o/m", src, parent=HUB)
    reg.publish("o/n", src, parent=HUB)
    return reg


def cli(capsys: pytest.CaptureFixture[str], reg: Registry, *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(["--registry", str(reg.root), *argv])
    except SystemExit as exit_:
        rc = exit_.code
    out, err = capsys.readouterr()
    return rc, out, err


def spawn(reg: Registry, *argv: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "finetune", "--registry", str(reg.root), *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


# ---------------------------------------------------------------- damaged files written by hand
@pytest.mark.parametrize("content", [b"{not json", b'["o", "m"]', b'{"owner": "o", "name": "other"}'],
                         ids=["invalid-json", "a-list", "wrong-name"])
def test_one_damaged_model_json_is_listed_apart_and_gc_rebuilds_it(reg: Registry, capsys, content: bytes) -> None:
    damaged = reg.get_model("o/m").path / "model.json"
    damaged.write_bytes(content)
    rc, out, err = cli(capsys, reg, "models", "list")
    assert rc == 0 and "o/n" in out and "o/m " not in out
    assert_one_line_error(None, err.replace("finetune: warning: ", "finetune: error: "), str(damaged),
                          "is damaged", "registry gc")
    rc, out, err = cli(capsys, reg, "registry", "gc")
    assert (rc, err) == (0, "") and f"rebuilt {damaged}" in out
    assert (damaged.parent / "model.json.damaged").read_bytes() == content  # kept, to recover what it said
    m = reg.get_model("o/m")
    assert (m.visibility, m.description) == ("private", "")
    assert [v.number for v in reg.list_versions("o/m")] == [3, 2, 1]
    rc, out, err = cli(capsys, reg, "models", "list")
    assert rc == 0 and err == "" and "o/m " in out


@pytest.mark.parametrize("content, needle", [
    (b"[1, 2]", "holds a JSON list, not an object"),
    (b'{"prod": ', "is not valid JSON"),
    (b'{"prod": "two"}', "alias 'prod' points at \"two\""),
], ids=["a-list", "invalid-json", "not-a-number"])
def test_a_malformed_aliases_file_is_one_line_with_the_way_out(reg: Registry, capsys, content: bytes,
                                                               needle: str) -> None:
    (reg.get_model("o/m").path / "aliases.json").write_bytes(content)
    for argv in (["versions", "alias", "o/m:1", "prod"], ["versions", "delete", "o/m:1"],
                 ["models", "show", "o/m"], ["versions", "show", "o/m:prod"]):
        rc, _, err = cli(capsys, reg, *argv)
        assert_one_line_error(rc, err, "aliases.json", needle, "remove it to drop every alias")
    assert [v.number for v in reg.list_versions("o/m")] == [3, 2, 1]


def test_an_alias_written_as_a_string_still_protects_its_version(reg: Registry, capsys) -> None:
    (reg.get_model("o/m").path / "aliases.json").write_text('{"prod": "2"}')
    assert reg.resolve("o/m:prod").number == 2
    rc, _, err = cli(capsys, reg, "versions", "delete", "o/m:2")
    assert_one_line_error(rc, err, "o/m:2 has aliases: prod")
    assert reg.version("o/m", 2) is not None


# ---------------------------------------------------------------- concurrent housekeeping
def test_two_gc_at_once_are_quiet(reg: Registry) -> None:
    for round_ in range(2):
        for i in range(30):  # leftovers of dead processes of this host: every gc removes them at once
            folder = reg.root / ".trash" / f"version-99999{round_}{i:02d}-0a0b0c0d@{socket.gethostname()}"
            for j in range(20):
                (folder / f"d{j}").mkdir(parents=True)
                (folder / f"d{j}" / "f").write_bytes(b"x")
        runs = [spawn(reg, "registry", "gc") for _ in range(3)]
        results = [(p.wait(timeout=120), *p.communicate()) for p in runs]
        for rc, _, err in results:
            assert (rc, err) == (0, ""), err
        assert list((reg.root / ".trash").iterdir()) == []


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _wait_until_idle(pids: list[int], timeout: float = 90.0) -> None:
    """Wait until every process has stopped using the CPU: started, imported, and now waiting (on the lock)."""
    deadline = time.monotonic() + timeout
    last = {pid: -1 for pid in pids}
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = {pid: _cpu_ticks(pid) for pid in pids}
        if all(now[pid] == last[pid] and now[pid] > 0 for pid in pids):
            return
        last = now
    raise AssertionError("the deleting processes never came to wait on the model's lock")


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs /proc to see the processes wait")
def test_two_deletions_of_one_version_at_once(reg: Registry) -> None:
    with FileLock(str(reg.get_model("o/m").path / ".lock")):  # both resolve the version, then wait here
        runs = [spawn(reg, "versions", "delete", "o/m:2") for _ in range(2)]
        _wait_until_idle([p.pid for p in runs])
    results = sorted((p.wait(timeout=60), *p.communicate()) for p in runs)
    assert results[0][:2] == (0, "deleted o/m:2\n")
    # "just now": the second resolved the version before the first deleted it, and found it gone under the lock
    assert_one_line_error(results[1][0], results[1][2], "version o/m:2 not found (deleted just now)")
    assert [v.number for v in reg.list_versions("o/m")] == [3, 1]


# ---------------------------------------------------------------- small rules
@pytest.mark.parametrize("value", ["nan", "-1", "-0.5"])
def test_gc_older_than_must_be_a_real_age(reg: Registry, capsys, value: str) -> None:
    leftover = reg.root / ".staging" / "publish-1-0a0b0c0d@another-host"  # another host's publish in progress
    leftover.mkdir(parents=True)
    rc, _, err = cli(capsys, reg, "registry", "gc", "--older-than", value)
    assert rc == 2
    assert_one_line_error(rc, err, "--older-than must be a number of hours, 0 or more")
    assert leftover.exists()


def test_alias_remove_with_a_version_removes_only_an_alias_pointing_there(reg: Registry, capsys) -> None:
    reg.set_alias("o/m:1", "prod")
    rc, _, err = cli(capsys, reg, "versions", "alias", "o/m:2", "prod", "--remove")
    assert_one_line_error(rc, err, "alias 'prod' points at o/m:1, not o/m:2")
    assert reg.aliases("o/m") == {"prod": 1}
    assert cli(capsys, reg, "versions", "alias", "o/m:1", "prod", "--remove")[:2] == (0, "removed alias prod\n")
    reg.set_alias("o/m:3", "prod")
    assert cli(capsys, reg, "versions", "alias", "o/m", "prod", "--remove")[0] == 0  # the model alone: any
    assert reg.aliases("o/m") == {}


def test_create_exist_ok_refuses_other_settings(reg: Registry, capsys) -> None:
    before = reg.get_model("o/m").to_dict()
    rc, _, err = cli(capsys, reg, "models", "create", "o/m", "--exist-ok", "--visibility", "public",
                     "--hardware", "gpu")
    assert_one_line_error(rc, err, "o/m exists with other settings", 'visibility is "private", not "public"',
                          'hardware is "auto", not "gpu"')
    assert reg.get_model("o/m").to_dict() == before
    assert cli(capsys, reg, "models", "create", "o/m", "--exist-ok")[:2] == (0, "model o/m ready\n")
    assert cli(capsys, reg, "models", "create", "o/m", "--exist-ok", "--description", "model o/m")[0] == 0


def test_descriptions_are_printed_escaped(reg: Registry, capsys) -> None:
    rc, _, _ = cli(capsys, reg, "models", "create", "o/x", "--description", "\x1b[31mred\x1b[0m\nsecond line\r")
    assert rc == 0
    for argv in (["models", "list"], ["models", "show", "o/x"]):
        rc, out, _ = cli(capsys, reg, *argv)
        assert rc == 0 and "\x1b" not in out and "\r" not in out
        assert "\\x1b[31mred\\x1b[0m\\nsecond line\\r" in out
        assert not any(line.startswith("second line") for line in out.splitlines())


def test_export_into_an_empty_name_is_refused(reg: Registry, capsys, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    for out_dir in ("", "  "):
        rc, _, err = cli(capsys, reg, "export", "o/m:1", out_dir)
        assert_one_line_error(rc, err, "the export folder is empty")
    assert list(here.iterdir()) == []


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_predict_refuses_a_temperature_that_is_not_finite(reg: Registry, capsys, value: str) -> None:
    rc, _, err = cli(capsys, reg, "predict", "o/m:1", "hello", f"--temperature={value}")
    assert_one_line_error(rc, err, "--temperature: must be a finite number")
    assert rc == 2


def test_a_token_label_that_is_not_utf8_is_refused(reg: Registry, capsys) -> None:
    from finetune.registry.accounts import Accounts

    rc, _, err = cli(capsys, reg, "tokens", "create", "alice", "--label", "caf\udce9")
    assert_one_line_error(rc, err, "the label is not UTF-8 text (byte e9")
    assert Accounts(reg).list_tokens() == []
    assert not (reg.accounts_dir() / "alice.json").exists()
