"""Deleting what work still needs: trainings running or resumable, and other accounts' versions.

A model a training runs into, and a version an interrupted training of its owner can still resume from, are
not deleted. A version other accounts' versions derive from is deleted for its owner but archived, so theirs
keep working; refusals never name another account's models or trainings (through the HTTP API too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_one_line_error

from finetune import atomic
from finetune.cli import main
from finetune.registry import Registry
from finetune.registry.jobs import TrainingRecord, Trainings

HUB = {"hub_id": "o/base", "revision": "0" * 40}


def adapter(tmp_path: Path, name: str) -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    folder = tmp_path / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    save_file({"w": np.full(16, len(name), dtype=np.float32)}, str(folder / "adapter_model.safetensors"))
    return folder


def cli(capsys: pytest.CaptureFixture[str], reg: Registry, *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(["--registry", str(reg.root), *argv])
    except SystemExit as exit_:
        rc = exit_.code
    out, err = capsys.readouterr()
    return rc, out, err


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def add_checkpoint(reg: Registry, training_id: str, step: int) -> Path:
    folder = reg.training_paths(training_id).checkpoints / f"step-{step:08d}"
    folder.mkdir(parents=True)
    (folder / "state.json").write_text(json.dumps({"step": step}))
    return folder


# ---------------------------------------------------------------- trainings
def test_a_model_a_training_runs_into_is_not_deleted(tmp_path: Path, capsys) -> None:
    reg = Registry(tmp_path / "registry")
    reg.create_model("me/dest")
    trainings = Trainings(reg)
    live = trainings.create(TrainingRecord(id="20260101-000000-aaaaaa", destination="me/dest", status="processing",
                                           pid=os.getpid(), model="hub x", input={"base_model": "x/y"}))
    rc, _, err = cli(capsys, reg, "models", "delete", "me/dest")
    assert_one_line_error(rc, err, "model me/dest is the destination of training 20260101-000000-aaaaaa",
                          "still running", "trainings cancel 20260101-000000-aaaaaa")
    assert reg.get_model("me/dest")
    trainings.update(live, status="failed", pid=dead_pid())  # failed before its first checkpoint: nothing to resume
    assert cli(capsys, reg, "models", "delete", "me/dest")[:2] == (0, "deleted me/dest\n")


def test_a_queued_training_keeps_its_destination_and_its_base(tmp_path: Path, capsys) -> None:
    """A training waiting in a server's queue (no process yet, or none since the server stopped) will run: its
    destination model and the version it starts from are not deleted under it."""
    reg = Registry(tmp_path / "registry")
    reg.create_model("me/m")
    parent = reg.publish("me/m", adapter(tmp_path, "a"), parent=HUB)
    reg.create_model("me/dest")
    trainings = Trainings(reg)
    queued = trainings.create(TrainingRecord(id="20260101-000000-cccccc", destination="me/dest", source="api",
                                             model=parent.ref, input={"base_model": parent.ref}))
    rc, _, err = cli(capsys, reg, "models", "delete", "me/dest")
    assert_one_line_error(rc, err, "model me/dest is the destination of training 20260101-000000-cccccc",
                          "which is queued", "trainings cancel 20260101-000000-cccccc")
    rc, _, err = cli(capsys, reg, "versions", "delete", parent.ref)
    assert_one_line_error(rc, err, f"{parent.ref} is the base of training 20260101-000000-cccccc", "queued")
    assert cli(capsys, reg, "trainings", "cancel", queued.id)[0] == 0
    assert cli(capsys, reg, "models", "delete", "me/dest")[:2] == (0, "deleted me/dest\n")
    assert cli(capsys, reg, "versions", "delete", parent.ref)[0] == 0


@pytest.mark.parametrize("how", ["failed", "canceled", "process-gone"])
def test_the_parent_of_an_interrupted_resumable_training_is_not_deleted(tmp_path: Path, capsys, how: str) -> None:
    reg = Registry(tmp_path / "registry")
    reg.create_model("me/m")
    parent = reg.publish("me/m", adapter(tmp_path, "a"), parent=HUB)
    status = "processing" if how == "process-gone" else how
    record = Trainings(reg).create(TrainingRecord(id="20260101-000000-bbbbbb", destination="me/out", status=status,
                                                  pid=dead_pid(), model=parent.ref,
                                                  input={"base_model": "me/m"}))
    checkpoint = add_checkpoint(reg, record.id, 40)
    rc, _, err = cli(capsys, reg, "versions", "delete", parent.ref)
    assert_one_line_error(rc, err, f"{parent.ref} is the base of training {record.id}, interrupted at step 40",
                          f"finetune train --resume {record.id}", str(checkpoint.parent))
    assert reg.version("me/m", 1) is not None
    atomic.remove_tree(checkpoint.parent)  # given up, as the message says
    assert cli(capsys, reg, "versions", "delete", parent.ref)[0] == 0


# ---------------------------------------------------------------- other accounts' versions
def test_an_owner_deletes_a_version_another_account_trained_from(tmp_path: Path, tiny_model_dir: Path, capsys):
    from finetune.registry.lineage import lineage
    from finetune.registry.sources import resolve_model

    reg = Registry(tmp_path / "registry")
    assert cli(capsys, reg, "models", "import", "alice/base", "--from", str(tiny_model_dir))[0] == 0
    reg.create_model("alice/pub", visibility="public")
    pub = reg.publish("alice/pub", adapter(tmp_path, "pub"), parent="alice/base:1")
    reg.create_model("bob/m1")
    child = reg.publish("bob/m1", adapter(tmp_path, "child"), parent=pub)
    grandchild = reg.publish("bob/m1", adapter(tmp_path, "grandchild"), parent=child)

    rc, out, err = cli(capsys, reg, "versions", "delete", "alice/pub:1")
    assert (rc, err) == (0, "") and "deleted alice/pub:1 (kept in the archive" in out
    assert reg.list_versions("alice/pub") == []
    assert cli(capsys, reg, "versions", "show", "alice/pub:1")[0] == 1  # gone for every ref
    # bob's versions keep their lineage, load and verify as before
    assert [v.ref for v in lineage(reg, grandchild)] == ["bob/m1:2", "bob/m1:1", "alice/pub:1", "alice/base:1"]
    assert resolve_model(reg, "bob/m1:1").base.version.ref == "alice/base:1"
    assert cli(capsys, reg, "versions", "verify", "bob/m1:1")[0] == 0
    # the base alice's archived version stands on is archived in turn when she deletes it
    assert cli(capsys, reg, "models", "delete", "alice/pub")[0] == 0
    assert cli(capsys, reg, "versions", "delete", "alice/base:1")[0] == 0
    assert resolve_model(reg, "bob/m1:2").base.version.ref == "alice/base:1"
    # gc keeps what is still needed, and removes the archive once nothing derives from it
    rc, out, _ = cli(capsys, reg, "registry", "gc")
    assert rc == 0 and "archive" not in out
    assert cli(capsys, reg, "versions", "delete", "bob/m1:2")[0] == 0
    assert cli(capsys, reg, "versions", "delete", "bob/m1:1")[0] == 0
    rc, out, _ = cli(capsys, reg, "registry", "gc")
    assert rc == 0 and out.count(str(reg.root / "archive")) == 2
    assert list((reg.root / "archive").iterdir()) == []


def test_refusals_through_the_api_never_name_another_account(live_server, tmp_path: Path) -> None:
    from test_api import assert_problem

    reg = live_server.registry
    reg.create_model("alice/pub", visibility="public")
    pub = [reg.publish("alice/pub", adapter(tmp_path, f"pub{i}"), parent=HUB) for i in range(2)]
    reg.create_model("bob/secret", visibility="private")
    reg.publish("bob/secret", adapter(tmp_path, "child"), parent=pub[0])
    alice = live_server.http("alice")

    # bob's private version derives from alice's: alice may still delete hers, and bob's keeps working
    assert alice.delete(f"/v1/models/alice/pub/versions/{pub[0].id}").status_code == 204
    assert live_server.http("bob").get(f"/v1/models/bob/secret/versions/{reg.resolve('bob/secret:1').id}") \
        .status_code == 200
    # a training of bob's, running from alice's version, holds it: the 409 says so without naming it
    Trainings(reg).create(TrainingRecord(id="20260101-000000-cccccc", destination="bob/secret", status="processing",
                                         pid=os.getpid(), model="alice/pub:2", input={"base_model": "alice/pub:2"}))
    body = assert_problem(alice.delete(f"/v1/models/alice/pub/versions/{pub[1].id}"), 409,
                          "a training of another account that is still running")
    assert "bob" not in body["detail"] and "secret" not in body["detail"] and "cccccc" not in body["detail"]
    assert reg.version("alice/pub", 2) is not None
