"""`prep resize`: every indexed image to a fixed-size, 8-bit PNG under ``resized/``.

Workers read and transform shards of images (:func:`pipeline.imaging.transform`), write each
PNG atomically under ``resized/`` (whose path, and every file name in it, the client gives them)
and send back only a small record per image: its status or rejection reason, the sha256 of the
file written, the source's format, mode, size and perceptual hashes. The outputs are the same
whichever executor or number of workers ran; with a Dask cluster on other machines the work
directory must be on storage every worker mounts at the same path (docs/cluster.md).

A journal of finished images makes a killed run resumable: before a shard goes to a worker, a
"pending" note names its images, which forgets what earlier runs recorded of them until this
run's records follow, and a file is trusted only through a record, by its sha256. A rerun skips
images whose source content and settings are unchanged and whose output file still holds the
bytes written (their sha256 is in resized.csv). Every path read from labels.csv, resized.csv or
the journal stays inside its root. Per image, the client keeps one tuple of resized.csv's
values and a few numbers, and streams its CSV files out.
"""

from __future__ import annotations

import array
import dataclasses
import hashlib
import json
import logging
import os
import stat
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

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
    return dict(zip(rels, _output_names(rels)))


def _output_names(rels: list[str]) -> list[str]:
    """:func:`output_names`, as a list in the order of ``rels`` (which holds each path once)."""
    names = [os.path.splitext(rel)[0] + ".png" for rel in rels]
    taken = Counter(n.casefold() for n in names)
    for i, name in enumerate(names):
        if taken[name.casefold()] > 1:
            names[i] = rels[i] + ".png"
    taken = Counter(n.casefold() for n in names)
    for i, name in enumerate(names):
        if taken[name.casefold()] > 1:
            names[i] = f"{name[:-4]}-{workdir.sha256_bytes(rels[i].encode())[:8]}.png"
    if len({n.casefold() for n in names}) != len(names):
        raise PrepError("two images map to the same resized file name; rename one of them")
    return names


class Outcome(NamedTuple):
    """What a worker sends back for one image of a shard (the file itself it has written):
    hashes as raw bytes, half the size of their hex on the way."""

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


def resize_shard(
    shard: list[tuple[str, str, tuple | None, str]], root: str, spec: ResizeSpec, out_root: str,
    outside_links: bool = False,
) -> list[Outcome]:
    """Transform each (path, sha256, indexed version, output name) of a shard and write its PNG
    atomically as ``out_root``/name; never raises for a bad image.

    A file is hashed again only if its (size, mtime) differs from the one `prep index` hashed
    (or was not recorded, as for a URL): index's own rule for reusing a hash. Only regular files
    are read, and links only to files inside RAW unless ``outside_links``. ``out_root`` (the
    work directory's ``resized/``, made by the client) must be a folder here: a worker that does
    not see the work directory fails the run rather than write elsewhere; and a name leaving it
    is refused."""
    from .. import imaging  # here, in the workers: a rerun with nothing to do never needs it

    if not os.path.isdir(out_root):
        import socket

        raise PrepError(f"{out_root} is not a folder on {socket.gethostname()}: the workers write the resized files"
                        " into the work directory, so it must be on storage every worker mounts at the same path")
    inside = workdir.Confined(out_root, f"{workdir.RESIZED_DIR}/")
    results = []
    for rel, expected_sha, indexed, name in shard:
        inside(name, f"the output name of {rel}")
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
        target = os.path.join(out_root, name)
        workdir.atomic_write_bytes(target, png, fsync=False)  # makes the folder
        st = os.stat(target)
        results.append(Outcome(
            "ok", "", hashlib.sha256(png).digest(), info.format, info.mode, info.width, info.height,
            bytes.fromhex(info.phash8), bytes.fromhex(info.phash16), st.st_size, st.st_mtime_ns, info.messages,
        ))
    return results


# A record is a tuple of resized.csv's values, in RESIZED_COLUMNS' order, all strings: a tuple
# costs a fifth of a dict, and values that repeat (labels, formats, sizes, settings) are shared.
PATH, LABEL, SHA256, RESIZED, RESIZED_SHA256, STATUS, REASON, WIDTH, HEIGHT, PHASH8, SETTINGS = (
    RESIZED_COLUMNS.index(c) for c in (
        "path", "label", "sha256", "resized", "resized_sha256", "status", "reason", "width", "height", "phash8",
        "settings")
)
_SHARED = (LABEL, STATUS, REASON, RESIZED_COLUMNS.index("format"), RESIZED_COLUMNS.index("mode"), WIDTH, HEIGHT,
           SETTINGS)


