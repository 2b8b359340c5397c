"""`finetune train --resume`: a run killed with SIGKILL between checkpoints continues from its newest checkpoint and
publishes exactly the adapter an uninterrupted run publishes.

The killed run is a real ``python -m finetune``-style subprocess whose loop is made to stand still after step 5
(checkpoint 4 is on disk by then), so the kill lands at a known point on any machine load: the test polls the
training's checkpoints folder and metrics file, then sends SIGKILL. Resuming must then restore the adapter,
the optimizer and scheduler, the RNG (which LoRA dropout draws from) and the position, redo step 5, and log
each step once.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from finetune.cli import main
from finetune.registry import Registry
from finetune.registry.jobs import Trainings
from finetune.registry.sources import import_base
from finetune.tiny import sample_data_path
from finetune.training.metrics import MetricsLog

STEPS, HANG_AFTER = 8, 5
# The killed process loads, trains steps 1-5 and then waits (at most this long) to be killed.
RUN_UNTIL_KILLED = f"""
import sys, time
import finetune.training.guards as guards
calls = 0
check = guards.StopFlag.check
def stand_still(self, accelerator):
    global calls
    calls += 1
    if calls == {HANG_AFTER} + 1:  # one check before the first step, then one after each step
        time.sleep(300)
    return check(self, accelerator)
