"""What is loaded is what was published: every file a load reads is checked against the sha256 recorded for it.

Loading a version reads two sets of files: its own (an adapter, or a base's weights) and its base's. Both are
checked before anything is read (:func:`check_loadable`, on every load, fast through :mod:`.hashes`); a base that
stays in the Hugging Face cache is checked against the hashes recorded when it was imported (:func:`hub_files`).
``finetune versions verify`` re-hashes a version's base in full too (:func:`lineage_problems`), so a child of a
damaged base does not verify ok.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import atomic
from ..errors import FinetuneError, IntegrityError, ModelLoadError
from .hashes import check_files, check_version_files
from .manifest import check_version_dir

if TYPE_CHECKING:
    from .manifest import Version
    from .store import Registry

# What loading a hub model reads (weights, config, tokenizer, chat template); other files are not fetched.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]


def hub_files(repo_id: str, revision: str) -> dict[str, dict[str, Any]]:
    """Fetch a hub model at ``revision`` into the Hugging Face cache and return ``{file: {size, sha256}}`` of
    what loading it reads: the hashes an imported hub base is checked against ever after."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS))
        if not any(folder.rglob("*.safetensors")):  # an older repository: PyTorch weights instead
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=[*_HUB_PATTERNS, "*.bin"]))
    except Exception as err:  # the hub client raises many types; all mean "cannot fetch"
        first = str(err).splitlines()[0] if str(err) else ""
        raise ModelLoadError(f"cannot fetch hub model {repo_id!r} at {revision[:12]}: {type(err).__name__}: {first}",
                             "check the id and your network, or import a local folder with --from PATH") from None
    files = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(f for f in filenames if not f.startswith(".")):
            path = Path(dirpath) / name
            files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size,
                                                          "sha256": atomic.sha256_file(path)}
    return files


def _hub_snapshot(source: dict[str, Any]) -> Path | None:
    """The local copy of a hub base, or None while it is not in the Hugging Face cache (loading fetches it)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source["repo_id"], revision=source.get("revision"), local_files_only=True))
    except Exception:  # not cached (yet): nothing local to check
        return None


def base_problems(reg: Registry, base: Version, full: bool) -> list[str]:
    """What is wrong with a base version's files: its own (``full``: re-hashed, else through the cache), and
    the files of a hub base in the Hugging Face cache against the hashes recorded at import."""
    problems = check_version_dir(base.path, full=True) if full else check_version_files(reg, base)
    source = base.metadata.get("source") or {}
    if not problems and source.get("type") == "hub" and isinstance(source.get("files"), dict):
        folder = _hub_snapshot(source)
        if folder is not None:
            hub = check_files(reg, f"{base.id}:hub", folder, source["files"])
            problems += [f"{p} (hub {source['repo_id']} in the Hugging Face cache)" for p in hub]
    return problems


def _restore_hint(base: Version) -> str:
    source = base.metadata.get("source") or {}
    if source.get("type") == "hub":
        return (f"fetch it again: `hf download {source.get('repo_id')} --revision {source.get('revision')} "
                "--force-download`")
    where = f" (it was imported from {source['path']})" if source.get("path") else ""
    return f"restore the files of {base.ref}{where}; `finetune versions verify {base.ref}` lists what is wrong"


def check_loadable(reg: Registry, chain: list[Version]) -> None:
    """Check every file a load of ``chain[0]`` (a version and its lineage down to the base) reads: the
    version's own and its base's. Raises :class:`IntegrityError` naming the first problem."""
    top, base = chain[0], chain[-1]
    if top.kind == "base":
        problems = base_problems(reg, top, full=False)
        if problems:
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            raise IntegrityError(f"{top.ref} is damaged: {problems[0]}{more}", _restore_hint(top))
        return
    reg.check(top)
    if base is not top and base.kind == "base":
        problems = base_problems(reg, base, full=False)
        if problems:
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            raise IntegrityError(f"base model {base.ref} of {top.ref} is damaged: {problems[0]}{more}",
                                 _restore_hint(base))


def lineage_problems(reg: Registry, version: Version) -> list[str]:
    """For ``finetune versions verify``: what is wrong with the base ``version`` loads on, re-hashed in full,
    each line naming it (the version's own files are :meth:`Registry.verify`'s)."""
    from .lineage import lineage

    try:
        chain = lineage(reg, version)
    except FinetuneError as err:
        return [f"lineage: {err.message}"]
    base = chain[-1]
    if base is version or base.kind != "base":
        return []
    return [f"base {base.ref}: {p}" for p in base_problems(reg, base, full=True)]
