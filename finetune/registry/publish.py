"""Publishing a version: stage, then commit.

:func:`publish_version` (``Registry.publish``) copies every file of the source folder under ``.staging`` (same
filesystem) while hashing it, fsyncs, then :func:`commit` allocates the next number under the model's lock,
writes ``manifest.json`` last, makes the folder read-only and renames it into ``versions/`` with a rename that
refuses to overwrite. A version folder therefore appears whole or not at all; numbers are never reused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import atomic
from ..errors import ConflictError, FinetuneError, IntegrityError, NonFiniteError, NotFoundError, UsageError
from .deletion import retired_numbers
from .disk import model_lock
from .manifest import FORMAT_VERSION, MANIFEST, Version, manifest_id, software_versions, utc_now
from .weights import non_finite_tensors

if TYPE_CHECKING:
    from .store import Model, Registry

KINDS = ("adapter", "base", "files")
# The files a base model's weights live in (transformers' safetensors and PyTorch formats, sharded or not).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


def publish_version(
    reg: Registry,
    model: str,
    src: Path,
    parent: Version | str | dict[str, Any] | None,
    metadata: dict[str, Any] | None,
    kind: str | None,
    first: bool = False,
) -> Version:
    """Publish the files of ``src`` as the next version of ``model`` (see :meth:`Registry.publish`)."""
    m = reg.get_model(model)
    if not src.exists():
        raise NotFoundError(f"source folder {src} does not exist")
    if not src.is_dir():
        raise NotFoundError(f"source {src} is not a folder", "publish takes a folder of files")
    if (src / MANIFEST).exists():
        raise UsageError(f"{src / MANIFEST} exists", "the manifest is written by the registry; remove it")
    parent_info = _parent_info(reg, parent)
    if kind is None:
        kind = _guess_kind(src)
    _check_rules(m.full_name, src, kind, parent_info)
    stage = reg.staging_dir("publish")
    try:
        files = stage_files(src, stage)
        if kind == "adapter":
            _check_finite(m.full_name, stage)
        body = {
            "format": FORMAT_VERSION,
            "model": m.full_name,
            "kind": kind,
            "parent": parent_info,
            "metadata": metadata or {},
            "software": software_versions(),
            "files": files,
        }
        version = commit(reg, m, stage, body, first=first)
    except BaseException:
        atomic.remove_tree(stage)
        raise
    return version


def _check_finite(model: str, stage: Path) -> None:
    """Refuse an adapter with an infinite or NaN weight, whoever publishes it (training, import, the API)."""
    for path in sorted(stage.rglob("*.safetensors")):
        try:
            bad = non_finite_tensors(path)
        except ValueError as err:
            raise IntegrityError(f"cannot publish to {model}: {err}", "publish intact safetensors files") from None
        if bad:
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            raise NonFiniteError(
                f"cannot publish to {model}: {path.name} holds inf/NaN weights ({bad[0]}{more}); nothing published",
                "the training diverged: lower train.lr, or train with train.precision: fp32")


def _check_rules(model: str, src: Path, kind: str, parent: dict[str, Any] | None) -> None:
    """The rules every version obeys, whoever publishes it (a training, an import, the Python API); those that
    depend on the model's other versions are checked in :func:`commit`, under its lock."""
    if kind not in KINDS:
        raise UsageError(f"unknown kind of version {kind!r}", f"use one of: {', '.join(KINDS)}")
    if kind == "adapter" and parent is None:
        raise UsageError(f"cannot publish an adapter to {model} without its parent: it could never be loaded",
                         "pass parent= the version it was trained from, or {'hub_id': ..., 'revision': ...} or "
                         "{'local_path': ...} for a base outside the registry")
    if kind == "base":
        if isinstance(parent, dict) and "ref" in parent:
            raise UsageError(f"a base version of {model} cannot have a registry parent ({parent['ref']})",
                             "publish a fine-tune as an adapter; import bases with `finetune models import`")
        weights = [p for p in src.rglob("*") if p.suffix in WEIGHT_SUFFIXES]
        hub = isinstance(parent, dict) and "hub_id" in parent  # its weights stay in the Hugging Face cache
        if not hub and not weights:
            raise UsageError(f"{src} holds no weights ({', '.join('*' + x for x in WEIGHT_SUFFIXES)}): a base "
                             f"without them could never be loaded", "save the model with save_pretrained into it")


def _guess_kind(src: Path) -> str:
    if (src / "adapter_config.json").exists():
        return "adapter"
    return "base" if (src / "config.json").exists() else "files"


