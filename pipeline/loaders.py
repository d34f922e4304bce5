"""The public load API: a packaged dataset back as numpy arrays or as a tf.data pipeline.

::

    import pipeline
    (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = pipeline.load("processed")
    train = pipeline.load_tf("processed/tfrecord", "train").shuffle(1024).batch(32)
    names = pipeline.load_classes("processed")

``path`` is a packaged file (``dataset.pkl.gz``, ``dataset.h5``), a ``tfrecord/`` folder, or a
work directory: there :func:`load` takes the first of pkl.gz, h5, tfrecord and :func:`load_tf`
the first of tfrecord, h5, pkl.gz that manifest.json lists (that is present, without a manifest).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from . import workdir
from .errors import PrepError
from .formats import FORMATS, SPLITS, tfrecord

Arrays = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def resolve(path: str | os.PathLike, prefer: tuple[str, ...] = tuple(FORMATS)) -> tuple[str, Path]:
    """(format name, path to hand its module) for a file, tfrecord folder or work directory.

    In a work directory the first format of ``prefer`` that its manifest lists (or, without a
    manifest, that is present) is chosen.
    """
    path = Path(path)
    if not path.exists():
        raise PrepError(f"{path} does not exist")
    if path.is_file():
        name = path.name.lower()
        if name.endswith(".pkl.gz"):
            return "pkl.gz", path
        if name.endswith((".h5", ".hdf5")):
            return "h5", path
        if name == tfrecord.FEATURES_JSON:
            return "tfrecord", path.parent
        raise PrepError(
            f"{path}: not a packaged dataset (expected .pkl.gz, .h5, a tfrecord folder or a work directory)"
        )
    if (path / tfrecord.FEATURES_JSON).is_file():
        return "tfrecord", path
    listed = _manifest(path).get("settings", {}).get("pack", {}).get("formats")
    for name in prefer:
        if (listed is None or name in listed) and (path / FORMATS[name].OUTPUT).exists():
            return resolve(path / FORMATS[name].OUTPUT)
    raise PrepError(
        f"no packaged dataset in {path} (expected dataset.pkl.gz, dataset.h5 or tfrecord/); run `prep pack`"
    )


def load(path: str | os.PathLike) -> Arrays:
    """((x_train, y_train), (x_valid, y_valid), (x_test, y_test)) as numpy arrays.

    x is uint8 (N, H, W, C) and y int64 label ids; a pkl.gz packed with ``--flat`` or
    ``--float`` comes back as stored.
    """
    name, target = resolve(path)
    return FORMATS[name].load(target)


def load_tf(path: str | os.PathLike, split: str = "train"):
    """A tf.data.Dataset of (uint8 H x W x C image, int64 label) for one split.

    Streams from the TFRecord shards, from an HDF5 file through a generator, or from a
    pkl.gz in memory; in a work directory the first of those found, in that order.
    """
    if split not in SPLITS:
        raise PrepError(f"split must be one of {', '.join(SPLITS)}; received {split!r}")
    name, target = resolve(path, prefer=("tfrecord", "h5", "pkl.gz"))
    return FORMATS[name].load_tf(target, split)


def load_classes(path: str | os.PathLike) -> list[str]:
    """The class names (label id = position): the h5 file's attributes, else manifest.json,
    features.json or classes.json beside the file."""
    path = Path(path)
    if not path.exists():
        raise PrepError(f"{path} does not exist")
    if path.suffix == ".json":
        return _classes_json(path)
    folder = path if path.is_dir() else path.parent
    if path.is_file():
        name, target = resolve(path)
        classes = FORMATS[name].classes(target)
        if classes is not None:
            return classes
    # what was packaged first: classes.json may have been re-encoded since
    for candidate in (workdir.MANIFEST, tfrecord.FEATURES_JSON, workdir.CLASSES):
        if (folder / candidate).is_file():
            return _classes_json(folder / candidate)
    if path.is_dir():
        name, target = resolve(path)
        if name == "h5":
            return load_classes(target)
    raise PrepError(f"no class names found for {path} (expected classes.json or manifest.json beside it)")


def _classes_json(path: Path) -> list[str]:
    data = workdir.read_json(path)
    classes = data.get("classes") if isinstance(data, dict) else data
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise PrepError(f"{path}: no class list found")
    return classes


def _manifest(folder: Path) -> dict:
    try:
        data = json.loads((folder / workdir.MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
