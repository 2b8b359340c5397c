"""The web app's flows over HTTP (no browser, nothing trains: a fake executor): the error summary of a refused
form, training from a base or a public model into a destination of yours, the start point's default and words,
what a training page says was trained and "train again", a model's settings and deletion, uploads (one entry
per file, deletion and its guard), the playground's per-field errors, and the live view's queue place. The
browser walks the same flows in tests/test_web_browser.py."""

from __future__ import annotations

import html as _html
import re
from pathlib import Path

import pytest
from test_web import _csrf, _errors, _summary, published, sign_in  # noqa: F401  (published: a fixture)

QUICKSTART = Path(__file__).resolve().parent.parent / "finetune" / "assets" / "quickstart.jsonl"
FORM = {"data.format": "auto", "train.max_steps": "3", "train.epochs": "1", "train.lr": "1e-3",
        "train.batch_size": "4", "lora.r": "4", "data.max_seq_len": "64", "data.eval": "", "advanced": ""}


def _upload(client, csrf: str, name: str = "quickstart.jsonl", data: bytes | None = None) -> dict:
    content = data if data is not None else QUICKSTART.read_bytes()
    r = client.post("/uploads", files={"file": (name, content, "application/jsonl")},
                    headers={"X-CSRF-Token": csrf, "Accept": "application/json"})
    assert r.status_code == 201, r.text
    return r.json()


def _text(html: str) -> str:
    return _html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)))


def _selected(html: str, select_id: str) -> str | None:
    block = re.search(rf'<select id="{re.escape(select_id)}".*?</select>', html, re.S).group(0)
    chosen = re.search(r'<option value="([^"]*)"[^>]*selected', block)
    return _html.unescape(chosen.group(1)) if chosen else None


def _value(html: str, input_id: str) -> str:
    return _html.unescape(re.search(rf'id="{re.escape(input_id)}"[^>]*value="([^"]*)"', html).group(1))


@pytest.fixture
def web(live_server, published, fake_executor):  # noqa: F811
    """alice/tiny (a base) and alice/bot (1, 2) published, bob/secret private; trainings queue on a fake
    executor (one slot, nothing runs)."""
    return live_server


def test_a_refused_train_form_summarises_every_problem_at_its_top_and_keeps_the_input(web):
    client, csrf = sign_in(web)
    upload = _upload(client, csrf)
    form = {**FORM, "csrf_token": csrf, "base_model": "alice/bot:1", "data_upload": upload["id"], "train.lr": "-1",
            "train.batch_size": "abc", "advanced": "train:\n  warmupp: 2\n"}
    r = client.post("/models/alice/bot/train", data=form)
    assert r.status_code == 422
    assert sorted(_summary(r.text)) == ["train.batch_size: expected an integer, got 'abc'",
                                        "train.lr: must be > 0, got -1.0",
                                        "unknown key 'train.warmupp' (did you mean 'train.warmup_steps'?)"]
    assert "3 problems to fix" in r.text
    # each links to its field, which is on the page; the summary comes before the form's fields
    targets = re.findall(r'<li><a href="#([^"]+)"', r.text)
    assert sorted(targets) == ["advanced", "train-batch_size", "train-lr"]
    assert all(f'id="{target}"' in r.text for target in targets)
    assert r.text.index('id="error-summary"') < r.text.index('id="base_model"')
    # what the user typed and uploaded is kept
    assert _value(r.text, "train-lr") == "-1" and _value(r.text, "train-batch_size") == "abc"
    assert _selected(r.text, "data_upload") == upload["id"] and _selected(r.text, "base_model") == "alice/bot:1"
    assert "warmupp" in r.text
    # the models page's create form, which sits below the table, says its problems at the top of the page
    r = client.post("/models", data={"csrf_token": csrf, "owner": "alice", "name": "Bad Name", "visibility": "private",
                                     "hardware": "auto"})
    assert r.status_code == 422 and r.text.index('id="error-summary"') < r.text.index("<table")
    assert any("invalid model name 'Bad Name'" in m for m in _summary(r.text))


