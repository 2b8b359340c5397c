"""`finetune train` end to end: what it prints, the versions it publishes, the training record, metrics.jsonl,
the version's manifest, the adapter loading with plain peft, and `finetune trainings list|show|logs`.

One module-scoped registry holds three attempts on the same destination: refused (the destination does not
exist), a first run as a real subprocess (``python -m finetune``), a second in-process (``finetune.cli.main``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from finetune.cli import main
from finetune.registry import Registry
from finetune.registry.jobs import Trainings
from finetune.registry.sources import import_base
from finetune.tiny import sample_data_path
from finetune.training.metrics import MetricsLog

DEST = "alice/e2e"
STEPS = 4


def subprocess_env() -> dict[str, str]:
    # One OpenMP thread (2 shared cores), no fsync (the registry tests cover durability), never a hub.
    return {**os.environ, "OMP_NUM_THREADS": "1", "FINETUNE_FSYNC": "0", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def cli(root: Path, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["--registry", str(root), *argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("train-e2e")
    root = tmp / "registry"
    config = tmp / "train.yaml"
    config.write_text(yaml.safe_dump({
        "base_model": "local/tiny:1",
        "data": {"path": str(sample_data_path()), "eval": 0.1, "max_seq_len": 256},
        "lora": {"r": 4, "alpha": 8},
        "train": {"max_steps": STEPS, "batch_size": 4, "lr": 1e-3, "eval_every": 2, "checkpoint_every": 2,
                  "precision": "fp32"},
    }))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_FSYNC", "0")
        reg = Registry(root)
        import_base(reg, "local/tiny", str(tiny_model_dir))
        refused = cli(root, "train", str(config), "--destination", DEST, "--quiet")
        trainings_after_refusal = Trainings(reg).list()

        first = subprocess.run(
            [sys.executable, "-m", "finetune", "--registry", str(root), "train", str(config), "--destination", DEST,
             "--create-destination", "--set", "train.lr=5e-4"],
            capture_output=True, text=True, timeout=300, env=subprocess_env(), check=False)

        # The second run in-process, watching every status the record is saved with.
        statuses: list[str] = []
        save = Trainings.save

        def spy(self, record):
            statuses.append(record.status)
            return save(self, record)

        mp.setattr(Trainings, "save", spy)
        second = cli(root, "train", str(config), "--destination", DEST, "--quiet")
    return {"root": root, "reg": reg, "config": config, "refused": refused, "first": first, "second": second,
            "trainings_after_refusal": trainings_after_refusal, "statuses": statuses}


def _id_from_stderr(err: str) -> str:
    ids = [line.split()[1] for line in err.splitlines() if line.startswith("training ")]
    assert ids, err
    return ids[0]


def test_missing_destination_is_refused_with_the_command_that_creates_it(runs: dict):
    rc, out, err = runs["refused"]
    assert rc == 1 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("finetune: error: ") and f"finetune models create {DEST}" in err
    assert "--create-destination" in err
    assert runs["trainings_after_refusal"] == []  # refused before a record was opened


def test_subprocess_run_prints_its_id_then_the_version_ref(runs: dict):
    first = runs["first"]
    assert first.returncode == 0, first.stderr
    assert first.stdout == f"{DEST}:1\n"  # stdout carries only the ref, for scripts
    training_id = _id_from_stderr(first.stderr)
    record = Trainings(runs["reg"]).get(training_id)
    assert record.status == "succeeded" and record.output["version"] == f"{DEST}:1"
    assert record.input["train"]["lr"] == 5e-4  # --set applied, and the resolved config recorded


def test_second_run_adds_the_next_version(runs: dict):
    rc, out, err = runs["second"]
    assert rc == 0, err
    assert out == f"{DEST}:2\n"
    assert err.startswith("training ")  # --quiet still says which training this is, first thing
    versions = runs["reg"].list_versions(DEST)
    assert sorted(v.number for v in versions) == [1, 2]
    assert Trainings(runs["reg"]).get(_id_from_stderr(err)).input["train"]["lr"] == 1e-3


def test_record_goes_starting_processing_succeeded_with_its_fields(runs: dict):
    statuses = runs["statuses"]
    order = [s for i, s in enumerate(statuses) if i == 0 or statuses[i - 1] != s]
    assert order == ["starting", "processing", "succeeded"]
    _, out, err = runs["second"]
    record = Trainings(runs["reg"]).get(_id_from_stderr(err))
    version = runs["reg"].resolve(out.strip())
    assert record.status == "succeeded" and record.error is None
    assert record.model == "local/tiny:1" and record.destination == DEST
    assert record.input["base_model"] == "local/tiny:1" and record.input["train"]["max_steps"] == STEPS
    assert record.output == {"version": version.ref, "weights": str(version.path)}
    assert record.metrics["steps"] == STEPS and record.metrics["trained_tokens"] > 0
    assert {"train_loss", "eval_loss", "tokens_per_s", "total_time_s", "precision"} <= record.metrics.keys()
    assert record.metrics["precision"] == "fp32" and record.metrics["processes"] == 1
    assert record.metrics["packing"] is True  # packing: auto, and the tiny Llama keeps packed sequences apart
    assert record.metrics["device"] == "cpu" and record.metrics["peak_memory_mb"] > 100  # torch alone takes more
    assert record.created_at <= record.started_at <= record.completed_at
    assert record.pid is not None


def test_metrics_file_has_a_row_per_step_and_eval_loss_at_eval_steps(runs: dict):
    record = Trainings(runs["reg"]).get(_id_from_stderr(runs["second"][2]))
    rows = MetricsLog(Trainings(runs["reg"]).paths(record.id).metrics).read()
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert {"step", "loss", "lr", "tokens", "tokens_per_s"} <= r.keys()
        assert r["loss"] > 0 and r["lr"] > 0 and r["tokens_per_s"] >= 0
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]  # eval_every 2
    # Each row's lr is the rate that step used: cosine without warm-up starts at the configured rate, and even
    # the last step trains at a rate above zero (the scheduler reaches 0 only after it).
    lrs = [r["lr"] for r in rows]
    assert lrs[0] == pytest.approx(1e-3) and lrs == sorted(lrs, reverse=True) and lrs[-1] > 0
    tokens = [r["tokens"] for r in rows]
    assert tokens == sorted(tokens) and tokens[0] > 0 and tokens[-1] == record.metrics["trained_tokens"]
    assert rows[-1]["eval_loss"] == pytest.approx(record.metrics["eval_loss"], abs=1e-6)
    assert rows[0]["tokens_per_s"] == 0  # the warm-up step is not measured


def test_manifest_records_training_config_data_format_metrics_and_parent(runs: dict):
    reg = runs["reg"]
    version = reg.resolve(f"{DEST}:2")
    record = Trainings(reg).get(_id_from_stderr(runs["second"][2]))
    meta = version.metadata
    assert version.kind == "adapter"
    assert meta["training_id"] == record.id
    assert meta["config"] == record.input
    data_file = sample_data_path()
    assert meta["dataset"]["path"] == str(data_file.resolve())
    assert meta["dataset"]["sha256"] == hashlib.sha256(data_file.read_bytes()).hexdigest()
    assert meta["dataset"]["rows"] == sum(1 for line in data_file.read_text().splitlines() if line.strip())
    assert meta["prompt_format"]["name"] == "alpaca"
    assert meta["metrics"] == record.metrics
    base = reg.resolve("local/tiny:1")
    assert version.parent == {"ref": "local/tiny:1", "id": base.id}
    assert reg.verify(version) == []
    files = set(version.manifest["files"])
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "loss.png"} <= files


def test_adapter_loads_with_plain_peft(runs: dict, tiny_model_dir: Path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    version = runs["reg"].resolve(f"{DEST}:2")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.tensor([tok("Name a color.")["input_ids"]])
    with torch.no_grad():
        before = base(ids).logits
    model = PeftModel.from_pretrained(base, str(version.path))
    saved = load_file(str(version.path / "adapter_model.safetensors"))
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(saved) > 0
    assert any(float(t.abs().max()) > 0 for k, t in saved.items() if "lora_B" in k)  # training moved B off zero
    with torch.no_grad():
        after = model(ids).logits
    assert (after - before).abs().max() > 1e-4  # the adapter is applied


def test_trainings_list_show_and_logs(runs: dict):
    root, reg = runs["root"], runs["reg"]
    records = [r for r in Trainings(reg).list() if r.destination == DEST]
    assert len(records) == 2 and {r.status for r in records} == {"succeeded"}
    rc, out, _ = cli(root, "trainings", "list")
    assert rc == 0
    for r in records:
        line = next(line for line in out.splitlines() if line.startswith(r.id))
        assert "succeeded" in line and r.output["version"] in line and DEST in line
    rc, out, _ = cli(root, "trainings", "list", "--json")
    assert rc == 0 and {r["id"] for r in json.loads(out)} >= {r.id for r in records}
    newest = records[0]
    rc, out, _ = cli(root, "trainings", "show", newest.id)
    shown = json.loads(out)
    assert rc == 0 and shown["id"] == newest.id and shown["status"] == "succeeded"
    assert Path(shown["log"]).is_file() and Path(shown["metrics_file"]).is_file()
    rc, out, _ = cli(root, "trainings", "logs", newest.id)
    assert rc == 0
    assert f"training {newest.id} -> {DEST}" in out and f"published {newest.output['version']}" in out
    # Which rewritten paths trained (tiny Llama, 2 layers, LoRA on all 7 linears of each, fp32): all of ours but
    # the gated MLPs', which fp32 on a CPU leaves off.
    assert ("fused paths: lora 14/14 layers, rmsnorm 5, gated-mlp off in fp32 on CPUs (2 LlamaMLP unchanged), "
            "loss fused, last mlp on loss rows, attention varlen-math") in out
    rc, out, err = cli(root, "trainings", "show", "20000101-000000-abcdef")
    assert rc == 1 and out == "" and len(err.strip().splitlines()) == 1 and "finetune trainings list" in err


# ------------------------------------------------------------------------------------------- cancel and failure

LONG = 100_000  # steps: these runs end only when stopped


@pytest.fixture(scope="module")
def stopped(runs: dict) -> dict:
    """Three long runs started together, stopped by SIGTERM, SIGINT and `finetune trainings cancel`."""
    root, config = runs["root"], runs["config"]
    procs = {}
    for how in ("SIGTERM", "SIGINT", "cancel"):
        procs[how] = subprocess.Popen(
            [sys.executable, "-m", "finetune", "--registry", str(root), "train", str(config), "--destination",
             f"alice/stop-{how.lower()}", "--create-destination", "--quiet", "--set", f"train.max_steps={LONG}",
             "--set", "train.checkpoint_every=0", "--set", "train.eval_every=0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    trainings = Trainings(runs["reg"])
    results = {}
    try:
        ids = {}
        for how, proc in procs.items():
            first = proc.stderr.readline()
            assert first.startswith("training "), first + proc.stderr.read()
            ids[how] = first.split()[1]
        for how, proc in procs.items():
            metrics = MetricsLog(trainings.paths(ids[how]).metrics)
            deadline = time.monotonic() + 120
            while not metrics.read():  # stop it inside the loop, not while it loads
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.05)
            if how == "cancel":
                results["cancel_cli"] = cli(root, "trainings", "cancel", ids[how])
            else:
                proc.send_signal(getattr(signal, how))
        for how, proc in procs.items():
            out, err = proc.communicate(timeout=60)
            results[how] = {"rc": proc.returncode, "out": out, "err": err, "id": ids[how]}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


@pytest.mark.slow
@pytest.mark.parametrize("how,reason", [("SIGTERM", "SIGTERM"), ("SIGINT", "SIGINT"), ("cancel", "cancel requested")])
def test_stopped_run_ends_canceled_without_publishing(runs: dict, stopped: dict, how: str, reason: str):
    result = stopped[how]
    assert result["rc"] == 130, result["err"]
    assert result["out"] == ""
    last = result["err"].strip().splitlines()[-1]
    assert last == f"finetune: error: training {result['id']} canceled; no version published"
    record = Trainings(runs["reg"]).get(result["id"])
    assert record.status == "canceled" and record.error == f"canceled: {reason}"
    assert record.completed_at and record.output is None
    assert 0 < record_steps(runs, record.id) < LONG
    assert runs["reg"].list_versions(f"alice/stop-{how.lower()}") == []
    if how == "cancel":
        rc, out, err = stopped["cancel_cli"]
        assert rc == 0 and out == f"cancel requested for {result['id']}\n"
        rc, out, err = cli(runs["root"], "trainings", "cancel", result["id"])  # once ended, nothing to cancel
        assert rc == 1 and "already canceled" in err and len(err.strip().splitlines()) == 1


def record_steps(runs: dict, training_id: str) -> int:
    return len(MetricsLog(Trainings(runs["reg"]).paths(training_id).metrics).read())


def _in_process(runs: dict, destination: str, **train: object):
    from finetune import training
    from finetune.config import load_config

    config = load_config(runs["config"], [f"train.{k}={v}" for k, v in train.items()])
    return training.train(config, registry=runs["reg"], destination=destination, create_destination=True,
                          progress=False)


def test_cancel_marker_alone_stops_the_run(runs: dict, monkeypatch: pytest.MonkeyPatch):
    """The marker is the contract across hosts, where no signal can reach the process."""
    from finetune.errors import TrainingCanceled

    monkeypatch.setenv("FINETUNE_FSYNC", "0")
    trainings = Trainings(runs["reg"])
    append = MetricsLog.append

    def append_then_cancel(self, row):
        append(self, row)
        if row["step"] == 2:
            trainings.paths(self.path.parent.name).cancel.touch()

    monkeypatch.setattr(MetricsLog, "append", append_then_cancel)
    with pytest.raises(TrainingCanceled, match="canceled; no version published"):
        _in_process(runs, "alice/marker", max_steps=20, checkpoint_every=0, eval_every=0)
    record = next(r for r in trainings.list() if r.destination == "alice/marker")
    assert record.status == "canceled" and record.error == "canceled: cancel requested"
    log = trainings.paths(record.id).log.read_text()
    assert "canceled: cancel requested" in log and "canceled: canceled" not in log
    assert record_steps(runs, record.id) == 2
    assert runs["reg"].list_versions("alice/marker") == []


def test_crash_mid_run_ends_failed_with_the_reason(runs: dict, monkeypatch: pytest.MonkeyPatch):
    from finetune.modeling.ops.loss import CausalLMLoss

    monkeypatch.setenv("FINETUNE_FSYNC", "0")
    forward = CausalLMLoss.forward
    calls = []

    def crash_on_third(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated device failure")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(CausalLMLoss, "forward", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated device failure"):
        _in_process(runs, "alice/crash", max_steps=STEPS, eval_every=0, checkpoint_every=0)
    record = next(r for r in Trainings(runs["reg"]).list() if r.destination == "alice/crash")
    assert record.status == "failed" and record.error == "RuntimeError: simulated device failure"
    assert record.completed_at and record.output is None
    assert runs["reg"].list_versions("alice/crash") == []


def test_runs_with_different_precisions_in_one_process(runs: dict, monkeypatch: pytest.MonkeyPatch):
    """accelerate keeps its settings in a process-wide singleton; a notebook may still train fp32, then bf16."""
    monkeypatch.setenv("FINETUNE_FSYNC", "0")
    for precision in ("fp32", "bf16"):
        result = _in_process(runs, f"alice/{precision}", precision=precision, max_steps=1, eval_every=0,
                             checkpoint_every=0)
        assert result.version.metadata["metrics"]["precision"] == precision


def test_resuming_a_run_killed_after_publishing_settles_it_without_a_second_version(
        runs: dict, monkeypatch: pytest.MonkeyPatch):
    """A kill between the publish and the record update leaves a 'processing' record; --resume must not
    train and publish again."""
    from finetune.training import run_training

    monkeypatch.setenv("FINETUNE_FSYNC", "0")
    trainings = Trainings(runs["reg"])
    result = _in_process(runs, "alice/settle", max_steps=2, checkpoint_every=0, eval_every=0)
    # What the kill would have left: the version exists, the record still says it runs, its process is gone.
    trainings.update(result.record, status="processing", output=None, completed_at=None, pid=2**22 + 7)
    again = run_training(result.record.id, registry=runs["reg"], progress=False)
    assert again.version == result.version
    assert [v.number for v in runs["reg"].list_versions("alice/settle")] == [1]
    record = trainings.get(result.record.id)
    assert record.status == "succeeded" and record.output["version"] == result.version.ref
