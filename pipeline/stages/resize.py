"""`prep resize`: every indexed image to a fixed-size, 8-bit PNG under ``resized/``.

Workers read and transform shards of images (:func:`pipeline.imaging.transform`), write each
PNG atomically under ``resized/`` (whose path, and every file name in it, the client gives them)
and send back only a small record per image: its status or rejection reason, the sha256 of the
file written, the source's format, mode, size and perceptual hashes. The outputs are the same
whichever executor or number of workers ran; with a Dask cluster on other machines the work
directory must be on storage every worker mounts at the same path, or a bucket: with a work
directory given as a URL, a Dask cluster's workers PUT each PNG there, and the client's local
copy (pipeline/remote.py) fetches them at the next command (docs/cluster.md).

A journal of finished images makes a killed run resumable: before a shard goes to a worker, a
"pending" note names its images, which forgets what earlier runs recorded of them until this
run's records follow, and a file is trusted only through a record, by its sha256. A rerun skips
images whose source content and settings are unchanged and whose output file still holds the
bytes written (their sha256 is in resized.csv). Every path read from labels.csv, resized.csv or
the journal stays inside its root.

Per image, the client keeps a few numbers in arrays (its path packed with the others, its
sha256 as 32 bytes, where an earlier record of it is in resized.csv or the journal, ...), not
a Python object: a record kept from an earlier run is read again where it was found, as the
tables are written, row by row, in the order of labels.csv. A worker sends back the records of
a shard packed in one bytes object (:class:`Outcomes`).
"""

from __future__ import annotations

import array
import dataclasses
import errno
import hashlib
import itertools
import json
import logging
import os
import re
import stat
import struct
import time
from collections import Counter, deque
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

from .. import checks, executors, sources, workdir
from ..errors import PrepError
from ..spec import PNG_ENCODING, RESIZE_MODES, TRANSFORM_REVISION, ResizeSpec
from .index import LABEL_COLUMNS, SETTLED_NS, follows_outside_links, raw_root

log = logging.getLogger(__name__)

RESIZED_COLUMNS = [
    "path", "label", "sha256", "resized", "resized_sha256", "status", "reason", "format", "mode", "width", "height",
    "phash8", "phash16",  # the source's perceptual hashes (pipeline.nearcopy), for `prep split`
    "settings",
]
REJECTED_COLUMNS = ["path", "label", "reason"]
JOURNAL = "resized.journal"
# per resized file, in resized.csv's order, its size, mtime_ns, sha256 and whether settled (1): a
# file keeping a settled entry's size and mtime is not read again to check it (settled: hashed
# SETTLED_NS or more after it was written). A CSV in the table's order, read a row at a time
# beside it, costs no memory per image as a JSON object by name would.
OUTPUT_CACHE = f"{workdir.CACHE_DIR}/resized-files.csv"
CACHE_COLUMNS = ["resized", "size", "mtime_ns", "resized_sha256", "settled"]
PENDING = "pending"  # a journal line naming outputs about to be written
RETRY_REASONS = ("cannot read file", "file changed since")
SHARD_IMAGES = 1024  # the most images of a shard: few round trips, and a retry redoes little
_JSON = json.JSONEncoder(ensure_ascii=False)  # one for every journal line (json.dumps makes one per call)


@dataclass
class ResizeConfig:
    workdir: workdir.Workdir
    labels: Path
    raw: str | Path | None = None  # a folder or an fsspec URL; default: the one index recorded
    spec: ResizeSpec = dataclasses.field(default_factory=ResizeSpec)
    strict: bool = False
    execution: executors.Execution = field(default_factory=executors.Execution)


@dataclass
class ResizeResult:
    written: int
    skipped: int
    rejected: int
    total: int
    seconds: float
    reasons: Counter

    @property
    def summary(self) -> str:
        rejected = f"{self.rejected} rejected (see rejected.csv); {self.total - self.rejected} usable"
        if self.skipped == self.total:
            return f"Up to date: {self.total} images, {rejected}"
        rate = self.written / self.seconds if self.seconds > 0 and self.written else 0.0
        images = f"{self.written} image{'s' * (self.written != 1)}"
        return f"Resized {images} ({rate:.0f} images/s), {self.skipped} already up to date, {rejected}"


def output_names(rels: list[str]) -> dict[str, str]:
    """``cat/a.jpg`` -> ``cat/a.png``; names that would collide keep their extension (``a.jpg.png``),
    and any clash left after that (compared case-insensitively) gets a hash of the source path."""
    names = _OutputNames(rels)
    names.resolve()
    return {rel: names[i] for i, rel in enumerate(rels)}


class _OutputNames(Sequence[str]):
    """:func:`output_names` of each path of ``paths`` (which holds each path once), by position:
    ``cat/a.png`` for ``cat/a.jpg``, and the few other names in a dict. Clashes are found among
    64-bit hashes of the names (case-folded), ``keys``, in an array, then among the names of
    those hashes only. Made on the way: the hashes of the paths (``path_keys``; either serves a
    :class:`sources.PathIndex`), and the rows whose folder is not the row before's (``turns``)."""

    def __init__(self, paths: Sequence[str]):
        import numpy as np

        self.paths = paths
        self.other: dict[int, str] = {}
        path_keys, keys, self.turns = array.array("q"), array.array("q"), array.array("q")
        plain, folder = self._plain, None
        for i, rel in enumerate(paths):
            path_keys.append(hash(rel))
            keys.append(hash(plain(rel).casefold()))
            if folder is None or not rel.startswith(folder) or "/" in rel[len(folder):]:  # another folder
                folder = rel[: rel.rfind("/") + 1]
                self.turns.append(i)
        self.path_keys, self.keys = np.frombuffer(path_keys, np.int64), np.frombuffer(keys, np.int64).copy()

    def resolve(self) -> None:
        """Rename the names that clash; a one-line error if any clash is left."""
        for rename in (lambda i: self.paths[i] + ".png",
                       lambda i: f"{self[i][:-4]}-{workdir.sha256_bytes(self.paths[i].encode())[:8]}.png"):
            renamed = {i: rename(i) for i in self._clashing()}
            self.other.update(renamed)
            for i, name in renamed.items():
                self.keys[i] = hash(name.casefold())
        if self._clashing():
            raise PrepError("two images map to the same resized file name; rename one of them")

    @staticmethod
    def _plain(rel: str) -> str:
        """``rel`` with ``.png`` for its extension, as os.path.splitext splits it."""
        dot, name = rel.rfind("."), rel.rfind("/") + 1
        if dot > name and rel[name] != ".":  # the usual name: ``stem.ext``
            return rel[:dot] + ".png"
        return os.path.splitext(rel)[0] + ".png"

    def _clashing(self) -> list[int]:
        """The positions whose name another one has too, compared case-insensitively."""
        import numpy as np

        ordered = np.sort(self.keys)
        repeated = ordered[1:][ordered[1:] == ordered[:-1]]
        if not len(repeated):
            return []
        folded = {i: self[i].casefold() for i in np.flatnonzero(np.isin(self.keys, repeated)).tolist()}
        taken = Counter(folded.values())
        return [i for i, name in folded.items() if taken[name] > 1]

    def items(self, rows: list[int], rels: list[str] | None = None) -> list[str]:
        """The names of ``rows`` (whose paths are ``rels``, if given)."""
        names = list(map(self._plain, self.paths.items(rows) if rels is None else rels))
        if self.other:
            names = [self.other.get(i, name) for i, name in zip(rows, names)]
        return names

    def __getitem__(self, i: int) -> str:
        return self.other.get(i) or self._plain(self.paths[i])

    def __iter__(self) -> Iterator[str]:
        other = self.other
        for i, rel in enumerate(self.paths):
            yield other.get(i) or self._plain(rel)

    def __len__(self) -> int:
        return len(self.paths)


