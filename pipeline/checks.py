"""Warnings about the data: the usual mistakes with a RAW folder, found where the facts are.

`prep index` knows the folders and the counts: RAW one level too high (its class folders hold
class-like folders of their own), a class with few images, classes out of balance. `prep resize`
knows the source sizes: sizes far from the rest, many images much smaller than ``--size``.
Each warning is one record, ``{"kind": ..., "message": <one line>, ...details}``, logged as one
WARNING line and kept in index.json's ``warnings`` (for the report); each stage replaces its
own kinds there.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from typing import Callable, Iterable, Sequence

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
                           f" {weights[smallest]:.2f}, {largest} {weights[largest]:.2f}, ...; of the classes"
                           " split keeps) go into manifest.json: prep verify-train --class-weight balanced uses them",
                "ratio": round(ratio, 3),
                "largest": largest,
                "smallest": smallest,
                "class_weights": weights,
            })
    return found


def size_warnings(sizes: Sequence[int], width: int, height: int, paths: Callable[[list[int]], list[str]]
                  ) -> list[dict]:
    """Source sizes far from the rest (longest side over :data:`OUTLIER` times the median's, or
    under its inverse), and more than :data:`UPSCALED_SHARE` of the images under half of the
    target ``width`` x ``height`` on both sides; held without an object per image (nor numpy:
    an up-to-date resize loads none). ``sizes``:
    the width and height of each row of resized.csv with status ok and a size, in order, one
    after the other (an ``array("q")``, say); ``paths(ks)``: the paths of the k-th of those
    rows, for each k of ``ks`` (only those the warnings name are asked for)."""
    images = len(sizes) // 2
    if not images:
        return []
    longest: Counter = Counter()  # longest side -> images: a few hundred sizes, not an entry per image
    tiny = 0
    pairs = iter(sizes)
    for w, h in zip(pairs, pairs):
        longest[w if w > h else h] += 1
        tiny += 2 * w < width and 2 * h < height
    median = _median(longest, images)
    large = sum(n for side, n in longest.items() if side > OUTLIER * median)
    small = sum(n for side, n in longest.items() if side < median / OUTLIER)
    upscaled = tiny > UPSCALED_SHARE * images
    # the first images of each kind, for the examples: found by reading the sizes again
    found_large, found_small, found_tiny = [], [], []
    pairs = iter(sizes)
    for k, (w, h) in enumerate(zip(pairs, pairs)):
        if len(found_large) == min(large, 20) and len(found_small) == min(small, 20) and len(found_tiny) == upscaled:
            break
        side = w if w > h else h
        if side > OUTLIER * median and len(found_large) < 20:
            found_large.append(k)
        if side < median / OUTLIER and len(found_small) < 20:  # both, for a median below zero
            found_small.append(k)
        if upscaled and not found_tiny and 2 * w < width and 2 * h < height:
            found_tiny.append(k)
    named = dict(zip(found_large + found_small + found_tiny, paths(found_large + found_small + found_tiny)))

    def example(k: int) -> str:
        return f"{named[k]}, {sizes[2 * k]}x{sizes[2 * k + 1]}"

    found = []
    if large or small:
        parts = [f"{count} {what} (e.g. {example(ks[0])})"
                 for what, count, ks in (("larger", large, found_large), ("smaller", small, found_small)) if count]
        found.append({
            "kind": "size_outliers",
            "message": f"{large + small} image{'s are' if large + small != 1 else ' is'} far"
                       f" from the others' size (longest side: median {median:g} px; {' and '.join(parts)});"
                       " another kind of image, or one in the wrong folder?",
            "median_longest": median,
            "larger": [named[k] for k in found_large],
            "smaller": [named[k] for k in found_small],
            "count": large + small,
        })
    if upscaled:
        found.append({
            "kind": "upscaled",
            "message": f"{tiny} of {images} images are under half of --size {width}x{height} on both"
                       f" sides (e.g. {example(found_tiny[0])}): enlarging adds no detail; a smaller --size may do",
            "count": tiny,
            "images": images,
            "size": [width, height],
        })
    return found


def _median(counts: Counter, n: int):
    """statistics.median of ``n`` numbers given as value -> how many times: the middle one, or
    the mean of the middle two."""
    wanted = [n // 2] if n % 2 else [n // 2 - 1, n // 2]
    found, seen = [], 0
    for value in sorted(counts):
        seen += counts[value]
        while wanted and wanted[0] < seen:
            found.append(value)
            wanted.pop(0)
        if not wanted:
            break
    return found[0] if n % 2 else (found[0] + found[1]) / 2


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
