"""The training queue over a fake executor (no training, fast): FIFO within capacity, cancel, dead workers,
recovery after a restart, shutdown. The real worker processes are exercised in tests/test_api_trainings.py."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from helpers import FakeExecutor, FakeJob, run_queued

from finetune.queue import TrainingQueue
from finetune.registry import Registry
from finetune.registry.jobs import TrainingRecord, Trainings, new_record_id


@pytest.fixture
def reg(registry: Registry) -> Registry:
    registry.create_model("alice/y")
    return registry


def record(reg: Registry, source: str = "api", destination: str = "alice/y", **fields) -> TrainingRecord:
    rec = TrainingRecord(id=new_record_id(), destination=destination, source=source, **fields)
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


def test_accounts_take_turns(reg: Registry) -> None:
    """alice queued three trainings before bob queued one: bob's goes next, not after all of alice's."""
    reg.create_model("bob/z")
    ex = FakeExecutor(capacity=1)
    queue = TrainingQueue(reg, ex).start()
    try:
        a1, a2, a3 = (record(reg).id for _ in range(3))
        b1 = record(reg, destination="bob/z").id
        for i in (a1, a2, a3, b1):
            queue.submit(i)
        wait_for(lambda: ex.order == [a1])
        assert queue.pending() == [b1, a2, a3] and queue.position(b1) == 0 and queue.position(a3) == 2
        assert queue.count("alice") == 3 and queue.count("bob") == 1
        finish(reg, ex.jobs[a1])
        wait_for(lambda: len(ex.order) == 2)
        assert ex.order == [a1, b1]
        b2 = record(reg, destination="bob/z").id
        queue.submit(b2)  # bob just had his turn: alice's next one goes first
        assert queue.pending() == [a2, b2, a3]
    finally:
        queue.stop()


def test_a_run_past_the_time_limit_is_stopped_and_fails_naming_the_limit(reg: Registry) -> None:
    trainings = Trainings(reg)
    ex = FakeExecutor(capacity=1)
    queue = TrainingQueue(reg, ex, max_run_s=0.3).start()
    try:
        rec, after = record(reg), record(reg)
        queue.submit(rec.id)
        queue.submit(after.id)
        wait_for(lambda: rec.id in ex.jobs)
        trainings.update(trainings.get(rec.id), status="processing")
        wait_for(lambda: trainings.get(rec.id).status == "failed")
        assert ex.jobs[rec.id].stopped and trainings.cancel_requested(rec.id)
        error = trainings.get(rec.id).error
        assert "limit of 0.3s" in error and "--max-training-time" in error and "nothing was published" in error
        wait_for(lambda: after.id in ex.jobs)  # the slot went to the next one
    finally:
        queue.stop()


# ---------------------------------------------------------------------------------------------- whose runs
@pytest.fixture
def processes():
    """Start stand-in run processes (``spawn()``); each is killed at the end if still running."""
    started: list[subprocess.Popen] = []

    def spawn() -> subprocess.Popen:
        started.append(subprocess.Popen(["sleep", "60"]))
        return started[-1]

    yield spawn
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_a_server_never_adopts_or_stops_a_cli_run(reg: Registry, processes) -> None:
    """A `finetune train` run (here as a record written before runs were marked: pid only) outlives no
    server's stop: the queue neither watches it nor SIGTERMs it, nor rewrites its record."""
    trainings = Trainings(reg)
    cli_run = processes()
    cli = record(reg, source="cli", status="processing", pid=cli_run.pid)
    before = trainings.paths(cli.id).record.read_bytes()
    queue = TrainingQueue(reg, FakeExecutor(capacity=1)).start()
    assert queue.running() == []
    queue.stop()
    time.sleep(0.1)
    assert cli_run.poll() is None and trainings.paths(cli.id).record.read_bytes() == before


def test_only_a_queues_own_runs_are_adopted_and_a_reused_pid_is_not_one(reg: Registry, processes) -> None:
    from finetune.processes import start_mark

    trainings = Trainings(reg)
    worker, resumed_by_cli, stranger = processes(), processes(), processes()
    queued = record(reg, status="processing", pid=worker.pid, pid_mark=start_mark(worker.pid), runner="queue")
    by_cli = record(reg, status="processing", pid=resumed_by_cli.pid, pid_mark=start_mark(resumed_by_cli.pid))
    dead = record(reg, status="processing", pid=stranger.pid, pid_mark=start_mark(os.getpid()), runner="queue")
    ex = FakeExecutor(capacity=2)
    queue = TrainingQueue(reg, ex).start()
    try:
        wait_for(lambda: ex.order == [dead.id])  # its run is gone (the pid is another process's): run again
        assert queue.running() == [queued.id, dead.id]
    finally:
        queue.stop()
    assert worker.wait(timeout=10) == -signal.SIGTERM  # our run: stopped with the server, queued again
    assert trainings.get(queued.id).status == "starting" and trainings.get(queued.id).pid is None
    assert resumed_by_cli.poll() is None and trainings.get(by_cli.id).status == "processing"
    assert stranger.poll() is None