def _parent_info(reg: Registry, parent: Version | str | dict[str, Any] | None) -> dict[str, Any] | None:
    if isinstance(parent, dict) and not (
            ("ref" in parent and "id" in parent) or parent.get("hub_id") or parent.get("local_path")):
        raise UsageError(f"parent {parent!r} names no version and no base",
                         "give a Version or ref, {'ref': ..., 'id': ...}, {'hub_id': ..., 'revision': ...} "
                         "or {'local_path': ...}")
    if isinstance(parent, dict) and "ref" in parent and "id" in parent:
        # A registry parent named by a training that started from it: it must still be there (a deletion while
        # the training ran would leave the new version, and whatever loads it, without its lineage).
        try:
            alive = reg.resolve(str(parent["ref"])).id == parent["id"]
        except FinetuneError:
            alive = False
        if not alive:
            raise ConflictError(f"the parent {parent['ref']} is gone (deleted while this was trained); "
                                "nothing published", "train again from a version that exists")
    if parent is None or isinstance(parent, dict):
        return parent
    if isinstance(parent, str):
        parent = reg.resolve(parent)
    return {"ref": parent.ref, "id": parent.id}


def stage_files(src: Path, stage: Path) -> dict[str, dict[str, Any]]:
    """Copy every file of ``src`` into ``stage``, fsynced; returns ``{relative path: {size, sha256}}``."""
    files: dict[str, dict[str, Any]] = {}
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(src)
        # os.walk lists a link to a folder but does not enter it: without this check its files would be
        # left out of the version without a word.
        for name in dirnames:
            if os.path.islink(os.path.join(dirpath, name)):
                raise UsageError(
                    f"{Path(dirpath) / name} is a link to a folder", "publish copies files; copy the folder in"
                )
        (stage / rel_dir).mkdir(exist_ok=True)
        for name in sorted(filenames):
            if not os.path.isfile(os.path.join(dirpath, name)):
                raise UsageError(f"{Path(dirpath) / name} is not a regular file (a broken link, a pipe?)")
            rel = (rel_dir / name).as_posix()
            size, digest = atomic.copy_and_hash(Path(dirpath) / name, stage / rel)
            files[rel] = {"size": size, "sha256": digest}
        atomic.fsync_dir(stage / rel_dir)
    return files


def _base_in(reg: Registry, model: Model, numbers: list[int]) -> str | None:
    """The ref of the base ``model`` holds, if it holds one (a base is always its model's first version)."""
    if not numbers:
        return None
    first = Version(model.full_name, min(numbers), reg.layout.version_dir(model.path, min(numbers)))
    try:
        return first.ref if first.kind == "base" else None
    except (IntegrityError, FileNotFoundError):
        return None  # a damaged first version says nothing; listing shows it


def commit(reg: Registry, model: Model, stage: Path, body: dict[str, Any], first: bool = False) -> Version:
    """Number the staged folder, write its manifest last, and rename it into the model's versions."""
    layout, versions = reg.layout, reg.version_store
    vdir = layout.versions_dir(model.path)
    vdir.mkdir(exist_ok=True)
    with model_lock(layout, model.path):
        numbers = versions.numbers(model.path)
        if (first or body["kind"] == "base") and numbers:
            raise ConflictError(f"model {model.full_name} already has versions: a base must be its model's only "
                                "version", "import a base into a new model name, e.g. OWNER/NAME-base")
        base = _base_in(reg, model, numbers)
        if base is not None:
            raise ConflictError(f"{model.full_name} holds base model {base}: a base is its model's only version",
                                f"publish into a model of its own, e.g. {model.full_name}-ft")
        retired = set(retired_numbers(layout, model.path))
        while True:
            number = versions.next_number(model.path)
            # A counter update lost to a crash (or a lock that silently failed elsewhere) must not make
            # us reuse a number: step over anything that exists or existed.
            while layout.version_dir(model.path, number).exists() or number in retired:
                number += 1
            atomic.replace_file(layout.counter(model.path), f"{number + 1}\n".encode(), layout.staging)
            manifest = dict(body, number=number, created_at=utc_now())
            manifest["id"] = manifest_id(manifest)
            manifest_path = stage / MANIFEST
            if manifest_path.exists():
                manifest_path.unlink()
            atomic.write_bytes_durable(manifest_path, atomic.pretty_json(manifest))
            atomic.make_read_only(stage)
            atomic.fsync_dir(stage)
            try:
                atomic.rename_noreplace(stage, layout.version_dir(model.path, number))
            except FileExistsError:
                os.chmod(stage, 0o755)
                continue
            atomic.fsync_dir(vdir)
            # The folder is committed: now the index may remember its manifest (it is never the truth).
            path = layout.version_dir(model.path, number)
            reg.catalog.note("version", model.full_name, str(number), path / MANIFEST, json.dumps(manifest))
            return Version(model.full_name, number, path, manifest)
