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

Records are written without TensorFlow: :func:`encode_example` serializes the Example by hand
and :func:`frame` adds the TFRecord length and masked CRC32C, so an uncompressed shard is
byte-identical to what ``tf.io.TFRecordWriter`` writes. A gzip shard is one gzip stream of
those records (header mtime 0, so reruns match), which TensorFlow reads as "GZIP". They are read
back without it too (:func:`records`, :func:`decode_example`, the mirrors of the writer), so
`prep verify` and :func:`load` need no TensorFlow; only :func:`load_tf` imports it.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import math
import os
import re
import struct
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator

import google_crc32c

from .. import workdir
from ..errors import PrepError, VerificationFailed

OUTPUT = "tfrecord"
OPTIONS = ("shard_mb", "tfrecord_compression")
NEEDS_PNG = True  # records hold the resized PNG bytes
FEATURES_JSON = "features.json"
COMPRESSION = {"none": "", "gzip": "GZIP"}  # option value -> TFRecord compression_type
RECORD_OVERHEAD = 160  # bytes an Example adds to its PNG, for the shard-size estimate
BATCH = 256
BUFFER = 1 << 20  # bytes buffered per open shard file

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


# prep installs TensorFlow and Keras only with its `train` extra (the `prep` on PyPI is another project)
INSTALL_TF = ("this needs TensorFlow and Keras, which prep installs only with its train extra:"
              " pip install '.[train]' in prep's folder (or pip install tensorflow)")


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
        raise PrepError(INSTALL_TF) from None
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


def _varint(value: int) -> bytes:
    """Protobuf base-128 varint; a negative int64 is its 64-bit two's complement (10 bytes)."""
    if 0 <= value < 0x80:
        return bytes((value,))  # the usual case: tags, short lengths, small ints
    if not -(1 << 63) <= value < 1 << 63:  # int64 features (and lengths): more would be cut silently
        raise ValueError(f"{value} does not fit an int64 varint (64 bits)")
    value &= (1 << 64) - 1
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2): tag, length, payload."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_example(features: dict[str, bytes | int]) -> bytes:
    """A tf.train.Example of one-value features, as ``SerializeToString(deterministic=True)`` gives it.

    Example{features(1): Features{feature(1): map<string, Feature>}}; each map entry is
    {key(1), value(2)}, sorted by key (code point order is UTF-8 byte order). A Feature is
    bytes_list(1): BytesList{value(1)} or int64_list(3): Int64List{value(1), packed}.
    """
    entries = []
    for name in sorted(features):
        value = features[name]
        if isinstance(value, bytes):
            feature = _field(1, _field(1, value))
        else:
            feature = _field(3, _field(1, _varint(int(value))))
        entries.append(_field(1, _field(1, name.encode("utf-8")) + _field(2, feature)))
    return _field(1, b"".join(entries))


def _masked_crc(data: bytes) -> bytes:
    """TFRecord's checksum: CRC32C rotated right by 15 plus a constant, uint32 little-endian."""
    crc = google_crc32c.value(data)
    return struct.pack("<I", ((crc >> 15 | crc << 17) + 0xA282EAD8) & 0xFFFFFFFF)


def frame(record: bytes) -> bytes:
    """One TFRecord: uint64 LE length, masked CRC of those 8 bytes, the data, masked CRC of the data."""
    length = struct.pack("<Q", len(record))
    return b"".join((length, _masked_crc(length), record, _masked_crc(record)))


class _Shard:
    """An open shard file: framed records through a buffered handle, gzip-compressed or not."""

    def __init__(self, path: Path, gzip: bool):
        self.file = open(path, "wb", buffering=BUFFER)
        self.out: BinaryIO = self.file
        if gzip:
            import gzip as gzip_module

            self.out = gzip_module.GzipFile(filename="", mode="wb", fileobj=self.file, compresslevel=1, mtime=0)

    def write(self, record: bytes) -> None:
        self.out.write(frame(record))

    def close(self) -> None:
        try:
            self.out.close()  # a GzipFile writes its trailer; it leaves self.file open
        finally:
            self.file.close()


