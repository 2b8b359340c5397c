"""Training progress as events (finetune.queue.events): the hub every follower subscribes to, and the one file
watcher for the trainings no local worker reports on."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from helpers import run_queued

from finetune.queue.events import FileWatcher, TrainingEvents
from finetune.registry import Registry
from finetune.registry.jobs import TrainingRecord, Trainings, new_record_id


def test_a_subscriber_gets_its_trainings_events_in_order_until_the_final_status() -> None:
    hub = TrainingEvents()
    with hub.subscribe("t1") as sub:
        hub.publish("t1", "status", {"status": "processing"})
        hub.publish("t2", "status", {"status": "processing"})  # another training's: not this subscriber's
        hub.publish("t1", "metrics", {"row": {"step": 1, "loss": 2.0}})
        hub.publish("t1", "status", {"status": "succeeded"})
        seen = [(e.kind, e.data.get("status")) for e in sub]  # ends after the final status
    assert seen == [("status", "processing"), ("metrics", None), ("status", "succeeded")]
    assert hub.latest("t1").data == {"status": "succeeded", "step": 1}


def test_a_late_subscriber_starts_from_the_latest_state_and_sees_the_final_status() -> None:
    hub = TrainingEvents()
    hub.publish("t1", "status", {"status": "processing"})
    hub.publish("t1", "log", {"line": "step 1"})
    hub.publish("t1", "status", {"status": "failed"})
    sub = hub.subscribe("t1")
    first = sub.get(timeout=1)
    assert first.kind == "status" and first.data["status"] == "failed" and first.final and first.seq == 3
    assert list(sub) == []  # it ended with the final status
    assert hub.subscribe("unknown").get(timeout=0.05) is None  # nothing known yet: nothing made up


def test_a_slow_subscriber_keeps_only_the_newest_events_and_counts_what_it_missed() -> None:
    hub = TrainingEvents()
    sub = hub.subscribe("t1", maxlen=3)
    for step in range(1, 6):
        hub.publish("t1", "metrics", {"row": {"step": step}})
    assert [sub.get(0).data["row"]["step"] for _ in range(3)] == [3, 4, 5] and sub.missed == 2
    sub.close()
    hub.publish("t1", "metrics", {"row": {"step": 6}})
    assert sub.get(0) is None  # closed: nothing more


def test_the_hub_forgets_the_oldest_ended_trainings_past_its_bound(monkeypatch) -> None:
    import finetune.queue.events as events

    monkeypatch.setattr(events, "KEEP_ENDED", 2)
    hub = TrainingEvents()
    hub.publish("running", "status", {"status": "processing"})
    for name in ("a", "b", "c"):
        hub.publish(name, "status", {"status": "succeeded"})
    assert hub.latest("a") is None  # the oldest ended one is forgotten (its files still say everything)
    assert [hub.latest(n).data["status"] for n in ("b", "c", "running")] == ["succeeded", "succeeded", "processing"]


def test_a_wait_ends_at_the_next_event_or_at_once_when_one_came_already() -> None:
    hub = TrainingEvents()
    hub.publish("t1", "status", {"status": "processing"})
    threading.Timer(0.2, hub.publish, ("t1", "log", {"line": "x"})).start()
    started = time.monotonic()
    assert hub.wait("t1", since=1, timeout=10) == 2 and time.monotonic() - started < 5
    assert hub.wait("t1", since=1, timeout=10) == 2  # newer than `since` already: no wait
    assert hub.wait("t1", since=99, timeout=10) == 2  # a `since` from a previous server: no wait either
    started = time.monotonic()
    assert hub.wait("t1", since=2, timeout=0.2) == 2 and time.monotonic() - started >= 0.2

    async def waits() -> int:
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, lambda: threading.Thread(target=hub.publish, args=("t1", "log", {})).start())
        return await hub.wait_async("t1", since=2, timeout=10)

    assert asyncio.run(waits()) == 3
    assert hub.followed() == set()  # the waits ended: nobody follows t1


def test_a_listener_is_called_and_only_followed_unreported_trainings_are_watched() -> None:
    hub = TrainingEvents()
    heard = []
    listening = hub.listen(heard.append, "t1")
    hub.subscribe("t2")
    hub.feeding("t2", True)  # a local worker reports on t2: the file watcher leaves it alone
    assert hub.followed() == {"t1"}
    hub.publish("t1", "status", {"status": "processing"})
    listening.close()
    hub.publish("t1", "status", {"status": "succeeded"})
    assert [e.data["status"] for e in heard] == ["processing"]
    hub.feeding("t2", False)
    assert hub.followed() == {"t2"}


@pytest.fixture
def record(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> TrainingRecord:
    monkeypatch.setenv("FINETUNE_FSYNC", "0")
    registry.create_model("alice/y")
    return Trainings(registry).create(TrainingRecord(id=new_record_id(), destination="alice/y", source="api"))


def test_the_file_watcher_publishes_what_changed_in_a_followed_trainings_files(registry: Registry,
                                                                               record: TrainingRecord) -> None:
    """A training run elsewhere (a cluster, `finetune train`): the watcher turns its file changes into events."""
    trainings, hub = Trainings(registry), TrainingEvents()
    watcher = FileWatcher(hub, trainings)
    sub = hub.subscribe(record.id)
    watcher.look()
    assert sub.get(0).data["status"] == "starting"  # the first look says where it is
    watcher.look()
    assert sub.get(0) is None  # nothing changed: nothing published
    trainings.update(record, status="processing")
    trainings.paths(record.id).log.write_text("loading\n")
    watcher.look()
    with open(trainings.paths(record.id).log, "a") as f:
        f.write("step 1\n")
    trainings.paths(record.id).metrics.write_text('{"step": 1}\n')
    watcher.look()
    kinds = []
    while (event := sub.get(0)) is not None:
        kinds.append((event.kind, event.data.get("status")))
    assert kinds == [("status", "processing"), ("log", None), ("metrics", None), ("log", None)]
    trainings.update(record, status="succeeded")
    watcher.start()
    try:
        final = [e for e in sub if e.kind == "status"]
    finally:
        watcher.stop()
    assert final[-1].data["status"] == "succeeded"


def test_webhooks_follow_a_training_through_the_events_without_a_polling_loop(registry: Registry,
                                                                                record: TrainingRecord) -> None:
    from test_webhooks import SECRET, Captured

    from finetune.server.webhooks import TrainingWebhooks

    trainings, hub = Trainings(registry), TrainingEvents()
    record = trainings.update(record, webhook="http://receiver/")
    captured = Captured()
    hooks = TrainingWebhooks(trainings, captured, lambda r, url: {"id": r.id, "status": str(r.status)},
                             secret=lambda owner: SECRET, owner_of=lambda r: "alice", base_url="http://x", events=hub)
    hooks.start()
    try:
        hooks.watch(record)
        trainings.update(record, status="succeeded", output={"version": "alice/y:1"})
        time.sleep(0.3)
        assert [p["status"] for _, p in captured.sent] == ["starting"]  # no event yet: nothing looked at
        hub.publish(record.id, "status", {"status": "succeeded"})
        deadline = time.monotonic() + 10
        while len(captured.sent) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [p["status"] for _, p in captured.sent] == ["starting", "succeeded", "succeeded"]  # output, done
        assert hub.followed() == set()  # it ended: the webhooks no longer follow it
    finally:
        hooks.stop()


@pytest.mark.slow
def test_a_local_workers_training_reports_status_steps_log_and_exit(tiny_model_dir, registry: Registry) -> None:
    """The training worker reports through its supervisor: every status change, each logged step's metrics, the
    log lines and its exit, all as they happen (and the files hold the same)."""
    from finetune.config import config_from_dict
    from finetune.queue import LocalExecutor
    from finetune.registry.sources import import_base
    from finetune.tiny import sample_data_path
    from finetune.training import submit_training

    base = import_base(registry, "local/tiny", str(tiny_model_dir))
    registry.create_model("alice/y")
    config = config_from_dict({"base_model": base.ref, "data": {"path": str(sample_data_path()), "max_seq_len": 64},
                               "train": {"max_steps": 3, "batch_size": 2, "log_every": 1}})
    record = submit_training(config, registry=registry, destination="alice/y", source="api")
    heard: list[tuple[str, dict]] = []
    executor = LocalExecutor(registry.root, workers=1, gpus=[], prestart=False)
    executor.report_to(lambda training_id, event: heard.append((training_id, event)))
    run_queued(registry, executor, record.id)
    assert {i for i, _ in heard} == {record.id}
    kinds = [e["kind"] for _, e in heard]
    statuses = [e["status"] for _, e in heard if e["kind"] == "status"]
    assert kinds[0] == "attached" and kinds[-1] == "exit" and heard[-1][1]["code"] == 0
    assert statuses[0] == "starting" and "processing" in statuses and statuses[-1] == "succeeded"
    assert [e["row"]["step"] for _, e in heard if e["kind"] == "metrics"] == [1, 2, 3]
    assert any(e["line"].startswith("step 3/3") for _, e in heard if e["kind"] == "log")
    assert Trainings(registry).get(record.id).status == "succeeded"


def test_the_live_view_answers_when_the_training_changes_not_every_second(live_server, monkeypatch) -> None:
    """The training page's live request, given the ``seq`` of its last answer, waits for the training's next event
    (here: a record changed by another process, seen by the one file watcher) instead of being asked again each
    second; with nothing happening it answers after LIVE_WAIT_S."""
    from test_web import sign_in

    monkeypatch.setattr("finetune.web.live.LIVE_WAIT_S", 1.0)
    monkeypatch.setenv("FINETUNE_FSYNC", "0")
    reg = live_server.registry
    reg.create_model("alice/y")
    trainings = Trainings(reg)
    record = trainings.create(TrainingRecord(id=new_record_id(), destination="alice/y", source="cli",
                                             status="processing"))
    client, _ = sign_in(live_server)
    url = f"/trainings/{record.id}/live"
    live = client.get(url).json()  # no `since`: at once
    assert live["status"] == "processing" and isinstance(live["seq"], int)
    live = client.get(url, params={"since": live["seq"]}).json()  # the watcher's first look: the status
    started = time.monotonic()
    quiet = client.get(url, params={"since": live["seq"]}).json()
    assert time.monotonic() - started >= 0.9 and quiet["seq"] == live["seq"]  # nothing changed: the wait ran out
    monkeypatch.setattr("finetune.web.live.LIVE_WAIT_S", 30.0)
    threading.Timer(0.5, trainings.update, (record,), {"status": "succeeded"}).start()
    started = time.monotonic()
    done = client.get(url, params={"since": quiet["seq"]}).json()
    assert done["status"] == "succeeded" and done["final"] and done["seq"] > quiet["seq"]
    assert 0.4 <= time.monotonic() - started < 5  # answered on the change, well before the 30 s wait
    started = time.monotonic()
    assert client.get(url, params={"since": done["seq"]}).json()["final"]  # ended: answers at once
    assert time.monotonic() - started < 1