def test_an_adopted_run_has_the_time_limit_too(reg: Registry, processes) -> None:
    """A run a previous server's queue started counts its time from its worker's start: past the limit it is
    stopped (SIGTERM to that process) and fails, naming the limit."""
    from finetune.processes import start_mark

    trainings = Trainings(reg)
    worker = processes()
    queued = record(reg, status="processing", pid=worker.pid, pid_mark=start_mark(worker.pid), runner="queue")
    queue = TrainingQueue(reg, FakeExecutor(capacity=1), max_run_s=0.5).start()
    try:
        assert queue.running() == [queued.id]
        assert worker.wait(timeout=10) == -signal.SIGTERM
        wait_for(lambda: trainings.get(queued.id).status == "failed")
        assert "limit of 0.5s (--max-training-time)" in trainings.get(queued.id).error
    finally:
        queue.stop()


def test_a_failed_start_leaves_adopted_runs_alone(reg: Registry, processes) -> None:
    from finetune.processes import start_mark

    trainings = Trainings(reg)
    worker = processes()
    queued = record(reg, status="processing", pid=worker.pid, pid_mark=start_mark(worker.pid), runner="queue")
    queue = TrainingQueue(reg, FakeExecutor(capacity=1)).start()
    assert queue.running() == [queued.id]
    queue.stop(abort=True)
    time.sleep(0.1)
    assert worker.poll() is None and trainings.get(queued.id).status == "processing"


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


def test_closing_ends_a_spare_worker_at_once(tmp_path) -> None:
    """A spare worker still importing the training stack is ended at once, not waited for (it holds nothing)."""
    from finetune.queue import LocalExecutor

    executor = LocalExecutor(tmp_path, workers=1, gpus=[], prestart=True)
    spare = executor.slots[0].spare
    assert spare is not None and spare.poll() is None
    started = time.monotonic()
    executor.close()
    assert time.monotonic() - started < 1.0 and spare.poll() is not None


def test_a_server_keeps_a_spare_training_worker_as_its_settings_say(registry: Registry) -> None:
    from service import running_server, server_settings

    from finetune.server.settings import ServerSettings

    for settings, spare in ((ServerSettings(workers=1), True), (server_settings(workers=1), False)):
        with running_server(registry, settings) as server:
            executor = server.app.state.trainings.queue.executor
            assert (executor.slots[0].spare is not None) == spare


def test_the_launcher_runs_from_the_package_and_from_scripts(tmp_path) -> None:
    """The queue starts a slot of several GPUs with ``python -m finetune.launch`` (no source checkout needed);
    scripts/launch.py is the same command."""
    import sys
    from pathlib import Path

    args = ["--num-processes", "2", "--cpu", "--registry", str(tmp_path), "--dry-run", "--", "--resume", "t1"]
    printed = []
    for command in ([sys.executable, "-m", "finetune.launch"],
                    [sys.executable, str(Path(__file__).resolve().parents[1] / "scripts" / "launch.py")]):
        out = subprocess.run([*command, *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        printed.append(out.stdout.split(" --main_process_port ")[0] + out.stdout.split("-m finetune ")[1])
    assert printed[0] == printed[1]
    assert "--num_processes 2" in printed[0] and f"--registry {tmp_path} train --resume t1" in printed[0]


@pytest.mark.slow
def test_a_slot_with_two_devices_trains_through_the_launcher(tiny_model_dir, registry: Registry) -> None:
    """The multi-GPU path (finetune.launch, accelerate's launcher) run on the CPU: this machine's two "GPUs"
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
    heard: list[dict] = []
    executor.report_to(lambda training_id, event: heard.append(event))
    run_queued(registry, executor, record.id)
    done = Trainings(registry).get(record.id)
    assert done.status == "succeeded", done.error
    assert done.metrics["processes"] == 2 and [v.ref for v in registry.list_versions("alice/y")] == ["alice/y:1"]
    # The launched processes report through the launcher's pipe too (the main one: each step once).
    assert [e["row"]["step"] for e in heard if e["kind"] == "metrics"] == [1, 2]
    assert [e["status"] for e in heard if e["kind"] == "status"][-1] == "succeeded" and heard[-1]["kind"] == "exit"
