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
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections import defaultdict
from fractions import Fraction
from dataclasses import dataclass, field
from pathlib import Path

from .. import workdir
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


def units_by_class(
    rows: list[dict], units: dict[str, list[dict]] | None = None
) -> tuple[dict[str, list[dict]], dict[str, list[str]]]:
    """key -> the rows of a unit (images that share a split: by default those of one sha256;
    :func:`group_units` gives the units of groups, keyed by their smallest sha256), and
    class -> the units it owns: a unit belongs to the class of its first file in index order."""
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
    """path -> split. Pure: the same rows (in any order), ratios, seed and units give the same result."""
    units, by_class = units_by_class(rows, units)
    result: dict[str, str] = {}
    for label, shas in by_class.items():
        # groups of duplicates first, largest first, so that single images even out the counts;
        # within a size, a seeded order of the content
        shas.sort(key=lambda s: (-len(units[s]), _unit_key(seed, s)))
        size = sum(len(units[s]) for s in shas)
        target = allocate(size, ratios)
        filled = [0, 0, 0]
        for left, sha in zip(range(len(shas), 0, -1), shas):
            # the split furthest below its target, for its size, takes the unit (ties: train,
            # valid, test), so groups of copies spread over the splits as single images do, instead
            # of all going to train (the largest absolute gap); but when no more units are left
            # than splits still empty, one of those
            empty = [k for k in range(3) if target[k] and not filled[k]]
            choices = empty if len(empty) >= left else range(3)
            i = max(choices, key=lambda k: ((target[k] - filled[k]) / target[k] if target[k] else -1.0, -k))
            filled[i] += len(units[sha])
            for member in units[sha]:
                result[member["path"]] = SPLITS[i]
    return result


# -- groups: near copies and user groups ---------------------------------------------------


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


@dataclass
class Links:
    """What ties images together, by their position in ``rows`` (in index order): their content
    (sha256), their perceptual hashes (``point``: the index of the image's distinct pair of
    hashes, -1 for none; ``pairs``: near copies between points) and user groups."""

    rows: list[dict]
    point: object  # numpy int64 array, one per row
    pairs: object  # pipeline.nearcopy.Pairs between points
    user: list[list[str]]  # the user groups of each row

    @property
    def points(self) -> int:
        return int(self.point.max()) + 1 if len(self.point) else 0


def find_links(rows: list[dict], rule: str, pattern: re.Pattern | None, groups: dict[str, str] | None) -> Links:
    """The near copies of ``rows`` under ``rule`` (from their phash8/phash16) and their user groups."""
    import numpy as np

    from .. import nearcopy

    point = np.full(len(rows), -1, np.int64)
    pairs = nearcopy.near_pairs(np.zeros(0, np.uint64), np.zeros((0, 4), np.uint64))
    hashed = [i for i, r in enumerate(rows) if r.get("phash8") and r.get("phash16")]
    if rule != "off" and hashed:
        try:
            h8, h16 = nearcopy.parse_hashes([rows[i]["phash8"] for i in hashed], [rows[i]["phash16"] for i in hashed])
        except ValueError as err:
            raise PrepError(f"{workdir.RESIZED}: {err}; run `prep resize` again") from None
        distinct, inverse = np.unique(np.column_stack([h8, h16]), axis=0, return_inverse=True)
        point[hashed] = inverse.reshape(-1)
        pairs = nearcopy.near_pairs(distinct[:, 0], distinct[:, 1:], rule)
    if rule != "off" and len(hashed) < len(rows):
        log.warning("%d of %d images have no perceptual hash (resized.csv missing, or written by an earlier prep):"
                    " their near copies are not looked for; run `prep resize`", len(rows) - len(hashed), len(rows))
    user: list[list[str]] = [[] for _ in rows]
    if pattern is not None:
        unmatched = 0
        for keys, row in zip(user, rows):
            found = pattern.search(row["path"])
            if found and found.group("group"):
                keys.append("by:" + found.group("group"))
            else:
                unmatched += 1
        if unmatched:
            log.warning("%d images match no --group-by group; each is a group of its own", unmatched)
    if groups is not None:
        known = {r["path"] for r in rows}
        stray = [p for p in groups if p not in known]
        if stray:
            log.warning("%d paths of --groups are not usable images of %s, e.g. %s", len(stray), workdir.LABELS,
                        stray[0])
        for keys, row in zip(user, rows):
            if row["path"] in groups:
                keys.append("csv:" + groups[row["path"]])
    return Links(rows, point, pairs, user)


