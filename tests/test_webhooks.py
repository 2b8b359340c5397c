"""Webhooks without a server: the Standard Webhooks signature, delivery with retries, and which events a
training's changes produce. The end-to-end path (a real server, a real receiver) is in test_api_trainings.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from finetune.launch import free_port
from finetune.registry import Registry
from finetune.registry.jobs import TrainingRecord, Trainings, new_record_id
from finetune.server.webhook_targets import WebhookPolicy
from finetune.server.webhooks import TrainingWebhooks, WebhookSender, sign, verify

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
LOOPBACK = WebhookPolicy(allowed=("127.0.0.1",))  # the receivers here listen on loopback


def test_signature_matches_the_standard_webhooks_example() -> None:
    # The example of the Standard Webhooks specification (and of Svix's docs).
    body = b'{"test": 2432232314}'
    assert sign(SECRET, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == \
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_verify_rejects_tampering_wrong_secret_and_old_messages() -> None:
    now = int(time.time())
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(now),
               "webhook-signature": sign(SECRET, "msg_1", now, b"{}")}
    assert verify(SECRET, headers, b"{}")
    assert not verify(SECRET, headers, b'{"x":1}')
    assert not verify("whsec_" + "A" * 44, headers, b"{}")
    old = now - 3600
    stale = {**headers, "webhook-timestamp": str(old), "webhook-signature": sign(SECRET, "msg_1", old, b"{}")}
    assert not verify(SECRET, stale, b"{}")
    assert not verify(SECRET, {}, b"{}")


@pytest.fixture
def flaky_receiver() -> Iterator[tuple[str, list[dict], list[int]]]:
    """Answers 500 to the first two requests, then 204; records every request's headers."""
    seen: list[dict] = []
    codes = [500, 500]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(dict(self.headers))
            self.send_response(codes.pop(0) if codes else 204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", seen, codes
    httpd.shutdown()
    httpd.server_close()


def test_failed_deliveries_are_retried_with_the_same_message_id(flaky_receiver) -> None:
    url, seen, _ = flaky_receiver
    sender = WebhookSender(attempts=5, backoff_s=0.05, timeout_s=5, policy=LOOPBACK)
    sender.start()
    try:
        msg_id = sender.send("t1", url, {"id": "t1"}, SECRET)
        deadline = time.monotonic() + 10
        while sender.delivered < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        sender.stop()
    assert len(seen) == 3 and {h["webhook-id"] for h in seen} == {msg_id}


def test_a_dead_receiver_never_blocks_the_sender() -> None:
    dead = f"http://127.0.0.1:{free_port()}/"
    sender = WebhookSender(attempts=2, backoff_s=0.05, timeout_s=1, policy=LOOPBACK)
    sender.start()
    t0 = time.monotonic()
    for i in range(20):
        sender.send(f"t{i}", dead, {"id": i}, SECRET)
    assert time.monotonic() - t0 < 0.5  # send() only queues
    deadline = time.monotonic() + 10
    while sender.failed < 20:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    sender.stop()
    assert sender.delivered == 0


class Captured:
    """A stand-in for WebhookSender that keeps what it was given."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict]] = []

    def send(self, key: str, url: str, payload: dict, secret: str, account: str = "") -> str:
        self.sent.append((url, payload))
        return "msg"

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


@pytest.mark.parametrize("events, expected", [
    (None, ["starting", "succeeded", "succeeded", "succeeded"]),  # start, then logs + output + completed at the end
    (["completed"], ["succeeded"]),
    (["start", "completed"], ["starting", "succeeded"]),
])
def test_events_follow_the_record(registry: Registry, monkeypatch: pytest.MonkeyPatch, events, expected) -> None:
    monkeypatch.setenv("FINETUNE_FSYNC", "0")
    registry.create_model("alice/y")
    trainings = Trainings(registry)
    record = trainings.create(TrainingRecord(id=new_record_id(), destination="alice/y", source="api",
                                             webhook="http://receiver/", webhook_events_filter=events))
    captured = Captured()
    hooks = TrainingWebhooks(trainings, captured, lambda r, url: {"id": r.id, "status": str(r.status)},
                             secret=lambda owner: SECRET, owner_of=lambda r: "alice", base_url="http://x")
    hooks.watch(record)
    hooks._check(record.id)  # nothing new: nothing sent again
    trainings.paths(record.id).log.write_text("loading\n")
    trainings.update(record, status="succeeded", output={"version": "alice/y:1"})
    hooks._check(record.id)
    hooks._check(record.id)  # ended: no longer watched
    assert [p["status"] for _, p in captured.sent] == expected
    assert {url for url, _ in captured.sent} <= {"http://receiver/"}