def _compact(values: Iterable, memo: dict) -> tuple:
    """A record of ``values`` (resized.csv's, or a journal record's in that order), its values
    that repeat from row to row shared through ``memo``."""
    record = ["" if v is None else v if type(v) is str else str(v) for v in values]
    for i in _SHARED:
        record[i] = memo.setdefault(record[i], record[i])
    return tuple(record)


def journal_entries(wd: workdir.Workdir) -> Iterator[dict]:
    """The journal of an interrupted run (nothing if there is none), in order, read a line at a
    time: a record per image finished, and before each shard goes to a worker a note of the
    images whose files it may write (``{PENDING: [path, ...]}``). A damaged line (the one a
    killed run was writing, garbage, a record lacking a field or naming a path outside its
    root) is left out: its image is redone."""
    try:
        handle = open(wd.path(JOURNAL), "rb")
    except FileNotFoundError:
        return
    names = workdir.Confined(None, workdir.RESIZED_DIR)
    with handle:
        for line in handle:
            try:
                entry = json.loads(line)
                if _journal_entry(entry, names):
                    yield entry
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


def _previous(wd: workdir.Workdir, position: dict[str, int], memo: dict) -> list[tuple | None]:
    """What earlier runs finished, per row of labels.csv (``position``: path -> row): resized.csv,
    then the journal of an interrupted run, whose pending notes forget what came before them."""
    previous: list[tuple | None] = [None] * len(position)
    table = wd.path(workdir.RESIZED)
    if table.exists():
        try:
            for row in workdir.iter_csv(table, RESIZED_COLUMNS, required=["path"]):
                i = position.get(row[PATH])
                if i is not None:
                    previous[i] = _compact(row, memo)
        except (OSError, PrepError):  # unreadable: nothing in it is trusted
            previous = [None] * len(position)
    for entry in journal_entries(wd):
        for path in entry[PENDING] if PENDING in entry else ():
            if (i := position.get(path)) is not None:
                previous[i] = None
        if PENDING not in entry and (i := position.get(entry["path"])) is not None:
            previous[i] = _compact((entry.get(c) for c in RESIZED_COLUMNS), memo)
    return previous


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


def check_outputs(wd: workdir.Workdir, records: list[dict]) -> tuple[set[str], dict[str, list], int]:
    """The resized files of ``records`` (resized.csv's rows with status ok) that hold the bytes
    resize wrote, their :data:`OUTPUT_CACHE` entries, and how many files were read to tell."""
    files = _OutputFiles(wd)
    intact: set[str] = set()
    checked: dict[str, list] = {}
    for record in records:
        name, expected = record.get("resized"), record.get("resized_sha256")
        if record.get("status") == "ok" and expected and isinstance(name, str):
            entry = files.check(name, expected)
            if entry is not None:
                intact.add(name)
                checked[name] = [entry[0], entry[1], expected, entry[2]]
    return intact, checked, files.hashed


def _int64s(n: int) -> array.array:
    """``n`` zeros as 64-bit integers, 8 bytes each (the standard library's arrays: a rerun with
    nothing to do never loads numpy)."""
    return array.array("q", bytes(8 * n))


