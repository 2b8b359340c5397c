"""The HTTP API over raw HTTP (httpx) against a real server: auth, access rules, errors, models, versions,
pagination. The official client's view is in test_api_client.py."""

from __future__ import annotations

from pathlib import Path

import httpx
from service import running_server, server_settings

from finetune.registry import Registry
from finetune.registry.accounts import Accounts

# Replicate's docs create a model with a body like this one; this copy lacks the comma after "alice".
MISSING_COMMA = b"""{
  "owner": "alice"
  "name": "hot-dog-detector",
  "description": "Detect hot dogs in images",
  "visibility": "public",
  "hardware": "cpu"
}"""


def publish(reg: Registry, tmp_path: Path, model: str, n: int) -> list:
    out = []
    for i in range(n):
        src = tmp_path / f"src-{model.replace('/', '-')}-{i}"
        src.mkdir()
        (src / "adapter_config.json").write_text("{}")
        (src / "note.txt").write_text(f"{model} {i}")
        out.append(reg.publish(model, src, parent={"hub_id": "o/base", "revision": "0" * 40},
                               metadata={"metrics": {"train_loss": 1.0 / (i + 1)}}))
    return out


def assert_problem(r: httpx.Response, status: int, *needles: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["status"] == status and body["title"] and isinstance(body["detail"], str)
    for needle in needles:
        assert needle in body["detail"], body
    assert "Traceback" not in r.text
    return body


# ---------------------------------------------------------------- auth


def test_no_token_bad_token_and_both_schemes(live_server):
    assert_problem(live_server.http(None).get("/v1/account"), 401, "Authorization")
    bad = live_server.http(None, headers={"Authorization": "Bearer ft_not-a-token"})
    assert_problem(bad.get("/v1/models"), 401, "invalid")
    odd = live_server.http(None, headers={"Authorization": "Basic abc"})
    assert_problem(odd.get("/v1/models"), 401, "Bearer")
    token = live_server.tokens["alice"]
    for scheme in ("Bearer", "Token", "bearer"):
        r = live_server.http(None, headers={"Authorization": f"{scheme} {token}"}).get("/v1/account")
        assert r.status_code == 200 and r.json()["username"] == "alice"


def test_revoked_token_stops_working(live_server):
    http = live_server.http("bob")
    assert http.get("/v1/account").status_code == 200
    accounts = Accounts(live_server.registry)
    (info,) = accounts.list_tokens("bob")
    accounts.revoke(info.id)
    assert_problem(http.get("/v1/account"), 401)


def test_tokens_are_stored_as_hashes_only(live_server):
    root = live_server.registry.root / "accounts"
    stored = b"".join(p.read_bytes() for p in root.rglob("*.json"))
    for token in live_server.tokens.values():
        assert token.encode() not in stored


# ---------------------------------------------------------------- access rules


def test_create_under_another_owner_is_403(live_server):
    r = live_server.http("alice").post("/v1/models", json={"owner": "bob", "name": "m", "visibility": "public",
                                                           "hardware": "cpu"})
    assert_problem(r, 403, "bob")
    assert live_server.registry.list_models() == []


def test_private_model_of_another_owner_is_404_like_a_missing_one(live_server, tmp_path):
    reg = live_server.registry
    reg.create_model("bob/secret", visibility="private")
    (v,) = publish(reg, tmp_path, "bob/secret", 1)
    alice = live_server.http("alice")
    hidden = assert_problem(alice.get("/v1/models/bob/secret"), 404)
    missing = assert_problem(alice.get("/v1/models/bob/nothing"), 404)
    assert hidden["detail"].replace("secret", "X") == missing["detail"].replace("nothing", "X")
    assert_problem(alice.get("/v1/models/bob/secret/versions"), 404)
    assert_problem(alice.get(f"/v1/models/bob/secret/versions/{v.id}"), 404)
    assert_problem(alice.patch("/v1/models/bob/secret", json={"description": "x"}), 404)
    assert_problem(alice.delete(f"/v1/models/bob/secret/versions/{v.id}"), 404)
    assert_problem(alice.delete("/v1/models/bob/secret"), 404)
    assert [m["name"] for m in alice.get("/v1/models").json()["results"]] == []
    # its owner sees it all
    bob = live_server.http("bob")
    assert bob.get("/v1/models/bob/secret").json()["latest_version"]["id"] == v.id
    assert bob.get(f"/v1/models/bob/secret/versions/{v.id}").status_code == 200


def test_public_model_is_readable_by_all_but_changed_by_its_owner_only(live_server, tmp_path):
    reg = live_server.registry
    reg.create_model("bob/open", visibility="public", description="shared")
    (v,) = publish(reg, tmp_path, "bob/open", 1)
    alice = live_server.http("alice")
    body = alice.get("/v1/models/bob/open").json()
    assert body["description"] == "shared" and body["latest_version"]["id"] == v.id
    assert alice.get("/v1/models/bob/open/versions").json()["results"][0]["id"] == v.id
    assert alice.get(f"/v1/models/bob/open/versions/{v.id}").status_code == 200
    assert_problem(alice.patch("/v1/models/bob/open", json={"description": "mine"}), 403, "bob")
    assert_problem(alice.delete(f"/v1/models/bob/open/versions/{v.id}"), 403)
    assert_problem(alice.delete("/v1/models/bob/open"), 403)
    assert reg.get_model("bob/open").description == "shared" and reg.version("bob/open", 1) is not None


# ---------------------------------------------------------------- errors


def test_malformed_json_from_the_docs_is_400_naming_line_and_column(live_server):
    r = live_server.http("alice").post("/v1/models", content=MISSING_COMMA,
                                       headers={"Content-Type": "application/json"})
    assert_problem(r, 400, "line 3, column 3", "','")
    assert live_server.registry.list_models() == []


def test_an_unexpected_failure_is_a_500_problem_without_a_traceback(live_server, monkeypatch):
    def broken(name):
        raise RuntimeError("disk on fire at /secret/path")

    monkeypatch.setattr(live_server.registry, "get_model", broken)
    body = assert_problem(live_server.http("alice").get("/v1/models/alice/m"), 500, "RuntimeError")
    assert "/secret/path" not in body["detail"]


def test_a_form_body_is_422_asking_for_json(live_server):
    r = live_server.http("alice").post("/v1/models", data={"owner": "alice", "name": "m"})
    assert_problem(r, 422, "Content-Type: application/json")


def test_unknown_route_404_wrong_method_405_bad_field_422(live_server):
    alice = live_server.http("alice")
    assert_problem(alice.get("/v1/nothing-here"), 404, "/v1/nothing-here")
    r = assert_problem(alice.put("/v1/models"), 405, "PUT")
    del r
    assert_problem(alice.post("/v1/models", json={"owner": "alice", "name": "m", "visibility": "everyone"}), 422,
                   "visibility")
    assert_problem(alice.post("/v1/models", json={"owner": "alice", "name": "m", "colour": "red"}), 422, "colour")
    assert_problem(alice.post("/v1/models", json={"owner": "alice", "name": "Bad Name"}), 422, "invalid")


# ---------------------------------------------------------------- models


def test_models_create_get_patch_delete(live_server, tmp_path):
    alice = live_server.http("alice")
    r = alice.post("/v1/models", json={"owner": "alice", "name": "m", "visibility": "private",
                                       "hardware": "gpu-a100-large", "description": "d",
                                       "github_url": "https://github.com/a/m"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["owner"], body["name"], body["visibility"], body["hardware"]) == ("alice", "m", "private", "gpu")
    assert body["github_url"] == "https://github.com/a/m" and body["latest_version"] is None
    assert_problem(alice.post("/v1/models", json={"owner": "alice", "name": "m"}), 409, "exists")
    r = alice.patch("/v1/models/alice/m", json={"description": "new", "readme": "# m", "github_url": None})
    assert r.status_code == 200, r.text
    assert (r.json()["description"], r.json()["readme"], r.json()["github_url"]) == ("new", "# m", None)
    assert alice.get("/v1/models/alice/m").json()["description"] == "new"
    publish(live_server.registry, tmp_path, "alice/m", 1)
    assert_problem(alice.delete("/v1/models/alice/m"), 409, "versions")
    v = live_server.registry.version("alice/m", 1)
    assert alice.delete(f"/v1/models/alice/m/versions/{v.id}").status_code == 204
    assert alice.delete("/v1/models/alice/m").status_code == 204
    assert_problem(alice.get("/v1/models/alice/m"), 404)


def test_version_object_has_replicates_fields_and_ours(live_server, tmp_path):
    reg = live_server.registry
    reg.create_model("alice/m")
    v1, v2 = publish(reg, tmp_path, "alice/m", 2)
    body = live_server.http("alice").get(f"/v1/models/alice/m/versions/{v2.id}").json()
    assert body["id"] == v2.id and len(body["id"]) == 64 and body["created_at"] == v2.created_at
    assert isinstance(body["cog_version"], str)
    schemas = body["openapi_schema"]["components"]["schemas"]
    assert schemas["Output"]["type"] == "array" and schemas["Output"]["x-cog-array-type"] == "iterator"
    assert {"prompt", "max_new_tokens", "temperature", "top_p", "top_k", "seed",
            "stop_sequences"} <= set(schemas["Input"]["properties"])
    assert (body["number"], body["model"], body["metrics"]) == (2, "alice/m", {"train_loss": 0.5})
    # other selectors work too; a deleted version is 404
    alice = live_server.http("alice")
    assert alice.get("/v1/models/alice/m/versions/1").json()["id"] == v1.id
    assert alice.get(f"/v1/models/alice/m/versions/{v1.id[:12]}").json()["id"] == v1.id
    assert alice.delete(f"/v1/models/alice/m/versions/{v1.id}").status_code == 204
    assert_problem(alice.get(f"/v1/models/alice/m/versions/{v1.id}"), 404)
    assert_problem(alice.get("/v1/models/alice/m/versions/" + "0" * 64), 404)


def test_version_delete_keeps_the_cli_guards(live_server, tmp_path):
    reg = live_server.registry
    reg.create_model("alice/m")
    (v,) = publish(reg, tmp_path, "alice/m", 1)
    reg.set_alias(v.ref, "prod")
    assert_problem(live_server.http("alice").delete(f"/v1/models/alice/m/versions/{v.id}"), 409, "prod")
    assert reg.version("alice/m", 1) is not None


# ---------------------------------------------------------------- pagination


def test_versions_pages_newest_first_with_cursors(tmp_path):
    reg = Registry(tmp_path / "registry")
    reg.create_model("alice/m")
    versions = publish(reg, tmp_path, "alice/m", 7)
    with running_server(reg, server_settings(page_size=3)) as server:
        http = server.http("alice")
        seen, pages, url = [], 0, "/v1/models/alice/m/versions"
        while url:
            body = http.get(url).json()
            seen += [v["number"] for v in body["results"]]
            pages += 1
            url = body["next"]
            assert url is None or url.startswith(server.url)
        assert seen == [7, 6, 5, 4, 3, 2, 1] and pages == 3
        last = http.get(http.get(http.get("/v1/models/alice/m/versions").json()["next"]).json()["next"]).json()
        back = http.get(last["previous"]).json()
        assert [v["number"] for v in back["results"]] == [4, 3, 2]
        assert [v["id"] for v in last["results"]] == [versions[0].id]
        assert_problem_status(http.get("/v1/models/alice/m/versions", params={"cursor": "garbage!"}), 422)


def assert_problem_status(r: httpx.Response, status: int) -> None:
    assert r.status_code == status and r.json()["status"] == status


def test_models_list_pages_by_name_and_shows_only_visible(tmp_path):
    reg = Registry(tmp_path / "registry")
    for name in ("alice/a", "alice/b", "bob/pub", "alice/c"):
        reg.create_model(name, visibility="public" if name == "bob/pub" else "private")
    reg.create_model("bob/priv")
    with running_server(reg, server_settings(page_size=2)) as server:
        http = server.http("alice")
        first = http.get("/v1/models").json()
        second = http.get(first["next"]).json()
        names = [f"{m['owner']}/{m['name']}" for m in first["results"] + second["results"]]
        assert names == ["alice/a", "alice/b", "alice/c", "bob/pub"]
        assert first["previous"] is None and second["next"] is None and second["previous"]


def test_account_and_hardware(live_server):
    alice = live_server.http("alice")
    assert alice.get("/v1/account").json() == {"type": "user", "username": "alice", "name": "alice",
                                               "github_url": None}
    skus = [h["sku"] for h in alice.get("/v1/hardware").json()]
    assert skus[0] == "cpu" and set(skus) <= {"cpu", "gpu"}
    key = alice.get("/v1/webhooks/default/secret").json()["key"]
    assert key.startswith("whsec_") and key == alice.get("/v1/webhooks/default/secret").json()["key"]
    assert key != live_server.http("bob").get("/v1/webhooks/default/secret").json()["key"]
