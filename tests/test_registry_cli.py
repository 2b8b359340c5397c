"""The registry's command line: models, versions and registry commands, their output, exit codes and errors.

Most cases call ``finetune.cli.main`` in-process; a few run ``python -m finetune`` as a real subprocess.
Every error case checks the exit code (2: malformed input; 1: everything else), that stderr is one line, and
that the registry (and the sources beside it) are byte-for-byte unchanged afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_one_line_error, snapshot

from finetune.cli import main
from finetune.errors import ModelLoadError
from finetune.registry import MANIFEST, Registry, sources


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "registry"


@pytest.fixture
def hf_folder(tmp_path: Path) -> Path:
    """A local folder shaped like save_pretrained output, plus a .git folder that must not be imported."""
    d = tmp_path / "hf-model"
    (d / ".git").mkdir(parents=True)
    (d / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (d / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}')
    (d / "model.safetensors").write_bytes(os.urandom(4096))
    (d / "tokenizer.json").write_text('{"version": "1.0"}')  # an import without a tokenizer is refused
    (d / "tokenizer").mkdir()
    (d / "tokenizer" / "tokenizer.json").write_text('{"version": "1.0"}')
    return d


@pytest.fixture
def populated(root: Path, tmp_path: Path) -> Registry:
    """o/m with two versions (2 derives from 1), an empty model o/empty."""
    reg = Registry(root)
    reg.create_model("o/m", description="demo")
    reg.create_model("o/empty")
    src = tmp_path / "src"
    src.mkdir()
    (src / "adapter_config.json").write_text("{}")
    (src / "w.bin").write_bytes(b"\x00" * 100)
    hub = {"hub_id": "o/base", "revision": "0" * 40}  # an adapter names its base
    v1 = reg.publish("o/m", src, parent=hub, metadata={"metrics": {"train_loss": 1.5}})
    reg.publish("o/m", src, parent=v1, metadata={"metrics": {"train_loss": 0.75, "eval_loss": 0.5}})
    return reg


def cli(capsys: pytest.CaptureFixture[str], root: Path, *argv: str) -> tuple[int, str, str]:
    """Run the CLI in-process; argparse's own errors exit through SystemExit, caught here."""
    try:
        rc = main(["--registry", str(root), *argv])
    except SystemExit as exit_:
        rc = exit_.code
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------ happy paths
def test_models_commands(capsys, root: Path, populated: Registry) -> None:
    rc, out, _ = cli(capsys, root, "models", "create", "o/new", "--description", "fresh", "--hardware", "cpu")
    assert (rc, out) == (0, "created o/new\n")
    rc, out, _ = cli(capsys, root, "models", "create", "o/new", "--exist-ok")
    assert (rc, out) == (0, "model o/new ready\n")

    rc, out, _ = cli(capsys, root, "models", "list")
    lines = out.splitlines()
    assert rc == 0 and lines[0].split() == ["MODEL", "VERSIONS", "LATEST", "VISIBILITY", "HARDWARE", "DESCRIPTION"]
    assert [line.split()[:3] for line in lines[1:]] == [
        ["o/empty", "0", "-"], ["o/m", "2", "o/m:2"], ["o/new", "0", "-"]
    ]

    rc, out, _ = cli(capsys, root, "models", "show", "o/m", "--json")
    info = json.loads(out)
    assert rc == 0 and (info["versions"], info["latest"], info["description"]) == (2, "o/m:2", "demo")

    rc, out, _ = cli(capsys, root, "models", "delete", "o/new")
    assert (rc, out) == (0, "deleted o/new\n")
    assert [m.full_name for m in populated.list_models()] == ["o/empty", "o/m"]


