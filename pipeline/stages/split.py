"""`prep split`: assign every usable image to train / valid / test, stratified and leak-free.

* Stratified per class; per-class counts by largest-remainder rounding, and every class with
  at least as many different images as there are non-zero splits gets one in each of them.
* Exact duplicates (same sha256), near copies (close perceptual hashes, :mod:`pipeline.nearcopy`)
  and the images of one user group (``--group-by``, ``--groups``) are one unit, joined
  transitively, and always land in the same split; splits.csv names each unit of several
  images in its ``group`` column. The same picture under two labels is a conflict, listed in
  conflicts.csv with both files (``--on-conflict`` keeps, drops or refuses them).
* Within a class, larger units are placed first, then units in a seeded hash order of their
  content, so the result does not depend on the order of the input rows.
* Images that `prep resize` rejected are left out (when resized.csv is present).

Memory does not hold the rows: what is known of each image is a few numbers in numpy arrays
(:class:`Images`, :class:`Units`), and labels.csv and resized.csv are read again to write
splits.csv and the paths of the pairs listed (see :class:`Usable`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re
from array import array
from collections import defaultdict
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import zip_longest
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from .. import sources, workdir
from ..errors import PrepError
from .index import LABEL_COLUMNS, in_natural_order

SPLITS = workdir.SPLIT_NAMES

log = logging.getLogger(__name__)

SPLIT_COLUMNS = ["path", "label", "sha256", "resized", "resized_sha256", "split", "group"]
PAIR_COLUMNS = ["path_a", "label_a", "path_b", "label_b", "distance8", "distance16"]
CONFLICTS = "conflicts.csv"  # pairs of one picture under two labels
NEAR_COPIES = "near_copies.csv"  # each image's closest near copy (other content), for the report
NEAR_COPY_RULES = ("off", "strict", "default")  # as pipeline.nearcopy.RULES, without importing numpy
ON_CONFLICT = ("keep", "drop", "error")
LARGE_GROUP = 0.10  # of its class: a group this large is warned about
NATURAL = workdir.natural_key
RESIZED_READ = ["path", "sha256", "status", "resized", "resized_sha256", "phash8", "phash16"]  # of resized.csv
_SHA256 = re.compile(r"[0-9a-f]{64}")  # as `prep index` writes them: 32 bytes each in memory
_HEX = re.compile(r"[0-9a-fA-F]*")
_CHUNK = 1 << 16  # array entries turned into Python numbers at once


@dataclass
class SplitConfig:
    workdir: workdir.Workdir
    labels: Path
    out: Path
    ratios: tuple[float, float, float] = (0.7, 0.2, 0.1)
    seed: int = 42
    drop_small: bool = False
    near_copies: str = "default"  # off | strict | default: the rule of pipeline.nearcopy
    on_conflict: str = "keep"  # keep | drop | error: one picture under two labels
    group_by: str | None = None  # a regex with a (?P<group>...) group, matched on the path
    groups: Path | None = None  # a CSV of path,group


@dataclass
class SplitResult:
    out: Path
    table: dict[str, dict[str, int]]  # class -> split -> count
    conflicts: list[tuple[str, str, str, str]] = field(default_factory=list)  # (path, label, path, label)
    dropped_classes: dict[str, int] = field(default_factory=dict)
    excluded: int = 0
    up_to_date: bool = False
    notes: list[str] = field(default_factory=list)  # how groups shaped the split, for the terminal

    @property
    def summary(self) -> str:
        totals = {s: sum(c[s] for c in self.table.values()) for s in SPLITS}
        head = "Up to date: split " if self.up_to_date else "Split "
        return head + ", ".join(f"{s} {totals[s]}" for s in SPLITS) + f" across {len(self.table)} classes"


def parse_ratios(text: str) -> tuple[float, float, float]:
    """``7:2:1``, ``70:20:10`` or ``0.7,0.2,0.1`` -> fractions summing to 1."""
    parts = text.replace(",", ":").split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 3:
        raise PrepError(f"--ratios needs three numbers train:valid:test (e.g. 7:2:1); received {text!r}")
    if any(v < 0 or math.isnan(v) or math.isinf(v) for v in values):
        raise PrepError(f"--ratios must be finite numbers, none negative; received {text!r}")
    total = sum(values)
    if total <= 0:
        raise PrepError(f"--ratios must not all be zero; received {text!r}")
    if values[0] == 0:
        raise PrepError(f"--ratios needs a non-zero train share; received {text!r}")
    # in exact arithmetic, so 7:2:1, 70:20:10 and 0.7:0.2:0.1 give the same fractions (in floats
    # the last sums to 0.9999999999999999, and 0.7 / that is 0.7000000000000001: another split)
    exact = [Fraction(p.strip()) for p in parts]
    return tuple(float(v / sum(exact)) for v in exact)  # type: ignore[return-value]


def allocate(n: int, ratios: tuple[float, ...]) -> list[int]:
    """Largest-remainder counts for ``n`` items, then one per non-zero split when n allows."""
    exact = [n * r for r in ratios]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(ratios)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    wanted = [i for i, r in enumerate(ratios) if r > 0]
    if n >= len(wanted):
        for i in wanted:
            if counts[i] == 0:
                donor = max(wanted, key=lambda j: (counts[j], -j))
                counts[donor] -= 1
                counts[i] += 1
    return counts


def _unit_key(seed: int, sha: str) -> str:
    return hashlib.sha256(f"{seed}:{sha}".encode()).hexdigest()


def fill(sizes: Sequence[int], ratios: tuple[float, float, float]) -> list[int]:
    """The split (0 train, 1 valid, 2 test) of each unit of one class, given their sizes in the
    order they are placed: the split furthest below its target, for its size, takes the unit
    (ties: train, valid, test), so groups of copies spread over the splits as single images do,
    instead of all going to train (the largest absolute gap); but when no more units are left
    than splits still empty, one of those."""
    target = allocate(sum(sizes), ratios)
    filled = [0, 0, 0]
    chosen = []
    for left, size in zip(range(len(sizes), 0, -1), sizes):
        empty = [k for k in range(3) if target[k] and not filled[k]]
        choices = empty if len(empty) >= left else range(3)
        i = max(choices, key=lambda k: ((target[k] - filled[k]) / target[k] if target[k] else -1.0, -k))
        filled[i] += size
        chosen.append(i)
    return chosen


def units_by_class(
    rows: list[dict], units: dict[str, list[dict]] | None = None
) -> tuple[dict[str, list[dict]], dict[str, list[str]]]:
    """key -> the rows of a unit (images that share a split: by default those of one sha256),
    and class -> the units it owns: a unit belongs to the class of its first file in index order."""
    if units is None:
        units = defaultdict(list)
        for row in rows:
            units[row["sha256"]].append(row)
    by_class: dict[str, list[str]] = defaultdict(list)
    for sha, members in units.items():
        first = members[0] if len(members) == 1 else min(
            members, key=lambda r: (NATURAL(r["label"]), NATURAL(r["path"])))
        by_class[first["label"]].append(sha)
    return units, by_class


def assign(
    rows: list[dict], ratios: tuple[float, float, float], seed: int, units: dict[str, list[dict]] | None = None
) -> dict[str, str]:
    """path -> split of rows given as dicts (units keyed by their smallest sha256). Pure: the same
    rows (in any order), ratios, seed and units give the same result. :func:`run` places the
    units the same way, from arrays (:func:`assign_units`)."""
    units, by_class = units_by_class(rows, units)
    result: dict[str, str] = {}
    for shas in by_class.values():
        # groups of duplicates first, largest first, so that single images even out the counts;
        # within a size, a seeded order of the content
        shas.sort(key=lambda s: (-len(units[s]), _unit_key(seed, s)))
        for sha, i in zip(shas, fill([len(units[s]) for s in shas], ratios)):
            for member in units[sha]:
                result[member["path"]] = SPLITS[i]
    return result


# -- settings --------------------------------------------------------------------------------


def settings_of(ratios, seed: int, drop_small: bool, near_copies: str = "default", on_conflict: str = "keep",
                group_by: str | None = None, groups: str | Path | None = None) -> dict:
    """The settings a split is stamped (and `prep status` compared) with."""
    return {"ratios": list(ratios), "seed": seed, "drop_small": drop_small, "near_copies": near_copies,
            "on_conflict": on_conflict, "group_by": group_by, "groups": str(groups) if groups else None}


def check_options(cfg: SplitConfig) -> re.Pattern | None:
    """The compiled --group-by pattern (None without one); PrepError for a value out of place."""
    if cfg.near_copies not in NEAR_COPY_RULES:
        raise PrepError(f"--near-copies must be one of {', '.join(NEAR_COPY_RULES)}; received {cfg.near_copies!r}")
    if cfg.on_conflict not in ON_CONFLICT:
        raise PrepError(f"--on-conflict must be one of {', '.join(ON_CONFLICT)}; received {cfg.on_conflict!r}")
    if cfg.group_by is None:
        return None
    try:
        pattern = re.compile(cfg.group_by)
    except re.error as err:
        raise PrepError(f"--group-by {cfg.group_by!r} is not a regular expression ({err})") from None
    if "group" not in pattern.groupindex:
        raise PrepError(f"--group-by needs a named group (?P<group>...) for the part of the path that names the"
                        f" group, e.g. '^[^/]+/(?P<group>[^_]+)_'; received {cfg.group_by!r}")
    return pattern


def read_groups(path: Path) -> dict[str, str]:
    """path -> group of a CSV with columns path and group, paths as labels.csv lists them."""
    groups: dict[str, str] = {}
    for number, row in enumerate(workdir.read_csv(path, ["path", "group"]), start=1):
        rel, group = row["path"] or "", row["group"] or ""
        parts = rel.split("/")
        if rel.startswith("/") or "\\" in rel or ":" in parts[0] or any(p in ("", ".", "..") for p in parts):
            raise PrepError(f"{path}, row {number}: path {rel!r} is not relative to RAW (expected one as"
                            f" labels.csv lists it, e.g. cat/img1.jpg)")
        if groups.get(rel, group) != group:
            raise PrepError(f"{path}, row {number}: {rel} is in two groups, {groups[rel]!r} and {group!r}")
        if group:
            groups[rel] = group
    return groups


# -- the rows --------------------------------------------------------------------------------


def path_checks(wd: workdir.Workdir, source: Path) -> Callable[[int, str, str | None], None]:
    """``check(line, path, resized)`` for the rows of a table (labels.csv, resized.csv,
    splits.csv, encoded.csv): the image's path below RAW (by its text: no image is read from it
    after resize) and its resized file's name, where it has one, below ``resized/``; a one-line
    PrepError naming the line."""
    raw = workdir.Confined(None, "RAW")
    resized = workdir.Confined(wd.path(workdir.RESIZED_DIR), f"{workdir.RESIZED_DIR}/")
    where = str(source)

    def check(line: int, path: str, name: str | None) -> None:
        raw(path, where, line)
        if name:
            resized(name, where, line)

    return check


def confine_rows(wd: workdir.Workdir, rows: Iterable[dict], source: Path) -> None:
    """:func:`path_checks` of every row of a table read as dicts."""
    check = path_checks(wd, source)
    for line, row in enumerate(rows, start=2):
        check(line, row["path"], row.get("resized"))


Row = tuple[str, str, str, str, str, str, str]  # path, label, sha256, resized, resized_sha256, phash8, phash16


class _Unpaired(Exception):
    """labels.csv and resized.csv do not go row for row (or one of them is at fault)."""


class Usable:
    """The usable images of labels.csv (less those `prep resize` rejected), in index order, as
    :data:`Row` tuples; iterable as often as needed.

    labels.csv as `prep index` wrote it (in natural order) and resized.csv as `prep resize`
    wrote it from that (row for row) are read side by side at each pass, a line at a time, with
    the checks of every path. Other tables (in another order, rows that do not pair up, or any
    fault in them) are read whole and held, sorted, as they always were: the faults are then
    reported in the order of that reading (labels.csv first)."""

    def __init__(self, wd: workdir.Workdir, labels: Path):
        self.wd, self.labels = wd, labels
        self.resized: Path | None = wd.path(workdir.RESIZED)
        if not self.resized.exists():
            log.warning("%s not found: run `prep resize` first to leave out unusable images", self.resized)
            self.resized = None
        self.inputs = [labels] + ([self.resized] if self.resized else [])
        self.excluded = 0  # images resize rejected: known after the first pass
        self.passes = 0
        self.natural = in_natural_order(wd, labels)
        self.held: list[Row] | None = None if self.natural else self.hold()

    def __iter__(self) -> Iterator[Row]:
        self.passes += 1
        return iter(self.held) if self.held is not None else self._side_by_side(first=self.passes == 1)

    def _side_by_side(self, first: bool) -> Iterator[Row]:
        check = path_checks(self.wd, self.labels)
        rows = workdir.iter_csv(self.labels, [*LABEL_COLUMNS, "resized"], required=LABEL_COLUMNS)
        try:
            if self.resized is None:
                for line, (path, label, sha, _, name) in enumerate(rows, start=2):
                    check(line, path, name)
                    yield path, label, sha, "", "", "", ""
                return
            check_resized = path_checks(self.wd, self.resized)
            done = workdir.iter_csv(self.resized, RESIZED_READ, required=RESIZED_READ[:4])
            excluded = 0
            for line, (row, record) in enumerate(zip_longest(rows, done), start=2):
                if row is None or record is None:
                    raise _Unpaired
                path, label, sha, _, name = row
                check(line, path, name)
                rel, recorded_sha, status, resized, resized_sha, phash8, phash16 = record
                check_resized(line, rel, resized)
                if rel != path or recorded_sha != sha:
                    raise _Unpaired
                if status == "ok":
                    yield path, label, sha, resized, resized_sha, phash8, phash16
                else:
                    excluded += 1
            self.excluded = excluded
        except (_Unpaired, PrepError) as err:
            if first:
                raise _Unpaired from None
            if isinstance(err, PrepError):
                raise
            raise PrepError(f"{self.labels} or {self.resized} changed while split read them; run `prep split`"
                            " again") from None

    def hold(self) -> list[Row]:
        """The usable rows, read whole (see the class)."""
        rows = workdir.read_csv(self.labels, LABEL_COLUMNS)
        confine_rows(self.wd, rows, self.labels)
        if self.resized is None:
            usable = [(r["path"], r["label"], r["sha256"], "", "", "", "") for r in rows]
        else:
            # path -> (sha256, status, resized, resized_sha256, phash8, phash16): a tuple per row,
            # of the columns used (the hashes are absent from a resized.csv an earlier prep wrote)
            check = path_checks(self.wd, self.resized)
            resized = {}
            for line, (path, *done) in enumerate(
                    workdir.iter_csv(self.resized, RESIZED_READ, required=RESIZED_READ[:4]), start=2):
                check(line, path, done[2])
                resized[path] = tuple(done)
            usable = []
            for row in rows:
                done = resized.get(row["path"])
                if done is None or done[0] != row["sha256"]:
                    raise PrepError(
                        f"{self.resized} is out of date ({row['path']} not resized); run `prep resize` again"
                    )
                if done[1] == "ok":
                    usable.append((row["path"], row["label"], row["sha256"], *done[2:]))
            self.excluded = len(rows) - len(usable)
        # index order (class, then path): the output and the conflicts reported do not depend on
        # the order of the input rows. The CSV `prep index` wrote is in that order already.
        if not self.natural:
            usable.sort(key=lambda r: (NATURAL(r[1]), NATURAL(r[0])))
        self.held = usable
        return usable


# -- what is known of each image: arrays ------------------------------------------------------


@dataclass
class Images:
    """The usable images, in index order, as arrays with an entry per image: their class, their
    content (sha256), their perceptual hashes (``point``: the index of the image's distinct pair of
    hashes, -1 for none; ``pairs``: near copies between points) and their user groups."""

    classes: list[str]  # class names, by number (in index order: natural order)
    label: object  # int32: the number of its class
    content: object  # int32: the rank of its sha256 among the distinct ones (in ``shas``)
    shas: object  # the distinct sha256s, sorted: digests (as 4 big-endian uint64) when ``binary``, else texts
    binary: bool
    point: object  # int32, -1 for none
    pairs: object  # pipeline.nearcopy.Pairs between points
    points: int
    user: list  # int32 arrays: the number of its user group (-1 for none), by --group-by and by --groups
    user_groups: int

    def sha(self, content: int) -> str:
        """The sha256 of a content number, as its text."""
        if self.binary:
            return self.shas[content].tobytes().hex()
        return self.shas[content].decode()


def distinct_rows(rows):
    """``np.unique(rows, axis=0, return_inverse=True)`` of a 2-D array of numbers, the inverse as
    int32, in a fraction of the memory: no copy of the rows is sorted, only their order."""
    import numpy as np

    n = len(rows)
    order = np.lexsort(rows.T[::-1])  # by the first column, then the next...
    new = np.ones(n, bool)  # where a row differs from the one before it, in that order
    for start in range(1, n, _CHUNK):
        at = order[start - 1 : start + _CHUNK]
        new[start : start + len(at) - 1] = (rows[at[1:]] != rows[at[:-1]]).any(axis=1)
    distinct = rows[order[new]]
    inverse = np.empty(n, np.int32)
    inverse[order] = np.cumsum(new, dtype=np.int32) - 1
    return distinct, inverse


def read_images(rows: Usable, rule: str, pattern: re.Pattern | None, groups: dict[str, str] | None) -> Images:
    """One pass over the usable rows: their arrays, the near copies under ``rule`` (from their
    phash8/phash16) and their user groups."""
    import numpy as np

    from .. import nearcopy

    classes: dict[str, int] = {}
    label = array("i")
    digests, binary = bytearray(), True  # the sha256s as bytes, while all are hex digests
    hashed, hashes, malformed = bytearray(), bytearray(), False  # phash8 + phash16: 40 bytes each
    keys: dict[str, int] = {}  # user group -> its number
    by_regex, by_csv = array("i"), array("i")
    unmatched, listed = 0, set()
    for path, name, sha, _, _, phash8, phash16 in rows:
        label.append(classes.setdefault(name, len(classes)))
        if binary:
            if len(sha) == 64 and _SHA256.fullmatch(sha):
                digests += bytes.fromhex(sha)
            else:
                binary, digests = False, bytearray()
        if phash8 and phash16:
            hashed.append(1)
            if malformed or len(phash8) != 16 or len(phash16) != 64 or not _HEX.fullmatch(phash8 + phash16):
                malformed = True
            else:
                hashes += bytes.fromhex(phash8 + phash16)
        else:
            hashed.append(0)
        if pattern is not None:
            found = pattern.search(path)
            if found and found.group("group"):
                by_regex.append(keys.setdefault("by:" + found.group("group"), len(keys)))
            else:
                by_regex.append(-1)
                unmatched += 1
        if groups is not None:
            if path in groups:
                by_csv.append(keys.setdefault("csv:" + groups[path], len(keys)))
                listed.add(path)
            else:
                by_csv.append(-1)
    n = len(label)
    if not n:
        raise PrepError(f"no usable images in {rows.labels}")

    if binary:  # the digests as four big-endian numbers each: sorted as their bytes and hex text
        shas, content = distinct_rows(np.frombuffer(digests, ">u8").reshape(-1, 4))
    else:
        shas, content = np.unique(np.array([r[2].encode() for r in rows], dtype=bytes), return_inverse=True)
        content = content.astype(np.int32)
    del digests
    hashed = np.frombuffer(hashed, np.bool_)
    point = np.full(n, -1, np.int32)
    pairs = nearcopy.Pairs()  # none
    points = 0
    if rule != "off" and hashed.any():
        if malformed:  # as the hashes always were parsed: the first malformed one names the fault
            listed_hashes = [(r[5], r[6]) for r in rows if r[5] and r[6]]
            try:
                h8, h16 = nearcopy.parse_hashes([h for h, _ in listed_hashes], [h for _, h in listed_hashes])
            except ValueError as err:
                raise PrepError(f"{workdir.RESIZED}: {err}; run `prep resize` again") from None
            del listed_hashes
            stacked = np.column_stack([h8, h16])
            del h8, h16
        else:  # in place: big-endian to native numbers
            stacked = np.frombuffer(hashes, ">u8").byteswap(inplace=True).view(np.uint64).reshape(-1, 5)
        distinct, point[hashed] = distinct_rows(stacked)
        del stacked, hashes
        points = len(distinct)
        # on disk, beside the work directory's other files: the system's temporary folder may be in memory
        pairs = nearcopy.near_pairs(distinct[:, 0], distinct[:, 1:], rule, folder=rows.wd.root)
        del distinct
    if rule != "off" and not hashed.all():
        missing = n - int(hashed.sum())
        log.warning("%d of %d images have no perceptual hash (resized.csv missing, or written by an earlier prep):"
                    " their near copies are not looked for; run `prep resize`", missing, n)
    user = []
    if pattern is not None:
        if unmatched:
            log.warning("%d images match no --group-by group; each is a group of its own", unmatched)
        user.append(np.frombuffer(by_regex, np.int32))
    if groups is not None:
        stray = [p for p in groups if p not in listed]
        if stray:
            log.warning("%d paths of --groups are not usable images of %s, e.g. %s", len(stray), workdir.LABELS,
                        stray[0])
        user.append(np.frombuffer(by_csv, np.int32))
    return Images(list(classes), np.frombuffer(label, np.int32), content, shas, binary, point,
                  pairs, points, user, len(keys))


@dataclass
class Units:
    """Images joined by content, near copies and user groups, transitively: the units that
    share a split, numbered in the order of their first image."""

    of: object  # int32 per image: its unit, -1 for an image left out
    first: object  # per unit: its first image
    size: object  # per unit: its images

    def __len__(self) -> int:
        return len(self.first)


def group_units(images: Images, alive) -> Units:
    """The units of the images ``alive``. A graph of contents (the images of one content are
    one node), points and user groups, joined by each image's content to its point and user
    groups and by the near-copy pairs between live points."""
    import numpy as np

    from .. import nearcopy

    rows = np.flatnonzero(alive)
    contents, points = len(images.shas), images.points
    # nodes: the points, then the contents, then the user groups
    hashed = rows[images.point[rows] >= 0]
    live = np.zeros(points, bool)
    live[images.point[hashed]] = True

    def edges():
        yield images.point[hashed], points + images.content[hashed]
        for pair in images.pairs.chunks():
            both = live[pair["a"]] & live[pair["b"]]
            yield pair["a"][both], pair["b"][both]
        for keys in images.user:
            grouped = rows[keys[rows] >= 0]
            yield points + images.content[grouped], points + contents + keys[grouped]

    component = nearcopy.components(points + contents + images.user_groups, edges)
    del hashed, live
    _, first, inverse = np.unique(component[points + images.content[rows]], return_index=True, return_inverse=True)
    del component
    order = np.argsort(first)  # units by their first image
    number = np.empty(len(order), np.int32)
    number[order] = np.arange(len(order), dtype=np.int32)
    of = np.full(len(images.label), -1, np.int32)
    of[rows] = number[inverse.reshape(-1)]
    return Units(of, rows[first[order]].astype(np.int32), np.bincount(of[rows], minlength=len(order)))


def assign_units(images: Images, units: Units, ratios: tuple[float, float, float], seed: int):
    """The split (0, 1, 2) of each unit, as :func:`assign` places them: per class (the class of
    the unit's first image), larger units first, then in the seeded order of their smallest
    sha256."""
    import numpy as np

    alive = units.of >= 0
    smallest = np.full(len(units), len(images.shas), np.int32)
    np.minimum.at(smallest, units.of[alive], images.content[alive])
    del alive
    keys = bytearray(32 * len(units))
    for start in range(0, len(units), _CHUNK):
        for k, content in enumerate(smallest[start : start + _CHUNK].tolist(), start=start):
            keys[32 * k : 32 * k + 32] = hashlib.sha256(f"{seed}:{images.sha(content)}".encode()).digest()
    del smallest
    # the digests as four numbers each, in place: ordered as their hex text
    key = np.frombuffer(keys, ">u8").byteswap(inplace=True).view(np.uint64).reshape(-1, 4)
    owner = images.label[units.first]
    order = np.lexsort((key[:, 3], key[:, 2], key[:, 1], key[:, 0], -units.size, owner))
    del key, keys
    split = np.zeros(len(units), np.int8)
    bounds = np.flatnonzero(np.diff(owner[order])) + 1
    for part in np.split(order, bounds):
        if len(part):
            split[part] = fill(units.size[part].tolist(), ratios)
    return split


# -- pairs: conflicts and near copies -------------------------------------------------------
#
# For each image, its closest near copy: the first image (in index order) of its own point that
# qualifies, else the first that qualifies at the closest point that has one: by distance8, then
# distance16, then the point's number. Near copies, of any label, look at the closest point
# only; conflicts (another label) at each point in turn. A point's near copies are in its unit.

_FAR = (1 << 63) - 1  # the closeness of no neighbour
_POINT = (1 << 31) - 1  # the bits of the neighbour in a closeness


def _pair_chunks(images: Images, live) -> Iterator[tuple]:
    """The near-copy pairs between the points ``live``, each way, a chunk at a time: (point,
    neighbour, closeness), the closeness an int64 that orders neighbours by distance8, then
    distance16, then number: (distance8 << 40) | (distance16 << 31) | neighbour."""
    import numpy as np

    for pair in images.pairs.chunks():
        keep = live[pair["a"]] & live[pair["b"]]
        pair = pair[keep]
        a, b = pair["a"].astype(np.int32), pair["b"].astype(np.int32)
        near = (pair["d8"].astype(np.int64) << 40) | (pair["d16"].astype(np.int64) << 31)
        yield a, b, near | b
        yield b, a, near | a


def _distances(closeness):
    """(distance8, distance16) of closenesses."""
    return closeness >> 40, (closeness >> 31) & 0x1FF


def _alive_rows(images: Images, units: Units, hashed: bool = False):
    """The images in a unit (with a perceptual hash, if ``hashed``), as int32 indices."""
    import numpy as np

    alive = (units.of >= 0) & (images.point >= 0) if hashed else units.of >= 0
    return np.flatnonzero(alive).astype(np.int32)


def _firsts(images: Images, rows, key):
    """Per point, among the images ``rows``: its first image, and its first image whose ``key``
    (content, label) differs from that one's; -1 for none."""
    import numpy as np

    rows = rows[images.point[rows] >= 0]
    point = images.point[rows]
    none = len(images.label)
    head = np.full(images.points, none, np.int32)
    np.minimum.at(head, point, rows)
    differ = key[rows] != key[head[point]]
    other = np.full(images.points, none, np.int32)
    np.minimum.at(other, point[differ], rows[differ])
    head[head == none] = -1
    other[other == none] = -1
    return head, other


def _partner(head, other, key, i, p):
    """The first image at points ``p`` whose ``key`` differs from image ``i``'s: -1 for none."""
    import numpy as np

    return np.where(key[head[p]] != key[i], head[p], other[p])


def _sorted_pairs(n: int, a, b, d8, d16):
    """Pairs as arrays (a, b int32; distance8 uint8, distance16 uint16), each pair once, a < b,
    sorted by a, then b."""
    import numpy as np

    low, high = np.minimum(a, b), np.maximum(a, b)
    order = np.argsort(low.astype(np.int64) * n + high)
    low, high = low[order], high[order]
    once = np.r_[True, (low[1:] != low[:-1]) | (high[1:] != high[:-1])] if len(order) else np.zeros(0, bool)
    order = order[once]
    return (low[once].astype(np.int32), high[once].astype(np.int32), np.asarray(d8)[order].astype(np.uint8),
            np.asarray(d16)[order].astype(np.uint16))


def near_copy_pairs(images: Images, units: Units):
    """(a, b, distance8, distance16) arrays, a < b, sorted: for every image with one, its closest
    near copy of other content, of any label (the first image of its own point of other
    content, else that of the closest point); each pair once."""
    import numpy as np

    rows = _alive_rows(images, units, hashed=True)
    content = images.content
    head, other = _firsts(images, rows, content)
    point = images.point[rows]
    j = _partner(head, other, content, rows, point)
    # none there: the closest point
    closest = np.full(images.points, _FAR, np.int64)
    for p, _, closeness in _pair_chunks(images, head >= 0):
        np.minimum.at(closest, p, closeness)
    alone = np.flatnonzero(j < 0)
    closeness = closest[point[alone]]
    del closest, point
    alone, closeness = alone[closeness < _FAR], closeness[closeness < _FAR]
    j[alone] = _partner(head, other, content, rows[alone], (closeness & _POINT).astype(np.int32))
    found = np.flatnonzero(j >= 0)
    d8, d16 = np.zeros(len(found), np.int64), np.zeros(len(found), np.int64)
    at = np.searchsorted(found, alone)  # the alone among the found
    far = j[alone] >= 0
    d8[at[far]], d16[at[far]] = _distances(closeness[far])
    return _sorted_pairs(len(images.label), rows[found], j[found], d8, d16)


def conflict_pairs(images: Images, units: Units):
    """As :func:`near_copy_pairs`, under another label: the first image of its own point of
    other content and another label, else that of the closest point that has one. Identical
    files under two labels are pairs at distance 0: each file with the first of its content."""
    import numpy as np

    from .. import nearcopy

    rows = _alive_rows(images, units)
    content, label = images.content, images.label
    first = np.full(len(images.shas), len(label), np.int32)
    np.minimum.at(first, content[rows], rows)
    twin = first[content[rows]]
    del first
    cross = np.flatnonzero(label[twin] != label[rows])
    found = [(twin[cross], rows[cross], np.zeros(len(cross), np.int64), np.zeros(len(cross), np.int64))]
    del twin, cross
    # near copies under another label: looked for in the units of two classes or more
    of = units.of[rows]
    low = np.full(len(units), len(images.classes), np.int32)
    high = np.full(len(units), -1, np.int32)
    np.minimum.at(low, of, label[rows])
    np.maximum.at(high, of, label[rows])
    mixed = rows[(low != high)[of] & (images.point[rows] >= 0)]
    del low, high, of
    head, other = _firsts(images, rows, label)
    del rows
    point = images.point[mixed]
    j = _partner(head, other, label, mixed, point)
    # the first image of another label there may be a copy of this one: then one by one
    slow = np.zeros(len(mixed), bool)
    slow[j >= 0] = content[j[j >= 0]] == content[mixed[j >= 0]]
    here = np.flatnonzero((j >= 0) & ~slow)
    found.append((mixed[here], j[here], np.zeros(len(here), np.int64), np.zeros(len(here), np.int64)))
    # none of another label there: the closest point that has one
    need = np.flatnonzero(j < 0)  # into mixed
    del j, here
    if len(need):
        wanted = np.bincount(point[need], minlength=images.points).astype(np.int32)  # images of need per point
        starts = np.cumsum(wanted, dtype=np.int64) - wanted
        at_point = need[np.argsort(point[need], kind="stable")]
        best = np.full(len(mixed), _FAR, np.int64)
        for p, q, closeness in _pair_chunks(images, head >= 0):
            has = np.flatnonzero(wanted[p])
            for part in nearcopy._chunks(has, wanted[p[has]]) if len(has) else ():
                count = wanted[p[part]]
                pair = np.repeat(part, count)
                k = at_point[np.repeat(starts[p[part]] - (np.cumsum(count) - count), count) + np.arange(len(pair))]
                i = mixed[k]
                j = _partner(head, other, label, i, q[pair])
                ok = j >= 0
                copy = ok & (content[j] == content[i])
                slow[k[copy]] = True
                ok &= ~copy
                np.minimum.at(best, k[ok], closeness[pair[ok]])
        done = need[(best[need] < _FAR) & ~slow[need]]
        closeness = best[done]
        del best, wanted, starts, at_point
        q = (closeness & _POINT).astype(np.int32)
        found.append((mixed[done], _partner(head, other, label, mixed[done], q), *_distances(closeness)))
    del head, other, point
    if slow.any():
        found.append(_one_by_one(images, units, mixed[slow]))
    return _sorted_pairs(len(label), *(np.concatenate(x) for x in zip(*found)))


def _one_by_one(images: Images, units: Units, mixed):
    """:func:`conflict_pairs`' search for the images ``mixed``, an image and a point at a time:
    for those with a copy under another label at a point (few, where any)."""
    import numpy as np

    label, content, point = memoryview(images.label), memoryview(images.content), memoryview(images.point)
    rows = _alive_rows(images, units, hashed=True)
    order = np.argsort(images.point[rows], kind="stable")
    by_point = rows[order]  # the images of each point, in index order
    del rows, order
    points = images.point[by_point]
    # the neighbours of their points, closest first
    wanted = np.zeros(images.points, bool)
    wanted[images.point[mixed]] = True
    live = np.zeros(images.points, bool)
    live[points] = True
    near = [(p[wanted[p]], c[wanted[p]]) for p, _, c in _pair_chunks(images, live)]
    p, closeness = (np.concatenate(x) for x in zip(*near)) if near else (np.zeros(0, np.int32),) * 2
    order = np.lexsort((closeness, p))
    p, closeness = p[order], memoryview(closeness[order])
    del near, order, live, wanted

    def images_at(q: int):
        return by_point[points.searchsorted(q) : points.searchsorted(q, "right")].tolist()

    a, b, d8, d16 = array("q"), array("q"), array("q"), array("q")
    for i in mixed.tolist():
        at, mine, same = point[i], label[i], content[i]
        best = None
        for j in images_at(at):
            if label[j] != mine and content[j] != same:
                best = j, 0, 0
                break
        else:
            for k in range(p.searchsorted(at), p.searchsorted(at, "right")):
                for j in images_at(closeness[k] & _POINT):
                    if label[j] != mine and content[j] != same:
                        best = j, *_distances(closeness[k])
                        break
                if best is not None:
                    break
        if best is not None:
            a.append(i)
            b.append(best[0])
            d8.append(best[1])
            d16.append(best[2])
    return tuple(np.frombuffer(x, np.int64) if len(x) else np.zeros(0, np.int64) for x in (a, b, d8, d16))


class _Paths:
    """The paths of some images (``wanted``: their sorted indices), packed (:class:`sources.Paths`)."""

    def __init__(self, wanted):
        import numpy as np

        self.wanted = np.unique(np.asarray(wanted, np.int64))
        self.found = sources.Paths()

    @property
    def complete(self) -> bool:
        return len(self.found) == len(self.wanted)

    def offer(self, i: int, path: str) -> None:
        """The path of image ``i`` (images offered in index order)."""
        if not self.complete and self.wanted[len(self.found)] == i:
            self.found.append(path)

    def read(self, rows: Usable) -> _Paths:
        if not self.complete:
            for i, row in enumerate(rows):
                self.offer(i, row[0])
                if self.complete:
                    break
        return self

    def __getitem__(self, i: int) -> str:
        return self.found[int(self.wanted.searchsorted(i))]


def _chunks(*columns) -> Iterator[tuple]:
    """The entries of arrays side by side, as Python numbers, a chunk at a time."""
    for start in range(0, len(columns[0]), _CHUNK):
        yield from zip(*(c[start : start + _CHUNK].tolist() for c in columns))


def pair_rows(classes: list[str], label, paths: _Paths, pairs) -> Iterator[tuple]:
    """Pairs as rows of conflicts.csv and near_copies.csv (``label``: the images' class numbers)."""
    for a, b, d8, d16 in _chunks(*pairs):
        yield paths[a], classes[label[a]], paths[b], classes[label[b]], d8, d16


# -- tables ----------------------------------------------------------------------------------


def count_table(rows: Iterable[tuple[str, str]]) -> dict[str, dict[str, int]]:
    """class -> split -> images of (label, split) rows, classes in natural order."""
    counts: dict[str, dict[str, int]] = {}
    for label, split in rows:
        counts.setdefault(label, dict.fromkeys(SPLITS, 0))[split] += 1
    return {label: counts[label] for label in sorted(counts, key=NATURAL)}


def _table(images: Images, units: Units, split) -> dict[str, dict[str, int]]:
    import numpy as np

    rows = np.flatnonzero(units.of >= 0)
    counts = np.bincount(images.label[rows] * 3 + split[units.of[rows]], minlength=3 * len(images.classes))
    counts = counts.reshape(-1, 3).tolist()
    present = [c for c in range(len(images.classes)) if sum(counts[c])]
    return {images.classes[c]: dict(zip(SPLITS, counts[c])) for c in
            sorted(present, key=lambda c: NATURAL(images.classes[c]))}


def achieved(table: dict[str, dict[str, int]], ratios: tuple[float, float, float]) -> tuple[dict[str, float], float]:
    """Each split's share of the images, and the largest distance of a class's share from its ratio."""
    total = sum(sum(c.values()) for c in table.values()) or 1
    shares = {s: sum(c[s] for c in table.values()) / total for s in SPLITS}
    worst = 0.0
    for counts in table.values():
        n = sum(counts.values())
        worst = max([worst] + [abs(counts[s] / n - r) for s, r in zip(SPLITS, ratios)])
    return shares, worst


def _images(n: int, different: int) -> str:
    text = f"{n} image{'s' * (n != 1)}"
    # a group belongs to the class of its first image
    return text if different == n else f"{text}, {different} different (copies, near copies and groups count once)"


def split_rows(rows: Usable, units: Units, split, paths: _Paths) -> Iterator[tuple]:
    """The rows of splits.csv, as the usable rows are read again (``paths`` takes those it wants);
    a unit of several images is named by its first image's path, held while its images come."""
    of, first, size, split = memoryview(units.of), memoryview(units.first), memoryview(units.size), memoryview(split)
    names: dict[int, list] = {}  # unit -> [its name, images still to come]
    i = -1
    for i, (path, label, sha, resized, resized_sha, _, _) in enumerate(rows):
        if i >= len(of):
            break
        paths.offer(i, path)
        unit = of[i]
        if unit < 0:
            continue
        group = ""
        if size[unit] > 1:
            if first[unit] == i:
                names[unit] = [path, size[unit]]
            name = names[unit]
            group, name[1] = name[0], name[1] - 1
            if not name[1]:
                del names[unit]
        yield path, label, sha, resized, resized_sha, SPLITS[split[unit]], group
    if i + 1 != len(of):
        raise PrepError(f"{rows.labels} changed while split read it; run `prep split` again")


def run(cfg: SplitConfig) -> SplitResult:
    pattern = check_options(cfg)
    settings = settings_of(cfg.ratios, cfg.seed, cfg.drop_small, cfg.near_copies, cfg.on_conflict, cfg.group_by,
                           cfg.groups)
    from .resize import JOURNAL

    if cfg.workdir.path(JOURNAL).exists():  # resized.csv and resized/ are then from two runs
        log.warning("prep resize was interrupted (%s is there): %s is from the run before it; run the"
                    " interrupted command again, with its options, to finish it, then split",
                    JOURNAL, workdir.RESIZED)
    stamp = workdir.Stamp(cfg.workdir, "split")
    extra = [cfg.groups] if cfg.groups else []
    inputs = [cfg.labels] + [p for p in [cfg.workdir.path(workdir.RESIZED)] if p.exists()] + extra
    if cfg.out.exists() and stamp.is_current(inputs, settings):
        recorded = stamp.summary()  # class -> split -> images, keys sorted by JSON
        try:
            table = {c: {s: int(recorded[c][s]) for s in SPLITS} for c in sorted(recorded, key=NATURAL)}
        except (TypeError, KeyError, ValueError):  # a stamp from before summaries were kept
            table = count_table(workdir.iter_csv(cfg.out, ["label", "split"], required=SPLIT_COLUMNS))
        return SplitResult(cfg.out, table, up_to_date=True)
    with contextlib.ExitStack() as cleanup:
        return _split(cfg, pattern, extra, settings, stamp, cleanup)


def _split(cfg: SplitConfig, pattern: re.Pattern | None, extra: list, settings: dict, stamp: workdir.Stamp,
           cleanup: contextlib.ExitStack) -> SplitResult:
    """:func:`run`'s split, when it is not up to date: the images read, split, the files
    written and recorded. The near-copy pairs' temporary file is closed by ``cleanup``,
    however the split ends; the rest goes as soon as it is no longer needed."""
    import numpy as np  # here: an up-to-date split does without it

    workdir.map_large_blocks()  # arrays of an entry per image are freed and made in turn
    groups = read_groups(cfg.groups) if cfg.groups else None
    rows = Usable(cfg.workdir, cfg.labels)
    try:
        images = read_images(rows, cfg.near_copies, pattern, groups)
    except _Unpaired:
        rows.hold()
        images = read_images(rows, cfg.near_copies, pattern, groups)
    cleanup.enter_context(images.pairs)
    inputs = rows.inputs + extra
    classes, label = images.classes, images.label
    n = len(label)
    alive = np.ones(n, bool)
    units = group_units(images, alive)

    conflicts = conflict_pairs(images, units)
    count = len(conflicts[0])
    conflicting = _Paths(np.concatenate(conflicts[:2])).read(rows)  # the paths of their images
    workdir.write_csv_rows(cfg.workdir.path(CONFLICTS), PAIR_COLUMNS, pair_rows(classes, label, conflicting, conflicts))
    _warn_conflicts(list(pair_rows(classes, label, conflicting, [c[:5] for c in conflicts])), count, cfg.on_conflict)
    if count and cfg.on_conflict == "error":
        first = next(pair_rows(classes, label, conflicting, conflicts))
        raise PrepError(
            f"--on-conflict error: {first[0]} ({first[1]}) and {first[2]} ({first[3]})"
            f" are the same picture under two labels (distance {first[4]}); {count} such"
            f" pair{'s' * (count != 1)} in {CONFLICTS}"
        )
    if count and cfg.on_conflict == "drop":
        alive[conflicts[0]] = alive[conflicts[1]] = False
        units = group_units(images, alive)

    counts = np.bincount(label[alive], minlength=len(classes)).tolist()
    owned = np.bincount(label[units.first], minlength=len(classes)).tolist()
    needed = sum(1 for r in cfg.ratios if r > 0)
    # images that share a split count once: a class needs as many different images (and groups)
    # of its own (not copies of another class's) as there are splits
    small = {classes[c]: counts[c] for c in range(len(classes)) if counts[c] and owned[c] < needed}
    if small and not cfg.drop_small:
        name = min(small, key=NATURAL)
        c = classes.index(name)
        raise PrepError(
            f"class {name!r} has {_images(counts[c], owned[c])}; the ratios need at least"
            f" {needed} different images per class (add images, or pass --drop-small to leave out the"
            f" {'small class' if len(small) == 1 else f'{len(small)} small classes'})"
        )
    for name in small:
        c = classes.index(name)
        log.warning("dropping class %r: %s, fewer than the %d different images the splits need", name,
                    _images(counts[c], owned[c]), needed)
    if small:
        alive &= ~np.isin(label, [classes.index(name) for name in small])
        units = group_units(images, alive)
    if not alive.any():
        raise PrepError(f"every class has fewer than the {needed} images the ratios need; nothing left to split")

    split = assign_units(images, units, cfg.ratios, cfg.seed)
    table = _table(images, units, split)
    near = near_copy_pairs(images, units)
    large = _large_units(images, units, table)
    biggest = int(np.argmax(units.size))
    # the paths of the near copies' images and of the large groups', taken as splits.csv is written
    paths = _Paths(np.concatenate([*near[:2], units.first[large], units.first[biggest : biggest + 1]]))
    workdir.write_csv_rows(cfg.out, SPLIT_COLUMNS, split_rows(rows, units, split, paths))
    workdir.write_csv_rows(cfg.workdir.path(NEAR_COPIES), PAIR_COLUMNS, pair_rows(classes, label, paths, near))
    notes = _group_notes(images, units, table, cfg.ratios, large, paths)
    # for manifest.json, the card and the report: the settings, the classes and pictures they
    # left out, and how the groups shaped the split
    dropped = {name: small[name] for name in sorted(small, key=NATURAL)}
    shares, worst = achieved(table, cfg.ratios)
    sizes = units.size[units.size > 1]
    workdir.write_json(cfg.workdir.path(workdir.SPLIT_SETTINGS), {
        **settings, "dropped_classes": dropped, "conflicts": count,
        "dropped_conflicts": int(n - alive.sum()) - sum(dropped.values()) if cfg.on_conflict == "drop" else 0,
        "grouped": {"groups": len(sizes), "images": int(sizes.sum()), "largest": int(sizes.max()) if len(sizes) else 0,
                    "near_copy_pairs": len(near[0])},
        "achieved": {s: round(shares[s], 4) for s in SPLITS}, "largest_class_deviation": round(worst, 4),
    })
    stamp.record(inputs, settings, [cfg.out, cfg.workdir.path(CONFLICTS), cfg.workdir.path(NEAR_COPIES)], summary=table)
    del images, units, near, paths, split, alive  # before the conflicts as the result lists them
    four = [row[:4] for row in pair_rows(classes, label, conflicting, conflicts)]
    return SplitResult(cfg.out, table, four, small, rows.excluded, notes=notes)


def _warn_conflicts(pairs: list[tuple], count: int, policy: str) -> None:
    """``pairs``: the first rows of conflicts.csv; ``count``: all of them."""
    outcome = {"keep": "kept in one split", "drop": "both left out", "error": "refused"}[policy]
    for c in pairs[:5]:
        log.warning("the same picture under two labels: %s (%s) and %s (%s), distance %s; %s", *c[:5], outcome)
    if count > 5:
        log.warning("... %d pairs of images under two labels in all (see %s)", count, CONFLICTS)


def _large_units(images: Images, units: Units, table: dict):
    """The units of several images over :data:`LARGE_GROUP` of their class's images."""
    import numpy as np

    grouped = np.flatnonzero(units.size > 1)
    totals = np.array([sum(table[c].values()) if c in table else 0 for c in images.classes], np.int64)
    return grouped[units.size[grouped] > LARGE_GROUP * totals[images.label[units.first[grouped]]]]


def _group_notes(images: Images, units: Units, table: dict, ratios, large, paths: _Paths) -> list[str]:
    """Warnings about groups too large for their class, and how far the split is from the ratios."""
    import numpy as np

    grouped = units.size[units.size > 1]
    if not len(grouped):
        return []
    found = []
    for unit in large.tolist():
        first = int(units.first[unit])
        label = images.classes[images.label[first]]
        found.append((int(units.size[unit]), paths[first], label, sum(table[label].values())))
    found.sort(key=lambda g: (-g[0], NATURAL(g[1])))
    for n, path, label, size in found[:5]:
        log.warning("a group of %d images (%.0f%% of class %r), with %s, is kept in one split", n, 100 * n / size,
                    label, path)
    if len(found) > 5:
        log.warning("... %d groups over %.0f%% of their class in all", len(found), 100 * LARGE_GROUP)
    shares, worst = achieved(table, ratios)
    biggest = int(np.argmax(units.size))
    return [
        f"Kept together: {int(grouped.sum())} images in {len(grouped)} group{'s' * (len(grouped) != 1)} of"
        f" copies, near copies or user groups (the largest: {int(units.size[biggest])} images, with"
        f" {paths[int(units.first[biggest])]})",
        "Achieved " + ", ".join(f"{s} {shares[s]:.3f}" for s in SPLITS)
        + " (ratios " + ", ".join(f"{r:.3f}" for r in ratios) + f"); a class differs by at most {worst:.3f}",
    ]
