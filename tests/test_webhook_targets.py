"""Where webhooks may go (issue 32, "Webhooks (SSRF)") and how deliveries share the sender: URLs the API refuses
(422, checked without sending anything), addresses every attempt refuses (nothing sent), the operator's
``--allow-webhook-host`` for loopback receivers, bounded attempts, and one lane per account.

All traffic stays on loopback: refusals are checked without connecting, and names that would resolve elsewhere
are given to the resolver by the test (``socket.getaddrinfo`` patched), never looked up.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from service import idle_training_queue, running_server, server_settings

from finetune.errors import UsageError
from finetune.registry import Registry
from finetune.registry.sources import import_base
from finetune.server.webhook_targets import WebhookPolicy, WebhookRefused
from finetune.server.webhooks import WebhookSender, check_webhook, verify

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
LOOPBACK = WebhookPolicy(allowed=("127.0.0.1",))

REFUSED = [
    "http://127.0.0.1:9/hook", "http://127.1/", "http://0/", "http://0.0.0.0/", "http://2130706433/",
    "http://0x7f000001/", "http://017700000001/", "http://169.254.169.254/latest/meta-data/", "http://[::1]/",
    "http://[::ffff:127.0.0.1]/", "http://localhost:8000/", "http://api.localhost/", "http://10.0.0.1/",
    "http://192.168.1.1/", "http://172.16.0.1/", "http://100.64.0.1/", "http://[fe80::1]/", "http://224.0.0.1/",
    "http://user:pass@hooks.example.org/", "http://@hooks.example.org/", "http://hooks.example.org/a\r\nX-Evil: 1",
    "http://hooks.example.org/a b", "http://hooks.example.org/\x00", "http://hooks.example.org/" + "a" * 2048,
    "ftp://hooks.example.org/", "javascript:alert(1)", "http:///nohost", "http://hooks.example.org:99999/",
]


@pytest.fixture
def idle_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    idle_training_queue(monkeypatch)


class Receiver:
    """A loopback webhook receiver: records each request (path, headers, body) and answers ``status``."""

    def __init__(self, status: int = 204, headers: dict[str, str] | None = None):
        self.requests: list[tuple[str, dict, bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append((self.path, dict(self.headers), body))
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def _wait(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------- the API
@pytest.fixture
def trainable(live_server, tiny_model_dir):
    base = import_base(live_server.registry, "alice/base", str(tiny_model_dir))
    live_server.registry.create_model("alice/y")
    return live_server, f"/v1/models/alice/base/versions/{base.id}/trainings", base.id


def _upload(http) -> str:
    return http.post("/v1/files", files={"content": ("t.jsonl", b'{"text": "x"}\n')}).json()["urls"]["get"]


def test_the_api_refuses_webhooks_to_non_public_hosts_credentials_crlf_and_long_urls(trainable, idle_queue):
    server, url, version_id = trainable
    http = server.http("alice")
    data = _upload(http)  # an input that is right in every other way
    for webhook in REFUSED:
        r = http.post(url, json={"destination": "alice/y", "input": {"data.path": data, "train.max_steps": 1},
                                 "webhook": webhook})
        assert r.status_code == 422 and "webhook" in r.json()["detail"], (webhook, r.status_code, r.text)
        r = http.post("/v1/predictions", json={"version": version_id, "input": {"prompt": "hi"}, "webhook": webhook})
        assert r.status_code == 422 and "webhook" in r.json()["detail"], (webhook, r.status_code, r.text)
    assert http.get("/v1/trainings").json()["results"] == []  # nothing was created
    assert http.get("/v1/predictions").json()["results"] == []


def test_an_allowed_loopback_receiver_gets_signed_webhooks_and_the_server_itself_never(
        tiny_model_dir, tmp_path, idle_queue, receiver: Receiver):
    reg = Registry(tmp_path / "registry")
    base = import_base(reg, "alice/base", str(tiny_model_dir))
    reg.create_model("alice/y")
    with running_server(reg, server_settings(allow_webhook_hosts=("127.0.0.1",))) as server:
        http = server.http("alice")
        url = f"/v1/models/alice/base/versions/{base.id}/trainings"
        data = _upload(http)
        itself = http.post(url, json={"destination": "alice/y", "input": {"data.path": data, "train.max_steps": 1},
                                      "webhook": f"{server.url}/v1/account"})
        assert itself.status_code == 422 and "this server itself" in itself.json()["detail"]
        loud = receiver.url.replace("http://", "HTTP://")  # the scheme is case-insensitive
        r = http.post(url, json={"destination": "alice/y", "input": {"data.path": data, "train.max_steps": 1},
                                 "webhook": loud, "webhook_events_filter": ["start"]})
        assert r.status_code == 201, r.text
        _wait(lambda: receiver.requests, 10, "the start webhook did not arrive")
        secret = http.get("/v1/webhooks/default/secret").json()["key"]
        path, headers, body = receiver.requests[0]
        assert path == "/hook" and verify(secret, headers, body) and json.loads(body)["id"] == r.json()["id"]


def test_the_servers_sender_refuses_non_public_addresses_and_sends_nothing(live_server, receiver: Receiver):
    sender = live_server.app.state.trainings.webhooks.sender  # this server was started without the allow flag
    for url in (receiver.url, receiver.url.replace("127.0.0.1", "localhost")):
        sender.send("t1", url, {"id": "t1"}, SECRET, account="alice")
    _wait(lambda: sender.failed + sender.delivered == 2, 10, "the deliveries did not end")
    assert receiver.requests == [] and sender.delivered == 0 and sender.refused == 2


# ---------------------------------------------------------------------------------------------- each attempt
def test_each_attempt_resolves_and_checks_the_address_again(monkeypatch: pytest.MonkeyPatch) -> None:
    flaky = Receiver(status=500)
    answers = iter(["127.0.0.1", "10.1.2.3", "127.0.0.1"])  # the name moves to a private address after one try
    real = socket.getaddrinfo

    def resolver(host, port, *args, **kwargs):
        if host == "hooks.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    sender = WebhookSender(attempts=3, backoff_s=0.01, timeout_s=5, policy=WebhookPolicy(allowed=("127.0.0.0/8",)))
    sender.start()
    try:
        sender.send("t", f"http://hooks.test:{flaky.port}/hook", {"id": "t"}, SECRET, account="alice")
        _wait(lambda: sender.failed == 1, 10, "the delivery did not end")
    finally:
        sender.stop()
        flaky.close()
    assert len(flaky.requests) == 1 and sender.refused == 1  # the retry found a private address: not sent


def test_redirects_are_not_followed(receiver: Receiver) -> None:
    redirecting = Receiver(status=307, headers={"Location": receiver.url})
    sender = WebhookSender(attempts=2, backoff_s=0.01, timeout_s=5, policy=LOOPBACK)
    sender.start()
    try:
        sender.send("t", redirecting.url, {"id": "t"}, SECRET, account="alice")
        _wait(lambda: sender.failed == 1, 10, "the delivery did not end")
    finally:
        sender.stop()
        redirecting.close()
    assert len(redirecting.requests) == 2 and receiver.requests == []


def test_the_policy_checks_literals_without_dns_and_names_after_resolving(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = WebhookPolicy()
    for url in REFUSED:
        with pytest.raises(UsageError):
            check_webhook(url, None, policy)
    check_webhook("HTTP://hooks.example.org/x?y=1", ["start", "completed"], policy)  # public-looking: at delivery
    with pytest.raises(UsageError):
        check_webhook("https://hooks.example.org/", ["nope"], policy)
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, *a, **k: [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", port))])
    with pytest.raises(WebhookRefused, match="10.0.0.7"):  # one private address among public ones: refused
        policy.resolve("mixed.test", 443)
    assert str(WebhookPolicy(allowed=("10.0.0.0/8",)).resolve("mixed.test", 443)) == "93.184.216.34"
    with pytest.raises(UsageError):
        WebhookPolicy(allowed=("not a host/",))


# ---------------------------------------------------------------------------------------------- lanes, timeouts
class _Silent:
    """A loopback server that accepts connections and never answers (held open until closed)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"
        self.held: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.closed = True
        self.sock.close()
        for conn in self.held:
            conn.close()


