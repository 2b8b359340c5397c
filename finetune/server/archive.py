"""A folder as one uncompressed tar stream, produced while it is sent: a version's weights in one download.

Uncompressed because adapter weights (safetensors) hardly compress, and so that the size is known up front
(``Content-Length``) and nothing is buffered: headers are built with :mod:`tarfile`, file bodies read in chunks.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

_BLOCK = tarfile.BLOCKSIZE  # 512
_CHUNK = 1 << 20


def _members(folder: Path) -> list[tuple[Path, str]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                out.append((path, path.relative_to(folder).as_posix()))
    return out


def _header(path: Path, arcname: str, size: int | None = None) -> tuple[bytes, int]:
    st = path.stat()
    info = tarfile.TarInfo(arcname)
    info.size, info.mtime, info.mode = st.st_size if size is None else size, int(st.st_mtime), 0o644
    return info.tobuf(format=tarfile.PAX_FORMAT), info.size


def _body(path: Path, length: int) -> Iterator[bytes]:
    left = length
    with open(path, "rb") as f:
        while left > 0:
            data = f.read(min(_CHUNK, left))
            if not data:  # the file shrank: versions are immutable, so this is damage; keep the layout
                data = b"\0" * left
            left -= len(data)
            yield data


def tar_stream(folder: str | os.PathLike[str], prefix: str = "",
               replace: dict[str, bytes] | None = None) -> tuple[int, Iterator[bytes]]:
    """``(size in bytes, chunks)`` of a tar archive holding every file under ``folder`` (as ``prefix/...``);
    a file named in ``replace`` (by its path inside ``folder``) is sent with the given content instead."""
    folder = Path(folder)
    replace = replace or {}
    members = [(path, name, _header(path, f"{prefix}/{name}" if prefix else name,
                                    len(replace[name]) if name in replace else None))
               for path, name in _members(folder)]
    size = sum(len(header) + length + (-length % _BLOCK) for _, _, (header, length) in members) + 2 * _BLOCK
    size += -size % tarfile.RECORDSIZE

    def chunks() -> Iterator[bytes]:
        written = 0
        for path, name, (header, length) in members:
            yield header
            written += len(header)
            yield from [replace[name]] if name in replace else _body(path, length)
            written += length
            pad = -length % _BLOCK
            if pad:
                yield b"\0" * pad
                written += pad
        yield b"\0" * (size - written)  # end-of-archive blocks, padded to a whole record like tarfile does

    return size, chunks()
