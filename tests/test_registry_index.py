"""The registry's index (registry.catalog) and its layers: the index is never the truth, and storage never imports
the training records.

Listings read unchanged entries from the index instead of their files; a file changed by anyone (with the index
or without it) is read again; a missing, damaged or locked index costs only speed; storage modules build no path
of their own and never import what lies above them.
"""

from __future__ import annotations

import ast
import json
import os
import sqlite3
from pathlib import Path

import pytest

from finetune.errors import IntegrityError
from finetune.registry import Registry, catalog, manifest, versions
from finetune.registry.jobs import Status, TrainingRecord, Trainings
from finetune.registry.predictions import PredictionRecord, Predictions

REGISTRY = Path(__file__).resolve().parents[1] / "finetune" / "registry"


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    r = Registry(tmp_path / "registry")
    r.create_model("o/m")
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / "weights.txt").write_text(f"payload {i}")
        r.publish("o/m", src, kind="files")
    return r


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    reads: list[Path] = []
    real = manifest.read_manifest

    def counting(path: Path) -> dict:
        reads.append(Path(path))
        return real(path)

    monkeypatch.setattr(versions, "read_manifest", counting)
    monkeypatch.setattr(manifest, "read_manifest", counting)
    return reads


def _listing(reg: Registry) -> list[tuple[int, str]]:
    return [(v.number, v.id) for v in reg.list_versions("o/m", manifests=True)]


def test_a_listing_reads_only_the_manifests_the_index_does_not_know(reg: Registry, monkeypatch) -> None:
    scan = _listing(Registry(reg.root, index=False))
    reads = _count_reads(monkeypatch)
    assert _listing(reg) == scan and reads == []  # publishing noted each version, after its commit
    reg.layout.index_file.unlink()  # the index may go at any time: the next listing reads and rebuilds it
    assert _listing(reg) == scan and len(reads) == 3
    reads.clear()
    assert _listing(reg) == scan and reads == []


def test_a_manifest_changed_after_it_was_indexed_is_read_again(reg: Registry) -> None:
    _listing(reg)
    path = reg.resolve("o/m:2").path
    os.chmod(path, 0o755)
    (path / "manifest.json").write_text("{not json")  # by hand, in place: no index hears of it
    listed = reg.list_versions("o/m", manifests=True)
    assert [v.number for v in listed] == [3, 2, 1]
    with pytest.raises(IntegrityError, match="not valid JSON"):
        listed[1].manifest  # listed, and damaged as it is on disk


def test_a_deleted_version_leaves_the_listing_and_the_index(reg: Registry) -> None:
    _listing(reg)
    reg.delete_version("o/m:2")
    assert [n for n, _ in _listing(reg)] == [3, 1]
    db = sqlite3.connect(reg.layout.index_file)
    assert sorted(k for (k,) in db.execute("SELECT key FROM entries WHERE kind = 'version'")) == ["1", "3"]
    db.close()


@pytest.mark.parametrize("garbage", [b"", b"this is not a database" * 100, b"SQLite format 3\x00" + b"\xff" * 5000])
def test_a_damaged_index_is_replaced_and_never_an_error(reg: Registry, garbage: bytes) -> None:
    scan = _listing(Registry(reg.root, index=False))
    reg.layout.index_file.write_bytes(garbage)
    for name in ("-wal", "-shm"):
        Path(str(reg.layout.index_file) + name).unlink(missing_ok=True)
    assert _listing(reg) == scan
    assert reg.catalog.count() == 3  # rebuilt by that listing


def test_a_locked_index_falls_back_to_reading_the_files(reg: Registry, monkeypatch) -> None:
    monkeypatch.setattr(catalog, "BUSY_TIMEOUT_S", 0.05)
    scan = _listing(Registry(reg.root, index=False))
    reg.catalog.drop()
    holder = sqlite3.connect(reg.layout.index_file, isolation_level=None)
    holder.execute("PRAGMA journal_mode=DELETE")  # (in WAL mode, a writer never blocks readers)
    holder.execute("BEGIN EXCLUSIVE")  # another process holds it for longer than the timeout
    holder.execute("CREATE TABLE busy (x)")
    try:
        reads = _count_reads(monkeypatch)
        assert _listing(reg) == scan and len(reads) == 3
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_reindex_rebuilds_everything_from_the_folders(reg: Registry) -> None:
    Predictions(reg).create(PredictionRecord(id="20260101-000000-000000-aaaaaa", owner="o",
                                             status=Status.SUCCEEDED))
    reg.layout.index_file.unlink()
    assert reg.reindex() == 1 + 3 + 1  # the model, its versions, the prediction


