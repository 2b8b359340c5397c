"""What a training run may publish: never a diverged adapter, never twice the same error, and a train_loss that
means something. Runs in-process on the tiny model (a handful of steps each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import assert_one_line_error
from safetensors.torch import save_file

from finetune.cli import main
from finetune.errors import NonFiniteError
from finetune.registry import Registry
from finetune.registry.jobs import Trainings
from finetune.registry.sources import import_base
from finetune.tiny import sample_data_path

DEST = "guard/dest"


@pytest.fixture(scope="module")
def root(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("train-guards")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_FSYNC", "0")
        reg = Registry(tmp / "registry")
        import_base(reg, "local/tiny", str(tiny_model_dir))
        reg.create_model(DEST)
    return reg.root


def write_config(path: Path, **train: object) -> Path:
    cfg = {"base_model": "local/tiny:1", "data": {"path": str(sample_data_path()), "max_seq_len": 128},
           "lora": {"r": 4, "alpha": 8},
           "train": {"max_steps": 3, "batch_size": 4, "precision": "fp32", "seed": 0, **train}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_diverging_run_stops_at_the_step_and_publishes_nothing(root: Path, tmp_path: Path, capsys):
    reg = Registry(root)
    cfg = write_config(tmp_path / "c.yaml", lr=1e30, max_steps=6)
    rc = main(["--registry", str(root), "train", str(cfg), "--destination", DEST])  # not --quiet: the log echoes
    out, err = capsys.readouterr()
    assert rc == 1 and out == ""
    errors = [line for line in err.splitlines() if "the loss became" in line]
    assert len(errors) == 1, err  # printed once, as the error line (the log line stays in the log file)
    assert_one_line_error(None, errors[0], "at step 2", "train.lr", "train.precision")
    assert reg.list_versions(DEST) == []
    record = next(r for r in Trainings(reg).list() if r.destination == DEST)
    assert record.status == "failed" and "at step 2" in record.error and record.output is None
    assert "the loss became" in Trainings(reg).paths(record.id).log.read_text()


HUB = {"hub_id": "o/base", "revision": "0" * 40}  # an adapter names its base


def test_no_adapter_with_a_non_finite_weight_is_published(root: Path, tmp_path: Path):
    reg = Registry(root)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for bad in (float("nan"), float("inf"), float("-inf")):
            folder = tmp_path / f"adapter-{dtype}-{bad}"
            folder.mkdir()
            (folder / "adapter_config.json").write_text("{}")
            weights = {"a": torch.zeros(4, 4, dtype=dtype), "b": torch.ones(300, dtype=dtype)}
            weights["b"][123] = bad
            save_file(weights, str(folder / "adapter_model.safetensors"))
            with pytest.raises(NonFiniteError, match=r"inf/NaN weights \(b\); nothing published"):
                reg.publish(DEST, folder, parent=HUB)
    assert reg.list_versions(DEST) == []
    assert list((root / ".staging").iterdir()) == []
    finite = tmp_path / "finite"
    finite.mkdir()
    (finite / "adapter_config.json").write_text("{}")
    save_file({"a": torch.full((4,), 6.5e4, dtype=torch.float16)}, str(finite / "adapter_model.safetensors"))
    v = reg.publish(DEST, finite, parent=HUB)  # large but finite: published
    reg.delete_version(v.ref)


def test_train_loss_is_the_mean_of_the_last_steps_beside_the_last_one(root: Path, tmp_path: Path, capsys):
    reg = Registry(root)
    cfg = write_config(tmp_path / "c.yaml", max_steps=25, lr=2e-3)
    assert main(["--registry", str(root), "train", str(cfg), "--destination", DEST, "--quiet"]) == 0
    version = reg.resolve(capsys.readouterr().out.strip())
    rows = Trainings(reg).paths(version.metadata["training_id"]).metrics.read_text().splitlines()
    losses = [json.loads(r)["loss"] for r in rows]
    assert len(losses) == 25
    m = version.metadata["metrics"]
    assert m["train_loss_steps"] == 20
    assert m["train_loss"] == pytest.approx(sum(losses[-20:]) / 20, rel=1e-5)
    assert m["last_step_loss"] == pytest.approx(losses[-1], rel=1e-5)
    assert m["train_loss"] != pytest.approx(m["last_step_loss"])
    assert "mean of the last 20 steps" in (version.path / "README.md").read_text()
    reg.delete_version(version.ref)


def test_resume_skips_a_torn_checkpoint_and_names_the_one_it_falls_back_to(root: Path, tmp_path: Path, capsys,
                                                                           monkeypatch: pytest.MonkeyPatch):
    from finetune.errors import TrainingCanceled
    from finetune.training.guards import StopFlag

    reg = Registry(root)
    cfg = write_config(tmp_path / "c.yaml", max_steps=5, checkpoint_every=1)
    check, calls = StopFlag.check, []

    def stop_after_step_3(self, accelerator):
        calls.append(1)
        if len(calls) == 4:  # one check before the first step, then one after each step
            raise TrainingCanceled("test stop")
        return check(self, accelerator)

    monkeypatch.setattr(StopFlag, "check", stop_after_step_3)
    assert main(["--registry", str(root), "train", str(cfg), "--destination", DEST, "--quiet"]) == 130
    monkeypatch.setattr(StopFlag, "check", check)
    record = next(r for r in Trainings(reg).list() if r.destination == DEST and r.status == "canceled")
    paths = Trainings(reg).paths(record.id)
    assert sorted(p.name for p in paths.checkpoints.glob("step-*")) == ["step-00000002", "step-00000003"]
    newest = paths.checkpoints / "step-00000003" / "adapter.safetensors"
    newest.write_bytes(newest.read_bytes()[:20])  # torn: a few header bytes survived
    capsys.readouterr()

    rc = main(["--registry", str(root), "train", "--resume", record.id, "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    log = paths.log.read_text()
    assert "checkpoint step-00000003 is damaged" in log and "resumed from step-00000002 (step 2)" in log
    version = reg.resolve(out.strip())
    assert version.metadata["metrics"]["steps"] == 5
    assert [r["step"] for r in (json_rows(paths.metrics))] == [1, 2, 3, 4, 5]
    reg.delete_version(version.ref)


def json_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_max_seq_len_past_the_models_positions_is_refused(root: Path, tmp_path: Path, capsys):
    cfg = write_config(tmp_path / "c.yaml")
    rc = main(["--registry", str(root), "train", str(cfg), "--destination", DEST, "--quiet",
               "--set", "data.max_seq_len=5000"])
    err = "\n".join(line for line in capsys.readouterr().err.splitlines() if not line.startswith("training "))
    assert_one_line_error(rc, err, "data.max_seq_len: 5000 is more than the 1024 positions", "1024 or less")
    assert rc == 2 and Registry(root).list_versions(DEST) == []


def test_a_damaged_version_counter_is_found_before_training_and_gc_rebuilds_it(root: Path, tmp_path: Path, capsys):
    reg = Registry(root)
    reg.create_model("guard/counter")
    cfg = write_config(tmp_path / "c.yaml", max_steps=1)
    argv = ["--registry", str(root), "train", str(cfg), "--destination", "guard/counter", "--quiet"]
    assert main(argv) == 0
    capsys.readouterr()
    counter = reg.get_model("guard/counter").path / "next_version"
    counter.write_text("garbage\n")
    before = len(Trainings(reg).list())
    rc = main(argv)
    err = capsys.readouterr().err
    assert_one_line_error(rc, err, "next_version is damaged", "finetune registry gc")
    assert len(Trainings(reg).list()) == before  # refused before a record was even opened: nothing ran
    rc = main(["--registry", str(root), "registry", "gc"])
    out = capsys.readouterr().out
    assert rc == 0 and f"rebuilt {counter}" in out
    assert counter.read_text() == "2\n"
    assert main(argv) == 0 and capsys.readouterr().out.strip() == "guard/counter:2"


def test_resume_after_a_failed_publish_publishes_the_finished_adapter(root: Path, tmp_path: Path, capsys,
                                                                     monkeypatch: pytest.MonkeyPatch):
    import finetune.training.publishing as publishing
    from finetune.errors import IntegrityError

    reg = Registry(root)
    reg.create_model("guard/publish")
    cfg = write_config(tmp_path / "c.yaml", max_steps=3)
    real = publishing.publish_adapter

    def fail(*args, **kwargs):
        raise IntegrityError("the disk hiccuped")

    monkeypatch.setattr(publishing, "publish_adapter", fail)
    assert main(["--registry", str(root), "train", str(cfg), "--destination", "guard/publish", "--quiet"]) == 1
    monkeypatch.setattr(publishing, "publish_adapter", real)
    record = next(r for r in Trainings(reg).list() if r.destination == "guard/publish")
    assert record.status == "failed" and "hiccuped" in record.error
    paths = Trainings(reg).paths(record.id)
    rows_before = paths.metrics.read_text()
    capsys.readouterr()
    assert main(["--registry", str(root), "train", "--resume", record.id, "--quiet"]) == 0
    version = reg.resolve(capsys.readouterr().out.strip())
    assert version.ref == "guard/publish:1"
    assert paths.metrics.read_text() == rows_before  # not one step trained again
    assert "resumed from step-00000003 (step 3)" in paths.log.read_text()
    m = version.metadata["metrics"]
    assert m["steps"] == 3 and m["train_loss_steps"] == 3 and m["last_step_loss"] is not None


def test_a_local_folder_base_is_pinned_by_its_content(root: Path, tmp_path: Path, capsys, tiny_model_dir: Path):
    import shutil

    from safetensors.torch import load_file

    reg = Registry(root)
    base = tmp_path / "my-base"
    shutil.copytree(tiny_model_dir, base)
    reg.create_model("guard/local")
    cfg = write_config(tmp_path / "c.yaml", max_steps=1)
    assert main(["--registry", str(root), "train", str(cfg), "--destination", "guard/local", "--quiet",
                 "--set", f"base_model={base}"]) == 0
    ref = capsys.readouterr().out.strip()
    assert reg.resolve(ref).parent["sha256"]
    assert main(["--registry", str(root), "predict", ref, "hi", "--max-new-tokens", "2"]) == 0
    assert main(["--registry", str(root), "versions", "verify", ref]) == 0
    capsys.readouterr()

    weights = load_file(str(base / "model.safetensors"))  # another model of the same shape in its place
    save_file({k: v * 1.5 for k, v in weights.items()}, str(base / "model.safetensors"))
    rc = main(["--registry", str(root), "predict", ref, "hi", "--max-new-tokens", "2"])
    assert_one_line_error(rc, capsys.readouterr().err, "is not the model it was trained on", "original files")
    rc = main(["--registry", str(root), "versions", "verify", ref])
    out = capsys.readouterr().out
    assert rc == 1 and "is not the model it was trained on" in out


def test_a_last_step_that_diverges_publishes_nothing(root: Path, tmp_path: Path, capsys):
    cfg = write_config(tmp_path / "c.yaml", lr=1e30, max_steps=1)
    rc = main(["--registry", str(root), "train", str(cfg), "--destination", DEST, "--quiet"])
    err = "\n".join(line for line in capsys.readouterr().err.splitlines() if not line.startswith("training "))
    assert_one_line_error(rc, err, "after the last step (1", "train.lr")
    assert Registry(root).list_versions(DEST) == []


def test_a_run_that_stops_learning_ends_failed_saying_what_to_lower(root: Path, tmp_path: Path, capsys):
    reg = Registry(root)
    cfg = write_config(tmp_path / "c.yaml", max_steps=12, lr=1e3, batch_size=16)  # saturates the tiny model
    rc = main(["--registry", str(root), "train", str(cfg), "--destination", DEST, "--quiet"])
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("finetune: error:")]
    assert rc == 1 and out == "" and len(errors) == 1, err
    assert_one_line_error(None, errors[0], "steps", "lr", "the run publishes nothing", "lower train.lr (now 1000)")
    assert "gradients were all zero" in errors[0] or "the loss stayed at" in errors[0]
    assert reg.list_versions(DEST) == []
    record = next(r for r in Trainings(reg).list() if r.destination == DEST and r.input["train"]["lr"] == 1e3)
    assert record.status == "failed" and "lower train.lr" in record.error
    assert "publishes nothing" in Trainings(reg).paths(record.id).log.read_text()


def test_a_loss_that_sits_still_over_different_data_is_a_stall():
    from finetune.data.batching import Window
    from finetune.errors import TrainingStalledError
    from finetune.training.guards import STALL_STEPS, Stall

    norm = torch.tensor(0.5)
    same_rows = Stall()  # one batch holding the whole dataset: its loss may barely move at a small lr
    for step in range(1, 3 * STALL_STEPS):
        same_rows.step(step, 2.0, norm, Window(((1, 2), (3,)) if step % 2 else ((3,), (2, 1)), 9), 1e-6, 1e-6)
    stall = Stall()
    with pytest.raises(TrainingStalledError, match=f"stayed at 6.8013 for {STALL_STEPS} steps over different data"):
        for step in range(1, 3 * STALL_STEPS):
            stall.step(step, 6.80128 + 1e-7 * (step % 2), norm, Window(((step,),), 9), 1e3, 1e3)
    moving = Stall()
    for step in range(1, 3 * STALL_STEPS):
        moving.step(step, 3.0 - 0.01 * step, norm, Window(((step,),), 9), 1e-4, 1e-4)


def _private_tmpfs_works(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir()
    try:
        done = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs '{probe}'"],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("free_kb, checkpoint_every", [(150, 2), (150, 0), (350, 0)],
                         ids=["checkpoint", "final-save", "publish"])
def test_a_full_disk_ends_the_run_failed_in_one_line(tiny_model_dir: Path, tmp_path: Path, free_kb: int,
                                                      checkpoint_every: int):
    """A registry on its own small tmpfs (a private mount namespace), filled to ``free_kb`` before training: the
    run fails where the disk fills (a checkpoint, the final save or the publish), in one line that says so and
    how to go on, and its record says failed."""
    if not _private_tmpfs_works(tmp_path):
        pytest.skip("needs `unshare -rm` and tmpfs mounts in a private namespace")
    source = Registry(tmp_path / "registry")
    import_base(source, "local/tiny", str(tiny_model_dir))
    source.create_model(DEST)
    cfg = write_config(tmp_path / "c.yaml", max_steps=4, checkpoint_every=checkpoint_every)
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    script = f"""set -e
mount -t tmpfs -o size=8m tmpfs '{mnt}'
cp -a '{source.root}' '{mnt}/reg'
avail=$(df --output=avail -k '{mnt}' | tail -1)
fallocate -l $(( (avail - {free_kb}) * 1024 )) '{mnt}/filler'
rc=0
'{sys.executable}' -m finetune --registry '{mnt}/reg' train '{cfg}' --destination {DEST} --quiet \\
    > '{out}/stdout' 2> '{out}/stderr' || rc=$?
echo $rc > '{out}/rc'
cp -r '{mnt}/reg/trainings' '{out}/trainings'
ls '{mnt}/reg/models/guard/dest/versions' > '{out}/versions'
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    err = (out / "stderr").read_text()
    assert (out / "rc").read_text().strip() == "1" and (out / "stdout").read_text() == "", err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if not line.startswith("training ")]
    assert_one_line_error(None, "\n".join(errors), "free space", "--resume")
    assert "disk is full" in errors[0] or "ran out of space" in errors[0]
    (record,) = [json.loads(p.read_text()) for p in (out / "trainings").glob("*/record.json")]
    assert record["status"] == "failed" and "--resume" in record["error"]
    assert (out / "versions").read_text() == ""
