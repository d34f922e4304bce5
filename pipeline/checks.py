"""Warnings about the data: the usual mistakes with a RAW folder, found where the facts are.

`prep index` knows the folders and the counts: RAW one level too high (its class folders hold
class-like folders of their own), a class with few images, classes out of balance. `prep resize`
knows the source sizes: sizes far from the rest, many images much smaller than ``--size``.
Each warning is one record, ``{"kind": ..., "message": <one line>, ...details}``, logged as one
WARNING line and kept in index.json's ``warnings`` (for the report); each stage replaces its
own kinds there.
"""

from __future__ import annotations

import heapq
import logging
from array import array
from collections import Counter, defaultdict
from itertools import pairwise
from typing import Iterable, Sequence

from . import workdir
from .errors import PrepError
from .manifest import class_weights

log = logging.getLogger(__name__)

INDEX_KINDS = ("raw_too_high", "small_class", "imbalance")
RESIZE_KINDS = ("size_outliers", "upscaled")
SMALL_CLASS = 10  # fewer images than this in a class: too few to learn or to test it
IMBALANCE = 3.0  # largest class / smallest class above this: worth balancing
OUTLIER = 4.0  # a longest side more than this times the median's, or less than its inverse
UPSCALED_SHARE = 0.25  # share of images under half of --size on both sides worth a warning
EXAMPLES = 5


def _listed(names: Iterable[str], more: int = 0) -> str:
    names = list(names)
    shown = ", ".join(names[:EXAMPLES])
    rest = len(names) - EXAMPLES + more
    return f"{shown}, ... ({rest} more)" if rest > 0 else shown


def folder_warnings(raw: str, paths: Iterable[str]) -> list[dict]:
    """RAW one level too high: most first-level folders ("classes") hold two or more sub-folders
    that hold images, and few images lie directly in them (as in a folder of datasets, each with
    its own class folders). ``paths``: the labelled images, relative to RAW."""
    nested: dict[str, set[str]] = defaultdict(set)
    direct = Counter()
    total = 0
    for rel in paths:
        parts = rel.split("/")
        if len(parts) < 2:
            continue
        total += 1
        if len(parts) == 2:
            direct[parts[0]] += 1
        else:
            nested[parts[0]].add(parts[1])
    classes = set(nested) | set(direct)
    deep = sorted((c for c in classes if len(nested[c]) >= 2), key=workdir.natural_key)
    if not classes or 2 * len(deep) <= len(classes) or sum(direct.values()) > 0.1 * total:
        return []
    first = deep[0]
    inner = sorted(nested[first], key=workdir.natural_key)
    return [{
        "kind": "raw_too_high",
        "message": f"RAW {raw} looks one level too high: its class folders ({_listed(deep)}) hold folders of"
                   f" their own ({first}/: {_listed(inner)}); if those are the classes, pass one of them as RAW"
                   f" (e.g. {raw.rstrip('/')}/{first})",
        "folders": {c: sorted(nested[c], key=workdir.natural_key) for c in deep},
    }]


def class_warnings(counts: dict[str, int]) -> list[dict]:
    """A class with fewer than :data:`SMALL_CLASS` images; the largest class more than
    :data:`IMBALANCE` times the smallest (with the class weights that would balance them)."""
    found = []
    small = {c: n for c, n in counts.items() if 0 < n < SMALL_CLASS}
    if small:
        shown = _listed(f"{c} ({n})" for c, n in small.items())
        found.append({
            "kind": "small_class",
            "message": f"{len(small)} class{'es have' if len(small) != 1 else ' has'} fewer than {SMALL_CLASS}"
                       f" images: {shown}; too few to learn or test a class",
            "classes": small,
            "threshold": SMALL_CLASS,
        })
    present = {c: n for c, n in counts.items() if n > 0}
    if len(present) >= 2:
        largest = max(present, key=present.__getitem__)
        smallest = min(present, key=present.__getitem__)
        ratio = present[largest] / present[smallest]
        if ratio > IMBALANCE:
            weights = class_weights(present)
            found.append({
                "kind": "imbalance",
                "message": f"classes are imbalanced {ratio:.1f}x (largest {largest}: {present[largest]},"
                           f" smallest {smallest}: {present[smallest]}); balanced class weights ({smallest}"
                           f" {weights[smallest]:.2f}, {largest} {weights[largest]:.2f}, ...) go into"
                           " manifest.json: prep verify-train --class-weight balanced uses them",
                "ratio": round(ratio, 3),
                "largest": largest,
                "smallest": smallest,
                "class_weights": weights,
            })
    return found


