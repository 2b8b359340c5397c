"""Job records (registry.jobs) and the errors' HTTP statuses: the parts the service builds on."""

from __future__ import annotations

import json

import pytest

from finetune import errors
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
