"""The web app in a real browser (Playwright driving Debian's Chromium), as a new user would use it.

One end-to-end path: sign in, create a model (seeing every form error first), upload the quickstart data and
see its preview, start a training from the Train tab and watch it reach succeeded while the chart gains points,
see version 1, train again from it into version 2 (parent 1), run the playground and see streamed text, compare
the two, delete versions as the CLI allows; another account's private model stays unreachable and a form POST
without the CSRF token is refused. Screenshots of every page (desktop and 375 px wide) go to
``out/screenshots/``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
SHOTS = Path(__file__).resolve().parent.parent / "out" / "screenshots"
QUICKSTART = Path(__file__).resolve().parent.parent / "finetune" / "assets" / "quickstart.jsonl"
TRAIN_TIMEOUT_MS = 240_000

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                       reason=f"no Chromium at {CHROMIUM} (install Debian's package: apt-get install -y chromium)"),
]


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


def shoot(page, name: str) -> None:
    """Screenshots of the page as it is now, at desktop width and at 375 px (a phone)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.set_viewport_size({"width": 1280, "height": 900})
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
    page.set_viewport_size({"width": 375, "height": 800})
    page.screenshot(path=str(SHOTS / f"{name}-375.png"), full_page=True)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 375, f"{name}: the page is {width}px wide at a 375px viewport (tables scroll in their box)"
    page.set_viewport_size({"width": 1280, "height": 900})


def error_of(page, field_id: str) -> str:
    """The error text shown next to a field (linked by aria-describedby)."""
    described = page.get_attribute(f"#{field_id}", "aria-describedby")
    assert described, f"#{field_id} has no error"
    return page.inner_text(f"#{described.split()[0]}")


def train_from_tab(page, url: str, trainer: str, steps: str) -> str:
    """Fill the Train tab (the uploaded quickstart data already picked) and submit; the training's id."""
    page.goto(f"{url}/models/alice/web-bot/train")
    page.select_option("#base_model", trainer)
    upload = page.locator("#data_upload option", has_text="quickstart.jsonl").first.get_attribute("value")
    page.select_option("#data_upload", upload)
    page.wait_for_selector("mark.learned")
    page.fill("#train-max_steps", steps)
    page.fill("#train-lr", "2e-3")
    page.fill("#train-batch_size", "16")
    page.fill("#data-max_seq_len", "128")
    page.fill("#data-eval", "0.1")
    page.click("summary:has-text('Advanced')")
    page.fill("#advanced", "train:\n  eval_every: 2\n")
    page.click("text=Start training")
    page.wait_for_url(re.compile(r"/trainings/[\w-]+$"))
    return page.url.rsplit("/", 1)[1]