def size_warnings(rows: Iterable[dict], width: int, height: int) -> list[dict]:
    """Source sizes far from the rest (longest side over :data:`OUTLIER` times the median's, or
    under its inverse), and more than :data:`UPSCALED_SHARE` of the images under half of the
    target ``width`` x ``height`` on both sides. ``rows``: resized.csv's, with status ok.

    Memory: the sizes in arrays, a reference to each path (a string the caller holds), and
    counts; not a dict entry and a tuple per image (nor numpy: an up-to-date resize loads none)."""
    paths, widths, heights = _sizes(rows)
    if not paths:
        return []
    found = []
    longest = array("q", map(max, widths, heights)) if isinstance(widths, array) else list(map(max, widths, heights))
    median = _median(longest)
    large, n_large = _first(v > OUTLIER * median for v in longest)
    small, n_small = _first(v < median / OUTLIER for v in longest)
    del longest
    if n_large or n_small:
        parts = []
        for what, at, count in (("larger", large, n_large), ("smaller", small, n_small)):
            if count:
                parts.append(f"{count} {what} (e.g. {paths[at[0]]}, {widths[at[0]]}x{heights[at[0]]})")
        found.append({
            "kind": "size_outliers",
            "message": f"{n_large + n_small} image{'s are' if n_large + n_small != 1 else ' is'} far"
                       f" from the others' size (longest side: median {median:g} px; {' and '.join(parts)});"
                       " another kind of image, or one in the wrong folder?",
            "median_longest": median,
            "larger": [paths[i] for i in large],
            "smaller": [paths[i] for i in small],
            "count": n_large + n_small,
        })
    tiny, n_tiny = _first(2 * w < width and 2 * h < height for w, h in zip(widths, heights))
    if n_tiny > UPSCALED_SHARE * len(paths):
        w, h = widths[tiny[0]], heights[tiny[0]]
        found.append({
            "kind": "upscaled",
            "message": f"{n_tiny} of {len(paths)} images are under half of --size {width}x{height} on both"
                       f" sides (e.g. {paths[tiny[0]]}, {w}x{h}): enlarging adds no detail; a smaller --size may do",
            "count": n_tiny,
            "images": len(paths),
            "size": [width, height],
        })
    return found


def _sizes(rows: Iterable[dict]) -> tuple[list[str], Sequence[int], Sequence[int]]:
    """The paths, widths and heights of the rows with a size (the sizes in arrays, lists once
    one is beyond 64 bits); a path listed twice counts once, in its first place, with its last
    size, as a dict of path -> size keeps it."""
    paths: list[str] = []
    widths: Sequence[int] = array("q")
    heights: Sequence[int] = array("q")
    for row in rows:
        try:
            size = int(row["width"]), int(row["height"])
            path = row["path"]
        except (KeyError, TypeError, ValueError):  # a record without its size: not judged
            continue
        if isinstance(widths, array) and max(map(abs, size)) >= 1 << 63:
            widths, heights = list(widths), list(heights)
        widths.append(size[0])
        heights.append(size[1])
        paths.append(path)
    if _repeats(paths):
        kept = dict(zip(paths, zip(widths, heights)))
        paths, widths, heights = list(kept), [w for w, _ in kept.values()], [h for _, h in kept.values()]
    return paths, widths, heights


def _repeats(paths: list[str], piece: int = 1 << 12) -> bool:
    """Whether two paths share a hash (the same path twice, mostly), in a few bytes per path:
    their hashes sorted a piece at a time, then merged."""
    pieces = [array("q", sorted(map(hash, paths[start : start + piece]))) for start in range(0, len(paths), piece)]
    return any(a == b for a, b in pairwise(heapq.merge(*pieces)))


def _median(values: Sequence[int]) -> int | float:
    """statistics.median of numbers, by counting them (sizes repeat: few distinct ones)."""
    counts = Counter(values)
    middle = len(values) // 2
    wanted = [middle] if len(values) % 2 else [middle - 1, middle]  # ranks, in sorted order
    found, seen = [], 0
    for value in sorted(counts):
        seen += counts[value]
        while wanted and wanted[0] < seen:
            found.append(value)
            wanted.pop(0)
    return found[0] if len(values) % 2 else (found[0] + found[1]) / 2


def _first(flags: Iterable[bool], keep: int = 20) -> tuple[list[int], int]:
    """The positions of the first ``keep`` true flags, and how many are true."""
    first, count = [], 0
    for i, flag in enumerate(flags):
        if flag:
            count += 1
            if len(first) < keep:
                first.append(i)
    return first, count


def report(warnings: list[dict]) -> None:
    """Each warning as one WARNING line."""
    for warning in warnings:
        log.warning("%s", warning["message"])


def _index_json(wd: workdir.Workdir) -> dict | None:
    path = wd.path(workdir.INDEX_META)
    try:
        meta = workdir.read_json(path) if path.exists() else None
    except (PrepError, OSError):  # damaged: the next `prep index` writes it again
        return None
    return meta if isinstance(meta, dict) else None


def merged(wd: workdir.Workdir, kinds: tuple[str, ...], warnings: list[dict]) -> list[dict]:
    """index.json's warnings with ``warnings`` in place of those of ``kinds``."""
    recorded = (_index_json(wd) or {}).get("warnings")
    kept = [w for w in recorded if isinstance(w, dict) and w.get("kind") not in kinds] if isinstance(
        recorded, list) else []
    order = {kind: i for i, kind in enumerate(INDEX_KINDS + RESIZE_KINDS)}
    return sorted(kept + warnings, key=lambda w: order.get(w.get("kind"), len(order)))


def record(wd: workdir.Workdir, kinds: tuple[str, ...], warnings: list[dict]) -> None:
    """Keep ``warnings`` in index.json in place of those of ``kinds`` (nothing without index.json)."""
    meta = _index_json(wd)
    if meta is not None and meta.get("warnings") != (found := merged(wd, kinds, warnings)):
        workdir.write_json(wd.path(workdir.INDEX_META), {**meta, "warnings": found})
