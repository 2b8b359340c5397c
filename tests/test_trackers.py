"""``train.report_to``: what TensorBoard, MLflow and W&B received, read back with their own readers (TensorBoard's
event accumulator, MLflow's client, the protobuf records of W&B's offline run file) and set against
``metrics.jsonl`` and the resolved config. Nothing here reaches a network: W&B runs offline, MLflow writes to the
registry's local store, and the W&B host probe is aimed at a closed port on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path

import pytest
from helpers import assert_one_line_error

from finetune.cli import main
from finetune.config import config_from_dict
from finetune.errors import ConfigError
from finetune.launch import free_port
from finetune.registry import Registry
from finetune.registry.sources import import_base
from finetune.tiny import sample_data_path
from finetune.training import train
from finetune.training.trackers import flat_config, wandb_mode


@pytest.fixture(scope="module")
def run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One training of alice/m reporting to all three trackers, 6 steps with an eval every 3."""
    root = tmp_path_factory.mktemp("trackers")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_FSYNC", "0")
        for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            mp.setenv(name, str(root / "wandb-home"))
        mp.setenv("WANDB_MODE", "offline")
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT", "WANDB_API_KEY"):
            mp.delenv(name, raising=False)
        reg = Registry(root / "registry")
        import_base(reg, "local/tiny", str(tiny_model_dir))
        config = config_from_dict({
            "base_model": "local/tiny:1", "data": {"path": str(sample_data_path()), "max_seq_len": 128, "eval": 0.1},
            "train": {"max_steps": 6, "batch_size": 4, "lr": 3e-3, "eval_every": 3,
                      "report_to": ["tensorboard", "mlflow", "wandb"]}})
        result = train(config, registry=reg, destination="alice/m", create_destination=True, progress=False)
    record = result.record
    paths = reg.training_paths(record.id)
    rows = [json.loads(line) for line in paths.metrics.read_text().splitlines()]
    yield {"reg": reg, "id": record.id, "paths": paths, "rows": rows, "record": record,
           "config": flat_config(config.to_dict())}


def _step_series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if key in r]


@pytest.mark.slow
def test_tensorboard_event_files_hold_every_logged_row(run: dict):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = run["paths"].trackers / "tensorboard" / "alice" / "m"
    events = EventAccumulator(str(folder))
    events.Reload()
    rows = run["rows"]
    assert len(rows) == 6 and sum("eval_loss" in r for r in rows) == 2
    for key in ("loss", "lr", "tokens", "tokens_per_s", "eval_loss"):
        got = [(e.step, e.value) for e in events.Scalars(key)]
        want = _step_series(rows, key)
        assert [s for s, _ in got] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)  # TensorBoard keeps float32
    final = events.Scalars("final/train_loss")
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in final] == [(6, run["record"].metrics["train_loss"])]
    # the resolved config, as TensorBoard's hparams plugin records it
    hparams = _tensorboard_hparams(folder)
    assert hparams["train.lr"] == pytest.approx(3e-3) and hparams["train.report_to"] == "tensorboard,mlflow,wandb"
    assert hparams["finetune.training_id"] == run["id"] and hparams["finetune.destination"] == "alice/m"


