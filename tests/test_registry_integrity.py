"""What is verified is really verified, and the registry's rules hold whoever publishes.

A base or an adapter damaged without a size change is refused by every path that reads it (predict, train,
export) and by `versions verify` of its children; loading stays fast because a file that matched is not
re-hashed until it changes. Version numbers are never handed out twice, whatever repairs the counter. The
Python API's `Registry.publish` applies the same rules as training and importing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import assert_one_line_error

from finetune import atomic
from finetune.cli import main
from finetune.errors import ConflictError, IntegrityError, ModelLoadError, UsageError
from finetune.registry import Registry, Version

HUB = {"hub_id": "o/base", "revision": "0" * 40}  # an adapter's parent outside the registry


def cli(capsys: pytest.CaptureFixture[str], reg: Registry, *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(["--registry", str(reg.root), *argv])
    except SystemExit as exit_:
        rc = exit_.code
    out, err = capsys.readouterr()
    return rc, out, err


def flip_byte(path: Path, offset: int = -100) -> None:
    """Change one byte of a published file in place: same size, other content."""
    os.chmod(path.parent, 0o755)
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def adapter_folder(tmp_path: Path, name: str = "adapter") -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    folder = tmp_path / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    save_file({"w": np.arange(256, dtype=np.float32)}, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.fixture
def based(tmp_path: Path, tiny_model_dir: Path, capsys) -> tuple[Registry, Version, Version]:
    """me/base:1, imported through the CLI from the tiny model, and me/ft:1, an adapter on it."""
    reg = Registry(tmp_path / "registry")
    assert cli(capsys, reg, "models", "import", "me/base", "--from", str(tiny_model_dir))[0] == 0
    base = reg.resolve("me/base:1")
    reg.create_model("me/ft")
    child = reg.publish("me/ft", adapter_folder(tmp_path), parent=base)
    return reg, base, child


def config_file(tmp_path: Path, base_model: str) -> Path:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(4)))
    path = tmp_path / "train.yaml"
    path.write_text(f"base_model: {base_model}\ndata: {{path: {data}}}\ntrain: {{max_steps: 1}}\n")
    return path


# ---------------------------------------------------------------- damage that keeps the size
def test_a_base_damaged_without_a_size_change_is_refused_by_every_reader(based, tmp_path: Path, capsys) -> None:
    reg, base, child = based
    flip_byte(base.path / "model.safetensors")

    rc, out, err = cli(capsys, reg, "versions", "verify", child.ref)  # the child's own files are intact
    assert rc == 1 and f"base {base.ref}: model.safetensors: sha256 differs" in out, (out, err)
    rc, _, err = cli(capsys, reg, "predict", base.ref, "hello", "--max-new-tokens", "2")
    assert_one_line_error(rc, err, f"{base.ref} is damaged: model.safetensors: sha256 differs")
    rc, _, err = cli(capsys, reg, "export", child.ref, str(tmp_path / "merged"), "--format", "merged")
    assert_one_line_error(rc, err, f"base model {base.ref} of {child.ref} is damaged", "restore the files")
    assert not (tmp_path / "merged").exists()
    rc, _, err = cli(capsys, reg, "train", str(config_file(tmp_path, base.ref)), "--destination", "me/out",
                     "--create-destination", "--quiet")
    assert_one_line_error(rc, err.splitlines()[-1] + "\n", f"{base.ref} is damaged")
    assert reg.list_versions("me/out") == []


def test_training_from_a_tampered_adapter_is_refused(based, tmp_path: Path, capsys) -> None:
    from finetune.registry.jobs import Trainings

    reg, _, child = based
    flip_byte(child.path / "adapter_model.safetensors")
    rc, _, err = cli(capsys, reg, "train", str(config_file(tmp_path, child.ref)), "--destination", "me/ft2",
                     "--create-destination", "--quiet")
    assert_one_line_error(rc, err.splitlines()[-1] + "\n", f"{child.ref} is damaged",
                          "adapter_model.safetensors: sha256 differs")
    assert reg.list_versions("me/ft2") == []
    record = next(r for r in Trainings(reg).list() if r.destination == "me/ft2")
    assert record.status == "failed" and "sha256 differs" in record.error


def test_verified_files_are_not_hashed_again_until_they_change(based, monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune.registry.lineage import lineage
    from finetune.registry.sources import resolve_model

    reg, base, child = based
    hashed: list[str] = []
    real = atomic.sha256_file
    monkeypatch.setattr(atomic, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    resolve_model(reg, child.ref)
    assert "model.safetensors" in hashed and "adapter_model.safetensors" in hashed  # the first load hashes
    hashed.clear()
    resolve_model(reg, child.ref)
    assert hashed == []  # unchanged since they matched: not read again
    flip_byte(base.path / "model.safetensors")
    with pytest.raises(IntegrityError, match="base model me/base:1 of me/ft:1 is damaged"):
        resolve_model(reg, child.ref)
    flip_byte(base.path / "model.safetensors")  # the same bytes again: intact, and hashed to know it
    hashed.clear()
    assert [v.ref for v in lineage(reg, resolve_model(reg, child.ref).chain[0])] == [child.ref, base.ref]
    assert hashed == ["model.safetensors"]


def test_an_import_without_weights_is_refused(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    reg = Registry(tmp_path / "registry")
    folder = tmp_path / "no-weights"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny_model_dir / name).read_bytes())
    rc, _, err = cli(capsys, reg, "models", "import", "me/base", "--from", str(folder))
    assert_one_line_error(rc, err, "holds no weights", "save_pretrained")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-1-of-2.safetensors"}}))
    rc, _, err = cli(capsys, reg, "models", "import", "me/base", "--from", str(folder))
    assert_one_line_error(rc, err, "lacks 1 weight shard", "model-1-of-2.safetensors")
    assert not reg.has_models() or reg.list_models() == []


# ---------------------------------------------------------------- numbers
def test_a_deleted_number_is_never_handed_out_again(tmp_path: Path, capsys) -> None:
    reg = Registry(tmp_path / "registry")
    reg.create_model("me/dest")
    for _ in range(3):
        reg.publish("me/dest", adapter_folder(tmp_path / str(_)), parent=HUB)
    reg.delete_version("me/dest:3")
    counter = reg.get_model("me/dest").path / "next_version"
    counter.write_text("garbage\n")  # damaged: `registry gc` rebuilds it
    rc, out, _ = cli(capsys, reg, "registry", "gc")
    assert rc == 0 and "rebuilt" in out
    assert reg.publish("me/dest", adapter_folder(tmp_path / "new"), parent=HUB).number == 4
    counter.unlink()  # lost altogether: the publish steps over the deleted numbers too
    reg.delete_version("me/dest:4")
    assert reg.publish("me/dest", adapter_folder(tmp_path / "newer"), parent=HUB).number == 5


# ---------------------------------------------------------------- one set of rules for every publish
def test_the_python_publish_applies_the_registry_rules(based, tmp_path: Path) -> None:
    reg, base, _ = based
    reg.create_model("me/raw")
    with pytest.raises(UsageError, match="adapter to me/raw without its parent"):
        reg.publish("me/raw", adapter_folder(tmp_path, "orphan"))
    with pytest.raises(UsageError, match="names no version and no base"):
        reg.publish("me/raw", adapter_folder(tmp_path, "odd"), parent={"note": "x"})
    with pytest.raises(ConflictError, match="holds base model me/base:1"):
        reg.publish("me/base", adapter_folder(tmp_path, "into-base"), parent=base)
    base_copy = tmp_path / "base-copy"
    base_copy.mkdir()
    for f in base.path.iterdir():
        if f.name != "manifest.json":
            (base_copy / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ConflictError, match="a base must be its model's only version"):
        reg.publish("me/ft", base_copy, kind="base", parent={"local_path": str(base_copy)})
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    with pytest.raises(UsageError, match="holds no weights"):
        reg.publish("me/raw", no_weights, kind="base", parent={"local_path": str(no_weights)})
    assert reg.list_versions("me/raw") == [] and [v.number for v in reg.list_versions("me/ft")] == [1]
    assert reg.publish("me/raw", adapter_folder(tmp_path, "fine"), parent=base).parent["ref"] == base.ref


def test_models_import_refuses_a_model_holding_adapters(based, tiny_model_dir: Path, capsys) -> None:
    reg, _, child = based
    rc, _, err = cli(capsys, reg, "models", "import", "me/ft", "--from", str(tiny_model_dir))
    assert_one_line_error(rc, err, "already has versions")
    assert [v.ref for v in reg.list_versions("me/ft")] == [child.ref]


def test_a_base_cannot_be_loaded_from_a_changed_hub_cache(tmp_path: Path, tiny_model_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """A hub base is fetched and hashed at import; a file changed in the Hugging Face cache is refused."""
    from finetune.registry import sources

    cache = tmp_path / "hf-cache"
    sha = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--org--tiny" / "snapshots" / sha
    snapshot.mkdir(parents=True)
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text(sha)
    for f in tiny_model_dir.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(sources, "resolve_hub_revision", lambda repo_id, revision=None: sha)
    reg = Registry(tmp_path / "registry")
    rc, out, err = cli(capsys, reg, "models", "import", "me/hub", "--from", "org/tiny")
    assert (rc, out) == (0, "me/hub:1\n"), err
    files = reg.resolve("me/hub:1").metadata["source"]["files"]
    assert files["model.safetensors"]["size"] == (tiny_model_dir / "model.safetensors").stat().st_size
    assert cli(capsys, reg, "versions", "verify", "me/hub:1")[0] == 0
    flip_byte(snapshot / "model.safetensors")
    rc, out, _ = cli(capsys, reg, "versions", "verify", "me/hub:1")
    assert rc == 1 and "model.safetensors: sha256 differs from the manifest (hub org/tiny" in out
    with pytest.raises(IntegrityError, match="me/hub:1 is damaged.*hf download org/tiny"):
        sources.resolve_model(reg, "me/hub:1")
    with pytest.raises(ModelLoadError):  # and a hub id that cannot be fetched is one clear error at import
        sources.import_base(reg, "me/other", "org/absent")


def test_a_tampered_version_is_never_downloaded(live_server, tmp_path: Path) -> None:
    """The API's weights tar and the web app's adapter zip check the files first, as loading does."""
    from test_api import assert_problem
    from test_web import sign_in

    reg = live_server.registry
    reg.create_model("alice/m")
    v = reg.publish("alice/m", adapter_folder(tmp_path), parent=HUB)
    http = live_server.http("alice")
    assert http.get(f"/v1/models/alice/m/versions/{v.id}/weights").status_code == 200
    flip_byte(v.path / "adapter_model.safetensors")
    assert_problem(http.get(f"/v1/models/alice/m/versions/{v.id}/weights"), 500,
                   "alice/m:1 is damaged: adapter_model.safetensors: sha256 differs")
    browser, _ = sign_in(live_server)
    assert browser.get("/models/alice/m/versions/1/adapter.zip").status_code == 500
