"""`prep resize`: every indexed image to a fixed-size, 8-bit PNG under ``resized/``.

Workers read and transform shards of images (:func:`pipeline.imaging.transform`) and return
PNG bytes or a rejection reason; this process writes every file atomically, in index order,
so the outputs are the same whichever executor or number of workers ran. A journal of
finished images makes a killed run resumable; a rerun skips images whose source content and
settings are unchanged and whose output file still holds the bytes written (their sha256 is in
resized.csv). Every path read from labels.csv, resized.csv or the journal stays inside its root.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

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
# per resized file [size, mtime_ns, sha256, settled]: a file keeping a settled entry's size and
# mtime is not read again to check it (settled: hashed SETTLED_NS or more after it was written)
OUTPUT_CACHE = f"{workdir.CACHE_DIR}/resized.json"
PENDING = "pending"  # a journal line naming outputs about to be written
RETRY_REASONS = ("cannot read file", "file changed since")
SHARD_PIXEL_BYTES = 8 * 1024 * 1024
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
    stems = [os.path.splitext(rel)[0] + ".png" for rel in rels]
    taken = Counter(s.casefold() for s in stems)
    names = {rel: (stem if taken[stem.casefold()] == 1 else rel + ".png") for rel, stem in zip(rels, stems)}
    taken = Counter(n.casefold() for n in names.values())
    for rel, name in names.items():
        if taken[name.casefold()] > 1:
            names[rel] = f"{name[:-4]}-{workdir.sha256_bytes(rel.encode())[:8]}.png"
    if len({n.casefold() for n in names.values()}) != len(names):
        raise PrepError("two images map to the same resized file name; rename one of them")
    return names


def resize_shard(
    shard: list[tuple[str, str, tuple | None]], root: str, spec: ResizeSpec, outside_links: bool = False
) -> list[dict]:
    """Transform each (path, sha256, indexed version) of a shard; never raises for a bad image.

    A file is hashed again only if its (size, mtime) differs from the one `prep index` hashed
    (or was not recorded, as for a URL): index's own rule for reusing a hash. Only regular files
    are read, and links only to files inside RAW unless ``outside_links``. The PNG's sha256 is
    taken here, where its bytes are, not in the process that writes them."""
    from .. import imaging  # here, in the workers: a rerun with nothing to do never needs it

    results = []
    for rel, expected_sha, indexed in shard:
        record: dict = {"path": rel}
        try:
            data, seen = sources.read_versioned(root, rel, outside_links=outside_links)
        except OSError as err:
            results.append({**record, "status": "rejected", "reason": f"cannot read file: {err.strerror or err}"})
            continue
        if (seen is None or indexed is None or tuple(indexed) != seen) and workdir.sha256_bytes(data) != expected_sha:
            results.append({**record, "status": "rejected", "reason": "file changed since `prep index`; run it again"})
            continue
        try:
            img, info = imaging.transform(data, spec)
        except imaging.Rejected as err:
            results.append({**record, "status": "rejected", "reason": str(err), "messages": err.messages})
            continue
        png = imaging.encode_png(img)
        results.append(
            {
                **record,
                "status": "ok",
                "messages": info.messages,
                "png": png,
                "resized_sha256": workdir.sha256_bytes(png),
                "format": info.format,
                "mode": info.mode,
                "width": info.width,
                "height": info.height,
                "phash8": info.phash8,
                "phash16": info.phash16,
            }
        )
    return results


def _previous_state(wd: workdir.Workdir) -> dict[str, dict]:
    """What earlier runs finished: resized.csv, then the journal of an interrupted run."""
    state: dict[str, dict] = {}
    table = wd.path(workdir.RESIZED)
    if table.exists():
        try:
            for row in workdir.read_csv(table):
                state[row["path"]] = row
        except (PrepError, KeyError):
            state = {}
    for row in journal_entries(wd):
        if PENDING in row:  # outputs about to be written: forget them until their records follow
            for path in row[PENDING]:
                state.pop(path, None)
        else:
            state[row["path"]] = row
    return state


def journal_entries(wd: workdir.Workdir) -> Iterator[dict]:
    """The journal of an interrupted run (nothing if there is none), in order: a record per
    image finished, and before each shard's files a note of the images about to be written
    (``{PENDING: [path, ...]}``). A damaged line (the one a killed run was writing, garbage, a
    record lacking a field or naming a path outside its root) is left out: its image is redone."""
    try:
        data = workdir.read_file(wd.path(JOURNAL))[0]
    except FileNotFoundError:
        return
    names = workdir.Confined(None, workdir.RESIZED_DIR)
    for line in data.splitlines():
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


def _is_current(prev: dict | None, sha: str, settings: str, intact: set[str]) -> bool:
    """Whether ``prev`` still stands; ``intact``: the resized files as written (see :func:`check_outputs`)."""
    if not prev or prev.get("sha256") != sha or prev.get("settings") != settings:
        return False
    if prev.get("status") == "ok":  # a record an earlier prep wrote without hashes is made again
        return bool(prev.get("phash8")) and prev.get("resized") in intact
    # a file that could not be read, or had changed, may be fine next time: try it again
    return prev.get("status") == "rejected" and not (prev.get("reason") or "").startswith(RETRY_REASONS)


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
        rows = workdir.read_csv(cfg.labels, LABEL_COLUMNS)
        if not rows:
            raise PrepError(f"{cfg.labels} lists no images; run `prep index RAW` first")
        outside_links = follows_outside_links(wd)
        inside = workdir.Confined(None if outside_links else local, "RAW")
        for line, row in enumerate(rows, start=2):
            inside(row["path"], str(cfg.labels), line)
        table, written, skipped = _resize_all(cfg, rows, root, settings, outside_links)
        if workdir.sha256_file(cfg.labels) == labels_sha:  # not rewritten (by `prep index`) meanwhile
            outputs = [wd.path(n) for n in (workdir.RESIZED, workdir.REJECTED, workdir.RESIZE_SETTINGS)]
            stamp.record([cfg.labels], stamped, outputs)
        else:
            stamp.clear()

    rejected = [r for r in table if r["status"] != "ok"]
    result = ResizeResult(
        written=written,
        skipped=skipped,
        rejected=len(rejected),
        total=len(table),
        seconds=time.perf_counter() - started,
        reasons=Counter(r["reason"].split(":")[0] for r in rejected),
    )
    found = checks.size_warnings((r for r in table if r["status"] == "ok"), spec.width, spec.height)
    checks.report(found)
    checks.record(wd, checks.RESIZE_KINDS, found)
    for r in rejected[:20]:
        log.warning("rejected %s: %s", r["path"], r["reason"])
    if len(rejected) > 20:
        log.warning("... and %d more rejected images (see %s)", len(rejected) - 20, wd.path(workdir.REJECTED))
    if len(rejected) == len(table):
        raise PrepError(f"every image was rejected ({len(table)}); see {wd.path(workdir.REJECTED)}")
    if cfg.strict and rejected:
        first = rejected[0]
        raise PrepError(
            f"--strict: {len(rejected)} images rejected, first {first['path']}: {first['reason']}"
        )
    return result


def _current_table(wd: workdir.Workdir, labels: Path, stamp: workdir.Stamp, stamped: dict) -> list[dict] | None:
    """resized.csv's rows when there is nothing to do, else None: the last complete run had the
    same labels CSV and settings and wrote resized.csv and rejected.csv as they are, no killed
    run left a journal, no rejection is worth retrying and every resized file is in place, as
    written. (What the full check of :func:`_resize_all` would conclude, without its cost on a
    rerun of 20,000 images; that check also sweeps out files no image maps to, which only the
    last complete run can have left here, after its own sweep.)"""
    if wd.path(JOURNAL).exists() or not stamp.is_current([labels], stamped):
        return None
    try:
        table = workdir.read_csv(wd.path(workdir.RESIZED), RESIZED_COLUMNS)
    except PrepError:  # unreadable or of another layout: the full check rewrites it
        return None
    intact, checked, hashed = check_outputs(wd, table)
    # each row as the full check judges it (the stamp vouches for its sha256 and settings)
    for row in table:
        if row["status"] == "ok" and (row["resized"] not in intact or not row["phash8"]):
            return None
        if row["status"] != "ok" and not _is_current(row, row["sha256"], row["settings"], intact):
            return None
    if hashed:
        _save_checked(wd, checked)
    return table


def check_outputs(wd: workdir.Workdir, records: list[dict]) -> tuple[set[str], dict[str, list], int]:
    """The resized files of ``records`` (those with status ok) that hold the bytes resize wrote,
    by the ``resized_sha256`` recorded; their :data:`OUTPUT_CACHE` entries; and how many files
    were read to tell. A file keeping the size and mtime of a settled entry is not read again.
    Names are looked up in a listing of ``resized/``, never joined to a path, so a name from a
    damaged record cannot lead elsewhere."""
    out_dir = wd.path(workdir.RESIZED_DIR)
    try:
        cache = workdir.read_json(wd.path(OUTPUT_CACHE))["files"]
    except (OSError, PrepError, KeyError, TypeError):  # none yet, or damaged: every file is read
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    # from one listing rather than a path lookup per image (and links are not files here)
    listed = {rel: entry for rel, entry in _listed(out_dir) if entry.is_file(follow_symlinks=False)}
    started = time.time_ns()
    intact: set[str] = set()
    checked: dict[str, list] = {}
    hashed = 0
    for record in records:
        name, expected = record.get("resized"), record.get("resized_sha256")
        entry = listed.get(name) if record.get("status") == "ok" and expected else None
        if entry is None:
            continue
        st = entry.stat(follow_symlinks=False)
        known = [st.st_size, st.st_mtime_ns, expected, True]
        if cache.get(name) != known:
            hashed += 1
            try:
                data, st = workdir.read_file(entry.path, follow_links=False)
            except OSError:
                continue
            if workdir.sha256_bytes(data) != expected:
                continue
            # trusted by size and mtime from now on only if written well before it was read:
            # a rewrite within the same clock tick would keep both
            known = [st.st_size, st.st_mtime_ns, expected, st.st_mtime_ns < started - SETTLED_NS]
        intact.add(name)
        checked[name] = known
    return intact, checked, hashed


def _save_checked(wd: workdir.Workdir, checked: dict[str, list]) -> None:
    workdir.write_json(wd.path(OUTPUT_CACHE), {"files": checked}, indent=None)  # an entry per image


def _resize_all(
    cfg: ResizeConfig, rows: list[dict], root: str, settings: str, outside_links: bool
) -> tuple[list[dict], int, int]:
    """Resize what is not up to date, write resized.csv and rejected.csv: the table, the number
    of images resized and the number already up to date."""
    wd, spec = cfg.workdir, cfg.spec
    out_dir = wd.path(workdir.RESIZED_DIR)
    out_root = str(out_dir)
    names = output_names([r["path"] for r in rows])
    inside = workdir.Confined(out_dir, f"{workdir.RESIZED_DIR}/")  # no folder of it a link elsewhere
    for line, row in enumerate(rows, start=2):
        inside(names[row["path"]], f"the resized file of {cfg.labels}", line)
    previous = _previous_state(wd)
    # only the files that would be kept are worth reading (not those of other settings)
    pairs = ((previous.get(r["path"]), names[r["path"]]) for r in rows)
    intact, checked, _ = check_outputs(
        wd, [prev for prev, name in pairs if prev and prev.get("settings") == settings and prev.get("resized") == name]
    )
    state: dict[str, dict] = {}
    todo: list[tuple[str, str, tuple | None]] = []
    for row in rows:
        prev = previous.get(row["path"])
        if _is_current(prev, row["sha256"], settings, intact) and (
            prev.get("status") != "ok" or prev.get("resized") == names[row["path"]]
        ):
            state[row["path"]] = prev
        else:
            todo.append((row["path"], row["sha256"], None))

    journal_path = wd.path(JOURNAL)
    if todo:
        # with the (size, mtime) index saw when it hashed this very content, if it did
        hashed = workdir.hash_cache(wd, root)
        for i, (path, sha, _) in enumerate(todo):
            known = workdir.settled_hash(hashed.get(path))
            if known and known[2] == sha:
                todo[i] = (path, sha, known[:2])
        del hashed  # an entry per image: not held through the run
        # Large shards mean fewer round trips to the workers (which counts on a cluster); the
        # cap keeps a shard's results (PNGs, at most its output pixels: ~8 MB) small, as this
        # process holds a few shards per worker in flight.
        per_shard = max(1, min(256, SHARD_PIXEL_BYTES // (spec.width * spec.height * spec.channels)))
        shards = executors.chunk(todo, cfg.execution.slots, max_size=per_shard, min_size=1)
        if journal_path.is_file() and not journal_path.read_bytes().endswith(b"\n") and journal_path.stat().st_size:
            with open(journal_path, "a", encoding="utf-8") as journal:
                journal.write("\n")  # end the line a killed run was writing, so the next record stands alone
        from .. import imaging  # noqa: F401  (before the pool forks: its workers inherit the decoders and the DCT)

        with cfg.execution.open() as pool, open(
            journal_path, "a", encoding="utf-8"
        ) as journal, cfg.execution.bar(len(todo), "resize") as bar:
            by_path = {r["path"]: r for r in rows}
            codec_messages = []  # logged once the bar is gone
            for results in executors.map_shards(pool, resize_shard, shards, root, spec, outside_links):
                # A run killed while writing this shard's files leaves them unrecorded, and they
                # may differ from what resized.csv says (other settings): first note them as
                # pending, so the next run makes them again.
                journal.write(_JSON.encode({PENDING: [r["path"] for r in results if r["status"] == "ok"]}) + "\n")
                journal.flush()
                for res in results:
                    row = by_path[res["path"]]
                    codec_messages.extend((res["path"], message) for message in res.get("messages", ()))
                    record = {
                        "path": res["path"],
                        "label": row["label"],
                        "sha256": row["sha256"],
                        "settings": settings,
                        "status": res["status"],
                        "reason": res.get("reason", ""),
                        "resized": "",
                    }
                    if res["status"] == "ok":
                        target = os.path.join(out_root, names[res["path"]])  # not pathlib: once per image
                        workdir.atomic_write_bytes(target, res["png"], fsync=False)  # makes the folder
                        st = os.stat(target)
                        checked[names[res["path"]]] = [st.st_size, st.st_mtime_ns, res["resized_sha256"], False]
                        record.update(
                            resized=names[res["path"]],
                            resized_sha256=res["resized_sha256"],
                            format=res["format"],
                            mode=res["mode"],
                            width=res["width"],
                            height=res["height"],
                            phash8=res["phash8"],
                            phash16=res["phash16"],
                        )
                    state[res["path"]] = record
                    journal.write(_JSON.encode(record) + "\n")
                journal.flush()
                bar.update(len(results))
        for path, message in codec_messages:  # libtiff's and Pillow's, shown with -v
            log.info("%s: %s", path, message)

    table = [state[r["path"]] for r in rows]
    for record, row in zip(table, rows):
        record["label"] = row["label"]  # a record from an earlier run keeps its file, under the label indexed now
    rejected = [r for r in table if r["status"] != "ok"]
    workdir.write_csv(wd.path(workdir.RESIZED), RESIZED_COLUMNS, table)
    workdir.write_json(wd.path(workdir.RESIZE_SETTINGS), dataclasses.asdict(spec))  # the settings, for manifest.json
    workdir.write_csv(wd.path(workdir.REJECTED), REJECTED_COLUMNS, rejected)
    journal_path.unlink(missing_ok=True)
    workdir.remove_stale_temps(wd.root)  # temporaries of a run killed while writing
    kept = {r["resized"] for r in table if r["status"] == "ok"}
    _remove_orphans(out_dir, kept)
    _save_checked(wd, {name: entry for name, entry in checked.items() if name in kept})

    written = len(todo) - sum(1 for p, *_ in todo if state[p]["status"] != "ok")
    return table, written, len(rows) - len(todo)


def _listed(folder: Path) -> Iterator[tuple[str, os.DirEntry]]:
    """(relative ``/`` path, entry) of everything below ``folder``, each folder before what it
    holds (links to folders are not followed)."""
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        try:
            entries = list(os.scandir(os.path.join(folder, rel_dir)))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            yield rel, entry
            if entry.is_dir(follow_symlinks=False):
                stack.append(rel)


def _remove_orphans(out_dir: Path, keep: set[str]) -> None:
    """Delete outputs no current image maps to (removed sources, old names) and stray temps,
    then the folders left empty, in one listing."""
    folders = []
    for rel, entry in list(_listed(out_dir)):
        if entry.is_dir(follow_symlinks=False):
            folders.append(entry.path)
        elif rel not in keep:
            os.unlink(entry.path)
    for path in reversed(folders):  # a folder is listed after its parent: the deepest first
        if not os.listdir(path):
            os.rmdir(path)
