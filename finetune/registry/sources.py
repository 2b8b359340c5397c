"""Where a model's weights come from: importing base models, and tracing any version down to its base.

A *base* version is either a copy of a local Hugging Face folder (its files live in the version folder) or a
pointer to a hub repository pinned at a commit (loaded through the ordinary Hugging Face cache, its files fetched
and hashed at import: :mod:`.integrity`). An *adapter*
version holds a PEFT LoRA adapter and names its parent; following parents always ends at a base version.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import atomic
from ..errors import ConflictError, FinetuneError, ModelLoadError, ModelNotFoundError, NotFoundError, UsageError
from ..names import parse_model_name, parse_ref
from .disk import not_writable
from .integrity import check_loadable, hub_files
from .lineage import lineage
from .publish import WEIGHT_SUFFIXES
from .store import Registry, Version

_HUB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


@dataclass
class BaseSource:
    """What to hand to ``from_pretrained`` for the frozen base, and where it came from."""

    load_path: str  # a local folder or a hub id
    revision: str | None = None
    version: Version | None = None  # the registry base version, when the base lives in the registry
    description: str = ""
    sha256: str | None = None  # a local folder's content (folder_sha256): pins a base that lives outside

    def to_dict(self) -> dict[str, Any]:
        if self.version is not None:
            return {"ref": self.version.ref, "id": self.version.id}
        if self.revision is not None:
            return {"hub_id": self.load_path, "revision": self.revision}
        return {"local_path": self.load_path, **({"sha256": self.sha256} if self.sha256 else {})}


def folder_sha256(path: Path) -> str:
    """sha256 over every file of a model folder (names and contents; dot-files left out, as imports do):
    the pin of a local-folder base, so a folder replaced by another model is noticed, not silently used."""
    import hashlib

    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(f for f in filenames if not f.startswith(".")):
            file = Path(dirpath) / name
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
            digest.update(atomic.sha256_file(file).encode() + b"\n")
    return digest.hexdigest()


@dataclass
class ResolvedModel:
    """A model spec resolved for loading: its base, plus the adapter version to start from (if any)."""

    spec: str
    base: BaseSource
    adapter: Version | None = None  # continuing from a fine-tune: this version's adapter
    chain: list[Version] = field(default_factory=list)  # registry versions from `spec` down to the base

    @property
    def parent_info(self) -> dict[str, Any] | None:
        """What a version trained from this model records as its parent."""
        if self.chain:
            return {"ref": self.chain[0].ref, "id": self.chain[0].id}
        return self.base.to_dict()


def resolve_hub_revision(repo_id: str, revision: str | None = None) -> str:
    """The commit hash a hub id (and optional branch/tag) points at now."""
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(repo_id, revision=revision)
    except Exception as err:  # the hub client raises many types; all mean "cannot resolve"
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise ModelLoadError(
            f"cannot resolve hub model {repo_id!r}: {type(err).__name__}: {first_line}",
            "check the id and your network, or import a local folder with --from PATH",
        ) from None
    if not info.sha:
        raise ModelLoadError(f"the hub returned no commit for {repo_id!r}")
    return info.sha


# The vocabulary files some tokenizer class loads from; tokenizer_config.json alone names a class, not a vocabulary.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tiktoken.model")


def weights_problem(folder: Path) -> str | None:
    """What keeps a model folder's weights from loading: none at all, or shards its index names that are
    missing; None when they are there."""
    indexes = sorted(folder.glob("*.index.json"))
    for index in indexes:
        try:
            weight_map = json.loads(index.read_bytes()).get("weight_map")
        except (OSError, ValueError, AttributeError):
            return f"has an unreadable weights index {index.name}"
        shards = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
        missing = [name for name in shards if not (folder / str(name)).is_file()]
        if missing:
            return f"lacks {len(missing)} weight shard(s) its {index.name} names (first: {missing[0]})"
    if not indexes and not any(p.suffix in WEIGHT_SUFFIXES for p in folder.iterdir() if p.is_file()):
        return (f"holds no weights (no {', '.join('*' + x for x in WEIGHT_SUFFIXES[:2])} file): "
                "a base without them could never be loaded")
    return None


def import_base(
    reg: Registry,
    model: str,
    source: str,
    *,
    revision: str | None = None,
    description: str = "",
    visibility: str = "private",
    hardware: str = "auto",
) -> Version:
    """Register a base model as a version of ``model`` (created if missing; it must have no versions yet).

    ``source`` is a local Hugging Face folder (copied in with checksums) or a hub id (recorded with its resolved
    commit; the weights stay in the Hugging Face cache).
    """
    # Everything that can fail on the user's input is checked before the model is created, so a failed import
    # leaves the registry as it was.
    parse_model_name(model)
    try:
        has_versions = bool(reg.list_versions(model))
    except ModelNotFoundError:
        has_versions = False
    if has_versions:
        raise ConflictError(
            f"model {model} already has versions", "import a base into a new model name, e.g. OWNER/NAME-base"
        )
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is not a Hugging Face model folder (no config.json)",
                "pass a folder written by save_pretrained, or a hub id",
            )
        if revision is not None:
            raise UsageError(f"--revision {revision} applies to hub ids, but {path} is a local folder",
                             "drop --revision, or check that revision out into the folder first")
        problem = weights_problem(path)
        if problem is not None:
            raise ModelLoadError(f"{path} {problem}", "save the model into the folder with "
                                 "model.save_pretrained(folder) (and its tokenizer) and import again")
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise ModelLoadError(
                f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})",
                "save the tokenizer into the same folder (tokenizer.save_pretrained(folder)) and import again",
            )
        # The copy goes to staging first (a kill leaves only staging, which `registry gc` collects); the model
        # is created just before the publish, and removed again if the publish fails.
        stage = reg.staging_dir("import")
        try:
            for item in path.iterdir():
                if item.name.startswith("."):  # .git, .cache: not part of the model
                    continue
                if item.is_dir():
                    shutil.copytree(item, stage / item.name)
                else:
                    shutil.copy2(item, stage / item.name)
            meta: dict[str, Any] = {"source": {"type": "local", "path": str(path.absolute())}}
            return _publish_base(reg, model, stage, {"local_path": str(path.absolute())}, meta,
                                 dict(description=description, visibility=visibility, hardware=hardware))
        except OSError as err:
            raise not_writable(reg.root, err) from None
        finally:
            _remove(stage)
    if not _HUB_ID_RE.fullmatch(source):
        raise NotFoundError(f"{source!r} is neither an existing folder nor a hub model id", "check the path")
    sha = resolve_hub_revision(source, revision)
    files = hub_files(source, sha)  # fetched now and hashed: what every later load is checked against
    stage = reg.staging_dir("import")
    try:
        meta = {"source": {"type": "hub", "repo_id": source, "revision": sha, "files": files}}
        return _publish_base(reg, model, stage, {"hub_id": source, "revision": sha}, meta,
                             dict(description=description, visibility=visibility, hardware=hardware))
    finally:
        _remove(stage)


def _publish_base(reg: Registry, model: str, stage: Path, parent: dict[str, Any], meta: dict[str, Any],
                  fields: dict[str, str]) -> Version:
    """Publish a staged base as ``model``'s first and only version (two imports racing for one new name: the
    first wins, the second is refused); a model this call created is removed again if the publish fails."""
    try:
        reg.get_model(model)
        created = False
    except ModelNotFoundError:
        reg.create_model(model, exist_ok=True, **fields)
        created = True
    try:
        return reg.publish(model, stage, parent=parent, metadata=meta, kind="base", first=True)
    except BaseException:
        if created:
            try:
                reg.delete_model(model)  # refused (and kept) if another import published into it meanwhile
            except FinetuneError:
                pass
        raise


def _remove(path: Path) -> None:
    # remove_tree, not rmtree: copytree keeps the modes of read-only folders (e.g. a registry version's).
    atomic.remove_tree(path)


def base_source_of(reg: Registry, version: Version) -> BaseSource:
    """The base a *base* version stands for; a base whose files are gone is a clear error."""
    source = version.metadata.get("source", {})
    if source.get("type") == "hub":
        repo_id = source["repo_id"]
        return BaseSource(repo_id, source.get("revision"), version, f"{version.ref} (hub {repo_id})")
    if not (version.path / "config.json").is_file():
        raise ModelLoadError(
            f"base version {version.ref} holds no model files", "re-import it with `finetune models import`"
        )
    return BaseSource(str(version.path), None, version, version.ref)


def resolve_model(reg: Registry, spec: str) -> ResolvedModel:
    """Resolve a ``base_model`` spec: a registry ref, else a local folder, else a hub id.

    A registry ref to a fine-tune continues from that version's adapter on that adapter's own base.
    """
    try:
        ref = parse_ref(spec)
    except UsageError:
        ref = None
    if ref is not None and reg.has_models():
        try:
            reg.get_model(ref.model)
        except NotFoundError:
            pass
        else:
            version = reg.resolve(spec)
            chain = lineage(reg, version)
            base_version = chain[-1]
            base = base_source_of(reg, base_version) if base_version.kind == "base" else _outside_base(base_version)
            check_loadable(reg, chain)  # every file the load reads: the version's own and its base's
            adapter = version if version.kind == "adapter" else None
            return ResolvedModel(spec, base, adapter, chain)
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a Hugging Face model folder (no config.json)")
        local = str(path.absolute())
        return ResolvedModel(spec, BaseSource(local, None, None, local, sha256=folder_sha256(path)))
    if _HUB_ID_RE.fullmatch(spec):
        # Pin the commit when the hub answers; offline, the Hugging Face cache decides, as in transformers.
        revision = None if os.environ.get("HF_HUB_OFFLINE") == "1" else _try_revision(spec)
        return ResolvedModel(spec, BaseSource(spec, revision, None, f"hub {spec}"))
    raise ModelLoadError(
        f"base model {spec!r} not found: not a registry model, a local folder, or a hub id",
        "see `finetune models list`, or import it with `finetune models import`",
    )


def local_base_problem(reg: Registry, version: Version) -> str | None:
    """For a version whose lineage starts from a local folder outside the registry: what is wrong with that
    folder now (gone, or not the content it was trained on), else None. Other lineages are not looked at."""
    try:
        root = lineage(reg, version)[-1]
        parent = root.parent if isinstance(root.parent, dict) else {}
    except FinetuneError:
        return None  # a damaged lineage has its own errors, from loading
    if root.kind == "base" or not parent.get("local_path"):
        return None
    try:
        _outside_base(root)
    except ModelLoadError as err:
        return str(err)
    return None


def _outside_base(version: Version) -> BaseSource:
    """The base of a fine-tune trained straight from a hub id or a local folder (no registry base version)."""
    parent = version.parent if isinstance(version.parent, dict) else {}
    if parent.get("hub_id"):
        return BaseSource(parent["hub_id"], parent.get("revision"), None, f"hub {parent['hub_id']}")
    if parent.get("local_path"):
        path = Path(parent["local_path"])
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"the base of {version.ref}, local folder {path}, is gone (no config.json there)",
                "put the base model back at that path to use this version",
            )
        pinned = parent.get("sha256")  # versions trained before bases were pinned have none
        if pinned and folder_sha256(path) != pinned:
            raise ModelLoadError(
                f"the base of {version.ref}, local folder {path}, is not the model it was trained on (its files "
                f"changed: content sha256 {pinned[:12]} then)",
                "put the original files back at that path; `finetune models import` a base to keep it in the registry")
        return BaseSource(str(path), None, None, str(path), sha256=pinned)
    raise ModelLoadError(
        f"the lineage of {version.ref} ends at {version.ref}, which is not a base model",
        "import the base with `finetune models import`",
    )


def _try_revision(repo_id: str) -> str | None:
    try:
        return resolve_hub_revision(repo_id)
    except ModelLoadError:
        return None
