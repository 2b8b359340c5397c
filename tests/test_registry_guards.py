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

from finetune.cli import main
from finetune.errors import UsageError
from finetune.registry import MANIFEST, Registry


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    """o/m with versions 1-3 (3 derives from 1)."""
    reg = Registry(tmp_path / "registry")
    reg.create_model("o/m")
    src = tmp_path / "src"
    src.mkdir()
    (src / "adapter_config.json").write_text("{}")
    (src / "w.bin").write_bytes(b"\x01" * 64)
    hub = {"hub_id": "o/base", "revision": "0" * 40}  # an adapter names its base
    v1 = reg.publish("o/m", src, parent=hub, metadata={"metrics": {"train_loss": 1.5}})
    reg.publish("o/m", src, parent=hub)
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


def test_imports_leave_no_empty_model_and_race_for_a_new_name(reg: Registry, tmp_path: Path, monkeypatch,
                                                              capsys):
    import shutil
    import threading

    from finetune.errors import ConflictError
    from finetune.registry import sources

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "tokenizer.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\x00" * 256)

    # A copy that fails half-way (here: the disk fills) leaves no model behind, and its staging goes.
    real_copy = shutil.copy2

    def disk_full(src, dst, *a, **k):
        raise OSError(28, "No space left on device", str(dst))

    monkeypatch.setattr(shutil, "copy2", disk_full)
    rc, _, err = cli(capsys, reg, "models", "import", "o/base", "--from", str(folder))
    assert_one_line_error(rc, err, "is out of space")
    monkeypatch.setattr(shutil, "copy2", real_copy)
    assert not (reg.root / "models" / "o" / "base").exists()
    assert list((reg.root / ".staging").iterdir()) == []

    # Two imports racing into one new name: one publishes :1, the other is refused; never :1 and :2.
    barrier = threading.Barrier(2)
    real_publish = sources._publish_base

    def in_step(*args, **kwargs):
        barrier.wait(timeout=30)
        return real_publish(*args, **kwargs)

    monkeypatch.setattr(sources, "_publish_base", in_step)
    outcomes: list[object] = []

    def one() -> None:
        try:
            outcomes.append(sources.import_base(reg, "o/race", str(folder)).ref)
        except ConflictError as err:
            outcomes.append(err)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(map(str, outcomes))[1] == "o/race:1", outcomes
    assert isinstance(sorted(outcomes, key=str)[0], ConflictError)
    assert [v.number for v in reg.list_versions("o/race")] == [1]


def test_dead_importers_staging_is_collected_at_once(reg: Registry, capsys):
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    leftover = reg.root / ".staging" / f"import-{pid}-0a0b0c0d@{socket.gethostname()}"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"\x00" * 1024)
    rc, out, _ = cli(capsys, reg, "registry", "gc")  # the default age limit: 24 hours
    assert rc == 0 and f"removed {leftover}" in out and not leftover.exists()


def test_training_into_a_base_models_name_is_refused(reg: Registry, tmp_path: Path):
    from finetune.config import config_from_dict
    from finetune.errors import ConflictError
    from finetune.training.submit import submit_training

    folder = tmp_path / "src-base"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\x00" * 8)
    reg.create_model("o/base")
    reg.publish("o/base", folder, kind="base")
    config = config_from_dict({"base_model": "o/base:1", "data": {"path": str(folder / "config.json")}})
    with pytest.raises(ConflictError, match="holds base model o/base:1.*--destination o/base-ft"):
        submit_training(config, registry=reg, destination="o/base")
    assert reg.resolve("o/base").number == 1


def test_a_version_a_live_training_continues_from_cannot_be_deleted(reg: Registry, tmp_path: Path, capsys):
    from finetune.errors import ConflictError
    from finetune.registry.jobs import TrainingRecord, Trainings

    trainings = Trainings(reg)
    live = trainings.create(TrainingRecord(id="20260101-000000-aaaaaa", destination="o/m", status="processing",
                                           pid=os.getpid(), model="o/m:2", input={"base_model": "o/m:2"}))
    rc, _, err = cli(capsys, reg, "versions", "delete", "o/m:2")
    assert_one_line_error(rc, err, "o/m:2 is the base of training 20260101-000000-aaaaaa",
                          "trainings cancel 20260101-000000-aaaaaa")
    assert reg.version("o/m", 2) is not None
    parent = reg.resolve("o/m:2")
    parent_id = parent.id
    trainings.update(live, status="succeeded")  # once it ended, the version may go
    reg.delete_version("o/m:2")

    # and a publish whose parent vanished meanwhile is refused, naming it
    src = tmp_path / "child"
    src.mkdir()
    (src / "adapter_config.json").write_text("{}")
    with pytest.raises(ConflictError, match="parent o/m:2 is gone"):
        reg.publish("o/m", src, parent={"ref": parent.ref, "id": parent_id})
    assert [v.number for v in reg.list_versions("o/m")] == [3, 1]
