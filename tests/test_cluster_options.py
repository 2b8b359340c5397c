"""The cluster's parts that need no cluster: ``finetune serve --executor ray``'s options and errors, the
``train.processes`` key, and where the web page and the API say a training ran.

The trainings themselves on a real Ray cluster are tests/test_cluster.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_one_line_error

from finetune.cli import main
from finetune.config import load_config
from finetune.errors import ConfigError
from finetune.registry import Registry
from finetune.registry.jobs import TrainingRecord, Trainings
from finetune.tiny import sample_data_path

PLACEMENT = {"executor": "ray", "actor": "train-0a1b2c3d4e5f", "attempts": 2, "max_attempts": 3, "host": "gpu-2",
             "node_id": "5553a15e" + "0" * 48, "nodes": [{"host": "gpu-2", "node_id": "5553a15e" + "0" * 48}],
             "lost": [{"host": "gpu-1", "node_id": "090176a9" + "1" * 48, "attempt": 1, "why": "node lost"}]}


def test_executor_ray_without_ray_says_what_to_install(tmp_path: Path):
    # Ray is part of the test extras; a Python that cannot import it stands for an install without it.
    code = ("import sys; sys.modules['ray'] = None; from finetune.cli import main; "
            f"sys.exit(main(['--registry', {str(tmp_path / 'r')!r}, 'serve', '--executor', 'ray']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert_one_line_error(None, proc.stderr, "--executor ray needs Ray", "pip install 'finetune[ray]'")


@pytest.mark.parametrize("args, needle", [
    (["--ray-address", "10.0.0.1:6379"], "--ray-address needs --executor ray"),
    (["--max-retries", "1", "--warm-actors", "0"], "--max-retries, --warm-actors need --executor ray"),
    (["--executor", "ray", "--ray-resource", "CPU=2"], "CPU has its own option"),
    (["--executor", "ray", "--ray-resource", "trainer"], "expected NAME=AMOUNT"),
    (["--executor", "ray", "--ray-resource", "trainer=0"], "must be more than 0"),
    (["--executor", "ray", "--max-retries", "-1"], "--max-retries must be 0 or more"),
    (["--executor", "ray", "--gpus-per-training", "0"], "--gpus-per-training must be 1 or more"),
    (["--executor", "ray", "--cpus-per-process", "0"], "--cpus-per-process must be more than 0"),
    (["--predict-cpus", "1"], "--predict-cpus needs --predict-executor ray"),
    (["--executor", "ray", "--predict-ray-resource", "predictor=1"], "--predict-ray-resource needs --predict-executor"),
    (["--predict-executor", "ray", "--predict-ray-resource", "CPU=1"], "--predict-ray-resource 'CPU=1': CPU has its"),
    (["--predict-executor", "ray", "--predict-ray-resource", "predictor"], "expected NAME=AMOUNT"),
    (["--predict-executor", "ray", "--predict-cpus", "-1"], "--predict-cpus must be 0 or more"),
    (["--predict-executor", "ray", "--predict-gpus", "-1"], "--predict-gpus must be 0 or more"),
])
def test_serve_refuses_bad_cluster_options(tmp_path: Path, capsys: pytest.CaptureFixture[str], args, needle):
    pytest.importorskip("ray")
    rc = main(["--registry", str(tmp_path / "r"), "serve", *args])  # refused before joining any cluster
    assert rc == 2
    assert_one_line_error(rc, capsys.readouterr().err, needle)


def test_predict_executor_ray_without_ray_says_what_to_install(tmp_path: Path):
    code = ("import sys; sys.modules['ray'] = None; from finetune.cli import main; "
            f"sys.exit(main(['--registry', {str(tmp_path / 'r')!r}, 'serve', '--predict-executor', 'ray']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert_one_line_error(None, proc.stderr, "--predict-executor ray needs Ray", "pip install 'finetune[ray]'")


def test_the_server_imports_no_ray_until_asked():
    code = ("import sys, finetune.cli.serve, finetune.app, finetune.cluster.executor, "
            "finetune.cluster.inference; print('ray' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False False", out.stderr


def test_train_processes_is_a_checked_config_key(tmp_path: Path):
    path = tmp_path / "train.yaml"
    path.write_text("base_model: local/tiny:1\ndata:\n  path: rows.jsonl\ntrain:\n  processes: 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert any(p.startswith("line 5: train.processes") for p in info.value.problems), info.value.problems
    assert load_config(path, ["train.processes=2"]).train.processes == 2
    path.write_text("base_model: local/tiny:1\ndata:\n  path: rows.jsonl\ntrain:\n  num_processes: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "train.processes" in str(info.value)  # the did-you-mean


def test_a_run_with_fewer_processes_than_its_config_asks_is_refused(tmp_path: Path, tiny_model_dir: Path,
                                                                     capsys: pytest.CaptureFixture[str]):
    from finetune.registry.sources import import_base

    reg = Registry(tmp_path / "registry")
    import_base(reg, "local/tiny", str(tiny_model_dir))
    config = tmp_path / "train.yaml"
    config.write_text(f"base_model: local/tiny:1\ndata:\n  path: {sample_data_path()}\ntrain:\n  max_steps: 1\n")
    rc = main(["--registry", str(reg.root), "train", str(config), "--destination", "a/b", "--create-destination",
               "--quiet", "--set", "train.processes=2"])
    assert_one_line_error(rc, capsys.readouterr().err, "train.processes is 2, but this run has 1 process",
                          "python -m finetune.launch --num-processes 2", "--executor ray")
    assert Trainings(reg).list() == []  # refused before a record was written


def test_the_training_page_and_the_api_say_where_it_ran(live_server):
    from test_web import sign_in

    reg = live_server.registry
    reg.create_model("alice/m")
    placed = Trainings(reg).create(TrainingRecord(id="20260101-000000-aaaaaa", destination="alice/m", source="api",
                                                  status="processing", placement=PLACEMENT))
    local = Trainings(reg).create(TrainingRecord(id="20260101-000000-bbbbbb", destination="alice/m", source="api",
                                                 status="succeeded"))
    client, _ = sign_in(live_server)
    where = "gpu-2 (node 5553a15e), attempt 2 of 3; lost gpu-1 (node 090176a9): node lost"
    page = client.get(f"/trainings/{placed.id}").text
    assert f'<dt>Ran on</dt><dd id="t-where">{where}</dd>' in page
    assert client.get(f"/trainings/{placed.id}/live").json()["where"] == where
    assert '<dd id="t-where">–</dd>' in client.get(f"/trainings/{local.id}").text
    api = live_server.http("alice").get(f"/v1/trainings/{placed.id}").json()
    assert api["placement"] == PLACEMENT