def test_versions_commands(capsys, root: Path, populated: Registry) -> None:
    rc, out, _ = cli(capsys, root, "versions", "list", "o/m")
    rows = [line.split() for line in out.splitlines()]
    assert rc == 0 and rows[0][:3] == ["N", "ID", "CREATED"]
    assert [r[0] for r in rows[1:]] == ["2", "1"]
    assert "train_loss=0.7500" in out and "o/m:1" in out  # metrics and parent columns

    rc, out, _ = cli(capsys, root, "versions", "list", "o/m", "--limit", "1", "--json")
    listed = json.loads(out)
    assert rc == 0 and [v["ref"] for v in listed] == ["o/m:2"] and listed[0]["parent"]["ref"] == "o/m:1"

    rc, out, _ = cli(capsys, root, "versions", "show", "o/m", "--json")
    assert rc == 0 and json.loads(out)["id"] == populated.resolve("o/m:2").id

    rc, out, _ = cli(capsys, root, "versions", "verify", "o/m:1")
    assert rc == 0 and out.startswith("o/m:1: ok (2 files")

    assert cli(capsys, root, "versions", "alias", "o/m:1", "prod")[:2] == (0, "o/m:prod -> o/m:1\n")
    assert populated.resolve("o/m:prod").number == 1
    assert cli(capsys, root, "versions", "alias", "o/m", "prod", "--remove")[:2] == (0, "removed alias prod\n")
    assert populated.aliases("o/m") == {}

    rc, _, err = cli(capsys, root, "versions", "delete", "o/m")  # "the newest one" must be asked for as such
    assert_one_line_error(rc, err, "o/m names no version explicitly", "--latest")
    assert rc == 2 and populated.resolve("o/m").number == 2
    assert cli(capsys, root, "versions", "delete", "o/m", "--latest")[:2] == (0, "deleted o/m:2\n")
    assert cli(capsys, root, "versions", "delete", "o/m:1")[:2] == (0, "deleted o/m:1\n")
    rc, out, _ = cli(capsys, root, "versions", "list", "o/m")
    assert (rc, out) == (0, "o/m has no versions yet\n")


def test_registry_gc_command(capsys, root: Path, populated: Registry) -> None:
    leftover = root / ".staging" / "publish-4206969-00000000@elsewhere"
    leftover.mkdir()
    rc, out, _ = cli(capsys, root, "registry", "gc", "--older-than", "0", "--dry-run")
    assert rc == 0 and out.splitlines()[-1].startswith("would remove 1 leftover in") and leftover.exists()
    rc, out, _ = cli(capsys, root, "registry", "gc", "--older-than", "0")
    assert rc == 0 and f"removed {leftover}" in out and not leftover.exists()