def wait_succeeded(page) -> list[int]:
    """Wait on the training page (no reload) until it succeeds; the chart's point counts seen on the way."""
    counts = []
    for _ in range(TRAIN_TIMEOUT_MS // 500):
        status = page.inner_text("#t-status").strip()
        counts.append(page.locator("#t-chart polyline.chart-train").count()
                      and len(page.get_attribute("#t-chart polyline.chart-train", "points").split()))
        if status in ("succeeded", "failed", "canceled"):
            assert status == "succeeded", page.inner_text("#t-error") + "\n" + page.inner_text("#t-log")
            return counts
        page.wait_for_timeout(500)
    raise AssertionError("the training did not finish in time")


def test_a_new_user_trains_and_uses_versions_in_the_browser(web, browser):
    url = web.url
    context = browser.new_context(viewport={"width": 1280, "height": 900})
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

    # ---- create a model: every error next to its field, then the real thing
    page.fill("#owner", "bob")
    page.fill("#name", "Bad Name!")
    page.click("button:has-text('Create model')")
    assert "cannot create models under 'bob'" in error_of(page, "owner") or "invalid owner" in error_of(page, "owner")
    assert "invalid model name 'Bad Name!'" in error_of(page, "name")
    page.fill("#owner", "alice")
    page.fill("#name", "tiny-base")
    page.click("button:has-text('Create model')")
    assert "already exists" in error_of(page, "name")
    shoot(page, "models-errors")
    page.fill("#name", "web-bot")
    page.fill("#description", "answers capital questions")
    page.click("button:has-text('Create model')")
    page.wait_for_url(re.compile(r"/models/alice/web-bot/train$"))

    # ---- Train tab: upload the quickstart data, see its preview; bad settings are reported per field
    page.set_input_files("#data_file", str(QUICKSTART))
    page.wait_for_selector("mark.learned")
    assert "70 rows" in page.inner_text("#preview") and "alpaca" in page.inner_text("#preview")
    assert "### Response:" in page.inner_text(".example >> nth=0")
    page.fill("#train-lr", "-1")
    page.fill("#train-batch_size", "abc")
    page.click("summary:has-text('Advanced')")
    page.fill("#advanced", "train:\n  warmupp: 2\n")
    page.click("text=Start training")
    assert error_of(page, "train-lr") == "train.lr: must be > 0, got -1.0"
    assert error_of(page, "train-batch_size") == "train.batch_size: expected an integer, got 'abc'"
    assert "unknown key 'train.warmupp' (did you mean 'train.warmup_steps'?)" in error_of(page, "advanced")
    shoot(page, "train-errors")

    # ---- the first training: live status and chart, then version 1
    first = train_from_tab(page, url, "alice/tiny-base:1", "8")
    counts = wait_succeeded(page)
    assert counts[-1] >= 2 and counts[-1] > counts[0], f"the chart did not gain points live: {counts}"
    assert page.inner_text("#t-version") == "alice/web-bot:1"
    shoot(page, "training")
    page.goto(f"{url}/models/alice/web-bot")
    rows = page.locator("tbody tr")
    assert rows.count() == 1 and rows.nth(0).locator("td").nth(0).inner_text() == "1"
    assert "70 rows" in rows.nth(0).inner_text()
    shoot(page, "model-versions")

    # ---- train again from version 1: version 2 names it as parent
    second = train_from_tab(page, url, "alice/web-bot:1", "4")
    assert second != first
    wait_succeeded(page)
    page.goto(f"{url}/models/alice/web-bot")
    first_row = page.locator("tbody tr").nth(0)
    assert first_row.locator("td").nth(0).inner_text() == "2" and "alice/web-bot:1" in first_row.inner_text()
    shoot(page, "model")
    page.goto(f"{url}/models/alice/web-bot/trainings")
    assert page.locator("tbody tr .status-succeeded").count() == 2
    shoot(page, "model-trainings")

    # ---- a version's page: card, chart, lineage, snippets, download
    page.goto(f"{url}/models/alice/web-bot/versions/2")
    assert "alice/tiny-base:1" in page.inner_text(".lineage") and "alice/web-bot:1" in page.inner_text(".lineage")
    assert page.locator(".card h1").count() == 1 and page.locator("svg.chart polyline").count() >= 1
    assert 'finetune.load("alice/web-bot:2")' in page.inner_text("main")
    with page.expect_download() as download:
        page.click("text=Download adapter (.zip)")
    assert download.value.suggested_filename == "alice-web-bot-2.zip"
    shoot(page, "version")

    # ---- playground: the output streams in
    page.goto(f"{url}/models/alice/web-bot/playground")
    page.fill("#pg-prompt", "What is the capital of France?")
    page.fill("#pg-max", "12")
    page.click("#pg-run")
    status = ""
    for _ in range(240):  # the page's CSP forbids eval, so wait_for_function cannot be used
        status = page.inner_text("#pg-status")
        if status not in ("Starting…", "Generating…"):
            break
        page.wait_for_timeout(500)
    assert status == "Done", page.inner_text("#pg-error")
    assert page.inner_text("#pg-output").strip()
    shoot(page, "playground")

    # ---- compare the two versions, with a prompt answered by both
    page.goto(f"{url}/models/alice/web-bot/compare")
    page.fill("#prompts", "What is the capital of Japan?")
    page.select_option("#eval", page.locator("#eval option", has_text="quickstart.jsonl").first.get_attribute("value"))
    page.click("button:has-text('Compare')")
    page.wait_for_selector("table")
    table = page.inner_text("table")
    assert "alice/web-bot:1" in table and "alice/web-bot:2" in table and "train.max_steps" in table
    assert "(FILE, 70 ROWS)" in table.upper()  # both scored on the same file
    assert page.locator(".cols pre").count() == 2
    shoot(page, "compare")

    # ---- delete: version 1 is refused while version 2 descends from it, as the CLI refuses
    page.goto(f"{url}/models/alice/web-bot")
    page.click("button[aria-label='Delete version 1']")
    assert "is the parent of alice/web-bot:2" in page.inner_text(".flash")
    page.click("button[aria-label='Delete version 2']")
    assert "Deleted alice/web-bot:2" in page.inner_text(".flash")
    page.click("button[aria-label='Delete version 1']")
    assert "Deleted alice/web-bot:1" in page.inner_text(".flash")
    assert page.locator("tbody tr").count() == 0

    # ---- access: bob's private model is not found, exactly like a missing one
    response = page.goto(f"{url}/models/bob/secret")
    assert response.status == 404 and "not found" in page.inner_text("main")
    missing = page.goto(f"{url}/models/bob/nothing-here")
    assert missing.status == 404 and page.inner_text("main") == page.inner_text("main")

    # ---- CSRF: the same form POST without the token is refused and changes nothing
    refused = page.request.post(f"{url}/models", form={"owner": "alice", "name": "sneaky"})
    assert refused.status == 403
    assert "alice/sneaky" not in [m.full_name for m in web.registry.list_models()]
    context.close()
