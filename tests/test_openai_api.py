"""The OpenAI API of ``finetune serve`` (``/openai/v1``) through the official ``openai`` client, against a real
server (127.0.0.1, a free port) and its real inference worker: models, chat and completions with and without
streaming, access rules, OpenAI's error shape, and the same greedy output as a ``/v1/predictions`` prediction.

One registry and one server for the module: alice's tiny random base (alice/tiny:1, private: it rarely stops,
so it fills max_tokens), a short fine-tune of it on Alpaca data (alice/m:1) and one on chat messages
(alice/chat:1); bob's own private base (bob/tiny:1).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import openai
import pytest
from service import TLS, running_server, server_settings

from finetune import training
from finetune.config import config_from_dict
from finetune.errors import LimitError
from finetune.registry import Registry
from finetune.registry.sources import import_base
from finetune.tiny import load_sample_records, sample_data_path

QUESTION = "Give three tips for staying healthy."


def _train(reg: Registry, destination: str, data: Path) -> None:
    cfg = config_from_dict({
        "base_model": "alice/tiny:1",
        "data": {"path": str(data), "format": "auto", "max_seq_len": 128},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 5e-3, "seed": 0},
    })
    training.train(cfg, registry=reg, destination=destination, create_destination=True, progress=False)


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("openai")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_FSYNC", "0")
        reg = Registry(root / "registry")
        import_base(reg, "alice/tiny", str(tiny_model_dir))
        import_base(reg, "bob/tiny", str(tiny_model_dir))
        _train(reg, "alice/m", sample_data_path())
        chats = root / "chat.jsonl"
        chats.write_text("".join(json.dumps({"messages": [
            {"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}) + "\n"
            for r in load_sample_records()[:16]))
        _train(reg, "alice/chat", chats)
    with running_server(reg, server_settings()) as live:
        client = _client(live, "alice")
        client.completions.create(model="alice/tiny:1", prompt="Hi", max_tokens=1)  # the worker starts (torch)
        yield live


def _client(live, owner: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/openai/v1", api_key=live.tokens[owner], timeout=600, max_retries=0,
                         http_client=openai.DefaultHttpxClient(verify=TLS))  # the suite's one TLS context


def _prediction(live, owner: str, model: str, data: dict) -> dict:
    """A ``/v1/predictions`` prediction of ``model`` (owner/name:N) on ``data``, once it ended."""
    with live.http(owner, timeout=600) as http:
        r = http.post("/v1/predictions", json={"version": model, "input": data}, headers={"Prefer": "wait"})
        assert r.status_code == 201, r.text
        deadline = time.monotonic() + 600
        while (p := http.get(f"/v1/predictions/{r.json()['id']}").json())["status"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, "the prediction did not end"
            time.sleep(0.1)
    assert p["status"] == "succeeded", p
    return p


# ------------------------------------------------------------------------------------------------- models
def test_models_lists_the_versions_a_token_may_use(server):
    alice = {m.id for m in _client(server, "alice").models.list()}
    assert {"alice/tiny", "alice/tiny:1", "alice/m", "alice/m:1", "alice/chat", "alice/chat:1"} == alice
    bob = _client(server, "bob").models.list().data
    assert [m.id for m in bob] == ["bob/tiny", "bob/tiny:1"]
    assert bob[0].owned_by == "bob" and bob[0].created > 0
    assert _client(server, "alice").models.retrieve("alice/m:1").id == "alice/m:1"


# ------------------------------------------------------------------------------------------------- chat
def test_chat_renders_messages_with_the_chat_template_and_matches_a_prediction(server):
    """Greedy: the same output as /v1/predictions given the same messages; the completion is a prediction."""
    client = _client(server, "alice")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    out = client.chat.completions.create(model="alice/chat:1", messages=messages, max_tokens=12, temperature=0)
    choice = out.choices[0]
    assert out.object == "chat.completion" and out.model == "alice/chat:1" and choice.message.role == "assistant"
    prediction = _prediction(server, "alice", "alice/chat:1", {"messages": messages, "max_new_tokens": 12})
    assert choice.message.content == "".join(prediction["output"]) and choice.message.content
    assert out.usage.completion_tokens == prediction["metrics"]["output_token_count"] <= 12
    assert out.usage.prompt_tokens == prediction["metrics"]["input_token_count"]
    assert choice.finish_reason == ("length" if out.usage.completion_tokens == 12 else "stop")
    # the completion is recorded as a prediction of the caller (its id after the prefix)
    with server.http("alice") as http:
        assert http.get(f"/v1/predictions/{out.id.removeprefix('chatcmpl-')}").json()["status"] == "succeeded"


def test_chat_streams_chunks_then_done(server):
    client = _client(server, "alice")
    messages = [{"role": "user", "content": QUESTION}]
    whole = client.chat.completions.create(model="alice/chat:1", messages=messages, max_completion_tokens=10)
    chunks = list(client.chat.completions.create(model="alice/chat:1", messages=messages, max_completion_tokens=10,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_with_a_prompt_completion_version_takes_one_user_message_as_its_prompt(server):
    client = _client(server, "alice")
    out = client.chat.completions.create(model="alice/m:1", messages=[{"role": "user", "content": QUESTION}],
                                         max_tokens=8)
    prediction = _prediction(server, "alice", "alice/m:1", {"prompt": QUESTION, "max_new_tokens": 8})
    assert out.choices[0].message.content == "".join(prediction["output"])
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="alice/m", messages=[{"role": "system", "content": "x"},
                                                                  {"role": "user", "content": QUESTION}])
    assert err.value.body["param"] == "messages" and "alpaca" in err.value.body["message"]


# ------------------------------------------------------------------------------------------------- completions
def test_completions_match_a_prediction_and_stop_at_max_tokens(server):
    client = _client(server, "alice")
    out = client.completions.create(model="alice/tiny:1", prompt="Once upon a time", max_tokens=6, seed=1)
    prediction = _prediction(server, "alice", "alice/tiny:1", {"prompt": "Once upon a time", "max_new_tokens": 6})
    assert out.object == "text_completion" and out.choices[0].text == "".join(prediction["output"])
    assert out.usage.completion_tokens == 6 and out.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model="alice/tiny", prompt="Once upon a time", max_tokens=6,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == out.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].model == "alice/tiny:1"


def test_completions_take_the_prompt_as_it_is_not_in_the_training_format(server):
    """On a version trained on Alpaca rows, a completion continues the text itself (raw_prompt), while chat and a
    plain prediction wrap the user's text in the Alpaca template."""
    out = _client(server, "alice").completions.create(model="alice/m:1", prompt=QUESTION, max_tokens=4)
    raw = _prediction(server, "alice", "alice/m:1", {"prompt": QUESTION, "raw_prompt": True, "max_new_tokens": 4})
    formatted = _prediction(server, "alice", "alice/m:1", {"prompt": QUESTION, "max_new_tokens": 4})
    assert out.choices[0].text == "".join(raw["output"])
    assert out.usage.prompt_tokens == raw["metrics"]["input_token_count"]
    assert out.usage.prompt_tokens < formatted["metrics"]["input_token_count"]  # no template around it


