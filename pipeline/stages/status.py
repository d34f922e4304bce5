"""`prep status`: for each stage, up to date, stale or missing, and why.

Each stage is judged from what it recorded: index against the RAW folder (listing and the hash
cache's sizes and versions), resize against labels.csv and the resize settings, the later
stages through their stamps (:class:`pipeline.workdir.Stamp`) against their inputs and the
settings in force now.

Asked again with nothing changed, it reads no row and no image: the verdicts on RAW (index) and
on ``resized/`` (resize) are kept in ``.cache/status.json`` under the hashes of the files they
were reached from and a digest of the stats of every file below RAW and ``resized/`` (a file
edited in place changes its times), the file hash cache (:class:`pipeline.workdir.FileHashes`)
vouches for the CSVs by a stat each, and the later stages' stamps likewise. A stat per file of
RAW and of ``resized/`` is what it still costs: most of its time at scale.

Reaching a verdict reads the CSVs a row at a time and keeps, per image, 64-bit hashes in arrays
(see :func:`_hashed`), not rows: memory grows by some tens of bytes per image.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .. import sources, workdir
from ..errors import PrepError
from ..spec import ResizeSpec


# status's own verdicts, under the contents they were reached from (see _resized_content)
STATUS_CACHE = f"{workdir.CACHE_DIR}/status.json"


@dataclass
class StatusConfig:
    workdir: workdir.Workdir
    spec: ResizeSpec = field(default_factory=ResizeSpec)
    split: dict = field(default_factory=lambda: {"ratios": [0.7, 0.2, 0.1], "seed": 42, "drop_small": False})
    # command -> option -> where its value now comes from ("defaults", "prep.toml", ...)
    origins: dict[str, dict[str, str]] = field(default_factory=dict)
    quick: bool = False  # judge RAW and resized/ by their folders' times (see tree_state)


@dataclass
class StageStatus:
    stage: str
    state: str
    reasons: list[str] = field(default_factory=list)


@dataclass
class StatusResult:
    stages: list[StageStatus]

    @property
    def summary(self) -> str:
        width = max(len(s.stage) for s in self.stages)
        lines = []
        for s in self.stages:
            why = f"  ({'; '.join(s.reasons[:4])}{'; ...' if len(s.reasons) > 4 else ''})" if s.reasons else ""
            lines.append(f"{s.stage:<{width}}  {s.state}{why}")
        return "\n".join(lines)


def _judge(stage: str, present: bool, reasons: list[str], missing_hint: str) -> StageStatus:
    if not present:
        return StageStatus(stage, "missing", [missing_hint])
    return StageStatus(stage, "stale" if reasons else "up to date", reasons)


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' * (n != 1)}"


def index_status(wd: workdir.Workdir, quick: bool = False) -> StageStatus:
    meta_path = wd.path(workdir.INDEX_META)
    if not meta_path.exists():
        return StageStatus("index", "missing", ["run `prep index RAW`"])
    meta = workdir.read_json(meta_path)
    try:
        labels = wd.labels()
    except PrepError:
        return StageStatus("index", "missing", ["labels.csv is missing; run `prep index RAW`"])
    if not isinstance(meta, dict) or not isinstance(meta.get("raw"), str):
        return StageStatus("index", "stale", [f"{workdir.INDEX_META} records no RAW folder; run `prep index RAW`"])
    root = meta["raw"]
    if not sources.exists(root):
        return StageStatus("index", "stale", [f"RAW {root} not found"])
    follow, outside = meta.get("follow_links") is True, meta.get("allow_outside_links") is True

    local = sources.local_path(root)
    if local is not None and not follow:  # RAW's state in constant memory (a link's target is not its own)
        raw, settled = tree_state(Path(local), sources.is_hidden, quick)  # what index skips too

        def found() -> Iterator[tuple[str, int, int]]:
            return _local_images(local)
    else:  # a URL's listing gives versions (ETags), and index's digest of it
        listed_ns = time.time_ns()
        listing = sources.list_files(root, follow_links=follow, outside_links=follow and outside)
        raw = _listing_digest(wd, meta, labels, listing, listed_ns)
        settled = raw is not None

        def found() -> Iterator[tuple[str, int, int]]:
            return listing.entries()
    hashes = workdir.FileHashes(wd)
    cached = wd.path(workdir.HASH_CACHE)
    key = [raw, hashes.sha256(meta_path), hashes.sha256(labels), hashes.sha256(cached) if cached.is_file() else None]
    hashes.save()
    # a quick verdict is kept apart, so that asking in turn for both judges neither again
    verdict = _judged(wd, "index --quick" if quick else "index", key, settled,
                      lambda: _index_checked(wd, meta, labels, found()))
    return _judge("index", True, verdict, "")


def _local_images(root: str) -> Iterator[tuple[str, int, int]]:
    """(path, size, mtime_ns) of each image `prep index` lists below the local folder ``root``
    when it follows no link (the rules of :func:`sources.list_files`), a folder at a time."""
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        folder = os.path.join(root, rel_dir) if rel_dir else root
        try:
            entries = os.scandir(folder)
        except OSError as err:
            raise PrepError(f"cannot list {folder}: {err.strerror or err}") from None
        with entries:
            for entry in entries:
                if sources.is_hidden(entry.name) or not sources.is_utf8(entry.name) or entry.is_symlink():
                    continue  # as index skips them
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                if entry.is_dir(follow_symlinks=False):
                    stack.append(rel)
                elif entry.is_file(follow_symlinks=False) and sources.is_image_name(entry.name):
                    st = entry.stat(follow_symlinks=False)
                    yield rel, st.st_size, st.st_mtime_ns


def _index_checked(wd: workdir.Workdir, meta: dict, labels: Path, found: Iterable[tuple]) -> list[str]:
    """What RAW holds (``found``: each image's path, size and version) that labels.csv does not
    say, and the images whose size or version is not the one index hashed (see :func:`_hashed`)."""
    import numpy as np

    folder_labels = meta.get("labels_from", "folder") == "folder"
    listed, versions = _hashed((rel, (size, version)) for rel, size, version in found
                               if "/" in rel or not folder_labels)
    indexed, cached, cached_versions = _indexed_and_cached(wd, meta["raw"], labels)
    known = _lookup(indexed, listed)[1]
    at, hit = _lookup(listed, cached)
    hit[hit] = known[at[hit]]  # cache entries of images listed and indexed: those of another version changed
    changed = int(np.count_nonzero(versions[at[hit]] != cached_versions[hit]))
    new, gone = len(listed) - int(known.sum()), len(indexed) - int(_lookup(listed, indexed)[1].sum())
    reasons = []
    if new:
        reasons.append(f"{_count(new, 'new image')} in RAW")
    if gone:
        reasons.append(f"{_count(gone, 'image')} gone from RAW")
    if changed:
        reasons.append(f"{_count(changed, 'image')} changed in RAW")
    return reasons


def _hashed(pairs: Iterable[tuple]):
    """What a dict of ``pairs`` holds, as two arrays of 64-bit hashes (16 bytes a pair, not a
    Python object): of the keys, sorted, each once, and of the value of each one's last pair.
    (Two keys of a million sharing a hash is a chance in 10^7; within one process, as hashes
    of text are seeded per process.)"""
    import numpy as np

    keys, values = array("q"), array("q")
    for key, value in pairs:
        keys.append(hash(key))
        values.append(hash(value))
    keys, values = np.frombuffer(keys, np.int64), np.frombuffer(values, np.int64)
    order = np.argsort(keys, kind="stable")
    keys, values = keys[order], values[order]
    last = np.append(keys[1:] != keys[:-1], True)[: len(keys)]
    return keys[last], values[last]


def _lookup(keys, queries):
    """Where each of ``queries`` is in the sorted ``keys`` (valid where found), and whether found."""
    import numpy as np

    at = np.searchsorted(keys, queries).clip(max=max(len(keys) - 1, 0))
    return at, keys[at] == queries if len(keys) else np.zeros(len(queries), bool)


def _indexed_and_cached(wd: workdir.Workdir, root: str, labels: Path):
    """The paths of labels.csv, as :func:`_hashed` gives them; and the path and the (size,
    version) of each row of index's hash cache of ``root`` (:class:`workdir.HashCache`: what the
    listing gave of each row of the labels CSV it was written beside, in arrays), as two arrays
    of 64-bit hashes. One pass of labels.csv."""
    import numpy as np

    cache = workdir.HashCache.read(wd, root, workdir.sha256_file(labels))
    rows = len(cache) if cache is not None else 0
    cached, versions = array("q"), array("q")

    def paths() -> Iterator[tuple[str, None]]:
        for row, (path,) in enumerate(workdir.iter_csv(labels, ["path"])):
            if row < rows:
                cached.append(hash(path))
                versions.append(hash(cache.listed(row)))
            yield path, None

    indexed = _hashed(paths())[0]
    return indexed, np.frombuffer(cached, np.int64), np.frombuffer(versions, np.int64)


def _listing_digest(wd: workdir.Workdir, meta: dict, labels: Path, listing: sources.Listing,
                    listed_ns: int) -> str | None:
    """index's digest of the RAW listing (every file's size and version) and its settings; None
    when a file changed too recently to be judged by its times (see index's SETTLED_NS)."""
    from .index import IndexConfig, _listing_digest, compile_pattern

    labels_from = meta.get("labels_from", "folder")
    try:
        cfg = IndexConfig(meta["raw"], wd, labels, labels_from, meta.get("pattern") or "",
                          meta.get("follow_links") is True, meta.get("allow_outside_links") is True)
        pattern = compile_pattern(cfg.pattern) if labels_from == "filename" else None
        return _listing_digest(cfg, meta["raw"], listing, listed_ns, pattern)
    except PrepError:
        return None


def _judged(wd: workdir.Workdir, stage: str, key: list, settled: bool, check) -> list[str]:
    """``check()``'s reasons, kept in :data:`STATUS_CACHE` under ``key`` (the contents they were
    judged from) when ``settled``, and given from there while the key holds."""
    cache = _status_cache(wd)
    known = cache.get(stage)
    if settled and isinstance(known, dict) and known.get("key") == key and isinstance(known.get("reasons"), list):
        return known["reasons"]
    reasons = check()
    if settled:
        cache[stage] = {"key": key, "reasons": reasons}
        with contextlib.suppress(OSError):  # a reader's cache: not where it may not write
            wd.path(workdir.CACHE_DIR).mkdir(exist_ok=True)
            workdir.write_json(wd.path(STATUS_CACHE), cache)
    return reasons


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)


