"""The registry's index: what listings and a server's start need from each model, version and job record,
remembered in one SQLite file so they need not read every file again.

The folders stay the truth; the index only remembers, per entry, what was read from one file and that file's
stamp (inode, size, modification and change times). A listing still lists the folder (so it knows what exists)
and ``stat``\\s each entry's file, but reads only the files whose stamp changed since they were indexed: every
registry write replaces its file (a new inode) or creates it, so a changed file never passes for the old one,
whoever wrote it, with or without this index. Hence:

* the index can be deleted at any time; the next listing reads everything and fills it again
  (``Registry.reindex()`` does it for everything at once);
* one exception, chosen by the kind of record: an ended prediction is never written again (the server saves its
  record for the last time when it ends), so its entry is taken without a ``stat``; a listing still sees it go;
* writers may note what they wrote (:meth:`note`, always after the folder write is committed), which saves the
  next reader a file read, but need not: a crash between the two leaves a stale stamp, which is read again;
* several processes may use it (WAL, a busy timeout); an index that is locked for too long, cannot be written
  (a read-only registry) or is not a database is never an error: that listing reads the files, and a damaged
  index file is removed so the next one starts afresh.

Entries: ``(kind, scope, key)`` -> ``(stamp, value)``: kind ``model`` (key ``owner/name``, value the
``model.json`` text), ``version`` (scope the model, key the number, value the manifest's text), ``trainings``
and ``predictions`` (key the id, value ``STATUS\\nOWNER``: what a server's start needs).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import TypeVar

from .layout import Layout

T = TypeVar("T")
SCHEMA = 1
BUSY_TIMEOUT_S = 2.0
# A writer's note waits little: it may run under a caller's lock (a prediction's record, saved while it streams),
# and a note skipped costs the next reader one file read, nothing more.
NOTE_TIMEOUT_S = 0.05
_BATCH = 500  # rows per statement when many are written at once


def stamp(path: str | Path) -> str | None:
    """What tells one content of a file from another without reading it; None when it does not exist."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


