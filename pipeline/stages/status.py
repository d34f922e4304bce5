"""`prep status`: for each stage, up to date, stale or missing, and why.

Each stage is judged from what it recorded: index against the RAW folder (listing and the hash
cache's sizes and versions), resize against labels.csv and the resize settings, the later
stages through their stamps (:class:`pipeline.workdir.Stamp`) against their inputs and the
settings in force now.

Asked again with nothing changed, it reads no row and no image: index's digest of the RAW
listing says index is current, the file hash cache (:class:`pipeline.workdir.FileHashes`)
vouches for the CSVs by a stat each, and resize's verdict is kept in ``.cache/status.json``
under the CSVs' hashes and a digest of the stats of ``resized/``. Listing RAW and ``resized/``
(a stat per file) is what it still costs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

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


def index_status(wd: workdir.Workdir) -> StageStatus:
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

    def listed() -> sources.Listing:
        return sources.list_files(root, follow_links=follow, outside_links=follow and outside)

    local = sources.local_path(root)
    if local is not None and not follow:  # RAW's state in constant memory (a link's target is not its own)
        raw, settled = tree_state(Path(local), sources.is_hidden)  # what index skips too
        listing = None
    else:  # a URL's listing gives versions (ETags), and index's digest of it
        listed_ns = time.time_ns()
        listing = listed()
        raw = _listing_digest(wd, meta, labels, listing, listed_ns)
        settled = raw is not None
    hashes = workdir.FileHashes(wd)
    cached = wd.path(workdir.HASH_CACHE)
    key = [raw, hashes.sha256(meta_path), hashes.sha256(labels), hashes.sha256(cached) if cached.is_file() else None]
    hashes.save()
    return _judge("index", True, _judged(wd, "index", key, settled,
                                         lambda: _index_checked(wd, meta, labels, listing or listed())), "")


def _index_checked(wd: workdir.Workdir, meta: dict, labels: Path, listing: sources.Listing) -> list[str]:
    """What RAW holds that labels.csv does not say, from every row and the hash cache."""
    indexed = {r["path"] for r in workdir.read_csv(labels, ["path"])}
    found = set(listing.files)
    if meta.get("labels_from", "folder") == "folder":
        found = {rel for rel in found if "/" in rel}
    cache = workdir.hash_cache(wd, meta["raw"])
    changed = sum(
        1
        for rel in found & indexed
        if rel in cache and list(listing.versions.get(rel, ()))[:2] != cache[rel][:2]
    )
    reasons = []
    if found - indexed:
        reasons.append(f"{_count(len(found - indexed), 'new image')} in RAW")
    if indexed - found:
        reasons.append(f"{_count(len(indexed - found), 'image')} gone from RAW")
    if changed:
        reasons.append(f"{_count(changed, 'image')} changed in RAW")
    return reasons


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


def resize_status(wd: workdir.Workdir, spec: ResizeSpec, origins: dict[str, str] | None = None) -> StageStatus:
    from .resize import JOURNAL, PENDING, journal_entries

    table = wd.path(workdir.RESIZED)
    # images an interrupted run finished; None when no run was interrupted
    journaled = len({e["path"] for e in journal_entries(wd) if PENDING not in e}) if wd.path(JOURNAL).exists() else None
    interrupted = (f"interrupted after {_count(journaled or 0, 'image')};"
                   " run the interrupted command again, with its options, to finish")
    if not table.exists():
        return StageStatus("resize", "missing", [interrupted if journaled is not None else "run `prep resize`"])
    reasons = [interrupted] if journaled is not None else []
    reasons.extend(_resized_content(wd, table))
    settings_path = wd.path(workdir.RESIZE_SETTINGS)
    recorded = workdir.read_json(settings_path) if settings_path.exists() else {}
    wanted = json_like(dataclasses.asdict(spec))
    recorded = {k: v for k, v in recorded.items() if k in wanted} if isinstance(recorded, dict) else {}
    reasons.extend(setting_changes(_as_options(recorded), _as_options(wanted), origins or {}))
    return _judge("resize", True, reasons, "")


def _resized_content(wd: workdir.Workdir, table: Path) -> list[str]:
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
    tree, settled = tree_state(wd.path(workdir.RESIZED_DIR))  # before the check: a change meanwhile shows next time
    key.append(tree)
    return _judged(wd, "resize", key, settled, lambda: _resized_checked(wd, labels, table))


def _resized_checked(wd: workdir.Workdir, labels: Path | None, table: Path) -> list[str]:
    """:func:`_resized_content`'s verdict, from every row and every resized file."""
    from .resize import check_outputs

    reasons = []
    try:
        indexed = {r["path"]: r["sha256"] for r in workdir.read_csv(labels, ["path", "sha256"])} if labels else {}
    except PrepError:
        indexed = {}
    done = {r["path"]: r for r in workdir.read_csv(table, ["path", "sha256", "status", "resized"])}
    stale = sum(1 for p, sha in indexed.items() if p not in done or done[p]["sha256"] != sha)
    if stale:
        reasons.append(f"{_count(stale, 'image')} in labels.csv new or changed")
    if done.keys() - indexed.keys():
        reasons.append(f"{_count(len(done.keys() - indexed.keys()), 'image')} no longer in labels.csv")
    intact = check_outputs(wd, list(done.values()))[0]
    changed = [r["resized"] for r in done.values() if r["status"] == "ok" and r["resized"] not in intact]
    if changed:
        example = changed[0] if len(changed) == 1 else f"{changed[0]}, ..."
        reasons.append(f"{_count(len(changed), 'resized file')} missing or changed since `prep resize` ({example})")
    return reasons


def tree_state(folder: Path, skip=lambda name: False) -> tuple[str, bool]:
    """A digest of what is below ``folder`` as listed (each entry's name, type, size, mtime, ctime
    and inode), in one pass of a stat per entry and constant memory; and whether every entry had
    settled (see :data:`workdir.SETTLED_NS`): only then does an unchanged digest vouch for
    unchanged bytes. Entries come in the order the file system lists them, which for an
    unchanged folder is the same: another order only costs a full check. Names ``skip`` is true
    of (with what they hold) are left out."""
    started = time.time_ns()
    digest = hashlib.sha256()
    settled = True
    stack = [os.fspath(folder)]
    while stack:
        try:
            entries = os.scandir(stack.pop())
        except (FileNotFoundError, NotADirectoryError):
            continue
        with entries:
            for entry in entries:
                if skip(entry.name):
                    continue
                st = entry.stat(follow_symlinks=False)
                digest.update(f"{entry.path}\0{st.st_mode}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0"
                              f"{st.st_ino}\n".encode("utf-8", "surrogateescape"))
                if st.st_mtime_ns >= started - workdir.SETTLED_NS or st.st_ctime_ns >= started - workdir.SETTLED_NS:
                    settled = False
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
    return digest.hexdigest(), settled


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
    stages = [
        index_status(wd),
        resize_status(wd, cfg.spec, cfg.origins.get("resize")),
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
