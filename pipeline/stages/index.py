"""`prep index`: walk RAW, label each image, hash it, write ``labels.csv`` and ``index.json``.

Labels come from the first-level folder (``raw/<class>/.../<image>``) or, with
``labels_from="filename"``, from a regular expression on the file name. Rows are in natural
order (classes, then paths), so the CSV is the same whatever order the filesystem lists.

A rerun hashes only files whose size or version (mtime, ETag) changed, and does nothing at all
when the listing, the settings and the labels CSV are all as the last run left them. Either way
it warns about the usual mistakes with the folders and counts (:mod:`pipeline.checks`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

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


def _hash_shard(shard: list[str], root: str) -> list[tuple[str, int] | str]:
    """(sha256, size) of each file in the shard, or the reason it could not be read."""
    out: list[tuple[str, int] | str] = []
    for rel in shard:
        try:
            data = sources.read_bytes(root, rel)
        except OSError as err:
            out.append(f"unreadable ({err.strerror or type(err).__name__})")
            continue
        out.append((workdir.sha256_bytes(data), len(data)))
    return out


def hash_files(
    cfg: IndexConfig, root: str, versions: dict[str, tuple[int, object]], listed_ns: int
) -> tuple[dict[str, tuple[str, int]], dict[str, str]]:
    """sha256 and size of each file in ``versions``, reusing the cache for files whose
    (size, version) the listing found unchanged (version: mtime locally, ETag for objects);
    and the reason for each file that could not be read. ``listed_ns``: when the listing began.
    A local file modified less than :data:`SETTLED_NS` before then is hashed again next time."""
    cache_path = cfg.workdir.path(workdir.HASH_CACHE)
    rels = list(versions)
    cache = workdir.hash_cache(cfg.workdir, root)
    result: dict[str, tuple[str, int]] = {}
    failed: dict[str, str] = {}
    todo = []
    for rel in rels:
        size, version = versions[rel]
        hit = workdir.settled_hash(cache.get(rel))
        if hit and version is not None and hit[:2] == (size, version):
            result[rel] = (hit[2], size)
        else:
            todo.append(rel)
    if todo:
        shards = executors.chunk(todo, cfg.execution.slots, max_size=64)
        with cfg.execution.open() as pool, cfg.execution.bar(len(todo), "hash", unit="file") as bar:
            for shard, hashed in zip(shards, executors.map_shards(pool, _hash_shard, shards, root)):
                for rel, outcome in zip(shard, hashed):
                    if isinstance(outcome, str):
                        failed[rel] = outcome
                        continue
                    digest, size = outcome
                    result[rel] = (digest, size)
                    # the version seen before reading: if the file changed since, the next
                    # listing sees a new version and hashes it again
                    # and whether it had settled (see SETTLED_NS): if not, it is hashed again
                    size, version = versions[rel]
                    settled = not isinstance(version, int) or version < listed_ns - SETTLED_NS
                    cache[rel] = [size, version, digest, settled]
                bar.update(len(shard))
    for rel in [rel for rel in cache if rel not in versions]:  # in place: a copy costs an entry per image
        del cache[rel]
    workdir.write_json(cache_path, {"root": root, "files": cache}, indent=None)  # one entry per image
    return result, failed


def _warn_about_classes(raw: str, empty: list[str], classes: dict[str, int], paths: list[str] | None) -> list[dict]:
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
    labelled: list[tuple[str, str]] = []
    unlabelled: list[str] = []
    for rel in listing.files:
        if pattern is None:
            if "/" not in rel:
                listing.skip(LOOSE, rel)
                continue
            labelled.append((rel.split("/", 1)[0], rel))
        else:
            label = label_from_filename(rel, pattern)
            if label is None:
                listing.skip(NO_MATCH, rel)
                unlabelled.append(rel)
                continue
            labelled.append((label, rel))
    if not labelled and unlabelled:
        raise PrepError(
            f"no file name in {raw} matches --pattern {cfg.pattern!r}"
            f" (e.g. {sorted(unlabelled, key=NATURAL)[0]}); the label is its (?P<label>...) group"
        )
    if not labelled:
        loose = len(listing.skipped.get(LOOSE, ()))
        raise PrepError(
            f"no images found in {raw} (expected {raw}/<class>/<image> with extension "
            f"{', '.join(sorted(e[1:] for e in sources.IMAGE_EXTENSIONS))};"
            f" skipped {_files(listing.skipped_count - listing.skipped_folders, listing.skipped_folders)})"
            + (f"; {loose} image{'s are' if loose != 1 else ' is'} directly in it: if it is one class's folder,"
               " pass the folder that holds the class folders; to take each class from the file name, pass"
               " --labels-from filename" if loose else "")
        )
    previous = _previous_rows(cfg.workdir, cfg.out)
    order = None if previous is None else [(label, rel) for rel, (label, _) in previous.items()]
    if order is not None and len(order) == len(labelled) and set(order) == set(labelled):
        labelled = order  # the same images as last time, already in natural order (sorting costs more)
    else:
        labelled.sort(key=lambda item: (NATURAL(item[0]), NATURAL(item[1])))

    hashes, failed = hash_files(cfg, raw, {rel: listing.versions[rel] for _, rel in labelled}, listed_ns)
    for rel, reason in failed.items():
        log.warning("skipped %s: %s", rel, reason)
        listing.skip(reason, rel)
    labelled = [(label, rel) for label, rel in labelled if rel not in failed]
    if not labelled:
        raise PrepError(f"no readable images in {raw} ({len(failed)} could not be read)")
    # a tuple per row, in LABEL_COLUMNS' order (a dict per row costs four times as much)
    rows = [(rel, label, *hashes[rel]) for label, rel in labelled]
    del hashes
    counts = Counter(label for label, _ in labelled)
    class_counts = {label: counts[label] for label in dict.fromkeys(label for label, _ in labelled)}

    empty: list[str] = []
    if pattern is None:
        empty = sorted((name for name in listing.folders if name not in counts), key=NATURAL)
    found = _warn_about_classes(raw, empty, class_counts, None if pattern else [rel for _, rel in labelled])

    workdir.write_csv_rows(cfg.out, LABEL_COLUMNS, rows)
    skipped = {reason: len(items) for reason, items in sorted(listing.skipped.items())}
    workdir.write_json(
        cfg.workdir.path(workdir.INDEX_META),
        {
            "raw": raw,
            "labels": cfg.workdir.relative(cfg.out),
            # rows in this order are in natural order: split need not sort them again
            "labels_sha256": workdir.sha256_file(cfg.out),
            "order": workdir.NATURAL_ORDER,
            "labels_from": cfg.labels_from,
            "pattern": cfg.pattern if pattern else None,
            "follow_links": cfg.follow_links,
            "allow_outside_links": outside_links,
            "images": len(rows),
            "classes": class_counts,
            "skipped": skipped,
            "skipped_examples": {r: sorted(items, key=NATURAL)[:20] for r, items in listing.skipped.items()},
            "empty_classes": empty,
            "listing_sha256": None if failed else digest,
            "warnings": checks.merged(cfg.workdir, checks.INDEX_KINDS, found),  # resize's: the source sizes
        },
    )
    changes = None if previous is None else _changes(previous, rows)
    return IndexResult(cfg.out, len(rows), class_counts, skipped, empty, unlabelled, listing.skipped_folders,
                       changes=changes)


def _listing_digest(
    cfg: IndexConfig, raw: str, listing: sources.Listing, listed_ns: int, pattern: re.Pattern | None
) -> str | None:
    """A digest of what decides index's outputs: the listing (each file's size and version, the
    skipped files, the folders), the settings and this prep's version. None if a file changed so
    recently that a rewrite could keep its size and mtime (see SETTLED_NS), or if a file has no
    version (an object store that gives none): then every file is looked at again."""
    for _, version in listing.versions.values():
        if version is None or (isinstance(version, int) and version >= listed_ns - SETTLED_NS):
            return None
    settings = [__version__, raw, cfg.labels_from, pattern and pattern.pattern, cfg.follow_links, cfg.allow_outside_links,
                workdir.NATURAL_ORDER, LABEL_COLUMNS, cfg.workdir.relative(cfg.out)]
    files = sorted((rel, *listing.versions[rel]) for rel in listing.files)
    skipped = sorted((reason, sorted(items)) for reason, items in listing.skipped.items())
    text = json.dumps([settings, files, skipped, sorted(listing.folders)], separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


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


def _previous_rows(wd: workdir.Workdir, labels: Path) -> dict[str, tuple[str, str]] | None:
    """path -> (label, sha256) of each row of the labels CSV the last run wrote, in its order, if it
    is unchanged since (so still in this version's natural order); else None."""
    if not in_natural_order(wd, labels):
        return None
    try:
        return {rel: (label, sha) for rel, label, sha in workdir.iter_csv(labels, ["path", "label", "sha256"])}
    except (PrepError, OSError):
        return None


def _changes(previous: dict[str, tuple[str, str]], rows: list[tuple]) -> dict[str, int]:
    """How many images are new, gone, or changed (content or label) against the last run's CSV
    (``rows``: this run's, each path once)."""
    new = changed = 0
    for rel, label, sha, _ in rows:
        before = previous.get(rel)
        if before is None:
            new += 1
        elif before != (label, sha):
            changed += 1
    return {"new": new, "gone": len(previous) - (len(rows) - new), "changed": changed}


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