class _Writer:
    def __init__(self, folder: Path, layout, options):
        from . import SPLITS

        self.folder = folder
        self.layout = layout
        self.compression = COMPRESSION[options.tfrecord_compression]
        self.bounds: dict[str, list[int]] = {}
        for split in SPLITS:
            n = layout.counts.get(split, 0)
            shards = shard_count(n, layout.png_bytes.get(split, 0), options.shard_mb)
            self.bounds[split] = [k * n // shards for k in range(shards + 1)]
        self.files = {s: [shard_name(s, k, len(b) - 1) for k in range(len(b) - 1)] for s, b in self.bounds.items()}
        self.open: dict[str, tuple[int, _Shard]] = {}
        self.written = dict.fromkeys(SPLITS, 0)

    def _open(self, split: str, shard: int) -> _Shard:
        return _Shard(self.folder / self.files[split][shard], gzip=bool(self.compression))

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
        height, width, channels = sample.pixels.shape
        return encode_example({
            "image/encoded": sample.png,
            "image/format": b"png",
            "image/height": height,
            "image/width": width,
            "image/channels": channels,
            "image/class/label": sample.label,
            "image/class/text": self.layout.classes[sample.label].encode("utf-8"),
            "image/filename": sample.path.encode("utf-8"),
        })

    def close_files(self) -> None:
        """Close every open shard, all of them even if one fails (the first error is raised)."""
        from . import close_all

        handles = [handle for _, handle in self.open.values()]
        self.open.clear()
        close_all(handles)

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
    with workdir.atomic_dir(target) as folder:
        w = _Writer(folder, layout, options)
        try:
            yield w
        finally:
            w.close_files()
        w.finish()


def _features(folder: Path) -> dict:
    """features.json of ``folder``, checked: its sections, its compression, and every split's
    shards, each ``{"file": "<split>-NNNNN-of-NNNNN.tfrecord", "count": N}`` naming a file in
    ``folder`` (not a link out of it), so that no crafted features.json makes prep read elsewhere."""
    from . import SPLITS

    path = folder / FEATURES_JSON
    try:
        meta = workdir.read_json(path)
    except OSError as err:
        raise PrepError(f"{path}: missing or unreadable ({err.strerror or err})") from None
    if not isinstance(meta, dict) or not all(isinstance(meta.get(key), dict) for key in ("features", "splits", "image")):
        raise PrepError(f"{path}: not a prep features.json (expected its features, splits and image)")
    if meta.get("compression") not in COMPRESSION.values():
        raise PrepError(f"{path}: compression is {meta.get('compression')!r}; expected one of {list(COMPRESSION.values())}")
    inside = workdir.Confined(folder, "the tfrecord folder")
    for split in SPLITS:
        entry = meta["splits"].get(split)
        shards = entry.get("shards") if isinstance(entry, dict) else None
        if not isinstance(shards, list):
            raise PrepError(f"{path}: no shards listed for split {split!r}")
        for shard in shards:
            name = shard.get("file") if isinstance(shard, dict) else None
            count = shard.get("count") if isinstance(shard, dict) else None
            if not (isinstance(name, str) and re.fullmatch(rf"{split}-\d{{5}}-of-\d{{5}}\.tfrecord", name)
                    and type(count) is int and count >= 0):
                raise PrepError(f"{path}: split {split} lists the shard {shard!r}; expected"
                                f' {{"file": "{split}-NNNNN-of-NNNNN.tfrecord", "count": N}}')
            inside(name, str(path), whole=True)
    return meta


def _parser(tf, meta: dict):
    spec = {name: tf.io.FixedLenFeature(f["shape"], tf.as_dtype(f["dtype"])) for name, f in meta["features"].items()}
    image = meta["image"]
    shape = [int(image["height"]), int(image["width"]), int(image["channels"])]

    def parse(record):
        example = tf.io.parse_single_example(record, spec)
        decoded = tf.io.decode_png(example["image/encoded"], channels=shape[2])
        example["image"] = tf.ensure_shape(decoded, shape)
        return example

    return parse


def _split_files(folder: Path, meta: dict, split: str) -> list[str]:
    """The shard files of ``split``, in order, from features.json as :func:`_features` checked it."""
    return [str(folder / shard["file"]) for shard in meta["splits"][split]["shards"]]


def read(path: Path, layout, options) -> Iterator[tuple[str, object]]:
    """(split, Batch) pairs, parsed and decoded here; checks features.json and every record's features."""
    import numpy as np

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

    classes = np.array([c.encode("utf-8") for c in layout.classes] or [b""], dtype=object)
    gzip = bool(meta["compression"])
    for split in SPLITS:
        index = 0
        for shard in meta["splits"][split]["shards"]:
            where = f"split {split}, {shard['file']}"
            seen = 0
            try:
                for ex in _batches(records(path / shard["file"], gzip), layout.shape):
                    n = len(ex["image"])
                    _check_records(ex, layout, classes, f"split {split}", index)
                    yield split, Batch(ex["image"], ex["image/class/label"],
                                       [p.decode("utf-8", "replace") for p in ex["image/filename"]])
                    index += n
                    seen += n
            except (OSError, EOFError, ValueError, zlib.error) as err:
                raise VerificationFailed(f"{where}, near index {index}: {err}") from None
            if seen != shard["count"]:
                raise VerificationFailed(f"{where}: {seen} records; {FEATURES_JSON} says {shard['count']}")


# -- reading without TensorFlow: the mirror of encode_example and frame ----------------------


def records(path: Path, gzip: bool) -> Iterator[bytes]:
    """The records of one TFRecord file (a regular one: a FIFO is an OSError), their lengths and
    CRCs checked (ValueError otherwise)."""
    import gzip as gzip_module

    with workdir.open_regular(path) as raw, (gzip_module.GzipFile(fileobj=raw, mode="rb") if gzip else raw) as f:
        end = os.fstat(raw.fileno()).st_size
        while head := f.read(12):
            length = head[:8]
            if len(head) < 12 or _masked_crc(length) != head[8:]:
                raise ValueError("truncated record or corrupt record length (CRC mismatch)")
            (size,) = struct.unpack("<Q", length)
            if not gzip and size > end - f.tell():
                raise ValueError(f"a record length of {size} bytes, more than the {end - f.tell()} left in the file")
            data, crc = _read_upto(f, size), f.read(4)
            if len(data) < size or len(crc) < 4:
                raise ValueError("truncated record")
            if _masked_crc(data) != crc:
                raise ValueError("corrupt record (CRC mismatch)")
            yield data


def _read_upto(f, size: int) -> bytes:
    """Up to ``size`` bytes of ``f``, read a piece at a time: a gzip stream's length is not
    known ahead, and one read of a crafted length would ask for that much memory at once."""
    parts = []
    while size > 0 and (part := f.read(min(size, BUFFER))):
        parts.append(part)
        size -= len(part)
    return b"".join(parts)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while shift < 70:
        if pos >= len(buf):
            raise ValueError("truncated protobuf varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
    raise ValueError("protobuf varint longer than 10 bytes")


def _fields(buf: bytes) -> Iterator[tuple[int, int, bytes | int]]:
    """(field number, wire type, value) of a protobuf message; lengths are checked."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire in (1, 2, 5):
            size, pos = (_read_varint(buf, pos) if wire == 2 else ({1: 8, 5: 4}[wire], pos))
            value = buf[pos : pos + size]
            if len(value) < size:
                raise ValueError("truncated protobuf field")
            pos += size
        else:
            raise ValueError(f"protobuf wire type {wire} in a tf.train.Example")
        yield number, wire, value


def _int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _feature_values(feature: bytes) -> list:
    """The values of a Feature: bytes_list(1), float_list(2) or int64_list(3), packed or not."""
    values = []
    for number, wire, data in _fields(feature):
        if wire != 2:
            continue
        for item, item_wire, value in _fields(data):
            if item != 1:
                continue
            if number == 1 and item_wire == 2:
                values.append(bytes(value))
            elif number == 2:
                values += struct.unpack(f"<{len(value) // 4}f", value) if item_wire == 2 else [struct.unpack("<f", value)[0]]
            elif number == 3 and item_wire == 0:
                values.append(_int64(value))
            elif number == 3 and item_wire == 2:
                pos = 0
                while pos < len(value):
                    x, pos = _read_varint(value, pos)
                    values.append(_int64(x))
    return values


def decode_example(record: bytes) -> dict[str, list]:
    """feature name -> its values, from a serialized tf.train.Example."""
    features = {}
    for number, wire, message in _fields(record):
        if number != 1 or wire != 2:  # Example.features
            continue
        for entry_number, entry_wire, entry in _fields(message):
            if entry_number != 1 or entry_wire != 2:  # Features.feature, a map entry
                continue
            key, feature = b"", b""
            for part, part_wire, value in _fields(entry):
                if part == 1 and part_wire == 2:
                    key = bytes(value)
                elif part == 2 and part_wire == 2:
                    feature = value
            features[key.decode("utf-8")] = _feature_values(feature)
    return features


def _batches(stream: Iterator[bytes], shape: tuple[int, int, int]) -> Iterator[dict]:
    """Batches of up to BATCH records as numpy columns (feature name -> array), plus ``image``
    (uint8, zeros where the PNG is not of ``shape``) and ``image/shape_ok``."""
    import numpy as np

    from ..imaging import decode_png

    batch: list[dict] = []
    for record in itertools.chain(stream, [None]):
        if record is not None:
            example = decode_example(record)
            for name, (dtype, _) in FEATURES.items():
                values = example.get(name, ())
                if len(values) != 1:
                    raise ValueError(f"feature {name} has {len(values)} values; expected 1")
                if not isinstance(values[0], int if dtype == "int64" else bytes):
                    raise ValueError(f"feature {name} is not of type {dtype}")
            batch.append(example)
        if batch and (record is None or len(batch) == BATCH):
            ex = {name: np.array([e[name][0] for e in batch], dtype=np.int64 if dtype == "int64" else object)
                  for name, (dtype, _) in FEATURES.items()}
            images, ok = np.zeros((len(batch), *shape), np.uint8), np.zeros(len(batch), bool)
            for i, data in enumerate(ex["image/encoded"]):
                try:
                    image = decode_png(data)
                except ValueError:
                    continue
                if image.shape == shape:
                    images[i], ok[i] = image, True
            ex["image"], ex["image/shape_ok"] = images, ok
            yield ex
            batch = []


def _check_records(ex: dict, layout, classes: np.ndarray, where: str, start: int) -> None:
    import numpy as np

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
    import numpy as np

    from . import SPLITS, check_arrays

    path = Path(path)
    meta = _features(path)
    image = meta["image"]
    try:
        shape = (int(image["height"]), int(image["width"]), int(image["channels"]))
    except (KeyError, TypeError, ValueError):
        raise PrepError(f"{path / FEATURES_JSON}: image is {image!r}; expected its height, width and channels") from None
    result = []
    for split in SPLITS:
        xs, ys = [np.zeros((0, *shape), np.uint8)], [np.zeros(0, np.int64)]
        for file in _split_files(path, meta, split):
            try:
                for ex in _batches(records(Path(file), bool(meta["compression"])), shape):
                    if not ex["image/shape_ok"].all():
                        raise ValueError(f"an image is not a PNG of {shape} (H, W, C)")
                    xs.append(ex["image"])
                    ys.append(ex["image/class/label"])
            except (OSError, EOFError, ValueError, zlib.error) as err:
                raise PrepError(f"{file}: not a readable TFRecord file of prep's records ({err})") from None
        result.append((np.concatenate(xs), np.concatenate(ys)))
    return check_arrays(path, result)


def load_tf(path: str | Path, split: str):
    """A tf.data.Dataset of (uint8 H x W x C image, int64 label), streaming from the shards."""
    path = Path(path)
    meta = _features(path)
    files = _split_files(path, meta, split)
    for file in files:  # TensorFlow's reader would wait on a FIFO for a writer
        if not os.path.isfile(file):
            raise PrepError(f"{file}: missing or not a regular file")
    tf = import_tf()
    parse = _parser(tf, meta)
    dataset = tf.data.TFRecordDataset(files, compression_type=meta["compression"])
    return dataset.map(lambda r: (lambda ex: (ex["image"], ex["image/class/label"]))(parse(r)),
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def classes(path: str | Path) -> list[str] | None:
    """The class names listed in features.json (None if it lists none)."""
    found = _features(Path(path)).get("classes")
    return found if isinstance(found, list) and found and all(isinstance(c, str) for c in found) else None