class Outcome(NamedTuple):
    """What a worker finds of one image of a shard (the file itself it has written): hashes as
    raw bytes, half the size of their hex."""

    status: str  # "ok" or "rejected"
    reason: str = ""
    digest: bytes = b""  # the sha256 of the PNG written
    format: str = ""
    mode: str = ""
    width: int = 0
    height: int = 0
    phash8: bytes = b""
    phash16: bytes = b""
    size: int = 0  # the file's, as written
    mtime_ns: int = 0
    messages: tuple = ()


# an Outcome packed: rejected or not, digest, phash8, phash16, width, height, size, mtime_ns, and
# the number of its format (of a rejected one: its reason) and mode among the shard's strings
_PACKED = struct.Struct("<?32s8s32sIIqqII")


class Outcomes(Sequence[Outcome]):
    """The outcomes of a shard, as a worker sends them back: packed in one bytes object (with the
    few strings they name, and what the codecs said, if anything), which costs little to send,
    and to receive: a list of records would be taken apart and made again item by item."""

    __slots__ = ("data", "strings", "messages")

    def __init__(self, data: bytes | bytearray = b"", strings: Sequence[str] = (), messages: dict | None = None):
        self.data = bytearray(data)
        self.strings = list(strings)
        self.messages: dict[int, tuple] = dict(messages or {})

    def __reduce__(self):
        return Outcomes, (bytes(self.data), self.strings, self.messages)

    def _string(self, text: str) -> int:
        try:
            return self.strings.index(text)  # a handful: formats, modes, a few reasons
        except ValueError:
            self.strings.append(text)
            return len(self.strings) - 1

    def append(self, out: Outcome) -> None:
        if out.messages:
            self.messages[len(self)] = tuple(out.messages)
        rejected = out.status != "ok"
        self.data += _PACKED.pack(rejected, out.digest, out.phash8, out.phash16, out.width, out.height, out.size,
                                  out.mtime_ns, self._string(out.reason if rejected else out.format),
                                  self._string(out.mode))

    def __len__(self) -> int:
        return len(self.data) // _PACKED.size

    def packed(self) -> Iterator[tuple]:
        """Each outcome as _PACKED's fields (the strings by number): what the client reads."""
        return _PACKED.iter_unpack(self.data)

    def __getitem__(self, k: int) -> Outcome:
        if not 0 <= k < len(self):
            raise IndexError(k)
        rejected, digest, phash8, phash16, width, height, size, mtime, text, mode = _PACKED.unpack_from(
            self.data, k * _PACKED.size)
        messages = self.messages.get(k, ())
        if rejected:
            return Outcome("rejected", self.strings[text], messages=messages)
        return Outcome("ok", "", digest, self.strings[text], self.strings[mode], width, height, phash8, phash16, size,
                       mtime, messages)


def resize_shard(
    shard: list[tuple[str, str, tuple | None, str]], root: str, spec: ResizeSpec, out_root: str,
    outside_links: bool = False,
) -> Outcomes:
    """Transform each (path, sha256, indexed version, output name) of a shard and write its PNG
    as ``out_root``/name; never raises for a bad image.

    A file is hashed again only if its (size, mtime) differs from the one `prep index` hashed
    (or was not recorded, as for a URL): index's own rule for reusing a hash. Only regular files
    are read, and links only to files inside RAW unless ``outside_links``. ``out_root`` is the
    work directory's ``resized/``: a folder, made by the client, where each file is written
    atomically (a worker that does not see it fails the run rather than write elsewhere), or a
    URL (a work directory on a bucket), where each file is one PUT, a few at a time: an object
    appears whole or not at all. A name leaving it is refused."""
    from .. import imaging  # here, in the workers: a rerun with nothing to do never needs it

    writer = _OutputWriter(out_root)
    results = Outcomes()
    for rel, expected_sha, indexed, name in shard:
        writer.inside(name, f"the output name of {rel}")
        try:
            data, seen = sources.read_versioned(root, rel, outside_links=outside_links)
        except OSError as err:
            results.append(Outcome("rejected", f"cannot read file: {err.strerror or err}"))
            continue
        if (seen is None or indexed is None or tuple(indexed) != seen) and workdir.sha256_bytes(data) != expected_sha:
            results.append(Outcome("rejected", "file changed since `prep index`; run it again"))
            continue
        try:
            img, info = imaging.transform(data, spec)
        except imaging.Rejected as err:
            results.append(Outcome("rejected", str(err), messages=err.messages))
            continue
        png = imaging.encode_png(img)
        size, mtime = writer(name, png)
        results.append(Outcome(
            "ok", "", hashlib.sha256(png).digest(), info.format, info.mode, info.width, info.height,
            bytes.fromhex(info.phash8), bytes.fromhex(info.phash16), size, mtime, info.messages,
        ))
    writer.flush()
    return results


