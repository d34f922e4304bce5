"""Near copies: the perceptual hashes of one image, and the search for images whose hashes are close.

A near copy is the same picture saved again: re-encoded, resized, brightened, shifted by a few
pixels. Its perceptual hash (pHash: the signs of the low frequencies of the image's 2-D DCT
against their median) barely changes, while a different picture's differs in about half of its
bits. Two hashes of the upright image are kept, computed exactly as ``imagehash.phash`` does:
``phash8`` (64 bits from a 32x32 grey image) and ``phash16`` (256 bits from 64x64), as
``imagehash``'s hex strings.

The rule, judged on pairs of real images by eye: two images are near copies when their 64-bit
hashes differ in at most 4 bits (``strict``), or (``default``) also when they differ in 5 to 8
bits and their 256-bit hashes in at most 40. A distance of 8 alone matches unrelated images and
chains thousands into one group; dHash did worse.

The search (:func:`near_pairs`) never compares all pairs: a pair within distance ``r`` of the
64-bit hash has, in one of three 21-22-bit blocks, at most ``r // 3`` differing bits (the
pigeonhole principle), so each hash looks up only the block values that close to its own, in a
table indexed by block value (multi-index hashing).
"""

from __future__ import annotations

import os
import tempfile
from itertools import combinations
from typing import Callable, Iterable, Iterator

import numpy as np

HASH_SIZES = (8, 16)  # phash8: 8x8 of a 32x32 DCT; phash16: 16x16 of 64x64
STRICT = 4  # phash8 bits: near copies whatever phash16 says
LOOSE = 8  # phash8 bits: near copies only if phash16 agrees too
FINE = 40  # phash16 bits (of 256), for pairs between STRICT and LOOSE
RULES = ("off", "strict", "default")
_BLOCKS = ((0, 21), (21, 21), (42, 22))  # (first bit, bits) of the 64-bit hash, low bits first
_ALL_PAIRS = 4096  # hashes up to which comparing every pair is the quicker search
_ROWS = 256  # rows of that comparison at once: 256 x N distances in memory
_CHUNK = 1 << 14  # hashes probed, candidate pairs checked, edges joined at once: bounds each step's memory


def perceptual_hashes(img) -> tuple[str, str]:
    """(phash8, phash16) of a Pillow image as hex strings: ``str(imagehash.phash(img, n))``.

    ``img`` is the upright 8-bit image (RGB, or L: its grey values are the same). Pillow does the
    LANCZOS resizes, as for imagehash: their pass order and rounding change between Pillow
    versions (13 runs the vertical pass first for tall images), and a copy of them would drift."""
    from PIL import Image
    from scipy import fftpack  # imagehash's DCT, so ties break the same way (here: split needs no DCT)

    grey = img if img.mode == "L" else img.convert("L")
    out = []
    for n in HASH_SIZES:
        pixels = np.asarray(grey.resize((4 * n, 4 * n), Image.Resampling.LANCZOS))
        low = fftpack.dct(fftpack.dct(pixels, axis=0), axis=1)[:n, :n]
        out.append(np.packbits(low > np.median(low)).tobytes().hex())
    return out[0], out[1]


