"""The registry's multi-process guarantees, with real processes: publishers SIGKILLed mid-publish, `gc` running
beside live publishers, and many concurrent publishers with and without the allocation lock.

These tests keep fsync on (the children inherit FINETUNE_FSYNC=1): they exercise the real publish path.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune.registry import Registry

pytestmark = pytest.mark.slow

CHILD_ENV = {**os.environ, "FINETUNE_FSYNC": "1"}


@pytest.fixture(autouse=True)
def _fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINETUNE_FSYNC", "1")  # this process's writes too (the suite turns fsync off)

# Publishes its source folder again and again until killed; says "ready" once imports are done so that the
# parent's random delay falls inside publishing, not inside interpreter start-up, and says how long each
# publish took so that the parent can wait for a completed one before killing.
LOOPING_PUBLISHER = r"""
import os, sys, time
from finetune.registry import Registry
reg = Registry(sys.argv[1])
print("ready", flush=True)
i = 0
while True:
    t0 = time.perf_counter()
    reg.publish("o/m", sys.argv[2], metadata={"pid": os.getpid(), "i": i})
    print(f"published {time.perf_counter() - t0:.6f}", flush=True)
    i += 1
"""

# One of several concurrent publishers: waits for "go" on stdin, publishes N versions whose payload names the
# writer, prints the numbers it got. With "nolock" the allocation lock is a no-op and the critical section is
# widened, so publishers do race for numbers and only rename-without-replace keeps them apart; "fallback"
# also disables renameat2 to exercise the portable rename path.
CONCURRENT_PUBLISHER = r"""
import contextlib, json, os, sys, time
from pathlib import Path
from finetune import atomic
from finetune.registry import Registry

root, workdir, writer, n, mode = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
collisions = 0
if "nolock" in mode:
    import finetune.registry.publish
    finetune.registry.publish.model_lock = lambda layout, model_dir: contextlib.nullcontext()
    slow_read_only = atomic.make_read_only
    def make_read_only(path):
        time.sleep(0.005)  # between taking a number and renaming: where a missing lock would bite
        slow_read_only(path)
    atomic.make_read_only = make_read_only
    real_rename = atomic.rename_noreplace
    def rename_noreplace(src, dst):
        global collisions
        try:
            real_rename(src, dst)
        except FileExistsError:
            collisions += 1
            raise
    atomic.rename_noreplace = rename_noreplace
if "fallback" in mode:
    atomic._RENAMEAT2 = None
reg = Registry(root)
print("ready", flush=True)
assert sys.stdin.readline() == "go\n"
numbers = []
for i in range(n):
    src = workdir / f"src-{i}"
    src.mkdir(parents=True)
    (src / "payload.txt").write_text(f"{writer} {i}")
    (src / "blob.bin").write_bytes(os.urandom(64 * 1024))
    numbers.append(reg.publish("o/m", src, metadata={"writer": writer, "i": i}).number)
