"""The registry's guarantees, through its Python API: publish, integrity, names, aliases, deletion, latest, gc.

Crash and multi-process guarantees live in test_registry_stress.py; the command line in test_registry_cli.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
from pathlib import Path

import pytest
from helpers import snapshot

from finetune import atomic, names
from finetune.errors import (
    AlreadyExistsError,
    AmbiguousRefError,
    ConflictError,
    IntegrityError,
    InvalidNameError,
    InvalidRefError,
    ModelNotFoundError,
    NotFoundError,
    RegistryAccessError,
    UsageError,
    VersionNotFoundError,
)
from finetune.names import NAME_PATTERN, check_name, parse_ref
from finetune.registry import MANIFEST, Registry, Version, manifest_id
from finetune.registry.versions import Versions

HUB = {"hub_id": "o/base", "revision": "0" * 40}  # an adapter's parent outside the registry
FILES = {
    "params.json": b'{"model_type": "llama"}',  # no config.json: a plain "files" version, of which a model holds many
    "weights.bin": bytes(range(256)) * 64,
    "tok/vocab.txt": b"a\nb\nc\n",
}


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


def make_src(path: Path, files: dict[str, bytes] = FILES) -> Path:
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    return path


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return make_src(tmp_path / "src")


@pytest.fixture
def v1(reg: Registry, src: Path) -> Version:
    reg.create_model("o/m")
    return reg.publish("o/m", src, metadata={"note": "first"})


def publish_n(reg: Registry, tmp_path: Path, model: str, n: int) -> list[Version]:
    out = []
    for i in range(n):
        d = make_src(tmp_path / f"src-{model.replace('/', '_')}-{i}", {"f.txt": f"{model} {i}".encode()})
        out.append(reg.publish(model, d, metadata={"i": i}))
    return out


def make_writable(path: Path) -> None:
    """Undo the read-only bits of a published version so a test can damage it (root ignores them anyway)."""
    for dirpath, _, filenames in os.walk(path):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(Path(dirpath) / name, 0o644)


# ------------------------------------------------------------------ publish
def test_publish_writes_a_complete_read_only_version(reg: Registry, src: Path, v1: Version) -> None:
    assert (v1.number, v1.ref) == (1, "o/m:1")
    assert v1.path == reg.root / "models" / "o" / "m" / "versions" / "1"
    m = v1.manifest
    assert m["id"] == v1.id == manifest_id(m)
    assert (m["model"], m["number"], m["kind"], m["metadata"]) == ("o/m", 1, "files", {"note": "first"})
    assert m["files"] == {
        rel: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for rel, data in FILES.items()
    }
    for rel, data in FILES.items():
        assert (v1.path / rel).read_bytes() == data
    # Read-only by mode bits: no write bit on any file or folder of the version.
    for dirpath, _, filenames in os.walk(v1.path):
        assert stat.S_IMODE(os.stat(dirpath).st_mode) == 0o555, dirpath
        for name in filenames:
            assert stat.S_IMODE(os.stat(Path(dirpath) / name).st_mode) == 0o444, name
    # Nothing left behind in the work areas, and the source is untouched.
    assert list((reg.root / ".staging").iterdir()) == []
    assert snapshot(src) == snapshot(make_src(src.parent / "again"))
    assert reg.verify(v1) == [] and reg.verify("o/m:1") == []
    reg.check(v1)


def test_publish_syncs_its_writes_unless_fsync_is_turned_off(reg: Registry, src: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Durability is the default; FINETUNE_FSYNC=0 (read at each write) turns it off."""
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    reg.create_model("o/off")
    reg.create_model("o/on")
    reg.publish("o/off", src)
    assert synced == []
    monkeypatch.delenv("FINETUNE_FSYNC")
    reg.publish("o/on", src)
    assert len(synced) >= len(FILES) + 1  # each file, the manifest and the folders that name them