guards.StopFlag.check = stand_still
from finetune.cli import main
sys.exit(main(sys.argv[1:]))
"""

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def root(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("resume") / "registry"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_FSYNC", "0")
        import_base(Registry(root), "local/tiny", str(tiny_model_dir))
    return root


def cli(root: Path, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["--registry", str(root), *argv])
    return rc, out.getvalue(), err.getvalue()


def write_config(path: Path, dropout: float) -> Path:
    path.write_text(yaml.safe_dump({
        "base_model": "local/tiny:1",
        "data": {"path": str(sample_data_path()), "eval": 0.1, "max_seq_len": 256},
        "lora": {"r": 4, "alpha": 8, "dropout": dropout},
        "train": {"max_steps": STEPS, "batch_size": 4, "lr": 2e-3, "checkpoint_every": 2, "eval_every": 4,
                  "precision": "fp32", "warmup_steps": 2},
    }))
    return path


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run exited ({proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def adapter(version_path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(version_path / "adapter_model.safetensors"))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_sigkilled_run_resumes_to_the_uninterrupted_adapter(root: Path, tmp_path: Path, dropout: float):
    reg = Registry(root)
    trainings = Trainings(reg)
    config = write_config(tmp_path / "train.yaml", dropout)
    killed_dest, clean_dest = f"resume/killed-{int(dropout * 10)}", f"resume/clean-{int(dropout * 10)}"

    env = {**os.environ, "OMP_NUM_THREADS": "1", "FINETUNE_FSYNC": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN_UNTIL_KILLED, "--registry", str(root), "train", str(config),
         "--destination", killed_dest, "--create-destination", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = proc.stderr.readline()  # `training ID`, printed as soon as the record exists
        assert first.startswith("training "), first + proc.stderr.read()
        training_id = first.split()[1]
        paths = trainings.paths(training_id)
        checkpoints, metrics = paths.checkpoints, MetricsLog(paths.metrics)
        wait_for(lambda: (checkpoints / "step-00000004" / "state.json").is_file(), 120, "checkpoint 4", proc)
        wait_for(lambda: any(r["step"] == HANG_AFTER for r in metrics.read()), 60, f"step {HANG_AFTER}", proc)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()

    record = trainings.get(training_id)
    assert record.status == "processing" and trainings.is_stale(record)  # what kill -9 leaves behind
    assert reg.list_versions(killed_dest) == []
    rc, out, _ = cli(root, "trainings", "list")
    listed = next(line for line in out.splitlines() if line.startswith(training_id))
    assert rc == 0 and "processing (process gone)" in listed

    rc, out, err = cli(root, "train", "--resume", training_id, "--quiet")
    assert rc == 0, err
    assert out == f"{killed_dest}:1\n"
    record = trainings.get(training_id)
    assert record.status == "succeeded" and record.resumed_from_step == 4
    rows = metrics.read()
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # step 5 redone, logged once
    assert [r["step"] for r in rows if "eval_loss" in r] == [4, 8]
    assert record.metrics["steps"] == STEPS and record.metrics["trained_tokens"] == rows[-1]["tokens"]
    assert len(reg.list_versions(killed_dest)) == 1

    rc, out, err = cli(root, "train", str(config), "--destination", clean_dest, "--create-destination", "--quiet")
    assert rc == 0, err
    resumed, clean = adapter(reg.resolve(f"{killed_dest}:1").path), adapter(reg.resolve(f"{clean_dest}:1").path)
    assert resumed.keys() == clean.keys() and resumed
    diff = max(float((resumed[k] - clean[k]).abs().max()) for k in clean)
    assert diff < 1e-6, diff
    clean_record = trainings.get(reg.resolve(f"{clean_dest}:1").metadata["training_id"])
    assert record.metrics["eval_loss"] == pytest.approx(clean_record.metrics["eval_loss"], abs=1e-6)
    clean_rows = MetricsLog(trainings.paths(clean_record.id).metrics).read()
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in clean_rows], abs=1e-6)
    assert [r["lr"] for r in rows] == pytest.approx([r["lr"] for r in clean_rows], abs=1e-12)


def test_resume_refuses_a_finished_run_and_a_config(root: Path, tmp_path: Path):
    reg = Registry(root)
    config = write_config(tmp_path / "train.yaml", 0.0)
    rc, out, err = cli(root, "train", str(config), "--destination", "resume/done", "--create-destination",
                       "--quiet", "--set", "train.max_steps=1", "--set", "train.checkpoint_every=0")
    assert rc == 0, err
    training_id = err.split()[1]
    rc, out, err = cli(root, "train", "--resume", training_id)
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "already succeeded" in err and "resume/done:1" in err
    rc, out, err = cli(root, "train", str(config), "--resume", training_id)
    assert rc == 2 and "--resume continues a run with its own config" in err
    assert len(reg.list_versions("resume/done")) == 1


def test_a_resumed_run_continues_from_the_version_it_started_from(root: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch):
    """`base_model: owner/name` means its latest version when the run starts; a resume continues from that same
    version, not from one published into the model while the run was stopped."""
    from finetune.errors import TrainingCanceled
    from finetune.training.guards import StopFlag

    reg = Registry(root)
    config = write_config(tmp_path / "train.yaml", 0.0)
    short = ("--quiet", "--set", "train.max_steps=2", "--set", "train.checkpoint_every=0")
    rc, out, err = cli(root, "train", str(config), "--destination", "pin/parent", "--create-destination", *short)
    assert rc == 0 and out == "pin/parent:1\n", err

    calls, check = 0, StopFlag.check

    def stop_after_step_2(self, accelerator):  # one check before the first step, then one after each step
        nonlocal calls
        calls += 1
        if calls == 3:
            raise TrainingCanceled("stopped for the test")
        return check(self, accelerator)

    monkeypatch.setattr(StopFlag, "check", stop_after_step_2)
    rc, _, err = cli(root, "train", str(config), "--destination", "pin/child", "--create-destination", "--quiet",
                     "--set", "base_model=pin/parent", "--set", "train.max_steps=4")
    assert rc == 130, err
    training_id = err.split()[1]
    monkeypatch.setattr(StopFlag, "check", check)
    assert Trainings(reg).get(training_id).model == "pin/parent:1"

    rc, out, err = cli(root, "train", str(config), "--destination", "pin/parent", *short)  # pin/parent:2 now
    assert rc == 0 and out == "pin/parent:2\n", err
    rc, out, err = cli(root, "train", "--resume", training_id, "--quiet")
    assert rc == 0 and out == "pin/child:1\n", err
    assert Trainings(reg).get(training_id).model == "pin/parent:1"
    assert reg.resolve("pin/child:1").parent["ref"] == "pin/parent:1"
