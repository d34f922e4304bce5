"""tfrecord: sharded TFRecord files of tf.train.Example, plus features.json to parse them.

Layout of the ``tfrecord/`` folder::

    train-00000-of-00002.tfrecord  train-00001-of-00002.tfrecord
    valid-00000-of-00001.tfrecord  test-00000-of-00001.tfrecord
    features.json   feature names and types, image shape, classes, compression, and for
                    every split its shard files and record counts

Each record holds the resized PNG bytes unchanged (no re-encoding) and the features listed
in :data:`FEATURES`. The number of shards of a split comes from the size of its PNG files
(``shard_mb`` per shard) and samples fill the shards in order, so a rerun writes the same
files. The folder is built under a temporary name and swapped in whole.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import math
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from .. import workdir
from ..errors import PrepError, VerificationFailed

OUTPUT = "tfrecord"
OPTIONS = ("shard_mb", "tfrecord_compression")
FEATURES_JSON = "features.json"
COMPRESSION = {"none": "", "gzip": "GZIP"}  # option value -> TFRecord compression_type
RECORD_OVERHEAD = 160  # bytes an Example adds to its PNG, for the shard-size estimate
BATCH = 256

# name -> (tf dtype name, description); every feature is a scalar (FixedLenFeature([])).
FEATURES = {
    "image/encoded": ("string", "the resized image, PNG bytes"),
    "image/format": ("string", "'png'"),
    "image/height": ("int64", "pixels"),
    "image/width": ("int64", "pixels"),
    "image/channels": ("int64", "1 (grayscale) or 3 (RGB)"),
    "image/class/label": ("int64", "label id: the position of the class in 'classes'"),
    "image/class/text": ("string", "class name, UTF-8"),
    "image/filename": ("string", "source image path relative to RAW, UTF-8"),
}


def import_tf():
    """TensorFlow, imported on first use (it takes seconds), quiet about its C++ start-up."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # its C++ start-up writes a few lines (absl, oneDNN, CUDA) straight to file descriptor 2
    # that no Python setting silences; hold them back while it loads
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow as tf

        tf.config.list_physical_devices()  # device discovery logs too (a machine without CUDA)
    except ImportError:
        raise PrepError("this needs TensorFlow: pip install tensorflow") from None
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return tf


def shard_count(count: int, png_bytes: int, shard_mb: float) -> int:
    """Shards for a split of ``count`` records whose PNGs weigh ``png_bytes``: at least one, none empty."""
    estimate = png_bytes + count * RECORD_OVERHEAD
    return max(1, min(count, math.ceil(estimate / (shard_mb * (1 << 20)))))


def shard_name(split: str, shard: int, shards: int) -> str:
    return f"{split}-{shard:05d}-of-{shards:05d}.tfrecord"


class _Writer:
    def __init__(self, folder: Path, layout, options, tf):
        from . import SPLITS

        self.tf = tf
        self.folder = folder
        self.layout = layout
        self.compression = COMPRESSION[options.tfrecord_compression]
        self.bounds: dict[str, list[int]] = {}
        for split in SPLITS:
            n = layout.counts.get(split, 0)
            shards = shard_count(n, layout.png_bytes.get(split, 0), options.shard_mb)
            self.bounds[split] = [k * n // shards for k in range(shards + 1)]
        self.files = {s: [shard_name(s, k, len(b) - 1) for k in range(len(b) - 1)] for s, b in self.bounds.items()}
        self.open: dict[str, tuple[int, object]] = {}
        self.written = dict.fromkeys(SPLITS, 0)

    def _open(self, split: str, shard: int):
        options = self.tf.io.TFRecordOptions(compression_type=self.compression)
        return self.tf.io.TFRecordWriter(str(self.folder / self.files[split][shard]), options)

    def write(self, sample) -> None:
        split = sample.split
        if sample.index != self.written[split]:
            raise PrepError(f"tfrecord writer: split {split} received sample {sample.index} at {self.written[split]}")
        shard = bisect.bisect_right(self.bounds[split], sample.index) - 1
        current = self.open.get(split)
        if current is None or current[0] != shard:
            if current is not None:
                current[1].close()
            current = self.open[split] = (shard, self._open(split, shard))
        current[1].write(self._example(sample))
        self.written[split] += 1

    def _example(self, sample) -> bytes:
        tf = self.tf

        def b(value: bytes):
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

        def i(value: int):
            return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))

        height, width, channels = sample.pixels.shape
        feature = {
            "image/encoded": b(sample.png),
            "image/format": b(b"png"),
            "image/height": i(height),
            "image/width": i(width),
            "image/channels": i(channels),
            "image/class/label": i(sample.label),
            "image/class/text": b(self.layout.classes[sample.label].encode("utf-8")),
            "image/filename": b(sample.path.encode("utf-8")),
        }
        example = tf.train.Example(features=tf.train.Features(feature=feature))
        return example.SerializeToString(deterministic=True)

    def close_files(self) -> None:
        for _, handle in self.open.values():
            handle.close()
        self.open.clear()

    def finish(self) -> None:
        """Check the counts, create the file of an empty split, write features.json."""
        splits = {}
        for split, bounds in self.bounds.items():
            if self.written[split] != bounds[-1]:
                raise PrepError(
                    f"tfrecord writer: split {split} received {self.written[split]} of {bounds[-1]} samples"
                )
            for name in self.files[split]:
                if not (self.folder / name).exists():
                    self._open(split, self.files[split].index(name)).close()
            splits[split] = {
                "count": bounds[-1],
                "shards": [
                    {"file": name, "count": bounds[k + 1] - bounds[k]} for k, name in enumerate(self.files[split])
                ],
            }
        workdir.write_json(self.folder / FEATURES_JSON, describe(self.layout, self.compression, splits))