def group_units(links: Links, alive) -> list[list[int]]:
    """The units (row positions, in order) of the rows ``alive``: rows joined by content, near
    copies and user groups, transitively; units in the order of their first row."""
    import numpy as np

    from .. import nearcopy

    n, points = len(links.rows), links.points
    alive_at = np.flatnonzero(alive)
    ends: list[tuple] = []
    hashed = alive_at[links.point[alive_at] >= 0]
    ends.append((hashed, n + links.point[hashed]))
    live = np.zeros(points, bool)
    live[links.point[hashed]] = True
    pairs = links.pairs
    both = live[pairs.a] & live[pairs.b] if len(pairs.a) else np.zeros(0, bool)
    ends.append((n + pairs.a[both], n + pairs.b[both]))
    keys: dict[str, int] = {}
    a, b = [], []
    for i in alive_at.tolist():
        row = links.rows[i]
        for key in ["sha:" + row["sha256"], *links.user[i]]:
            a.append(i)
            b.append(n + points + keys.setdefault(key, len(keys)))
    ends.append((np.array(a, np.int64), np.array(b, np.int64)))
    component = nearcopy.components(n + points + len(keys), *(np.concatenate(side) for side in zip(*ends)))
    units: dict[int, list[int]] = {}
    for i in alive_at.tolist():
        units.setdefault(int(component[i]), []).append(i)
    return list(units.values())


def keyed_units(links: Links, units: list[list[int]]) -> dict[str, list[dict]]:
    """The units as :func:`assign` takes them: keyed by their smallest sha256 (a key that does not
    depend on the order of the rows, and is the sha256 itself for a unit of one content)."""
    return {min(links.rows[i]["sha256"] for i in unit): [links.rows[i] for i in unit] for unit in units}


def closest_pairs(links: Links, units: list[list[int]], other_label: bool) -> list[tuple[int, int, int, int]]:
    """(a, b, distance8, distance16), a < b: for every image with one, its closest near copy of
    other content (``other_label``: under another label; among equals, the first image of the
    smaller hash); each pair once, in index order. Identical files under two labels are pairs at
    distance 0."""
    found: set[tuple[int, int, int, int]] = set()
    if other_label:  # the same content under two labels: each file with the first of its content
        for unit in units:
            first: dict[str, int] = {}
            for i in unit:
                j = first.setdefault(links.rows[i]["sha256"], i)
                if links.rows[j]["label"] != links.rows[i]["label"]:
                    found.add((j, i, 0, 0))
    units = [u for u in units if len(u) > 1 and (not other_label or len({links.rows[i]["label"] for i in u}) > 1)]
    neighbours = _neighbours(links, units, closest_only=not other_label)
    for unit in units:
        at: dict[int, list[int]] = {}
        for i in unit:
            if links.point[i] >= 0:
                at.setdefault(int(links.point[i]), []).append(i)
        for i in unit:
            p = int(links.point[i])
            if p < 0:
                continue
            row = links.rows[i]

            def partner(j: int) -> bool:
                other = links.rows[j]
                return other["sha256"] != row["sha256"] and (not other_label or other["label"] != row["label"])

            best = next(((j, 0, 0) for j in at[p] if partner(j)), None)
            for d8, d16, q in [] if best else neighbours.get(p, ()):
                j = next((j for j in at.get(q, ()) if partner(j)), None)
                if j is not None:
                    best = (j, d8, d16)
                    break
            if best is not None:
                j, d8, d16 = best
                found.add((min(i, j), max(i, j), d8, d16))
    return sorted(found)