def test_a_server_start_reads_only_the_records_that_did_not_end(reg: Registry, monkeypatch) -> None:
    preds = Predictions(reg)
    for i in range(5):
        status = Status.PROCESSING if i == 4 else Status.SUCCEEDED
        preds.create(PredictionRecord(id=f"20260101-00000{i}-000000-aaaaaa", owner=f"u{i % 2}", status=status))
    reg.layout.index_file.unlink()  # records written before the index existed
    assert Predictions(reg).owners() == {f"20260101-00000{i}-000000-aaaaaa": f"u{i % 2}" for i in range(5)}
    read: list[str] = []
    real_get = Predictions.get

    def counting_get(self, record_id: str):
        read.append(record_id)
        return real_get(self, record_id)

    monkeypatch.setattr(Predictions, "get", counting_get)
    assert Predictions(reg).settle_interrupted() == ["20260101-000004-000000-aaaaaa"]
    assert read == ["20260101-000004-000000-aaaaaa"]  # the ended ones came from the index
    read.clear()
    assert len(Predictions(reg).owners()) == 5 and read == []
    assert Predictions(Registry(reg.root, index=False)).get("20260101-000004-000000-aaaaaa").status == "failed"


def test_a_training_resumed_by_a_process_without_the_index_is_seen_unfinished(reg: Registry) -> None:
    trainings = Trainings(reg)
    record = trainings.create(TrainingRecord(id="20260101-000000-abcdef", status=Status.FAILED, destination="o/m"))
    assert trainings.unfinished() == []
    other = Trainings(Registry(reg.root, index=False))  # FINETUNE_INDEX=0, or an older finetune
    other.update(other.get(record.id), status=Status.STARTING)
    assert [r.id for r in trainings.unfinished()] == [record.id]


def test_model_listings_go_through_the_index_and_see_changes(reg: Registry) -> None:
    reg.create_model("o/other", description="first")
    assert [m.full_name for m in reg.list_models()] == ["o/m", "o/other"]
    Registry(reg.root, index=False).update_model("o/other", description="second")
    assert [m.description for m in reg.list_models()] == ["", "second"]


def test_reading_a_registry_that_does_not_exist_creates_nothing(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "never-created")
    assert reg.list_models() == [] and Predictions(reg).owners() == {} and not reg.root.exists()


WRITER = r"""
import sys
from finetune.registry import Registry
from finetune.registry.jobs import Status
from finetune.registry.predictions import PredictionRecord, Predictions
reg = Registry(sys.argv[1])
records = Predictions(reg)
for i in range(40):
    status = Status.PROCESSING if i % 2 else Status.SUCCEEDED
    records.create(PredictionRecord(id=f"20260101-000000-{i:06d}-{sys.argv[2]}", owner=sys.argv[2], status=status))
    if i % 5 == 0:
        records.owners()  # a reader that fills the index while the others write it
"""


def test_several_processes_write_the_index_at_once(reg: Registry) -> None:
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REGISTRY.parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(reg.root), f"w{n}"], env=env) for n in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    truth = Predictions(Registry(reg.root, index=False)).summaries()
    assert len(truth) == 120 and Predictions(reg).summaries() == truth
    assert sqlite3.connect(reg.layout.index_file).execute("PRAGMA integrity_check").fetchone() == ("ok",)


# ---------------------------------------------------------------- layers
STORAGE = ("layout", "disk", "catalog", "models", "versions", "deletion", "publish", "gc", "repair", "manifest",
           "aliases", "hashes", "weights")
ABOVE_STORAGE = {"jobs", "predictions", "policy", "store", "accounts", "files", "sources", "lineage", "summary"}


def _imports(module: str) -> set[str]:
    """The modules of finetune.registry that ``module`` imports at run time (anywhere, functions included)."""
    tree = ast.parse((REGISTRY / f"{module}.py").read_text())
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                 and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and id(node) not in type_only:
            out.update([node.module] if node.module else [a.name for a in node.names])
    return out


@pytest.mark.parametrize("module", STORAGE)
def test_storage_never_imports_what_lies_above_it(module: str) -> None:
    assert _imports(module) & ABOVE_STORAGE == set()


def test_training_records_import_no_registry_facade() -> None:
    assert "store" not in _imports("jobs") and "store" not in _imports("policy")


def test_only_the_layout_builds_paths_under_the_root() -> None:
    for path in REGISTRY.glob("*.py"):
        if path.name == "layout.py":
            continue
        text = path.read_text()
        for needle in ("root / ", "self.root /", '/ "models"', '/ "versions"', '"next_version"', '"aliases.json"',
                       '/ ".staging"', '/ ".trash"', '"server.json"'):
            assert needle not in text, f"{path.name} builds a registry path itself: {needle!r}"


def test_no_registry_module_is_over_400_lines() -> None:
    long = {p.name: n for p in REGISTRY.glob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def test_the_index_is_derived_data_under_the_cache(reg: Registry) -> None:
    _listing(reg)
    assert reg.layout.index_file.is_relative_to(reg.root / "cache")
    rows = sqlite3.connect(reg.layout.index_file).execute("SELECT kind, key, value FROM entries").fetchall()
    assert {(kind, key) for kind, key, _ in rows} >= {("version", "1"), ("version", "2"), ("version", "3")}
    assert all(json.loads(value)["model"] == "o/m" for kind, _, value in rows if kind == "version")