def test_the_train_tab_of_a_base_or_a_public_model_trains_from_it_into_a_destination(web):
    reg = web.registry
    alice, alice_csrf = sign_in(web, "alice")
    page = alice.get("/models/alice/tiny/train").text
    assert 'id="destination"' in page and "Train from" in page and "Only the owner" not in page
    assert _selected(page, "destination") == "__new__"  # nothing trained from it yet: a new model
    assert "alice/bot" in page  # a destination of hers is offered
    upload = _upload(alice, alice_csrf)
    base = {**FORM, "csrf_token": alice_csrf, "base_model": "alice/tiny:1", "data_upload": upload["id"]}
    r = alice.post("/models/alice/tiny/train", data={**base, "destination": "__new__", "destination_name": "Bad!"})
    assert r.status_code == 422 and any("invalid model name 'Bad!'" in e for e in _summary(r.text))
    r = alice.post("/models/alice/tiny/train", data={**base, "destination": "__new__", "destination_name": "bot"})
    assert r.status_code == 422 and any("alice/bot already exists" in e for e in _summary(r.text))
    r = alice.post("/models/alice/tiny/train", data={**base, "destination": "__new__", "destination_name": "tiny-ft",
                                                     "destination_visibility": "private"})
    assert r.status_code == 303, _errors(r.text)
    record_id = r.headers["location"].rsplit("/", 1)[1]
    from finetune.registry.jobs import Trainings

    record = Trainings(reg).get(record_id)
    assert record.destination == "alice/tiny-ft" and record.input["base_model"] == "alice/tiny:1"
    assert reg.get_model("alice/tiny-ft").visibility == "private"
    # the next visit to the base's Train tab goes to the same destination
    assert _selected(alice.get("/models/alice/tiny/train").text, "destination") == "alice/tiny-ft"
    # bob trains from alice's model once it is public; he never trains into it
    reg.set_visibility("alice/bot", "public")
    bob, bob_csrf = sign_in(web, "bob")
    page = bob.get("/models/alice/bot/train").text
    assert 'id="destination"' in page and "alice/bot:2" in page and "alice/tiny-ft" not in page
    bob_upload = _upload(bob, bob_csrf)
    r = bob.post("/models/alice/bot/train", data={**FORM, "csrf_token": bob_csrf, "base_model": "alice/bot:2",
                                                  "data_upload": bob_upload["id"], "destination": "alice/bot"})
    assert r.status_code == 422 and "choose where the new version goes" in " ".join(_summary(r.text))
    r = bob.post("/models/alice/bot/train", data={**FORM, "csrf_token": bob_csrf, "base_model": "alice/bot:2",
                                                  "data_upload": bob_upload["id"], "destination": "__new__",
                                                  "destination_name": "mine"})
    assert r.status_code == 303
    assert Trainings(reg).get(r.headers["location"].rsplit("/", 1)[1]).destination == "bob/mine"


def test_start_from_defaults_to_the_users_last_choice_else_the_base_and_says_which(web):
    client, csrf = sign_in(web)
    page = client.get("/models/alice/bot/train").text
    # no training into alice/bot yet: the base its versions descend from, not its newest version
    assert _selected(page, "base_model") == "alice/tiny:1"
    assert "Start from the base alice/tiny:1" in _text(page)
    upload = _upload(client, csrf)
    r = client.post("/models/alice/bot/train", data={**FORM, "csrf_token": csrf, "base_model": "alice/bot:1",
                                                     "data_upload": upload["id"]})
    assert r.status_code == 303
    page = client.get("/models/alice/bot/train").text
    assert _selected(page, "base_model") == "alice/bot:1"  # what she chose last time, not :2
    assert "Continue from alice/bot:1" in _text(page)
    training = _text(client.get(r.headers["location"]).text)
    assert "Start point continued from alice/bot:1" in training


