"""The ways to compare prep with, each written the way its users write it.

Run one per process (``python bench/baselines.py NAME CORPUS OUT``) so its start-up, imports
and peak memory are its own. Each prints one JSON line with the number of images it produced.

original   the workflow prep replaces: one process, ``Image.open(p).resize((32, 32))`` per
           file, stacked into numpy, pickled into a gzip file.
keras      ``keras.utils.image_dataset_from_directory(image_size=(32, 32))`` iterated into
           numpy, pickled into a gzip file.
decode     the hardware reference: decode every JPEG with draft mode (DCT-domain
           downscaling), one process per core, nothing written.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np

# Draft to twice the 32 px output, the margin Image.thumbnail keeps by default (reducing_gap=2)
# and prep keeps: decoding straight to 1/8 scale would be faster but visibly blurrier.
DRAFT_SIZE = (64, 64)


def list_images(root: Path) -> tuple[list[str], list[int]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    paths, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            paths.append(str(file))
            labels.append(label)
    return paths, labels


def original(root: Path, out: Path) -> int:
    from PIL import Image

    paths, labels = list_images(root)
    images = [np.array(Image.open(p).resize((32, 32))) for p in paths]
    x = np.stack(images)
    y = np.array(labels)
    with gzip.open(out, "wb") as f:
        pickle.dump((x, y), f)
    return len(x)


def keras(root: Path, out: Path) -> int:
    import keras

    ds = keras.utils.image_dataset_from_directory(root, image_size=(32, 32))
    xs, ys = [], []
    for x, y in ds:
        xs.append(x.numpy().astype("uint8"))
        ys.append(y.numpy())
    x, y = np.concatenate(xs), np.concatenate(ys)
    with gzip.open(out, "wb") as f:
        pickle.dump((x, y), f)
    return len(x)


def _decode(paths: list[str]) -> int:
    from PIL import Image

    for p in paths:
        with Image.open(p) as img:
            img.draft("RGB", DRAFT_SIZE)
            img.load()
    return len(paths)


def decode(root: Path, out: Path) -> int:
    from concurrent.futures import ProcessPoolExecutor

    paths, _ = list_images(root)
    workers = len(os.sched_getaffinity(0))
    size = max(1, min(256, len(paths) // (8 * workers)))
    shards = [paths[i : i + size] for i in range(0, len(paths), size)]
    with ProcessPoolExecutor(workers) as pool:
        return sum(pool.map(_decode, shards))


BASELINES = {"original": original, "keras": keras, "decode": decode}


def main() -> None:
    name, root, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    print(json.dumps({"images": BASELINES[name](root, out)}))


if __name__ == "__main__":
    main()