def _neighbours(links: Links, units: list[list[int]], closest_only: bool) -> dict[int, list[tuple[int, int, int]]]:
    """point -> its near-copy points as (distance8, distance16, point), closest first (only the
    closest with ``closest_only``), among the points of the images of ``units``."""
    import numpy as np

    wanted = np.zeros(links.points, bool)
    for unit in units:
        wanted[[int(links.point[i]) for i in unit if links.point[i] >= 0]] = True
    pairs = links.pairs
    keep = wanted[pairs.a] & wanted[pairs.b] if len(pairs.a) else np.zeros(0, bool)
    a, b, d8, d16 = (np.concatenate([x[keep], y[keep]]).astype(np.int64) for x, y in
                     ((pairs.a, pairs.b), (pairs.b, pairs.a), (pairs.d8, pairs.d8), (pairs.d16, pairs.d16)))
    order = np.lexsort((b, d16, d8, a))
    if closest_only:  # the first of each point's run
        order = order[np.flatnonzero(np.diff(a[order], prepend=-1))]
    out: dict[int, list[tuple[int, int, int]]] = {}
    for k in order.tolist():
        out.setdefault(int(a[k]), []).append((int(d8[k]), int(d16[k]), int(b[k])))
    return out


def pair_rows(links: Links, pairs: list[tuple[int, int, int, int]]) -> list[dict]:
    """Pairs as rows of conflicts.csv and near_copies.csv."""
    rows = links.rows
    return [{"path_a": rows[a]["path"], "label_a": rows[a]["label"], "path_b": rows[b]["path"],
             "label_b": rows[b]["label"], "distance8": d8, "distance16": d16} for a, b, d8, d16 in pairs]


def achieved(rows: list[dict], ratios: tuple[float, float, float]) -> tuple[dict[str, float], float]:
    """Each split's share of the images, and the largest distance of a class's share from its ratio."""
    total = len(rows) or 1
    shares = {s: sum(1 for r in rows if r["split"] == s) / total for s in SPLITS}
    worst = 0.0
    for counts in count_table(rows).values():
        n = sum(counts.values())
        worst = max([worst] + [abs(counts[s] / n - r) for s, r in zip(SPLITS, ratios)])
    return shares, worst


def confine_rows(wd: workdir.Workdir, rows: list[dict], source: Path) -> None:
    """Check the paths of a table's rows (labels.csv, resized.csv, splits.csv, encoded.csv): each
    image's path below RAW (by its text: no image is read from it after resize) and its resized
    file's name, where it has one, below ``resized/``; a one-line PrepError naming the line."""
    raw = workdir.Confined(None, "RAW")
    resized = workdir.Confined(wd.path(workdir.RESIZED_DIR), f"{workdir.RESIZED_DIR}/")
    for line, row in enumerate(rows, start=2):
        raw(row["path"], str(source), line)
        if row.get("resized"):
            resized(row["resized"], str(source), line)


def usable_rows(wd: workdir.Workdir, labels: Path) -> tuple[list[dict], int, list[Path]]:
    """labels.csv rows less the images resize rejected, each with its resized file name (and the
    sha256 resize recorded of it, for pack and verify to check the file by)."""
    rows = workdir.read_csv(labels, LABEL_COLUMNS)
    confine_rows(wd, rows, labels)
    inputs = [labels]
    resized_path = wd.path(workdir.RESIZED)
    if not resized_path.exists():
        log.warning("%s not found: run `prep resize` first to leave out unusable images", resized_path)
        for row in rows:
            row["resized"] = row["resized_sha256"] = ""
        return rows, 0, inputs
    inputs.append(resized_path)
    # path -> (sha256, status, resized, resized_sha256, phash8, phash16): a tuple per row, of the
    # columns used (the hashes are absent from a resized.csv an earlier prep wrote)
    raw = workdir.Confined(None, "RAW")
    names = workdir.Confined(wd.path(workdir.RESIZED_DIR), f"{workdir.RESIZED_DIR}/")
    resized = {}
    columns = ["path", "sha256", "status", "resized", "resized_sha256", "phash8", "phash16"]
    for line, (path, *done) in enumerate(workdir.iter_csv(resized_path, columns, required=columns[:4]), start=2):
        raw(path, str(resized_path), line)
        if done[2]:
            names(done[2], str(resized_path), line)
        resized[path] = tuple(done)
    usable = []
    for row in rows:
        done = resized.get(row["path"])
        if done is None or done[0] != row["sha256"]:
            raise PrepError(
                f"{resized_path} is out of date ({row['path']} not resized); run `prep resize` again"
            )
        if done[1] == "ok":  # each row is changed in place: one dict per image
            row.update(zip(("resized", "resized_sha256", "phash8", "phash16"), done[2:]))
            usable.append(row)
    return usable, len(rows) - len(usable), inputs


