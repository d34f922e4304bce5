"""`prep index`: walk RAW, label each image, hash it, write ``labels.csv`` and ``index.json``.

Labels come from the first-level folder (``raw/<class>/.../<image>``) or, with
``labels_from="filename"``, from a regular expression on the file name. Rows are in natural
order (classes, then paths), so the CSV is the same whatever order the filesystem lists.

A rerun hashes only files whose size or version (mtime, ETag) changed, and does nothing at all
when the listing, the settings and the labels CSV are all as the last run left them. Either way
it warns about the usual mistakes with the folders and counts (:mod:`pipeline.checks`).
"""

from __future__ import annotations

import array
import hashlib
import heapq
import itertools
import json
import logging
import os
import re
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from .. import __version__, checks, executors, sources, workdir
from ..errors import PrepError

log = logging.getLogger(__name__)
# A file whose mtime was less than this before the listing began is hashed again next time (and
# the next index cannot skip its work), and resize reads it through: written again within the
# same clock tick (coarse on some filesystems: 2 s on FAT), it would keep its size and mtime
# (git's "racily clean" entries)
SETTLED_NS = 2_000_000_000

LABEL_COLUMNS = ["path", "label", "sha256", "bytes"]
# the name up to its last run of digits after a -, _, . or space: drop-12, cat_001, cat.1234, wet-road 7
DEFAULT_PATTERN = r"^(?P<label>.+)[-_. ]\d+$"
NO_MATCH = "name does not match the label pattern (--pattern)"
LOOSE = "not in a class folder"  # an image directly in RAW, when classes come from folders
NATURAL = workdir.natural_key


@dataclass
class IndexConfig:
    raw: str | Path  # a folder or an fsspec URL
    workdir: workdir.Workdir
    out: Path
    labels_from: str = "folder"
    pattern: str = DEFAULT_PATTERN
    follow_links: bool = False
    allow_outside_links: bool = False  # with follow_links: follow links that lead out of RAW too
    execution: executors.Execution = field(default_factory=executors.Execution)


@dataclass
class IndexResult:
    out: Path
    images: int
    class_counts: dict[str, int]
    skipped: dict[str, int]
    empty_classes: list[str] = field(default_factory=list)
    unlabelled: list[str] = field(default_factory=list)
    skipped_folders: int = 0  # of the skipped entries (hidden folders are skipped whole)
    up_to_date: bool = False  # RAW unchanged since the last run: nothing was hashed or written
    changes: dict[str, int] | None = None  # new, gone, changed images since the last run's CSV

    @property
    def summary(self) -> str:
        found = (
            f"Found {self.images} images in {len(self.class_counts)} class{'es' * (len(self.class_counts) != 1)}"
            f" (skipped {_files(sum(self.skipped.values()) - self.skipped_folders, self.skipped_folders)})"
        )
        if self.up_to_date:
            return f"{found}; {self.out.name} is up to date"
        if self.changes is not None:
            changed = ", ".join(f"{n} {what}" for what, n in self.changes.items() if n)
            return f"{found}; since the last run: {changed or 'no change'}"
        return found


def _files(n: int, folders: int = 0) -> str:
    """``3 files``, ``1 folder``, ``2 files and 1 folder``."""
    parts = [f"{count} {what}{'s' * (count != 1)}" for count, what in ((n, "file"), (folders, "folder")) if count]
    return " and ".join(parts) or "0 files"


def label_from_filename(rel: str, pattern: re.Pattern) -> str | None:
    stem = os.path.splitext(rel.rsplit("/", 1)[-1])[0]
    match = pattern.match(stem)
    if not match:
        return None
    label = match.groupdict().get("label") or (match.group(1) if pattern.groups else match.group(0))
    return label or None


def compile_pattern(text: str) -> re.Pattern:
    try:
        pattern = re.compile(text)
    except re.error as err:
        raise PrepError(f"--pattern {text!r} is not a valid regular expression: {err}") from None
    if pattern.groups == 0:
        raise PrepError(f"--pattern {text!r} needs a group for the label, e.g. (?P<label>...)")
    return pattern


