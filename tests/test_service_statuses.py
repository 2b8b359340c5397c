"""Statuses and messages that stay right whatever a client sends (issue 32, "Wrong statuses and messages"), each
through a real server: tampered cursors, HEAD, malformed input keys, oversized text fields, and anonymous load
on the sign-in page."""

from __future__ import annotations

import base64
import json
import re

import pytest
from service import idle_training_queue

from finetune.registry.sources import import_base


def _cursor(payload) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


def _problem(r, status: int | tuple[int, ...]) -> dict:
    statuses = status if isinstance(status, tuple) else (status,)
    assert r.status_code in statuses, r.text
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    return r.json()


# ---------------------------------------------------------------------------------------------- cursors
def test_tampered_cursors_are_4xx_and_the_connection_stays_up(live_server):
    reg = live_server.registry
    reg.create_model("alice/m")
    folder = reg.staging_dir("test") / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    reg.publish("alice/m", folder, parent={"hub_id": "org/base", "revision": "main"}, metadata={})
    http = live_server.http("alice")
    assert http.post("/v1/files", files={"content": ("a.jsonl", b'{"text": "x"}\n')}).status_code == 201
    tampered = [_cursor(["after", 5]), _cursor(["before", 7]), _cursor(["after", True]), _cursor(["after", None]),
                _cursor(["sideways", "x"]), _cursor({"a": 1}), "!!!", "x" * 5000]
    for path in ("/v1/models", "/v1/files"):  # listings keyed by name or id
        for cursor in tampered:
            problem = _problem(http.get(path, params={"cursor": cursor}), (400, 422))
            assert "invalid cursor" in problem["detail"]
    for cursor in (_cursor(["after", "alice/m"]), _cursor(["before", "x"])):  # a string key where numbers are
        problem = _problem(http.get("/v1/models/alice/m/versions", params={"cursor": cursor}), (400, 422))
        assert "invalid cursor" in problem["detail"]
    assert http.get("/v1/models").status_code == 200  # the same connection still answers


# ---------------------------------------------------------------------------------------------- HEAD
def test_head_answers_every_get_resource_with_its_headers(live_server):
    live_server.registry.create_model("alice/m", description="d")
    http = live_server.http("alice")
    for path in ("/v1/account", "/v1/models", "/v1/models/alice/m", "/v1/models/alice/m/versions", "/v1/files",
                 "/v1/trainings", "/v1/hardware", "/signin", "/static/style.css"):
        get, head = http.get(path), http.head(path)
        assert head.status_code == get.status_code == 200, (path, head.status_code)
        assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"], path
        assert int(head.headers["content-length"]) == len(get.content), path
    assert http.head("/v1/models/alice/nothing").status_code == 404
    assert live_server.http(None).head("/v1/models").status_code == 401
    # where a GET would act (a stream a hang-up cancels, a one-time link), HEAD is refused
    assert http.head("/v1/predictions/abc/stream").status_code == 405
    assert http.head("/signin/link/abc").status_code == 405
    assert http.head("/v1/no-such-thing").status_code == 404


# ---------------------------------------------------------------------------------------------- input keys
@pytest.mark.parametrize("key", ["..", "a..b", "", ".", "train.", ".lr", "x" * 300])
def test_a_malformed_input_key_is_named_in_the_422(live_server, tiny_model_dir, key: str):
    base = import_base(live_server.registry, "alice/base", str(tiny_model_dir))
    live_server.registry.create_model("alice/y")
    r = live_server.http("alice").post(f"/v1/models/alice/base/versions/{base.id}/trainings",
                                       json={"destination": "alice/y", "input": {key: 1}})
    detail = _problem(r, 422)["detail"]
    assert repr(key[:200]) in detail, detail
    assert "set twice" not in detail


def test_an_oversized_training_input_is_422(live_server, tiny_model_dir, monkeypatch: pytest.MonkeyPatch):
    idle_training_queue(monkeypatch)
    base = import_base(live_server.registry, "alice/base", str(tiny_model_dir))
    live_server.registry.create_model("alice/y")
    http = live_server.http("alice")
    data = http.post("/v1/files", files={"content": ("t.jsonl", b'{"text": "x"}\n')}).json()["urls"]["get"]
    modules = [f"layers.{i}.mlp.up_proj" for i in range(5000)]  # a valid key, a value of ~120 KB
    r = http.post(f"/v1/models/alice/base/versions/{base.id}/trainings",
                  json={"destination": "alice/y", "input": {"data.path": data, "lora.target_modules": modules}})
    assert "input" in _problem(r, 422)["detail"]
    assert http.get("/v1/trainings").json()["results"] == []


# ---------------------------------------------------------------------------------------------- text fields
def test_every_text_field_of_a_model_is_bounded(live_server):
    http = live_server.http("alice")
    body = {"owner": "alice", "name": "big", "hardware": "cpu", "description": "d" * (20 << 20)}
    assert "description" in _problem(http.post("/v1/models", json=body), 422)["detail"]
    assert live_server.registry.list_models() == []
    assert http.post("/v1/models", json={"owner": "alice", "name": "m", "hardware": "cpu",
                                         "description": "d" * 2000}).status_code == 201
    for field, size in (("description", 2001), ("readme", 64 * 1024 + 1), ("github_url", 2049),
                        ("cover_image_url", 2049)):
        problem = _problem(http.patch("/v1/models/alice/m", json={field: "x" * size}), 422)
        assert field in problem["detail"]
    assert http.patch("/v1/models/alice/m", json={"readme": "r" * 64 * 1024}).status_code == 200
    listed = http.get("/v1/models").json()["results"][0]
    assert len(listed["description"]) == 2000


def test_upload_metadata_is_bounded(live_server):
    r = live_server.http("alice").post("/v1/files", files={"content": ("a.jsonl", b'{"text": "x"}\n')},
                                       data={"metadata": json.dumps({"k": "v" * 20_000})})
    assert "metadata" in _problem(r, 422)["detail"]


# ---------------------------------------------------------------------------------------------- sign-in load
def _csrf(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def test_anonymous_signin_load_creates_nothing_and_signs_nobody_out(live_server):
    alice = live_server.http(None, follow_redirects=False)
    form = alice.get("/signin")
    assert alice.post("/signin", data={"csrf_token": _csrf(form.text), "token": live_server.tokens["alice"],
                                       "next": "/"}).status_code == 303
    assert alice.get("/").status_code == 200
    stored = live_server.app.state.web_sessions._sessions  # what the server holds in memory
    assert len(stored) == 1
    with live_server.http(None) as anonymous:
        for _ in range(300):  # cookie-less, as a flood would come
            anonymous.cookies.clear()
            assert anonymous.get("/signin").status_code == 200
            anonymous.cookies.clear()
            assert anonymous.post("/signin", data={"csrf_token": "x", "token": "ft_nope"}).status_code == 403
    assert len(stored) == 1  # no state for any of them
    assert alice.get("/").status_code == 200  # alice is still signed in


def test_the_signin_form_needs_its_own_cookie(live_server):
    client = live_server.http(None, follow_redirects=False)
    token = _csrf(client.get("/signin").text)
    assert client.cookies.get("finetune_signin") == token
    other = live_server.http(None, follow_redirects=False)  # another browser: the token without the cookie
    assert other.post("/signin", data={"csrf_token": token, "token": live_server.tokens["alice"]}).status_code == 403
    assert client.post("/signin", data={"csrf_token": token + "x",
                                        "token": live_server.tokens["alice"]}).status_code == 403
    assert client.post("/signin", data={"csrf_token": token, "token": live_server.tokens["alice"]}).status_code == 303