class _OutputWriter:
    """Writes a shard's PNGs under ``out_root`` (see :func:`resize_shard`): calling it with (name, png)
    gives the (size, mtime_ns) of the file written (0 for an object, whose time this machine
    does not know); ``flush()`` sends the objects not sent yet."""

    BATCH_BYTES = 8 << 20  # objects sent together (fsspec sends a call's objects concurrently)

    def __init__(self, out_root: str):
        self.out_root = out_root
        self.remote = sources.is_url(out_root)
        if self.remote:
            self.fs, self.base = sources.filesystem(out_root)
            self.pending: dict[str, bytes] = {}
            self.pending_bytes = 0
        elif not os.path.isdir(out_root):
            import socket

            raise PrepError(f"{out_root} is not a folder on {socket.gethostname()}: the workers write the resized files"
                            " into the work directory, so it must be on storage every worker mounts at the same path")
        self.inside = workdir.Confined(None if self.remote else out_root, f"{workdir.RESIZED_DIR}/")

    def __call__(self, name: str, png: bytes) -> tuple[int, int]:
        if self.remote:
            self.pending[f"{self.base}/{name}"] = png  # a name that cannot be a key is refused by the client
            self.pending_bytes += len(png)
            if self.pending_bytes >= self.BATCH_BYTES:
                self.flush()
            return len(png), 0
        target = os.path.join(self.out_root, name)
        workdir.atomic_write_bytes(target, png, fsync=False)  # makes the folder
        st = os.stat(target)
        return st.st_size, st.st_mtime_ns

    def flush(self) -> None:
        if self.remote and self.pending:
            try:
                self.fs.pipe(self.pending)
            except Exception as err:  # OSError, and the storage library's own (no credentials, ...)
                raise PrepError(f"cannot write the resized files to {self.out_root}: {err}") from None
            self.pending, self.pending_bytes = {}, 0


# A record is a tuple of resized.csv's values, in RESIZED_COLUMNS' order, all strings.
PATH, LABEL, SHA256, RESIZED, RESIZED_SHA256, STATUS, REASON, WIDTH, HEIGHT, PHASH8, SETTINGS = (
    RESIZED_COLUMNS.index(c) for c in (
        "path", "label", "sha256", "resized", "resized_sha256", "status", "reason", "width", "height", "phash8",
        "settings")
)


def _record(values: Iterable) -> tuple:
    """A record of ``values`` (resized.csv's, or a journal record's in that order)."""
    return tuple("" if v is None else v if type(v) is str else str(v) for v in values)


def journal_entries(wd: workdir.Workdir) -> Iterator[dict]:
    """The journal of an interrupted run (nothing if there is none), in order, read a line at a
    time: a record per image finished, and before each shard goes to a worker a note of the
    images whose files it may write (``{PENDING: [path, ...]}``). A damaged line (the one a
    killed run was writing, garbage, a record lacking a field or naming a path outside its
    root) is left out: its image is redone."""
    return (entry for _, entry in _journal_lines(wd))


def _journal_lines(wd: workdir.Workdir) -> Iterator[tuple[int, dict]]:
    """:func:`journal_entries`, each with where its line starts in the journal."""
    try:
        handle = workdir.open_regular(wd.path(JOURNAL))  # a FIFO there: "not a regular file", not a wait
    except FileNotFoundError:
        return
    names = workdir.Confined(None, workdir.RESIZED_DIR)
    offset = 0
    with handle:
        for line in handle:
            start, offset = offset, offset + len(line)
            try:
                entry = workdir.json_loads(line)
                if _journal_entry(entry, names):
                    yield start, entry
            except (ValueError, PrepError):  # not UTF-8 or not JSON, or a path leaving its root
                continue


def _journal_entry(entry, names: workdir.Confined) -> bool:
    """Whether a journal line holds what the journal writes: a pending note or a whole record."""
    if not isinstance(entry, dict):
        return False
    if PENDING in entry:
        return isinstance(entry[PENDING], list) and all(isinstance(p, str) for p in entry[PENDING])
    if not all(isinstance(entry.get(key), str) for key in ("path", "sha256", "settings", "status", "reason")):
        return False
    if entry["status"] == "ok":
        names(entry.get("resized"), JOURNAL)
        return isinstance(entry.get("resized_sha256"), str)
    return entry["status"] == "rejected"


class _Earlier:
    """What earlier runs finished, per row of labels.csv: where its latest record is, in
    resized.csv (``where`` >= 0, the offset of its row) or in the journal of an interrupted run
    (``where`` <= -2: -2 - the offset of its line), whose pending notes forget what came before
    them (-1: no record). Records are read again, there, when asked for (:meth:`record`)."""

    def __init__(self, wd: workdir.Workdir, rows: sources.PathIndex):
        import numpy as np

        self.where = np.full(len(rows.paths), -1, np.int64)
        self.table, self.journal = wd.path(workdir.RESIZED), wd.path(JOURNAL)
        self._handles: dict[Path, object] = {}
        if self.table.exists():
            try:
                table = workdir.iter_csv(self.table, ["path"], offsets=True)
                while chunk := list(itertools.islice(table, 4096)):  # looked up a few thousand at a time
                    for i, (offset, _) in zip(rows.find_all([path for _, (path,) in chunk]), chunk):
                        if i >= 0:
                            self.where[i] = offset
                self._columns = self._header()
            except (OSError, PrepError):  # unreadable: nothing in it is trusted
                self.where[:] = -1
        for offset, entry in _journal_lines(wd):
            if PENDING in entry:
                for path in entry[PENDING]:
                    if (i := rows.find(path)) >= 0:
                        self.where[i] = -1
            elif (i := rows.find(entry["path"])) >= 0:
                self.where[i] = -2 - offset

    def _header(self) -> list[int | None]:
        """Where each of RESIZED_COLUMNS is on a row of resized.csv (None: not there)."""
        import csv

        with workdir.open_regular(self.table) as handle:
            header = next(csv.reader(line.decode("utf-8") for line in handle), [])
        return [header.index(c) if c in header else None for c in RESIZED_COLUMNS]

    def _handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = workdir.open_regular(path)
        return self._handles[path]

    def record(self, i: int) -> tuple | None:
        """Row ``i``'s latest record, read again where it was found; None if it has none."""
        import csv

        where = int(self.where[i])
        if where == -1:
            return None
        if where <= -2:
            handle = self._handle(self.journal)
            handle.seek(-2 - where)
            entry = json.loads(handle.readline())
            return _record(entry.get(c) for c in RESIZED_COLUMNS)
        handle = self._handle(self.table)
        handle.seek(where)
        row = next(csv.reader(line.decode("utf-8") for line in handle))
        return _record("" if k is None or k >= len(row) else row[k] for k in self._columns)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