def test_a_training_page_shows_what_it_trains_and_trains_again_with_those_settings(web):
    client, csrf = sign_in(web)
    upload = _upload(client, csrf, name="capitals.jsonl")
    r = client.post("/models/alice/bot/train", data={**FORM, "csrf_token": csrf, "base_model": "alice/tiny:1",
                                                     "data_upload": upload["id"], "train.lr": "0.003",
                                                     "advanced": "train:\n  warmup_steps: 2\n"})
    assert r.status_code == 303
    page = client.get(r.headers["location"]).text
    text = _text(page)
    sha = web.registry.files_dir()  # the server's path of the upload never shows
    assert str(sha) not in page and "content.jsonl" not in page
    assert "Data file capitals.jsonl" in text and "Start point the base alice/tiny:1" in text
    assert "Learning rate 0.003" in text and "train.warmup_steps : 2" in text, text
    again = re.search(r'href="([^"]+)" id="t-again"', page).group(1)
    form = client.get(_html.unescape(again)).text
    assert _value(form, "train-lr") == "0.003" and _value(form, "train-max_steps") == "3"
    assert _selected(form, "data_upload") == upload["id"] and _selected(form, "base_model") == "alice/tiny:1"
    assert "warmup_steps: 2" in form and "The settings of training" in form
    assert r.headers["location"].rsplit("/", 1)[1] in form


def test_queued_trainings_show_their_place_and_no_duration_before_they_start(web):
    client, csrf = sign_in(web)
    upload = _upload(client, csrf)
    ids = []
    for _ in range(3):  # one slot: the first holds it, the others wait in line
        r = client.post("/models/alice/bot/train", data={**FORM, "csrf_token": csrf, "base_model": "alice/tiny:1",
                                                         "data_upload": upload["id"]})
        assert r.status_code == 303
        ids.append(r.headers["location"].rsplit("/", 1)[1])
    live = [client.get(f"/trainings/{i}/live").json() for i in ids]
    assert live[1]["progress"] == "queued: #1 in line (next to start)"
    assert live[2]["progress"] == "queued: #2 in line (1 training ahead)"
    assert live[1]["duration"] == "–" and live[2]["eta"] == "–"


def test_model_settings_edit_visibility_and_delete_with_the_apis_guards(web):
    reg = web.registry
    client, csrf = sign_in(web)
    bob, bob_csrf = sign_in(web, "bob")
    assert "Settings" in client.get("/models/alice/bot").text
    r = client.post("/models/alice/bot/settings", data={"csrf_token": csrf, "description": "answers",
                                                        "readme": "# About\n\nIt **answers**.", "visibility": "public"})
    assert r.status_code == 303
    model = reg.get_model("alice/bot")
    assert (model.description, model.readme, model.visibility) == ("answers", "# About\n\nIt **answers**.", "public")
    assert "<strong>answers</strong>" in client.get("/models/alice/bot").text  # the README above the versions
    assert bob.get("/models/alice/bot").status_code == 200  # public now
    assert "Settings" not in bob.get("/models/alice/bot").text
    assert bob.get("/models/alice/bot/settings").status_code == 403
    assert bob.post("/models/alice/bot/settings", data={"csrf_token": bob_csrf, "visibility": "private"}).status_code \
        == 403
    assert bob.post("/models/alice/bot/delete", data={"csrf_token": bob_csrf}).status_code == 403
    r = client.post("/models/alice/bot/settings", data={"csrf_token": csrf, "description": "x" * 2001,
                                                        "visibility": "secret"})
    assert r.status_code == 422 and 'id="visibility-error"' in r.text
    # the API changes it the same way
    api = web.http("alice").patch("/v1/models/alice/bot", json={"visibility": "private"})
    assert api.status_code == 200 and reg.get_model("alice/bot").visibility == "private"
    assert bob.get("/models/alice/bot").status_code == 404
    # delete: refused while it has versions, as the API refuses; then it goes
    r = client.post("/models/alice/bot/delete", data={"csrf_token": csrf})
    assert r.status_code == 303 and "still has versions" in client.get(r.headers["location"]).text
    for n in (2, 1):
        reg.delete_version(f"alice/bot:{n}")
    r = client.post("/models/alice/bot/delete", data={"csrf_token": csrf})
    assert r.status_code == 303 and r.headers["location"] == "/"
    assert "Deleted alice/bot." in client.get("/").text
    assert "alice/bot" not in [m.full_name for m in reg.list_models()]


