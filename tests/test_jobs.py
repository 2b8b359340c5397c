"""Job records (registry.jobs) and the errors' HTTP statuses: the parts the service builds on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from finetune import errors
from finetune.cli import main
from finetune.registry import Registry
from finetune.registry.jobs import FINAL, Status, TrainingRecord, Trainings, new_record_id


def test_every_error_has_an_http_status_that_fits():
    expected = {
        errors.UsageError: 422, errors.ConfigError: 422, errors.InvalidNameError: 422, errors.DataError: 422,
        errors.NotFoundError: 404, errors.ModelNotFoundError: 404, errors.TrainingNotFoundError: 404,
        errors.AlreadyExistsError: 409, errors.ConflictError: 409,
        errors.IntegrityError: 500, errors.AccessDeniedError: 403,
    }
    for cls, status in expected.items():
        assert cls.http_status == status, cls.__name__
    err = errors.ConfigError(["train.lr: must be > 0", "data.path: missing"])
    assert err.http_status == 422 and err.exit_code == 2 and len(err.problems) == 2


def test_status_is_a_str_enum_stored_as_its_plain_value(tmp_path):
    trainings = Trainings(Registry(tmp_path))
    record = trainings.create(TrainingRecord(id=new_record_id(), destination="alice/x"))
    assert record.status is Status.STARTING and record.status == "starting" and f"{record.status}" == "starting"
    trainings.update(record, status="processing")
    on_disk = json.loads(trainings.paths(record.id).record.read_text())
    assert on_disk["status"] == "processing"
    assert trainings.get(record.id).status is Status.PROCESSING
    trainings.update(record, status=Status.FAILED, error="boom")
    again = trainings.get(record.id)
    assert again.status in FINAL and again.completed_at and again.error == "boom"


def test_record_updates_reject_unknown_fields_and_statuses(tmp_path):
    trainings = Trainings(Registry(tmp_path))
    record = trainings.create(TrainingRecord(id=new_record_id()))
    with pytest.raises(TypeError, match="no field colour"):
        trainings.update(record, colour="red")
    with pytest.raises(ValueError):
        trainings.update(record, status="paused")
    assert trainings.get(record.id).status == "starting"  # nothing was written


def test_update_changes_the_callers_record_too(tmp_path):
    trainings = Trainings(Registry(tmp_path))
    record = trainings.create(TrainingRecord(id=new_record_id()))
    returned = trainings.update(record, pid=123)
    assert returned is record and record.pid == 123


def test_records_list_newest_first_and_unknown_ids_are_not_found(tmp_path):
    trainings = Trainings(Registry(tmp_path))
    assert trainings.list() == []
    ids = ["20260101-000000-aaaaaa", "20260102-000000-bbbbbb", "20251231-000000-cccccc"]
    for i in ids:
        trainings.create(TrainingRecord(id=i))
    assert [r.id for r in trainings.list()] == sorted(ids, reverse=True)
    with pytest.raises(errors.TrainingNotFoundError):
        trainings.get("20200101-000000-000000")


def test_training_paths_come_from_the_registry(tmp_path):
    reg = Registry(tmp_path)
    paths = reg.training_paths("20260101-000000-aaaaaa")
    assert paths.folder == reg.job_dir("trainings", "20260101-000000-aaaaaa")
    assert {paths.record.parent, paths.log.parent, paths.metrics.parent, paths.checkpoints.parent,
            paths.output.parent, paths.cancel.parent} == {paths.folder}
    with pytest.raises(AttributeError):
        paths.log = tmp_path  # frozen
    with pytest.raises(errors.UsageError):
        reg.jobs_dir("models")  # not a kind of job: would reach into the models folder


# ---------------------------------------------------------------------------------------------- pid reuse
@pytest.fixture
def stranger():
    """A process that is not a training: what a dead run's pid may belong to now. Killed at the end."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _record_of_a_dead_run(reg: Registry, pid: int, **fields) -> TrainingRecord:
    """A ``processing`` record whose run died an hour ago, left as a run leaves it, naming ``pid``."""
    trainings = Trainings(reg)
    record = trainings.create(TrainingRecord(id=new_record_id(), destination="alice/x", status="processing",
                                             pid=pid, source="cli", **fields))
    hour_ago = time.time() - 3600
    os.utime(trainings.paths(record.id).record, (hour_ago, hour_ago))
    return record