def _images(n: int, different: int) -> str:
    text = f"{n} image{'s' * (n != 1)}"
    # a group belongs to the class of its first image
    return text if different == n else f"{text}, {different} different (copies, near copies and groups count once)"


def count_table(rows: list[dict]) -> dict[str, dict[str, int]]:
    """class -> split -> images, classes in natural order."""
    table = {label: dict.fromkeys(SPLITS, 0) for label in sorted({r["label"] for r in rows}, key=NATURAL)}
    for r in rows:
        table[r["label"]][r["split"]] += 1
    return table


def run(cfg: SplitConfig) -> SplitResult:
    pattern = check_options(cfg)
    settings = settings_of(cfg.ratios, cfg.seed, cfg.drop_small, cfg.near_copies, cfg.on_conflict, cfg.group_by,
                           cfg.groups)
    stamp = workdir.Stamp(cfg.workdir, "split")
    extra = [cfg.groups] if cfg.groups else []
    inputs = [cfg.labels] + [p for p in [cfg.workdir.path(workdir.RESIZED)] if p.exists()] + extra
    if cfg.out.exists() and stamp.is_current(inputs, settings):
        recorded = stamp.summary()  # class -> split -> images, keys sorted by JSON
        try:
            table = {c: {s: int(recorded[c][s]) for s in SPLITS} for c in sorted(recorded, key=NATURAL)}
        except (TypeError, KeyError, ValueError):  # a stamp from before summaries were kept
            table = count_table(workdir.read_csv(cfg.out, SPLIT_COLUMNS))
        return SplitResult(cfg.out, table, up_to_date=True)
    import numpy as np  # here: an up-to-date split does without it

    groups = read_groups(cfg.groups) if cfg.groups else None
    rows, excluded, inputs = usable_rows(cfg.workdir, cfg.labels)
    inputs += extra
    if not rows:
        raise PrepError(f"no usable images in {cfg.labels}")
    # index order (class, then path): the output and the conflicts reported do not depend on
    # the order of the input rows. The CSV `prep index` wrote is in that order already.
    if not in_natural_order(cfg.workdir, cfg.labels):
        rows.sort(key=lambda r: (NATURAL(r["label"]), NATURAL(r["path"])))
    links = find_links(rows, cfg.near_copies, pattern, groups)
    alive = np.ones(len(rows), bool)
    units = group_units(links, alive)

    conflicts = closest_pairs(links, units, other_label=True)
    conflict_rows = pair_rows(links, conflicts)
    workdir.write_csv(cfg.workdir.path(CONFLICTS), PAIR_COLUMNS, conflict_rows)
    _warn_conflicts(conflict_rows, cfg.on_conflict)
    if conflicts and cfg.on_conflict == "error":
        first = conflict_rows[0]
        raise PrepError(
            f"--on-conflict error: {first['path_a']} ({first['label_a']}) and {first['path_b']} ({first['label_b']})"
            f" are the same picture under two labels (distance {first['distance8']}); {len(conflicts)} such"
            f" pair{'s' * (len(conflicts) != 1)} in {CONFLICTS}"
        )
    if conflicts and cfg.on_conflict == "drop":
        for a, b, *_ in conflicts:
            alive[a] = alive[b] = False
        units = group_units(links, alive)

    counts: dict[str, int] = defaultdict(int)
    for i in np.flatnonzero(alive).tolist():
        counts[rows[i]["label"]] += 1
    owned = units_by_class([rows[i] for u in units for i in u], keyed_units(links, units))[1]
    needed = sum(1 for r in cfg.ratios if r > 0)
    # images that share a split count once: a class needs as many different images (and groups)
    # of its own (not copies of another class's) as there are splits
    small = {label: n for label, n in counts.items() if len(owned.get(label, ())) < needed}
    if small and not cfg.drop_small:
        label = min(small, key=NATURAL)
        raise PrepError(
            f"class {label!r} has {_images(counts[label], len(owned.get(label, ())))}; the ratios need at least"
            f" {needed} different images per class (add images, or pass --drop-small to leave out the"
            f" {'small class' if len(small) == 1 else f'{len(small)} small classes'})"
        )
    for label in small:
        log.warning("dropping class %r: %s, fewer than the %d different images the splits need", label,
                    _images(counts[label], len(owned.get(label, ()))), needed)
    if small:
        alive &= np.array([r["label"] not in small for r in rows])
        units = group_units(links, alive)
    if not alive.any():
        raise PrepError(f"every class has fewer than the {needed} images the ratios need; nothing left to split")

    kept = [rows[i] for i in np.flatnonzero(alive).tolist()]
    splits = assign(kept, cfg.ratios, cfg.seed, keyed_units(links, units))
    for row in kept:
        row["split"], row["group"] = splits[row["path"]], ""
    for unit in units:
        if len(unit) > 1:  # named by its first image
            for i in unit:
                rows[i]["group"] = rows[unit[0]]["path"]
    near = pair_rows(links, closest_pairs(links, units, other_label=False))
    workdir.write_csv(cfg.out, SPLIT_COLUMNS, kept)
    workdir.write_csv(cfg.workdir.path(NEAR_COPIES), PAIR_COLUMNS, near)
    table = count_table(kept)
    notes = _group_notes(links, units, table, kept, cfg.ratios)
    # for manifest.json, the card and the report: the settings, the classes and pictures they
    # left out, and how the groups shaped the split
    dropped = {label: counts[label] for label in sorted(small, key=NATURAL)}
    shares, worst = achieved(kept, cfg.ratios)
    sizes = sorted((len(u) for u in units if len(u) > 1), reverse=True)
    workdir.write_json(cfg.workdir.path(workdir.SPLIT_SETTINGS), {
        **settings, "dropped_classes": dropped, "conflicts": len(conflicts),
        "dropped_conflicts": int(len(rows) - alive.sum()) - sum(dropped.values()) if cfg.on_conflict == "drop" else 0,
        "grouped": {"groups": len(sizes), "images": sum(sizes), "largest": sizes[0] if sizes else 0,
                    "near_copy_pairs": len(near)},
        "achieved": {s: round(shares[s], 4) for s in SPLITS}, "largest_class_deviation": round(worst, 4),
    })
    stamp.record(inputs, settings, [cfg.out, cfg.workdir.path(CONFLICTS), cfg.workdir.path(NEAR_COPIES)], summary=table)
    four = [(c["path_a"], c["label_a"], c["path_b"], c["label_b"]) for c in conflict_rows]
    return SplitResult(cfg.out, table, four, small, excluded, notes=notes)