def _hash_shard(shard: list[str], root: str) -> list[tuple[bytes, int] | str]:
    """(sha256 as 32 bytes, size) of each file in the shard, or the reason it could not be read."""
    out: list[tuple[bytes, int] | str] = []
    for rel in shard:
        try:
            data = sources.read_bytes(root, rel)
        except OSError as err:
            out.append(f"unreadable ({err.strerror or type(err).__name__})")
            continue
        out.append((bytes.fromhex(workdir.sha256_bytes(data)), len(data)))
    return out


SORT_CHUNK = 1 << 14  # images whose natural keys are held at once: each costs some 300 bytes


class Images:
    """What index knows of each listed file, by its position in the listing, in arrays: its label
    (a number, -1 for none), its sha256 (32 bytes) once known and the size it was read at where
    that is not the listed one; ``order``: the positions of the labelled files, in natural order."""

    def __init__(self, listing: sources.Listing):
        import numpy as np

        self.listing = listing
        n = len(listing.files)
        self.label = np.full(n, -1, np.int32)
        self.labels: list[str] = []  # label number -> label
        self.sha = np.zeros((n, 32), np.uint8)
        self.known = np.zeros(n, np.bool_)  # sha256 known (from the cache or hashed)
        self.read_sizes: dict[int, int] = {}  # position -> size read, where not the listed one
        self.order = np.zeros(0, np.int64)

    def set_labels(self, labels: Iterable[str | None]) -> None:
        numbers: dict[str, int] = {}
        for i, label in enumerate(labels):
            if label is not None:
                number = numbers.get(label)
                if number is None:
                    number = numbers[label] = len(self.labels)
                    self.labels.append(label)
                self.label[i] = number

    def label_of(self, i: int) -> str:
        return self.labels[self.label[i]]

    def sha256(self, i: int) -> str:
        return self.sha[i].tobytes().hex()

    def rows(self) -> Iterator[tuple[str, str, str, int]]:
        """labels.csv's rows, in order."""
        files, labels, label = self.listing.files, self.labels, self.label
        for i in self.order.tolist():
            yield files[i], labels[label[i]], self.sha[i].tobytes().hex(), self.read_sizes.get(i, self.listing.sizes[i])

    def sort(self) -> None:
        """``order``: the labelled files in natural order (classes, then paths), sorted a chunk
        at a time and merged, so that the sort keys of one chunk only are held at once."""
        import numpy as np

        files, labels, label = self.listing.files, self.labels, self.label
        path_key = NATURAL.__wrapped__  # not kept: each path is sorted once (labels repeat, and are kept)

        def key(i: int):
            return NATURAL(labels[label[i]]), path_key(files[i])

        self.order = np.fromiter(_merged(np.flatnonzero(label >= 0), key), np.int64, int((label >= 0).sum()))


def _merged(items: Sequence[int], key) -> Iterator[int]:
    """``items`` (ints: a range, an array) in the order of ``key``, as sorted(): sorted
    :data:`SORT_CHUNK` at a time, then merged (which computes each key once more)."""
    runs = [sorted(map(int, items[start : start + SORT_CHUNK]), key=key) for start in range(0, len(items), SORT_CHUNK)]
    if len(runs) == 1:
        return iter(runs[0])
    runs = [array.array("q", run) for run in runs]
    return heapq.merge(*runs, key=key)


def hash_files(cfg: IndexConfig, root: str, images: Images, pool: Callable[[], Executor]) -> dict[int, str]:
    """The sha256 of each labelled file (``images.order``) not already known (from the hash
    cache): read by the workers of ``pool()``; and the reason for each file that could not be read."""
    import numpy as np

    listing = images.listing
    todo = images.order[~images.known[images.order]]
    failed: dict[int, str] = {}
    if len(todo):
        sent: deque[list[int]] = deque()  # the rows of the shards not back yet

        def jobs() -> Iterator[list[str]]:
            for shard in executors.shards_of(todo, cfg.execution.slots, max_size=64):
                sent.append(shard.tolist())
                yield listing.files.items(sent[-1])

        with cfg.execution.bar(len(todo), "hash", unit="file") as bar:
            for hashed in executors.map_shards(pool(), _hash_shard, jobs(), root):
                shard = sent.popleft()
                for i, outcome in zip(shard, hashed):
                    if isinstance(outcome, str):
                        failed[i] = outcome
                        continue
                    digest, size = outcome
                    images.sha[i] = np.frombuffer(digest, np.uint8)
                    images.known[i] = True
                    if size != listing.sizes[i]:
                        images.read_sizes[i] = size
                bar.update(len(shard))
    return failed