def test_import_local_folder_copies_it_with_checksums(capsys, root: Path, hf_folder: Path) -> None:
    rc, out, err = cli(capsys, root, "models", "import", "o/base", "--from", str(hf_folder))
    assert (rc, out, err) == (0, "o/base:1\n", "")
    reg = Registry(root)
    v = reg.resolve("o/base")
    assert v.kind == "base" and v.parent == {"local_path": str(hf_folder)}
    expected = {}
    for rel in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer/tokenizer.json"):
        data = (hf_folder / rel).read_bytes()
        expected[rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert v.manifest["files"] == expected  # .git is not part of the model
    assert reg.verify(v) == []
    assert list((root / ".staging").iterdir()) == []


def test_import_hub_id_records_the_resolved_revision(capsys, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_resolve(repo_id: str, revision: str | None = None) -> str:
        calls.append((repo_id, revision))
        return "0123456789abcdef" * 2 + "01234567"

    files = {"model.safetensors": {"size": 3, "sha256": "ab" * 32}}
    monkeypatch.setattr(sources, "resolve_hub_revision", fake_resolve)
    monkeypatch.setattr(sources, "hub_files", lambda repo_id, revision: calls.append(("fetch", revision)) or files)
    rc, out, err = cli(capsys, root, "models", "import", "o/hub", "--from", "org/tiny-llama", "--revision", "v1.0")
    assert (rc, out, err) == (0, "o/hub:1\n", "")
    sha = fake_resolve("x")
    assert calls == [("org/tiny-llama", "v1.0"), ("fetch", sha), ("x", None)]
    v = Registry(root).resolve("o/hub:1")
    assert v.parent == {"hub_id": "org/tiny-llama", "revision": sha}
    # the files loading reads were fetched at import and hashed: every later load is checked against them
    assert v.metadata["source"] == {"type": "hub", "repo_id": "org/tiny-llama", "revision": sha, "files": files}
    assert v.kind == "base" and v.manifest["files"] == {}


# ------------------------------------------------------------------ errors
BAD_INPUT = [
    # (argv, exit code, fragment of the error)
    (["models", "create", "Bad/x"], 2, "[a-z0-9_][a-z0-9._-]{0,63}"),
    (["models", "create", "o/" + "a" * 65], 2, "invalid model name"),
    (["models", "create", "o/../../etc"], 2, "invalid model name"),
    (["versions", "list", "/abs/path"], 2, "invalid model name"),
    (["versions", "list", "/abs"], 2, "invalid owner ''"),
    (["versions", "show", "o/m:??"], 2, "cannot read version selector"),
    (["versions", "show", "o/m:0"], 2, "numbers start at 1"),
    (["versions", "show", "o/m:" + "9" * 300], 2, "cannot read version selector"),
    (["versions", "list", "o/m", "--limit", "-1"], 2, "--limit"),
    (["versions", "alias", "o/m:1", "latest"], 2, "reserved"),
    (["versions", "alias", "o/m:1", "deadbeef"], 2, "version id prefix"),
    (["versions", "list", "o/none"], 1, "model o/none not found"),
    (["versions", "show", "o/m:9"], 1, "version o/m:9 not found"),
    (["versions", "verify", "o/m:prod"], 1, "no alias 'prod'"),
    (["versions", "show", "o/empty"], 1, "has no versions yet"),
    (["models", "create", "o/m"], 1, "already exists"),
    (["models", "delete", "o/m"], 1, "still has versions"),
    (["models", "delete", "o/none"], 1, "not found"),
    (["versions", "delete", "o/m:1"], 1, "parent of o/m:2"),
    (["versions", "alias", "o/m", "prod", "--remove"], 1, "no alias 'prod'"),
    (["models", "import", "o/new", "--from", "{tmp}/missing"], 1, "missing"),
    (["models", "import", "o/new", "--from", "{tmp}/src/w.bin"], 1, "not a Hugging Face model folder"),
    (["models", "import", "o/new", "--from", "{tmp}/src"], 1, "no config.json"),
    (["models", "import", "o/m", "--from", "{tmp}/hf-model"], 1, "already has versions"),
    (["models", "import", "o/new", "--from", "not a path or id"], 1, "neither an existing folder nor a hub"),
]


@pytest.mark.parametrize("argv, code, fragment", BAD_INPUT,
                         ids=lambda x: " ".join(x)[:60] if isinstance(x, list) else None)
def test_bad_input_is_one_line_and_changes_nothing(
    capsys, tmp_path: Path, root: Path, populated: Registry, hf_folder: Path, argv, code, fragment
) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    before = snapshot(tmp_path)
    rc, out, err = cli(capsys, root, *argv)
    assert rc == code, (rc, err)
    assert_one_line_error(None, err, fragment)
    assert out == ""
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "argv",
    [
        ["versions", "list", "o/m", "--limit", "abc"],
        ["models", "create", "o/x", "--visibility", "secret"],
        ["models", "bogus"],
        ["versions", "show"],
    ],
    ids=["bad-int", "bad-choice", "bad-command", "missing-argument"],
)
def test_bad_options_exit_2(capsys, tmp_path: Path, root: Path, populated: Registry, argv) -> None:
    before = snapshot(tmp_path)
    rc, out, err = cli(capsys, root, *argv)
    assert rc == 2 and out == ""
    # argparse prints its usage line, then exactly one error line.
    assert [line for line in err.splitlines() if "error:" in line] == [err.splitlines()[-1]]
    assert err.splitlines()[-1].startswith("finetune ")
    assert snapshot(tmp_path) == before


def test_hub_import_that_cannot_resolve_changes_nothing(
    capsys, tmp_path: Path, root: Path, populated: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(repo_id: str, revision: str | None = None) -> str:
        raise ModelLoadError(f"cannot resolve hub model {repo_id!r}: OfflineModeIsEnabled")

    monkeypatch.setattr(sources, "resolve_hub_revision", offline)
    before = snapshot(tmp_path)
    rc, out, err = cli(capsys, root, "models", "import", "o/new", "--from", "org/model")
    assert rc == 1
    assert_one_line_error(None, err, "cannot resolve hub model 'org/model'")
    assert snapshot(tmp_path) == before


def test_delete_refused_while_an_alias_points_at_it(capsys, tmp_path: Path, root: Path, populated: Registry) -> None:
    populated.set_alias("o/m:2", "prod")
    before = snapshot(tmp_path)
    rc, _, err = cli(capsys, root, "versions", "delete", "o/m:2")
    assert rc == 1
    assert_one_line_error(None, err, "o/m:2 has aliases: prod")
    assert snapshot(tmp_path) == before


def test_corrupt_manifest(capsys, tmp_path: Path, root: Path, populated: Registry) -> None:
    manifest = populated.resolve("o/m:1").path / MANIFEST
    os.chmod(manifest, 0o644)
    manifest.write_text('{"id": ')
    before = snapshot(tmp_path)
    for argv in (["versions", "show", "o/m:1"], ["versions", "show", "o/m:1", "--json"]):
        rc, _, err = cli(capsys, root, *argv)
        assert rc == 1, argv
        assert_one_line_error(None, err, "manifest.json is not valid JSON", "versions delete o/m:1")
    rc, out, err = cli(capsys, root, "versions", "list", "o/m")  # listed, marked, beside the healthy one
    assert rc == 0 and "DAMAGED" in out.splitlines()[2] and "o/m:1" in err
    rc, out, err = cli(capsys, root, "versions", "verify", "o/m:1")
    assert rc == 1 and "not valid JSON" in out
    assert err == "o/m:1: DAMAGED (1 problem)\n"
    assert snapshot(tmp_path) == before


def test_registry_root_that_is_a_file(capsys, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a registry")
    before = snapshot(tmp_path)
    for root in (tmp_path / "file", tmp_path / "file" / "below"):
        for argv in (["models", "list"], ["versions", "list", "o/m"], ["models", "create", "o/m"],
                     ["registry", "gc"]):
            rc, _, err = cli(capsys, root, *argv)
            assert rc == 1, (root, argv, err)
            assert_one_line_error(None, err, str(tmp_path / "file"))
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------ real subprocesses
def _finetune(root: Path, *argv: str, drop_dac: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "finetune", "--registry", str(root), *argv]
    if drop_dac:
        # Root ignores permission bits; without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH it obeys them like anyone.
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
               "--inh-caps=-dac_override,-dac_read_search", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_python_dash_m_finetune(tmp_path: Path, root: Path) -> None:
    done = _finetune(root, "models", "create", "o/s")
    assert (done.returncode, done.stdout, done.stderr) == (0, "created o/s\n", "")
    done = _finetune(root, "versions", "show", "o/s:1")
    assert done.returncode == 1 and done.stdout == ""
    assert_one_line_error(None, done.stderr, "version o/s:1 not found")
    done = _finetune(root, "models", "create", "O/s")
    assert done.returncode == 2
    assert_one_line_error(None, done.stderr, "invalid owner 'O'")


def test_unreadable_registry_root(tmp_path: Path, root: Path, populated: Registry) -> None:
    drop_dac = os.geteuid() == 0
    if drop_dac and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permission bits cannot be made to bite")
    before = snapshot(tmp_path)
    os.chmod(root, 0)
    try:
        results = {
            " ".join(argv): _finetune(root, *argv, drop_dac=drop_dac)
            for argv in (["models", "list"], ["versions", "list", "o/m"], ["versions", "show", "o/m:1"],
                         ["models", "create", "o/n"], ["registry", "gc"])
        }
    finally:
        os.chmod(root, 0o755)
    for what, done in results.items():
        assert done.returncode == 1, (what, done.stderr)
        assert_one_line_error(None, done.stderr, "Permission denied")
    assert snapshot(tmp_path) == before
