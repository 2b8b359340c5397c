"""The registry's guards against damage and against destroying what something still needs.

One damaged version must not hide the others, and the way out its error names must work; deletions name their
version explicitly; nothing is written inside the registry from outside it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import assert_one_line_error

from finetune import atomic
from finetune.cli import main
from finetune.errors import UsageError
from finetune.registry import MANIFEST, Registry


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(atomic, "_FSYNC", False)


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    """o/m with versions 1-3 (3 derives from 1)."""
    reg = Registry(tmp_path / "registry")
    reg.create_model("o/m")
    src = tmp_path / "src"
    src.mkdir()
    (src / "adapter_config.json").write_text("{}")
    (src / "w.bin").write_bytes(b"\x01" * 64)
    v1 = reg.publish("o/m", src, metadata={"metrics": {"train_loss": 1.5}})
    reg.publish("o/m", src)
    reg.publish("o/m", src, parent=v1)
    return reg


def cli(capsys: pytest.CaptureFixture[str], reg: Registry, *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(["--registry", str(reg.root), *argv])
    except SystemExit as exit_:
        rc = exit_.code
    out, err = capsys.readouterr()
    return rc, out, err


def damage_manifest(reg: Registry, ref: str) -> Path:
    v = reg.resolve(ref)
    os.chmod(v.path, 0o755)
    (v.path / MANIFEST).unlink()
    return v.path


def test_one_damaged_version_does_not_hide_the_others(reg: Registry, capsys):
    damage_manifest(reg, "o/m:2")
    rc, out, err = cli(capsys, reg, "versions", "list", "o/m")
    assert rc == 0, err
    rows = out.splitlines()[1:]
    assert [r.split()[0] for r in rows] == ["3", "2", "1"]
    assert "DAMAGED" in rows[1] and "manifest.json is missing" in rows[1]
    assert "train_loss=1.5000" in rows[2]  # the healthy ones as usual
    assert "versions delete o/m:2" in err  # the way out
    rc, out, _ = cli(capsys, reg, "versions", "list", "o/m", "--json")
    listed = json.loads(out)
    assert [v["ref"] for v in listed] == ["o/m:3", "o/m:2", "o/m:1"] and "damaged" in listed[1]
    assert listed[0]["id"] == reg.resolve("o/m:3").id
    rc, out, _ = cli(capsys, reg, "models", "list")
    assert rc == 0 and "o/m" in out

    # The error a damaged version gives names commands, and both of them work on it.
    rc, _, err = cli(capsys, reg, "versions", "show", "o/m:2")
    assert_one_line_error(rc, err, "versions verify o/m:2", "versions delete o/m:2")
    rc, out, err = cli(capsys, reg, "versions", "verify", "o/m:2")
    assert rc == 1 and "manifest.json is missing" in out and "DAMAGED" in err
    rc, out, err = cli(capsys, reg, "versions", "delete", "o/m:2")
    assert (rc, out) == (0, "deleted o/m:2\n"), err
    assert [v.number for v in reg.list_versions("o/m")] == [3, 1]
    assert list((reg.root / ".trash").iterdir()) == []


def test_a_damaged_parent_still_protects_its_children(reg: Registry, capsys):
    damage_manifest(reg, "o/m:1")
    rc, _, err = cli(capsys, reg, "versions", "delete", "o/m:1")
    assert_one_line_error(rc, err, "o/m:1 is the parent of o/m:3")
    assert reg.version("o/m", 1) is not None


def test_deleting_needs_an_explicit_version(reg: Registry, capsys):
    for ref in ("o/m", "o/m:latest"):
        rc, _, err = cli(capsys, reg, "versions", "delete", ref)
        assert_one_line_error(rc, err, "names no version explicitly", "OWNER/NAME:N", "--latest")
        assert rc == 2
        with pytest.raises(UsageError, match="names no version explicitly"):
            reg.delete_version(ref)
    assert [v.number for v in reg.list_versions("o/m")] == [3, 2, 1]
    rc, out, _ = cli(capsys, reg, "versions", "delete", "o/m", "--latest")
    assert (rc, out) == (0, "deleted o/m:3\n")


def test_one_damaged_training_record_does_not_hide_the_others(reg: Registry, capsys):
    from finetune.registry.jobs import TrainingRecord, Trainings

    trainings = Trainings(reg)
    for n in range(3):
        trainings.create(TrainingRecord(id=f"20260101-00000{n}-abcdef", destination="o/m", status="failed"))
    bad = trainings.paths("20260101-000001-abcdef").record
    for damage in ('{"id": ', '["not", "an", "object"]', '{"id": "x", "status": "exploded"}', "caf\xe9"):
        bad.write_bytes(damage.encode("latin-1"))
        rc, out, err = cli(capsys, reg, "trainings", "list")
        assert rc == 0, err
        assert [line.split()[0] for line in out.splitlines()[1:]] == ["20260101-000002-abcdef",
                                                                    "20260101-000000-abcdef"]
        assert "20260101-000001-abcdef" in err and "is damaged" in err and "remove its folder" in err
        rc, out, _ = cli(capsys, reg, "trainings", "list", "--json")
        assert rc == 0 and len(json.loads(out)) == 2
        rc, _, err = cli(capsys, reg, "trainings", "show", "20260101-000001-abcdef")
        assert_one_line_error(rc, err, "record.json is damaged", "remove its folder")
        assert rc == 1