def _cache_of(images: Images, listed_ns: int) -> workdir.HashCache:
    """The hash cache of the rows of ``images.order``: the size and version the listing saw of
    each file before it was read (if the file changed since, the next listing sees a new version
    and it is hashed again), and whether it had settled (see :data:`SETTLED_NS`): if not, it is
    hashed again. ``listed_ns``: when the listing began."""
    import numpy as np

    listing, order = images.listing, images.order
    sizes = np.frombuffer(listing.sizes, np.int64)[order] if len(listing.sizes) else np.zeros(0, np.int64)
    if listing.mtimes is not None:
        mtimes = np.frombuffer(listing.mtimes, np.int64)[order] if len(listing.mtimes) else np.zeros(0, np.int64)
        return workdir.HashCache(sizes, mtimes, mtimes < listed_ns - SETTLED_NS)
    tags = sources.Paths(listing.tags[i] for i in order.tolist())
    return workdir.HashCache(sizes, tags, np.ones(len(order), np.bool_))


def _warn_about_classes(raw: str, empty: list[str], classes: dict[str, int], paths: Iterable[str] | None
                        ) -> list[dict]:
    """Log what looks wrong with the classes; the warnings to keep in index.json (see
    :mod:`pipeline.checks`). ``paths``: the images' paths when classes come from folders."""
    for name in empty:
        log.warning("class folder %s/%s has no images; it is not a class", raw, name)
    if len(classes) == 1:
        log.warning("one class only (%s): a classifier needs at least two; is %s the folder that holds the"
                    " class folders?", next(iter(classes)), raw)
    found = (checks.folder_warnings(raw, paths) if paths is not None else []) + checks.class_warnings(classes)
    checks.report(found)
    return found


def run(cfg: IndexConfig) -> IndexResult:
    raw = sources.canonical(cfg.raw)
    if not sources.is_utf8(raw):  # index.json records it
        raise PrepError(f"the path of RAW {sources.printable(raw)} is not UTF-8 text; rename the folder")
    if not sources.exists(raw):
        raise PrepError(f"RAW folder {cfg.raw} does not exist")
    if not sources.is_dir(raw):
        raise PrepError(f"RAW {cfg.raw} is not a folder (expected RAW/<class>/<image>)")
    local = sources.local_path(raw)
    for what, path in (("the work directory", cfg.workdir.root), ("--out", cfg.out)):
        if local is not None and path.resolve().is_relative_to(Path(local).resolve()):
            raise PrepError(f"{what} {path} is inside RAW {cfg.raw}; prep never writes into RAW")
    if cfg.allow_outside_links and not cfg.follow_links:
        raise PrepError("--allow-outside-links is about the links --follow-links follows: pass --follow-links too")
    if cfg.labels_from not in ("folder", "filename"):
        raise PrepError(f"--labels-from must be folder or filename; received {cfg.labels_from!r}")
    pattern = compile_pattern(cfg.pattern) if cfg.labels_from == "filename" else None
    with cfg.execution.pool() as pool:
        return _index(cfg, raw, pattern, pool)


