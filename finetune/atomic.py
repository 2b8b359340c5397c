"""Durable filesystem primitives: fsync, atomic replace, rename that never overwrites.

The registry's crash-safety rests on three facts of POSIX filesystems: ``rename`` within one filesystem is
atomic; data is only durable after ``fsync`` of the file *and* of the directory that names it; and Linux's
``renameat2(RENAME_NOREPLACE)`` refuses to replace an existing target, so two publishers that somehow picked
the same number cannot clobber each other even if the lock failed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import shutil
import stat
import sys
from pathlib import Path
from typing import Any

from .processes import work_name

FSYNC_ENV = "FINETUNE_FSYNC"
_CHUNK = 1 << 20


def fsync_enabled() -> bool:
    """Whether writes are made durable: always, unless ``FINETUNE_FSYNC=0`` (never the default; for benchmarks
    that create tens of thousands of versions, and tests). Read at each call, so that setting it in a process
    (or a test's ``monkeypatch.setenv``) applies at once, and child processes inherit it."""
    return os.environ.get(FSYNC_ENV, "1") != "0"


def fsync_file(path: Path) -> None:
    if not fsync_enabled():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    if not fsync_enabled():
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_durable(path: Path, data: bytes) -> None:
    """Write a new file and fsync it (the caller fsyncs the directory)."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        if fsync_enabled():
            os.fsync(f.fileno())


def canonical_json(obj: Any) -> bytes:
    """The one JSON encoding used for anything hashed: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def pretty_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def replace_file(path: Path, data: bytes, tmp_dir: Path) -> None:
    """Atomically replace ``path`` with ``data``: write a temp file in ``tmp_dir`` (same filesystem), rename."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    # Named after this process, like the registry's work folders: `gc` must see that a live process owns this
    # file, or it deletes it between the write and the rename below.
    tmp = tmp_dir / work_name("tmp")
    try:
        write_bytes_durable(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk keeps no half-written temp file (it would hold space for ever)
        raise
    fsync_dir(path.parent)


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_LOW_SPACE = 1 << 20  # bytes: below this much free space, a write that failed with no errno ran out of it


def out_of_space(err: BaseException, path: Path) -> bool:
    """Whether ``err`` (or what caused it) means the disk of ``path`` is full. Libraries that write through their
    own streams (``torch.save``, safetensors) lose the errno, so a failure on a disk with almost no space left
    counts too."""
    seen: BaseException | None = err
    for _ in range(8):  # the chain of causes, bounded
        if seen is None:
            break
        if getattr(seen, "errno", None) in _NO_SPACE or "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < _LOW_SPACE


def _load_renameat2():
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _load_renameat2()
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; raise FileExistsError if ``dst`` exists, whatever any lock said."""
    if _RENAMEAT2 is not None:
        rc = _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, "target exists", str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS):  # EINVAL/ENOSYS: filesystem lacks the flag; fall back
            raise OSError(err, os.strerror(err), str(src))
    # Fallback: a plain rename onto a non-empty directory fails with ENOTEMPTY, and version folders are never
    # empty (they hold a manifest), so only the tiny window below an empty target remains.
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "target exists", str(dst))
    try:
        os.rename(src, dst)
    except OSError as err:
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(errno.EEXIST, "target exists", str(dst)) from err
        raise


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def copy_and_hash(src: Path, dst: Path) -> tuple[int, str]:
    """Copy one file, hashing the bytes as they pass; fsync the copy. Returns (size, sha256)."""
    h = hashlib.sha256()
    size = 0
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        while chunk := fin.read(_CHUNK):
            h.update(chunk)
            fout.write(chunk)
            size += len(chunk)
        fout.flush()
        if fsync_enabled():
            os.fsync(fout.fileno())
    return size, h.hexdigest()


def make_read_only(path: Path) -> None:
    """Mark a published tree read-only (files 0444, folders 0555)."""
    for dirpath, dirnames, filenames in os.walk(path):
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    for dirpath, dirnames, _ in os.walk(path, topdown=False):
        os.chmod(dirpath, 0o555)


def remove_tree(path: Path) -> None:
    """Delete a tree, including read-only published folders; safe while another process removes it too."""
    if not os.path.lexists(path):
        return
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            # Read-only folders refuse unlinking their entries: open them up first.
            for dirpath, _, _ in os.walk(path):
                try:
                    os.chmod(dirpath, 0o755)
                except FileNotFoundError:
                    pass
            if sys.version_info >= (3, 12):
                shutil.rmtree(path, onexc=_gone_is_fine_exc)
            else:
                shutil.rmtree(path, onerror=_gone_is_fine)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass  # removed meanwhile by another process doing the same (two `registry gc` at once)


def _gone_is_fine_exc(function: Any, path: str, exc: BaseException) -> None:
    """rmtree's error handler: an entry another process removed first is what we wanted; anything else raises."""
    if not isinstance(exc, FileNotFoundError):
        raise exc


def _gone_is_fine(function: Any, path: str, exc_info: Any) -> None:  # the same, for Python before 3.12
    _gone_is_fine_exc(function, path, exc_info[1])