class _FileEntries:
    """Per row, the :data:`OUTPUT_CACHE` entry of its resized file: (size, mtime_ns, settled), in
    arrays (the sha256 is the record's)."""

    def __init__(self, n: int):
        self.size, self.mtime = _int64s(n), _int64s(n)
        self.settled, self.known = bytearray(n), bytearray(n)

    def set(self, i: int, size: int, mtime_ns: int, settled: bool) -> None:
        self.size[i], self.mtime[i], self.settled[i], self.known[i] = size, mtime_ns, settled, True

    def save(self, wd: workdir.Workdir, records: list[tuple]) -> None:
        """Write :data:`OUTPUT_CACHE` for the records with status ok, in their order, streamed."""
        rows = ((records[i][RESIZED], self.size[i], self.mtime[i], records[i][RESIZED_SHA256], int(self.settled[i]))
                for i, known in enumerate(self.known) if known and records[i][STATUS] == "ok")
        path = output_cache(wd)
        if path is None:
            return
        path.parent.mkdir(exist_ok=True)
        for old in path.parent.glob("resized-files*.csv"):  # of an earlier resized/ folder
            if old != path:
                old.unlink(missing_ok=True)
        workdir.write_csv_rows(path, CACHE_COLUMNS, rows)


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
    table = _current_table(wd, cfg.labels, stamp, stamped)
    if table is not None:
        written, skipped = 0, len(table)
    else:
        labels_sha = workdir.sha256_file(cfg.labels)
        outside_links = follows_outside_links(wd)
        labels = _read_labels(cfg.labels, workdir.Confined(None if outside_links else local, "RAW"))
        if not labels.paths:
            raise PrepError(f"{cfg.labels} lists no images; run `prep index RAW` first")
        table, written, skipped = _resize_all(cfg, labels, root, settings, outside_links)
        if workdir.sha256_file(cfg.labels) == labels_sha:  # not rewritten (by `prep index`) meanwhile
            outputs = [wd.path(n) for n in (workdir.RESIZED, workdir.REJECTED, workdir.RESIZE_SETTINGS)]
            stamp.record([cfg.labels], stamped, outputs)
        else:
            stamp.clear()

    rejected = [r for r in table if r[STATUS] != "ok"]
    result = ResizeResult(
        written=written,
        skipped=skipped,
        rejected=len(rejected),
        total=len(table),
        seconds=time.perf_counter() - started,
        reasons=Counter(r[REASON].split(":")[0] for r in rejected),
    )
    ok = ({"path": r[PATH], "width": r[WIDTH], "height": r[HEIGHT]} for r in table if r[STATUS] == "ok")
    found = checks.size_warnings(ok, spec.width, spec.height)
    checks.report(found)
    checks.record(wd, checks.RESIZE_KINDS, found)
    for r in rejected[:20]:
        log.warning("rejected %s: %s", r[PATH], r[REASON])
    if len(rejected) > 20:
        log.warning("... and %d more rejected images (see %s)", len(rejected) - 20, wd.path(workdir.REJECTED))
    if len(rejected) == len(table):
        raise PrepError(f"every image was rejected ({len(table)}); see {wd.path(workdir.REJECTED)}")
    if cfg.strict and rejected:
        first = rejected[0]
        raise PrepError(
            f"--strict: {len(rejected)} images rejected, first {first[PATH]}: {first[REASON]}"
        )
    return result


class Labels(NamedTuple):
    """labels.csv's columns that resize uses, a list each (a row's values at the same position)."""

    paths: list[str]
    labels: list[str]
    shas: list[str]


def _read_labels(path: Path, inside: workdir.Confined) -> Labels:
    """labels.csv, read a row at a time into columns; every path checked to stay in RAW, and listed once."""
    labels = Labels([], [], [])
    shared: dict[str, str] = {}
    for line, (rel, label, sha, _) in enumerate(workdir.iter_csv(path, LABEL_COLUMNS), start=2):
        labels.paths.append(inside(rel, str(path), line))
        labels.labels.append(shared.setdefault(label, label))
        labels.shas.append(sha)
    return labels


def _current_table(wd: workdir.Workdir, labels: Path, stamp: workdir.Stamp, stamped: dict) -> list[tuple] | None:
    """resized.csv's records when there is nothing to do, else None: the last complete run had
    the same labels CSV and settings and wrote resized.csv and rejected.csv as they are, no
    killed run left a journal, no rejection is worth retrying and every resized file is in
    place, as written. (What the full check of :func:`_resize_all` would conclude, without its
    cost on a rerun of 20,000 images; that check also sweeps out files no image maps to, which
    only the last complete run can have left here, after its own sweep.)"""
    if wd.path(JOURNAL).exists() or not stamp.is_current([labels], stamped):
        return None
    memo: dict[str, str] = {}
    try:
        table = [_compact(row, memo) for row in workdir.iter_csv(wd.path(workdir.RESIZED), RESIZED_COLUMNS)]
    except (OSError, PrepError):  # gone, unreadable or of another layout: the full check rewrites it
        return None
    files, entries = _OutputFiles(wd), _FileEntries(len(table))
    # each row as the full check judges it (the stamp vouches for its sha256 and settings)
    for i, row in enumerate(table):
        if row[STATUS] == "ok":
            entry = files.check(row[RESIZED], row[RESIZED_SHA256]) if row[PHASH8] and row[RESIZED_SHA256] else None
            if entry is None:
                return None
            entries.set(i, *entry)
        elif row[STATUS] != "rejected" or row[REASON].startswith(RETRY_REASONS):
            return None
    if files.hashed:
        entries.save(wd, table)
    return table


