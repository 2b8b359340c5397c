"""Trainings over HTTP against a real server (tests/service.py) with real worker processes.

The official ``replicate`` client creates, polls and cancels trainings; raw httpx covers bad input, a missing
destination, a restart with a training queued and a worker killed mid-run. Webhooks go to a local receiver
that checks every signature. Trainings are a few steps of the session's tiny model.
"""

from __future__ import annotations

import io
import json
import os
import signal
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from helpers import FakeExecutor
from service import LiveServer, running_server

from finetune.launch import free_port
from finetune.registry import Registry
from finetune.registry.jobs import Trainings
from finetune.registry.sources import import_base
from finetune.server.settings import ServerSettings
from finetune.server.webhooks import verify
from finetune.tiny import sample_data_path

DATA = sample_data_path()
SHORT = {"data": {"path": str(DATA), "max_seq_len": 128}, "train.max_steps": 2, "train.batch_size": 4}
LONG = {**SHORT, "train.max_steps": 100_000}  # runs until canceled or killed
FINAL = ("succeeded", "failed", "canceled")


def make_registry(root: Path, tiny_model_dir: Path) -> tuple[Registry, str]:
    """A registry with the public base ``base/x`` (the tiny model); returns it and the base's version id."""
    reg = Registry(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_FSYNC", "0")
        base = import_base(reg, "base/x", str(tiny_model_dir), visibility="public")
    return reg, base.id


def settings(workers: int) -> ServerSettings:
    # webhooks go to receivers on loopback, which a server reaches only when its operator allows it
    return ServerSettings(workers=workers, allowed_data_dirs=(DATA.parent.resolve(),),
                          allow_webhook_hosts=("127.0.0.1",))


@pytest.fixture(scope="module")
def world(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, str]]:
    """One server (two worker slots) for the module's tests: ``(server, base version id)``."""
    reg, base_id = make_registry(tmp_path_factory.mktemp("api-trainings") / "registry", tiny_model_dir)
    with running_server(reg, settings(workers=2)) as server:
        yield server, base_id


def wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def wait_status(http, training_id: str, statuses: tuple[str, ...], timeout_s: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        obj = http.get(f"/v1/trainings/{training_id}").json()
        if obj["status"] in statuses:
            return obj
        assert time.monotonic() < deadline, f"training {training_id} stuck in {obj['status']}: {obj['logs'][-500:]}"
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------- webhooks
@dataclass
class Receiver:
    url: str
    secret: str = ""
    messages: list[dict] = field(default_factory=list)
    bad_signatures: int = 0

    def statuses(self) -> list[str]:
        return [m["status"] for m in self.messages]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A local webhook receiver that verifies each signature with the secret the test sets."""
    state = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if verify(state.secret, dict(self.headers), body):
                state.messages.append(json.loads(body))
            else:
                state.bad_signatures += 1
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/hook"
    yield state
    httpd.shutdown()
    httpd.server_close()


def dead_url() -> str:
    """A URL nothing listens on."""
    return f"http://127.0.0.1:{free_port()}/hook"


# ---------------------------------------------------------------------------------------------- the client
@pytest.mark.slow
def test_client_trains_two_versions_and_weights_load_in_peft(world, receiver: Receiver, tiny_model_dir: Path,
                                                             tmp_path: Path) -> None:
    server, base_id = world
    client, http = server.replicate("alice"), server.http("alice")
    receiver.secret = http.get("/v1/webhooks/default/secret").json()["key"]
    client.models.create("alice", "y", visibility="private", hardware="cpu")

    # Two trainings into one destination at once; the second one's webhook receiver is down (never matters).
    # Data as uploads: one with files.create, one as a file object the client uploads itself.
    upload = client.files.create(DATA)
    first = client.trainings.create(version=f"base/x:{base_id}", destination="alice/y", webhook=receiver.url,
                                    input={**SHORT, "data": {"path": upload.urls["get"], "max_seq_len": 128}})
    with open(DATA, "rb") as f:
        second = client.trainings.create(version=f"base/x:{base_id}", destination="alice/y", webhook=dead_url(),
                                         input={**SHORT, "data": {"path": f, "max_seq_len": 128}, "train.seed": 7})
    assert first.status == "starting" and first.model == "base/x" and first.version == base_id
    assert first.input["train"]["max_steps"] == 2 and first.urls["get"].endswith(f"/v1/trainings/{first.id}")

    done = {}
    deadline = time.monotonic() + 180
    while len(done) < 2:
        assert time.monotonic() < deadline, "trainings did not finish"
        for t in (first, second):
            if t.id not in done:
                got = client.trainings.get(t.id)
                if got.status in FINAL:
                    done[t.id] = got
        time.sleep(0.2)
    a, b = done[first.id], done[second.id]
    assert a.status == b.status == "succeeded", (a.error, b.error)
    assert a.destination == "alice/y" and "published alice/y:" in a.logs

    versions = client.models.get("alice/y").versions.list()
    assert {v.id for v in versions.results} == {a.output["version"].split(":")[1], b.output["version"].split(":")[1]}
    # Numbered in order of completion: the one that finished first got number 1.
    by_completion = sorted((a, b), key=lambda t: t.completed_at)
    raw = http.get("/v1/models/alice/y/versions").json()["results"]
    numbers = {v["id"]: v["number"] for v in raw}
    assert [numbers[t.output["version"].split(":")[1]] for t in by_completion] == [1, 2]

    # The listing shows both, newest first, marked as API trainings.
    listed = http.get("/v1/trainings").json()["results"]
    assert [t["id"] for t in listed[:2]] == sorted([a.id, b.id], reverse=True)
    assert {t["source"] for t in listed[:2]} == {"api"}

    # output.weights: one tar archive that plain peft loads.
    response = http.get(a.output["weights"])
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-tar"
    tarfile.open(fileobj=io.BytesIO(response.content)).extractall(tmp_path / "weights", filter="data")
    (adapter,) = (tmp_path / "weights").iterdir()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter))
    assert any("lora_A" in name for name, _ in model.named_parameters())

    # Webhooks: signed (every one verified), start first, completed last with the output.
    deadline = time.monotonic() + 30
    while not receiver.messages or receiver.messages[-1]["status"] != "succeeded":
        assert time.monotonic() < deadline, receiver.statuses()
        time.sleep(0.1)
    assert receiver.bad_signatures == 0
    assert receiver.messages[0]["status"] == "starting" and receiver.messages[0]["id"] == a.id
    assert receiver.messages[-1]["output"] == a.output


@pytest.mark.slow
def test_cancel_queued_and_running(world, receiver: Receiver) -> None:
    server, base_id = world
    client, http = server.replicate("alice"), server.http("alice")
    receiver.secret = http.get("/v1/webhooks/default/secret").json()["key"]
    client.models.create("alice", "c", visibility="private", hardware="cpu")
    version = f"base/x:{base_id}"
    running = [client.trainings.create(version=version, input=LONG, destination="alice/c",
                                       webhook=receiver.url, webhook_events_filter=["completed"])
               for _ in range(2)]  # both worker slots busy
    queued = client.trainings.create(version=version, input=SHORT, destination="alice/c")
    canceled = client.trainings.cancel(queued.id)
    assert canceled.status == "canceled"

    wait_status(http, running[0].id, ("processing",))
    started = time.monotonic()
    for t in running:
        client.trainings.cancel(t.id)
    for t in running:
        obj = wait_status(http, t.id, FINAL, timeout_s=60)
        assert obj["status"] == "canceled" and obj["output"] is None
    assert time.monotonic() - started < 60
    assert http.get("/v1/models/alice/c/versions").json()["results"] == []
    # Canceling again is harmless: the training is returned as it is.
    assert http.post(f"/v1/trainings/{queued.id}/cancel").json()["status"] == "canceled"
    deadline = time.monotonic() + 30
    while len(receiver.messages) < 2:
        assert time.monotonic() < deadline, receiver.statuses()
        time.sleep(0.1)
    time.sleep(0.5)
    assert receiver.statuses() == ["canceled", "canceled"]  # the filter: completed only


@pytest.mark.slow
def test_killed_worker_fails_the_training_and_publishes_nothing(world) -> None:
    server, base_id = world
    http = server.http("alice")
    assert http.post("/v1/models", json={"owner": "alice", "name": "k", "visibility": "private",
                                         "hardware": "cpu"}).status_code == 201
    created = http.post(f"/v1/models/base/x/versions/{base_id}/trainings",
                        json={"destination": "alice/k", "input": LONG})
    assert created.status_code == 201, created.text
    training_id = created.json()["id"]
    wait_status(http, training_id, ("processing",))
    pid = Trainings(server.registry).get(training_id).pid
    os.kill(pid, signal.SIGKILL)
    obj = wait_status(http, training_id, FINAL, timeout_s=30)
    assert obj["status"] == "failed" and "killed by SIGKILL" in obj["error"]
    assert http.get("/v1/models/alice/k/versions").json()["results"] == []


# ---------------------------------------------------------------------------------------------- errors
def test_bad_requests_name_the_problem(world) -> None:
    server, base_id = world
    http, bob = server.http("alice"), server.http("bob")
    for owner, name, visibility in (("alice", "e", "private"), ("bob", "private", "private"),
                                    ("bob", "public", "public")):
        r = server.http(owner).post("/v1/models", json={"owner": owner, "name": name, "visibility": visibility,
                                                        "hardware": "cpu"})
        assert r.status_code == 201, r.text
    url = f"/v1/models/base/x/versions/{base_id}/trainings"
    before = len(Trainings(server.registry).list())

    def post(body: dict, path: str = url):
        r = http.post(path, json=body)
        assert r.headers["content-type"].startswith("application/problem+json"), r.text
        return r.status_code, r.json()["detail"]

    status, detail = post({"destination": "alice/e", "input": {**SHORT, "train.learning_rat": 1e-4}})
    assert status == 422 and "train.learning_rat" in detail and "did you mean 'train.lr'" in detail
    status, detail = post({"destination": "alice/e", "input": {**SHORT, "train": {"lr": -1}}})
    assert status == 422 and "train.lr" in detail
    status, detail = post({"destination": "alice/e", "input": {"data": {"path": "/etc/passwd"}}})
    assert status == 403 and "data.path" in detail and "outside the folders this server allows" in detail
    status, detail = post({"destination": "alice/e", "input": {"data": {"path": "http://elsewhere/x.jsonl"}}})
    assert status == 422 and "data.path" in detail
    status, detail = post({"destination": "alice/e", "input": {**SHORT, "base_model": "base/x:1"}})
    assert status == 422 and "base_model" in detail
    status, detail = post({"destination": "alice/e", "input": SHORT, "webhook": "ftp://x"})
    assert status == 422 and "webhook" in detail
    status, detail = post({"destination": "alice/e", "input": SHORT, "webhook_events_filter": ["done"]})
    assert status == 422 and "'done'" in detail
    # every problem also comes by field, from the body's model and the config's alike
    r = http.post(url, json={"destination": "alice/e", "webhook_events_filter": ["start", "done"],
                             "input": {**SHORT, "train": {"lr": -1}}})
    assert r.status_code == 422 and r.json()["errors"] == [
        {"field": "webhook_events_filter.1",
         "message": "Input should be 'start', 'output', 'logs' or 'completed', got 'done'"}], r.text
    r = http.post(url, json={"destination": "alice/e", "input": {**SHORT, "train": {"lr": -1, "bs": 2}}})
    assert [e["field"] for e in r.json()["errors"]] == ["train.bs", "train.lr"], r.text
    status, detail = post({"input": SHORT})
    assert status == 422 and "destination" in detail
    # A destination that does not exist, or that alice may not see, in Replicate's own words.
    for destination in ("alice/nope", "bob/private"):
        status, detail = post({"destination": destination, "input": SHORT})
        assert status == 404 and "The specified training destination does not exist" in detail
    status, _ = post({"destination": "bob/public", "input": SHORT})
    assert status == 403  # visible, but only bob trains into it
    status, _ = post({"destination": "alice/e", "input": SHORT}, url.replace(base_id, "f" * 64))
    assert status == 404
    assert len(Trainings(server.registry).list()) == before  # nothing was submitted

    # Another owner's training is 404, as an unknown one.
    r = bob.post(f"/v1/models/base/x/versions/{base_id}/trainings",
                 json={"destination": "bob/private", "input": {**SHORT, "train.max_steps": 1}})
    assert r.status_code == 201, r.text
    for path in (f"/v1/trainings/{r.json()['id']}", "/v1/trainings/20000101-000000-abcdef", "/v1/trainings/..x"):
        assert http.get(path).status_code == 404
    assert http.post(f"/v1/trainings/{r.json()['id']}/cancel").status_code == 404
    assert r.json()["id"] not in [t["id"] for t in http.get("/v1/trainings").json()["results"]]
    assert http.get("/v1/models/bob/private/versions/1/weights").status_code == 404


# ---------------------------------------------------------------------------------------------- restart
@pytest.mark.slow
def test_restart_runs_the_queued_training(tiny_model_dir: Path, tmp_path: Path) -> None:
    reg, base_id = make_registry(tmp_path / "registry", tiny_model_dir)
    url = f"/v1/models/base/x/versions/{base_id}/trainings"
    with running_server(reg, settings(workers=1)) as server:
        http = server.http("alice")
        http.post("/v1/models", json={"owner": "alice", "name": "r", "visibility": "private", "hardware": "cpu"})
        long_id = http.post(url, json={"destination": "alice/r", "input": LONG}).json()["id"]
        queued_id = http.post(url, json={"destination": "alice/r", "input": SHORT}).json()["id"]
        wait_status(http, long_id, ("processing",))
        assert http.get(f"/v1/trainings/{queued_id}").json()["status"] == "starting"
    # Stopped: the running training was put back in the queue, ahead of the one that waited.
    trainings = Trainings(reg)
    assert trainings.get(long_id).status == "starting" and trainings.get(queued_id).status == "starting"

    with running_server(reg, settings(workers=1)) as server:
        http = server.http("alice")
        wait_status(http, long_id, ("processing",))
        assert http.post(f"/v1/trainings/{long_id}/cancel").status_code == 200
        obj = wait_status(http, queued_id, FINAL)
        assert obj["status"] == "succeeded", obj["error"]
        assert obj["output"]["version"].startswith("alice/r:")
        assert http.get(f"/v1/trainings/{long_id}").json()["status"] == "canceled"


# ---------------------------------------------------------------------------------------------- limits
def test_an_account_is_capped_and_accounts_take_turns(tiny_model_dir: Path, tmp_path: Path,
                                                      fake_executor: FakeExecutor) -> None:
    reg, base_id = make_registry(tmp_path / "registry", tiny_model_dir)
    url = f"/v1/models/base/x/versions/{base_id}/trainings"
    limits = replace(settings(workers=1), max_trainings_per_account=2, max_training_steps=1000)
    with running_server(reg, limits) as server:
        alice, bob = server.http("alice"), server.http("bob")
        for http, owner in ((alice, "alice"), (bob, "bob")):
            assert http.post("/v1/models", json={"owner": owner, "name": "c", "visibility": "private",
                                                 "hardware": "cpu"}).status_code == 201

        def train(http, owner: str, **extra) -> httpx.Response:
            return http.post(url, json={"destination": f"{owner}/c", "input": {**SHORT, **extra}})

        a1, a2 = (train(alice, "alice").json()["id"] for _ in range(2))
        refused = train(alice, "alice")
        assert refused.status_code == 429, refused.text
        assert "alice has 2 trainings queued or running" in refused.json()["detail"]
        assert "--max-trainings-per-account 2" in refused.json()["detail"]
        b1 = train(bob, "bob")
        assert b1.status_code == 201, b1.text  # the cap is alice's, not the server's
        wait_for(lambda: fake_executor.order == [a1])
        assert server.app.state.trainings.queue.pending() == [b1.json()["id"], a2]  # bob's turn comes first

        assert alice.post(f"/v1/trainings/{a2}/cancel").status_code == 200
        assert train(alice, "alice").status_code == 201  # one ended: room again

        over = train(bob, "bob", **{"train.max_steps": 1001})
        assert over.status_code == 422, over.text
        detail = over.json()["detail"]
        assert "train.max_steps: 1001" in detail and "limit of 1000" in detail and "--max-training-steps" in detail
        assert len(Trainings(reg).list()) == 4  # nothing was written for the refused ones


def test_a_training_past_the_time_limit_fails_saying_the_limit(tiny_model_dir: Path, tmp_path: Path,
                                                              fake_executor: FakeExecutor) -> None:
    reg, base_id = make_registry(tmp_path / "registry", tiny_model_dir)
    with running_server(reg, replace(settings(workers=1), max_training_time_s=0.5)) as server:
        http = server.http("alice")
        http.post("/v1/models", json={"owner": "alice", "name": "t", "visibility": "private", "hardware": "cpu"})
        created = http.post(f"/v1/models/base/x/versions/{base_id}/trainings",
                            json={"destination": "alice/t", "input": SHORT})
        assert created.status_code == 201, created.text
        obj = wait_status(http, created.json()["id"], FINAL, timeout_s=20)
        assert obj["status"] == "failed" and fake_executor.jobs[obj["id"]].stopped
        assert "limit of 0.5s (--max-training-time)" in obj["error"]
