"""Predictions over HTTP with the official clients against a real server (127.0.0.1, a free port).

One server per module over one registry: alice's tiny base (alice/tiny:1, random weights: it rarely stops, so
it serves the long generations that cancel tests need), four short fine-tunes of it (alice/m:1..4), and bob's
private base (bob/secret:1). The server's inference worker is a real child process.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from replicate.exceptions import ReplicateError
from service import running_server, server_settings

from finetune import training
from finetune.cli import main
from finetune.config import config_from_dict
from finetune.registry import Registry
from finetune.registry.predictions import PredictionRecord, Predictions
from finetune.registry.sources import import_base
from finetune.tiny import sample_data_path

PROMPT = "Give three tips for staying healthy."
LONG = {"prompt": "Once upon a time", "max_new_tokens": 1000}


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_FSYNC", "0")
        reg = Registry(tmp_path_factory.mktemp("predictions") / "registry")
        import_base(reg, "alice/tiny", str(tiny_model_dir))
        import_base(reg, "bob/secret", str(tiny_model_dir))
        for seed in range(4):
            cfg = config_from_dict({
                "base_model": "alice/tiny:1",
                "data": {"path": str(sample_data_path()), "format": "auto", "max_seq_len": 256},
                "train": {"max_steps": 3, "batch_size": 8, "lr": 5e-3, "seed": seed},
            })
            training.train(cfg, registry=reg, destination="alice/m", create_destination=True, progress=False)
        # the webhook receivers are on loopback, which a server reaches only when its operator allows it
        with running_server(reg, server_settings(allow_webhook_hosts=("127.0.0.1",))) as live:
            yield live


def _expected(reg: Registry, capsys: pytest.CaptureFixture[str], ref: str, max_new_tokens: int) -> str:
    """What `finetune predict` prints for PROMPT (greedy), without its final newline."""
    capsys.readouterr()
    rc = main(["--registry", str(reg.root), "predict", ref, PROMPT, "--max-new-tokens", str(max_new_tokens),
               "--device", "cpu"])
    out, _ = capsys.readouterr()
    assert rc in (0, None)
    return out[:-1]


def _until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# ------------------------------------------------------------------------------------------- running
def test_run_sync_polled_and_stream_equal_finetune_predict(server, capsys):
    reg, client = server.registry, server.replicate("alice")
    v1 = reg.resolve("alice/m:1")
    expected = _expected(reg, capsys, "alice/m:1", 20)
    assert expected  # the fine-tune says something
    data = {"prompt": PROMPT, "max_new_tokens": 20, "temperature": 0, "seed": 1}
    assert "".join(client.run(f"alice/m:{v1.id}", input=data)) == expected  # Prefer: wait
    assert "".join(client.run(f"alice/m:{v1.id}", input=data, wait=False)) == expected  # polled
    # What a short training learns decides how much a fine-tune says (alice/m:1 says one token with some data
    # orders), so two are streamed, and at least one must come in several pieces. (Not alice/m:2: a test below
    # needs it unloaded; not the random base: it emits control characters the client's SSE parser splits on.)
    pieces = []
    for ref in ("alice/m:1", "alice/m:4"):
        events = list(client.stream(f"alice/m:{reg.resolve(ref).id}", input=data))
        assert [e.event.value for e in events][-1] == "done"
        assert "".join(str(e) for e in events) == _expected(reg, capsys, ref, 20)
        pieces.append(sum(e.event.value == "output" for e in events))
    assert max(pieces) > 1, pieces


def test_a_polled_prediction_that_ends_before_the_answer_still_yields_its_output(server, capsys, monkeypatch):
    """A short prediction can end before its non-blocking create is answered. The answer must still say
    `starting` with no output: the client's poller counts output in that answer as already seen (a race that
    once lost a one-piece answer; here the service is made to finish first, every time)."""
    from finetune.serving.service import PredictionService

    create = PredictionService.create

    def create_and_finish(self, *args, **kwargs):
        record = create(self, *args, **kwargs)
        return self.wait(record.id, 60)

    monkeypatch.setattr(PredictionService, "create", create_and_finish)
    reg, client = server.registry, server.replicate("alice")
    expected = _expected(reg, capsys, "alice/m:1", 20)
    data = {"prompt": PROMPT, "max_new_tokens": 20, "temperature": 0, "seed": 1}
    assert "".join(client.run(f"alice/m:{reg.resolve('alice/m:1').id}", input=data, wait=False)) == expected


def test_create_wait_metrics_logs_and_no_reload(server):
    client = server.replicate("alice")
    v2 = server.registry.resolve("alice/m:2")
    first = client.predictions.create(version=v2.id, input={"prompt": PROMPT, "max_new_tokens": 8})
    assert first.status in ("starting", "processing") and first.urls["stream"].endswith("/stream")
    first.wait()
    assert first.status == "succeeded" and isinstance(first.output, list) and first.error is None
    assert first.model == "alice/m" and first.version == v2.id
    assert {"predict_time", "input_token_count", "output_token_count", "time_to_first_token",
            "tokens_per_second"} <= set(first.metrics)
    assert "loading alice/m:2" in first.logs
    second = client.predictions.create(version=f"alice/m:{v2.id}", input={"prompt": PROMPT, "max_new_tokens": 8},
                                       wait=30)
    assert second.status == "succeeded" and second.output == first.output  # answered within the wait
    assert "loading" not in second.logs and "no reload" in second.logs


def test_model_predictions_use_the_latest_version(server):
    client = server.replicate("alice")
    prediction = client.models.predictions.create(model="alice/m", input={"prompt": PROMPT, "max_new_tokens": 4},
                                                  wait=30)
    assert prediction.status == "succeeded"
    assert prediction.version == server.registry.resolve("alice/m").id


def test_four_versions_share_one_base_model_in_the_worker(server):
    client = server.replicate("alice")
    for n in (1, 2, 3, 4):
        client.run(f"alice/m:{server.registry.resolve(f'alice/m:{n}').id}", input={"prompt": PROMPT,
                                                                                    "max_new_tokens": 2})
    stats = server.app.state.predictions.worker_stats()[0]
    assert stats["base_objects"] == 1 and stats["bases"] == 1 and stats["base_loads"] == 1
    assert stats["versions"] == 4


# ------------------------------------------------------------------------------------------- cancel
def test_cancel_and_a_wait_that_runs_out(server):
    client = server.replicate("alice")
    base = server.registry.resolve("alice/tiny:1")
    prediction = client.predictions.create(version=base.id, input=LONG, wait=1)
    # Still running after the wait: the client polls from here. No output in this answer even if some exists:
    # the client's poller would count it as seen and never yield it.
    assert prediction.status == "starting" and prediction.output is None
    _until(lambda: client.predictions.get(prediction.id).output, 60, "output")
    prediction.cancel()
    assert prediction.status == "canceled"
    final = client.predictions.get(prediction.id)
    assert final.status == "canceled" and 0 < final.metrics["output_token_count"] < 1000
    assert client.predictions.cancel(prediction.id).status == "canceled"  # again: unchanged
    # Created without waiting: starting, no output yet; the client's poller then yields every piece.
    data = {**LONG, "max_new_tokens": 40, "temperature": 0}
    polled = client.predictions.create(version=base.id, input=data)
    assert polled.status == "starting" and polled.output is None
    assert "".join(polled.output_iterator()) == "".join(client.run(f"alice/tiny:{base.id}", input=data))


def test_a_stream_client_that_disconnects_cancels_the_prediction(server):
    client = server.replicate("alice")
    prediction = client.predictions.create(version=server.registry.resolve("alice/tiny:1").id, input=LONG,
                                           stream=True)
    with server.http("alice") as http, http.stream("GET", prediction.urls["stream"],
                                                   headers={"Accept": "text/event-stream"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data:"):
                break  # one piece, then hang up
    final = _until(lambda: (p := client.predictions.get(prediction.id)).status in ("canceled", "succeeded") and p,
                   30, "the prediction to end")
    assert final.status == "canceled" and final.metrics["output_token_count"] < 1000


# ------------------------------------------------------------------------------------------- webhooks
def test_webhooks_are_signed_and_filtered(server):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from finetune.server.webhooks import verify

    secret = server.http("alice").get("/v1/webhooks/default/secret").json()["key"]
    received: list[dict] = []
    bad: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            (received.append(json.loads(body)) if verify(secret, dict(self.headers), body) else bad.append(body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/hook"
    try:
        client = server.replicate("alice")
        v1 = server.registry.resolve("alice/m:1")
        everything = client.predictions.create(version=v1.id, input={"prompt": PROMPT, "max_new_tokens": 6},
                                               webhook=url, wait=30)
        only_end = client.predictions.create(version=v1.id, input={"prompt": PROMPT, "max_new_tokens": 6},
                                             webhook=url, webhook_events_filter=["completed"], wait=30)
        _until(lambda: sum(m["id"] == only_end.id for m in received) >= 1
               and any(m["id"] == everything.id and m["status"] == "succeeded" for m in received), 30, "webhooks")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert not bad
    mine = [m for m in received if m["id"] == everything.id]
    assert mine[0]["status"] in ("starting", "processing") and mine[-1]["status"] == "succeeded"
    assert mine[-1]["output"] == everything.output and mine[-1]["urls"]["get"].endswith(everything.id)
    assert [m["status"] for m in received if m["id"] == only_end.id] == ["succeeded"]
    with pytest.raises(ReplicateError) as info:
        client.predictions.create(version=v1.id, input={"prompt": PROMPT}, webhook="ftp://x")
    assert info.value.status == 422 and "webhook" in info.value.detail


# ------------------------------------------------------------------------------------------- errors
def test_errors_are_problems_with_the_right_status(server):
    alice, bob = server.replicate("alice"), server.replicate("bob")
    v1, secret = server.registry.resolve("alice/m:1"), server.registry.resolve("bob/secret:1")
    cases = [
        (lambda: alice.predictions.create(version="0" * 64, input={"prompt": "x"}), 404, "not found"),
        (lambda: alice.predictions.create(version=secret.id, input={"prompt": "x"}), 404, "not found"),
        (lambda: alice.predictions.create(version=f"bob/secret:{secret.id}", input={"prompt": "x"}), 404, "not found"),
        (lambda: alice.models.predictions.create(model="bob/secret", input={"prompt": "x"}), 404, "not found"),
        (lambda: alice.predictions.create(version=v1.id, input={"prompt": "x", "colour": 1}), 422, "input.colour"),
        (lambda: alice.predictions.create(version=v1.id, input={"prompt": "x", "top_p": 2}), 422, "input.top_p"),
        (lambda: alice.predictions.create(version=v1.id, input={"prompt": "word " * 3000}), 422, "context"),
        (lambda: alice.predictions.get("no-such-prediction"), 404, "not found"),
        (lambda: alice.predictions.cancel("no-such-prediction"), 404, "not found"),
    ]
    for call, status, needle in cases:
        with pytest.raises(ReplicateError) as info:
            call()
        assert info.value.status == status and needle in info.value.detail, (status, info.value)
    mine = alice.predictions.create(version=v1.id, input={"prompt": PROMPT, "max_new_tokens": 2}, wait=30)
    with pytest.raises(ReplicateError) as info:
        bob.predictions.get(mine.id)  # another account's prediction does not exist for bob
    assert info.value.status == 404
    assert mine.id not in [p.id for p in bob.predictions.list().results]
    with server.http(None) as anonymous:
        assert anonymous.post("/v1/predictions", json={"version": v1.id, "input": {}}).status_code == 401
    with server.http("alice") as http:
        r = http.post("/v1/predictions", content=b'{"version": ', headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.headers["content-type"].startswith("application/problem+json")
        assert http.post("/v1/predictions", json={"input": {}}).status_code == 422  # no version


# ------------------------------------------------------------------------------------------- records
def test_list_newest_first_and_records_survive_a_restart(server, tmp_path: Path):
    client = server.replicate("alice")
    v1 = server.registry.resolve("alice/m:1")
    made = [client.predictions.create(version=v1.id, input={"prompt": PROMPT, "max_new_tokens": 2}, wait=30)
            for _ in range(2)]
    listed = client.predictions.list().results
    ids = [p.id for p in listed]
    assert ids == sorted(ids, reverse=True) and ids.index(made[1].id) < ids.index(made[0].id)
    # Another server over the records on disk: a copy of the registry, as one registry has one server at a time.
    copy = Registry(shutil.copytree(server.registry.root, tmp_path / "registry",
                                    ignore=shutil.ignore_patterns("server.lock", "server.json")))
    with running_server(copy) as again:
        restored = again.replicate("alice").predictions.get(made[0].id)
    assert restored.status == "succeeded" and restored.output == made[0].output
    assert restored.metrics["output_token_count"] == made[0].metrics["output_token_count"]


def test_predictions_left_running_by_a_stopped_server_are_settled(tmp_path: Path):
    from finetune.serving.service import PredictionService

    reg = Registry(tmp_path / "registry")
    Predictions(reg).create(PredictionRecord(id="20260101-000000-000000-abcdef", owner="alice", status="processing"))
    service = PredictionService(reg)  # starts no worker until a prediction comes
    try:
        record = Predictions(reg).get("20260101-000000-000000-abcdef")
        assert record.status == "failed" and "server stopped" in record.error and record.completed_at
        assert service.interrupted == ["20260101-000000-000000-abcdef"]
    finally:
        service.close()


# ------------------------------------------------------------------------------------------- JavaScript
JS = """
const Replicate = require("replicate");
const replicate = new Replicate({auth: process.env.TOKEN, baseUrl: process.env.BASE_URL});
replicate.run(process.env.REF, {input: {prompt: process.env.PROMPT, max_new_tokens: 8}})
  .then((out) => { console.log(JSON.stringify(out)); })
  .catch((err) => { console.error(String(err)); process.exit(1); });