def test_one_accounts_silent_receiver_never_delays_another_accounts_webhooks(receiver: Receiver) -> None:
    silent = _Silent()
    sender = WebhookSender(attempts=1, timeout_s=5, policy=LOOPBACK)
    sender.start()
    try:
        for i in range(64):  # distinct trainings of one account, all to a receiver that never answers
            sender.send(f"alice-{i}", silent.url, {"id": i}, SECRET, account="alice")
        time.sleep(0.2)
        t0 = time.monotonic()
        sender.send("bob-1", receiver.url, {"id": "bob"}, SECRET, account="bob")
        _wait(lambda: receiver.requests, 10, "bob's webhook did not arrive")
        assert time.monotonic() - t0 < 2.0  # not behind alice's 5-second attempts
    finally:
        silent.close()
        sender.stop(drain_s=0)


def test_an_attempt_ends_within_its_timeout_however_slowly_the_receiver_answers() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def dribble() -> None:  # a status line, then one header byte every 0.2 s: each read succeeds, slowly
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            for _ in range(50):
                if stop.wait(0.2):
                    return
                try:
                    conn.sendall(b"a")
                except OSError:
                    return

    threading.Thread(target=dribble, daemon=True).start()
    sender = WebhookSender(attempts=1, timeout_s=1.0, policy=LOOPBACK)
    sender.start()
    try:
        t0 = time.monotonic()
        sender.send("t", f"http://127.0.0.1:{server.getsockname()[1]}/", {"id": "t"}, SECRET, account="alice")
        _wait(lambda: sender.failed == 1, 8, "the attempt did not end")
        assert time.monotonic() - t0 < 3.0
    finally:
        stop.set()
        sender.stop(drain_s=0)
        server.close()


def test_serve_checks_allow_webhook_host_at_start() -> None:
    from finetune.cli import main

    assert main(["serve", "--allow-webhook-host", "bad host/x", "--port", "1"]) == 2