def test_an_answer_cut_by_the_models_context_finishes_for_length(server, tiny_model_dir):
    """max_tokens asks for more than the context leaves: the answer stops at the context's end, and says so."""
    import json as _json

    context = _json.loads((tiny_model_dir / "config.json").read_text())["max_position_embeddings"]

    def tokens(words: int) -> int:
        data = {"prompt": "a " * words, "raw_prompt": True, "max_new_tokens": 1}
        return _prediction(server, "alice", "alice/tiny:1", data)["metrics"]["input_token_count"]

    short, long = tokens(100), tokens(200)
    per_word = (long - short) / 100
    words = int((context - 6 - (short - 100 * per_word)) / per_word)
    left = context - tokens(words)
    assert 0 < left < 20, left
    out = _client(server, "alice").completions.create(model="alice/tiny:1", prompt="a " * words, max_tokens=left + 30)
    assert out.usage.completion_tokens == left and out.choices[0].finish_reason == "length"


def test_a_stream_the_client_leaves_cancels_its_prediction(server):
    """No worker keeps generating for nobody: the prediction behind a closed stream ends canceled."""
    stream = _client(server, "alice").completions.create(model="alice/tiny:1", prompt="Once", max_tokens=1000,
                                                         stream=True)
    first = next(iter(stream))
    stream.close()
    prediction_id = first.id.removeprefix("cmpl-")
    with server.http("alice") as http:
        deadline = time.monotonic() + 60
        while (p := http.get(f"/v1/predictions/{prediction_id}").json())["status"] not in ("succeeded", "canceled"):
            assert time.monotonic() < deadline, p
            time.sleep(0.05)
    assert p["status"] == "canceled" and p["metrics"]["output_token_count"] < 1000


# ------------------------------------------------------------------------------------------------- errors
def test_an_unknown_model_and_another_accounts_private_version_are_404_alike(server):
    alice, bob = _client(server, "alice"), _client(server, "bob")
    errors = []
    for client, model in ((alice, "alice/nope:1"), (alice, "alice/m:9"), (bob, "alice/m:1"), (bob, "alice/chat")):
        with pytest.raises(openai.NotFoundError) as err:
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
        errors.append(err.value.body)
    for body, model in zip(errors, ("alice/nope:1", "alice/m:9", "alice/m:1", "alice/chat")):
        assert body == {"message": f"The model `{model}` does not exist or you do not have access to it.",
                        "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
    with pytest.raises(openai.NotFoundError):
        bob.completions.create(model="alice/tiny:1", prompt="hi")


@pytest.mark.parametrize("extra, param", [
    ({"n": 2}, "n"),
    ({"temperature": -1}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"top_p": 0}, "top_p"),
    ({"stop": ["x" * 300]}, "stop"),
    ({"presence_penalty": 1}, "presence_penalty"),
    ({"extra_body": {"bogus": 1}}, "bogus"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": []}, "messages"),
])
def test_a_bad_parameter_is_400_naming_it(server, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        _client(server, "alice").chat.completions.create(
            **{"model": "alice/chat:1", "messages": [{"role": "user", "content": "hi"}], **extra})
    body = err.value.body
    assert err.value.status_code == 400 and body["type"] == "invalid_request_error" and body["param"] == param, body
    assert param in body["message"]


def test_errors_come_in_openais_shape(server):
    bad = openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key="not-a-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.models.list()
    assert set(err.value.body) == {"message", "type", "param", "code"} and err.value.body["code"] == "invalid_api_key"
    with server.http("alice") as http:
        r = http.post("/openai/v1/embeddings", json={})
        assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        r = http.post("/openai/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_limit_and_worker_errors_map_to_openais_statuses():
    from finetune.errors import ConflictError, UnavailableError
    from finetune.server.routes.openai import openai_error

    too_many = openai_error(LimitError("alice has 16 predictions starting or running"))
    assert (too_many.status, too_many.kind, too_many.code) == (429, "rate_limit_error", "rate_limit_exceeded")
    assert openai_error(UnavailableError("the worker stopped")).status == 503
    assert openai_error(ConflictError("the worker did not take it in time")).status == 503
