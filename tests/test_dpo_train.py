"""End to end: `finetune train` with train.method dpo into the registry, from a base and from a supervised
version; the published adapter prefers the chosen answers of held-out pairs, and everything downstream (plain
peft, finetune's inference) takes it as any version."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from finetune.cli import main
from finetune.registry import Registry
from finetune.registry.jobs import Trainings
from finetune.registry.sources import import_base
from finetune.tiny import load_sample_records, sample_data_path

pytestmark = pytest.mark.slow
BETA = 0.1


def _pairs(records: list[dict]) -> list[dict]:
    return [{"prompt": f"Q: {r['instruction']}\nA:", "chosen": " " + r["output"][:60].strip(),
             "rejected": " I do not know."} for r in records]


def cli(root: Path, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["--registry", str(root), *argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("dpo-e2e")
    records = load_sample_records()
    train_file, held_out = tmp / "prefs.jsonl", tmp / "held-out.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in _pairs(records[:32])))
    held_out.write_text("".join(json.dumps(r) + "\n" for r in _pairs(records[32:40])))
    root = tmp / "registry"

    def config(name: str, base: str, **train) -> Path:
        path = tmp / f"{name}.yaml"
        data = {"path": str(train_file), "eval": str(held_out), "max_seq_len": 128} if train.get("method") \
            else {"path": str(sample_data_path()), "max_seq_len": 128}
        path.write_text(yaml.safe_dump({
            "base_model": base, "data": data, "lora": {"r": 4, "alpha": 8},
            "dpo": {"beta": BETA},
            "train": {"max_steps": 6, "batch_size": 4, "lr": 5e-3, "precision": "fp32", **train},
        }))
        return path

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_FSYNC", "0")
        reg = Registry(root)
        import_base(reg, "local/tiny", str(tiny_model_dir))
        dpo = cli(root, "train", str(config("dpo", "local/tiny:1", method="dpo", eval_every=3)),
                  "--destination", "alice/dpo", "--create-destination", "--quiet")
        sft = cli(root, "train", str(config("sft", "local/tiny:1", max_steps=3)),
                  "--destination", "alice/bot", "--create-destination", "--quiet")
        on_sft = cli(root, "train", str(config("on-sft", "alice/bot:1", method="dpo", max_steps=2)),
                     "--destination", "alice/bot", "--quiet")
    return {"reg": reg, "root": root, "dpo": dpo, "sft": sft, "on_sft": on_sft, "held_out": held_out,
            "config": config}


def _record(reg: Registry, ref: str):
    version = reg.resolve(ref)
    return version, Trainings(reg).get(version.metadata["training_id"])


def _answer_logps(model, tok, pairs: list[dict]) -> torch.Tensor:
    """log p(chosen) - log p(rejected) per pair, each answer with its eos, from the model's own logits."""
    out = []
    for pair in pairs:
        sides = []
        for side in ("chosen", "rejected"):
            prompt = tok(pair["prompt"])["input_ids"]
            answer = tok(pair[side], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = torch.tensor([prompt + answer])
            with torch.no_grad():
                logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            picked = logps.gather(1, ids[0, 1:].unsqueeze(1)).squeeze(1)
            sides.append(float(picked[len(prompt) - 1:].sum()))
        out.append(sides[0] - sides[1])
    return torch.tensor(out)


def test_dpo_from_a_base_publishes_a_version_that_prefers_held_out_chosen_answers(runs: dict, tiny_model_dir: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rc, _, err = runs["dpo"]
    assert rc == 0, err
    version, record = _record(runs["reg"], "alice/dpo:1")
    assert version.parent["ref"] == "local/tiny:1"
    meta = version.metadata
    assert meta["config"]["train"]["method"] == "dpo" and meta["prompt_format"]["name"] == "prompt_completion"
    assert meta["dataset"]["preference"] == "prompt/chosen/rejected"
    assert meta["metrics"]["method"] == "dpo" and meta["metrics"] == record.metrics
    assert meta["metrics"]["packing"] is True  # the tiny Llama keeps packed sequences apart: pairs in packed rows
    assert {"reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected"} <= set(meta["metrics"])
    assert "## Preference training" in (version.path / "README.md").read_text()
    rows = [json.loads(line) for line in Trainings(runs["reg"]).paths(record.id).metrics.read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and rows[0]["reward_margin"] == 0.0
    assert all({"reward_accuracy", "reward_margin"} <= set(r) for r in rows)
    evals = [r["eval_reward_margin"] for r in rows if "eval_reward_margin" in r]
    assert len(evals) == 2 and 0 < evals[0] < evals[1]
    log = Trainings(runs["reg"]).paths(record.id).log.read_text()
    assert "preference pairs (prompt/chosen/rejected)" in log
    assert "reference: the base (adapter off); pairs in packed rows" in log

    # Independently of the trainer: plain peft on the base, held-out pairs, the model's own logits.
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    held_out = [json.loads(line) for line in runs["held_out"].read_text().splitlines()]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    before = _answer_logps(base, tok, held_out)
    after = _answer_logps(PeftModel.from_pretrained(base, str(version.path)), tok, held_out)
    margins = BETA * (after - before)
    assert float(margins.mean()) == pytest.approx(evals[-1], rel=1e-3)  # what the run reported for them
    assert float(margins.mean()) > 0.1 and float((margins > 0).float().mean()) >= 0.75


def test_dpo_from_a_supervised_version_trains_against_it(runs: dict):
    from finetune.inference import GenerationSettings, generate, load_version

    for key in ("sft", "on_sft"):
        assert runs[key][0] == 0, runs[key][2]
    version, record = _record(runs["reg"], "alice/bot:2")
    assert version.parent["ref"] == "alice/bot:1"
    rows = [json.loads(line) for line in Trainings(runs["reg"]).paths(record.id).metrics.read_text().splitlines()]
    # the reference is base + :1's adapter, which the run starts from: rewards start at exactly 0
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and rows[0]["reward_margin"] == 0.0
    assert rows[-1]["reward_margin"] != 0.0
    assert "reference: the starting adapter, frozen" in Trainings(runs["reg"]).paths(record.id).log.read_text()
    assert sorted(p.name for p in version.path.iterdir() if p.is_dir()) == []  # the frozen copy is not published
    parent_cfg = json.loads((runs["reg"].resolve("alice/bot:1").path / "adapter_config.json").read_text())
    assert json.loads((version.path / "adapter_config.json").read_text())["r"] == parent_cfg["r"]
    text = generate(load_version(runs["reg"], "alice/bot:2", device="cpu"), "Name a color.",
                    GenerationSettings(max_new_tokens=4))
    assert isinstance(text, str)


def test_two_processes_train_what_one_process_does_with_grad_accum(runs: dict):
    """DDP around the pair loss, the reference switch of a continued adapter, and the rewards summed over
    processes: two processes (gloo) and one process with grad_accum 2 take the same windows."""
    from safetensors.torch import load_file

    root, config = runs["root"], runs["config"]("dist", "alice/bot:1", method="dpo", max_steps=3, batch_size=2)
    launch = Path(__file__).resolve().parents[1] / "scripts" / "launch.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FINETUNE_FSYNC": "0"}
    proc = subprocess.run(
        [sys.executable, str(launch), "--num-processes", "2", "--cpu", "--registry", str(root), "--",
         str(config), "--destination", "alice/two", "--create-destination", "--quiet"],
        capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_FSYNC", "0")
        rc, _, err = cli(root, "train", str(config), "--destination", "alice/one", "--create-destination", "--quiet",
                         "--set", "train.grad_accum=2")
    assert rc == 0, err
    two, one = (runs["reg"].resolve(ref) for ref in ("alice/two:1", "alice/one:1"))
    a, b = (load_file(str(v.path / "adapter_model.safetensors")) for v in (two, one))
    assert a.keys() == b.keys() and a
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    m2, m1 = two.metadata["metrics"], one.metadata["metrics"]
    assert m2["processes"] == 2 and m2["method"] == "dpo"
    for key in ("train_loss", "eval_loss", "reward_margin", "reward_accuracy", "reward_chosen"):
        assert m2[key] == pytest.approx(m1[key], abs=1e-5), key


def test_a_stopped_dpo_run_resumes_to_the_uninterrupted_adapter(runs: dict, monkeypatch: pytest.MonkeyPatch):
    from safetensors.torch import load_file

    from finetune.errors import TrainingCanceled
    from finetune.training.guards import StopFlag

    monkeypatch.setenv("FINETUNE_FSYNC", "0")
    root = runs["root"]
    config = runs["config"]("resume", "alice/bot:1", method="dpo", max_steps=4, checkpoint_every=2)
    rc, _, err = cli(root, "train", str(config), "--destination", "alice/straight", "--create-destination", "--quiet")
    assert rc == 0, err
    calls, check = 0, StopFlag.check

    def stop_after_step_2(self, accelerator):  # one check before the first step, then one after each step
        nonlocal calls
        calls += 1
        if calls == 3:
            raise TrainingCanceled("stopped for the test")
        return check(self, accelerator)

    monkeypatch.setattr(StopFlag, "check", stop_after_step_2)
    rc, _, err = cli(root, "train", str(config), "--destination", "alice/resumed", "--create-destination", "--quiet")
    assert rc == 130, err
    training_id = err.split()[1]
    monkeypatch.setattr(StopFlag, "check", check)
    rc, out, err = cli(root, "train", "--resume", training_id, "--quiet")
    assert rc == 0 and out == "alice/resumed:1\n", err
    a, b = (load_file(str(runs["reg"].resolve(ref).path / "adapter_model.safetensors"))
            for ref in ("alice/straight:1", "alice/resumed:1"))
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    rows = [json.loads(line) for line in Trainings(runs["reg"]).paths(training_id).metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all("reward_margin" in r for r in rows)