def test_versions_are_numbered_listed_newest_first_and_resolved(reg: Registry, src: Path, v1: Version) -> None:
    v2 = reg.publish("o/m", src, parent=v1)
    v3 = reg.publish("o/m", src, parent="o/m:2", kind="adapter")
    assert [v.number for v in reg.list_versions("o/m")] == [3, 2, 1]
    assert reg.latest("o/m") == v3 == reg.resolve("o/m") == reg.resolve("o/m:latest")
    assert reg.resolve("o/m:2") == v2
    assert reg.resolve(f"o/m:{v1.id[:8]}") == v1
    assert reg.resolve(f"o/m:{v2.id}") == v2
    assert v3.parent == {"ref": "o/m:2", "id": v2.id} and v3.kind == "adapter"
    assert reg.children(v2) == [v3]
    # Same files, different parent and number: the id covers the whole manifest, not only the bytes.
    assert len({v1.id, v2.id, v3.id}) == 3


def test_kind_is_detected_from_the_files(reg: Registry, tmp_path: Path) -> None:
    reg.create_model("o/m")
    adapter = reg.publish("o/m", make_src(tmp_path / "a", {"adapter_config.json": b"{}", "w": b"1"}), parent=HUB)
    plain = reg.publish("o/m", make_src(tmp_path / "p", {"notes.txt": b"1"}))
    assert (adapter.kind, plain.kind) == ("adapter", "files")


def test_publish_refuses_bad_sources_and_leaves_the_registry_unchanged(reg: Registry, tmp_path: Path) -> None:
    reg.create_model("o/m")
    before = snapshot(reg.root)
    (tmp_path / "a-file").write_bytes(b"x")
    with_manifest = make_src(tmp_path / "wm", {MANIFEST: b"{}", "w": b"1"})
    with pytest.raises(NotFoundError, match="does not exist"):
        reg.publish("o/m", tmp_path / "missing")
    with pytest.raises(NotFoundError, match="not a folder"):
        reg.publish("o/m", tmp_path / "a-file")
    with pytest.raises(UsageError, match="written by the registry"):
        reg.publish("o/m", with_manifest)
    with pytest.raises(ModelNotFoundError):
        reg.publish("o/other", with_manifest)
    assert snapshot(reg.root) == before


def test_publish_refuses_what_it_would_silently_drop_or_choke_on(reg: Registry, tmp_path: Path) -> None:
    reg.create_model("o/m")
    real = make_src(tmp_path / "real", {"inner.bin": b"data"})
    with_dir_link = make_src(tmp_path / "dl", {"a.txt": b"a"})
    os.symlink(real, with_dir_link / "linked")
    with_dangling = make_src(tmp_path / "dg", {"a.txt": b"a"})
    os.symlink(tmp_path / "nowhere", with_dangling / "gone.bin")
    with_file_link = make_src(tmp_path / "fl", {"a.txt": b"a"})
    os.symlink(real / "inner.bin", with_file_link / "w.bin")
    with pytest.raises(UsageError, match="link to a folder"):
        reg.publish("o/m", with_dir_link)
    with pytest.raises(UsageError, match="not a regular file"):
        reg.publish("o/m", with_dangling)
    assert reg.list_versions("o/m") == [] and list((reg.root / ".staging").iterdir()) == []
    v = reg.publish("o/m", with_file_link)  # a link to a file is copied as the file's bytes
    assert (v.path / "w.bin").read_bytes() == b"data" and not (v.path / "w.bin").is_symlink()


def test_create_model_twice(reg: Registry) -> None:
    m = reg.create_model("o/m", description="d", visibility="public", hardware="cpu")
    with pytest.raises(AlreadyExistsError, match="already exists"):
        reg.create_model("o/m")
    assert reg.create_model("o/m", exist_ok=True).to_dict() == m.to_dict()
    assert [x.full_name for x in reg.list_models()] == ["o/m"]
    with pytest.raises(UsageError, match="visibility"):
        reg.create_model("o/n", visibility="secret")


# ------------------------------------------------------------------ integrity
def _flip_byte(v: Version) -> None:
    p = v.path / "weights.bin"
    data = bytearray(p.read_bytes())
    data[100] ^= 0x01
    p.write_bytes(bytes(data))


def _truncate(v: Version) -> None:
    with open(v.path / "weights.bin", "r+b") as f:
        f.truncate(1000)


def _remove_file(v: Version) -> None:
    (v.path / "tok" / "vocab.txt").unlink()


def _add_file(v: Version) -> None:
    (v.path / "tok" / "extra.bin").write_bytes(b"smuggled")