class _OutputFiles:
    """Checks that resized files hold the bytes resize wrote (the ``resized_sha256`` recorded).
    A file keeping the size and mtime of a settled :data:`OUTPUT_CACHE` entry is not read again;
    ``hashed`` counts those read. The cache is read beside the table it was written from, both in
    natural order: rows no longer asked for are passed over, a name not in it (or out of that
    order) has no entry, and only costs a read of its file. A name is checked as text, and its folder
    resolved, before it is joined to ``resized/`` (a name from a damaged record cannot lead
    elsewhere); a link is not a file here."""

    def __init__(self, wd: workdir.Workdir):
        self.wd = wd
        self.root = str(wd.path(workdir.RESIZED_DIR))
        self.inside = workdir.Confined(self.root, f"{workdir.RESIZED_DIR}/")
        self.rows: Iterator[tuple] | None = None  # opened on first use: a run with nothing to check needs none
        self.head: tuple | None = None
        self.started = time.time_ns()
        self.hashed = 0

    def _entry(self, name: str) -> tuple | None:
        try:
            if self.rows is None:
                path = output_cache(self.wd)
                if path is None:
                    raise FileNotFoundError(OUTPUT_CACHE)
                self.rows = workdir.iter_csv(path, CACHE_COLUMNS)
                self.head = next(self.rows, None)
            while self.head is not None:
                row = self.head
                if row[0] == name:
                    self.head = next(self.rows, None)
                    return row
                if workdir.natural_key(row[0]) > workdir.natural_key(name):
                    return None  # a new name: the row waits for its own
                self.head = next(self.rows, None)
        except (OSError, PrepError):  # none yet, or damaged: the files are read
            self.head = None
        return None

    def check(self, name: str, expected: str) -> tuple[int, int, bool] | None:
        """(size, mtime_ns, settled) of the file ``name`` if it holds the bytes of sha256 ``expected``."""
        try:
            self.inside(name, OUTPUT_CACHE)
        except PrepError:
            return None
        path = os.path.join(self.root, name)
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        if self._entry(name) == (name, str(st.st_size), str(st.st_mtime_ns), expected, "1"):
            return st.st_size, st.st_mtime_ns, True
        self.hashed += 1
        try:
            data, st = workdir.read_file(path, follow_links=False)
        except OSError:
            return None
        if workdir.sha256_bytes(data) != expected:
            return None
        # trusted by size and mtime from now on only if written well before it was read: a
        # rewrite within the same clock tick would keep both
        return st.st_size, st.st_mtime_ns, st.st_mtime_ns < self.started - SETTLED_NS


def _int64s(n: int) -> array.array:
    """``n`` zeros as 64-bit integers, 8 bytes each (the standard library's arrays: a rerun with
    nothing to do never loads numpy)."""
    return array.array("q", bytes(8 * n))


class _FileEntries:
    """Per row, the :data:`OUTPUT_CACHE` entry of its resized file: (size, mtime_ns, settled), in
    arrays (the sha256 is the record's)."""

    def __init__(self, n: int):
        self.size, self.mtime = _int64s(n), _int64s(n)
        self.settled = bytearray(n)

    def set(self, i: int, size: int, mtime_ns: int, settled: bool) -> None:
        self.size[i], self.mtime[i], self.settled[i] = size, mtime_ns, settled


def output_cache(wd: workdir.Workdir) -> Path | None:
    """Where :data:`OUTPUT_CACHE` is kept: named after the device and inode of ``resized/``, so a
    work directory copied, unpacked or received from someone else (whose files keep their sizes
    and mtimes, as tar restores them) has none, and its files are read once before any is
    trusted again by its size and mtime. None while there is no ``resized/``."""
    try:
        st = os.stat(wd.path(workdir.RESIZED_DIR))
    except OSError:
        return None
    return wd.path(workdir.CACHE_DIR) / f"resized-files-{st.st_dev}-{st.st_ino}.csv"


class _Tables:
    """resized.csv, rejected.csv and :data:`OUTPUT_CACHE`, written a record at a time in the order
    of labels.csv to temporary files, put in place by :meth:`commit`; and what the run reports of
    them: the records, the rejected ones (the first 20 kept), their reasons, and the source size
    of each row with status ok. A row given writes the rows before it not written yet, all kept
    from an earlier run: ``kept(i)`` gives the record of one, and the cache entry of its file."""

    def __init__(self, wd: workdir.Workdir, n: int, kept: Callable[[int], tuple[tuple, tuple | None]]):
        self.wd = wd
        self.n, self.done, self.kept = n, 0, kept  # done: the rows written
        self.table = workdir.CsvOut(wd.path(workdir.RESIZED), RESIZED_COLUMNS)
        self.rejects = workdir.CsvOut(wd.path(workdir.REJECTED), REJECTED_COLUMNS)
        self.cache = _new_cache(wd)
        self.lines: list[str] = []  # of the table and of the cache, not written yet
        self.cache_lines: list[str] = []
        self.total = 0
        self.rejected: list[tuple[str, str]] = []  # (path, reason), the first 20
        self.reasons: Counter = Counter()
        self.ok = bytearray(n)  # 1: status ok
        self.sizes = _int64s(2 * n)  # width, height of each row with status ok

    def add(self, i: int, record: tuple, entry: tuple[int, int, bool] | None = None,
            size: tuple[int, int] | None = None) -> None:
        """Row ``i``'s record, the cache entry of its file (size, mtime_ns, settled) if it is ok,
        and its source's size (width, height), as ints, if known."""
        while self.done < i:
            self.add(self.done, *self.kept(self.done))
        self.done = i + 1
        self.total += 1
        self._put(record, self.table, self.lines)
        if record[STATUS] != "ok":
            self.rejects.writer.writerow((record[PATH], record[LABEL], record[REASON]))
            self.reasons[record[REASON].split(":")[0]] += 1
            if len(self.rejected) < 20:
                self.rejected.append((record[PATH], record[REASON]))
            return
        self.ok[i] = True
        self._size(i, *(size or (_size(record[WIDTH]), _size(record[HEIGHT]))))
        if entry is not None:
            values = (record[RESIZED], str(entry[0]), str(entry[1]), record[RESIZED_SHA256], "1" if entry[2] else "0")
            self._put(values, self.cache, self.cache_lines)
        if len(self.lines) >= 4096:
            self._flush()

    def _put(self, values: Sequence[str], out: workdir.CsvOut, lines: list[str]) -> None:
        """A row of ``out``: its line kept with the others not written yet, or, if it needs
        quotes, written by the csv writer once they are."""
        line = _csv_line(values)
        if line is None:
            self._flush()
            out.writer.writerow(values)
        else:
            lines.append(line)

    def add_line(self, i: int, line: str, cache_line: str, width: int, height: int) -> None:
        """:meth:`add` of a record with status ok given as its line in resized.csv, and that of
        its cache entry, each as csv.writer writes them."""
        while self.done < i:
            self.add(self.done, *self.kept(self.done))
        self.done = i + 1
        self.total += 1
        self.lines.append(line)
        self.cache_lines.append(cache_line)
        self.ok[i] = True
        self._size(i, width, height)
        if len(self.lines) >= 4096:
            self._flush()

    def _size(self, i: int, width: int, height: int) -> None:
        try:
            self.sizes[2 * i], self.sizes[2 * i + 1] = width, height
        except OverflowError:  # a number a damaged record gives, beyond 64 bits: a list from now on
            self.sizes = list(self.sizes)
            self.sizes[2 * i], self.sizes[2 * i + 1] = width, height

    def _flush(self) -> None:
        self.table.handle.write("".join(self.lines))
        self.cache.handle.write("".join(self.cache_lines))
        self.lines.clear()
        self.cache_lines.clear()

    def commit(self) -> None:
        """The tables and the cache in place (the cache only if there is a ``resized/``), once
        the rows left are written."""
        while self.done < self.n:
            self.add(self.done, *self.kept(self.done))
        self._flush()
        self.table.commit()
        self.rejects.commit()
        _commit_cache(self.wd, self.cache)

    def discard(self) -> None:
        for out in (self.table, self.rejects, self.cache):
            out.discard()

    def summary(self, paths: Sequence[str]) -> "_Summary":
        """What the tables hold; ``paths``: labels.csv's."""
        import numpy as np

        if isinstance(self.sizes, array.array):
            pairs = np.frombuffer(self.sizes, np.int64).reshape(-1, 2)
            rows = np.flatnonzero(np.frombuffer(self.ok, np.bool_) & (pairs != _NO_SIZE).all(axis=1)).tolist()
            sizes = array.array("q", pairs[rows].tobytes())
        else:
            rows = [i for i in range(self.n) if self.ok[i] and _NO_SIZE not in self.sizes[2 * i : 2 * i + 2]]
            sizes = [value for i in rows for value in self.sizes[2 * i : 2 * i + 2]]
        return _Summary(self.total, sum(self.reasons.values()), self.reasons, self.rejected, sizes,
                        lambda ks: [paths[rows[k]] for k in ks])