def _resize_all(cfg: ResizeConfig, labels: Labels, root: str, settings: str, outside_links: bool
                ) -> tuple[list[tuple], int, int]:
    """Resize what is not up to date, write resized.csv and rejected.csv: the records (in the
    order of labels.csv), the number of images resized and the number already up to date."""
    wd, spec = cfg.workdir, cfg.spec
    paths, shas = labels.paths, labels.shas
    n = len(paths)
    out_dir = wd.path(workdir.RESIZED_DIR)
    position = {path: i for i, path in enumerate(paths)}
    if len(position) != n:
        twice = next(p for p, count in Counter(paths).items() if count > 1)
        raise PrepError(f"{cfg.labels} lists {twice} twice; run `prep index` again")
    names = _output_names(paths)
    inside = workdir.Confined(out_dir, f"{workdir.RESIZED_DIR}/")  # no folder of it a link elsewhere
    for line, name in enumerate(names, start=2):
        inside(name, f"the resized file of {cfg.labels}", line)
    memo: dict[str, str] = {settings: settings}
    previous = _previous(wd, position, memo)
    del position
    files, entries = _OutputFiles(wd), _FileEntries(n)
    records: list[tuple | None] = [None] * n
    todo: list[int] = []
    for i, prev in enumerate(previous):
        previous[i] = None
        if prev is not None and prev[SHA256] == shas[i] and prev[SETTINGS] == settings:
            # a record from an earlier run keeps its file, under the label indexed now
            if prev[STATUS] == "ok":  # a record an earlier prep wrote without hashes is made again
                kept = prev[PHASH8] and prev[RESIZED] == names[i]
                entry = files.check(names[i], prev[RESIZED_SHA256]) if kept else None
                if entry is not None:
                    entries.set(i, *entry)
                    records[i] = (paths[i], labels.labels[i], shas[i], names[i], *prev[RESIZED_SHA256:SETTINGS],
                                  settings)
                    continue
            # a file that could not be read, or had changed, may be fine next time: try it again
            elif prev[STATUS] == "rejected" and not prev[REASON].startswith(RETRY_REASONS):
                records[i] = (paths[i], labels.labels[i], shas[i], *prev[RESIZED:SETTINGS], settings)
                continue
        todo.append(i)
    del previous, files

    journal_path = wd.path(JOURNAL)
    written = 0
    if todo:
        written = _run_shards(cfg, labels, names, todo, records, entries, root, settings, outside_links, memo)

    _write_tables(wd, records)
    workdir.write_json(wd.path(workdir.RESIZE_SETTINGS), dataclasses.asdict(spec))  # the settings, for manifest.json
    journal_path.unlink(missing_ok=True)
    workdir.remove_stale_temps(wd.root)  # temporaries of a run killed while writing
    _remove_orphans(out_dir, {r[RESIZED] for r in records if r[STATUS] == "ok"})
    entries.save(wd, records)
    return records, written, n - len(todo)


