"""What the service keeps in the registry: accounts and token hashes, model fields it edits, version numbers
and ids it looks up on every request."""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path

import pytest

from finetune.errors import NotFoundError, UsageError
from finetune.registry import Registry
from finetune.registry.accounts import Accounts, token_hash
from finetune.registry.index import VersionIndex


def publish(reg: Registry, tmp_path: Path, model: str, i: int):
    src = tmp_path / f"src-{model.replace('/', '-')}-{i}"
    src.mkdir()
    (src / "note.txt").write_text(f"{model} {i}")
    return reg.publish(model, src)


def test_tokens_resolve_revoke_and_are_stored_hashed(registry: Registry):
    accounts = Accounts(registry)
    t1, t2 = accounts.create_token("alice"), accounts.create_token("alice", label="ci")
    assert t1 != t2 and accounts.resolve(t1).username == "alice" and accounts.resolve("ft_guess") is None
    tokens = accounts.list_tokens("alice")
    assert [t.label for t in tokens] == ["", "ci"] and accounts.list_tokens("bob") == []
    files = list(registry.accounts_dir().rglob("*.json"))
    assert all(t1.encode() not in f.read_bytes() for f in files)
    assert (registry.accounts_dir() / "tokens" / f"{token_hash(t1)}.json").is_file()
    assert all(f.stat().st_mode & 0o077 == 0 for f in files)  # secrets readable by the owner only
    accounts.revoke(tokens[1].id)
    assert accounts.resolve(t2) is None and accounts.resolve(t1).username == "alice"
    with pytest.raises(NotFoundError):
        accounts.revoke(tokens[1].id)
    with pytest.raises(UsageError):
        accounts.revoke("xyz")
    with pytest.raises(UsageError):
        accounts.create_token("Not Valid")


def test_webhook_secret_is_stable_per_account_and_in_replicates_format(registry: Registry):
    accounts = Accounts(registry)
    key = accounts.webhook_secret("alice")
    assert key == accounts.webhook_secret("alice") != accounts.webhook_secret("bob")
    prefix, b64 = key.split("_")
    assert prefix == "whsec" and len(base64.b64decode(b64)) == 32


def test_update_model_changes_only_what_is_given(registry: Registry):
    registry.create_model("alice/m", description="d", github_url="https://g")
    m = registry.update_model("alice/m", readme="# hi", paper_url="https://p")
    assert (m.description, m.readme, m.links["github_url"], m.links["paper_url"]) == ("d", "# hi", "https://g",
                                                                                        "https://p")
    m = registry.update_model("alice/m", github_url=None, description="")
    assert m.links["github_url"] is None and m.description == "" and registry.get_model("alice/m").readme == "# hi"
    with pytest.raises(UsageError):
        registry.update_model("alice/m", visibility="public")
    with pytest.raises(UsageError):
        registry.create_model("alice/x", colour="red")


def test_version_numbers_are_remembered_only_while_the_folder_is_unchanged(registry: Registry, tmp_path: Path):
    registry.create_model("o/m")
    for i in range(3):
        publish(registry, tmp_path, "o/m", i)
    vdir = registry.version("o/m", 1).path.parent
    still = time.time() - 60
    os.utime(vdir, (still, still))  # as if the folder had been unchanged for a minute: the listing is kept
    assert registry.version_numbers("o/m") == [3, 2, 1]
    assert registry.version_numbers("o/m") == [3, 2, 1]
    publish(registry, tmp_path, "o/m", 3)  # changes the folder's mtime: the listing is read again
    assert registry.version_numbers("o/m") == [4, 3, 2, 1]
    registry.delete_version("o/m:2")
    assert registry.version_numbers("o/m") == [4, 3, 1]
    registry.create_model("o/empty")
    assert registry.version_numbers("o/empty") == []


def test_version_index_finds_ids_across_models_and_forgets_deleted_ones(registry: Registry, tmp_path: Path):
    registry.create_model("o/a")
    registry.create_model("o/b")
    a1 = publish(registry, tmp_path, "o/a", 1)
    index = VersionIndex(registry)
    assert index.find(a1.id) == a1 and index.find(a1.id, "o/b") is None
    b1 = publish(registry, tmp_path, "o/b", 1)  # published after the index was filled: found on a miss
    assert index.find(b1.id, "o/b") == b1
    registry.delete_version(a1.ref)
    assert index.find(a1.id) is None and index.find("f" * 64) is None


def test_version_index_is_not_fooled_by_a_model_created_again(registry: Registry, tmp_path: Path):
    registry.create_model("o/a")
    old = publish(registry, tmp_path, "o/a", 1)
    index = VersionIndex(registry)
    assert index.find(old.id, "o/a") == old
    registry.delete_version(old.ref)
    registry.delete_model("o/a")
    time.sleep(0.001)  # a new created_at
    registry.create_model("o/a")
    new = publish(registry, tmp_path, "o/a", 2)  # number 1 again
    assert new.number == old.number and new.id != old.id
    assert index.find(old.id, "o/a") is None
    assert index.find(new.id, "o/a") == new