def _index(cfg: IndexConfig, raw: str, pattern: re.Pattern | None, pool: Callable[[], Executor]) -> IndexResult:
    listed_ns = time.time_ns()
    outside_links = cfg.follow_links and cfg.allow_outside_links
    listing = sources.list_files(raw, follow_links=cfg.follow_links, outside_links=outside_links)
    digest = _listing_digest(cfg, raw, listing, listed_ns, pattern)
    recorded = _unchanged(cfg, digest)
    if recorded is not None:
        classes = dict(sorted(recorded["classes"].items(), key=lambda kv: NATURAL(kv[0])))  # JSON sorted them
        found = _warn_about_classes(raw, recorded["empty_classes"], classes, None if pattern else listing.files)
        checks.record(cfg.workdir, checks.INDEX_KINDS, found)
        unlabelled = [] if pattern is None else [r for r in listing.files if label_from_filename(r, pattern) is None]
        return IndexResult(cfg.out, recorded["images"], classes, recorded["skipped"], recorded["empty_classes"],
                           unlabelled, listing.skipped_folders, up_to_date=True)
    unlabelled: list[str] = []

    def label_of(rel: str) -> str | None:
        if pattern is None:
            if "/" not in rel:
                listing.skip(LOOSE, rel)
                return None
            return rel.split("/", 1)[0]
        label = label_from_filename(rel, pattern)
        if label is None:
            listing.skip(NO_MATCH, rel)
            unlabelled.append(rel)
        return label

    images = Images(listing)
    images.set_labels(map(label_of, listing.files))
    if not images.labels and unlabelled:
        raise PrepError(
            f"no file name in {raw} matches --pattern {cfg.pattern!r}"
            f" (e.g. {min(unlabelled, key=NATURAL)}); the label is its (?P<label>...) group"
        )
    if not images.labels:
        loose = len(listing.skipped.get(LOOSE, ()))
        raise PrepError(
            f"no images found in {raw} (expected {raw}/<class>/<image> with extension "
            f"{', '.join(sorted(e[1:] for e in sources.IMAGE_EXTENSIONS))};"
            f" skipped {_files(listing.skipped_count - listing.skipped_folders, listing.skipped_folders)})"
            + (f"; {loose} image{'s are' if loose != 1 else ' is'} directly in it: if it is one class's folder,"
               " pass the folder that holds the class folders; to take each class from the file name, pass"
               " --labels-from filename" if loose else "")
        )
    previous = _Previous(cfg, raw, images)
    if not previous.same_images:
        images.sort()

    failed = hash_files(cfg, raw, images, pool)
    for i, reason in failed.items():
        rel = listing.files[i]
        log.warning("skipped %s: %s", rel, reason)
        listing.skip(reason, rel)
    if failed:
        images.order = images.order[images.known[images.order]]
    if not len(images.order):
        raise PrepError(f"no readable images in {raw} ({len(failed)} could not be read)")
    class_counts = _class_counts(images)

    empty: list[str] = []
    if pattern is None:
        empty = sorted((name for name in listing.folders if name not in class_counts), key=NATURAL)
    paths = None if pattern else (listing.files[i] for i in images.order.tolist())
    found = _warn_about_classes(raw, empty, class_counts, paths)

    changes = previous.changes(images)
    workdir.write_csv_rows(cfg.out, LABEL_COLUMNS, images.rows())
    labels_sha = workdir.sha256_file(cfg.out)
    _cache_of(images, listed_ns).write(cfg.workdir, raw, labels_sha)
    skipped = {reason: len(items) for reason, items in sorted(listing.skipped.items())}
    workdir.write_json(
        cfg.workdir.path(workdir.INDEX_META),
        {
            "raw": raw,
            "labels": cfg.workdir.relative(cfg.out),
            # rows in this order are in natural order: split need not sort them again
            "labels_sha256": labels_sha,
            "order": workdir.NATURAL_ORDER,
            "labels_from": cfg.labels_from,
            "pattern": cfg.pattern if pattern else None,
            "follow_links": cfg.follow_links,
            "allow_outside_links": outside_links,
            "images": len(images.order),
            "classes": class_counts,
            "skipped": skipped,
            "skipped_examples": {r: heapq.nsmallest(20, items, key=NATURAL) for r, items in listing.skipped.items()},
            "empty_classes": empty,
            "listing_sha256": None if failed else digest,
            "warnings": checks.merged(cfg.workdir, checks.INDEX_KINDS, found),  # resize's: the source sizes
        },
    )
    return IndexResult(cfg.out, len(images.order), class_counts, skipped, empty, unlabelled, listing.skipped_folders,
                       changes=changes)