def test_cancel_never_signals_a_process_that_took_a_dead_runs_pid(tmp_path, stranger, capsys):
    """A record written before runs were marked (pid only): the process under that pid started after the run
    last wrote its record, so it is not the run. Cancel settles the record and leaves the process alone."""
    reg = Registry(tmp_path / "registry")
    record = _record_of_a_dead_run(reg, stranger.pid)
    assert main(["--registry", str(reg.root), "trainings", "cancel", record.id]) == 0
    time.sleep(0.2)
    assert stranger.poll() is None  # not SIGTERMed
    settled = Trainings(reg).get(record.id)
    assert settled.status == "canceled" and "not running" in settled.error
    assert main(["--registry", str(reg.root), "trainings", "cancel", record.id]) == 1  # ended: said once


def test_a_marked_run_is_known_by_its_start_not_its_pid(tmp_path, stranger):
    """A record claimed the current way carries its process's start mark: the same pid in another process is
    not the run (cancel leaves it alone, the record is stale so --resume and deletions may go on)."""
    reg = Registry(tmp_path / "registry")
    trainings = Trainings(reg)
    record = trainings.claim(trainings.create(TrainingRecord(id=new_record_id(), destination="alice/x")))
    assert record.pid == os.getpid() and record.pid_mark and trainings.running(record)
    assert not trainings.is_stale(record)
    trainings.update(record, status="processing", pid=stranger.pid)  # this run's mark, another process's pid
    assert trainings.is_stale(record) and not trainings.running(record)
    trainings.request_cancel(record.id)
    time.sleep(0.2)
    assert stranger.poll() is None and trainings.get(record.id).status == "canceled"


def test_a_live_run_is_still_signalled(tmp_path):
    """The other side: the run's own process (its pid and mark) gets the SIGTERM that wakes it up."""
    reg = Registry(tmp_path / "registry")
    trainings = Trainings(reg)
    record = trainings.create(TrainingRecord(id=new_record_id(), destination="alice/x"))
    code = ("import sys, time; from finetune.registry import Registry; from finetune.registry.jobs import Trainings;"
            "t = Trainings(Registry(sys.argv[1])); r = t.claim(t.get(sys.argv[2]));"
            "t.update(r, status='processing'); print('claimed', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(reg.root), record.id], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "claimed"
        trainings.request_cancel(record.id)
        assert proc.wait(timeout=20) == -signal.SIGTERM
        assert trainings.cancel_requested(record.id)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_run_on_another_machine_is_never_judged_by_a_pid_of_this_one(tmp_path, stranger, fake_executor):
    """A cluster's node claimed the record: its pid means nothing here, whatever runs under that number on this
    machine. The run counts as running until its record ends; cancel leaves the marker (the run stops itself)
    and signals nothing here; a server's queue neither adopts nor re-runs it."""
    from finetune.queue import TrainingQueue

    reg = Registry(tmp_path / "registry")
    trainings = Trainings(reg)
    record = trainings.create(TrainingRecord(id=new_record_id(), destination="alice/x", status="processing",
                                             pid=stranger.pid, pid_mark="another-boot:123", host="node-b",
                                             source="api", runner="queue"))
    assert trainings.running(record) and not trainings.is_stale(record)
    queue = TrainingQueue(reg, fake_executor)
    queue.start()
    try:
        assert queue.pending() == [] and queue.running() == []
    finally:
        queue.stop()
    trainings.request_cancel(record.id)
    time.sleep(0.2)
    assert stranger.poll() is None  # not SIGTERMed
    assert trainings.cancel_requested(record.id) and trainings.get(record.id).status == "processing"
    trainings.update(record, status="canceled")  # what the run writes when it sees the marker
    assert not trainings.running(record)


def test_a_tag_for_work_names_tells_a_live_owner_from_a_reused_pid(stranger):
    from finetune.processes import mark_tag, tag_alive

    mine = mark_tag(os.getpid())
    assert mine and len(mine) == 8 and tag_alive(os.getpid(), mine)
    assert not tag_alive(stranger.pid, mine)  # another process under a pid named in some work's name
    assert mark_tag(stranger.pid) != mine and tag_alive(stranger.pid, mark_tag(stranger.pid))