def parse_hashes(phash8: list[str], phash16: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The hex strings as arrays: (N,) uint64 and (N, 4) uint64; ValueError for a malformed one."""
    if any(len(h) != 16 for h in phash8) or any(len(h) != 64 for h in phash16):
        bad = next(h for h, n in [*((h, 16) for h in phash8), *((h, 64) for h in phash16)] if len(h) != n)
        raise ValueError(f"malformed perceptual hash {bad!r} (expected 16 or 64 hex digits)")
    h8 = np.frombuffer(bytes.fromhex("".join(phash8)), dtype=">u8").astype(np.uint64)
    h16 = np.frombuffer(bytes.fromhex("".join(phash16)), dtype=">u8").astype(np.uint64).reshape(-1, 4)
    return h8, h16


def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64, as uint8."""
    if hasattr(np, "bitwise_count"):  # numpy 2
        return np.bitwise_count(x)
    x = np.ascontiguousarray(x, dtype=np.uint64)
    return _BYTE_BITS[x.view(np.uint8).reshape(*x.shape, 8)].sum(axis=-1, dtype=np.uint8)


_BYTE_BITS = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def accepted(d8: np.ndarray, d16: np.ndarray, rule: str) -> np.ndarray:
    """Which pairs at these distances are near copies under ``rule``."""
    if rule == "strict":
        return d8 <= STRICT
    if rule == "default":
        return (d8 <= STRICT) | ((d8 <= LOOSE) & (d16 <= FINE))
    raise ValueError(f"unknown near-copy rule {rule!r} (expected one of {', '.join(RULES)})")


class Pairs:
    """Near-copy pairs ``a < b`` (indices into the hashes) and their distances, kept in a
    temporary file in ``folder`` and read back a chunk at a time: near copies of one picture
    pair up with one another, so a dataset of many has pairs by the ten million (11 bytes
    each), which no memory bound on the images allows for. The file is made at the first pair
    and goes when the pairs are closed; on Linux and macOS it has no name in the meantime, so it
    also goes with the process however it ends."""

    RECORD = np.dtype([("a", "<i4"), ("b", "<i4"), ("d8", "u1"), ("d16", "<u2")])  # packed: 11 bytes

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = folder
        self.count = 0
        self._file = None

    def __len__(self) -> int:
        return self.count

    def __enter__(self) -> "Pairs":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add(self, a: np.ndarray, b: np.ndarray, d8: np.ndarray, d16: np.ndarray) -> None:
        if not len(a):
            return
        records = np.empty(len(a), self.RECORD)
        records["a"], records["b"], records["d8"], records["d16"] = a, b, d8, d16
        try:
            if self._file is None:
                self._file = tempfile.TemporaryFile(dir=self.folder, buffering=1 << 20)
            self._file.seek(0, os.SEEK_END)  # after any reading
            self._file.write(records.tobytes())
        except OSError as err:  # a full disk names no file: say which
            raise OSError(err.errno, f"{err.strerror} (the temporary file of near-copy pairs)",
                          os.fspath(self.folder or tempfile.gettempdir())) from None
        self.count += len(records)

    def chunks(self, size: int = _CHUNK) -> Iterator[np.ndarray]:
        """The pairs in the order added (those added by then), as record arrays (fields a, b,
        d8, d16) of ``size`` or fewer."""
        count, at = self.count, 0
        if count:
            self._file.flush()
        while at < count:
            records = np.empty(min(size, count - at), self.RECORD)
            self._file.seek(at * self.RECORD.itemsize)
            if self._file.readinto(memoryview(records).cast("B")) != records.nbytes:
                raise OSError(f"the temporary file of near-copy pairs was cut short at pair {at}")
            yield records
            at += len(records)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def near_pairs(h8: np.ndarray, h16: np.ndarray, rule: str = "default", folder: str | os.PathLike | None = None) -> Pairs:
    """Every pair of hashes that are near copies under ``rule``, each once, in no set order,
    kept in a temporary file in ``folder`` (the system's temporary folder if None).

    Identical hashes are pairs too (distance 0). Memory and time grow with the number of
    hashes plus the number of candidate pairs, not with its square; only hashes that cluster
    (many near copies of one picture) make the pairs themselves many, and they are on disk."""
    radius = STRICT if rule == "strict" else LOOSE
    accepted(np.zeros(0), np.zeros(0), rule)  # the rule's name is checked
    n = len(h8)
    found = Pairs(folder)
    if n < 2:
        return found
    h8 = np.asarray(h8, dtype=np.uint64)  # a column of the caller's array will do: no copy
    if n <= _ALL_PAIRS:
        _all_pairs(h8, h16, rule, radius, found)
        return found
    per_block = radius // len(_BLOCKS)
    masks = [np.uint64((1 << bits) - 1) for _, bits in _BLOCKS]
    for k, (first, bits) in enumerate(_BLOCKS):
        key = ((h8 >> np.uint64(first)) & masks[k]).astype(np.int32)
        order = np.argsort(key, kind="stable").astype(np.int32)
        # the hashes of block value v are order[starts[v] : starts[v] + counts[v]]: two int32 tables
        counts = np.zeros(1 << bits, np.int32)
        ordered = key[order]
        runs = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        counts[ordered[runs]] = np.diff(np.r_[runs, n])
        del ordered, runs
        starts = np.cumsum(counts, dtype=np.int32)
        starts -= counts
        for flips in range(per_block + 1):
            for bitset in combinations(range(bits), flips):
                flip = np.int32(sum(1 << b for b in bitset))
                for begin in range(0, n, _CHUNK):  # a part of the hashes at once: bounds memory
                    probe = key[begin : begin + _CHUNK] ^ flip
                    count = counts[probe]
                    who = np.flatnonzero(count)
                    for part in _chunks(who, count[who]) if len(who) else ():
                        a, b = _expand(part + begin, starts[probe[part]], count[part], order)
                        keep = a < b
                        a, b = a[keep], b[keep]
                        apart = h8[a] ^ h8[b]
                        # a pair close in an earlier block was found there
                        for j in range(k):
                            later = popcount((apart >> np.uint64(_BLOCKS[j][0])) & masks[j]) > per_block
                            a, b, apart = a[later], b[later], apart[later]
                        d8 = popcount(apart)
                        close = d8 <= radius
                        a, b, d8 = a[close], b[close], d8[close]
                        d16 = popcount(h16[a] ^ h16[b]).sum(axis=1)
                        ok = accepted(d8, d16, rule)
                        if ok.any():
                            found.add(a[ok], b[ok], d8[ok], d16[ok])
        del order, counts, starts  # before the next block's
    return found


def _all_pairs(h8: np.ndarray, h16: np.ndarray, rule: str, radius: int, found: Pairs) -> None:
    """:func:`near_pairs` by comparing every pair, a block of rows at a time: for a few thousand
    hashes, quicker than the tables' fixed cost (a few hundred probes of every block)."""
    n = len(h8)
    for start in range(0, n, _ROWS):
        rows = np.arange(start, min(n, start + _ROWS))
        d8 = popcount(h8[rows, None] ^ h8[None, :])
        a, b = np.nonzero((d8 <= radius) & (rows[:, None] < np.arange(n)[None, :]))
        d8, a = d8[a, b], rows[a]
        d16 = popcount(h16[a] ^ h16[b]).sum(axis=1)
        ok = accepted(d8, d16, rule)
        found.add(a[ok], b[ok], d8[ok], d16[ok])


def _chunks(who: np.ndarray, count: np.ndarray):
    """``who`` in runs whose candidates add up to about :data:`_CHUNK`."""
    if count.sum() <= _CHUNK:
        yield who
        return
    ends = np.searchsorted(np.cumsum(count), np.arange(_CHUNK, count.sum() + _CHUNK, _CHUNK), side="right")
    start = 0
    for end in ends:
        end = max(end, start + 1)
        if start < len(who):
            yield who[start:end]
        start = end


def _expand(who: np.ndarray, lo: np.ndarray, count: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each of ``who`` paired with every entry of its table range ``lo .. lo + count`` (int32:
    a chunk holds fewer than 2**31 candidates, a table fewer entries)."""
    total = int(count.sum())
    a = np.repeat(who.astype(np.int32), count)
    at = np.repeat(lo - (np.cumsum(count, dtype=np.int32) - count), count)
    at += np.arange(total, dtype=np.int32)
    return a, order[at]


def components(n: int, edges: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]) -> np.ndarray:
    """The connected component of each of ``n`` nodes joined by edges ``x[k] - y[k]`` for each
    ``(x, y)`` that ``edges()`` gives (asked again each round: the edges may be read from a
    file): labels numbered by their smallest node, in node order (so the same edges give the
    same labels, whatever their order).

    Minimum-label propagation with pointer jumping, in numpy: each round gives both ends of every
    edge the smaller of their labels, then lets every node take its label's label, until nothing
    changes (a few rounds on real groups). scipy's connected_components costs 0.4 s to import,
    more than the whole search on a dataset of thousands. Labels are int32 below 2**31 nodes,
    and edges are taken :data:`_CHUNK` at a time: memory is a few bytes per node."""
    dtype = np.int32 if n < 2**31 else np.int64
    labels = np.arange(n, dtype=dtype)
    while True:
        before = labels.copy()
        for x, y in edges():
            for start in range(0, len(x), _CHUNK):
                x_part = np.asarray(x[start : start + _CHUNK], dtype)
                y_part = np.asarray(y[start : start + _CHUNK], dtype)
                low = np.minimum(labels[x_part], labels[y_part])
                np.minimum.at(labels, x_part, low)
                np.minimum.at(labels, y_part, low)
        while True:  # pointer jumping: a label's own label, until each points at a root
            jumped = labels[labels]
            if np.array_equal(jumped, labels):
                break
            labels = jumped
        if np.array_equal(labels, before):
            break
    return labels