def setting_changes(recorded: dict, wanted: dict, origins: dict[str, str]) -> list[str]:
    """``size 48 when run; 32 now, from defaults`` for each option whose value differs: the
    value the stage ran with, the one its next plain run would use, and where that comes from."""
    changes = []
    for key in sorted(recorded.keys() | wanted.keys()):
        old, new = recorded.get(key), wanted.get(key)
        if old != new:
            option = key.replace("_", "-")
            was = f"{_shown(old)} when run" if key in recorded else "not recorded"
            changes.append(f"{option} {was}; {_shown(new)} now, from {origins.get(key, 'defaults')}")
    return changes


def _as_options(spec: dict) -> dict:
    """The resize settings as its options: width and height as one size (``32``, ``64x48``)."""
    options = {k: v for k, v in spec.items() if k not in ("width", "height")}
    if "width" in spec or "height" in spec:
        width, height = spec.get("width"), spec.get("height")
        options["size"] = f"{width}" if width == height else f"{width}x{height}"
    return options


def resize_status(wd: workdir.Workdir, spec: ResizeSpec, origins: dict[str, str] | None = None,
                  quick: bool = False, walked: Callable[[], tuple[str, bool]] | None = None) -> StageStatus:
    """``walked``: :func:`tree_state` of resized/, if it was walked apart (see :func:`run`)."""
    from .resize import JOURNAL, PENDING, journal_entries

    table = wd.path(workdir.RESIZED)
    # images an interrupted run finished; None when no run was interrupted
    journaled = len({e["path"] for e in journal_entries(wd) if PENDING not in e}) if wd.path(JOURNAL).exists() else None
    interrupted = (f"interrupted after {_count(journaled or 0, 'image')};"
                   " run the interrupted command again, with its options, to finish")
    if not table.exists():
        return StageStatus("resize", "missing", [interrupted if journaled is not None else "run `prep resize`"])
    reasons = [interrupted] if journaled is not None else []
    reasons.extend(_resized_content(wd, table, quick, walked))
    settings_path = wd.path(workdir.RESIZE_SETTINGS)
    recorded = workdir.read_json(settings_path) if settings_path.exists() else {}
    wanted = json_like(dataclasses.asdict(spec))
    recorded = {k: v for k, v in recorded.items() if k in wanted} if isinstance(recorded, dict) else {}
    reasons.extend(setting_changes(_as_options(recorded), _as_options(wanted), origins or {}))
    return _judge("resize", True, reasons, "")


