"""Files over HTTP: upload as the official client sends it, owner-only access, the size limit, download,
delete; and how a training input's data is resolved (uploaded file, allowed server folder, refused path)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from replicate.exceptions import ReplicateError
from service import running_server, server_settings

from finetune.errors import AccessDeniedError, NotFoundError, UsageError
from finetune.registry import Registry
from finetune.registry.files import Files
from finetune.server.data_sources import resolve_data_input, resolve_training_data
from finetune.server.settings import ServerSettings

ROWS = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)]


@pytest.fixture
def jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def test_client_uploads_a_jsonl_file_that_only_its_owner_sees(live_server, jsonl: Path):
    client = live_server.replicate("alice")
    f = client.files.create(jsonl, metadata={"purpose": "training"})
    assert (f.name, f.size, f.metadata) == ("train.jsonl", jsonl.stat().st_size, {"purpose": "training"})
    assert f.urls["get"] == f"{live_server.url}/v1/files/{f.id}" and len(f.checksums["sha256"]) == 64
    assert client.files.get(f.id).id == f.id
    assert [x.id for x in client.files.list()] == [f.id]
    alice = live_server.http("alice")
    r = alice.get(f.urls["download"])
    assert r.status_code == 200 and r.content == jsonl.read_bytes()
    stored = Files(live_server.registry).get(f.id)
    assert stored.path.suffix == ".jsonl" and stored.path.read_bytes() == jsonl.read_bytes()
    bob = live_server.replicate("bob")
    with pytest.raises(ReplicateError) as err:
        bob.files.get(f.id)
    assert err.value.status == 404
    assert bob.files.list() == []
    assert live_server.http("bob").get(f.urls["download"]).status_code == 404
    assert live_server.http("bob").delete(f"/v1/files/{f.id}").status_code == 404
    assert client.files.delete(f.id) is True
    with pytest.raises(ReplicateError) as err:
        client.files.get(f.id)
    assert err.value.status == 404


def test_oversized_upload_is_413_and_stores_nothing(tmp_path: Path):
    reg = Registry(tmp_path / "registry")
    with running_server(reg, server_settings(max_upload_bytes=1000)) as server:
        http = server.http("alice")
        r = http.post("/v1/files", files={"content": ("big.jsonl", b"x" * 1001, "application/jsonl")})
        assert r.status_code == 413 and r.json()["status"] == 413 and "1000" in r.json()["detail"]
        # a body far over the limit is refused before it is read
        r = http.post("/v1/files", files={"content": ("huge.jsonl", b"x" * (3 << 20), "application/jsonl")})
        assert r.status_code == 413
        # and so is one sent in chunks, without a Content-Length, once it passes the limit
        head = b'--b\r\nContent-Disposition: form-data; name="content"; filename="c.jsonl"\r\n\r\n'

        def chunks():
            yield head
            for _ in range(48):
                yield b"z" * 65536
            yield b"\r\n--b--\r\n"

        r = http.post("/v1/files", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b"})
        assert r.status_code == 413 and "content-length" not in r.request.headers
        r = http.post("/v1/files", files={"content": ("ok.jsonl", b"x" * 1000, "application/jsonl")})
        assert r.status_code == 201, r.text
        big = tmp_path / "b.jsonl"
        big.write_bytes(b"y" * 5000)
        with pytest.raises(ReplicateError) as err:
            server.replicate("alice").files.create(big)
        assert err.value.status == 413
    assert [f.name for f in Files(reg).list("alice")] == ["ok.jsonl"]
    assert not any((reg.root / ".staging").iterdir())


def test_upload_without_a_content_part_or_with_bad_metadata_is_422(live_server):
    http = live_server.http("alice")
    r = http.post("/v1/files", files={"file": ("a.jsonl", b"{}", "application/jsonl")})
    assert r.status_code == 422 and "content" in r.json()["detail"]
    r = http.post("/v1/files", files={"content": ("a.jsonl", b"{}", "application/jsonl")}, data={"metadata": "{x"})
    assert r.status_code == 422 and "line 1" in r.json()["detail"]


def test_files_list_pages_newest_first(tmp_path: Path):
    reg = Registry(tmp_path / "registry")
    with running_server(reg, server_settings(page_size=2)) as server:
        http = server.http("alice")
        ids = [http.post("/v1/files", files={"content": (f"{i}.jsonl", b"{}", "x")}).json()["id"] for i in range(3)]
        first = http.get("/v1/files").json()
        second = http.get(first["next"]).json()
        assert [f["id"] for f in first["results"] + second["results"]] == ids[::-1]


def test_training_data_resolves_to_an_uploaded_file_or_an_allowed_folder(tmp_path: Path, jsonl: Path):
    reg = Registry(tmp_path / "registry")
    stored = Files(reg).create("alice", jsonl.open("rb"), "train.jsonl")
    closed = ServerSettings()
    url = f"http://127.0.0.1:9/v1/files/{stored.id}"
    ref = f"upload:{stored.id}"  # what the config holds: never the path of the bytes on the server
    assert resolve_data_input(url, account="alice", registry=reg, settings=closed) == ref
    assert resolve_data_input(stored.id, account="alice", registry=reg, settings=closed) == ref
    assert resolve_data_input(ref, account="alice", registry=reg, settings=closed) == ref
    assert Files(reg).data_file(ref) == (str(stored.path), "train.jsonl")
    with pytest.raises(NotFoundError):
        resolve_data_input(url, account="bob", registry=reg, settings=closed)
    with pytest.raises(NotFoundError):
        resolve_data_input(ref, account="bob", registry=reg, settings=closed)
    for refused in (str(jsonl), "https://example.org/data.jsonl", "tatsu-lab/alpaca", "data/train.jsonl"):
        with pytest.raises(UsageError):  # not looked up anywhere: no answer tells whether it exists
            resolve_data_input(refused, account="alice", registry=reg, settings=closed)
    allowed = ServerSettings(allowed_data_dirs=(tmp_path,))
    with pytest.raises(UsageError):  # relative: it would be looked up in the server's working directory
        resolve_data_input("tatsu-lab/alpaca", account="alice", registry=reg, settings=allowed)
    assert resolve_data_input(str(jsonl), account="alice", registry=reg, settings=allowed) == str(jsonl.resolve())
    outside = tmp_path.parent / "elsewhere.jsonl"
    link = tmp_path / "link.jsonl"
    link.symlink_to("/etc/hostname")
    for path in (str(outside), str(link), str(tmp_path / ".." / "x.jsonl")):
        with pytest.raises(AccessDeniedError):
            resolve_data_input(path, account="alice", registry=reg, settings=allowed)
    got = resolve_training_data({"data": {"path": stored.id, "eval": 0.1}, "data.eval": url, "train.lr": 1e-3},
                                account="alice", registry=reg, settings=closed)
    assert got == {"data": {"path": ref, "eval": 0.1}, "data.eval": ref, "train.lr": 1e-3}