def _warn_conflicts(pairs: list[dict], policy: str) -> None:
    outcome = {"keep": "kept in one split", "drop": "both left out", "error": "refused"}[policy]
    for c in pairs[:5]:
        log.warning("the same picture under two labels: %s (%s) and %s (%s), distance %s; %s", c["path_a"],
                    c["label_a"], c["path_b"], c["label_b"], c["distance8"], outcome)
    if len(pairs) > 5:
        log.warning("... %d pairs of images under two labels in all (see %s)", len(pairs), CONFLICTS)


def _group_notes(links: Links, units: list[list[int]], table: dict, kept: list[dict], ratios) -> list[str]:
    """Warnings about groups too large for their class, and how far the split is from the ratios."""
    grouped = [u for u in units if len(u) > 1]
    if not grouped:
        return []
    large = []
    for unit in grouped:
        first = links.rows[unit[0]]
        size = sum(table[first["label"]].values())
        if len(unit) > LARGE_GROUP * size:
            large.append((len(unit), first["path"], first["label"], size))
    large.sort(key=lambda g: (-g[0], NATURAL(g[1])))
    for n, path, label, size in large[:5]:
        log.warning("a group of %d images (%.0f%% of class %r), with %s, is kept in one split", n, 100 * n / size,
                    label, path)
    if len(large) > 5:
        log.warning("... %d groups over %.0f%% of their class in all", len(large), 100 * LARGE_GROUP)
    shares, worst = achieved(kept, ratios)
    biggest = max(grouped, key=len)
    return [
        f"Kept together: {sum(map(len, grouped))} images in {len(grouped)} group{'s' * (len(grouped) != 1)} of"
        f" copies, near copies or user groups (the largest: {len(biggest)} images, with"
        f" {links.rows[biggest[0]]['path']})",
        "Achieved " + ", ".join(f"{s} {shares[s]:.3f}" for s in SPLITS)
        + " (ratios " + ", ".join(f"{r:.3f}" for r in ratios) + f"); a class differs by at most {worst:.3f}",
    ]