class Catalog:
    """The index of one registry (``Registry.catalog``). ``enabled=False`` reads every file, as without it."""

    def __init__(self, layout: Layout, enabled: bool = True):
        self.layout = layout
        self.enabled = enabled

    # ---------------------------------------------------------------- reading through the index
    def cached(self, kind: str, scope: str, keys: list[str], file_of: Callable[[str], str],
               load: Callable[[str, str], str | None], complete: bool = True,
               settled: Callable[[str], bool] | None = None) -> dict[str, str | None]:
        """For each of ``keys``, the value ``load(key, file_of(key))`` gives for its file as it is now: from the
        index when the file's stamp matches the one indexed, else loaded (and indexed). ``None``: the file is
        missing or ``load`` could not use it (damaged: the caller reads it itself for the error). With
        ``complete``, ``keys`` are the whole of ``(kind, scope)``: entries of other keys are forgotten.

        ``settled(value)`` says that an indexed value can no longer change while its file exists (a prediction
        that ended): such an entry is taken without even a ``stat``."""
        rows = self._rows(kind, scope) if self.enabled else None
        out: dict[str, str | None] = {}
        fresh: list[tuple[str, str, str]] = []
        for key in keys:
            row = rows.get(key) if rows is not None else None
            if row is not None and settled is not None and settled(row[1]):
                out[key] = row[1]
                continue
            path = file_of(key)
            # Stamped before it is read: a change during the read leaves an old stamp, so it is read again.
            now = stamp(path)
            if now is None:
                out[key] = None
                continue
            if row is not None and row[0] == now:
                out[key] = row[1]
                continue
            value = load(key, path)
            out[key] = value
            if value is not None:
                fresh.append((key, now, value))
        if rows is not None:
            gone = [key for key in rows if key not in out] if complete else []
            stale = [key for key in keys if key in rows and out[key] is None]
            self._write(kind, scope, fresh, gone + stale)
        return out

    def note(self, kind: str, scope: str, key: str, path: str | Path, value: str) -> None:
        """Remember ``value`` for the file ``path`` as just written (call after the write is committed)."""
        now = stamp(path)
        if self.enabled and now is not None:
            self._write(kind, scope, [(key, now, value)], [], timeout=NOTE_TIMEOUT_S)

    def forget(self, kind: str, scope: str | None = None) -> None:
        """Drop the entries of ``kind`` (in ``scope``, when given)."""
        if not self.enabled:
            return
        self._run(lambda db: db.execute("DELETE FROM entries WHERE kind = ?" + (" AND scope = ?" if scope else ""),
                                        (kind, scope) if scope else (kind,)))

    def count(self) -> int | None:
        """How many entries the index holds (None: there is no usable index)."""
        return self._run(lambda db: db.execute("SELECT count(*) FROM entries").fetchone()[0])

    # ---------------------------------------------------------------- the database
    def _rows(self, kind: str, scope: str) -> dict[str, tuple[str, str]] | None:
        def read(db: sqlite3.Connection) -> dict[str, tuple[str, str]]:
            cur = db.execute("SELECT key, stamp, value FROM entries WHERE kind = ? AND scope = ?", (kind, scope))
            return {key: (st, value) for key, st, value in cur}
        return self._run(read)

    def _write(self, kind: str, scope: str, rows: list[tuple[str, str, str]], gone: list[str],
               timeout: float | None = None) -> None:
        if not rows and not gone:
            return

        def write(db: sqlite3.Connection) -> None:
            with db:  # one transaction
                for i in range(0, len(gone), _BATCH):
                    part = gone[i:i + _BATCH]
                    db.execute(f"DELETE FROM entries WHERE kind = ? AND scope = ? AND key IN "
                               f"({','.join('?' * len(part))})", (kind, scope, *part))
                db.executemany("INSERT OR REPLACE INTO entries (kind, scope, key, stamp, value) "
                               "VALUES (?, ?, ?, ?, ?)", [(kind, scope, *row) for row in rows])
        self._run(write, timeout)

    def _run(self, work: Callable[[sqlite3.Connection], T], timeout: float | None = None) -> T | None:
        """``work(db)``, or None when there is no usable index now (see the module's docstring)."""
        if not self.enabled or not self.layout.root.is_dir():  # never create a registry by reading one
            return None
        for attempt in range(2):
            try:
                with closing(self._open(BUSY_TIMEOUT_S if timeout is None else timeout)) as db:
                    return work(db)
            except sqlite3.OperationalError as err:
                if attempt or not _damaged(err):
                    return None  # locked past the timeout, read-only, out of space: read the files this time
                self.drop()
            except sqlite3.DatabaseError:  # not a database, a malformed one
                if attempt:
                    return None
                self.drop()
            except OSError:
                return None
        return None

    def _open(self, timeout: float) -> sqlite3.Connection:
        path = self.layout.index_file
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=timeout)
        try:
            if db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA:
                db.execute("PRAGMA journal_mode=WAL")
                with db:
                    db.execute("DROP TABLE IF EXISTS entries")
                    db.execute("CREATE TABLE entries (kind TEXT NOT NULL, scope TEXT NOT NULL, key TEXT NOT NULL, "
                               "stamp TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (kind, scope, key))")
                    db.execute(f"PRAGMA user_version = {SCHEMA}")
            db.execute("PRAGMA synchronous=NORMAL")  # the index may lose its last writes in a crash: it is rebuilt
        except BaseException:
            db.close()
            raise
        return db

    def drop(self) -> None:
        """Remove the index file (and its WAL files), as when it is damaged: the next use starts an empty one."""
        base = self.layout.index_file
        for path in (base, base.with_name(base.name + "-wal"), base.with_name(base.name + "-shm")):
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass


def _damaged(err: sqlite3.OperationalError) -> bool:
    """Whether an operational error means a damaged file (rather than a lock, or a disk that refuses writes)."""
    text = str(err).lower()
    return "malformed" in text or "not a database" in text or "no such table" in text
