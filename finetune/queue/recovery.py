"""What a starting queue takes back from the registry: waiting and interrupted trainings, and live queue runs.

A queue keeps nothing of its own on disk: the training records are the truth. When a server starts, every
record that is not final is one of three things:

- a run still going that a previous server's queue started (its record names the process by pid and start
  mark, :mod:`finetune.processes`): watched as an :class:`AdoptedJob` until it ends, never started twice; an
  executor whose runs outlive the server (a cluster's) finds its own through its ``adopt``;
- a training the server queued that waits or was interrupted mid-run (server and worker gone): queued again,
  oldest first;
- a run that is not a queue's (``finetune train``, the Python API, a CLI ``--resume`` of an API training), or
  one claimed on another machine: left alone, never adopted, so never stopped with this server.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field

from ..processes import ProcessRef, started_at
from ..registry.jobs import FINAL, TrainingRecord, Trainings
from .executor import Executor, Job


class AdoptedJob:
    """A queue run that outlived the previous server (its process is not our child): watched through the
    process that claimed it (pid and start mark, so a reused pid is neither watched nor signalled)."""

    def __init__(self, training_id: str, process: ProcessRef):
        self.training_id, self.process = training_id, process

    def poll(self) -> int | None:
        return None if self.process.alive() else 0

    def stop(self) -> None:
        self.process.send(signal.SIGTERM)

    def kill(self) -> None:
        self.process.send(signal.SIGKILL)


@dataclass
class Running:
    """A run the queue watches from now on: its job, when it began (``time.monotonic()``), and whether a previous
    server's queue started it."""

    record: TrainingRecord
    job: Job
    began: float
    adopted: bool = False


@dataclass
class Recovered:
    """What :func:`recover` found: runs to watch, and trainings to queue."""

    running: list[Running] = field(default_factory=list)
    pending: list[TrainingRecord] = field(default_factory=list)  # oldest first


def recover(trainings: Trainings, executor: Executor, resubmit_sources: tuple[str, ...]) -> Recovered:
    """Sort the registry's unfinished trainings into runs to watch and trainings to queue, oldest first
    (records of interrupted runs are set back to ``starting`` on the way)."""
    found = Recovered()
    adopt = getattr(executor, "adopt", None)
    for record in sorted(trainings.unfinished(), key=lambda r: (r.created_at, r.id)):
        if record.status in FINAL:
            continue
        job = adopt(record) if adopt is not None else None
        if job is not None:
            found.running.append(Running(record, job, time.monotonic()))
            continue
        process = trainings.process(record)
        if process is not None and not process.local:
            continue  # claimed on another machine (a cluster's node): not this queue's to judge, never run twice
        if process is not None and process.alive():
            # Records written before runners were noted: a server-submitted one was run by its queue.
            legacy_queue_run = record.runner is None and record.pid_mark is None and record.source in resubmit_sources
            if record.runner == "queue" or legacy_queue_run:
                # Its run time counts from when its worker started, as for the runs this queue starts.
                began = _monotonic_at(started_at(process.pid))
                found.running.append(Running(record, AdoptedJob(record.id, process), began, adopted=True))
        elif record.source in resubmit_sources:
            if record.status != "starting" or record.pid:  # interrupted mid-run (server and worker gone)
                trainings.update(record, status="starting", pid=None, pid_mark=None, host=None, runner=None)
            found.pending.append(record)
    return found


def _monotonic_at(epoch_s: float | None) -> float:
    """The ``time.monotonic()`` value of a wall-clock time (now, when it is unknown or in the future)."""
    now = time.monotonic()
    if epoch_s is None:
        return now
    age = time.time() - epoch_s
    return now - age if age > 0 else now
