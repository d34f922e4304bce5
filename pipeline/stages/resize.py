"""`prep resize`: every indexed image to a fixed-size, 8-bit PNG under ``resized/``.

Workers read and transform shards of images (:func:`pipeline.imaging.transform`) and return
PNG bytes or a rejection reason; this process writes every file atomically, in index order,
so the outputs are the same whichever executor or number of workers ran. A journal of
finished images makes a killed run resumable; a rerun skips images whose source content and
settings are unchanged and whose output file is present.
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

from .. import executors, sources, workdir
from ..errors import PrepError
from ..spec import PNG_ENCODING, RESIZE_MODES, TRANSFORM_REVISION, ResizeSpec
from .index import LABEL_COLUMNS, raw_root

log = logging.getLogger(__name__)

RESIZED_COLUMNS = ["path", "label", "sha256", "resized", "status", "reason", "format", "mode", "width", "height", "settings"]
REJECTED_COLUMNS = ["path", "label", "reason"]
JOURNAL = "resized.journal"
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


def resize_shard(shard: list[tuple[str, str, tuple | None]], root: str, spec: ResizeSpec) -> list[dict]:
    """Transform each (path, sha256, indexed version) of a shard; never raises for a bad image.

    A file is hashed again only if its (size, mtime) differs from the one `prep index` hashed
    (or was not recorded, as for a URL): index's own rule for reusing a hash."""
    from .. import imaging  # here, in the workers: a rerun with nothing to do never needs it

    results = []
    for rel, expected_sha, indexed in shard:
        record: dict = {"path": rel}
        try:
            data, seen = sources.read_versioned(root, rel)
        except OSError as err:
            results.append({**record, "status": "rejected", "reason": f"cannot read file: {err.strerror or err}"})
            continue
        if (seen is None or indexed is None or tuple(indexed) != seen) and workdir.sha256_bytes(data) != expected_sha:
            results.append({**record, "status": "rejected", "reason": "file changed since `prep index`; run it again"})
            continue
        try:
            img, info = imaging.transform(data, spec)
        except imaging.Rejected as err:
            results.append({**record, "status": "rejected", "reason": str(err)})
            continue
        results.append(
            {
                **record,
                "status": "ok",
                "png": imaging.encode_png(img),
                "format": info.format,
                "mode": info.mode,
                "width": info.width,
                "height": info.height,
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
    (``{PENDING: [path, ...]}``)."""
    try:
        handle = open(wd.path(JOURNAL), encoding="utf-8")
    except FileNotFoundError:
        return
    with handle:
        for line in handle:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue  # the line a killed run was writing (a rerun appends after it)


def _is_current(prev: dict | None, sha: str, settings: str, out_dir: str) -> bool:
    if not prev or prev.get("sha256") != sha or prev.get("settings") != settings:
        return False
    if prev.get("status") == "ok":
        return os.path.isfile(os.path.join(out_dir, prev["resized"]))  # not pathlib: once per image
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
        table, written, skipped = _resize_all(cfg, rows, root, settings)
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
    run left a journal, no rejection is worth retrying and every resized file is in place.
    (What the full check of :func:`_resize_all` would conclude, without its cost on a rerun of
    20,000 images; that check also sweeps out files no image maps to, which only the last
    complete run can have left here, after its own sweep.)"""
    if wd.path(JOURNAL).exists() or not stamp.is_current([labels], stamped):
        return None
    try:
        table = workdir.read_csv(wd.path(workdir.RESIZED), RESIZED_COLUMNS)
    except PrepError:  # unreadable or of another layout: the full check rewrites it
        return None
    out_dir = wd.path(workdir.RESIZED_DIR)
    # from one listing rather than a status call per image (is_file needs none for a plain file)
    present = {rel for rel, entry in _listed(out_dir) if entry.is_file()}
    # each row as the full check judges it (the stamp vouches for its sha256 and settings)
    for row in table:
        if row["status"] == "ok" and row["resized"] not in present:
            return None
        if row["status"] != "ok" and not _is_current(row, row["sha256"], row["settings"], str(out_dir)):
            return None
    return table


def _resize_all(cfg: ResizeConfig, rows: list[dict], root: str, settings: str) -> tuple[list[dict], int, int]:
    """Resize what is not up to date, write resized.csv and rejected.csv: the table, the number
    of images resized and the number already up to date."""
    wd, spec = cfg.workdir, cfg.spec
    out_dir = wd.path(workdir.RESIZED_DIR)
    out_root = str(out_dir)
    names = output_names([r["path"] for r in rows])
    previous = _previous_state(wd)
    state: dict[str, dict] = {}
    todo: list[tuple[str, str, tuple | None]] = []
    for row in rows:
        prev = previous.get(row["path"])
        if _is_current(prev, row["sha256"], settings, out_root) and (
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
        with cfg.execution.open() as pool, open(
            journal_path, "a", encoding="utf-8"
        ) as journal, cfg.execution.bar(len(todo), "resize") as bar:
            by_path = {r["path"]: r for r in rows}
            for results in executors.map_shards(pool, resize_shard, shards, root, spec):
                # A run killed while writing this shard's files leaves them unrecorded, and they
                # may differ from what resized.csv says (other settings): first note them as
                # pending, so the next run makes them again.
                journal.write(_JSON.encode({PENDING: [r["path"] for r in results if r["status"] == "ok"]}) + "\n")
                journal.flush()
                for res in results:
                    row = by_path[res["path"]]
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
                        record.update(
                            resized=names[res["path"]],
                            format=res["format"],
                            mode=res["mode"],
                            width=res["width"],
                            height=res["height"],
                        )
                    state[res["path"]] = record
                    journal.write(_JSON.encode(record) + "\n")
                journal.flush()
                bar.update(len(results))

    table = [state[r["path"]] for r in rows]
    for record, row in zip(table, rows):
        record["label"] = row["label"]  # a record from an earlier run keeps its file, under the label indexed now
    rejected = [r for r in table if r["status"] != "ok"]
    workdir.write_csv(wd.path(workdir.RESIZED), RESIZED_COLUMNS, table)
    workdir.write_json(wd.path(workdir.RESIZE_SETTINGS), dataclasses.asdict(spec))  # the settings, for manifest.json
    workdir.write_csv(wd.path(workdir.REJECTED), REJECTED_COLUMNS, rejected)
    journal_path.unlink(missing_ok=True)
    workdir.remove_stale_temps(wd.root)  # temporaries of a run killed while writing
    _remove_orphans(out_dir, {r["resized"] for r in table if r["status"] == "ok"})

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