def _class_counts(images: Images) -> dict[str, int]:
    """label -> images, the labels in the order of their first image."""
    import numpy as np

    numbers = images.label[images.order]
    counts = np.bincount(numbers, minlength=len(images.labels))
    firsts = np.unique(numbers, return_index=True)[1]
    return {images.labels[numbers[k]]: int(counts[numbers[k]]) for k in sorted(firsts.tolist())}


def _listing_digest(
    cfg: IndexConfig, raw: str, listing: sources.Listing, listed_ns: int, pattern: re.Pattern | None
) -> str | None:
    """A digest of what decides index's outputs: the listing (each file's size and version, the
    skipped files, the folders), the settings and this prep's version. None if a file changed so
    recently that a rewrite could keep its size and mtime (see SETTLED_NS), or if a file has no
    version (an object store that gives none): then every file is looked at again. (The JSON
    text of ``[settings, files, skipped, folders]``, each file as ``[path, size, version]`` in
    sorted order, hashed a piece at a time.)"""
    if listing.mtimes is not None:
        if listing.mtimes and max(listing.mtimes) >= listed_ns - SETTLED_NS:
            return None
    elif "" in listing.tags:
        return None
    settings = [__version__, raw, cfg.labels_from, pattern and pattern.pattern, cfg.follow_links, cfg.allow_outside_links,
                workdir.NATURAL_ORDER, LABEL_COLUMNS, cfg.workdir.relative(cfg.out)]
    skipped = sorted((reason, sorted(items)) for reason, items in listing.skipped.items())
    files, sizes, mtimes, tags = listing.files, listing.sizes, listing.mtimes, listing.tags
    text = json.encoder.encode_basestring_ascii
    digest = hashlib.sha256(b"[" + _compact_json(settings) + b",[")
    pieces: list[str] = []
    for k, i in enumerate(_merged(range(len(files)), files.__getitem__)):
        version = str(mtimes[i]) if mtimes is not None else text(tags[i])
        pieces.append(f"{',' if k else ''}[{text(files[i])},{sizes[i]},{version}]")
        if len(pieces) == 4096:
            digest.update("".join(pieces).encode("ascii"))
            pieces.clear()
    digest.update("".join(pieces).encode("ascii"))
    digest.update(b"]," + _compact_json(skipped) + b"," + _compact_json(sorted(listing.folders)) + b"]")
    return digest.hexdigest()


def _compact_json(value) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8", "surrogateescape")


def _unchanged(cfg: IndexConfig, digest: str | None) -> dict | None:
    """index.json of the last run if it saw this very listing with these settings and its
    labels CSV is still as it wrote it; else None."""
    meta = cfg.workdir.path(workdir.INDEX_META)
    if digest is None or not meta.exists():
        return None
    try:
        recorded = workdir.read_json(meta)
        if isinstance(recorded, dict) and recorded.get("listing_sha256") == digest:
            return recorded if recorded.get("labels_sha256") == workdir.sha256_file(cfg.out) else None
    except (PrepError, OSError):
        pass
    return None