"""


@pytest.mark.slow
def test_the_javascript_client_runs_a_version(server, tmp_path: Path):
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("node and npm are not installed")
    install = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--silent", "replicate@1"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    if install.returncode != 0:
        pytest.skip(f"cannot install the replicate npm package here: {install.stderr.strip()[-300:]}")
    (tmp_path / "run.js").write_text(JS)
    v1 = server.registry.resolve("alice/m:1")
    env = {"PATH": "/usr/bin:/bin", "TOKEN": server.tokens["alice"], "BASE_URL": server.url + "/v1",
           "REF": f"alice/m:{v1.id}", "PROMPT": PROMPT}
    done = subprocess.run([node, "run.js"], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    python = server.replicate("alice").run(f"alice/m:{v1.id}", input={"prompt": PROMPT, "max_new_tokens": 8})
    assert "".join(json.loads(done.stdout)) == "".join(python)


def test_prediction_stream_events_are_well_formed(server):
    """The raw SSE body: every event has an id and a type; pieces with newlines survive as multi-line data."""
    client = server.replicate("alice")
    prediction = client.predictions.create(version=server.registry.resolve("alice/m:1").id,
                                           input={"prompt": PROMPT, "max_new_tokens": 6}, stream=True, wait=30)
    with server.http("alice") as http:
        body = http.get(prediction.urls["stream"], headers={"Accept": "text/event-stream"}).text
    blocks = [b.split("\n") for b in body.split("\n\n") if b.strip()]
    assert blocks[-1][0] == "event: done" and all(any(line.startswith("id: ") for line in b) for b in blocks)
    pieces = ["\n".join(line[6:] for line in b if line.startswith("data: ")) for b in blocks if b[0] == "event: output"]
    assert "".join(pieces) == "".join(prediction.output) and len(pieces) == len(prediction.output)