_NO_SIZE = -(1 << 63)  # a width or height a record does not give as a number (its image is not judged by size)


def _size(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return _NO_SIZE


def _csv_line(values: Sequence[str]) -> str | None:
    """The line csv.writer writes for ``values`` (strings), when none needs quotes: the usual
    record (a third of the writer's cost); else None."""
    line = ",".join(values)
    if line.count(",") != len(values) - 1 or '"' in line or "\n" in line or "\r" in line:
        return None
    return line + "\n"


def _new_cache(wd: workdir.Workdir) -> workdir.CsvOut:
    """:data:`OUTPUT_CACHE`, to be written (its name is known once ``resized/`` is there)."""
    wd.path(workdir.CACHE_DIR).mkdir(exist_ok=True)
    return workdir.CsvOut(wd.path(workdir.CACHE_DIR) / "resized-files.csv", CACHE_COLUMNS)


def _commit_cache(wd: workdir.Workdir, cache: workdir.CsvOut) -> None:
    """``cache`` in place, if there is a ``resized/`` (else it is dropped)."""
    path = output_cache(wd)
    if path is None:
        cache.discard()
        return
    for old in path.parent.glob("resized-files*.csv"):  # of an earlier resized/ folder
        if old != path:
            old.unlink(missing_ok=True)
    cache.path = path
    cache.commit()


class _Summary(NamedTuple):
    """What the run reports of resized.csv: its records, the rejected ones, their reasons (the
    reason up to its first colon), the first 20 rejected (path, reason); and the source size of
    each row with status ok and a size, as :func:`checks.size_warnings` takes them."""

    total: int
    rejected: int
    reasons: Counter
    examples: list[tuple[str, str]]
    sizes: Sequence[int]  # width, height, width, height, ... (an array)
    size_paths: Callable[[list[int]], list[str]]


def _table_paths(table: Path) -> Callable[[list[int]], list[str]]:
    """The paths of the k-th rows of ``table`` with status ok and a size, read from it."""

    def paths(ks: list[int]) -> list[str]:
        wanted, found, k = set(ks), {}, 0
        for rel, status, width, height in workdir.iter_csv(table, ["path", "status", "width", "height"]):
            if status == "ok" and _size(width) != _NO_SIZE and _size(height) != _NO_SIZE:
                if k in wanted:
                    found[k] = rel
                k += 1
        return [found[k] for k in ks]

    return paths


def run(cfg: ResizeConfig) -> ResizeResult:
    """Resize every image of the labels CSV not already resized with these settings; write
    resized.csv and rejected.csv; fail only when every image, or with --strict any, is rejected."""
    started = time.perf_counter()
    wd = cfg.workdir
    spec = cfg.spec
    if spec.mode not in RESIZE_MODES:
        raise PrepError(f"--mode must be one of {', '.join(RESIZE_MODES)}; received {spec.mode!r}")
    if spec.channels not in (1, 3):
        raise PrepError(f"--channels must be 1 or 3; received {spec.channels}")
    root = raw_root(wd, cfg.raw)
    if not sources.is_dir(root):
        if cfg.raw is not None:
            raise PrepError(f"--raw {cfg.raw} is not a folder (expected the RAW root given to `prep index`)")
        raise PrepError(f"RAW folder {root} recorded by `prep index` does not exist (pass --raw)")
    out_dir = wd.path(workdir.RESIZED_DIR)
    local = sources.local_path(root)
    if local is not None and out_dir.resolve().is_relative_to(Path(local).resolve()):
        raise PrepError(f"the work directory {wd.root} is inside RAW {root}; prep never writes into RAW")

    # the encoder's layout too: files another prep wrote differently are made again, so two work
    # directories of the same images hold the same bytes
    settings = workdir.fingerprint({**dataclasses.asdict(spec), "png": PNG_ENCODING, "transform": TRANSFORM_REVISION})
    stamp, stamped = workdir.Stamp(wd, "resize"), {"settings": settings, "raw": root}
    summary = _current_summary(wd, cfg.labels, stamp, stamped)
    if summary is not None:
        written, skipped = 0, summary.total
    else:
        labels_sha = workdir.sha256_file(cfg.labels)
        outside_links = follows_outside_links(wd)
        # before local workers fork: they inherit the decoders and the hash's DCT
        from scipy import fftpack  # noqa: F401

        from .. import imaging  # noqa: F401

        with cfg.execution.pool() as pool:
            labels = _read_labels(cfg.labels, workdir.Confined(None if outside_links else local, "RAW"), labels_sha)
            if not labels.paths:
                raise PrepError(f"{cfg.labels} lists no images; run `prep index RAW` first")
            summary, written, skipped = _resize_all(cfg, labels, root, settings, outside_links, pool)
        if workdir.sha256_file(cfg.labels) == labels_sha:  # not rewritten (by `prep index`) meanwhile
            outputs = [wd.path(n) for n in (workdir.RESIZED, workdir.REJECTED, workdir.RESIZE_SETTINGS)]
            stamp.record([cfg.labels], stamped, outputs)
        else:
            stamp.clear()

    result = ResizeResult(
        written=written,
        skipped=skipped,
        rejected=summary.rejected,
        total=summary.total,
        seconds=time.perf_counter() - started,
        reasons=summary.reasons,
    )
    found = checks.size_warnings(summary.sizes, spec.width, spec.height, summary.size_paths)
    checks.report(found)
    checks.record(wd, checks.RESIZE_KINDS, found)
    for path, reason in summary.examples:
        log.warning("rejected %s: %s", path, reason)
    if summary.rejected > 20:
        log.warning("... and %d more rejected images (see %s)", summary.rejected - 20, wd.path(workdir.REJECTED))
    if summary.rejected == summary.total:
        raise PrepError(f"every image was rejected ({summary.total}); see {wd.path(workdir.REJECTED)}")
    if cfg.strict and summary.rejected:
        path, reason = summary.examples[0]
        raise PrepError(f"--strict: {summary.rejected} images rejected, first {path}: {reason}")
    return result


_HEX = re.compile("[0-9a-f]*")


class _Shas:
    """The sha256 of each row, as labels.csv gives it: 32 bytes for one as index writes it (64
    lowercase hex digits), any other text in a dict."""

    def __init__(self):
        self.data = bytearray()
        self.other: dict[int, str] = {}

    def extend(self, texts: Sequence[str]) -> None:
        joined = "".join(texts)
        if len(joined) == 64 * len(texts) and _HEX.fullmatch(joined):  # the usual: each as index writes it
            self.data += bytes.fromhex(joined)
        else:
            for text in texts:
                self.append(text)

    def append(self, text: str) -> None:
        digest = workdir.sha256_digest(text)
        if digest is None:
            self.other[len(self.data) // 32] = text
        self.data += digest or bytes(32)

    def __getitem__(self, i: int) -> str:
        other = self.other.get(i) if self.other else None
        return other if other is not None else self.data[32 * i : 32 * i + 32].hex()

    def items(self, rows: list[int]) -> list[str]:
        """The sha256s of ``rows``."""
        data = self.data
        found = [data[32 * i : 32 * i + 32].hex() for i in rows]
        if self.other:
            found = [self.other.get(i, sha) for i, sha in zip(rows, found)]
        return found


class Labels(NamedTuple):
    """labels.csv's columns that resize uses, by row: the paths (packed), each row's label (a
    number into ``names``), the sha256s; and the file's own sha256."""

    paths: sources.Paths
    label: array.array
    names: list[str]
    shas: _Shas
    sha256: str = ""

    def label_of(self, i: int) -> str:
        return self.names[self.label[i]]


def _read_labels(path: Path, inside: workdir.Confined, sha256: str = "") -> Labels:
    """labels.csv, read a row at a time into columns (a few thousand rows added at once); every
    path checked to stay in RAW."""
    labels = Labels(sources.Paths(), array.array("i"), [], _Shas(), sha256)
    numbers: dict[str, int] = {}
    rows: list[tuple[str, str, str, str]] = []

    def add() -> None:
        rels, names, shas, _ = zip(*rows)
        for name in dict.fromkeys(names).keys() - numbers.keys():
            numbers[name] = len(labels.names)
            labels.names.append(name)
        labels.paths.extend(rels)
        labels.label.extend(map(numbers.__getitem__, names))
        labels.shas.extend(shas)
        rows.clear()

    for line, row in enumerate(workdir.iter_csv(path, LABEL_COLUMNS), start=2):
        inside(row[0], str(path), line)
        rows.append(row)
        if len(rows) == 4096:
            add()
    if rows:
        add()
    return labels


def _current_summary(wd: workdir.Workdir, labels: Path, stamp: workdir.Stamp, stamped: dict) -> _Summary | None:
    """What resized.csv holds when there is nothing to do, else None: the last complete run had
    the same labels CSV and settings and wrote resized.csv and rejected.csv as they are, no
    killed run left a journal, no rejection is worth retrying and every resized file is in
    place, as written. (What the full check of :func:`_resize_all` would conclude, without its
    cost on a rerun of 20,000 images; that check also sweeps out files no image maps to, which
    only the last complete run can have left here, after its own sweep.) resized.csv is read a
    row at a time; the files read to check them are recorded in :data:`OUTPUT_CACHE`."""
    if wd.path(JOURNAL).exists() or not stamp.is_current([labels], stamped):
        return None
    files = _OutputFiles(wd)
    total, reasons, examples, sizes = 0, Counter(), [], array.array("q")
    entries = array.array("q"), array.array("q"), bytearray()  # size, mtime_ns, settled of each ok row's file
    table = wd.path(workdir.RESIZED)
    try:
        # each row as the full check judges it (the stamp vouches for its sha256 and settings)
        for row in workdir.iter_csv(table, RESIZED_COLUMNS):
            total += 1
            if row[STATUS] == "ok":
                entry = files.check(row[RESIZED], row[RESIZED_SHA256]) if row[PHASH8] and row[RESIZED_SHA256] else None
                if entry is None:
                    return None
                for column, value in zip(entries, entry):
                    column.append(value)
                size = _size(row[WIDTH]), _size(row[HEIGHT])
                if _NO_SIZE not in size:
                    try:
                        sizes.extend(array.array("q", size) if isinstance(sizes, array.array) else size)
                    except OverflowError:  # a number beyond 64 bits (a damaged record): a list from now on
                        sizes = [*sizes, *size]
            elif row[STATUS] != "rejected" or row[REASON].startswith(RETRY_REASONS):
                return None
            else:
                reasons[row[REASON].split(":")[0]] += 1
                if len(examples) < 20:
                    examples.append((row[PATH], row[REASON]))
    except (OSError, PrepError):  # gone, unreadable or of another layout: the full check rewrites it
        return None
    if files.hashed:  # files read: their entries from now on, beside the table read again
        ok = (row for row in workdir.iter_csv(table, ["resized", "resized_sha256", "status"]) if row[2] == "ok")
        cache = _new_cache(wd)
        try:
            for (name, sha, _), size, mtime, settled in zip(ok, *entries):
                cache.writer.writerow((name, size, mtime, sha, settled))
        except BaseException:
            cache.discard()
            raise
        _commit_cache(wd, cache)
    return _Summary(total, sum(reasons.values()), reasons, examples, sizes, _table_paths(table))


def _resize_all(cfg: ResizeConfig, labels: Labels, root: str, settings: str, outside_links: bool,
                pool: Callable[[], Executor]) -> tuple[_Summary, int, int]:
    """Resize what is not up to date, write resized.csv and rejected.csv: what they hold, the
    number of images resized and the number already up to date."""
    import numpy as np

    wd = cfg.workdir
    paths = labels.paths
    n = len(paths)
    out_dir = wd.path(workdir.RESIZED_DIR)
    names = _OutputNames(paths)
    rows = sources.PathIndex(paths, names.path_keys)
    names.path_keys = None
    twice = rows.twice()
    if twice is not None:
        raise PrepError(f"{cfg.labels} lists {twice} twice; run `prep index` again")
    names.resolve()
    _check_names(cfg.labels, out_dir, names, keys=wd.url is not None)
    earlier = _Earlier(wd, rows)
    del rows
    files, entries = _OutputFiles(wd), _FileEntries(n)
    kept = np.zeros(n, np.bool_)
    for i in np.flatnonzero(earlier.where != -1).tolist():
        prev = earlier.record(i)
        if prev is not None and prev[SHA256] == labels.shas[i] and prev[SETTINGS] == settings:
            # a record from an earlier run keeps its file, under the label indexed now
            if prev[STATUS] == "ok":  # a record an earlier prep wrote without hashes is made again
                entry = files.check(names[i], prev[RESIZED_SHA256]) if prev[PHASH8] and prev[RESIZED] == names[i] \
                    else None
                if entry is not None:
                    entries.set(i, *entry)
                    kept[i] = True
                    continue
            # a file that could not be read, or had changed, may be fine next time: try it again
            elif prev[STATUS] == "rejected" and not prev[REASON].startswith(RETRY_REASONS):
                kept[i] = True
                continue
        earlier.where[i] = -1
    del files
    todo = np.flatnonzero(~kept)
    del kept

    def kept_record(i: int) -> tuple[tuple, tuple]:
        """The record of a row kept from an earlier run, under the label indexed now, and the
        cache entry of its file."""
        prev = earlier.record(i)
        if prev[STATUS] == "ok":
            record = (paths[i], labels.label_of(i), labels.shas[i], names[i], *prev[RESIZED_SHA256:SETTINGS], settings)
        else:
            record = (paths[i], labels.label_of(i), labels.shas[i], *prev[RESIZED:SETTINGS], settings)
        return record, (entries.size[i], entries.mtime[i], entries.settled[i])

    tables = _Tables(wd, n, kept_record)
    try:
        written = 0
        if len(todo):
            written = _run_shards(cfg, labels, names, todo, tables, root, settings, outside_links, pool)
        tables.commit()
        earlier.close()
    except BaseException:
        earlier.close()
        tables.discard()
        raise
    workdir.write_json(wd.path(workdir.RESIZE_SETTINGS), dataclasses.asdict(cfg.spec))  # the settings, for manifest.json
    wd.path(JOURNAL).unlink(missing_ok=True)
    for folder in (wd.root, wd.path(workdir.CACHE_DIR)):  # temporaries of a run killed while writing
        workdir.remove_stale_temps(folder)
    _remove_orphans(out_dir, names, tables.ok)
    return tables.summary(paths), written, n - len(todo)


def _check_names(labels: Path, out_dir: Path, names: _OutputNames, keys: bool = False) -> None:
    """Every resized file name stays in ``resized/`` (a one-line error naming the line of the
    first that does not): the name of each row whose folder is not the row before's, and each
    name that is not the plain one. (The text of a name is as safe as its path's, checked against
    RAW's: its folders are the path's, and its file name ends in ``.png``; what is left is to
    resolve each folder.) ``keys``: every name must also be a key of a bucket as it is written (s3fs
    takes ``?versionId=`` for a version, and would cut the name there)."""
    inside = workdir.Confined(out_dir, f"{workdir.RESIZED_DIR}/")  # no folder of it a link elsewhere
    for i in sorted({*names.turns, *names.other}):
        inside(names[i], f"the resized file of {labels}", i + 2)
    if keys:
        for i, name in enumerate(names):
            if "?versionId=" in name:
                raise PrepError(f"{labels} line {i + 2}: path {name!r} holds '?versionId=', which the work directory's"
                                " storage takes for an object's version; rename the file in RAW")


def _run_shards(cfg: ResizeConfig, labels: Labels, names: _OutputNames, todo, tables: _Tables, root: str,
                settings: str, outside_links: bool, pool: Callable[[], Executor]) -> int:
    """Have the workers resize and write the images of rows ``todo`` (in order); journal their
    records and add each to ``tables``; the number resized."""
    wd, spec = cfg.workdir, cfg.spec
    paths, shas = labels.paths, labels.shas
    out_dir = wd.path(workdir.RESIZED_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    versions = _indexed_versions(wd, root, labels)
    journal_file = _open_journal(wd.path(JOURNAL))

    def shards() -> Iterator[list[int]]:
        return (shard.tolist() for shard in executors.shards_of(todo, cfg.execution.slots, max_size=SHARD_IMAGES,
                                                                  min_size=1))

    written = 0
    plain_labels = [not _PLAIN.search(label) for label in labels.names]
    sent: deque[tuple[list[int], list[tuple]]] = deque()  # the rows and jobs of the shards not back yet
    with journal_file as journal, cfg.execution.bar(len(todo), "resize") as bar:

        def jobs() -> Iterator[list]:
            for shard in shards():
                # Its worker may have written files by the time this process is killed, unknown to
                # the journal, and they may differ from what resized.csv says (other settings): first
                # note them as pending, so that the next run makes them again.
                rels = paths.items(shard)
                job = list(zip(rels, shas.items(shard), versions(shard), names.items(shard, rels)))
                journal.write(_JSON.encode({PENDING: rels}) + "\n")
                journal.flush()
                sent.append((shard, job))
                yield job

        codec_messages = []  # logged once the bar is gone
        out_root = wd.for_workers(workdir.RESIZED_DIR, cfg.execution.executor)
        for outcomes in executors.map_shards(pool(), resize_shard, jobs(), root, spec, out_root, outside_links):
            shard, job = sent.popleft()
            strings = outcomes.strings
            plain = [not _PLAIN.search(text) for text in strings]
            # the usual shard: no path, sha256 or name to quote in the CSV or escape in JSON
            plain_job = not _PLAIN.search("".join(text for path, sha, _, name in job for text in (path, sha, name)))
            lines = []
            for k, (i, (path, sha, _, name), packed) in enumerate(zip(shard, job, outcomes.packed())):
                rejected, digest, phash8, phash16, width, height, size, mtime, text, mode_at = packed
                label = labels.names[labels.label[i]]
                for message in outcomes.messages.get(k, ()):
                    codec_messages.append((path, message))
                if rejected:
                    record = (path, label, sha, "", "", "rejected", strings[text], "", "", "", "", "", "", settings)
                    tables.add(i, record)
                    lines.append(_journal_line(record))
                    continue
                written += 1
                digest, phash8, phash16 = digest.hex(), phash8.hex(), phash16.hex()
                fmt, mode = strings[text], strings[mode_at]
                if plain_job and plain[text] and plain[mode_at] and plain_labels[labels.label[i]]:
                    # resized.csv's line and the journal's, as csv.writer and the JSON encoder write them
                    tables.add_line(i, f"{path},{label},{sha},{name},{digest},ok,,{fmt},{mode},{width},{height},"
                                       f"{phash8},{phash16},{settings}\n", f"{name},{size},{mtime},{digest},0\n",
                                    width, height)
                    lines.append(f'{{"path": "{path}", "label": "{label}", "sha256": "{sha}", "settings": "{settings}",'
                                 f' "status": "ok", "reason": "", "resized": "{name}", "resized_sha256": "{digest}",'
                                 f' "format": "{fmt}", "mode": "{mode}", "width": {width}, "height": {height},'
                                 f' "phash8": "{phash8}", "phash16": "{phash16}"}}\n')
                    continue
                record = (path, label, sha, name, digest, "ok", "", fmt, mode, str(width), str(height), phash8, phash16,
                          settings)
                tables.add(i, record, (size, mtime, False), (width, height))
                lines.append(_journal_line(record))
            journal.write("".join(lines))
            journal.flush()
            bar.update(len(shard))
    for path, message in codec_messages:  # libtiff's and Pillow's, shown with -v
        log.info("%s: %s", path, message)
    return written


def _open_journal(path: Path):
    """The journal, opened to append to (text), its last line ended if a killed run left it
    unended, so that the next record stands alone. Not through a link, nor a FIFO: a work
    directory someone sent may hold a journal that points elsewhere."""
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise PrepError(f"{path} is a symbolic link; prep keeps its journal in a regular file there:"
                            " remove the link") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PrepError(f"{path} is not a regular file; prep keeps its journal there: remove it")
        if st.st_size and os.pread(fd, 1, st.st_size - 1) != b"\n":
            os.write(fd, b"\n")
        return open(fd, "a", encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise


# a character csv.writer would quote (QUOTE_MINIMAL), or the journal's JSON encoder escape
_PLAIN = re.compile(r'[\x00-\x1f",\\]')


def _journal_line(record: tuple) -> str:
    """The journal's line of a record (the JSON of its fields in this order, sizes as numbers)."""
    if record[STATUS] != "ok":
        return _JSON.encode({"path": record[PATH], "label": record[LABEL], "sha256": record[SHA256],
                             "settings": record[SETTINGS], "status": "rejected", "reason": record[REASON],
                             "resized": ""}) + "\n"
    fields = dict(zip(("path", "label", "sha256", "settings", "status", "reason", "resized", "resized_sha256"),
                      (record[PATH], record[LABEL], record[SHA256], record[SETTINGS], "ok", "", record[RESIZED],
                       record[RESIZED_SHA256])))
    fields.update(zip(("format", "mode", "width", "height", "phash8", "phash16"), record[REASON + 1 : SETTINGS]))
    fields["width"], fields["height"] = int(fields["width"]), int(fields["height"])
    return _JSON.encode(fields) + "\n"


def _indexed_versions(wd: workdir.Workdir, root: str, labels: Labels) -> Callable[[list[int]], list]:
    """rows -> the (size, version) `prep index` saw of each when it hashed the content labels.csv
    records, or None: from its hash cache, whose rows are those of labels.csv if it is the file
    index wrote. (Only a local file's version, its mtime, is compared by the workers.)"""
    cache = workdir.HashCache.read(wd, root, labels.sha256) if labels.sha256 else None
    if cache is None or len(cache) != len(labels.paths) or sources.local_path(root) is None:
        return lambda rows: [None] * len(rows)
    return lambda rows: list(map(cache.seen, rows))


def _folded_key(name: str) -> int:
    return hash(name.casefold())


def _remove_orphans(out_dir: Path, names: _OutputNames, ok) -> None:
    """Delete outputs no current image maps to (removed sources, old names, files of a killed
    run's images that were never journaled) and stray temps, then the folders left empty, a
    folder at a time (links to folders are not followed). ``names``: every row's name, of which
    those of the rows ``ok`` (status ok) are kept."""
    import numpy as np

    index = sources.PathIndex(names, names.keys, np.flatnonzero(np.frombuffer(ok, np.bool_)), _folded_key)
    folders = []
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        folder = os.path.join(out_dir, rel_dir)
        doomed: list[str] = []
        files: list[str] = []  # files not looked up yet: a few thousand at a time

        def look_up() -> None:
            doomed.extend(rel for rel, row in zip(files, index.find_all(files)) if row < 0)
            files.clear()

        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(rel)
                    else:
                        files.append(rel)
                        if len(files) == 4096:
                            look_up()
            look_up()
        except (FileNotFoundError, NotADirectoryError):
            continue
        for rel in doomed:  # after the listing: the folder is not changed while it is read
            os.unlink(os.path.join(out_dir, rel))
        if rel_dir:
            folders.append(folder)
    for path in reversed(folders):  # a folder is listed after its parent: the deepest first
        if not os.listdir(path):
            os.rmdir(path)
