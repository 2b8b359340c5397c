"""The web app's parts that need no server: the loss chart, the data preview, the Train form's checks, model
cards, and the session store."""

from __future__ import annotations

import json
import re

import pytest

from finetune.web.charts import loss_chart_svg, loss_points, nice_ticks
from finetune.web.markdown import render_markdown
from finetune.web.preview import preview_data
from finetune.web.session import Sessions
from finetune.web.train_form import build_config, default_form, default_of


def test_chart_draws_train_and_eval_points_and_survives_bad_rows():
    rows = [{"step": s, "loss": 4.0 / s} for s in range(1, 11)] + [{"step": 10, "eval_loss": 0.9},
                                                                   {"step": 11, "loss": float("nan")}, {"x": 1}]
    train, evals = loss_points(rows)
    assert len(train) == 10 and evals == [(10.0, 0.9)]
    svg = loss_chart_svg(rows)
    points = re.search(r'class="chart-train" points="([^"]+)"', svg).group(1).split()
    assert len(points) == 10
    ys = [float(p.split(",")[1]) for p in points]
    assert ys == sorted(ys)  # falling loss is drawn going down the screen: y grows
    assert 'class="chart-eval-dot"' in svg and "<desc>10 training points, 1 eval points" in svg
    assert "No loss logged yet" in loss_chart_svg([])
    assert "<polyline" in loss_chart_svg([{"step": 1, "loss": 2.0}])  # one point: no division by zero


def test_nice_ticks_are_round_and_cover_the_range():
    assert nice_ticks(0.0, 1.0) == [0.0, 0.5, 1.0]
    assert nice_ticks(0.0, 1.0, 5) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    ticks = nice_ticks(1.37, 4.21)
    assert ticks[0] >= 1.37 and ticks[-1] <= 4.21 and len(ticks) >= 3


def test_preview_renders_prompts_and_marks_the_learned_part(tmp_path):
    from finetune.data.formats import ALPACA_NO_INPUT

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"q{i}", "input": "", "output": f"a{i}"}) + "\n"
                            for i in range(5)))
    p = preview_data(str(path))
    assert (p.format, p.rows, p.error) == ("alpaca", 5, None)
    assert p.examples[0] == [(ALPACA_NO_INPUT.format(instruction="q0"), False), ("a0", True)]
    assert len(p.examples) == 3

    pc = tmp_path / "pc.jsonl"
    pc.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    assert preview_data(str(pc)).examples == [[("p", False), ("c", True)]]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "x"}) + "\n")
    assert "cannot tell the data format" in preview_data(str(bad)).error
    wrong = preview_data(str(path), "prompt_completion")
    assert "format prompt_completion needs" in wrong.error or "field 'prompt' is missing" in wrong.error

    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    p = preview_data(str(chat))
    assert p.format == "messages" and p.examples[0][-1] == ("assistant: hello\n", True) and p.note


def test_train_form_defaults_come_from_the_config_dataclasses():
    from finetune.config import DataConfig, LoraConfig, TrainConfig

    form = default_form()
    assert default_of("train.lr") == TrainConfig().lr and float(form["train.lr"]) == TrainConfig().lr
    assert int(form["train.batch_size"]) == TrainConfig().batch_size
    assert int(form["lora.r"]) == LoraConfig().r
    assert int(form["data.max_seq_len"]) == DataConfig(path="x").max_seq_len
    assert form["train.max_steps"] == "" and form["data.eval"] == ""