def test_uploads_are_listed_once_by_name_and_deleted_unless_a_waiting_training_reads_them(web):
    client, csrf = sign_in(web)
    first = _upload(client, csrf, name="capitals.jsonl")
    again = _upload(client, csrf, name="capitals.jsonl")
    assert again["id"] == first["id"]  # the same bytes under the same name: the file already there
    other = _upload(client, csrf, name="capitals.jsonl", data=QUICKSTART.read_bytes()[:400].rsplit(b"\n", 1)[0])
    assert other["id"] != first["id"]
    page = client.get("/uploads").text
    assert page.count("<td class=\"card-title break\">capitals.jsonl</td>") == 2 and "same name as another" in page
    assert "content.jsonl" not in page and str(web.registry.root) not in page
    # the Train tab's picker tells the two apart by their upload time
    picker = re.search(r'<select id="data_upload".*?</select>', client.get("/models/alice/bot/train").text, re.S)[0]
    assert picker.count("capitals.jsonl (") == 2 and picker.count(", 20") == 2
    # a training that waits reads the file: deleting it is refused, here and in the API
    for _ in range(2):
        r = client.post("/models/alice/bot/train", data={**FORM, "csrf_token": csrf, "base_model": "alice/tiny:1",
                                                         "data_upload": first["id"]})
        assert r.status_code == 303
    r = client.post(f"/uploads/{first['id']}/delete", data={"csrf_token": csrf})
    assert r.status_code == 303 and "is the data of training" in client.get("/uploads").text
    assert web.http("alice").delete(f"/v1/files/{first['id']}").status_code == 409
    r = client.post(f"/uploads/{other['id']}/delete", data={"csrf_token": csrf})
    assert "Deleted capitals.jsonl." in client.get(r.headers["location"]).text
    assert [f.id for f in __import__("finetune.registry.files", fromlist=["Files"]).Files(web.registry).list("alice")] \
        == [first["id"]]
    bob, bob_csrf = sign_in(web, "bob")
    assert bob.post(f"/uploads/{first['id']}/delete", data={"csrf_token": bob_csrf}).status_code == 404


def test_the_playground_reports_every_problem_at_its_field(web):
    client, csrf = sign_in(web)
    r = client.post("/models/alice/bot/playground",
                    data={"csrf_token": csrf, "version": "2", "prompt": "  ", "max_new_tokens": "abc",
                          "temperature": "-1", "seed": "1.5"},
                    headers={"Accept": "application/json"})
    assert r.status_code == 422
    errors = r.json()["errors"]
    assert set(errors) == {"prompt", "max_new_tokens", "temperature", "seed"}, errors
    assert "temperature" in errors["temperature"][0] and "Seed: expected an integer" in errors["seed"][0]
    r = client.post("/models/alice/bot/playground", data={"csrf_token": csrf, "version": "9", "prompt": "hi"},
                    headers={"Accept": "application/json"})
    assert r.status_code == 422 and set(r.json()["errors"]) == {"version"}
    page = client.get("/models/alice/bot/playground").text
    assert 'id="pg-stop"' in page and 'id="pg-max-error"' in page and 'id="pg-temp-error"' in page


def test_pages_name_uploads_and_base_folders_never_by_a_server_path(web, tiny_model_dir):
    client, csrf = sign_in(web)
    bad = _upload(client, csrf, name="bad.jsonl", data=b'{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    r = client.post("/models/alice/bot/train", data={**FORM, "csrf_token": csrf, "base_model": "alice/tiny:1",
                                                     "data_upload": bad["id"]})
    assert r.status_code == 422
    problems = " ".join(_summary(r.text))
    assert "bad.jsonl:2" in problems, problems
    preview = client.post("/models/alice/bot/train/preview", data={"csrf_token": csrf, "data_upload": bad["id"]})
    assert "bad.jsonl:2" in preview.text
    for page in (r.text, preview.text, client.get("/models/alice/tiny/versions/1").text,
                 client.get("/models/alice/tiny").text, client.get("/models/alice/bot/versions/2").text):
        assert str(web.registry.root) not in page and str(tiny_model_dir) not in page
    assert "local folder model" in client.get("/models/alice/tiny/versions/1").text  # its name, not its path
