"""What the service must not tell (issue 32, "Information leaks"), each through a real server: whether another
account's private version exists, where the server keeps uploads, what lies in its working directory, and
links built from a client's ``Host`` header. Also its API docs: off unless asked for, and never a CDN script.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import time
from pathlib import Path

import pytest
from service import idle_training_queue, running_server, server_settings

from finetune.registry import Registry
from finetune.registry.sources import import_base
from finetune.server.settings import ServerSettings

ROWS = [{"prompt": f"Question {i}?", "completion": f" Answer {i}."} for i in range(12)]


@pytest.fixture
def idle_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    idle_training_queue(monkeypatch)


def _problem(r, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    return r.json()


# ---------------------------------------------------------------------------------------------- version ids
def test_a_bare_id_of_another_accounts_private_version_is_404_like_an_unknown_one(live_server, tiny_model_dir):
    secret = import_base(live_server.registry, "bob/secret", str(tiny_model_dir))  # private
    unknown = "0" * 63 + "1"
    alice = live_server.http("alice")
    hidden = _problem(alice.post("/v1/predictions", json={"version": secret.id, "input": {"prompt": "hi"}}), 404)
    missing = _problem(alice.post("/v1/predictions", json={"version": unknown, "input": {"prompt": "hi"}}), 404)
    assert hidden["detail"].replace(secret.id, "ID") == missing["detail"].replace(unknown, "ID")
    assert hidden["title"] == missing["title"]
    assert "bob" not in json.dumps(hidden) and "secret" not in json.dumps(hidden)


# ---------------------------------------------------------------------------------------------- data paths
def _base(server) -> str:
    return server.registry.resolve("base/x").id


@pytest.fixture
def with_base(live_server, tiny_model_dir):
    import_base(live_server.registry, "base/x", str(tiny_model_dir), visibility="public")
    live_server.registry.create_model("alice/y")
    return live_server


@pytest.mark.parametrize("exists", [True, False])
def test_an_owner_name_data_path_is_refused_before_the_201_whether_or_not_it_exists(
        with_base, idle_queue, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exists: bool):
    server = with_base
    monkeypatch.chdir(tmp_path)  # the server runs in this process: this is its working directory
    if exists:
        (tmp_path / "alice").mkdir()
        (tmp_path / "alice" / "data").write_text(json.dumps(ROWS[0]) + "\n")
    http = server.http("alice")
    url = f"/v1/models/base/x/versions/{_base(server)}/trainings"
    for value in ("alice/data", "alice/data.jsonl", "./alice/data", "tatsu-lab/alpaca"):
        body = {"destination": "alice/y", "input": {"data": {"path": value}, "train.max_steps": 1}}
        problem = _problem(http.post(url, json=body), 422)
        assert "data.path" in problem["detail"] and "upload" in problem["detail"]
        assert str(tmp_path) not in problem["detail"]
    assert server.http("alice").get("/v1/trainings").json()["results"] == []


@pytest.mark.slow
def test_uploads_are_named_by_file_name_and_sha256_never_by_server_path(tiny_model_dir, tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry")
    import_base(reg, "base/x", str(tiny_model_dir), visibility="public")
    root = str(reg.root.resolve())
    with running_server(reg, ServerSettings(workers=1)) as server:
        client = server.replicate("alice")
        client.models.create("alice", "pub", visibility="public", hardware="cpu")
        good = client.files.create(io.BytesIO("".join(json.dumps(r) + "\n" for r in ROWS).encode()),
                                   filename="train.jsonl")
        bad = client.files.create(io.BytesIO(b'{"prompt": "a", "completion": "b"}\n{"prompt": oops}\n'),
                                  filename="bad.jsonl")
        assert root not in json.dumps(good.__dict__, default=str)
        base = f"base/x:{_base(server)}"
        trainings = [client.trainings.create(version=base, destination="alice/pub", input={
            "data": {"path": f.urls["get"], "max_seq_len": 64}, "train.max_steps": 2, "train.batch_size": 4})
            for f in (bad, good)]
        http = server.http("alice")
        ended = {}
        deadline = time.monotonic() + 300
        while len(ended) < 2:
            assert time.monotonic() < deadline, "the trainings did not end"
            for t in trainings:
                obj = http.get(f"/v1/trainings/{t.id}").json()
                if obj["status"] in ("succeeded", "failed", "canceled"):
                    ended[t.id] = obj
            time.sleep(0.2)
        failed, succeeded = (ended[t.id] for t in trainings)
        # the user's file, by its own name and line; no server path in the error, the object or its log
        assert failed["status"] == "failed" and "bad.jsonl:2" in failed["error"], failed["error"]
        assert succeeded["status"] == "succeeded", succeeded["error"]
        assert succeeded["input"]["data"]["path"] == f"upload:{good.id}"
        for obj in (failed, succeeded):
            assert root not in json.dumps(obj) and "content.jsonl" not in json.dumps(obj)
        # what another account reads of the public version: its manifest (in the weights archive) and card
        version_id = succeeded["output"]["version"].split(":", 1)[1]
        base_id = reg.resolve(base).id
        texts = {}
        for path in (f"alice/pub/versions/{version_id}", f"base/x/versions/{base_id}"):
            r = server.http("bob").get(f"/v1/models/{path}/weights")
            assert r.status_code == 200
            with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
                texts.update({m.name: tar.extractfile(m).read().decode("utf-8", "replace")
                              for m in tar.getmembers() if m.isfile() and m.name.endswith((".json", ".md"))})
        base_manifest = json.loads(texts[f"base-x-{reg.resolve(base).number}/manifest.json"])
        assert base_manifest["withheld"] == ["parent.local_path", "metadata.source.path"]
        assert base_manifest["id"] == base_id and base_manifest["parent"]["local_folder"] == tiny_model_dir.name
        version = reg.resolve(f"alice/pub:{version_id[:12]}")
        texts["manifest"] = json.dumps(version.manifest)
        for path in (f"/v1/models/alice/pub/versions/{version_id}", f"/v1/models/base/x/versions/{base_id}"):
            texts[path] = server.http("bob").get(path).text  # the base was imported from a folder of the server
        assert "local_folder" in texts[f"/v1/models/base/x/versions/{base_id}"]
        for name, text in texts.items():
            assert root not in text and "content.jsonl" not in text and str(tiny_model_dir) not in text, name
        dataset = version.metadata["dataset"]
        assert dataset["path"] == "train.jsonl" and re.fullmatch(r"[0-9a-f]{64}", dataset["sha256"])
        card = next(text for name, text in texts.items() if name.endswith("README.md"))
        assert "`train.jsonl` (sha256 " in card


# ---------------------------------------------------------------------------------------------- docs
def test_api_docs_are_off_by_default_and_served_locally_when_asked_for(live_server, tmp_path: Path):
    anonymous = live_server.http(None)
    for path in ("/v1/docs", "/v1/openapi.json", "/docs", "/redoc"):
        assert anonymous.get(path).status_code == 404, path
    with running_server(Registry(tmp_path / "other"), server_settings(api_docs=True)) as server:
        http = server.http(None)
        page = http.get("/v1/docs")
        assert page.status_code == 200 and "/v1/models" in page.text
        assert "<script" not in page.text.lower() and "cdn" not in page.text.lower()
        assert not re.search(r"""(src|href)=["']?https?://""", page.text)
        assert "default-src 'none'" in page.headers["content-security-policy"]
        schema = http.get("/v1/openapi.json").json()
        assert "/v1/models" in schema["paths"]


def test_web_pages_load_no_third_party_script(live_server):
    client = live_server.http(None)
    for path in ("/signin", "/static/app.js"):
        r = client.get(path)
        assert r.status_code == 200
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", r.text), path
        assert not re.search(r"""import\s*\(?\s*["']https?://""", r.text), path


# ---------------------------------------------------------------------------------------------- links
def test_links_name_the_servers_own_address_whatever_the_host_header(tmp_path: Path):
    reg = Registry(tmp_path / "registry")
    with running_server(reg, server_settings(page_size=1)) as server:
        http = server.http("alice", headers={"Host": "evil.example:666"})
        for name in ("a", "b"):
            assert http.post("/v1/models", json={"owner": "alice", "name": name, "hardware": "cpu"}).status_code == 201
        page = http.get("/v1/models").json()
        assert page["next"].startswith(server.url + "/v1/models?cursor="), page["next"]
        assert page["results"][0]["url"].startswith(server.url)
        upload = http.post("/v1/files", files={"content": ("t.jsonl", b'{"text": "x"}\n')}).json()
        assert upload["urls"]["get"] == f"{server.url}/v1/files/{upload['id']}"