def _run_shards(cfg: ResizeConfig, labels: Labels, names: list[str], todo: list[int], records: list,
                entries: _FileEntries, root: str, settings: str, outside_links: bool, memo: dict) -> int:
    """Have the workers resize and write the images of rows ``todo``; journal and keep their
    records (in ``records`` and ``entries``); the number resized."""
    wd, spec = cfg.workdir, cfg.spec
    paths, shas, label_of = labels.paths, labels.shas, labels.labels
    out_dir = wd.path(workdir.RESIZED_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    version = _indexed_versions(wd, root, labels, todo)
    shards = executors.chunk(todo, cfg.execution.slots, max_size=SHARD_IMAGES, min_size=1)
    journal_path = wd.path(JOURNAL)
    if journal_path.is_file() and journal_path.stat().st_size:
        with open(journal_path, "rb+") as journal:
            journal.seek(-1, os.SEEK_END)
            if journal.read(1) != b"\n":
                journal.write(b"\n")  # end the line a killed run was writing, so the next record stands alone
    # before the pool forks: its workers inherit the decoders and the hash's DCT
    from scipy import fftpack  # noqa: F401

    from .. import imaging  # noqa: F401

    written = 0
    with cfg.execution.open() as pool, open(journal_path, "a", encoding="utf-8") as journal, \
            cfg.execution.bar(len(todo), "resize") as bar:

        def jobs() -> Iterator[list]:
            for shard in shards:
                # Its worker may have written files by the time this process is killed, unknown to
                # the journal, and they may differ from what resized.csv says (other settings): first
                # note them as pending, so that the next run makes them again.
                journal.write(_JSON.encode({PENDING: [paths[i] for i in shard]}) + "\n")
                journal.flush()
                yield [(paths[i], shas[i], version(i), names[i]) for i in shard]

        codec_messages = []  # logged once the bar is gone
        out_root = os.path.abspath(out_dir)  # not resolved: a link on this machine may be another's mount
        results = executors.map_shards(pool, resize_shard, jobs(), root, spec, out_root, outside_links)
        for shard, outcomes in zip(shards, results):
            lines = []
            for i, out in zip(shard, outcomes):
                if out.messages:
                    codec_messages.extend((paths[i], message) for message in out.messages)
                if out.status == "ok":
                    written += 1
                    digest, phash8, phash16 = out.digest.hex(), out.phash8.hex(), out.phash16.hex()
                    fmt, mode = memo.setdefault(out.format, out.format), memo.setdefault(out.mode, out.mode)
                    width, height = str(out.width), str(out.height)
                    records[i] = (paths[i], label_of[i], shas[i], names[i], digest, "ok", "", fmt, mode,
                                  memo.setdefault(width, width), memo.setdefault(height, height), phash8, phash16,
                                  settings)
                    entries.set(i, out.size, out.mtime_ns, False)
                    lines.append({"path": paths[i], "label": label_of[i], "sha256": shas[i], "settings": settings,
                                  "status": "ok", "reason": "", "resized": names[i], "resized_sha256": digest,
                                  "format": fmt, "mode": mode, "width": out.width, "height": out.height,
                                  "phash8": phash8, "phash16": phash16})
                else:
                    reason = memo.setdefault(out.reason, out.reason)
                    records[i] = (paths[i], label_of[i], shas[i], "", "", "rejected", reason, "", "", "", "", "", "",
                                  settings)
                    lines.append({"path": paths[i], "label": label_of[i], "sha256": shas[i], "settings": settings,
                                  "status": "rejected", "reason": reason, "resized": ""})
            journal.write("".join(_JSON.encode(line) + "\n" for line in lines))
            journal.flush()
            bar.update(len(shard))
    for path, message in codec_messages:  # libtiff's and Pillow's, shown with -v
        log.info("%s: %s", path, message)
    return written


def _indexed_versions(wd: workdir.Workdir, root: str, labels: Labels, todo: list[int]):
    """row -> the (size, version) `prep index` saw when it hashed the content labels.csv records,
    or None: from its hash cache (an entry per image, not held through the run), into arrays for
    a local RAW, whose versions are mtimes (an ETag, say, is kept in a dict)."""
    n = len(labels.paths)
    sizes, mtimes, known = _int64s(n), _int64s(n), bytearray(n)
    other: dict[int, tuple] = {}
    hashed = workdir.hash_cache(wd, root)
    for i in todo:
        seen = workdir.settled_hash(hashed.get(labels.paths[i]))
        if seen and seen[2] == labels.shas[i]:
            if type(seen[0]) is int and type(seen[1]) is int and -(1 << 63) <= seen[1] < 1 << 63:
                sizes[i], mtimes[i], known[i] = seen[0], seen[1], True
            else:
                other[i] = seen[:2]

    def version(i: int) -> tuple | None:
        return (int(sizes[i]), int(mtimes[i])) if known[i] else other.get(i)

    return version


def _write_tables(wd: workdir.Workdir, records: list[tuple]) -> None:
    """resized.csv and rejected.csv, streamed from the records."""
    workdir.write_csv_rows(wd.path(workdir.RESIZED), RESIZED_COLUMNS, records)
    rejected = ((r[PATH], r[LABEL], r[REASON]) for r in records if r[STATUS] != "ok")
    workdir.write_csv_rows(wd.path(workdir.REJECTED), REJECTED_COLUMNS, rejected)


def _remove_orphans(out_dir: Path, keep: set[str]) -> None:
    """Delete outputs no current image maps to (removed sources, old names, files of a killed
    run's images that were never journaled) and stray temps, then the folders left empty, a
    folder at a time (links to folders are not followed)."""
    folders = []
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        folder = os.path.join(out_dir, rel_dir)
        doomed = []
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(rel)
                    elif rel not in keep:
                        doomed.append(entry.path)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for path in doomed:  # after the listing: the folder is not changed while it is read
            os.unlink(path)
        if rel_dir:
            folders.append(folder)
    for path in reversed(folders):  # a folder is listed after its parent: the deepest first
        if not os.listdir(path):
            os.rmdir(path)
