"""The record of a URL work directory's local copy (see :mod:`pipeline.remote`): what the copy
holds, as fetched or uploaded, in SQLite beside it, so that a copy of millions of files costs a
lookup per file, not memory, and a transfer stopped midway keeps what it moved."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Iterator

from . import workdir
from .errors import PrepError

OLD_RECORDS = ("state.json", "state.resized.json")  # earlier preps' records: taken over once
LAST = (workdir.STAMPS_DIR + "/", "manifest.json")  # uploaded after everything else
PAGE = 1024  # names of the record read at once


class Record:
    """What a mirror holds, as fetched or uploaded: per file, its size, mtime and inode here and
    its version at the URL (None: not known yet, after an upload), and whether it was removed here
    but not yet at the URL. Kept in SQLite beside the mirror, not in memory: a copy of millions of
    files costs a lookup per file, and each batch of transfers is committed as it ends, so a
    command stopped midway keeps the record of what it moved. ``found``: whether a record of this
    URL was there (else the copy starts afresh). ``dirty``: the folders of ``apart`` (those a
    command may leave at the URL) that a command may have changed since they were last uploaded
    whole (none may be left alone then). ``name_problem(rel)``: why a name taken over from an
    earlier prep's record cannot be a file of the copy, or None."""

    def __init__(self, path: Path, url: str, name_problem, apart: tuple[str, ...]):
        self.path, self.url, self.name_problem, self.apart = path, url, name_problem, apart
        try:
            self.db = self._open()
        except sqlite3.OperationalError:  # locked, a full disk, ...: said (see _recorded)
            raise
        except sqlite3.DatabaseError:  # not a database, or damaged: as if there were none
            path.unlink(missing_ok=True)
            self.db = self._open()
        self.found = self._meta("url") == url
        if not self.found:
            self.db.execute("DELETE FROM files")
            self.db.execute("DELETE FROM meta")
            self._set_meta("url", url)
            self.found = self._take_over_old()
            self.db.commit()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60)
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        db.execute("CREATE TABLE IF NOT EXISTS files (rel TEXT PRIMARY KEY, size INTEGER, mtime INTEGER,"
                   " ino INTEGER, version TEXT, removed INTEGER DEFAULT 0, seen INTEGER DEFAULT 0) WITHOUT ROWID")
        db.execute("CREATE TEMP TABLE pending (rel TEXT PRIMARY KEY) WITHOUT ROWID")  # to upload
        db.commit()
        return db

    def _meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _set_meta(self, key: str, value: str | None) -> None:
        if value is None:
            self.db.execute("DELETE FROM meta WHERE key = ?", (key,))
        else:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def _take_over_old(self) -> bool:
        """The record an earlier prep kept in JSON beside the mirror, taken over (its files then
        need no fetch) and removed; whether there was one."""
        found = False
        for name in OLD_RECORDS:
            old = self.path.with_name(name)
            try:
                state = workdir.read_json(old)
            except (OSError, PrepError, UnicodeDecodeError):
                continue
            if isinstance(state, dict) and state.get("url") == self.url and isinstance(state.get("files"), dict):
                found = found or name == OLD_RECORDS[0]
                self.db.executemany("INSERT OR REPLACE INTO files (rel, size, mtime, ino, version) VALUES (?, ?, ?, ?, ?)",
                                    ((rel, *entry) for rel, entry in state["files"].items()
                                     if self.name_problem(rel) is None and isinstance(entry, list) and len(entry) == 4))
        if found:  # whether it uploaded all of them is not known
            self._set_meta("dirty", "/".join(self.apart))
        self.db.commit()
        for name in OLD_RECORDS:
            self.path.with_name(name).unlink(missing_ok=True)
        return found

    @property
    def dirty(self) -> set[str]:
        return set(filter(None, (self._meta("dirty") or "").split("/")))

    def set_dirty(self, folders) -> None:
        self._set_meta("dirty", "/".join(sorted(folders)) or None)
        self.db.commit()

    def next_pass(self) -> int:
        """A number for a pass over the files: those it sees are marked with it."""
        last = self._meta("pass") or ""
        number = (int(last) if last.isdigit() else 0) + 1
        self._set_meta("pass", str(number))
        return number

    def get(self, rel: str) -> tuple | None:
        """(size, mtime_ns, inode, version, removed) of ``rel``, or None."""
        return self.db.execute("SELECT size, mtime, ino, version, removed FROM files WHERE rel = ?", (rel,)).fetchone()

    def put(self, rel: str, st: list, version: str | None, seen: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, 0, ?)", (rel, *st, version, seen))

    def see(self, rel: str, version: str | None, seen: int) -> None:
        self.db.execute("UPDATE files SET version = ?, seen = ? WHERE rel = ?", (version, seen, rel))

    def mark_removed(self, rel: str) -> None:
        self.db.execute("UPDATE files SET removed = 1 WHERE rel = ?", (rel,))

    def drop(self, rel: str) -> None:
        self.db.execute("DELETE FROM files WHERE rel = ?", (rel,))

    def add_pending(self, rel: str) -> None:
        self.db.execute("INSERT OR IGNORE INTO pending VALUES (?)", (rel,))

    def pending(self, last: bool) -> Iterator[str]:
        """The files noted to upload: the stamps and manifest (:data:`LAST`) if ``last``, else
        the others, a page at a time (each taken off as it comes)."""
        stamps, manifest = LAST  # "0" follows "/"
        while True:
            page = [row[0] for row in self.db.execute(
                f"SELECT rel FROM pending WHERE {'' if last else 'NOT '}(rel >= ? AND rel < ? OR rel = ?)"
                f" ORDER BY rel LIMIT {PAGE}", (stamps, stamps[:-1] + "0", manifest))]
            self.db.executemany("DELETE FROM pending WHERE rel = ?", ((rel,) for rel in page))
            yield from page
            if len(page) < PAGE:
                return

    def clear(self) -> None:
        self.db.execute("DELETE FROM files")
        self.db.commit()

    def unseen(self, seen: int, left: tuple[str, ...], removed: bool = False) -> Iterator[str]:
        """The files not seen by pass ``seen`` (only those removed here, if ``removed``), but in
        the folders ``left``, a page at a time: a caller may drop them as they come."""
        where = " AND ".join(["seen != ?", *(["removed = 1"] if removed else []),
                              *["NOT (rel >= ? AND rel < ?)"] * len(left)])
        bounds = [b for folder in left for b in (folder + "/", folder + "0")]  # "0" follows "/"
        after = ""
        while True:
            page = [row[0] for row in self.db.execute(
                f"SELECT rel FROM files WHERE rel > ? AND {where} ORDER BY rel LIMIT {PAGE}", (after, seen, *bounds))]
            yield from page
            if len(page) < PAGE:
                return
            after = page[-1]

    def commit(self) -> None:
        self.db.commit()