def _resized_content(wd: workdir.Workdir, table: Path, quick: bool = False,
                     walked: Callable[[], tuple[str, bool]] | None = None) -> list[str]:
    """What is out of date in resized.csv and resized/: images of labels.csv new, changed or
    gone, resized files missing or changed. Judged once for given contents of labels.csv and
    resized.csv and a given state of resized/ (every file's size, times and inode, see
    :func:`tree_state`): the verdict is kept in :data:`STATUS_CACHE` under those, so asking
    again with nothing changed reads no row and no image."""
    try:
        labels = wd.labels()
    except PrepError:
        labels = None
    hashes = workdir.FileHashes(wd)
    key = [hashes.sha256(labels) if labels is not None else None, hashes.sha256(table)]
    hashes.save()
    # before the check: a change meanwhile shows next time
    tree, settled = walked() if walked else tree_state(wd.path(workdir.RESIZED_DIR), quick=quick)
    key.append(tree)
    return _judged(wd, "resize --quick" if quick else "resize", key, settled,
                   lambda: _resized_checked(wd, labels, table))


def _resized_checked(wd: workdir.Workdir, labels: Path | None, table: Path) -> list[str]:
    """:func:`_resized_content`'s verdict, from every row (see :func:`_hashed`) and every resized
    file, read a row at a time."""
    from .resize import _OutputFiles

    try:
        indexed = _hashed(workdir.iter_csv(labels, ["path", "sha256"]) if labels else ())
    except PrepError:
        indexed = _hashed(())
    columns = ["path", "sha256", "status", "resized", "resized_sha256"]
    done = _hashed(row[:2] for row in workdir.iter_csv(table, columns, columns[:4]))
    at, there = _lookup(done[0], indexed[0])
    reasons = []
    stale = len(indexed[0]) - int((done[1][at[there]] == indexed[1][there]).sum())
    if stale:
        reasons.append(f"{_count(stale, 'image')} in labels.csv new or changed")
    gone = len(done[0]) - int(_lookup(indexed[0], done[0])[1].sum())
    if gone:
        reasons.append(f"{_count(gone, 'image')} no longer in labels.csv")
    files = _OutputFiles(wd)
    changed, example = 0, None
    for _, _, state, name, expected in workdir.iter_csv(table, columns, columns[:4]):
        if state == "ok" and not (expected and files.check(name, expected)):
            changed += 1
            example = name if example is None else example
    if changed:
        reasons.append(f"{_count(changed, 'resized file')} missing or changed since `prep resize`"
                       f" ({example if changed == 1 else f'{example}, ...'})")
    return reasons


