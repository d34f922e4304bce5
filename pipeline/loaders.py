"""The public load API: a packaged dataset back as numpy arrays, a tf.data pipeline, a PyTorch
dataset, or the work directory's per-image records as a pandas DataFrame.

::

    import pipeline
    (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = pipeline.load("processed")
    train = pipeline.load_tf("processed/tfrecord", "train").shuffle(1024).batch(32)
    train = pipeline.load_torch("processed", "train")   # for torch.utils.data.DataLoader
    names = pipeline.load_classes("processed")
    frame = pipeline.load_frame("processed")            # one row per image, rejected ones too

``path`` is a packaged file (``dataset.pkl.gz``, ``dataset.h5``), a ``tfrecord/`` or Parquet
``data/`` folder, or a work directory: there :func:`load` takes the first of pkl.gz, h5,
tfrecord, parquet, :func:`load_tf` the first of tfrecord, h5, pkl.gz, parquet and
:func:`load_torch` the first of parquet, h5, pkl.gz that manifest.json lists (that is present,
without a manifest). Nothing here imports torch, pandas or TensorFlow until asked to.
"""

from __future__ import annotations

import bisect
import os
from pathlib import Path

import numpy as np

from . import workdir
from .errors import PrepError
from .formats import FORMATS, SPLITS, parquet, tfrecord

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
    if any(path.glob("*.parquet")):
        return "parquet", path
    listed = _listed_formats(path)
    for name in prefer:
        if (listed is None or name in listed) and (path / FORMATS[name].OUTPUT).exists():
            return resolve(path / FORMATS[name].OUTPUT)
    raise PrepError(
        f"no packaged dataset in {path} (expected dataset.pkl.gz, dataset.h5, tfrecord/ or data/); run `prep pack`"
    )


