"""Inference workers without HTTP: streamed text pieces, stop sequences, the input schema, the cache (shared base,
no reload, eviction) and the batched engine (same greedy output alone or batched, cancel, context limits).

One registry per module: a tiny base (alice/tiny:1) and four short fine-tunes of it (alice/m:1..4).
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest

from finetune import training
from finetune.config import config_from_dict
from finetune.decoding.text import Detokenizer, StopMatcher
from finetune.errors import InputError, UsageError
from finetune.registry import Registry
from finetune.registry.sources import import_base
from finetune.serving import schema
from finetune.serving.inputs import WebhookOptions, check_events_filter, input_model
from finetune.serving.worker import LocalWorker, WorkerConfig
from finetune.tiny import sample_data_path

PROMPT = "Give three tips for staying healthy."


def _train(reg: Registry, base: str, destination: str, seed: int):
    cfg = config_from_dict({
        "base_model": base,
        "data": {"path": str(sample_data_path()), "format": "auto", "max_seq_len": 256},
        "train": {"max_steps": 3, "batch_size": 8, "lr": 5e-3, "seed": seed},
    })
    return training.train(cfg, registry=reg, destination=destination, create_destination=True,
                          progress=False).version


@pytest.fixture(scope="module")
def reg(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Registry:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_FSYNC", "0")
        reg = Registry(tmp_path_factory.mktemp("serving") / "registry")
        import_base(reg, "alice/tiny", str(tiny_model_dir))
        for seed in range(4):
            _train(reg, "alice/tiny:1", "alice/m", seed)
        yield reg


class Events:
    """Collects what a worker reports, per prediction id; waits for ends."""

    def __init__(self):
        self.by_id: dict[str, list] = {}
        self.cond = threading.Condition()

    def __call__(self, job_id: str, kind: str, payload: dict) -> None:
        with self.cond:
            self.by_id.setdefault(job_id, []).append((kind, payload))
            self.cond.notify_all()

    def end(self, job_id: str, timeout: float = 60.0) -> dict:
        with self.cond:
            assert self.cond.wait_for(lambda: any(k in ("done", "rejected") for k, _ in self.by_id.get(job_id, [])),
                                      timeout), f"{job_id} did not end"
            return next(p for k, p in self.by_id[job_id] if k in ("done", "rejected"))

    def text(self, job_id: str) -> str:
        return "".join(p["text"] for k, p in self.by_id[job_id] if k == "output")

    def logs(self, job_id: str) -> str:
        return "\n".join(p["text"] for k, p in self.by_id[job_id] if k == "log")


@pytest.fixture
def worker(reg: Registry):
    events = Events()
    w = LocalWorker(WorkerConfig(str(reg.root), device="cpu"), events)
    w.events = events
    yield w
    w.close()


# ------------------------------------------------------------------------------------------- text pieces
def test_pieces_join_to_the_full_decode_across_multibyte_characters(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "Größe: 42 € — naïve 😀 café 日本語 done."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text) / 3  # byte-level pieces: several tokens per non-ASCII character
    detok = Detokenizer(tok)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == text
    assert all("\ufffd" not in p for p in pieces)  # no half characters were ever emitted
    assert sum(1 for p in pieces if p) > 5  # and it did stream, not emit everything at the end


def test_stop_sequences_hold_back_partial_matches_and_cut_before_the_stop():
    stop = StopMatcher(["###", "END"])
    out = [stop.feed(t) for t in ["Hello #", "# there", " E", "N", "D and more"]]
    assert out == ["Hello ", "## there", " ", "", ""] and stop.stopped  # "#" and "EN" were held back a while
    assert stop.finish() == "" and stop.feed("more") == ""
    tail = StopMatcher(["STOP"])
    assert tail.feed("abc ST") == "abc " and tail.finish() == "ST"  # a partial match at the end is text
    assert StopMatcher([]).feed("anything") == "anything"


# ------------------------------------------------------------------------------------------- schema
def test_input_schema_checks_each_field_by_name():
    ok = schema.check_input("alpaca", {"prompt": "Hi", "stop_sequences": "a,b", "seed": 3})
    assert ok["stop_sequences"] == ["a", "b"] and ok["max_new_tokens"] == 128 and ok["temperature"] == 0.0
    bad = [
        ({"prompt": "Hi", "colour": 1}, "input.colour"),
        ({"prompt": 3}, "input.prompt"),
        ({}, "input.prompt"),
        ({"prompt": "Hi", "max_new_tokens": 0}, "input.max_new_tokens"),
        ({"prompt": "Hi", "max_new_tokens": True}, "input.max_new_tokens"),
        ({"prompt": "Hi", "temperature": -1}, "input.temperature"),
        ({"prompt": "Hi", "top_p": 0}, "input.top_p"),
        ({"prompt": "Hi", "messages": [{"role": "user", "content": "x"}]}, "input.messages"),  # not a chat version
        ({"prompt": "Hi", "stop_sequences": [1]}, "input.stop_sequences"),
    ]
    for data, field in bad:
        with pytest.raises(UsageError, match=field.replace(".", r"\.")):
            schema.check_input("alpaca", data)
    chat = schema.check_input("messages", {"messages": [{"role": "user", "content": "x"}], "system_prompt": "s"})
    assert chat["messages"][0]["content"] == "x"
    props = schema.openapi_schema(chat=True)["components"]["schemas"]["Input"]["properties"]
    assert {"prompt", "messages", "system_prompt", "stop_sequences", "seed", "top_k"} <= set(props)


def test_the_published_schema_is_the_check_every_bound_refused_past_its_edge():
    """The openapi_schema is generated from the models the check validates with: each declared bound is
    enforced exactly at its edge, each default is what a left-out input takes."""
    for chat, fmt, valid in ((False, "alpaca", {"prompt": "Hi"}),
                             (True, "messages", {"messages": [{"role": "user", "content": "Hi"}]})):
        props = schema.openapi_schema(chat)["components"]["schemas"]["Input"]["properties"]
        assert list(props) == list(input_model(chat).model_fields)
        assert [p["x-order"] for p in props.values()] == list(range(len(props)))
        checked = schema.check_input(fmt, valid)
        bounds = 0
        for name, prop in props.items():
            for key, step in (("maximum", 1), ("minimum", -1), ("exclusiveMinimum", 0)):
                if key not in prop:
                    continue
                bounds += 1
                with pytest.raises(InputError) as err:
                    schema.check_input(fmt, {**valid, name: prop[key] + step})
                assert [f["field"] for f in err.value.fields] == [name], err.value
                if key != "exclusiveMinimum":
                    assert schema.check_input(fmt, {**valid, name: prop[key]})[name] == prop[key]
            if "default" in prop and name != "stop_sequences":
                assert checked[name] == prop["default"], name
        assert bounds >= 8
    assert schema.openapi_schema(False)["components"]["schemas"]["Input"]["required"] == ["prompt"]


def test_every_input_problem_is_reported_at_once_by_field():
    with pytest.raises(InputError) as err:
        schema.check_input("alpaca", {"prompt": "Hi", "top_p": 0, "seed": -1, "colour": 1, "temperature": 0.001})
    assert [f["field"] for f in err.value.fields] == ["temperature", "top_p", "seed", "colour"]
    assert "input.temperature: must be 0 (greedy) or between 0.01 and 100.0, got 0.001" in str(err.value)
    assert "input.top_p: must be in (0, 1], got 0" in str(err.value)
    with pytest.raises(InputError) as err:  # no conversions: true is not 1, "0.5" not 0.5
        schema.check_input("alpaca", {"prompt": "Hi", "temperature": True, "top_p": "0.5", "top_k": 1.0})
    assert [f["message"] for f in err.value.fields] == [
        "must be a number, got True", "must be a number, got '0.5'", "must be an integer, got 1.0"]
    with pytest.raises(InputError) as err:
        schema.check_input("messages", {"messages": [{"role": "user", "content": "x"}, {"role": 1}]})
    assert err.value.fields == [{"field": "messages[1]", "message": "must be an object with string role and content"}]
    assert schema.check_input("alpaca", {"prompt": "Hi", "seed": None, "stop_sequences": ["a", ""]})["stop_sequences"] \
        == ["a"]


def test_a_webhook_filter_is_checked_by_the_same_model_as_the_request_bodies():
    assert check_events_filter(None) is None and check_events_filter(["start", "completed"]) == ["start", "completed"]
    for bad, says in ((["done"], "unknown event 'done'"), ("start", "expected a list"), (["start"] * 5, "at most 4")):
        with pytest.raises(UsageError, match=says):
            check_events_filter(bad)
        with pytest.raises(ValueError):
            WebhookOptions(webhook_events_filter=bad)


# ------------------------------------------------------------------------------------------- worker
def test_greedy_output_equals_finetune_predict_and_second_call_does_not_reload(reg: Registry, worker):
    from finetune.inference import GenerationSettings, generate, load_version

    expected = generate(load_version(reg, "alice/m:1", device="cpu"), PROMPT, GenerationSettings(max_new_tokens=24))
    ev = worker.events
    worker.submit("a", "alice/m:1", {"prompt": PROMPT, "max_new_tokens": 24})
    first = ev.end("a")
    worker.submit("b", "alice/m:1", {"prompt": PROMPT, "max_new_tokens": 24})
    second = ev.end("b")
    assert first["status"] == second["status"] == "succeeded"
    assert ev.text("a") == ev.text("b") == expected
    assert "loading alice/m:1" in ev.logs("a") and "verifying" in ev.logs("a")
    assert "loading" not in ev.logs("b") and "no reload" in ev.logs("b")
    metrics = first["metrics"]
    assert metrics["input_token_count"] > 5 and metrics["output_token_count"] >= 1
    assert {"predict_time", "time_to_first_token", "tokens_per_second"} <= set(metrics)
    assert worker.stats()["loads"] == 1


def test_four_versions_share_one_base_and_batch_to_the_same_greedy_outputs(reg: Registry, worker):
    ev = worker.events
    refs = [f"alice/m:{n}" for n in (1, 2, 3, 4)]
    for n, ref in enumerate(refs):  # one at a time: the reference outputs
        worker.submit(f"alone{n}", ref, {"prompt": PROMPT, "max_new_tokens": 16})
        ev.end(f"alone{n}")
    steps = worker.stats()["steps"]
    for n, ref in enumerate(refs * 2):  # eight at once, mixed adapters in one batch
        worker.submit(f"mixed{n}", ref, {"prompt": PROMPT if n < 4 else "Name a color.", "max_new_tokens": 16})
    for n in range(8):
        assert ev.end(f"mixed{n}")["status"] == "succeeded"
    for n in range(4):
        assert ev.text(f"mixed{n}") == ev.text(f"alone{n}")
    stats = worker.stats()
    assert stats["bases"] == 1 and stats["base_objects"] == 1 and stats["base_loads"] == 1
    assert stats["versions"] == 4 and stats["adapter_bytes"] < stats["base_bytes"]
    assert stats["max_rows"] > 1  # requests were batched
    assert stats["steps"] - steps < 8 * 16  # fewer forward passes than one per request per token


# Evicting the active adapter must not leave PEFT to pick another with a warning in the server's log.
@pytest.mark.filterwarnings("error::UserWarning")
def test_memory_budget_evicts_least_recently_used_versions(reg: Registry):
    events = Events()
    w = LocalWorker(WorkerConfig(str(reg.root), device="cpu", memory_budget_mb=0.001), events)
    try:
        for n in (1, 2):
            w.submit(f"e{n}", f"alice/m:{n}", {"prompt": PROMPT, "max_new_tokens": 2})
            assert events.end(f"e{n}")["status"] == "succeeded"
        stats = w.stats()
        assert stats["versions"] == 1 and stats["evictions"] >= 1
        assert "evicted alice/m:1" in events.logs("e2")
    finally:
        w.close()


def test_cancel_stops_within_a_step_and_context_limits(reg: Registry, worker):
    ev = worker.events
    worker.submit("long", "alice/tiny:1", {"prompt": "Once upon a time", "max_new_tokens": 900})
    with ev.cond:
        ev.cond.wait_for(lambda: sum(k == "output" for k, _ in ev.by_id.get("long", [])) >= 3, 60)
    worker.cancel("long")
    done = ev.end("long")
    assert done["status"] == "canceled" and done["metrics"]["output_token_count"] < 900
    worker.submit("big", "alice/tiny:1", {"prompt": "word " * 2000})
    rejected = ev.end("big")
    assert rejected["status"] == 422 and "context" in rejected["detail"]
    worker.submit("near", "alice/tiny:1", {"prompt": "word " * 1015, "max_new_tokens": 500})
    near = ev.end("near")  # max_new_tokens is capped by what the context leaves
    assert near["status"] == "succeeded"
    assert near["metrics"]["input_token_count"] + near["metrics"]["output_token_count"] <= 1024


def test_a_single_version_is_merged_in_place_and_the_base_restored_exactly(reg: Registry, tiny_model_dir: Path):
    import torch
    from peft.tuners.lora.layer import Linear as LoraLinear
    from transformers import AutoModelForCausalLM

    from finetune.decoding.cache import ModelCache

    cache = ModelCache(reg, device="cpu")
    logs: list[str] = []
    first, _ = cache.acquire("alice/m:1", log=logs.append)
    assert first.base.merged == first.adapter and any("merged into the base weights" in line for line in logs)
    layers = [m for m in first.base.model.modules() if isinstance(m, LoraLinear)]
    assert layers and all(m.forward == m.base_layer.forward for m in layers)  # merged: straight to the base layer
    second, _ = cache.acquire("alice/m:2", log=logs.append)  # a second version: back to exact base weights
    assert second.base is first.base and first.base.merged is None
    assert all(m.forward != m.base_layer.forward for m in layers)  # and to the adapters' lean forward
    assert any("restored exactly" in line for line in logs)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    model = first.base.model.get_base_model()
    compared = 0
    for key, value in model.state_dict().items():
        plain = key.replace(".base_layer.", ".")
        if "lora_" not in key and plain in original:
            assert torch.equal(value, original[plain]), key
            compared += 1
    assert compared >= len(original) - 1  # every base weight (a tied head may appear once)
    cache.release(first)
    cache.release(second)


def test_a_sliding_window_cache_joins_a_running_batch_to_the_same_greedy_outputs(tiny_model_dir: Path,
                                                                               tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch):
    """Mistral with a window of 8 positions, shorter than every prompt, which the attention masks apply to the
    left-padded rows: requests that join a running batch (their caches left-padded and stacked onto it) still
    give `finetune predict`'s greedy text."""
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    from finetune.inference import GenerationSettings, generate, load_version

    monkeypatch.setenv("FINETUNE_FSYNC", "0")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = tmp_path / "mistral"
    torch.manual_seed(0)
    MistralForCausalLM(MistralConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, sliding_window=8, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(base)
    tok.save_pretrained(base)
    reg = Registry(tmp_path / "registry")
    import_base(reg, "alice/base", str(base))
    cfg = config_from_dict({"base_model": "alice/base:1", "data": {"path": str(sample_data_path())},
                            "train": {"max_steps": 2, "batch_size": 8, "lr": 1e-3, "precision": "fp32"}})
    ref = training.train(cfg, registry=reg, destination="alice/sw", create_destination=True, progress=False).version.ref
    prompts = [PROMPT, "Name a color.", "What is the capital of France? Answer in one word."]
    loaded = load_version(reg, ref, device="cpu")
    expected = [generate(loaded, p, GenerationSettings(max_new_tokens=24)) for p in prompts]
    assert all(expected)  # a random model might say end-of-text first: then there would be nothing to compare
    events = Events()
    w = LocalWorker(WorkerConfig(str(reg.root), device="cpu"), events)
    try:
        w.submit("running", ref, {"prompt": PROMPT, "max_new_tokens": 400})
        with events.cond:  # decoding already: the others join its batch
            events.cond.wait_for(lambda: sum(k == "output" for k, _ in events.by_id.get("running", [])) >= 3, 60)
        for n, prompt in enumerate(prompts):
            w.submit(f"joins{n}", ref, {"prompt": prompt, "max_new_tokens": 24})
        for n in range(len(prompts)):
            done = events.end(f"joins{n}")
            assert done["status"] == "succeeded" and done["metrics"]["input_token_count"] > 8  # past the window
        w.cancel("running")
        assert events.end("running")["status"] == "canceled"  # it was still decoding: the others joined it
        assert [events.text(f"joins{n}") for n in range(len(prompts))] == expected
    finally:
        w.close()


def test_a_request_that_fails_in_the_decode_loop_fails_alone(reg: Registry, worker):
    """Jobs whose sampling cannot work (a temperature that turns the logits into inf, a seed torch cannot take;
    the API refuses both, so here they are made directly) join a running batch: each fails alone, with its
    reason, and every other prediction in the batch goes on to the text it gives alone."""
    ev = worker.events
    good = {"prompt": PROMPT, "max_new_tokens": 12}
    worker.submit("alone", "alice/m:1", good)
    assert ev.end("alone")["status"] == "succeeded"
    worker.submit("long", "alice/tiny:1", {"prompt": "Once upon a time", "max_new_tokens": 300})
    with ev.cond:  # decoding already: the others join its batch
        ev.cond.wait_for(lambda: sum(k == "output" for k, _ in ev.by_id.get("long", [])) >= 3, 60)
    core = worker.core
    jobs = {}
    for job_id, changes in (("tiny-temperature", {"temperature": 1e-300}), ("huge-seed", {"temperature": 1.0,
                                                                                         "seed": 2**64}),
                            ("good", {})):
        job = core.prompts.prepare(job_id, "alice/m:1", good, lambda kind, payload, j=job_id: ev(j, kind, payload))
        job.settings = dataclasses.replace(job.settings, **changes)  # past the checks, as a bug would
        jobs[job_id] = job
    for job in jobs.values():
        core.engine.submit(job)
    for job_id, reason in (("tiny-temperature", "not finite"), ("huge-seed", "cannot start generating")):
        failed = ev.end(job_id)
        assert failed["status"] == "failed" and reason in failed["error"], failed
    assert ev.end("good")["status"] == "succeeded" and ev.text("good") == ev.text("alone")
    long = ev.end("long")
    assert long["status"] == "succeeded" and long["metrics"]["output_token_count"] > 3
    assert sum(k == "done" for k, _ in ev.by_id["huge-seed"]) == 1  # ended exactly once


def test_cancel_ends_a_prediction_its_worker_no_longer_answers_for(reg: Registry, monkeypatch):
    """A worker that lost a prediction (it never sends its end) must not leave it processing for ever: cancel
    settles it itself after a short wait."""
    from finetune.serving import service as service_module

    class Deaf:
        def __init__(self, on_event):
            self.on_event = on_event

        def submit(self, job_id, ref, data, owner=""):
            self.on_event(job_id, "admitted", {"input_token_count": 3})
            self.on_event(job_id, "processing", {})

        def cancel(self, job_id):
            pass

        def close(self):
            pass

    monkeypatch.setattr(service_module, "CANCEL_WAIT_S", 0.2)
    service = service_module.PredictionService(reg)
    service.close()
    service._workers = [Deaf(service._on_event)]
    record = service.create(reg.resolve("alice/m:1"), {"prompt": PROMPT}, owner="alice")
    assert service.get(record.id).status == "processing"
    assert service.cancel(record.id).status == "canceled"
    assert service.records.get(record.id).status == "canceled"  # on disk too


def test_comparisons_are_bounded_per_account_and_on_the_server(reg: Registry):
    from finetune.errors import LimitError, NotFoundError, UsageError
    from finetune.serving.comparisons import Comparisons

    sent = []

    class Worker:
        def compare(self, job_id, spec):
            sent.append((job_id, spec))

    comparisons = Comparisons(lambda version: Worker(), max_running=2)
    versions = [reg.resolve("alice/m:1"), reg.resolve("alice/m:2")]
    first = comparisons.start("alice", "alice/m", versions, ["Name a color."])
    assert sent[0][1]["refs"] == ["alice/m:1", "alice/m:2"] and sent[0][1]["prompts"] == [{"prompt": "Name a color."}]
    with pytest.raises(LimitError, match="one at a time"):
        comparisons.start("alice", "alice/m", versions, [])
    comparisons.start("bob", "alice/m", versions, [])
    with pytest.raises(LimitError, match="at once"):
        comparisons.start("carol", "alice/m", versions, [])
    for bad, match in ((versions[:1], "2 to 4"), (versions * 3, "2 to 4")):
        with pytest.raises(UsageError, match=match):
            comparisons.start("dave", "alice/m", bad, [])
    with pytest.raises(UsageError, match="at most 5"):
        comparisons.start("dave", "alice/m", versions, ["p"] * 6)
    with pytest.raises(UsageError, match="at most 2000 characters"):
        comparisons.start("dave", "alice/m", versions, ["p" * 2001])
    comparisons.on_event(first.id, "compared", {"result": {"versions": []}})
    assert comparisons.get(first.id, "alice").status == "succeeded" and first.finished.is_set()
    with pytest.raises(NotFoundError):
        comparisons.get(first.id, "bob")
    comparisons.start("alice", "alice/m", versions, [])  # hers ended: she may start another
