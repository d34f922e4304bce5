"""`prep verify`: prove that the packaged files hold what manifest.json says they hold.

Checks in order, stopping at the first mismatch with a one-line message that names the
file, split and index:

1. files: every file listed in manifest.json is present with its size and sha256, and no
   unlisted file sits in a packaged folder;
2. inputs: encoded.csv and classes.json are the ones packed, its counts match the manifest,
   and no content hash (sha256) and no group (its ``group`` column: images `prep split` keeps
   together, as near copies or a user group) appears in two splits;
3. formats: every format's structure (counts, shapes, dtypes, attributes), read back with the
   format's own reader;
4. samples, streaming: in every format each sample's label is in range and equals encoded.csv's,
   its path (where stored) too, and the digest of its pixels equals the digest of the resized
   PNG it came from (decoded in worker processes), so all formats hold identical pixels; and
   each resized PNG is still the file resize wrote (its sha256 is encoded.csv's), so pixels
   edited after resize are caught even when they were packed.

manifest.json's entries and encoded.csv's resized names are checked to stay inside the work
directory before any of them is read. encoded.csv is read a line at a time, once for 2 and once
per split for 4, so memory does not grow with the dataset (but for a hash or two per image in 2).

A rerun skips what has not changed since a run that passed (:class:`Checked`, kept in
``.cache/verified.json``): a file keeping the size, mtime and inode it had when it was hashed is
not hashed again, and a check whose inputs all kept their sha256 (2-4) is not run again: with
nothing changed, a rerun reads no image. A changed file invalidates what depends on it only:
an edited tfrecord shard, resealed in manifest.json, re-reads tfrecord and the resized PNGs it is
compared to, not the other formats. The resized PNGs count as unchanged while their folders keep
their mtimes (resize replaces a file by renaming a new one in, which changes its folder's), or,
where a Dask run reads them at the work directory's URL, while the listing there keeps every
object's name, size and ETag; a PNG rewritten in place is caught by ``prep verify --full``,
which checks everything again.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import logging
import os
import time
from array import array
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .. import executors, manifest, sources, workdir
from ..errors import PrepError, VerificationFailed
from ..formats import FORMATS, SPLITS, Layout, PackOptions
from .index import SETTLED_NS
from .pack import Row, in_shards, iter_rows, joined, out_of_date

log = logging.getLogger(__name__)

VERIFIED = f"{workdir.CACHE_DIR}/verified.json"  # what the last passing run checked (see Checked)


@dataclass
class VerifyConfig:
    workdir: workdir.Workdir
    execution: executors.Execution = field(default_factory=executors.Execution)
    full: bool = False  # check everything again, whatever an earlier run found


@dataclass
class VerifyResult:
    formats: list[str]
    files: int
    bytes: int
    layout: Layout
    against_source: bool
    seconds: float
    unchanged_since: str | None = None  # when nothing was checked again: the time of the run that did
    rechecked: list[str] = field(default_factory=list)  # what was checked again (all of it on a first run)

    @property
    def summary(self) -> str:
        counts = ", ".join(f"{s} {self.layout.counts[s]}" for s in SPLITS)
        head = (
            f"Verified {', '.join(self.formats)}: {self.files} file{'s' * (self.files != 1)}, {self.bytes:,} bytes,"
            f" {sum(self.layout.counts.values())} images ({counts}; shape {self.layout.shape};"
            f" {len(self.layout.classes)} classes)"
        )
        if self.unchanged_since:
            return f"{head}: unchanged since the last check at {self.unchanged_since} (prep verify --full checks again)."
        reference = "the resized PNGs" if self.against_source else "each other (resized PNGs not found)"
        return (
            f"{head} in {self.seconds:.1f} s. Checksums, counts, shapes, dtypes and labels match;"
            f" pixels match {reference}."
        )


class Checked:
    """What earlier passing runs checked (:data:`VERIFIED`), and what this one checks.

    ``files``: relative path -> [size, mtime_ns, inode, sha256, settled] of each file hashed; a
    file keeping a settled entry's size, mtime and inode is not hashed again (settled: its mtime
    was SETTLED_NS older than the run, as a rewrite within one clock tick keeps it). ``units``:
    check -> the key it passed with, a digest of everything it depends on. ``folders``: the
    mtimes of the resized PNGs' folders when the PNGs were checked."""

    def __init__(self, wd: workdir.Workdir, full: bool):
        self.path = wd.path(VERIFIED)
        self.started = time.time_ns()
        recorded = {}
        if not full:
            try:
                recorded = workdir.read_json(self.path)
            except (OSError, PrepError):
                pass
        if not isinstance(recorded, dict):
            recorded = {}
        self.old_files = recorded.get("files") if isinstance(recorded.get("files"), dict) else {}
        self.old_units = recorded.get("units") if isinstance(recorded.get("units"), dict) else {}
        self.folders = recorded.get("folders") if isinstance(recorded.get("folders"), dict) else {}
        self.at = recorded.get("checked_at")
        self.files: dict[str, list] = {}

    def sha256(self, path: Path, rel: str) -> str:
        """The sha256 of ``path``, read again unless a settled entry of the same file says it."""
        st = os.stat(path)
        seen = [st.st_size, st.st_mtime_ns, st.st_ino]
        known = self.old_files.get(rel)
        if isinstance(known, list) and len(known) == 5 and known[4] is True and known[:3] == seen:
            digest = known[3]
        else:
            digest = workdir.sha256_file(path)
        self.files[rel] = [*seen, digest, st.st_mtime_ns < self.started - SETTLED_NS]
        return digest

    def passed(self, unit: str, key: str | None) -> bool:
        return key is not None and self.old_units.get(unit) == key

    def save(self, units: dict[str, str | None], folders: dict[str, int | None], at: str | None = None) -> None:
        """Record a passing run (``at``: when what it found unchanged was checked; now if None);
        a work directory this process cannot write keeps its old record."""
        at = at or dt.datetime.fromtimestamp(self.started / 1e9, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        record = {"checked_at": at, "files": self.files, "units": units, "folders": folders}
        try:
            workdir.write_json(self.path, record)
        except OSError as err:
            log.debug("%s not written (%s); the next run checks everything again", self.path, err)


def source_state(wd: workdir.Workdir, source: str, folders) -> dict[str, int | str | None]:
    """What the check of the resized PNGs in ``source`` is keyed on (None: nothing to trust):
    here, the mtimes of their ``folders`` (:func:`folder_times`); at the work directory's URL,
    where a Dask run's copy leaves them, a digest of the listing of every object there (name,
    size and ETag, a thousand objects per request, none read), as no folder has a time."""
    if not sources.is_url(source):
        return folder_times(wd, folders)
    return {source: sources.listing_digest(source)}


def folder_times(wd: workdir.Workdir, folders) -> dict[str, int | None]:
    """The mtime (ns) of each folder of ``resized/`` named, None for one missing or modified too
    recently to be trusted (a change within the same clock tick would keep it)."""
    base = wd.path(workdir.RESIZED_DIR)
    now = time.time_ns()
    times: dict[str, int | None] = {}
    for rel in folders:
        try:
            mtime = os.stat(base / rel).st_mtime_ns
        except OSError:
            mtime = None
        times[rel] = mtime if mtime is not None and mtime < now - SETTLED_NS else None
    return times


def check_files(wd: workdir.Workdir, data: dict, checked: Checked) -> None:
    """Every listed file present with its size and sha256; no unlisted files in the outputs."""
    listed = data["files"]
    for rel, entry in listed.items():
        path = wd.root / rel
        if not path.is_file():
            raise VerificationFailed(f"{rel}: missing (listed in {workdir.MANIFEST})")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise VerificationFailed(f"{rel}: {size} bytes; {workdir.MANIFEST} says {entry['bytes']}")
        digest = checked.sha256(path, rel)
        if digest != entry["sha256"]:
            raise VerificationFailed(
                f"{rel}: sha256 {digest[:12]}... differs from {workdir.MANIFEST} ({entry['sha256'][:12]}...)"
            )
    packed = data["settings"]["pack"]["formats"]
    for name in FORMATS:
        on_disk = manifest.output_files(wd.root, name)
        if name in packed:
            extra = [rel for rel in on_disk if rel not in listed]
            if extra:
                raise VerificationFailed(f"{extra[0]}: not listed in {workdir.MANIFEST}")
        elif on_disk:
            log.warning("%s is not in %s (out of date); it was not verified", FORMATS[name].OUTPUT, workdir.MANIFEST)


def check_input_files(wd: workdir.Workdir, data: dict, checked: Checked) -> None:
    """The files the packaged ones were made from (encoded.csv, classes.json, ...) are those packed."""
    for rel, digest in data["inputs"].items():
        path = wd.root / rel
        if not path.is_file():
            raise VerificationFailed(f"{rel}: missing; the packaged files were made from it")
        if checked.sha256(path, rel) != digest:
            before = out_of_date(wd)  # then packing again is not enough
            raise VerificationFailed(f"{rel}: changed since `prep pack` (sha256 differs from {workdir.MANIFEST});"
                                     f" {f'{before}, then `prep pack`' if before else 'run `prep pack` again'}")


def check_inputs(wd: workdir.Workdir, data: dict, layout: Layout) -> set[str]:
    """The encoded.csv rows packed, checked against the manifest and for leaks between splits;
    the folders of their resized files. encoded.csv is read a line at a time, and per image a
    number or two are kept: a 64-bit hash of its content (and of its group), tagged with its
    split; the file is read again for the rows of the few hashes tagged with two splits."""
    encoded = wd.path(workdir.ENCODED)
    classes = list(layout.classes)
    counts, per_class, folders = Counter(), Counter(), set()
    code = {split: i for i, split in enumerate(SPLITS)}  # a split in the last 2 bits of a hash
    contents, groups = array("q"), array("q")
    for row in iter_rows(encoded, classes, wd, whole_file=True):
        counts[row.split] += 1
        per_class[(row.split, row.label)] += 1
        folders.add(os.path.dirname(row.resized))
        contents.append(hash(row.sha256) & ~3 | code[row.split])
        if row.group:
            groups.append(hash(row.group) & ~3 | code[row.split])
    for split in SPLITS:
        if counts[split] != layout.counts[split]:
            raise VerificationFailed(
                f"{workdir.MANIFEST}: split {split} counts {layout.counts[split]} images;"
                f" {encoded.name} has {counts[split]}"
            )
        for label, n in data["splits"][split].get("classes", {}).items():
            if per_class[(split, label)] != n:
                raise VerificationFailed(
                    f"{workdir.MANIFEST}: split {split} counts {n} of class {label!r}; {encoded.name} has"
                    f" {per_class[(split, label)]}"
                )
    suspects = _in_two_splits(contents)
    del contents
    if suspects:  # the same content in two splits, or (rarely) two contents of one hash
        first: dict[str, Row] = {}
        for row in iter_rows(encoded, classes, wd):
            if hash(row.sha256) >> 2 not in suspects:
                continue
            seen = first.setdefault(row.sha256, row)
            if seen.split != row.split:
                raise VerificationFailed(
                    f"{encoded.name}: content {row.sha256[:12]}... is in two splits: {seen.path} ({seen.split})"
                    f" and {row.path} ({row.split})"
                )
    suspects = _in_two_splits(groups)
    if suspects:
        by_group: dict[str, Row] = {}
        for row in iter_rows(encoded, classes, wd):
            if not row.group or hash(row.group) >> 2 not in suspects:
                continue
            seen = by_group.setdefault(row.group, row)  # split's units of several images
            if seen.split != row.split:
                raise VerificationFailed(
                    f"{encoded.name}: group {row.group} (copies, near copies or a user group) is in two splits:"
                    f" {seen.path} ({seen.split}) and {row.path} ({row.split})"
                )
    return folders


def _in_two_splits(tagged: array) -> set[int]:
    """The hashes (``hash >> 2``) found tagged with two splits or more in ``tagged``, 64-bit
    hashes with a split in their last 2 bits (sorted here, in place)."""
    import numpy as np

    tags = np.frombuffer(tagged, np.int64)
    tags.sort()
    hashes = tags >> 2
    mixed = (hashes[1:] == hashes[:-1]) & (tags[1:] != tags[:-1])
    return set(hashes[1:][mixed].tolist())


def in_split_order(encoded: Path, classes: list[str], wd: workdir.Workdir) -> Iterator[Row]:
    """encoded.csv's rows split by split, each split's in the file's order (as the formats hold
    them): the file read once per split."""
    for split in SPLITS:
        yield from (row for row in iter_rows(encoded, classes, wd) if row.split == split)


def digest_pngs(files: list[tuple[str, str]], folder: str) -> list[bytes | str]:
    """The sha256 of the pixels of each (resized PNG, the sha256 of its bytes resize recorded),
    or the reason it cannot be used: unreadable, not a regular file, or not the file resize wrote."""
    from .. import imaging  # here, not at the top: a rerun with nothing changed decodes nothing

    out: list[bytes | str] = []
    for (name, recorded), data in zip(files, sources.read_below(folder, [name for name, _ in files])):
        try:
            if isinstance(data, OSError):
                raise data
            if workdir.sha256_bytes(data) != recorded:
                out.append(f"changed since `prep resize` (its sha256 is not the one {workdir.ENCODED} records);"
                           " run `prep resize` to make it again")
                continue
            out.append(hashlib.sha256(imaging.decode_png(data).tobytes()).digest())
        except OSError as err:
            out.append("a symbolic link" if err.errno == errno.ELOOP else f"cannot read ({err.strerror or err})")
        except ValueError as err:
            out.append(str(err))
    return out


def _samples(name: str, path: Path, layout: Layout, options: PackOptions) -> Iterator[tuple]:
    """(split, pixel digest, label, path or None) per sample of one format, in order."""
    reader = FORMATS[name].read(path, layout, options)
    while True:
        try:
            split, batch = next(reader)
        except StopIteration:
            return
        except VerificationFailed as err:
            raise VerificationFailed(f"{FORMATS[name].OUTPUT}: {err}") from None
        except (OSError, ValueError, KeyError) as err:
            raise VerificationFailed(f"{FORMATS[name].OUTPUT}: cannot read ({type(err).__name__}: {err})") from None
        paths = batch.paths if batch.paths is not None else [None] * len(batch.labels)
        for image, label, rel in zip(batch.images, batch.labels, paths, strict=True):
            yield split, hashlib.sha256(image.tobytes()).digest(), int(label), rel


def _with_source(cfg: VerifyConfig, rows: Iterator[Row], count: int, pool) -> Iterator[tuple[Row, bytes | str]]:
    """Each of ``rows`` with the digest of its resized PNG's pixels (:func:`digest_pngs`, in the pool)."""
    folder = cfg.workdir.for_workers(workdir.RESIZED_DIR, cfg.execution.executor)
    held: deque[list[Row]] = deque()
    for digests in executors.map_shards(pool, digest_pngs, in_shards(rows, count, cfg.execution.slots, held), folder):
        yield from zip(held.popleft(), digests, strict=True)


def compare(cfg: VerifyConfig, layout: Layout, options: PackOptions, names: list[str], against_source: bool) -> None:
    """Walk the formats ``names`` and (``against_source``) the resized PNGs in lockstep with
    encoded.csv's rows, split by split."""
    from .. import imaging  # noqa: F401  (before the pool forks: the workers inherit it)

    wd = cfg.workdir
    folder = cfg.workdir.for_workers(workdir.RESIZED_DIR, cfg.execution.executor)
    streams = {name: _samples(name, wd.path(FORMATS[name].OUTPUT), layout, options) for name in names}
    index = dict.fromkeys(SPLITS, 0)
    end = object()
    count = sum(layout.counts.values())
    rows = in_split_order(wd.path(workdir.ENCODED), list(layout.classes), wd)
    with cfg.execution.open() as pool, cfg.execution.bar(count, "verify") as bar:
        pairs = _with_source(cfg, rows, count, pool) if against_source else ((row, None) for row in rows)
        for row, expected in pairs:
            split = row.split
            i = index[split]
            where = f"split {split}, index {i} ({row.path})"
            if isinstance(expected, str):
                raise VerificationFailed(f"{joined(folder, row.resized)}: {expected}")
            reference = None
            for name, stream in streams.items():
                out = FORMATS[name].OUTPUT
                got = next(stream, end)
                if got is end:
                    raise VerificationFailed(f"{out}: split {split} ends at index {i}; expected {layout.counts[split]}")
                got_split, digest, label, rel = got
                if got_split != split:
                    raise VerificationFailed(f"{out}: {where}: found a sample of split {got_split}")
                if not 0 <= label < len(layout.classes):
                    raise VerificationFailed(f"{out}: {where}: label {label} out of range 0..{len(layout.classes) - 1}")
                if label != row.label_id:
                    raise VerificationFailed(f"{out}: {where}: label {label}; encoded.csv says {row.label_id}")
                if rel is not None and rel != row.path:
                    raise VerificationFailed(
                        f"{out}: split {split}, index {i}: path {rel!r}; encoded.csv says {row.path!r}"
                    )
                if against_source and digest != expected:
                    raise VerificationFailed(f"{out}: {where}: pixels differ from {joined(folder, row.resized)}")
                if reference is None:
                    reference = (out, digest)
                elif digest != reference[1]:
                    raise VerificationFailed(f"{out}: {where}: pixels differ from {reference[0]}")
            index[split] += 1
            bar.update(1)
    for name, stream in streams.items():
        extra = next(stream, end)
        if extra is not end:
            raise VerificationFailed(f"{FORMATS[name].OUTPUT}: split {extra[0]} has more samples than encoded.csv")


def run(cfg: VerifyConfig) -> VerifyResult:
    started = time.perf_counter()
    wd = cfg.workdir
    if not wd.root.is_dir():
        raise PrepError(f"work directory {wd.root} does not exist")
    data = manifest.read(wd)
    try:
        layout = manifest.layout(data)
        pack = data["settings"]["pack"]
        names = [n for n in pack["formats"] if n in FORMATS]
        options = PackOptions(**{k: v for n in names for k, v in pack.get(n, {}).items()})
    except (KeyError, TypeError, ValueError) as err:
        raise VerificationFailed(f"{workdir.MANIFEST}: malformed ({type(err).__name__}: {err})") from None
    if not names:
        raise VerificationFailed(f"{workdir.MANIFEST} lists no packaged format; run `prep pack`")
    checked = Checked(wd, cfg.full)
    check_files(wd, data, checked)
    check_input_files(wd, data, checked)
    source = wd.at(workdir.RESIZED_DIR)  # at the URL when this command's copy leaves it there
    against_source = sources.exists(source) if sources.is_url(source) else os.path.isdir(source)
    units = unit_keys(data, names, against_source, source_state(wd, source, checked.folders) if against_source else {})
    stale = [unit for unit, key in units.items() if not checked.passed(unit, key)]
    folders = checked.folders
    if stale:
        resized = check_inputs(wd, data, layout)
        formats = [n for n in names if n in stale]
        if against_source and ("pngs" in stale or formats):
            folders = source_state(wd, source, sorted(resized))  # before: a change meanwhile shows next time
        if formats or "pngs" in stale:
            compare(cfg, layout, options, formats, against_source)
        units = unit_keys(data, names, against_source, folders)
    checked.save(units, folders, None if stale else checked.at)
    sizes = [entry["bytes"] for entry in data["files"].values()]
    return VerifyResult(names, len(sizes), sum(sizes), layout, against_source, time.perf_counter() - started,
                        None if stale else checked.at, stale)


def unit_keys(data: dict, names: list[str], against_source: bool, folders: dict[str, int | None]) -> dict[str, str | None]:
    """What each check depends on, as a digest: ``rows`` (encoded.csv against the manifest and for
    leaks), ``pngs`` (the resized PNGs are those resize wrote: encoded.csv and their folders'
    mtimes; an unsettled or missing folder never matches) and each format (its files' sha256,
    its options, the rows, and what its pixels were compared to: the PNGs, or the other formats)."""
    inputs = data["inputs"]
    rows = workdir.fingerprint({"inputs": inputs, "classes": data["classes"], "splits": data["splits"],
                                "image": data["image"]})
    files = {name: {rel: e["sha256"] for rel, e in data["files"].items() if e["format"] == name} for name in names}
    units: dict[str, str | None] = {"rows": rows}
    if against_source:
        settled = all(t is not None for t in folders.values())
        units["pngs"] = workdir.fingerprint({"rows": rows, "folders": folders}) if settled else None
    reference = "pngs" if against_source else files
    for name in names:
        units[name] = workdir.fingerprint({"rows": rows, "files": files[name], "options": data["settings"]["pack"].get(name),
                                           "reference": reference})
    return units
