"""The benchmark corpora: generated on demand, deterministic, reused when already built.

``photos``: random crops of the two real photographs scikit-learn ships
(``sklearn.datasets.load_sample_images``), rescaled to 300-640 px on the long side,
colour-jittered and saved as JPEG quality 90, in ``CLASSES`` class folders. Each image is
drawn from its own seeded generator, so the same parameters give the same bytes whatever the
number of worker processes.

``small``: 32x32 PNG images (smooth colour fields with a little noise, all distinct) for the
packing benchmark of ``--large``.

A corpus is built under a temporary name and renamed into place with a ``corpus.json``
describing it, so an interrupted build is never mistaken for a finished one.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
CORPUS_ROOT = HERE / "corpus"
CLASSES = 10
VERSION = 1  # bump when the generator changes, so old corpora are rebuilt

_photos: list[np.ndarray] = []


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


def class_name(c: int) -> str:
    return f"class_{c:02d}"


# -- photos ---------------------------------------------------------------------------------


def _load_photos() -> None:
    from sklearn.datasets import load_sample_images

    _photos[:] = load_sample_images().images


def photo(seed: int, c: int, i: int) -> bytes:
    """JPEG bytes of image ``i`` of class ``c``: a jittered, rescaled crop of a real photo."""
    rng = np.random.default_rng([seed, c, i])
    src = _photos[int(rng.integers(len(_photos)))]
    sh, sw = src.shape[:2]
    # a crop of 25-100% of the photo's area at an aspect ratio between 3:4 and 4:3 (or 4:3 and 3:4)
    area = rng.uniform(0.25, 1.0) * sh * sw
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw = int(min(sw, max(16, round(np.sqrt(area * aspect)))))
    ch = int(min(sh, max(16, round(np.sqrt(area / aspect)))))
    top = int(rng.integers(0, sh - ch + 1))
    left = int(rng.integers(0, sw - cw + 1))
    crop = src[top : top + ch, left : left + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]

    long_side = int(rng.integers(300, 641))
    scale = long_side / max(cw, ch)
    size = (max(1, round(cw * scale)), max(1, round(ch * scale)))
    img = Image.fromarray(np.ascontiguousarray(crop)).resize(size, Image.Resampling.BILINEAR)

    # colour jitter: brightness, contrast, saturation, and a per-channel tint that depends on the class
    arr = np.asarray(img, dtype=np.float32)
    gray = arr @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    saturation = rng.uniform(0.6, 1.4)
    arr = gray[..., None] + saturation * (arr - gray[..., None])
    contrast = rng.uniform(0.7, 1.3)
    arr = (arr - gray.mean()) * contrast + gray.mean()
    tint = 1.0 + 0.15 * np.cos(2 * np.pi * (c / CLASSES + np.arange(3) / 3))
    arr = arr * (rng.uniform(0.75, 1.25) * tint * rng.uniform(0.95, 1.05, size=3)).astype(np.float32)
    out = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")

    buffer = io.BytesIO()
    out.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _write_photos(job: tuple[str, int, int, list[int]]) -> int:
    folder, seed, c, indices = job
    for i in indices:
        Path(folder, class_name(c), f"img_{i:05d}.jpg").write_bytes(photo(seed, c, i))
    return len(indices)


# -- small PNGs -----------------------------------------------------------------------------


def small_png(seed: int, c: int, i: int) -> np.ndarray:
    """A distinct 32x32 RGB image: a smooth colour field plus noise."""
    rng = np.random.default_rng([seed, c, i])
    y, x = np.mgrid[0:32, 0:32].astype(np.float32) / 31
    base = rng.uniform(0, 255, size=(3, 3)).astype(np.float32)
    field = base[:, 0, None, None] + base[:, 1, None, None] * x + base[:, 2, None, None] * y - 127
    arr = field.transpose(1, 2, 0) + rng.normal(0, 12, size=(32, 32, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def _write_small(job: tuple[str, int, int, list[int]]) -> int:
    folder, seed, c, indices = job
    for i in indices:
        Image.fromarray(small_png(seed, c, i), "RGB").save(
            Path(folder, class_name(c), f"img_{i:06d}.png"), compress_level=1
        )
    return len(indices)


# -- building -------------------------------------------------------------------------------

KINDS = {"photos": (_write_photos, _load_photos), "small": (_write_small, None)}


def ensure(kind: str, per_class: int, seed: int = 0, *, workers: int | None = None, log=print) -> Path:
    """The folder of the ``kind`` corpus with these parameters, built first if missing."""
    params = {"kind": kind, "classes": CLASSES, "per_class": per_class, "seed": seed, "version": VERSION}
    folder = CORPUS_ROOT / f"{kind}-{CLASSES}x{per_class}-seed{seed}"
    meta = folder / "corpus.json"
    if meta.exists() and json.loads(meta.read_text()) == params:
        return folder
    write, init = KINDS[kind]
    workers = workers or cpu_count()
    tmp = CORPUS_ROOT / f".{folder.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for c in range(CLASSES):
        (tmp / class_name(c)).mkdir(parents=True)
    step = max(1, min(200, per_class // (2 * workers) or 1))
    jobs = [
        (str(tmp), seed, c, list(range(start, min(per_class, start + step))))
        for c in range(CLASSES)
        for start in range(0, per_class, step)
    ]
    total = CLASSES * per_class
    log(f"building the {kind} corpus ({total:,} images, {workers} processes) in {folder}")
    done = 0
    with ProcessPoolExecutor(workers, initializer=init) as pool:
        for n in pool.map(_write, [(write, job) for job in jobs]):
            done += n
            if sys.stderr.isatty():
                print(f"\r  {done:,}/{total:,}", end="", file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    (tmp / "corpus.json").write_text(json.dumps(params))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def _write(item):
    write, job = item
    return write(job)


def images(folder: Path) -> list[Path]:
    """The image files of a corpus, in class then file order."""
    return sorted(p for p in folder.glob("class_*/*") if p.is_file())


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Build (or find) a benchmark corpus and print its folder.")
    parser.add_argument("--kind", choices=sorted(KINDS), default="photos")
    parser.add_argument("--per-class", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(ensure(args.kind, args.per_class, args.seed, log=lambda m: print(m, file=sys.stderr)))