class _Previous:
    """The labels CSV the last run wrote (``cfg.out``), read a row at a time beside this run's
    images (found by path through a :class:`sources.PathIndex`): what its hash cache knows of
    them, its order when it lists the same images under the same labels (``same_images``: a
    sort saved), and what changed since (:meth:`changes`). Its order is trusted only if it is,
    byte for byte, the CSV the last run wrote (:func:`in_natural_order`)."""

    def __init__(self, cfg: IndexConfig, raw: str, images: Images):
        import numpy as np

        self.path = cfg.out
        self.natural = in_natural_order(cfg.workdir, cfg.out)
        try:
            sha = workdir.sha256_file(cfg.out)
        except OSError:
            sha = None
        self.cache = workdir.HashCache.read(cfg.workdir, raw, sha) if sha else None
        self.same_images = False
        if not self.natural and self.cache is None:
            self.index = None
            return
        listing = images.listing
        self.index = sources.PathIndex(listing.files)
        order = array.array("q")
        same = self.natural
        cache = self.cache
        seen = np.zeros(len(listing.files), np.bool_)
        try:
            for row, (i, (rel, label, sha)) in enumerate(self._found(cfg.out)):
                if i < 0 or images.label[i] < 0:
                    same = False
                    continue
                if same:
                    if seen[i] or images.label_of(i) != label:
                        same = False
                    seen[i] = True
                    order.append(i)
                hit = cache.seen(row) if cache is not None and row < len(cache) else None
                if hit is not None and hit[1] is not None and hit == (listing.sizes[i], listing.version(i)):
                    digest = workdir.sha256_digest(sha)
                    if digest is not None:
                        images.sha[i] = np.frombuffer(digest, np.uint8)
                        images.known[i] = True
        except (PrepError, OSError):  # unreadable: neither its order nor its hashes are trusted
            images.known[:] = False
            self.natural, same = False, False
        if same and len(order) == int((images.label >= 0).sum()):
            images.order = np.frombuffer(order, np.int64).copy()
            self.same_images = True

    def changes(self, images: Images) -> dict[str, int] | None:
        """How many images are new, gone, or changed (content or label) against the last run's
        CSV (None if it is not one the last run wrote). Read before this run's replaces it."""
        import numpy as np

        if not self.natural:
            return None
        index = self.index or sources.PathIndex(images.listing.files)
        listed = np.zeros(len(images.listing.files), np.bool_)
        listed[images.order] = True
        self.index = index
        rows = matched = changed = 0
        try:
            for i, (rel, label, sha) in self._found(self.path):
                rows += 1
                if i >= 0 and listed[i]:
                    matched += 1
                    changed += label != images.label_of(i) or sha != images.sha256(i)
        except (PrepError, OSError):
            return None
        return {"new": len(images.order) - matched, "gone": rows - matched, "changed": changed}


    def _found(self, labels: Path) -> Iterator[tuple[int, tuple[str, str, str]]]:
        """Each row of ``labels`` (path, label, sha256), and where its path is in the listing (-1: not there)."""
        rows = workdir.iter_csv(labels, ["path", "label", "sha256"])
        while chunk := list(itertools.islice(rows, 4096)):
            yield from zip(self.index.find_all([rel for rel, _, _ in chunk]), chunk)


def in_natural_order(wd: workdir.Workdir, labels: Path) -> bool:
    """Whether ``labels`` is, byte for byte, the CSV the last `prep index` wrote, sorted in the
    natural order of this version of prep."""
    meta = wd.path(workdir.INDEX_META)
    try:
        recorded = workdir.read_json(meta) if meta.exists() else {}
        return (
            isinstance(recorded, dict)
            and recorded.get("order") == workdir.NATURAL_ORDER
            and recorded.get("labels_sha256") == workdir.sha256_file(labels)
        )
    except (PrepError, OSError):
        return False


def follows_outside_links(wd: workdir.Workdir) -> bool:
    """Whether the last `prep index` followed links out of RAW (--allow-outside-links): resize
    may read through them then, and only then."""
    meta = wd.path(workdir.INDEX_META)
    try:
        recorded = workdir.read_json(meta) if meta.exists() else {}
    except PrepError:
        return False
    return isinstance(recorded, dict) and recorded.get("follow_links") is True and recorded.get(
        "allow_outside_links") is True


def raw_root(wd: workdir.Workdir, given: str | Path | None = None) -> str:
    """The RAW root (absolute path or URL) recorded by the last `prep index`, or ``given``."""
    if given is not None:
        return sources.canonical(given)
    meta = wd.path(workdir.INDEX_META)
    if not meta.exists():
        raise PrepError(f"{meta} does not exist; run `prep index RAW` first (or pass --raw)")
    recorded = workdir.read_json(meta)
    if not isinstance(recorded, dict) or not isinstance(recorded.get("raw"), str):
        raise PrepError(f"{meta} records no RAW folder; run `prep index RAW` again (or pass --raw)")
    return recorded["raw"]
