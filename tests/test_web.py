"""The web app over HTTP (no browser): sign-in and sessions, CSRF, the access rules on pages, form errors,
version pages and deletion. The browser end to end is tests/test_web_browser.py."""

from __future__ import annotations

import re

import httpx
import pytest

from finetune.launch import free_port
from finetune.registry.accounts import Accounts


def _csrf(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def _errors(html: str) -> list[str]:
    """The errors next to fields, then those of the whole form (in the error summary, without a field link)."""
    import html as _html

    fields = re.findall(r'class="error"[^>]*>([^<]*)', html)
    summary = re.search(r'id="error-summary".*?</div>', html, re.S)
    whole = re.findall(r"<li>([^<]+)</li>", summary.group(0)) if summary else []
    return [_html.unescape(e.strip()) for e in fields + whole]


def _summary(html: str) -> list[str]:
    """Every message of the error summary at the top of a refused form."""
    import html as _html

    summary = re.search(r'id="error-summary".*?</div>', html, re.S)
    return [_html.unescape(re.sub(r"<[^>]+>", "", item).strip())
            for item in re.findall(r"<li>(.*?)</li>", summary.group(0), re.S)] if summary else []


def sign_in(server, owner: str = "alice") -> tuple[httpx.Client, str]:
    """A browser-like client signed in as ``owner``, and its session's CSRF token."""
    client = server.http(None, follow_redirects=False)
    token = _csrf(client.get("/signin").text)
    r = client.post("/signin", data={"csrf_token": token, "token": server.tokens[owner], "next": "/"})
    assert r.status_code == 303 and r.headers["location"] == "/"
    page = client.get("/")
    assert page.status_code == 200
    return client, _csrf(page.text)


@pytest.fixture
def published(live_server, tiny_model_dir):
    """alice/tiny (a base, version 1) and alice/bot with versions 1 and 2 (2's parent is 1), published
    directly, so that no training runs; bob/secret is private."""
    from finetune.registry.sources import import_base

    reg = live_server.registry
    base = import_base(reg, "alice/tiny", str(tiny_model_dir))
    reg.create_model("alice/bot", description="a bot")
    folder = reg.staging_dir("test") / "adapter"
    folder.mkdir()
    (folder / "README.md").write_text("# card\n\n<script>alert(1)</script>\n")
    (folder / "adapter_config.json").write_text("{}")
    v1 = reg.publish("alice/bot", folder, parent=base, metadata={"metrics": {"train_loss": 1.5}})
    v2 = reg.publish("alice/bot", folder, parent=v1, metadata={})
    reg.create_model("bob/secret", visibility="private")
    return v1, v2


def test_pages_need_a_signed_in_session_and_the_cookie_is_strict(live_server):
    client = live_server.http(None, follow_redirects=False)
    r = client.get("/models/alice/x")
    assert r.status_code == 303 and r.headers["location"] == "/signin?next=%2Fmodels%2Falice%2Fx"
    r = client.get("/signin")
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
    assert "default-src 'self'" in r.headers["content-security-policy"]
    bad = client.post("/signin", data={"csrf_token": _csrf(r.text), "token": "ft_nope", "next": "/"})
    assert bad.status_code == 401 and _errors(bad.text) == ["this token is not valid (unknown or revoked)"]
    # the API's own routes are untouched by the web app
    assert client.get("/v1/models").status_code == 401


def test_signing_in_rotates_the_session_and_a_revoked_token_signs_out(live_server):
    client = live_server.http(None, follow_redirects=False)
    anon_page = client.get("/signin")
    assert "finetune_session" not in client.cookies  # no session before a sign-in succeeds
    client.cookies.set("finetune_session", "planted-by-someone-else", domain="127.0.0.1")
    client.post("/signin", data={"csrf_token": _csrf(anon_page.text), "token": live_server.tokens["alice"],
                                 "next": "//evil.example/"})
    assert client.cookies.get("finetune_session", domain="127.0.0.1") != "planted-by-someone-else"  # no fixation
    assert client.get("/").status_code == 200
    accounts = Accounts(live_server.registry)
    token_id = next(t.id for t in accounts.list_tokens("alice"))
    accounts.revoke(token_id)
    assert client.get("/").status_code == 303


def test_every_state_changing_post_needs_the_csrf_token(live_server, published):
    client, csrf = sign_in(live_server)
    posts = [("/models", {"owner": "alice", "name": "m2"}), ("/models/alice/bot/versions/2/delete", {}),
             ("/signout", {}), ("/models/alice/bot/train", {}), ("/uploads", {}),
             ("/models/alice/bot/playground", {"prompt": "x"})]
    for path, data in posts:
        r = client.post(path, data=data)
        assert r.status_code == 403, path
        r = client.post(path, data={**data, "csrf_token": "wrong"})
        assert r.status_code == 403, path
    assert [v.number for v in live_server.registry.list_versions("alice/bot")] == [2, 1]
    assert "alice/m2" not in [m.full_name for m in live_server.registry.list_models()]


def test_create_model_reports_each_problem_at_its_field(live_server):
    client, csrf = sign_in(live_server)
    r = client.post("/models", data={"csrf_token": csrf, "owner": "bob", "name": "Bad Name", "visibility": "secret",
                                     "hardware": "tpu-9000", "description": ""})
    assert r.status_code == 422
    html = r.text
    for field in ("owner", "name", "visibility", "hardware"):
        assert f'id="{field}-error"' in html, field
    errors = _errors(html)
    assert any("alice cannot create models under 'bob'" in e for e in errors)
    assert any("invalid model name 'Bad Name'" in e for e in errors)
    r = client.post("/models", data={"csrf_token": csrf, "owner": "alice", "name": "bot2", "visibility": "public",
                                     "hardware": "cpu", "description": "d"})
    assert r.status_code == 303 and r.headers["location"] == "/models/alice/bot2/train"
    m = live_server.registry.get_model("alice/bot2")
    assert (m.visibility, m.hardware, m.description) == ("public", "cpu", "d")
    r = client.post("/models", data={"csrf_token": csrf, "owner": "alice", "name": "bot2", "visibility": "public",
                                     "hardware": "cpu"})
    assert _errors(r.text) == ["model alice/bot2 already exists"]


def test_another_accounts_private_model_is_not_found_like_a_missing_one(live_server, published):
    client, _ = sign_in(live_server, "alice")
    for path in ("/models/bob/secret", "/models/bob/secret/train", "/models/bob/secret/versions/1",
                 "/models/bob/nothing", "/models/bob/nothing/trainings"):
        r = client.get(path)
        assert r.status_code == 404, path
        assert "not found" in r.text
    bob, bob_csrf = sign_in(live_server, "bob")
    assert bob.get("/models/alice/bot").status_code == 404  # alice's models are private
    r = bob.post("/models/alice/bot/versions/1/delete", data={"csrf_token": bob_csrf})
    assert r.status_code == 404
    models = bob.get("/").text
    assert "bob/secret" in models and "alice/bot" not in models


def test_version_pages_render_the_card_safely_and_serve_only_manifest_files(live_server, published):
    v1, v2 = published
    client, _ = sign_in(live_server)
    page = client.get("/models/alice/bot/versions/2")
    assert page.status_code == 200
    assert "<script>alert(1)</script>" not in page.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert 'finetune.load(&#34;alice/bot:2&#34;)' in page.text or 'finetune.load("alice/bot:2")' in page.text
    assert v2.id in page.text and "alice/tiny:1" in page.text  # lineage down to the base
    assert client.get("/models/alice/bot/versions/2/files/README.md").status_code == 200
    assert client.get("/models/alice/bot/versions/2/files/../model.json").status_code == 404
    zipped = client.get("/models/alice/bot/versions/2/adapter.zip")
    assert zipped.status_code == 200 and zipped.headers["content-type"] == "application/zip"
    import io
    import zipfile

    assert sorted(zipfile.ZipFile(io.BytesIO(zipped.content)).namelist()) == \
        ["README.md", "adapter_config.json", "manifest.json"]
    versions = client.get("/models/alice/bot").text
    assert versions.index(v2.id[:8]) < versions.index(v1.id[:8])  # newest first
    assert "1.5000" in versions


def test_deleting_a_version_is_refused_as_the_cli_refuses(live_server, published):
    client, csrf = sign_in(live_server)
    r = client.post("/models/alice/bot/versions/1/delete", data={"csrf_token": csrf})
    assert r.status_code == 303
    page = client.get(r.headers["location"])
    assert "is the parent of alice/bot:2" in page.text
    assert [v.number for v in live_server.registry.list_versions("alice/bot")] == [2, 1]
    client.post("/models/alice/bot/versions/2/delete", data={"csrf_token": csrf})
    r = client.post("/models/alice/bot/versions/1/delete", data={"csrf_token": csrf})
    assert "Deleted alice/bot:1" in client.get(r.headers["location"]).text
    assert live_server.registry.list_versions("alice/bot") == []


def test_a_one_time_link_signs_in_once(live_server):
    from finetune.web.app import signin_link_path

    path = signin_link_path(live_server.app, "alice")
    client = live_server.http(None, follow_redirects=False)
    r = client.get(path)
    assert r.status_code == 303 and r.headers["location"] == "/"
    assert client.get("/").status_code == 200
    other = live_server.http(None, follow_redirects=False)
    assert other.get(path).status_code == 410


def test_serve_open_browser_prints_a_link_that_signs_in(tmp_path):
    import os
    import subprocess
    import sys
    import time

    from finetune.registry import Registry

    root = tmp_path / "registry"
    Registry(root).create_model("alice/mine")
    port = free_port()
    env = {**os.environ, "FINETUNE_HOME": str(root), "BROWSER": "true"}  # "open" the link with true(1)
    proc = subprocess.Popen([sys.executable, "-m", "finetune", "serve", "--port", str(port), "--no-access-log",
                             "--open-browser", "--web-user", "alice"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 60
        while "sign in to the web app" not in line:
            assert proc.poll() is None and time.monotonic() < deadline, line
            line = proc.stdout.readline()
        url = line.strip().rsplit(" ", 1)[1]
        assert url.startswith(f"http://127.0.0.1:{port}/signin/link/")
        with httpx.Client(follow_redirects=False, timeout=30) as client:
            for _ in range(600):
                try:
                    r = client.get(url)
                    break
                except httpx.TransportError:
                    time.sleep(0.05)
            assert r.status_code == 303
            page = client.get(f"http://127.0.0.1:{port}/")
            assert page.status_code == 200 and "alice/mine" in page.text
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_a_training_started_from_the_form_can_be_followed_and_canceled(live_server, tiny_model_dir):
    """The Train form's submit creates the API's training (same record, same queue); its live view is the
    owner's only; Cancel stops it."""
    import time
    from pathlib import Path

    from finetune.registry.sources import import_base

    import_base(live_server.registry, "alice/tiny", str(tiny_model_dir))
    client, csrf = sign_in(live_server)
    client.post("/models", data={"csrf_token": csrf, "owner": "alice", "name": "long", "visibility": "private",
                                 "hardware": "cpu"})
    data = Path(__file__).resolve().parent.parent / "finetune" / "assets" / "quickstart.jsonl"
    with open(data, "rb") as f:
        r = client.post("/uploads", files={"file": ("quickstart.jsonl", f, "application/jsonl")},
                        headers={"X-CSRF-Token": csrf, "Accept": "application/json"})
    assert r.status_code == 201
    file_id = r.json()["id"]
    form = {"csrf_token": csrf, "base_model": "alice/tiny:1", "data_upload": file_id, "data.format": "auto",
            "train.max_steps": "100000", "train.epochs": "1", "train.lr": "1e-3", "train.batch_size": "4",
            "lora.r": "4", "data.max_seq_len": "64", "data.eval": "", "advanced": ""}
    r = client.post("/models/alice/long/train", data=form)
    assert r.status_code == 303, _errors(r.text)
    training_id = r.headers["location"].rsplit("/", 1)[1]
    api = live_server.http("alice").get(f"/v1/trainings/{training_id}")  # the same object through the API
    assert api.status_code == 200 and api.json()["status"] in ("starting", "processing")
    bob, _ = sign_in(live_server, "bob")
    assert bob.get(f"/trainings/{training_id}").status_code == 404
    assert bob.get(f"/trainings/{training_id}/live").status_code == 404
    assert client.post(f"/trainings/{training_id}/cancel", data={"csrf_token": csrf}).status_code == 303
    deadline = time.monotonic() + 120
    while True:
        live = client.get(f"/trainings/{training_id}/live", params={"log_offset": 0}).json()
        if live["final"] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert live["status"] == "canceled"
    assert live_server.registry.list_versions("alice/long") == []


def test_the_train_form_says_the_servers_training_limits(tmp_path, tiny_model_dir, fake_executor):
    """The step limit is an error at its field; the per-account cap is one above the form (429), as the API
    refuses them. Nothing trains (a fake executor)."""
    from pathlib import Path

    from service import running_server, server_settings

    from finetune.registry import Registry
    from finetune.registry.sources import import_base

    reg = Registry(tmp_path / "registry")
    import_base(reg, "alice/tiny", str(tiny_model_dir))
    reg.create_model("alice/c")
    with running_server(reg, server_settings(max_trainings_per_account=1, max_training_steps=1000)) as server:
        client, csrf = sign_in(server)
        data = Path(__file__).resolve().parent.parent / "finetune" / "assets" / "quickstart.jsonl"
        with open(data, "rb") as f:
            file_id = client.post("/uploads", files={"file": ("q.jsonl", f, "application/jsonl")},
                                  headers={"X-CSRF-Token": csrf, "Accept": "application/json"}).json()["id"]
        form = {"csrf_token": csrf, "base_model": "alice/tiny:1", "data_upload": file_id, "data.format": "auto",
                "train.max_steps": "100000", "train.epochs": "1", "train.lr": "1e-3", "train.batch_size": "4",
                "lora.r": "4", "data.max_seq_len": "64", "data.eval": "", "advanced": ""}
        r = client.post("/models/alice/c/train", data=form)
        assert r.status_code == 422 and any("--max-training-steps" in e for e in _errors(r.text)), _errors(r.text)
        assert client.post("/models/alice/c/train", data={**form, "train.max_steps": "2"}).status_code == 303
        r = client.post("/models/alice/c/train", data={**form, "train.max_steps": "2"})
        assert r.status_code == 429 and any("--max-trainings-per-account 1" in e for e in _errors(r.text))
