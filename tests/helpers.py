"""Helpers shared by several test files (fixtures live in conftest.py)."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its type, mode and content hash: equal snapshots mean an unchanged tree."""
    out: dict[str, tuple] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else None
            out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), digest)
    return out


def assert_one_line_error(rc: int | None, err: str, *needles: str) -> None:
    """The CLI failed (when ``rc`` is given) with exactly one ``finetune: error:`` line holding every needle."""
    if rc is not None:
        assert rc != 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("finetune: error: "), repr(err)
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
