"""Two training processes on the CPU (gloo), started by finetune.launch: one record, one version, and the same
adapter a single process computes over the same windows.

With ``grad_accum`` 1, a window of two processes is two micro-batches, one each; a single process with
``grad_accum`` 2 runs the same two micro-batches itself (``plan_epoch`` does not depend on the process count).
normalize_loss's ``world_size`` factor undoes DistributedDataParallel's averaging, so both must produce the same
gradients, hence the same adapter.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from finetune.cli import main
from finetune.registry import Registry
from finetune.registry.jobs import Trainings
from finetune.registry.sources import import_base
from finetune.tiny import sample_data_path

STEPS = 4

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def launched(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("distributed")
    root = tmp / "registry"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_FSYNC", "0")
        import_base(Registry(root), "local/tiny", str(tiny_model_dir))
    config = tmp / "train.yaml"
    config.write_text(yaml.safe_dump({
        "base_model": "local/tiny:1",
        "data": {"path": str(sample_data_path()), "eval": 0.1, "max_seq_len": 256},
        "lora": {"r": 4, "alpha": 8},
        "train": {"max_steps": STEPS, "batch_size": 3, "grad_accum": 1, "lr": 2e-3, "eval_every": 2,
                  "checkpoint_every": 2, "precision": "fp32"},
    }))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FINETUNE_FSYNC": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "finetune.launch", "--num-processes", "2", "--cpu", "--registry", str(root), "--",
         str(config), "--destination", "dist/two", "--create-destination", "--quiet"],
        capture_output=True, text=True, timeout=300, env=env, check=False)
    return {"root": root, "reg": Registry(root), "config": config, "proc": proc}


def test_two_processes_publish_exactly_one_version(launched: dict):
    proc, reg = launched["proc"], launched["reg"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    refs = [line for line in proc.stdout.splitlines() if re.fullmatch(r"[\w.-]+/[\w.-]+:\d+", line)]
    assert refs == ["dist/two:1"]  # printed by the main process only
    assert [v.number for v in reg.list_versions("dist/two")] == [1]
    records = Trainings(reg).list()
    assert len(records) == 1  # the other process opened no record of its own
    record = records[0]
    assert record.status == "succeeded" and record.output["version"] == "dist/two:1"
    assert record.metrics["processes"] == 2 and record.metrics["steps"] == STEPS
    log = Trainings(reg).paths(record.id).log.read_text()
    assert "(2 processes, cpu, fp32)" in log
    # Every process saved its own RNG state in the checkpoint (step 2; the last step writes none).
    assert {p.name for p in (Trainings(reg).paths(record.id).checkpoints / "step-00000002").glob("rng-*.pt")} == \
        {"rng-0.pt", "rng-1.pt"}


def test_two_processes_train_the_adapter_one_process_trains_with_grad_accum(launched: dict):
    reg, root = launched["reg"], launched["root"]
    assert launched["proc"].returncode == 0, launched["proc"].stderr[-3000:]
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.setenv("FINETUNE_FSYNC", "0")
        rc = main(["--registry", str(root), "train", str(launched["config"]), "--destination", "dist/one",
                   "--create-destination", "--quiet", "--set", "train.grad_accum=2"])
    assert rc == 0, err.getvalue()
    two = reg.resolve("dist/two:1")
    one = reg.resolve("dist/one:1")
    a, b = (load_file(str(v.path / "adapter_model.safetensors")) for v in (two, one))
    assert a.keys() == b.keys() and a
    # All-reduce sums in another order than one process does: ~1e-7 on gradients, a little more after Adam.
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff < 1e-5, diff
    assert max(float(t.abs().max()) for k, t in b.items() if "lora_B" in k) > 1e-3  # it did train
    m2, m1 = two.metadata["metrics"], one.metadata["metrics"]
    assert m2["trained_tokens"] == m1["trained_tokens"]
    assert m2["train_loss"] == pytest.approx(m1["train_loss"], abs=1e-5)
    assert m2["eval_loss"] == pytest.approx(m1["eval_loss"], abs=1e-5)  # the eval set split over processes, summed