def _manifest_not_json(v: Version) -> None:
    (v.path / MANIFEST).write_bytes((v.path / MANIFEST).read_bytes()[:-20])


def _manifest_tampered(v: Version) -> None:
    m = json.loads((v.path / MANIFEST).read_bytes())
    m["metadata"]["note"] = "rewritten"  # still valid JSON, but no longer what the id was computed from
    (v.path / MANIFEST).write_text(json.dumps(m))


def _manifest_size_lie(v: Version) -> None:
    m = json.loads((v.path / MANIFEST).read_bytes())
    m["files"]["weights.bin"]["size"] += 1
    (v.path / MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize(
    "damage, expected, cheap_check_catches",
    [
        (_flip_byte, "weights.bin: sha256 differs", True),  # same size: only a hash sees it (cached by stat stamp)
        (_truncate, "weights.bin: size 1000 bytes", True),
        (_remove_file, "tok/vocab.txt: missing", True),
        (_add_file, "tok/extra.bin: extra file", False),
        (_manifest_not_json, "not valid JSON", True),
        (_manifest_tampered, "does not match its id", True),
        (_manifest_size_lie, "does not match its id", True),
    ],
    ids=["flipped-byte", "truncated", "missing-file", "extra-file", "manifest-invalid-json",
         "manifest-tampered", "manifest-size-lie"],
)
def test_verify_and_check_detect_damage(reg: Registry, v1: Version, damage, expected, cheap_check_catches) -> None:
    assert reg.verify(v1) == []
    make_writable(v1.path)
    damage(v1)
    fresh = reg.resolve("o/m:1")  # a new Version object: nothing cached from before the damage
    problems = reg.verify(fresh)
    assert any(expected in p for p in problems), problems
    if cheap_check_catches:
        with pytest.raises(IntegrityError, match="o/m:1 is damaged"):
            reg.check(fresh)


def test_damaged_manifest_is_an_integrity_error_on_use(reg: Registry, v1: Version) -> None:
    make_writable(v1.path)
    _manifest_not_json(v1)
    with pytest.raises(IntegrityError, match="not valid JSON"):
        reg.resolve("o/m:1").id
    (v1.path / MANIFEST).write_text('{"id": "x"}')
    with pytest.raises(IntegrityError, match="lacks required fields"):
        reg.resolve("o/m:1").manifest
    (v1.path / MANIFEST).unlink()
    assert reg.verify("o/m:1") == [f"{v1.path / MANIFEST} is missing"]


def test_verify_never_reads_outside_the_version(reg: Registry, v1: Version, tmp_path: Path) -> None:
    (tmp_path / "outside").write_bytes(b"secret")
    make_writable(v1.path)
    m = json.loads((v1.path / MANIFEST).read_bytes())
    m["files"]["../../../../../outside"] = {"size": 6, "sha256": hashlib.sha256(b"secret").hexdigest()}
    m["files"]["weights.bin"] = "not a mapping"
    m["id"] = manifest_id(m)
    (v1.path / MANIFEST).write_text(json.dumps(m))
    problems = reg.verify("o/m:1")
    assert "../../../../../outside: malformed manifest entry" in problems
    assert "weights.bin: malformed manifest entry" in problems


# ------------------------------------------------------------------ names
HOSTILE = [
    "", ".", "..", ".hidden", "-dash", "Upper", "a/b", "/abs", "../escape", "a/../../escape", "a..b",
    "a" * 65, "a b", "a\nb", "a\x00b", "\u00e9t\u00e9", "~", "a\\b",
]


@pytest.mark.parametrize("bad", HOSTILE, ids=repr)
def test_check_name_refuses_with_the_pattern(bad: str) -> None:
    with pytest.raises(InvalidNameError) as err:
        check_name(bad)
    assert NAME_PATTERN in str(err.value)


def test_name_length_limit() -> None:
    assert check_name("a" * 64) == "a" * 64
    assert check_name("0_a.b-c") == "0_a.b-c"
    with pytest.raises(InvalidNameError):
        check_name("a" * 65)


@pytest.mark.parametrize("bad", HOSTILE, ids=repr)
def test_hostile_names_escape_nowhere(reg: Registry, v1: Version, tmp_path: Path, bad: str) -> None:
    """Every public entry point that turns a user string into a path refuses, and nothing changes anywhere."""
    before = snapshot(tmp_path)
    model_name_calls = [
        lambda: reg.create_model(f"{bad}/m"),
        lambda: reg.create_model(f"o/{bad}"),
        lambda: reg.get_model(f"o/{bad}"),
        lambda: reg.list_versions(f"{bad}/m"),
        lambda: reg.resolve(f"o/{bad}:1"),
        lambda: reg.resolve(f"{bad}/m"),
        lambda: reg.publish(f"o/{bad}", v1.path),
        lambda: reg.publish(f"{bad}/m", v1.path),
        lambda: reg.set_alias(f"o/{bad}:1", "prod"),
        lambda: reg.delete_version(f"o/{bad}:1"),
        lambda: reg.delete_model(f"{bad}/m"),
    ]
    other_calls = [
        lambda: reg.set_alias("o/m:1", bad),
        lambda: reg.training_paths(bad),
        lambda: reg.cache_dir(bad),
        lambda: reg.staging_dir(bad),
    ]
    for i, call in enumerate(model_name_calls):
        with pytest.raises(UsageError) as err:
            call()
        assert NAME_PATTERN in str(err.value), (i, str(err.value))
    for call in other_calls:
        with pytest.raises(UsageError):
            call()
    assert snapshot(tmp_path) == before


def test_refs_parse_strictly() -> None:
    assert parse_ref("o/m").kind == "latest"
    assert (parse_ref("o/m:latest").kind, parse_ref("o/m:7").value) == ("latest", 7)
    assert parse_ref("o/m:deadbeef").kind == "id_prefix"
    assert parse_ref("o/m:deadbee").kind == "alias"  # 7 hex characters: too short for an id prefix
    for bad in ["", "o/m:", "o/m:0", "o/m:-1", "o/m:Prod", "o/m:1:2", "o/m:a..b", "o:m", "o/m/x:1", "O/m:1"]:
        with pytest.raises(InvalidRefError):
            parse_ref(bad)


def test_over_long_selectors_are_usage_errors(reg: Registry, v1: Version) -> None:
    # 300 digits would be an over-long file name (ENAMETOOLONG), 5000 digits more than int() converts.
    for selector in ("9" * 65, "9" * 300, "9" * 5000, "a" * 65):
        with pytest.raises(InvalidRefError):
            reg.resolve(f"o/m:{selector}")
    assert parse_ref("o/m:" + "9" * 7).value == 10**7 - 1
    assert reg.resolve(f"o/m:{v1.id}") == v1  # a whole id is still a prefix of itself


def test_an_id_prefix_of_digits_only_names_the_version_not_a_number(reg: Registry, src: Path, v1: Version) -> None:
    # About one id in forty starts with 8 decimal digits; its prefix must not be read as a version number.
    assert parse_ref("o/m:12345678").kind == "id_prefix" and parse_ref("o/m:1234567").kind == "number"
    version = v1
    for _ in range(2000):  # ~43 publishes expected; 2000 fail to find one with probability ~1e-20
        if version.id[:8].isdigit():
            break
        version = reg.publish("o/m", src)
    assert reg.resolve(f"o/m:{version.id[:8]}") == version


# ------------------------------------------------------------------ aliases
def test_aliases(reg: Registry, src: Path, v1: Version) -> None:
    v2 = reg.publish("o/m", src)
    assert reg.set_alias("o/m:1", "prod") == v1
    assert reg.resolve("o/m:prod") == v1
    reg.set_alias("o/m:latest", "prod")  # moves it
    assert reg.resolve("o/m:prod") == v2 and reg.aliases("o/m") == {"prod": 2}
    with pytest.raises(InvalidNameError, match="reserved"):
        reg.set_alias("o/m:1", "latest")
    with pytest.raises(InvalidNameError, match="version id prefix"):
        reg.set_alias("o/m:1", "deadbeef")
    with pytest.raises(VersionNotFoundError):
        reg.set_alias("o/m:9", "staging")
    with pytest.raises(VersionNotFoundError, match=r"aliases: prod"):
        reg.resolve("o/m:nope")
    with pytest.raises(NotFoundError):
        reg.remove_alias("o/m", "nope")
    reg.remove_alias("o/m", "prod")
    assert reg.aliases("o/m") == {}


def test_alias_is_not_set_on_a_version_deleted_after_it_was_resolved(
    reg: Registry, src: Path, v1: Version, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg.publish("o/m", src)
    other = Registry(reg.root)  # another process, as far as the registry's files are concerned
    real_resolve = Registry.resolve

    def resolve_then_lose_the_race(self: Registry, ref: str) -> Version:
        v = real_resolve(self, ref)
        if self is reg:
            other.delete_version(v.ref)
        return v

    monkeypatch.setattr(Registry, "resolve", resolve_then_lose_the_race)
    with pytest.raises(VersionNotFoundError, match="deleted just now"):
        reg.set_alias("o/m:1", "prod")
    assert reg.aliases("o/m") == {}


# ------------------------------------------------------------------ deletion
def test_delete_refused_while_an_alias_points_at_it(reg: Registry, v1: Version) -> None:
    reg.set_alias("o/m:1", "prod")
    with pytest.raises(ConflictError, match="aliases: prod"):
        reg.delete_version("o/m:1")
    assert reg.resolve("o/m:1") == v1
    reg.remove_alias("o/m", "prod")
    reg.delete_version("o/m:1")
    with pytest.raises(VersionNotFoundError):
        reg.resolve("o/m:1")


def test_delete_refused_while_a_child_of_its_owner_names_it(
    reg: Registry, src: Path, v1: Version
) -> None:
    """In the same model or another of the same owner (other owners' children: test_registry_integrity)."""
    reg.create_model("o/child")
    same = reg.publish("o/m", src, parent="o/m:1")
    other = reg.publish("o/child", src, parent=v1)
    with pytest.raises(ConflictError, match="parent of o/child:1, o/m:2"):
        reg.delete_version("o/m:1")
    reg.delete_version(same.ref)
    with pytest.raises(ConflictError, match="parent of o/child:1"):
        reg.delete_version("o/m:1")
    reg.delete_version(other.ref)
    reg.delete_version("o/m:1")
    assert reg.list_versions("o/m") == []
    assert list((reg.root / ".trash").iterdir()) == []


def test_numbers_are_never_reused(reg: Registry, tmp_path: Path) -> None:
    reg.create_model("o/m")
    publish_n(reg, tmp_path, "o/m", 3)
    reg.delete_version("o/m:3")
    assert reg.latest("o/m").number == 2  # walks down past the deleted number
    assert publish_n(reg, tmp_path / "b", "o/m", 1)[0].number == 4
    reg.delete_version("o/m:4")
    reg.delete_version("o/m:2")
    assert reg.resolve("o/m").number == 1
    reg.delete_version("o/m", latest=True)  # the newest, asked for as such
    assert reg.latest("o/m") is None
    with pytest.raises(VersionNotFoundError, match="no versions yet"):
        reg.resolve("o/m:latest")
    assert publish_n(reg, tmp_path / "c", "o/m", 1)[0].number == 5


def test_delete_model_only_when_empty(reg: Registry, v1: Version) -> None:
    with pytest.raises(ConflictError, match="still has versions"):
        reg.delete_model("o/m")
    reg.delete_version("o/m:1")
    reg.delete_model("o/m")
    with pytest.raises(ModelNotFoundError):
        reg.get_model("o/m")
    assert reg.list_models() == []
    reg.create_model("o/m")
    assert reg.list_versions("o/m") == []


def test_ambiguous_id_prefix_lists_every_match(
    reg: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two real versions whose ids share a prefix, made findable by accepting 1-character prefixes.

    Finding two sha256 ids that share 8 hex characters takes ~65,000 publishes on average, so the minimum
    prefix length is lowered to 1 instead (parse_ref reads names.MIN_ID_PREFIX at call time). Ids are then
    published until two start with the same letter a-f (a digit would parse as a version number): by the
    pigeonhole principle that takes at most 7 letter-initial ids. The resolution logic under test is unchanged.
    """
    monkeypatch.setattr(names, "MIN_ID_PREFIX", 1)
    reg.create_model("o/m")
    by_first: dict[str, list[Version]] = {}
    for i in range(200):
        v = publish_n(reg, tmp_path / str(i), "o/m", 1)[0]
        by_first.setdefault(v.id[0], []).append(v)
        shared = [c for c, vs in by_first.items() if c in "abcdef" and len(vs) == 2]
        if shared:
            break
    else:  # pragma: no cover - 200 sha256 ids without a shared leading letter does not happen
        pytest.fail("no two ids share a leading letter")
    c = shared[0]
    a, b = by_first[c]
    with pytest.raises(AmbiguousRefError) as err:
        reg.resolve(f"o/m:{c}")
    assert f"{a.ref} ({a.id[:16]})" in str(err.value) and f"{b.ref} ({b.id[:16]})" in str(err.value)
    # The longest common prefix is still ambiguous; one more character settles it.
    common = os.path.commonprefix([a.id, b.id])
    with pytest.raises(AmbiguousRefError):
        reg.resolve(f"o/m:{common}")
    assert reg.resolve(f"o/m:{a.id[: len(common) + 1]}") == a
    assert reg.resolve(f"o/m:{b.id[: len(common) + 1]}") == b


def test_unknown_id_prefix(reg: Registry, v1: Version) -> None:
    prefix = "0123abcd" if not v1.id.startswith("0123abcd") else "3210abcd"
    with pytest.raises(VersionNotFoundError, match="starting with"):
        reg.resolve(f"o/m:{prefix}")


# ------------------------------------------------------------------ latest
def test_latest_does_not_list_the_versions_folder(
    reg: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg.create_model("o/m")
    publish_n(reg, tmp_path, "o/m", 5)

    def no_scan(*args, **kwargs):
        raise AssertionError("latest/resolve listed a folder")

    monkeypatch.setattr(Versions, "numbers", no_scan)
    monkeypatch.setattr(os, "scandir", no_scan)
    monkeypatch.setattr(os, "listdir", no_scan)
    assert reg.latest("o/m").number == 5
    assert reg.resolve("o/m:latest").number == 5
    assert reg.resolve("o/m").number == 5
    assert reg.resolve("o/m:3").number == 3


def test_latest_steps_over_numbers_taken_by_crashed_publishes(reg: Registry, tmp_path: Path) -> None:
    reg.create_model("o/m")
    publish_n(reg, tmp_path, "o/m", 2)
    counter = reg.root / "models" / "o" / "m" / "next_version"
    counter.write_text("10\n")  # as if publishes took 3..9 and died before their rename
    assert reg.latest("o/m").number == 2
    assert publish_n(reg, tmp_path / "b", "o/m", 1)[0].number == 10
    assert reg.latest("o/m").number == 10
    # A counter behind the folders (lost update) must not make a publish reuse a number.
    counter.write_text("3\n")
    assert publish_n(reg, tmp_path / "c", "o/m", 1)[0].number == 3
    assert publish_n(reg, tmp_path / "d", "o/m", 1)[0].number == 4
    assert sorted(v.number for v in reg.list_versions("o/m")) == [1, 2, 3, 4, 10]


def test_latest_without_a_counter_or_with_a_runaway_one(reg: Registry, tmp_path: Path) -> None:
    reg.create_model("o/m")
    assert reg.latest("o/m") is None
    publish_n(reg, tmp_path, "o/m", 3)
    counter = reg.root / "models" / "o" / "m" / "next_version"
    counter.unlink()  # version folders copied in by hand, or a backup that skipped the counter
    assert reg.latest("o/m").number == 3
    counter.write_text("1000000000\n")  # a walk of a billion stats would hang; this must not
    assert reg.latest("o/m").number == 3
    reg.delete_version("o/m:3")
    reg.delete_version("o/m:2")
    reg.delete_version("o/m:1")
    assert reg.latest("o/m") is None


def test_damaged_counter_is_an_integrity_error(reg: Registry, v1: Version) -> None:
    (reg.root / "models" / "o" / "m" / "next_version").write_text("garbage")
    with pytest.raises(IntegrityError, match="next_version"):
        reg.latest("o/m")


# ------------------------------------------------------------------ gc
DEAD_PID = 4_194_304 + 12_345  # above Linux's largest pid_max: never a live process


def _leftover(reg: Registry, area: str, name: str, old: bool = True) -> Path:
    p = reg.root / area / name
    p.mkdir(parents=True)
    (p / "partial.bin").write_bytes(b"x" * 10)
    atomic.make_read_only(p)  # leftovers of a publish killed after make_read_only are read-only
    if old:
        os.utime(p, (1_000_000_000, 1_000_000_000))
    return p


def test_gc_removes_abandoned_work_and_keeps_live_work(reg: Registry, v1: Version) -> None:
    host = socket.gethostname()
    me = os.getpid()
    dead = _leftover(reg, ".staging", f"publish-{DEAD_PID}-0a0b0c0d@{host}")
    dead_trash = _leftover(reg, ".trash", f"version-{DEAD_PID}-0a0b0c0e@{host}")
    foreign = _leftover(reg, ".staging", "junk-without-owner")
    live = _leftover(reg, ".staging", f"publish-{me}-0a0b0c0f@{host}")
    live_dashed = _leftover(reg, ".staging", f"tokenize-cache-{me}-01020304@{host}")
    fresh = _leftover(reg, ".staging", f"publish-{DEAD_PID}-05060708@{host}", old=False)
    live_tmp = reg.root / ".staging" / f"tmp-{me}-aabbccddeeff@{host}"
    live_tmp.write_bytes(b"counter being replaced")
    os.utime(live_tmp, (1_000_000_000, 1_000_000_000))

    # A dead process's work goes at once, however fresh (a killed import's gigabytes); an entry whose owner
    # cannot be told waits for the age limit.
    young_foreign = _leftover(reg, ".staging", "junk-young", old=False)
    assert set(reg.gc(dry_run=True)) == {dead, dead_trash, foreign, fresh}
    assert dead.exists()
    assert set(reg.gc()) == {dead, dead_trash, foreign, fresh}
    assert not dead.exists() and not dead_trash.exists() and not foreign.exists() and not fresh.exists()
    assert live.exists() and live_dashed.exists() and live_tmp.exists() and young_foreign.exists()
    assert set(reg.gc(older_than_hours=0)) == {young_foreign}
    assert reg.verify(v1) == []


def test_gc_tells_a_live_owner_from_a_process_that_took_its_pid(reg: Registry) -> None:
    """Work is named after its process's pid and start mark: when a crashed process's pid now belongs to another
    process, its leftovers still go at once (a pid alone kept them for as long as the new process ran), and the
    names this process gives its own work keep them."""
    from finetune.processes import mark_tag

    host, me = socket.gethostname(), os.getpid()
    other_tag = "0" * 8 if mark_tag(me) != "0" * 8 else "1" * 8
    reused = _leftover(reg, ".staging", f"publish-{me}-{other_tag}0a0b0c0d@{host}", old=False)
    mine = reg.staging_dir("publish")
    assert set(reg.gc()) == {reused}
    assert mine.is_dir() and not reused.exists()


def test_staging_dir_is_kept_by_gc_while_its_process_lives(reg: Registry) -> None:
    work = reg.staging_dir("train-run")
    assert work.parent == reg.root / ".staging" and work.is_dir()
    assert reg.gc(older_than_hours=0) == []
    assert work.is_dir()


# ------------------------------------------------------------------ registry root
def test_a_registry_root_that_is_not_a_folder(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(RegistryAccessError, match="not a folder"):
        Registry(tmp_path / "file")
    below = Registry(tmp_path / "file" / "sub")
    for call in (
        lambda: below.get_model("o/m"),
        lambda: below.list_models(),
        lambda: below.create_model("o/m"),
        lambda: below.resolve("o/m:1"),
        lambda: below.staging_dir("x"),
    ):
        with pytest.raises(RegistryAccessError):
            call()
    assert (tmp_path / "file").read_bytes() == b"x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits (see test_registry_cli for a root variant)")
def test_an_unreadable_registry_root(reg: Registry, v1: Version) -> None:
    os.chmod(reg.root, 0)
    try:
        for call in (
            lambda: reg.get_model("o/m"),
            lambda: reg.list_models(),
            lambda: reg.create_model("o/n"),
            lambda: reg.resolve("o/m:1"),
            lambda: reg.staging_dir("x"),
        ):
            with pytest.raises(RegistryAccessError):
                call()
    finally:
        os.chmod(reg.root, 0o755)