print(json.dumps({"numbers": numbers, "collisions": collisions}), flush=True)
"""

# Creates a staging folder (as a training or publish in progress would) and holds it until stdin closes.
STAGING_HOLDER = r"""
import sys
from finetune.registry import Registry
print(Registry(sys.argv[1]).staging_dir("train-run"), flush=True)
sys.stdin.read()
"""


def _spawn(script: str, *args: str | Path, stdin: int | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=CHILD_ENV, text=True,
    )


def _assert_visible_state_is_clean(reg: Registry, verified: set[int]) -> set[int]:
    """Everything a reader can see is a complete version; returns the numbers seen (verifying new ones)."""
    versions = reg.list_versions("o/m")
    numbers = [v.number for v in versions]
    assert numbers == sorted(set(numbers), reverse=True)
    if versions:
        assert reg.latest("o/m") == versions[0] == reg.resolve("o/m:latest")
    else:
        assert reg.latest("o/m") is None
    for v in versions:
        assert reg.resolve(f"o/m:{v.number}") == v
        if v.number not in verified:
            assert reg.verify(v) == [], v.ref
            assert v.manifest["number"] == v.number
            verified.add(v.number)
    vdir = reg.root / "models" / "o" / "m" / "versions"
    assert all(p.name.isdigit() for p in vdir.iterdir()), sorted(p.name for p in vdir.iterdir())
    return set(numbers)


def test_sigkilled_publishers_never_leave_a_visible_partial_version(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry")
    reg.create_model("o/m")
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):  # ~6 MB: a publish takes tens of ms with fsync, long enough to be hit mid-way
        (src / f"shard-{i}.bin").write_bytes(os.urandom(2 << 20))
    (src / "params.json").write_text("{}")  # no config.json: a "files" version (a base is its model's only one)

    # Kill delays scale with this machine's publish time so that kills land before, inside and after publishes.
    t0 = time.perf_counter()
    reg.publish("o/m", src)
    publish_s = time.perf_counter() - t0

    rng = random.Random(20240611)
    verified: set[int] = set()
    kills_mid_publish = 0
    for round_ in range(25):
        leftovers_before = len(list((reg.root / ".staging").iterdir()))
        child = _spawn(LOOPING_PUBLISHER, reg.root, src)
        assert child.stdout.readline() == "ready\n", child.stderr.read()
        # Every third child is killed only after a publish of its own completed, whatever this machine's timing
        # (a child's first publish can be much slower than the parent's warm one): so killed publishers are
        # seen both to complete versions and to leave partial ones behind.
        if round_ % 3 == 2:
            line = child.stdout.readline()
            assert line.startswith("published "), line + child.stderr.read()
            publish_s = max(publish_s, float(line.split()[1]))
        time.sleep(rng.uniform(0.0, 2.5 * publish_s))
        child.send_signal(signal.SIGKILL)
        child.wait()
        stderr = child.stderr.read()
        child.stdout.close()
        child.stderr.close()
        assert child.returncode == -signal.SIGKILL, stderr  # it was killed, not crashed on its own
        if len(list((reg.root / ".staging").iterdir())) > leftovers_before:
            kills_mid_publish += 1
        _assert_visible_state_is_clean(reg, verified)

    # Most kills must land inside a publish, or this test proves nothing.
    assert kills_mid_publish >= 10, kills_mid_publish
    assert max(verified) > 1, "no killed publisher ever completed a publish"
    leftovers = set((reg.root / ".staging").iterdir())
    assert leftovers

    removed = set(reg.gc(older_than_hours=0))
    assert leftovers <= removed
    assert list((reg.root / ".staging").iterdir()) == [] and list((reg.root / ".trash").iterdir()) == []
    assert _assert_visible_state_is_clean(reg, set()) == verified  # gc removed no version, and all still verify
    # Numbers taken by killed publishes are skipped, never reused.
    v = reg.publish("o/m", src)
    assert v.number > max(verified) and reg.latest("o/m") == v


def test_gc_spares_live_publishers_and_their_staging(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry")
    reg.create_model("o/m")
    holder = _spawn(STAGING_HOLDER, reg.root, stdin=subprocess.PIPE)
    held = Path(holder.stdout.readline().strip())
    assert held.parent == reg.root / ".staging" and held.is_dir()

    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(os.urandom(256 * 1024))
    publisher = subprocess.Popen(
        [sys.executable, "-c",
         "import sys\nfrom finetune.registry import Registry\nr = Registry(sys.argv[1])\n"
         "for i in range(40):\n    r.publish('o/m', sys.argv[2], metadata={'i': i})\n",
         str(reg.root), str(src)],
        stderr=subprocess.PIPE, env=CHILD_ENV, text=True,
    )
    sweeps = 0
    while publisher.poll() is None:
        reg.gc(older_than_hours=0)  # as aggressive as gc gets: everything not owned by a live process
        sweeps += 1
    assert publisher.returncode == 0, publisher.stderr.read()
    publisher.stderr.close()
    assert sweeps > 10
    assert held.is_dir()
    versions = reg.list_versions("o/m")
    assert sorted(v.metadata["i"] for v in versions) == list(range(40))
    assert all(reg.verify(v) == [] for v in versions)

    holder.stdin.close()
    holder.wait()
    holder.stdout.close()
    holder.stderr.close()
    assert reg.gc(older_than_hours=0) == [held]
    assert not held.exists()


@pytest.mark.parametrize("mode", ["locked", "nolock", "nolock-fallback"])
def test_concurrent_publishers_get_unique_consecutive_numbers(tmp_path: Path, mode: str) -> None:
    writers, per_writer = 6, 10
    reg = Registry(tmp_path / "registry")
    reg.create_model("o/m")
    children = [
        _spawn(CONCURRENT_PUBLISHER, reg.root, tmp_path / f"w{w}", w, per_writer, mode, stdin=subprocess.PIPE)
        for w in range(writers)
    ]
    for c in children:
        assert c.stdout.readline() == "ready\n", c.stderr.read()
    for c in children:  # release them together
        c.stdin.write("go\n")
        c.stdin.flush()
    reports = []
    for c in children:
        out, err = c.communicate(timeout=120)
        assert c.returncode == 0, err
        reports.append(json.loads(out))

    total = writers * per_writer
    claimed = [n for r in reports for n in r["numbers"]]
    # No two publishers were told they got the same number, and the numbers are exactly 1..60.
    assert sorted(claimed) == list(range(1, total + 1))
    versions = reg.list_versions("o/m")
    assert [v.number for v in versions] == list(range(total, 0, -1))
    # Nothing lost or overwritten: every (writer, i) is there once, in the version its writer was told.
    seen = {}
    for v in versions:
        assert v.manifest["number"] == v.number
        assert reg.verify(v) == [], v.ref
        w, i = v.metadata["writer"], v.metadata["i"]
        assert (v.path / "payload.txt").read_text() == f"{w} {i}"  # the manifest describes these very bytes
        assert reports[w]["numbers"][i] == v.number
        seen[(w, i)] = v.number
    assert len(seen) == total
    assert list((reg.root / ".staging").iterdir()) == []
    if mode == "locked":
        assert reg.latest("o/m").number == total
        assert (reg.root / "models" / "o" / "m" / "next_version").read_text() == f"{total + 1}\n"
        assert all(r["collisions"] == 0 for r in reports)
    else:
        # The publishers really raced for numbers, and the rename refused to overwrite each time.
        assert sum(r["collisions"] for r in reports) > 0
