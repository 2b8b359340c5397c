"""The web app in a real browser (Playwright driving Debian's Chromium), as a new user would use it, at 1280x800
and at 375x812 (a phone).

One end-to-end path: sign in; a refused form puts its error summary in view (both widths) and keeps the input;
the base model's Train tab trains from it into a new model; the training page follows the run live (a log line
per step, ETA, chart) and says what it trains; "Train again with these settings" continues from version 1; the
version page shows no server path; the playground reports each bad field, says it is loading the version,
streams, counts tokens, stops, shows whitespace-only output, and holds a chat for a version trained on chat
data; compare; tables fit a phone (every cell, badge and button measured against the viewport); a model's
settings, its deletion and the deletion of versions and uploads obey the API's guards; another account's
private model stays unreachable and a form POST without the CSRF token is refused.

Screenshots of every page at both widths go to ``out/screenshots/``; with ``FINETUNE_DOCS_SHOTS=1`` the main
pages' also go to ``docs/`` (viewport-sized), where the README shows them.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "out" / "screenshots"
DOCS = ROOT / "docs"
QUICKSTART = ROOT / "finetune" / "assets" / "quickstart.jsonl"
TRAIN_TIMEOUT_MS = 300_000
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 375, "height": 812}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                       reason=f"no Chromium at {CHROMIUM} (install Debian's package: apt-get install -y chromium)"),
]

# Every cell, badge, button and link of a table (and the error summary) must lie inside the viewport: nothing
# cut off, nothing behind a sideways scroll. Returns the offenders.
_MEASURE = """() => {
  const width = document.documentElement.clientWidth;
  const bad = [];
  const name = (el) => el.tagName.toLowerCase() + (el.className ? "." + String(el.className).split(" ")[0] : "") +
                       " '" + (el.textContent || "").trim().slice(0, 30) + "'";
  for (const el of document.querySelectorAll("main td, main td *, main .error-summary, main .badge, main button")) {
    if (el.closest("thead") || el.closest("[hidden]")) continue;
    const box = el.getBoundingClientRect();
    if (box.width === 0 && box.height === 0) continue;
    if (box.left < -0.5 || box.right > width + 0.5) bad.push(name(el) + " spans " + Math.round(box.left) + "-" +
                                                            Math.round(box.right));
  }
  for (const wrap of document.querySelectorAll("main .table-wrap, main td")) {
    if (wrap.scrollWidth > wrap.clientWidth + 1) bad.push(name(wrap) + " scrolls: " + wrap.scrollWidth + " > " +
                                                          wrap.clientWidth);
  }
  return {width: width, page: document.documentElement.scrollWidth, bad: bad};
}"""

_RECORD_STATUS = """() => {
  window.__statuses = [];
  const el = document.getElementById("pg-status");
  new MutationObserver(() => window.__statuses.push(el.textContent)).observe(
    el, {childList: true, characterData: true, subtree: true});
}"""


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def web(tmp_path, tiny_model_dir):
    """A server over a registry holding alice's tiny base model and bob's private model."""
    from service import running_server

    from finetune.registry import Registry
    from finetune.registry.sources import import_base

    reg = Registry(tmp_path / "registry")
    import_base(reg, "alice/tiny-base", str(tiny_model_dir))
    reg.create_model("bob/secret", visibility="private")
    with running_server(reg) as server:
        yield server


def fits_a_phone(page, name: str) -> None:
    """At the phone's width, nothing of the page's tables is cut off or hidden behind a sideways scroll."""
    page.set_viewport_size(PHONE)
    seen = page.evaluate(_MEASURE)
    assert seen["page"] <= PHONE["width"], f"{name}: the page is {seen['page']}px wide at {PHONE['width']}px"
    assert not seen["bad"], f"{name} at {PHONE['width']}px: " + "; ".join(seen["bad"][:8])


def shoot(page, name: str, docs: bool = False) -> None:
    """Screenshots of the page as it is now, at desktop width and at a phone's (which must fit it); with
    ``FINETUNE_DOCS_SHOTS=1``, ``docs`` pages also go to docs/ at the viewport's size."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    to_docs = docs and os.environ.get("FINETUNE_DOCS_SHOTS") == "1"
    page.set_viewport_size(DESKTOP)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
    if to_docs:
        page.screenshot(path=str(DOCS / f"web-{name}.png"))
    fits_a_phone(page, name)
    page.screenshot(path=str(SHOTS / f"{name}-375.png"), full_page=True)
    if to_docs:
        page.screenshot(path=str(DOCS / f"web-{name}-phone.png"))
    page.set_viewport_size(DESKTOP)


