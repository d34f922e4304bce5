"""The near-copy search at scale, on synthetic perceptual hashes (`run.py --near-copies` runs it).

``python bench/nearcopies.py search N KIND`` times :func:`pipeline.nearcopy.near_pairs` and the
grouping (connected components) on N hashes and prints one JSON line. KIND is ``random`` (64 and
256 independent random bits: almost no pair is close, the best case) or ``clusterV`` (N / V
random pictures with V near copies each, every copy 0-4 bits from its picture's 64-bit hash and
0-20 from its 256-bit one, so every pair in a cluster is a near copy: V^2 / 2 pairs per picture,
the worst case real folders approach with bursts and scan slices).

``python bench/nearcopies.py workdir N KIND DIR`` writes a work directory of N images in 10
classes (labels.csv and resized.csv with those hashes, no image files) for timing `prep split`.

``python bench/nearcopies.py cost DIR`` decodes the JPEGs under DIR with and without the
perceptual hashes and prints the added microseconds per image.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np


def hashes(n: int, kind: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.integers(0, 2**64, n, dtype=np.uint64), rng.integers(0, 2**64, (n, 4), dtype=np.uint64)
    per = int(kind.removeprefix("cluster"))
    bases = -(-n // per)
    h8 = np.repeat(rng.integers(0, 2**64, bases, dtype=np.uint64), per)[:n]
    h16 = np.repeat(rng.integers(0, 2**64, (bases, 4), dtype=np.uint64), per, axis=0)[:n]
    return h8 ^ flips(rng, n, 64, 4).reshape(n), h16 ^ flips(rng, n, 256, 20).reshape(n, 4)


def flips(rng, n: int, bits: int, most: int) -> np.ndarray:
    """n masks of ``bits`` bits (as uint64 words), each with 0..most bits set."""
    out = np.zeros((n, bits // 64), np.uint64)
    count = rng.integers(0, most + 1, n)
    for k in range(most):
        who = np.flatnonzero(count > k)
        where = rng.integers(0, bits, len(who))
        out[who, where // 64] |= np.uint64(1) << (where % 64).astype(np.uint64)
    return out


def search(n: int, kind: str, rule: str = "default") -> dict:
    from pipeline import nearcopy

    h8, h16 = hashes(n, kind)
    started = time.perf_counter()
    pairs = nearcopy.near_pairs(h8, h16, rule)
    searched = time.perf_counter() - started
    groups = nearcopy.components(n, lambda: ((pair["a"], pair["b"]) for pair in pairs.chunks()))
    sizes = np.bincount(groups)
    return {"hashes": n, "kind": kind, "rule": rule, "pairs": len(pairs), "search_s": round(searched, 3),
            "total_s": round(time.perf_counter() - started, 3), "groups": int((sizes > 1).sum()),
            "largest": int(sizes.max())}


def cost(folder: Path, limit: int = 2000) -> dict:
    from pipeline import imaging
    from pipeline.spec import ResizeSpec

    files = sorted(folder.rglob("*.jpg"))[:limit]
    data = [f.read_bytes() for f in files]
    spec = ResizeSpec()
    real = imaging.perceptual_hashes
    times = {"without": float("inf"), "with": float("inf")}
    for _ in range(5):  # alternating, each keeps its fastest round: the machine's speed moves
        for name, fn in (("without", lambda img: ("", "")), ("with", real)):
            imaging.perceptual_hashes = fn
            started = time.perf_counter()
            for blob in data:
                imaging.transform(blob, spec)
            times[name] = min(times[name], time.perf_counter() - started)
    imaging.perceptual_hashes = real
    per = {k: v / len(data) * 1e6 for k, v in times.items()}
    return {"images": len(data), "transform_us": round(per["without"]), "with_hashes_us": round(per["with"]),
            "added_us": round(per["with"] - per["without"])}


def workdir(n: int, kind: str, folder: Path) -> None:
    from pipeline import workdir as files
    from pipeline.stages.index import LABEL_COLUMNS
    from pipeline.stages.resize import RESIZED_COLUMNS

    h8, h16 = hashes(n, kind)
    rng = np.random.default_rng(1)
    per = int(kind.removeprefix("cluster")) if kind != "random" else 1
    labels = (np.arange(n) // per) % 10  # a picture's copies in its class,
    moved = rng.random(n) < 0.001  # but for one in a thousand filed under another: conflicts
    labels[moved] = rng.integers(0, 10, int(moved.sum()))
    rows = []
    for i in range(n):
        path = f"c{labels[i]}/img{i}.jpg"
        rows.append({"path": path, "label": f"c{labels[i]}", "sha256": f"{i:064x}", "bytes": 1, "resized": path,
                     "status": "ok", "phash8": f"{int(h8[i]):016x}", "phash16": h16[i].astype(">u8").tobytes().hex()})
    rows.sort(key=lambda r: (files.natural_key(r["label"]), files.natural_key(r["path"])))
    folder.mkdir(parents=True, exist_ok=True)
    files.write_csv(folder / files.LABELS, LABEL_COLUMNS, rows)
    files.write_csv(folder / files.RESIZED, RESIZED_COLUMNS, rows)


if __name__ == "__main__":
    if sys.argv[1] == "search":
        print(json.dumps(search(int(sys.argv[2]), sys.argv[3], *sys.argv[4:])))
    elif sys.argv[1] == "workdir":
        workdir(int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
    else:
        print(json.dumps(cost(Path(sys.argv[2]))))
