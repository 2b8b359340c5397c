"""The training queue over a fake executor (no training, fast): FIFO within capacity, cancel, dead workers,
recovery after a restart, shutdown. The real worker processes are exercised in tests/test_api_trainings.py."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from finetune import atomic
from finetune.queue import TrainingQueue
from finetune.registry import Registry
from finetune.registry.jobs import TrainingRecord, Trainings, new_record_id


class FakeJob:
    def __init__(self, training_id: str):
        self.training_id = training_id
        self.code: int | None = None
        self.stopped = False

    def poll(self) -> int | None:
        return self.code

    def stop(self) -> None:
        self.stopped = True
        self.code = -signal.SIGTERM

    def kill(self) -> None:
        self.code = -signal.SIGKILL


class FakeExecutor:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.jobs: dict[str, FakeJob] = {}
        self.order: list[str] = []
        self.started = threading.Event()
        self.closed = False

    def start(self, training_id: str) -> FakeJob:
        job = self.jobs[training_id] = FakeJob(training_id)
        self.order.append(training_id)
        self.started.set()
        return job

    def close(self) -> None:
        self.closed = True


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(atomic, "_FSYNC", False)


@pytest.fixture
def reg(registry: Registry) -> Registry:
    registry.create_model("alice/y")
    return registry


def record(reg: Registry, source: str = "api", **fields) -> TrainingRecord:
    rec = TrainingRecord(id=new_record_id(), destination="alice/y", source=source, **fields)
    time.sleep(0.002)  # created_at orders the recovery
    return Trainings(reg).create(rec)


def wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def finish(reg: Registry, job: FakeJob, status: str = "succeeded") -> None:
    """What a worker does at the end: settle its record, then exit."""
    trainings = Trainings(reg)
    trainings.update(trainings.get(job.training_id), status=status)
    job.code = 0


def test_fifo_within_capacity(reg: Registry) -> None:
    ex = FakeExecutor(capacity=2)
    queue = TrainingQueue(reg, ex).start()
    try:
        ids = [record(reg).id for _ in range(4)]
        for i in ids:
            queue.submit(i)
        wait_for(lambda: len(ex.order) == 2)
        time.sleep(0.2)
        assert ex.order == ids[:2] and queue.pending() == ids[2:]  # never more than capacity at once
        finish(reg, ex.jobs[ids[1]])
        wait_for(lambda: len(ex.order) == 3)
        assert ex.order[2] == ids[2]
        for i in ids[:3]:
            if ex.jobs[i].code is None:
                finish(reg, ex.jobs[i])
        wait_for(lambda: len(ex.order) == 4)
        finish(reg, ex.jobs[ids[3]])
        assert queue.wait_idle(10)
        assert [Trainings(reg).get(i).status for i in ids] == ["succeeded"] * 4
    finally:
        queue.stop()


def test_cancel_queued_and_running(reg: Registry) -> None:
    ex = FakeExecutor(capacity=1)
    queue = TrainingQueue(reg, ex).start()
    trainings = Trainings(reg)
    try:
        running, queued = record(reg).id, record(reg).id
        queue.submit(running)
        queue.submit(queued)
        wait_for(lambda: ex.order == [running])
        assert queue.cancel(queued).status == "canceled"
        assert trainings.get(queued).error == "canceled before it started"
        queue.cancel(running)
        assert ex.jobs[running].stopped and trainings.cancel_requested(running)
        wait_for(lambda: trainings.get(running).status == "canceled")  # the worker died before settling it
        assert queue.wait_idle(10) and ex.order == [running]  # the canceled one never started
    finally:
        queue.stop()


def test_dead_worker_fails_the_training(reg: Registry) -> None:
    ex = FakeExecutor(capacity=1)
    queue = TrainingQueue(reg, ex).start()
    trainings = Trainings(reg)
    try:
        rec = record(reg)
        queue.submit(rec.id)
        wait_for(lambda: rec.id in ex.jobs)
        ex.jobs[rec.id].code = -signal.SIGKILL
        wait_for(lambda: trainings.get(rec.id).status == "failed")
        error = trainings.get(rec.id).error
        assert "killed by SIGKILL" in error and "nothing was published" in error
    finally:
        queue.stop()


def test_restart_requeues_waiting_and_interrupted_trainings_oldest_first(reg: Registry) -> None:
    trainings = Trainings(reg)
    waiting = record(reg)
    interrupted = record(reg, status="processing", pid=2**22 + 12345)  # a pid that does not run
    cli = record(reg, source="cli")  # a CLI run is the user's to resume
    done = record(reg, status="succeeded")
    newer = record(reg)
    ex = FakeExecutor(capacity=1)
    queue = TrainingQueue(reg, ex).start()
    try:
        wait_for(lambda: ex.order == [waiting.id])
        assert queue.pending() == [interrupted.id, newer.id]
        assert trainings.get(interrupted.id).status == "starting"
        assert trainings.get(cli.id).status == "starting" and trainings.get(done.id).status == "succeeded"
    finally:
        queue.stop()


def test_stop_puts_running_trainings_back(reg: Registry) -> None:
    trainings = Trainings(reg)
    ex = FakeExecutor(capacity=1)
    queue = TrainingQueue(reg, ex).start()
    rec, other = record(reg), record(reg)
    queue.submit(rec.id)
    queue.submit(other.id)
    wait_for(lambda: rec.id in ex.jobs)
    trainings.update(trainings.get(rec.id), status="processing")
    queue.stop()
    assert ex.jobs[rec.id].stopped and ex.closed
    assert trainings.get(rec.id).status == "starting" and trainings.get(other.id).status == "starting"
    ex2 = FakeExecutor(capacity=1)
    queue = TrainingQueue(reg, ex2).start()
    try:
        wait_for(lambda: ex2.order == [rec.id])
        assert queue.pending() == [other.id]
    finally:
        queue.stop()


@pytest.mark.parametrize("gpus, workers, expected", [
    ([], None, [[]]),
    ([], 2, [[], []]),
    (["0", "1", "2", "3"], None, [["0"], ["1"], ["2"], ["3"]]),
    (["0", "1", "2", "3"], 1, [["0", "1", "2", "3"]]),
    (["0", "1", "2", "3"], 2, [["0", "1"], ["2", "3"]]),
    (["0"], 2, [["0"], ["0"]]),
])
def test_slots_split_the_gpus(tmp_path, gpus, workers, expected) -> None:
    from finetune.queue import LocalExecutor

    executor = LocalExecutor(tmp_path, workers=workers, gpus=gpus, prestart=False)
    assert [slot.gpus for slot in executor.slots] == expected and executor.capacity == len(expected)


@pytest.mark.slow
def test_a_slot_with_two_devices_trains_through_the_launcher(tiny_model_dir, registry: Registry) -> None:
    """The multi-GPU path (scripts/launch.py, accelerate's launcher) run on the CPU: this machine's two "GPUs"
    are names only, so torch sees none and the two processes train with gloo. One version is published."""
    from finetune.config import config_from_dict
    from finetune.queue import LocalExecutor
    from finetune.registry.sources import import_base
    from finetune.tiny import sample_data_path
    from finetune.training import submit_training

    base = import_base(registry, "local/tiny", str(tiny_model_dir))
    registry.create_model("alice/y")
    config = config_from_dict({"base_model": base.ref, "data": {"path": str(sample_data_path()), "max_seq_len": 128},
                               "train": {"max_steps": 2, "batch_size": 4}})
    record = submit_training(config, registry=registry, destination="alice/y", source="api")
    executor = LocalExecutor(registry.root, workers=1, gpus=["0", "1"])
    assert executor.slots[0].spare is None  # launched cold: torchrun starts the processes
    queue = TrainingQueue(registry, executor).start()
    try:
        queue.submit(record.id)
        assert queue.wait_idle(300)
    finally:
        queue.stop()
    done = Trainings(registry).get(record.id)
    assert done.status == "succeeded", done.error
    assert done.metrics["processes"] == 2 and [v.ref for v in registry.list_versions("alice/y")] == ["alice/y:1"]