def test_train_form_reports_the_loaders_messages_next_to_their_fields(tmp_path):
    form = {**default_form(), "train.lr": "-1", "train.batch_size": "abc", "data.eval": "often",
            "advanced": "train:\n  warmupp: 3\nlora:\n  alpha: 0\n"}
    config, errors = build_config(form, base_model="a/base:1", data_path=None, destination="a/b")
    assert config is None
    assert errors["train.lr"] == ["train.lr: must be > 0, got -1.0"]
    assert errors["train.batch_size"] == ["train.batch_size: expected an integer, got 'abc'"]
    assert errors["data.eval"][0].startswith("data.eval: expected a fraction in (0, 1)")
    assert "unknown key 'train.warmupp' (did you mean 'train.warmup_steps'?)" in errors["advanced"]
    assert "lora.alpha: must be > 0, got 0.0" in errors["advanced"]
    assert errors["data.path"] == ["choose a data file: upload one or pick an uploaded one"]

    _, errors = build_config({**default_form(), "advanced": "train: [1"}, base_model="a/base:1",
                             data_path="/x.jsonl", destination="a/b")
    assert errors["advanced"][0].startswith("line 1: invalid YAML")

    good = {**default_form(), "train.max_steps": "5", "train.lr": "1e-3", "data.eval": "0.1",
            "advanced": "train:\n  warmup_steps: 2\n  lr: 5e-4\n"}
    config, errors = build_config(good, base_model="a/base:1", data_path=str(tmp_path / "d.jsonl"),
                                  destination="a/b")
    assert not errors
    assert (config.train.max_steps, config.train.lr, config.train.warmup_steps, config.data.eval) == (5, 5e-4, 2, 0.1)
    assert (config.base_model, config.destination) == ("a/base:1", "a/b")


def test_model_cards_render_without_raw_html_or_script_links():
    html = render_markdown("# T\n\n<script>alert(1)</script>\n\n![loss](loss.png) [x](javascript:alert(1)) "
                           "[y](https://example.org)\n\n|a|b|\n|-|-|\n|1|2|", lambda rel: f"/files/{rel}")
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert 'src="/files/loss.png"' in html
    assert 'href="javascript' not in html
    assert 'rel="noopener noreferrer nofollow"' in html and "<table>" in html


def test_sessions_csrf_links_and_rotation():
    store = Sessions(max_per_account=3)
    first = store.sign_in(None, "alice", "tok")
    assert first.csrf_ok(first.csrf) and not first.csrf_ok(None) and not first.csrf_ok("x")
    signed = store.sign_in(first, "alice", "tok")
    assert signed.id != first.id and store.get(first.id) is None and store.get(signed.id).account == "alice"
    nonce = store.issue_link("alice", "tok2")
    assert store.redeem_link(nonce) == ("alice", "tok2") and store.redeem_link(nonce) is None
    store.drop_token("tok")
    assert store.get(signed.id) is None
    bob = store.sign_in(None, "bob", "tb")
    alices = [store.sign_in(None, "alice", "ta") for _ in range(5)]
    assert len(store) == 4 and store.get(bob.id) is not None  # alice's own oldest went, bob's stayed
    assert [store.get(s.id) is not None for s in alices] == [False, False, True, True, True]


def test_the_signin_forms_token_is_signed_and_repeated_by_its_cookie():
    store = Sessions()
    token = store.signin_token()
    assert store.signin_token_ok(token, token) and len(store) == 0  # nothing stored
    assert not store.signin_token_ok(token, store.signin_token())  # the cookie's and the form's differ
    assert not store.signin_token_ok(None, token) and not store.signin_token_ok(token, None)
    forged = token.rsplit(".", 1)[0] + ".0123456789abcdef0123456789abcdef"
    assert not store.signin_token_ok(forged, forged)
    assert not Sessions().signin_token_ok(token, token)  # another server process (a restart)


@pytest.mark.parametrize("ttl", [0.0])
def test_sessions_expire_when_idle(ttl):
    store = Sessions(ttl_s=ttl)
    s = store.sign_in(None, "alice", "tok")
    import time

    time.sleep(0.01)
    assert store.get(s.id) is None


