#!/usr/bin/env python
"""Benchmark the registry at scale: 100,000 records (versions and prediction records), read with its index and
with a plain scan of the files, in the same run.

    python scripts/bench_registry.py                          # 100,000 records in a temporary registry
    python scripts/bench_registry.py --records 20000 --root /tmp/bench-reg --keep

The records are written quickly with the storage layer (``Registry.layout``, the manifest and record formats),
not by training nor by ``Registry.publish`` (which stages, hashes and fsyncs each version: hours for 50,000):
one model with half of them as versions (each a manifest naming a ~1 KB adapter file that is left out, since a
listing never reads it), the other half prediction records of 50 accounts, a few of them left "processing" as a
server that stopped leaves them, plus ``--trainings`` training records. ``--published`` more versions then go
through ``Registry.publish`` for real. No file is fsynced (FINETUNE_FSYNC=0, benchmark only).

Then it times, each as the median of ``--repeat`` runs (the fastest, and the median CPU time of this process,
beside it):

* ``finetune versions list MODEL`` (in-process CLI, every version, output discarded): plain scan
  (FINETUNE_INDEX=0: every manifest read), index cold (the index file removed first: this run builds it), index
  warm;
* the part of a server's start that reads records (PredictionService: settle interrupted predictions and learn
  every prediction's owner; the training queue and the webhook watcher: unfinished trainings), as main did it
  before the index (each prediction record read twice), with a plain scan (read once), index cold, index warm.
  The interrupted predictions are put back to "processing" before every run, so each run settles them;
* ``models list`` over ``--models`` small models, and ``latest``/``resolve`` (these never use the index);
* at the end, ``Registry.reindex()`` (rebuild everything) and the index's size.

Every file was just written, so the page cache is warm: the figures are CPU and system-call costs, not disk.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

MODEL = "bench/many-versions"
OWNERS = 50
INTERRUPTED = 10


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=100_000,
                   help="versions + prediction records to create, half each (default: 100000)")
    p.add_argument("--trainings", type=int, default=1000, help="training records to create (default: 1000)")
    p.add_argument("--models", type=int, default=200, help="small models for `models list` (default: 200)")
    p.add_argument("--published", type=int, default=20,
                   help="versions published through Registry.publish after the fast ones (default: 20)")
    p.add_argument("--root", type=Path, default=None, help="registry root (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the registry at the end")
    p.add_argument("--repeat", type=int, default=3, help="runs per timing (default: 3)")
    args = p.parse_args(argv)
    if args.records < 2 or args.repeat < 1:
        p.error("--records must be at least 2 and --repeat at least 1")
    return args


def _time(fn: Callable[[], object], repeat: int, before: Callable[[], object] | None = None
          ) -> tuple[float, float, float]:
    """(median, fastest) wall time and median CPU time (this process: user + system) of ``fn`` in seconds;
    ``before`` runs untimed before each run. On a shared machine the CPU time is the steadier figure."""
    runs, cpu = [], []
    for _ in range(repeat):
        if before is not None:
            before()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        runs.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(runs), min(runs), statistics.median(cpu)


def _fmt(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:8.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:8.1f} ms"
    return f"{seconds:8.2f} s "


# ---------------------------------------------------------------- writing records fast
def write_versions(reg, model: str, count: int) -> None:
    """``count`` versions of ``model`` written straight into its versions folder (manifest only, no fsync)."""
    from finetune import atomic
    from finetune.registry.manifest import FORMAT_VERSION, MANIFEST, manifest_id, software_versions, utc_now

    m = reg.get_model(model)
    layout = reg.layout
    layout.versions_dir(m.path).mkdir(exist_ok=True)
    start = reg.version_store.next_number(m.path)
    software = software_versions()
    for i in range(count):
        number = start + i
        manifest = {"format": FORMAT_VERSION, "model": model, "kind": "adapter",
                    "parent": {"hub_id": "bench/base", "revision": "0" * 40},
                    "metadata": {"metrics": {"train_loss": 1.0 / (number + 1)}}, "software": software,
                    "files": {"adapter_model.safetensors": {"size": 1024, "sha256": f"{number:064x}"},
                              "adapter_config.json": {"size": 27, "sha256": "0" * 64}},
                    "number": number, "created_at": utc_now()}
        manifest["id"] = manifest_id(manifest)
        folder = layout.version_dir(m.path, number)
        folder.mkdir()
        (folder / MANIFEST).write_bytes(atomic.pretty_json(manifest))
    atomic.replace_file(layout.counter(m.path), f"{start + count}\n".encode(), layout.staging)


def write_predictions(reg, count: int) -> list:
    """``count`` prediction records (no fsync, not indexed: as records a server wrote before the index); returns
    the few left "processing"."""
    from finetune import atomic
    from finetune.registry.jobs import RECORD, Status
    from finetune.registry.manifest import utc_now
    from finetune.registry.predictions import PredictionRecord, new_prediction_id

    interrupted = []
    for i in range(count):
        done = i >= INTERRUPTED
        record = PredictionRecord(
            id=new_prediction_id(), model=MODEL, version="0" * 64, version_ref=f"{MODEL}:1",
            owner=f"user{i % OWNERS}", status=Status.SUCCEEDED if done else Status.PROCESSING,
            input={"prompt": f"Write a haiku about the number {i}.", "max_new_tokens": 64},
            output=["An ", "answer ", f"{i}."] if done else None, logs="", metrics={"predict_time": 0.12},
            created_at=utc_now(), started_at=utc_now(), completed_at=utc_now() if done else None)
        folder = reg.job_dir("predictions", record.id)
        folder.mkdir(parents=True)
        (folder / RECORD).write_bytes(atomic.pretty_json(asdict(record)))
        if not done:
            interrupted.append(record)
    return interrupted


def write_trainings(reg, count: int) -> None:
    from finetune import atomic
    from finetune.registry.jobs import RECORD, Status, TrainingRecord
    from finetune.registry.manifest import utc_now

    for i in range(count):
        record = TrainingRecord(id=f"20260101-{i // 60:04d}{i % 60:02d}-{i:06x}", status=Status.SUCCEEDED,
                                model=f"{MODEL}:1", destination=MODEL, input={"train": {"lr": 1e-4}},
                                output={"version": f"{MODEL}:{i + 1}"}, created_at=utc_now())
        folder = reg.job_dir("trainings", record.id)
        folder.mkdir(parents=True)
        (folder / RECORD).write_bytes(atomic.pretty_json(asdict(record)))


# ---------------------------------------------------------------- what a server's start reads
def server_start_before(reg) -> dict:
    """Main before the index: PredictionService read every prediction record twice, the queue and the webhook
    watcher every training record."""
    from finetune.registry.jobs import FINAL, Status, Trainings
    from finetune.registry.manifest import utc_now
    from finetune.registry.predictions import Predictions

    records = Predictions(reg)
    for prediction_id in records.ids():
        record = records.get(prediction_id)
        if record.status not in FINAL:
            records.update(record, status=Status.FAILED, error="the server stopped while this prediction ran",
                           completed_at=utc_now())
    owners = {record_id: records.get(record_id).owner for record_id in records.ids()}
    for _ in range(2):  # the queue's recovery, then the webhook watcher
        [r for r in Trainings(reg).list() if r.status not in FINAL]
    return owners


def server_start_now(reg) -> dict:
    """What PredictionService, the queue's recovery and the webhook watcher read now."""
    from finetune.registry.jobs import Trainings
    from finetune.registry.predictions import Predictions

    _, owners = Predictions(reg).recover()
    for _ in range(2):
        Trainings(reg).unfinished()
    return owners


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    os.environ["FINETUNE_FSYNC"] = "0"  # read once, when finetune.atomic is imported
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from finetune import cli
    from finetune.atomic import pretty_json, remove_tree
    from finetune.registry import Registry
    from finetune.registry.jobs import RECORD

    temp = args.root is None
    root = Path(tempfile.mkdtemp(prefix="bench-registry-")) / "registry" if temp else args.root
    n_versions, n_predictions = args.records // 2, args.records - args.records // 2
    try:
        reg = Registry(root)
        if reg.has_models():
            raise SystemExit(f"{root} already holds a registry: give an empty --root")
        t0 = time.perf_counter()
        reg.create_model(MODEL, description="bench_registry.py")
        write_versions(reg, MODEL, n_versions)
        interrupted = write_predictions(reg, n_predictions)
        write_trainings(reg, args.trainings)
        for i in range(args.models):
            reg.create_model(f"bench/small-{i:04d}", description=f"small model {i}")
        wrote = time.perf_counter() - t0
        t0 = time.perf_counter()
        _publish(reg, args.published)
        published = time.perf_counter() - t0
        reg.catalog.drop()  # what was published noted itself: start with no index at all
        print(f"registry: {root}")
        print(f"wrote {n_versions:,} versions + {n_predictions:,} prediction records ({INTERRUPTED} left "
              f"'processing') + {args.trainings:,} training records + {args.models} models in {wrote:.1f} s; "
              f"published {args.published} more through Registry.publish in {published:.1f} s (fsync off)")
        total_versions = n_versions + args.published

        scan, indexed = Registry(root, index=False), Registry(root, index=True)
        sink = io.StringIO()

        def versions_list(index: bool) -> None:
            sink.seek(0)
            sink.truncate()
            os.environ["FINETUNE_INDEX"] = "1" if index else "0"
            try:
                with contextlib.redirect_stdout(sink):
                    rc = cli.main(["--registry", str(root), "versions", "list", MODEL])
            finally:
                os.environ.pop("FINETUNE_INDEX", None)
            assert rc == 0 and len(sink.getvalue().splitlines()) == total_versions + 1, sink.getvalue()[-500:]

        def interrupt_again() -> None:  # as a server that stopped leaves them (a new file: a new stamp)
            for record in interrupted:
                path = reg.job_dir("predictions", record.id) / RECORD
                tmp = path.with_name(RECORD + ".bench")
                tmp.write_bytes(pretty_json(asdict(record)))
                os.replace(tmp, path)

        def cold(fn: Callable[[], object]) -> Callable[[], object]:
            def run() -> object:
                indexed.catalog.drop()
                return fn()
            return run

        expected_owners = server_start_now(scan)
        assert len(expected_owners) == n_predictions

        def check(fn: Callable[[], dict]) -> Callable[[], object]:
            def run() -> object:
                owners = fn()
                assert owners == expected_owners
                return owners
            return run

        rows = [
            (f"versions list ({total_versions:,} versions), plain scan", lambda: versions_list(False), None),
            ("versions list, index cold (builds it)", cold(lambda: versions_list(True)), None),
            ("versions list, index warm", lambda: versions_list(True), None),
            (f"server start records ({n_predictions:,} predictions, {args.trainings:,} trainings), main before",
             check(lambda: server_start_before(scan)), interrupt_again),
            ("server start records, plain scan", check(lambda: server_start_now(scan)), interrupt_again),
            ("server start records, index cold (builds it)", check(cold(lambda: server_start_now(indexed))),
             interrupt_again),
            ("server start records, index warm", check(lambda: server_start_now(indexed)), interrupt_again),
            (f"models list ({args.models + 1} models), plain scan", lambda: scan.list_models(), None),
            ("models list, index warm", lambda: indexed.list_models(), None),
            ("latest (never lists the folder)", lambda: indexed.latest(MODEL), None),
            ("resolve(':1')", lambda: indexed.resolve(f"{MODEL}:1"), None),
        ]
        print(f"\n{'operation':<92}{'median':>12}{'fastest':>12}{'cpu':>12}")
        for name, fn, before in rows:
            med, best, cpu = _time(fn, args.repeat, before)
            print(f"{name:<92}{_fmt(med):>12}{_fmt(best):>12}{_fmt(cpu):>12}", flush=True)
        t0 = time.perf_counter()
        entries = indexed.reindex()
        took = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in reg.layout.index_file.parent.iterdir())
        print(f"\nRegistry.reindex() (everything, from the folders): {took:.2f} s; index "
              f"{reg.layout.index_file}: {size / 2**20:.1f} MiB, {entries:,} entries")
    finally:
        if temp and not args.keep:
            remove_tree(root.parent)  # version folders may be read-only: plain rmtree fails for non-root users
        elif temp:
            print(f"kept {root}")
    return 0


def _publish(reg, count: int) -> None:
    """``count`` versions through Registry.publish: the real write path (it notes each in the index)."""
    import shutil

    import numpy as np
    from safetensors.numpy import save_file

    src = Path(tempfile.mkdtemp(prefix="bench-src-"))
    try:
        (src / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
        for i in range(count):
            save_file({"w": np.full(240, float(i), dtype=np.float32)}, str(src / "adapter_model.safetensors"))
            reg.publish(MODEL, src, parent={"hub_id": "bench/base", "revision": "0" * 40},
                        metadata={"metrics": {"train_loss": 1.0 / (i + 1)}})
    finally:
        shutil.rmtree(src)


if __name__ == "__main__":
    sys.exit(main())