@contextlib.contextmanager
def _walked_apart(folder: Path, serial: bool) -> Iterator[Callable[[], tuple[str, bool]] | None]:
    """:func:`tree_state` of ``folder``, walked by another process while this one walks RAW: a
    stat per file is most of what `status` costs, and it takes one core. None (walked in its
    turn, if at all) when ``serial`` (a quick walk is a stat per folder), on one core, or where
    a process is not forked (starting one costs more than the walk of most folders)."""
    from .. import executors

    if serial or executors.cpu_count() < 2 or sys.platform != "linux" or not folder.is_dir():
        yield None
        return
    with executors.make_executor("local", workers=2) as pool:
        future = pool.submit(tree_state, folder)
        try:
            yield future.result
        except BaseException:  # an error, Ctrl-C: the walk is not waited for
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.kill()
            raise


def tree_state(folder: Path, skip=None, quick: bool = False) -> tuple[str, bool]:
    """A digest of what is below ``folder`` as listed (each entry's name, type, size, mtime, ctime
    and inode), in one pass of a stat per entry and constant memory; and whether every entry had
    settled (see :data:`workdir.SETTLED_NS`): only then does an unchanged digest vouch for
    unchanged bytes. Entries come in the order the file system lists them, which for an
    unchanged folder is the same: another order only costs a full check. Names ``skip`` is true
    of (with what they hold) are left out. The stat is most of what an entry costs: the loop
    does little else, and the digest takes a few thousand entries' stats at a time.

    ``quick``: a stat per folder, not per file: each folder's times, which change when a file is
    added, removed, renamed or replaced (as most programs save one, and prep writes its own), but
    not when one is rewritten in place. A folder is listed only to find the folders in it: not
    when its link count says it holds none (2: its name and its "."), as most Unix file systems
    keep it (those that do not give 1, and are listed)."""
    started = time.time_ns()
    digest = hashlib.sha256()
    newest = 0
    names: list[str] = []
    stats = array("q")

    def fold() -> None:  # the entries so far into the digest
        nonlocal newest
        digest.update(f"{len(names)}\0{chr(0).join(names)}\0".encode("utf-8", "surrogateescape"))
        digest.update(stats)
        if stats:
            newest = max(newest, max(stats[2::5]), max(stats[3::5]))
        names.clear()
        del stats[:]

    if quick:
        digest.update(b"quick\0")
    stack = [os.fspath(folder)]
    while stack:
        top = stack.pop()
        try:
            fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            continue
        digest.update(f"{top}\0".encode("utf-8", "surrogateescape"))
        try:
            if quick:
                st = os.fstat(fd)
                stats.extend((st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
                names.append(".")
            listed = not quick or st.st_nlink != 2  # 2 links, its name and its ".": no folder in it
            # through the folder's descriptor: a stat looks up a name, not a path
            with os.scandir(fd) if listed else contextlib.nullcontext(()) as entries:
                for entry in entries:
                    if skip is not None and skip(entry.name):
                        continue
                    if not quick:
                        st = entry.stat(follow_symlinks=False)
                        stats.extend((st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
                    names.append(entry.name)
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(f"{top}/{entry.name}")
                    if len(names) == 4096:
                        fold()
        finally:
            os.close(fd)
        fold()
    return digest.hexdigest(), newest < started - workdir.SETTLED_NS


def _status_cache(wd: workdir.Workdir) -> dict:
    try:
        cache = workdir.read_json(wd.path(STATUS_CACHE))
    except (OSError, PrepError):
        return {}
    return cache if isinstance(cache, dict) else {}


def json_like(value):
    """Tuples as lists, as they come back from JSON."""
    if isinstance(value, dict):
        return {k: json_like(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_like(v) for v in value]
    return value


def stamped_status(wd: workdir.Workdir, stage: str, stamp: str, inputs: list[Path], settings, output: Path,
                   hint: str, origins: dict[str, str] | None = None) -> StageStatus:
    if not output.exists():
        return StageStatus(stage, "missing", [hint])
    missing_inputs = [p for p in inputs if not p.exists()]
    if missing_inputs:
        return StageStatus(stage, "stale", [f"input {p.name} is missing" for p in missing_inputs])
    stamped = workdir.Stamp(wd, stamp)
    reasons = stamped.explain(inputs, None if isinstance(settings, dict) else settings)
    if isinstance(settings, dict) and reasons != ["never run here"]:
        try:
            recorded = workdir.read_json(stamped.path).get("settings")
        except (PrepError, AttributeError):
            recorded = None
        if isinstance(recorded, dict):
            reasons.extend(setting_changes(recorded, json.loads(json.dumps(settings, default=str)), origins or {}))
        else:
            reasons.append("settings changed")
    return _judge(stage, True, reasons, hint)


def pack_status(wd: workdir.Workdir) -> StageStatus:
    from . import pack

    manifest_path = wd.path(workdir.MANIFEST)
    if not manifest_path.exists():
        return StageStatus("pack", "missing", ["run `prep pack`"])
    encoded = wd.path(workdir.ENCODED)
    if not encoded.exists():
        return StageStatus("pack", "stale", ["input encoded.csv is missing"])
    listed = workdir.read_json(manifest_path).get("settings", {}).get("pack", {})
    inputs = pack.inputs_of(wd, encoded)
    reasons = []
    for name in listed.get("formats", []):
        for why in workdir.Stamp(wd, f"pack-{name}").explain(inputs, pack.stamp_settings(listed[name], name)):
            reasons.append(f"{name}: {why}")
    return _judge("pack", True, reasons, "")


def train_status(wd: workdir.Workdir) -> StageStatus:
    from ..formats import FORMATS
    from .train import STAMP, packaged_files

    metrics = wd.path(workdir.VERIFY_DIR) / "metrics.json"
    if not metrics.exists():
        return StageStatus("verify-train", "missing", ["run `prep verify-train`"])
    fmt = workdir.read_json(metrics).get("format")
    packed = wd.path(FORMATS[fmt].OUTPUT) if fmt in FORMATS else None
    if packed is None or not packed.exists():
        return StageStatus("verify-train", "stale", [f"its {fmt} data is gone"])
    # the data it trained on and the outputs it wrote (its options are not known here)
    return _judge("verify-train", True, workdir.Stamp(wd, STAMP).explain(packaged_files(packed), None), "")


def run(cfg: StatusConfig) -> StatusResult:
    wd = cfg.workdir
    if not wd.root.is_dir():
        raise PrepError(f"work directory {wd.root} does not exist; run `prep index RAW` first")
    labels = wd.labels() if wd.path(workdir.INDEX_META).exists() else wd.path(workdir.LABELS)
    with_labels = [labels] + ([wd.path(workdir.RESIZED)] if wd.path(workdir.RESIZED).exists() else [])
    splits = wd.path(workdir.SPLITS)
    # resized/ is walked only when resized.csv says what it should hold
    with _walked_apart(wd.path(workdir.RESIZED_DIR), cfg.quick or not wd.path(workdir.RESIZED).exists()) as walked:
        stages = [
            index_status(wd, cfg.quick),  # walks RAW meanwhile
            resize_status(wd, cfg.spec, cfg.origins.get("resize"), cfg.quick, walked),
        ]
    stages += [
        stamped_status(wd, "split", "split", with_labels, cfg.split, splits, "run `prep split`",
                       cfg.origins.get("split")),
        stamped_status(wd, "encode", "encode", [splits], None, wd.path(workdir.ENCODED),
                       "run `prep encode`"),
        pack_status(wd),
        train_status(wd),
    ]
    # a stage is only as current as the stages before it: their next run changes its inputs
    first = next((i for i, s in enumerate(stages) if s.state != "up to date"), len(stages))
    for s in stages[first + 1 :]:
        if s.state == "up to date":  # its inputs may change when the earlier stage runs
            s.state, s.reasons = "stale", [f"waits on {stages[first].stage}, which is {stages[first].state}"]
    return StatusResult(stages)
