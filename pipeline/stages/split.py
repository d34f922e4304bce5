"""`prep split`: assign every usable image to train / valid / test, stratified and leak-free.

* Stratified per class; per-class counts by largest-remainder rounding, and every class with
  at least as many different images as there are non-zero splits gets one in each of them.
* Exact duplicates (same sha256) are one unit and always land in the same split; the same
  content under two labels is a conflict, reported with both files.
* Within a class, larger units are placed first, then units in a seeded hash order of their
  content, so the result does not depend on the order of the input rows.
* Images that `prep resize` rejected are left out (when resized.csv is present).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import defaultdict
from fractions import Fraction
from dataclasses import dataclass, field
from pathlib import Path

from .. import workdir
from ..errors import PrepError
from .index import LABEL_COLUMNS, in_natural_order

SPLITS = workdir.SPLIT_NAMES

log = logging.getLogger(__name__)

SPLIT_COLUMNS = ["path", "label", "sha256", "resized", "split"]
NATURAL = workdir.natural_key


@dataclass
class SplitConfig:
    workdir: workdir.Workdir
    labels: Path
    out: Path
    ratios: tuple[float, float, float] = (0.7, 0.2, 0.1)
    seed: int = 42
    drop_small: bool = False


@dataclass
class SplitResult:
    out: Path
    table: dict[str, dict[str, int]]  # class -> split -> count
    conflicts: list[tuple[str, str, str, str]] = field(default_factory=list)  # (path, label, path, label)
    dropped_classes: dict[str, int] = field(default_factory=dict)
    excluded: int = 0
    up_to_date: bool = False

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


def units_by_class(rows: list[dict]) -> tuple[dict[str, list[dict]], dict[str, list[str]]]:
    """sha256 -> the rows of that content (a unit: identical files share a split), and
    class -> the units it owns: a unit belongs to the class of its first file in index order."""
    units: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        units[row["sha256"]].append(row)
    by_class: dict[str, list[str]] = defaultdict(list)
    for sha, members in units.items():
        first = members[0] if len(members) == 1 else min(members, key=lambda r: (NATURAL(r["label"]), NATURAL(r["path"])))
        by_class[first["label"]].append(sha)
    return units, by_class


def assign(rows: list[dict], ratios: tuple[float, float, float], seed: int) -> dict[str, str]:
    """path -> split. Pure: the same rows (in any order), ratios and seed give the same result."""
    units, by_class = units_by_class(rows)
    result: dict[str, str] = {}
    for label, shas in by_class.items():
        # groups of duplicates first, largest first, so that single images even out the counts;
        # within a size, a seeded order of the content
        shas.sort(key=lambda s: (-len(units[s]), _unit_key(seed, s)))
        size = sum(len(units[s]) for s in shas)
        target = allocate(size, ratios)
        filled = [0, 0, 0]
        for left, sha in zip(range(len(shas), 0, -1), shas):
            # the split furthest below its target takes the unit (ties: train, valid, test);
            # but when no more units are left than splits still empty, one of those
            empty = [k for k in range(3) if target[k] and not filled[k]]
            choices = empty if len(empty) >= left else range(3)
            i = max(choices, key=lambda k: (target[k] - filled[k], -k))
            filled[i] += len(units[sha])
            for member in units[sha]:
                result[member["path"]] = SPLITS[i]
    return result


def find_conflicts(rows: list[dict]) -> list[tuple[str, str, str, str]]:
    """Pairs of files with the same content and different labels."""
    first: dict[str, dict] = {}
    conflicts = []
    for row in rows:
        seen = first.setdefault(row["sha256"], row)
        if seen["label"] != row["label"]:
            conflicts.append((seen["path"], seen["label"], row["path"], row["label"]))
    return conflicts


def usable_rows(wd: workdir.Workdir, labels: Path) -> tuple[list[dict], int, list[Path]]:
    """labels.csv rows less the images resize rejected, each with its resized file name."""
    rows = workdir.read_csv(labels, LABEL_COLUMNS)
    inputs = [labels]
    resized_path = wd.path(workdir.RESIZED)
    if not resized_path.exists():
        log.warning("%s not found: run `prep resize` first to leave out unusable images", resized_path)
        for row in rows:
            row["resized"] = ""
        return rows, 0, inputs
    inputs.append(resized_path)
    resized = {r["path"]: r for r in workdir.read_csv(resized_path, ["path", "sha256", "resized", "status"])}
    usable = []
    for row in rows:
        done = resized.get(row["path"])
        if done is None or done["sha256"] != row["sha256"]:
            raise PrepError(
                f"{resized_path} is out of date ({row['path']} not resized); run `prep resize` again"
            )
        if done["status"] == "ok":
            row["resized"] = done["resized"]  # each row is changed in place: one dict per image
            usable.append(row)
    return usable, len(rows) - len(usable), inputs


def _images(n: int, different: int) -> str:
    text = f"{n} image{'s' * (n != 1)}"
    return text if different == n else f"{text}, {different} different"


def count_table(rows: list[dict]) -> dict[str, dict[str, int]]:
    """class -> split -> images, classes in natural order."""
    table = {label: dict.fromkeys(SPLITS, 0) for label in sorted({r["label"] for r in rows}, key=NATURAL)}
    for r in rows:
        table[r["label"]][r["split"]] += 1
    return table


def run(cfg: SplitConfig) -> SplitResult:
    settings = {"ratios": list(cfg.ratios), "seed": cfg.seed, "drop_small": cfg.drop_small}
    stamp = workdir.Stamp(cfg.workdir, "split")
    inputs = [cfg.labels] + [p for p in [cfg.workdir.path(workdir.RESIZED)] if p.exists()]
    if cfg.out.exists() and stamp.is_current(inputs, settings):
        recorded = stamp.summary()  # class -> split -> images, keys sorted by JSON
        try:
            table = {c: {s: int(recorded[c][s]) for s in SPLITS} for c in sorted(recorded, key=NATURAL)}
        except (TypeError, KeyError, ValueError):  # a stamp from before summaries were kept
            table = count_table(workdir.read_csv(cfg.out, SPLIT_COLUMNS))
        return SplitResult(cfg.out, table, up_to_date=True)
    rows, excluded, inputs = usable_rows(cfg.workdir, cfg.labels)
    if not rows:
        raise PrepError(f"no usable images in {cfg.labels}")
    counts: dict[str, int] = defaultdict(int)
    for row in rows:
        counts[row["label"]] += 1
    owned = units_by_class(rows)[1]
    needed = sum(1 for r in cfg.ratios if r > 0)
    # identical files share a split: a class needs as many different images of its own (not
    # copies of another class's) as there are splits
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
    rows = [r for r in rows if r["label"] not in small]
    if not rows:
        raise PrepError(f"every class has fewer than the {needed} images the ratios need; nothing left to split")
    # index order (class, then path): the output and the conflicts reported do not depend on
    # the order of the input rows. The CSV `prep index` wrote is in that order already.
    if not in_natural_order(cfg.workdir, cfg.labels):
        rows.sort(key=lambda r: (NATURAL(r["label"]), NATURAL(r["path"])))

    conflicts = find_conflicts(rows)
    for a, la, b, lb in conflicts:
        log.warning("same content under two labels: %s (%s) and %s (%s); kept in one split", a, la, b, lb)
    splits = assign(rows, cfg.ratios, cfg.seed)
    for row in rows:
        row["split"] = splits[row["path"]]
    workdir.write_csv(cfg.out, SPLIT_COLUMNS, rows)
    # for manifest.json, the card and the report: the settings and the classes they left out
    dropped = {label: counts[label] for label in sorted(small, key=NATURAL)}
    workdir.write_json(cfg.workdir.path(workdir.SPLIT_SETTINGS), {**settings, "dropped_classes": dropped})
    table = count_table(rows)
    stamp.record(inputs, settings, [cfg.out], summary=table)
    return SplitResult(cfg.out, table, conflicts, small, excluded)