def describe(layout, compression: str, splits: dict) -> dict:
    """The content of features.json: enough to parse the shards with TensorFlow alone."""
    return {
        "format": "tfrecord",
        "record": "tf.train.Example",
        "compression": compression,
        "features": {
            name: {"dtype": dtype, "shape": [], "description": text} for name, (dtype, text) in FEATURES.items()
        },
        "parse": "tf.io.parse_single_example(record, {name: tf.io.FixedLenFeature(f['shape'], tf.as_dtype(f['dtype']))"
                 " for name, f in features.items()}); image = tf.io.decode_png(x['image/encoded'], channels)",
        "image": {"height": layout.height, "width": layout.width, "channels": layout.channels},
        "classes": list(layout.classes),
        "splits": splits,
        "prep_version": layout.version,
    }


@contextlib.contextmanager
def writer(target: Path, layout, options) -> Iterator[_Writer]:
    """Write the shards into a temporary folder that replaces ``target`` on success."""
    tf = import_tf()
    with workdir.atomic_dir(target) as folder:
        w = _Writer(folder, layout, options, tf)
        try:
            yield w
        finally:
            w.close_files()
        w.finish()


def _features(folder: Path) -> dict:
    path = folder / FEATURES_JSON
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        meta["features"], meta["splits"], meta["image"]  # noqa: B018 (presence check)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PrepError(f"{path}: missing or not a prep features.json ({type(err).__name__}: {err})") from None
    return meta


def _parser(tf, meta: dict, check_shape: bool):
    spec = {name: tf.io.FixedLenFeature(f["shape"], tf.as_dtype(f["dtype"])) for name, f in meta["features"].items()}
    image = meta["image"]
    shape = [int(image["height"]), int(image["width"]), int(image["channels"])]

    def parse(record):
        example = tf.io.parse_single_example(record, spec)
        if check_shape:
            # channels=0 keeps the PNG's own channels, so a wrong PNG shows up instead of being converted
            decoded = tf.io.decode_png(example["image/encoded"], channels=0)
            ok = tf.reduce_all(tf.equal(tf.shape(decoded), shape))
            decoded = tf.cond(ok, lambda: decoded, lambda: tf.zeros(shape, tf.uint8))
            example["image/shape_ok"] = ok
        else:
            decoded = tf.io.decode_png(example["image/encoded"], channels=shape[2])
        example["image"] = tf.ensure_shape(decoded, shape)
        return example

    return parse


def _split_files(folder: Path, meta: dict, split: str) -> list[str]:
    try:
        return [str(folder / shard["file"]) for shard in meta["splits"][split]["shards"]]
    except (KeyError, TypeError):
        raise PrepError(f"{folder / FEATURES_JSON}: no shards listed for split {split!r}") from None