def test_eta_comes_from_the_steps_after_the_first_and_duration_from_the_start():
    """Step 1 pays for loading and warm-up (60 s here); the steps after it take 5 s each: at step 3 of 10 the
    time left is 7 x 5 s, not 7 x 70/3 s. A queued run has no duration yet (its time in the queue is not its)."""
    from types import SimpleNamespace

    from finetune.registry.jobs import Status, TrainingRecord
    from finetune.registry.summary import training_progress
    from finetune.web.views import duration_s, queue_place, training_view

    record = SimpleNamespace(input={"train": {"max_steps": 10}})
    rows = [{"step": 1, "time_s": 60.0}, {"step": 2, "time_s": 65.0}, {"step": 3, "time_s": 70.0, "tokens_per_s": 9}]
    assert training_progress(record, rows)["eta_s"] == pytest.approx(35.0)
    assert training_progress(record, rows[:1])["eta_s"] is None  # only the first step: not measured yet
    queued = TrainingRecord(id="t", status=Status.STARTING, created_at="2026-01-01T00:00:00.000000Z")
    assert duration_s(queued) is None
    view = training_view(queued, [], position=2)
    assert (view["duration"], view["progress"], view["eta"]) == ("–", "queued: #3 in line (2 trainings ahead)", "–")
    assert queue_place(0) == "queued: #1 in line (next to start)" and queue_place(None) == "waiting to start"
    running = TrainingRecord(id="t", status=Status.PROCESSING, created_at="2026-01-01T00:00:00.000000Z",
                             started_at="2026-01-01T00:10:00.000000Z", completed_at=None)
    assert duration_s(running) > 0 and training_view(running, rows[:1])["eta"] == "measuring after the first steps"


def test_a_logged_step_is_one_log_line():
    from finetune.training.runlog import step_line

    row = {"step": 3, "loss": 6.93124, "lr": 0.002, "tokens_per_s": 63.4, "eval_loss": 6.2}
    assert step_line(row, 8) == "step 3/8: loss 6.9312, lr 0.002, 63 tokens/s, eval loss 6.2000"
    assert step_line({"step": 1, "loss": 2.0, "tokens_per_s": 0.0}) == "step 1: loss 2.0000"


def test_train_again_fills_the_form_with_a_configs_settings():
    from finetune.config import config_from_dict
    from finetune.web.train_form import form_from_config

    config = config_from_dict({"base_model": "a/b:1", "data": {"path": "upload:x", "eval": 0.1, "format": "alpaca"},
                               "train": {"max_steps": 5, "lr": 3e-3, "warmup_steps": 2}, "lora": {"alpha": 8}})
    form = form_from_config(config.to_dict(), "x")
    assert (form["train.max_steps"], form["train.lr"], form["data.eval"], form["data.format"]) == \
        ("5", "0.003", "0.1", "alpaca")
    assert (form["base_model"], form["data_upload"]) == ("a/b:1", "x")
    assert form["advanced"] == "lora:\n  alpha: 8.0\ntrain:\n  warmup_steps: 2\n"
    rebuilt, errors = build_config(form, base_model="a/b:1", data_path="/d.jsonl", destination="a/c")
    assert not errors and rebuilt.train == config.train and rebuilt.lora == config.lora


def test_a_cli_trainings_start_point_and_data_are_named_without_server_paths(tmp_path):
    """A training run with the CLI from a local model folder on local data: its page names both by their last
    component, never by the server's path."""
    from finetune.config import config_from_dict
    from finetune.registry import Registry
    from finetune.registry.jobs import TrainingRecord
    from finetune.web.start_points import training_facts
    from finetune.web.views import training_view

    config = config_from_dict({"base_model": "/srv/models/tiny-llama", "data": {"path": "/srv/data/faq.jsonl"}})
    record = TrainingRecord(id="t", destination="a/b", input=config.to_dict(), model="/srv/models/tiny-llama")
    facts = training_facts(Registry(tmp_path / "registry"), record)
    assert facts["start"]["text"] == "local folder tiny-llama" and facts["data"]["name"] == "faq.jsonl"
    assert training_view(record)["trainer"] == "local folder tiny-llama"
    assert "/srv" not in repr(facts)