def _tensorboard_hparams(folder: Path) -> dict:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    for path in folder.rglob("events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == "_hparams_/session_start_info":
                    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    return {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
                            for k, v in data.session_start_info.hparams.items()}
    raise AssertionError("no hparams in the event files")


@pytest.mark.slow
def test_mlflow_local_store_holds_the_run_named_after_the_training(run: dict):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run['reg'].trackers_dir() / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("alice/m")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == run["id"] and found.info.status == "FINISHED"
    assert found.data.tags["finetune.training_id"] == run["id"]
    for key in ("loss", "lr", "tokens", "time_s", "eval_loss"):
        got = sorted((m.step, m.value) for m in client.get_metric_history(found.info.run_id, key))
        assert got == _step_series(run["rows"], key)
    params = found.data.params  # MLflow keeps parameters as strings
    keys = ("train.lr", "data.max_seq_len", "lora.target_modules", "train.max_grad_norm")
    assert {k: params[k] for k in keys} == {k: str(run["config"][k]) for k in keys}
    assert found.data.metrics["final/train_loss"] == pytest.approx(run["record"].metrics["train_loss"])


def _wandb_records(path: Path):
    """The protobuf records of a W&B run file: a 7-byte header (":W&B", magic, version), then LevelDB-style
    log blocks of 32 KiB holding chunks of (crc32c 4, length 2, type 1, payload)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            continue
        pending += payload
        if kind in (1, 4):  # FULL or LAST: a whole record
            yield wandb_internal_pb2.Record.FromString(pending)
            pending = b""


@pytest.mark.slow
def test_wandb_offline_run_file_holds_every_logged_row(run: dict):
    (run_file,) = (run["paths"].trackers / "wandb").glob(f"offline-run-*/run-{run['id']}.wandb")
    history: dict[int, dict] = {}
    config: dict = {}
    name = None
    for record in _wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(items["_step"], {}).update(items)
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "run":
            name = record.run.display_name
    assert name == run["id"]
    for key in ("loss", "lr", "tokens", "eval_loss"):
        got = [(step, values[key]) for step, values in sorted(history.items()) if key in values]
        assert got == _step_series(run["rows"], key)
    assert history[6]["final/train_loss"] == pytest.approx(run["record"].metrics["train_loss"])
    assert config["train.lr"] == 3e-3 and config["train.report_to"] == "tensorboard,mlflow,wandb"


@pytest.mark.slow
def test_the_log_says_where_each_tracker_writes_and_the_record_links_nowhere(run: dict):
    log = run["paths"].log.read_text()
    assert f"reporting to tensorboard: {run['paths'].trackers / 'tensorboard' / 'alice/m'}" in log
    assert "reporting to mlflow: sqlite:///" in log and f"run {run['id']}" in log
    assert "reporting to wandb: offline (WANDB_MODE)" in log
    assert "http" not in json.dumps(run["record"].output)


def test_wandb_goes_offline_without_a_key_or_a_reachable_host(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    assert wandb_mode({}) == ("offline", "no W&B API key (WANDB_API_KEY or `wandb login`)")
    port = free_port()  # a port that was free a moment ago: nothing listens there
    mode, why = wandb_mode({"WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": f"http://127.0.0.1:{port}"}, timeout=2)
    assert (mode, why) == ("offline", "127.0.0.1 is not reachable")
    with socket.create_server(("127.0.0.1", 0)) as server:
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        assert wandb_mode({"WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": url})[0] == "online"
    assert wandb_mode({"WANDB_MODE": "disabled"}) == ("disabled", "WANDB_MODE")


def test_report_to_is_checked_at_load(monkeypatch, tmp_path: Path, capsys):
    import importlib.util

    base = {"base_model": "x", "data": {"path": "d.jsonl"}}
    with pytest.raises(ConfigError, match=r"train.report_to: unknown tracker 'tensorbord' \(did you mean"):
        config_from_dict({**base, "train": {"report_to": ["tensorbord"]}})
    with pytest.raises(ConfigError, match="names a tracker twice"):
        config_from_dict({**base, "train": {"report_to": ["wandb", "wandb"]}})
    assert config_from_dict(base).train.report_to == []
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    config = tmp_path / "c.yaml"
    config.write_text("base_model: x\ndata:\n  path: d.jsonl\ntrain:\n  report_to: [tensorboard, wandb]\n")
    rc = main(["--registry", str(tmp_path / "reg"), "train", str(config), "--destination", "a/b"])
    assert_one_line_error(rc, capsys.readouterr().err, "line 5", "train.report_to", "pip install wandb")


@pytest.mark.slow
def test_a_failed_run_is_marked_failed_in_mlflow_at_mlflow_tracking_uri(tiny_model_dir: Path, tmp_path: Path,
                                                                        monkeypatch):
    from mlflow.tracking import MlflowClient

    import finetune.training.run as run_module

    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("FINETUNE_FSYNC", "0")
    reg = Registry(tmp_path / "registry")
    import_base(reg, "local/tiny", str(tiny_model_dir))

    def boom(*args, **kwargs):
        raise RuntimeError("the loop broke")

    monkeypatch.setattr(run_module, "train_loop", boom)
    config = config_from_dict({"base_model": "local/tiny:1", "data": {"path": str(sample_data_path())},
                               "train": {"max_steps": 2, "report_to": ["mlflow"]}})
    with pytest.raises(RuntimeError, match="the loop broke"):
        train(config, registry=reg, destination="alice/f", create_destination=True, progress=False)
    client = MlflowClient(tracking_uri=uri)
    (found,) = client.search_runs([client.get_experiment_by_name("alice/f").experiment_id])
    assert found.info.status == "FAILED" and found.data.params["train.max_steps"] == "2"
    assert not reg.trackers_dir().exists()  # MLFLOW_TRACKING_URI wins over the registry's local store