def read(path: Path, layout, options) -> Iterator[tuple[str, object]]:
    """(split, Batch) pairs decoded with TensorFlow; checks features.json and every record's features."""
    from . import SPLITS, Batch

    try:
        meta = _features(path)
    except PrepError as err:
        raise VerificationFailed(str(err)) from None
    expected = {
        "image": {"height": layout.height, "width": layout.width, "channels": layout.channels},
        "classes": list(layout.classes),
        "compression": COMPRESSION[options.tfrecord_compression],
        "features": describe(layout, "", {})["features"],
    }
    for key, value in expected.items():
        if meta.get(key) != value:
            raise VerificationFailed(f"{FEATURES_JSON}: {key} is {meta.get(key)}; expected {value}")
    listed = {FEATURES_JSON}
    for split in SPLITS:
        entry = meta["splits"].get(split, {})
        shards = entry.get("shards", [])
        if entry.get("count") != layout.counts.get(split, 0) or sum(s["count"] for s in shards) != entry.get("count"):
            raise VerificationFailed(
                f"{FEATURES_JSON}: split {split} counts {entry.get('count')} records in shards of"
                f" {[s['count'] for s in shards]}; expected {layout.counts.get(split, 0)}"
            )
        listed.update(s["file"] for s in shards)
    unlisted = sorted(p.name for p in path.iterdir() if p.name not in listed)
    if unlisted:
        raise VerificationFailed(f"{unlisted[0]} is not listed in {FEATURES_JSON}")

    tf = import_tf()
    parse = _parser(tf, meta, check_shape=True)
    classes = np.array([c.encode("utf-8") for c in layout.classes] or [b""], dtype=object)
    for split in SPLITS:
        index = 0
        for shard in meta["splits"][split]["shards"]:
            where = f"split {split}, {shard['file']}"
            dataset = tf.data.TFRecordDataset(str(path / shard["file"]), compression_type=meta["compression"])
            dataset = dataset.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(BATCH)
            seen = 0
            try:
                for ex in dataset.as_numpy_iterator():
                    n = len(ex["image"])
                    _check_records(ex, layout, classes, f"split {split}", index)
                    yield split, Batch(ex["image"], ex["image/class/label"],
                                       [p.decode("utf-8", "replace") for p in ex["image/filename"]])
                    index += n
                    seen += n
            except tf.errors.OpError as err:
                raise VerificationFailed(f"{where}, near index {index}: {err.message.splitlines()[0]}") from None
            if seen != shard["count"]:
                raise VerificationFailed(f"{where}: {seen} records; {FEATURES_JSON} says {shard['count']}")


def _check_records(ex: dict, layout, classes: np.ndarray, where: str, start: int) -> None:
    checks = {
        "image/format": ex["image/format"] == b"png",
        "image/height": ex["image/height"] == layout.height,
        "image/width": ex["image/width"] == layout.width,
        "image/channels": ex["image/channels"] == layout.channels,
        "image/encoded (decoded shape)": ex["image/shape_ok"],
    }
    labels = ex["image/class/label"]
    in_range = (labels >= 0) & (labels < len(layout.classes))
    checks["image/class/text"] = ~in_range | (classes[np.where(in_range, labels, 0)] == ex["image/class/text"])
    for name, ok in checks.items():
        bad = np.flatnonzero(~np.asarray(ok, dtype=bool))
        if bad.size:
            i = int(bad[0])
            raise VerificationFailed(
                f"{where}, index {start + i} ({ex['image/filename'][i].decode('utf-8', 'replace')}): {name} is wrong"
            )


def load(path: str | Path) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """((x_train, y_train), (x_valid, y_valid), (x_test, y_test)), decoded into memory."""
    from . import SPLITS

    path = Path(path)
    meta = _features(path)
    image = meta["image"]
    shape = (int(image["height"]), int(image["width"]), int(image["channels"]))
    result = []
    for split in SPLITS:
        xs, ys = [np.zeros((0, *shape), np.uint8)], [np.zeros(0, np.int64)]
        for x, y in load_tf(path, split).batch(1024).as_numpy_iterator():
            xs.append(x)
            ys.append(y)
        result.append((np.concatenate(xs), np.concatenate(ys)))
    return tuple(result)


def load_tf(path: str | Path, split: str):
    """A tf.data.Dataset of (uint8 H x W x C image, int64 label), streaming from the shards."""
    path = Path(path)
    meta = _features(path)
    files = _split_files(path, meta, split)
    tf = import_tf()
    parse = _parser(tf, meta, check_shape=False)
    dataset = tf.data.TFRecordDataset(files, compression_type=meta["compression"])
    return dataset.map(lambda r: (lambda ex: (ex["image"], ex["image/class/label"]))(parse(r)),
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def classes(path: str | Path) -> list[str] | None:
    """The class names listed in features.json."""
    return list(_features(Path(path)).get("classes") or []) or None