def load(path: str | os.PathLike) -> Arrays:
    """((x_train, y_train), (x_valid, y_valid), (x_test, y_test)) as numpy arrays.

    x is uint8 (N, H, W, C) and y int64 label ids; a pkl.gz packed with ``--flat`` or
    ``--float`` comes back as stored. A pkl.gz is unpickled into numpy arrays and nothing else
    (code in a pickle is refused, not run), and every split's shapes and dtypes are checked:
    a PrepError names the file and split that do not fit.
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
    name, target = resolve(path, prefer=("tfrecord", "h5", "pkl.gz", "parquet"))
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
        classes = FORMATS[name].classes(target)  # an h5 file's attributes, Parquet's schema metadata
        if classes is not None:
            return classes
    raise PrepError(f"no class names found for {path} (expected classes.json or manifest.json beside it)")


def _classes_json(path: Path) -> list[str]:
    try:
        data = workdir.read_json(path)
    except OSError as err:  # a FIFO or a folder at the name, say
        raise PrepError(f"{path}: not readable ({err.strerror or err})") from None
    classes = data.get("classes") if isinstance(data, dict) else data
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise PrepError(f"{path}: no class list found")
    return classes


def _listed_formats(folder: Path) -> list | None:
    """The formats manifest.json of ``folder`` lists; None where it is missing or unreadable
    (the formats present then decide)."""
    try:
        data = workdir.read_json(folder / workdir.MANIFEST)
    except (OSError, PrepError):
        return None
    for key in ("settings", "pack", "formats"):
        data = data.get(key) if isinstance(data, dict) else None
    return data if isinstance(data, list) else None


# -- PyTorch --------------------------------------------------------------------------------


def load_torch(path: str | os.PathLike, split: str = "train", transform=None) -> "TorchDataset":
    """A map-style dataset of one split for ``torch.utils.data.DataLoader``: ``len(ds)`` and
    ``ds[i] -> (image, label)``.

    The image is a uint8 (H, W, C) numpy array, as torchvision's ``ToTensor()`` and v2
    ``ToImage()`` take it (DataLoader's default collate stacks those into a uint8 (N, H, W, C)
    tensor), or ``transform(image)`` when a transform is given; the label is an int. Reads
    Parquet shards a row group at a time, an HDF5 file lazily (opened in each worker process,
    not here, so the dataset pickles to DataLoader workers), or a pkl.gz in memory; a work
    directory gives the first of those found. ``split`` is train, valid (or the Hub's
    validation) or test. Torch itself is not imported.
    """
    split = {"validation": "valid"}.get(split, split)
    if split not in SPLITS:
        raise PrepError(f"split must be one of {', '.join(SPLITS)} (or validation); received {split!r}")
    name, target = resolve(path, prefer=("parquet", "h5", "pkl.gz", "tfrecord"))
    sources = {"parquet": _ParquetRows, "h5": _H5Rows, "pkl.gz": _ArrayRows}
    if name not in sources:
        raise PrepError(f"{target}: load_torch reads parquet, h5 or pkl.gz (a TFRecord file has no random access);"
                        " run `prep pack --format parquet`")
    return TorchDataset(sources[name](target, split), transform)


class TorchDataset:
    """One split as a map-style dataset: ``len`` and ``[i] -> (image, label)``."""

    def __init__(self, rows, transform=None):
        self.rows = rows
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        n = len(self.rows)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a split of {n} images")
        image, label = self.rows.get(index % n)
        return (self.transform(image) if self.transform is not None else image), int(label)


class _ArrayRows:
    """A pkl.gz split, in memory (forked DataLoader workers share it)."""

    def __init__(self, path: Path, split: str):
        from .formats import pickle_gz, to_images

        x, self.labels = pickle_gz.load(path)[SPLITS.index(split)]
        self.images = to_images(x, x.shape[1:] if x.ndim == 4 else pickle_gz._shape_beside(path))

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, index: int):
        return self.images[index], self.labels[index]


class _H5Rows:
    """An HDF5 split, opened on first access in each process (an open h5py file does not pickle)."""

    def __init__(self, path: Path, split: str):
        from .formats import hdf5

        self.path, self.split, self.pid, self.file = path, split, None, None
        with hdf5._open(path) as f:
            self.count = len(hdf5.datasets(path, f)[SPLITS.index(split)][1])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "pid": None, "file": None}

    def __len__(self) -> int:
        return self.count

    def get(self, index: int):
        from .formats import hdf5

        if self.file is None or self.pid != os.getpid():
            self.file, self.pid = hdf5._open(self.path), os.getpid()
        group = self.file[self.split]
        try:
            return group["images"][index], group["labels"][index]
        except OSError as err:  # a chunk that does not decompress
            raise PrepError(f"{self.path}: split {self.split}, index {index}: not readable ({err})") from None


class _ParquetRows:
    """A Parquet split: row group positions from the footers; a few row groups decoded at a time."""

    CACHED = 4  # row groups kept decoded: a sequential pass decodes each once

    def __init__(self, folder: Path, split: str):
        self.files = parquet.shards(folder)[split]
        self.starts, self.groups = [], []  # first row of each row group; its (file, group)
        count = 0
        for k, file in enumerate(self.files):
            footer = parquet._open(file).metadata
            for g in range(footer.num_row_groups):
                self.starts.append(count)
                self.groups.append((k, g))
                count += footer.row_group(g).num_rows
        self.count = count
        self.pid, self.open, self.cache = None, {}, {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "pid": None, "open": {}, "cache": {}}

    def __len__(self) -> int:
        return self.count

    def get(self, index: int):
        at = bisect.bisect_right(self.starts, index) - 1
        if at not in self.cache:
            if self.pid != os.getpid():
                self.open, self.cache, self.pid = {}, {}, os.getpid()
            k, g = self.groups[at]
            if k not in self.open:
                self.open[k] = parquet._open(self.files[k])
            pngs, _, labels = parquet.row_group(self.open[k], g, self.files[k])
            if len(self.cache) >= self.CACHED:
                del self.cache[next(iter(self.cache))]
            self.cache[at] = (pngs, labels)
        pngs, labels = self.cache[at]
        row = index - self.starts[at]
        try:
            return parquet.decode([pngs[row]])[0], labels[row]
        except parquet.BadImage as err:
            k, g = self.groups[at]
            raise PrepError(f"{self.files[k]}: row group {g}, row {row}: {err.reason}") from None


# -- pandas ---------------------------------------------------------------------------------

FRAME_COLUMNS = ["path", "label", "label_id", "split", "sha256", "format", "mode", "width", "height",
                 "status", "reason", "resized"]


def load_frame(path: str | os.PathLike):
    """A pandas DataFrame with one row per indexed image of a work directory, rejected ones included.

    Columns: path (relative to RAW), label, label_id and split (empty where the image was
    rejected or left out by ``prep split --drop-small``), sha256, format, mode, width and height
    of the source image (upright), status (ok or rejected) and reason, and resized (the
    resized file under resized/). From resized.csv and encoded.csv (splits.csv before `prep encode`).
    """
    import pandas as pd

    wd = workdir.Workdir(Path(path))
    resized = wd.path(workdir.RESIZED)
    if not resized.is_file():
        raise PrepError(f"{resized} does not exist; run `prep resize` first")
    rows = workdir.read_csv(resized, ["path", "label", "sha256", "resized", "status", "reason", "format",
                                      "mode", "width", "height"])
    assigned = {}
    for name, columns in ((workdir.ENCODED, ["path", "split", "label_id"]), (workdir.SPLITS, ["path", "split"])):
        if wd.path(name).is_file():
            assigned = {r["path"]: r for r in workdir.read_csv(wd.path(name), columns)}
            break
    def number(text):
        return int(text) if text not in ("", None) else None

    records = []
    for row in rows:
        where = assigned.get(row["path"], {})
        records.append({**{c: row.get(c, "") for c in FRAME_COLUMNS}, "split": where.get("split", ""),
                        "label_id": number(where.get("label_id")),
                        "width": number(row["width"]), "height": number(row["height"])})
    frame = pd.DataFrame(records, columns=FRAME_COLUMNS)
    for column in ("label_id", "width", "height"):
        frame[column] = frame[column].astype("Int64")
    for column in ("label", "split", "status", "format", "mode"):
        frame[column] = frame[column].astype("category")
    return frame