def error_of(page, field_id: str) -> str:
    """The error text shown next to a field (linked by aria-describedby)."""
    described = page.get_attribute(f"#{field_id}", "aria-describedby")
    assert described, f"#{field_id} has no error"
    return page.inner_text(f"#{described.split()[0]}")


def summary_in_view(page, size: dict, count: int) -> None:
    """After a refused submit, the error summary is in the viewport, has the focus and lists ``count`` problems."""
    page.wait_for_selector("#error-summary")
    box = page.locator("#error-summary").bounding_box()
    assert box is not None and box["y"] >= -1 and box["y"] + box["height"] <= size["height"] + 1, \
        f"the error summary is at y={box and box['y']}..{box and box['y'] + box['height']} in a {size} viewport"
    assert page.evaluate("() => document.activeElement.id") == "error-summary"
    assert page.locator("#error-summary li").count() == count


def wait_status(page, selector: str, done: tuple[str, ...], timeout_ms: int = 120_000) -> str:
    """Poll an element's text until it is one of ``done`` (the page's CSP forbids wait_for_function's eval)."""
    text = ""
    for _ in range(timeout_ms // 200):
        text = page.inner_text(selector).strip()
        if text in done:
            return text
        page.wait_for_timeout(200)
    raise AssertionError(f"{selector} stayed {text!r}")


def follow_training(page) -> dict:
    """Watch the training page (no reload) until the run ends; what was seen on the way."""
    seen = {"points": [], "logs": [], "etas": []}
    for _ in range(TRAIN_TIMEOUT_MS // 200):
        status = page.inner_text("#t-status").strip()
        chart = page.locator("#t-chart polyline.chart-train")
        seen["points"].append(chart.count() and len(chart.get_attribute("points").split()))
        if status in ("succeeded", "failed", "canceled"):
            assert status == "succeeded", page.inner_text("#t-error") + "\n" + page.inner_text("#t-log")
            return seen
        seen["logs"].append(page.inner_text("#t-log"))
        seen["etas"].append(page.inner_text("#t-eta"))
        page.wait_for_timeout(200)
    raise AssertionError("the training did not finish in time")


def sign_in(context, url: str, token: str):
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())
    page.goto(url + "/signin")
    page.fill("#token", token)
    page.click("button:has-text('Sign in')")
    page.wait_for_selector("h1:has-text('Models')")
    return page


def publish_chat_version(reg, source) -> None:
    """alice/chat-bot:1, a version trained on chat data: ``source``'s adapter published with the chat format."""
    folder = reg.staging_dir("test-chat") / "adapter"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(source.path / name, folder / name)
    meta = {k: v for k, v in source.metadata.items() if k != "training_id"}
    meta["prompt_format"] = {"name": "messages", "template": None, "chat_template": None}
    reg.create_model("alice/chat-bot")
    reg.publish("alice/chat-bot", folder, parent=reg.resolve("alice/tiny-base:1"), metadata=meta)


def test_a_new_user_trains_and_uses_versions_in_the_browser(web, browser):
    url, reg = web.url, web.registry
    context = browser.new_context(viewport=DESKTOP)
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())

    # ---- sign in: a wrong token is refused next to the field, the right one opens the models page
    page.goto(url + "/")
    page.wait_for_url(re.compile(r"/signin"))
    shoot(page, "signin")
    page.fill("#token", "ft_not-a-token")
    page.click("button:has-text('Sign in')")
    assert "not valid" in error_of(page, "token")
    page.fill("#token", web.tokens["alice"])
    page.click("button:has-text('Sign in')")
    page.wait_for_selector("h1:has-text('Models')")
    cookie = next(c for c in context.cookies() if c["name"] == "finetune_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert page.locator("tr:has-text('alice/tiny-base') .badge.base").count() == 1  # marked: trained from

    # ---- create a model: the form is below the table; its problems are summarised in view, at both widths
    for size in (DESKTOP, PHONE):
        page.set_viewport_size(size)
        page.fill("#owner", "bob")
        page.fill("#name", "Bad Name!")
        page.click("button:has-text('Create model')")
        summary_in_view(page, size, 2)
        assert "invalid model name 'Bad Name!'" in error_of(page, "name")
        assert page.input_value("#name") == "Bad Name!"  # kept
    page.set_viewport_size(DESKTOP)
    page.fill("#owner", "alice")
    page.fill("#name", "tiny-base")
    page.click("button:has-text('Create model')")
    assert "already exists" in error_of(page, "name")
    shoot(page, "models-errors")

    # ---- the base model's Train tab: train from it into a new model of hers
    page.goto(url + "/")
    page.click("tr:has-text('alice/tiny-base') >> text=Train from")
    page.wait_for_url(re.compile(r"/models/alice/tiny-base/train$"))
    assert page.input_value("#destination") == "__new__"
    assert "Start from the base alice/tiny-base:1" in page.inner_text("#start-note")
    page.fill("#destination_name", "web-bot")
    page.set_input_files("#data_file", str(QUICKSTART))
    page.wait_for_selector("mark.learned")
    assert "70 rows" in page.inner_text("#preview") and "alpaca" in page.inner_text("#preview")
    assert "### Response:" in page.inner_text(".example >> nth=0")
    upload_id = page.input_value("#data_upload")
    shoot(page, "train", docs=True)
    page.click("summary:has-text('Advanced')")
    for size in (DESKTOP, PHONE):  # bad settings: the summary is in view, each error at its field, input kept
        page.set_viewport_size(size)
        page.fill("#train-lr", "-1")
        page.fill("#train-batch_size", "abc")
        page.fill("#advanced", "train:\n  warmupp: 2\n")
        page.click("text=Start training")
        summary_in_view(page, size, 3)
        assert error_of(page, "train-lr") == "train.lr: must be > 0, got -1.0"
        assert error_of(page, "train-batch_size") == "train.batch_size: expected an integer, got 'abc'"
        assert "unknown key 'train.warmupp' (did you mean 'train.warmup_steps'?)" in error_of(page, "advanced")
        assert (page.input_value("#data_upload"), page.input_value("#destination_name")) == (upload_id, "web-bot")
        assert page.input_value("#train-batch_size") == "abc"
    page.click("#error-summary a[href='#train-lr']")  # a summary link takes the user to the field
    assert page.evaluate("() => document.activeElement.id") == "train-lr"
    shoot(page, "train-errors")
    # enough steps for the page to show an ETA on a fast CPU, at a rate that leaves the tiny model answering
    page.fill("#train-max_steps", "24")
    page.fill("#train-lr", "5e-4")
    page.fill("#train-batch_size", "16")
    page.fill("#data-max_seq_len", "128")
    page.fill("#data-eval", "0.1")
    page.fill("#advanced", "train:\n  eval_every: 3\n")
    page.click("text=Start training")
    page.wait_for_url(re.compile(r"/trainings/[\w-]+$"))
    first = page.url.rsplit("/", 1)[1]
    assert reg.get_model("alice/web-bot").visibility == "private"

    # ---- the training page follows the run: a log line per step, an ETA from measured steps, the chart
    assert "the base alice/tiny-base:1" in page.inner_text("#t-start")
    assert page.inner_text("#t-data").startswith("quickstart.jsonl")
    seen = follow_training(page)
    assert seen["points"][-1] >= 2 and seen["points"][-1] > seen["points"][0], f"no live chart: {seen['points']}"
    assert any(re.search(r"step \d+/24: loss", log) for log in seen["logs"]), "no step line in the log while it ran"
    assert "step 24/24: loss" in page.inner_text("#t-log")
    assert any(re.fullmatch(r"\d+ s|\d+ min \d+ s", eta) for eta in seen["etas"]), f"no ETA: {set(seen['etas'])}"
    assert page.inner_text("#t-version") == "alice/web-bot:1"
    shoot(page, "training", docs=True)
    page.goto(f"{url}/models/alice/web-bot")
    rows = page.locator("tbody tr")
    assert rows.count() == 1 and rows.nth(0).locator("td").nth(0).inner_text().startswith("1")
    assert "70 rows" in rows.nth(0).inner_text()
    shoot(page, "model-versions")

    # ---- train again with these settings: the form comes back filled; continue from version 1 this time
    page.goto(f"{url}/trainings/{first}")
    page.click("text=Train again with these settings")
    page.wait_for_url(re.compile(r"/models/alice/web-bot/train\?again="))
    assert (page.input_value("#train-max_steps"), page.input_value("#train-lr")) == ("24", "0.0005")
    assert page.input_value("#data_upload") == upload_id and "eval_every: 3" in page.input_value("#advanced")
    assert page.input_value("#base_model") == "alice/tiny-base:1"  # what she chose last time: the base
    page.select_option("#base_model", "alice/web-bot:1")
    assert "Continue from alice/web-bot:1" in page.inner_text("#start-note")
    page.fill("#train-max_steps", "2")
    page.fill("#advanced", "")
    page.click("text=Start training")
    page.wait_for_url(re.compile(r"/trainings/[\w-]+$"))
    assert page.url.rsplit("/", 1)[1] != first
    assert "continued from alice/web-bot:1" in page.inner_text("#t-start")
    follow_training(page)
    page.goto(f"{url}/models/alice/web-bot")
    first_row = page.locator("tbody tr").nth(0)
    assert first_row.locator("td").nth(0).inner_text().startswith("2") and "alice/web-bot:1" in first_row.inner_text()
    shoot(page, "model", docs=True)
    page.goto(f"{url}/models/alice/web-bot/trainings")
    assert page.locator("tbody tr .status-succeeded").count() == 2
    shoot(page, "model-trainings")

    # ---- a version's page: card, chart, lineage, snippets, download; the data by its name, no server path
    page.goto(f"{url}/models/alice/web-bot/versions/2")
    assert "alice/tiny-base:1" in page.inner_text(".lineage") and "alice/web-bot:1" in page.inner_text(".lineage")
    assert page.locator(".card h1").count() == 1 and page.locator("svg.chart polyline").count() >= 1
    assert 'finetune.load("alice/web-bot:2")' in page.inner_text("main")
    assert "quickstart.jsonl" in page.inner_text(".card") and "quickstart.jsonl" in page.inner_text(".facts")
    for path in ("/models/alice/web-bot/versions/2", f"/trainings/{first}", "/uploads",
                 "/models/alice/tiny-base/versions/1"):
        html = page.content() if path.endswith("versions/2") else page.request.get(url + path).text()
        folder = reg.resolve("alice/tiny-base:1").parent["local_path"]  # where the base was imported from
        assert str(reg.root) not in html and folder not in html, f"a server path on {path}"
    with page.expect_download() as download:
        page.click("text=Download adapter (.zip)")
    assert download.value.suggested_filename == "alice-web-bot-2.zip"
    shoot(page, "version", docs=True)

    # ---- playground: every bad field at its place, then a run (loading the version), then Stop
    page.goto(f"{url}/models/alice/web-bot/playground")
    page.fill("#pg-max", "abc")
    page.fill("#pg-temp", "-1")
    page.click("#pg-run")
    page.wait_for_selector("#pg-max-error:not([hidden])")
    assert "expected an integer" in page.inner_text("#pg-max-error")
    assert "temperature" in page.inner_text("#pg-temp-error")
    page.fill("#pg-prompt", "What is the capital of France?")
    page.fill("#pg-max", "12")
    page.fill("#pg-temp", "0")
    page.evaluate(_RECORD_STATUS)
    page.click("#pg-run")
    assert wait_status(page, "#pg-status", ("Done", "Failed", "Connection closed")) == "Done", \
        page.inner_text("#pg-error")
    statuses = page.evaluate("() => window.__statuses")
    assert any(s.startswith("Loading the version") for s in statuses), statuses  # its first run: a cold start
    assert page.inner_text("#pg-output").strip()
    assert re.fullmatch(r"\d+ tokens? · [\d.]+ tokens/s · [\d.]+ s", page.inner_text("#pg-metrics")), \
        page.inner_text("#pg-metrics")
    assert page.locator("#pg-max-error").is_hidden()
    page.fill("#pg-max", "40")  # warm now: a longer answer, sampled, for the screenshot
    page.fill("#pg-temp", "0.8")
    page.click("#pg-run")
    assert wait_status(page, "#pg-status", ("Done", "Failed", "Connection closed")) == "Done"
    shoot(page, "playground", docs=True)
    page.fill("#pg-max", "1000")
    page.fill("#pg-temp", "1")
    for _ in range(3):  # sampled: the model may end an answer on its own before Stop is clicked; then ask again
        page.click("#pg-run")
        if wait_status(page, "#pg-status", ("Generating…", "Done")) == "Generating…" and page.locator(
                "#pg-stop").is_visible():
            break
        wait_status(page, "#pg-status", ("Done", "Failed", "Connection closed"))
    page.click("#pg-stop", timeout=5_000)
    assert wait_status(page, "#pg-status", ("Stopped", "Done")) == "Stopped"
    assert page.locator("#pg-stop").is_hidden() and page.locator("#pg-run").is_enabled()
    # an output of whitespace only is shown, not a blank box (the stream replaced by one of three blanks)
    page.fill("#pg-max", "12")
    stream = re.compile(r".*/predictions/[\w-]+/stream$")
    page.route(stream, lambda route: route.fulfill(
        status=200, content_type="text/event-stream",
        body='event: output\ndata: "  "\n\nevent: output\ndata: "\\n"\n\nevent: done\ndata: {"metrics": {}}\n\n'))
    page.click("#pg-run")
    wait_status(page, "#pg-status", ("Done",))
    assert page.inner_text("#pg-output").startswith("··↵")
    assert "whitespace only (2 spaces, 1 newline)" in page.inner_text("#pg-note")
    page.unroute(stream)

    # ---- a version trained on chat data: turns and a system prompt
    publish_chat_version(reg, reg.resolve("alice/web-bot:2"))
    page.goto(f"{url}/models/alice/chat-bot/playground")
    assert page.locator("#pg-system-field").is_visible() and page.inner_text("#pg-prompt-label") == "Your message"
    page.fill("#pg-system", "Answer in one word.")
    page.fill("#pg-max", "8")
    for turn, message in enumerate(("What is the capital of France?", "And of Japan?"), start=1):
        page.fill("#pg-prompt", message)
        page.click("#pg-run")
        assert wait_status(page, "#pg-status", ("Done", "Failed", "Connection closed")) == "Done", \
            page.inner_text("#pg-error")
        assert page.locator("#pg-turns li").count() == 2 * turn
    assert page.inner_text("#pg-turns li.user >> nth=1").endswith("And of Japan?")
    sent = web.http("alice").get("/v1/predictions").json()["results"][0]["input"]
    assert sent["system_prompt"] == "Answer in one word." and [m["role"] for m in sent["messages"]] == \
        ["user", "assistant", "user"]
    shoot(page, "playground-chat")

    # ---- compare the two versions, with a prompt answered by both
    page.goto(f"{url}/models/alice/web-bot/compare")
    page.fill("#prompts", "What is the capital of Japan?")
    page.select_option("#eval", page.locator("#eval option", has_text="quickstart.jsonl").first.get_attribute("value"))
    page.click("button:has-text('Compare')")
    # The page shows progress (and each version's answers as they come) until every version has answered.
    page.wait_for_url("**/compare/cmp-*")
    for _ in range(360):  # the page reloads itself every few seconds while it runs
        try:
            if page.locator("table").count() and not page.locator("progress").count():
                break
        except Exception as err:  # counted while the page reloaded
            if "context was destroyed" not in str(err) and "navigat" not in str(err):
                raise
            pass
        page.wait_for_timeout(500)
    else:
        raise AssertionError("the comparison did not end in 3 minutes")
    table = page.inner_text("table")
    assert "alice/web-bot:1" in table and "alice/web-bot:2" in table and "train.max_steps" in table
    assert "(FILE, 70 ROWS)" in table.upper()  # both scored on the same file
    assert page.locator(".cols pre").count() == 2
    shoot(page, "compare")

    # ---- every table fits a phone: rows become cards, nothing cut off
    for path, name in (("/", "models"), ("/models/alice/web-bot/trainings", "trainings"), ("/uploads", "uploads")):
        page.goto(url + path)
        shoot(page, name, docs=name == "models")

    # ---- a model's settings: description, README, visibility; another account then trains from it
    page.goto(f"{url}/models/alice/web-bot/settings")
    page.fill("#description", "answers capital questions")
    page.fill("#readme", "# Capitals\n\nTrained on the **quickstart** data.")
    page.select_option("#visibility", "public")
    page.click("text=Save settings")
    assert "Saved the settings of alice/web-bot." in page.inner_text(".flash")
    shoot(page, "settings")
    page.goto(f"{url}/models/alice/web-bot")
    assert page.locator(".card strong", has_text="quickstart").count() == 1
    bob_context = browser.new_context(viewport=DESKTOP)
    bob = sign_in(bob_context, url, web.tokens["bob"])
    bob.goto(f"{url}/models/alice/web-bot/train")
    assert bob.input_value("#destination") == "__new__" and "Train from alice/web-bot" in bob.inner_text("main")
    assert bob.locator("nav.tabs a", has_text="Settings").count() == 0
    bob_context.close()

    # ---- delete, as the API allows: not a model with versions, not a parent version, then all of it
    page.goto(f"{url}/models/alice/web-bot/settings")
    page.click("button:has-text('Delete alice/web-bot')")
    assert "still has versions" in page.inner_text(".flash")
    page.goto(f"{url}/models/alice/web-bot")
    page.click("button[aria-label='Delete version 1']")
    assert "is the parent of alice/web-bot:2" in page.inner_text(".flash")
    page.click("button[aria-label='Delete version 2']")
    assert "Deleted alice/web-bot:2" in page.inner_text(".flash")
    page.click("button[aria-label='Delete version 1']")
    assert "Deleted alice/web-bot:1" in page.inner_text(".flash")
    page.goto(f"{url}/models/alice/web-bot/settings")
    page.click("button:has-text('Delete alice/web-bot')")
    page.wait_for_url(url + "/")
    assert "Deleted alice/web-bot." in page.inner_text(".flash")
    assert "alice/web-bot" not in [m.full_name for m in reg.list_models()]
    page.goto(f"{url}/uploads")
    assert page.locator("tbody tr").count() == 1 and page.inner_text("tbody td >> nth=0") == "quickstart.jsonl"
    page.click("button[aria-label^='Delete quickstart.jsonl']")
    assert "Deleted quickstart.jsonl." in page.inner_text(".flash") and page.locator("tbody tr").count() == 0

    # ---- access: bob's private model is not found, exactly like a missing one
    response = page.goto(f"{url}/models/bob/secret")
    assert response.status == 404 and "not found" in page.inner_text("main")
    hidden = page.inner_text("main").replace("bob/secret", "NAME")
    missing = page.goto(f"{url}/models/bob/nothing-here")
    assert missing.status == 404 and page.inner_text("main").replace("bob/nothing-here", "NAME") == hidden

    # ---- CSRF: the same form POST without the token is refused and changes nothing
    refused = page.request.post(f"{url}/models", form={"owner": "alice", "name": "sneaky"})
    assert refused.status == 403
    assert "alice/sneaky" not in [m.full_name for m in reg.list_models()]
    context.close()
