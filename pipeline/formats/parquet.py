"""parquet: Parquet shards in the Hugging Face Hub layout, for `datasets`, pandas, DuckDB and PyTorch.

Layout of the ``data/`` folder (the Hub names prep's ``valid`` split ``validation``)::

    train-00000-of-00001.parquet  validation-00000-of-00001.parquet  test-00000-of-00001.parquet

A split without images has no file (`datasets` refuses a split of no rows).

Every file has two columns: ``image``, a struct of ``bytes`` (the resized PNG exactly as
`prep resize` wrote it) and ``path`` (the source image path relative to RAW), and ``label``
(int64, the label id). The schema metadata under the key ``huggingface`` declares them as
the `datasets` features Image and ClassLabel (with the class names), so
``datasets.load_dataset("parquet", data_dir=...)`` gives typed splits with class names, while
pandas and DuckDB read plain tables.

Sizes follow the Hub: row groups of :data:`ROW_GROUP` rows (what `datasets` writes for image
datasets, so a random access reads 100 images, not the whole file) and shards of at most
:data:`SHARD_BYTES` of PNGs (the Hub's shard size); samples fill the shards in order, so a
rerun writes the same files. The bytes are deterministic: fixed zstd level, no statistics on
the image column, no pandas metadata; the footer names the pyarrow version, which is part of
``ENCODING``. The folder is built under a temporary name and swapped in whole.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Iterator

from .. import workdir
from ..errors import PrepError, VerificationFailed

OUTPUT = "data"
OPTIONS: tuple[str, ...] = ()
NEEDS_PNG = True  # the writer stores the resized PNG bytes (pack reads them only for such formats)
ROW_GROUP = 100  # rows per row group
SHARD_BYTES = 500_000_000  # PNG bytes per shard at most (datasets' MAX_SHARD_SIZE, "500MB")
COMPRESSION, LEVEL = "zstd", 3
HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}  # prep's name -> the Hub's
SHARD_NAME = re.compile(r"(?P<split>[a-z]+)-(?P<shard>\d{5})-of-(?P<shards>\d{5})\.parquet")


def __getattr__(name: str):
    """``ENCODING``, in the stamp (a change repacks): the writer's settings and pyarrow's version,
    which the files' footers name. Read from its installed metadata, without importing pyarrow."""
    if name != "ENCODING":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib.metadata

    try:
        version = importlib.metadata.version("pyarrow")
    except importlib.metadata.PackageNotFoundError:
        version = "missing"
    return f"{COMPRESSION}{LEVEL}-rowgroup{ROW_GROUP}-pyarrow-{version}"


def _pa():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise PrepError("the parquet format needs pyarrow: pip install pyarrow") from None
    return pa, pq


def shard_name(split: str, shard: int, shards: int) -> str:
    """The file name of shard ``shard`` of ``shards`` of prep's split ``split``, in the Hub's naming."""
    return f"{HUB_SPLITS[split]}-{shard:05d}-of-{shards:05d}.parquet"


def hf_features(classes) -> dict:
    """The `datasets` features, as its schema metadata (and dataset card) describe them."""
    return {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": list(classes)}}


def schema(classes):
    pa, _ = _pa()
    info = {"info": {"features": hf_features(classes)}}
    return pa.schema(
        [("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())],
        metadata={b"huggingface": json.dumps(info, ensure_ascii=False, separators=(",", ":")).encode("utf-8")},
    )


class _Writer:
    def __init__(self, folder: Path, layout):
        from . import SPLITS

        self.folder = folder
        self.schema = schema(layout.classes)
        self.bounds: dict[str, list[int]] = {}
        for split in SPLITS:
            n = layout.counts.get(split, 0)  # an empty split has no file: `datasets` refuses empty splits
            shards = max(min(n, 1), min(n, math.ceil(layout.png_bytes.get(split, 0) / SHARD_BYTES)))
            self.bounds[split] = [k * n // shards for k in range(shards + 1)] if shards else [0]
        self.open: dict[str, tuple[int, object]] = {}
        self.buffers: dict[str, list] = {s: [] for s in SPLITS}
        self.written = dict.fromkeys(SPLITS, 0)

    def _file(self, split: str, shard: int):
        _, pq = _pa()
        return pq.ParquetWriter(
            self.folder / shard_name(split, shard, len(self.bounds[split]) - 1), self.schema,
            compression=COMPRESSION, compression_level=LEVEL, use_dictionary=["label"],
            write_statistics=["label"], store_schema=True,
        )

    def write(self, sample) -> None:
        split = sample.split
        if sample.png is None:
            raise PrepError("parquet writer: a sample came without its PNG bytes")
        if sample.index != self.written[split] + len(self.buffers[split]):
            raise PrepError(f"parquet writer: split {split} received sample {sample.index}"
                            f" at {self.written[split] + len(self.buffers[split])}")
        buffer = self.buffers[split]
        buffer.append(sample)
        shard = bisect.bisect_right(self.bounds[split], sample.index) - 1
        if len(buffer) == ROW_GROUP or sample.index + 1 == self.bounds[split][shard + 1]:
            self._flush(split)

    def _flush(self, split: str) -> None:
        """Write the buffered samples (all of one shard) as one row group."""
        pa, _ = _pa()
        buffer = self.buffers[split]
        if not buffer:
            return
        shard = bisect.bisect_right(self.bounds[split], buffer[0].index) - 1
        current = self.open.get(split)
        if current is None or current[0] != shard:
            if current is not None:
                current[1].close()
            current = self.open[split] = (shard, self._file(split, shard))
        image = pa.StructArray.from_arrays(
            [pa.array([s.png for s in buffer], pa.binary()), pa.array([s.path for s in buffer], pa.string())],
            fields=list(self.schema.field("image").type),
        )
        table = pa.Table.from_arrays([image, pa.array([s.label for s in buffer], pa.int64())], schema=self.schema)
        current[1].write_table(table, row_group_size=ROW_GROUP)
        self.written[split] += len(buffer)
        buffer.clear()

    def close_files(self) -> None:
        """Close every open shard, all of them even if one fails (the first error is raised)."""
        from . import close_all

        handles = [handle for _, handle in self.open.values()]
        self.open.clear()
        close_all(handles)

    def finish(self) -> None:
        """Write what is buffered and check the counts."""
        for split, bounds in self.bounds.items():
            self._flush(split)
            if self.written[split] != bounds[-1]:
                raise PrepError(f"parquet writer: split {split} received {self.written[split]} of {bounds[-1]} samples")
        self.close_files()


@contextlib.contextmanager
def writer(target: Path, layout, options) -> Iterator[_Writer]:
    """Write the shards into a temporary folder that replaces ``target`` on success."""
    with workdir.atomic_dir(target) as folder:
        w = _Writer(folder, layout)
        try:
            yield w
            w.finish()
        finally:
            w.close_files()


# -- reading --------------------------------------------------------------------------------


def shards(folder: Path) -> dict[str, list[Path]]:
    """prep's split name -> its shard files in order; PrepError for a file that is not one of a
    complete set of shards in the Hub's naming."""
    from . import SPLITS

    folder = Path(folder)
    if not folder.is_dir():
        raise PrepError(f"{folder}: not a folder of Parquet shards")
    prep_name = {hub: split for split, hub in HUB_SPLITS.items()}
    found: dict[str, dict[int, tuple[int, Path]]] = {s: {} for s in SPLITS}
    inside = workdir.Confined(folder, "the Parquet folder")
    for path in sorted(folder.iterdir()):
        match = SHARD_NAME.fullmatch(path.name)
        if not match or match["split"] not in prep_name:
            raise PrepError(f"{path}: not a shard named like train-00000-of-00001.parquet"
                            f" (splits {', '.join(HUB_SPLITS.values())})")
        inside(path.name, str(folder), whole=True)  # a link to a file elsewhere is not read
        found[prep_name[match["split"]]][int(match["shard"])] = (int(match["shards"]), path)
    result = {}
    for split, files in found.items():
        totals = {total for total, _ in files.values()}
        if files and (len(totals) != 1 or sorted(files) != list(range(totals.pop()))):
            raise PrepError(f"{folder}: the {HUB_SPLITS[split]} shards are not a complete numbered set"
                            f" ({', '.join(p.name for _, p in files.values())})")
        result[split] = [files[k][1] for k in sorted(files)]
    return result


def _open(path: Path):
    pa, pq = _pa()
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # pyarrow would wait on a FIFO for a writer
            raise OSError(errno.EINVAL, workdir.NOT_REGULAR)
        return pq.ParquetFile(path, pre_buffer=False)
    except (OSError, ValueError, pa.ArrowException) as err:  # ArrowInvalid is a ValueError
        raise PrepError(f"{path}: not a readable Parquet file ({_one_line(err)})") from None


def _one_line(err: Exception) -> str:
    """pyarrow's message, some of which span lines (thrift's), as one line."""
    return " ".join(str(err).split())


def file_classes(parquet_file) -> list[str] | None:
    """The class names of the ClassLabel feature in a file's schema metadata, or None."""
    raw = (parquet_file.schema_arrow.metadata or {}).get(b"huggingface")
    try:
        names = json.loads(raw)["info"]["features"]["label"]["names"]
    except (TypeError, ValueError, KeyError, RecursionError):  # a parquet file someone sent
        return None
    return [str(n) for n in names] if isinstance(names, list) else None


def row_group(parquet_file, index: int, where) -> tuple[list[bytes], list[str], object]:
    """(PNG bytes, paths, labels as int64 numpy) of one row group; a PrepError starting with
    ``where`` (the file) and naming the row group where it does not read as prep writes it."""
    import numpy as np

    pa, _ = _pa()
    try:
        # one thread, and no read-ahead (:func:`_open`): a row group is small, and threads and read-ahead
        # make the memory pool grow with the file
        table = parquet_file.read_row_group(index, columns=["image", "label"], use_threads=False)
    except (OSError, ValueError, pa.ArrowException) as err:  # a damaged page: "ZSTD decompression failed"
        raise PrepError(f"{where}: row group {index} is not readable ({_one_line(err)})") from None
    expected = schema(())
    for name in ("image", "label"):
        if table.schema.get_field_index(name) < 0 or table.schema.field(name).type != expected.field(name).type:
            raise PrepError(f"{where}: columns {table.schema.to_string(show_schema_metadata=False)!r};"
                            " expected image {bytes, path} and label int64")
    image = table.column("image").combine_chunks()
    labels = table.column("label")
    if image.null_count or labels.null_count or image.field("bytes").null_count:
        raise PrepError(f"{where}: row group {index} has empty (null) images or labels")
    return (image.field("bytes").to_pylist(), image.field("path").to_pylist(),
            np.asarray(labels.to_numpy(), dtype=np.int64))


class BadImage(ValueError):
    """A PNG of a row group that is not an 8-bit PNG of the expected shape: its position and why."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"{index}: {reason}")
        self.index, self.reason = index, reason


def decode(pngs: list[bytes], shape: tuple[int, int, int] | None = None):
    """uint8 (N, H, W, C) from PNG bytes; :class:`BadImage` for one that is not an 8-bit PNG of
    ``shape`` (or of the first one's shape)."""
    import numpy as np

    from ..imaging import decode_png

    images = []
    for i, data in enumerate(pngs):
        try:
            image = decode_png(data)
        except ValueError as err:
            raise BadImage(i, str(err)) from None
        if shape is None:
            shape = image.shape
        if image.shape != shape:
            raise BadImage(i, f"image is {image.shape} (H, W, C); expected {shape}")
        images.append(image)
    return np.stack(images) if images else np.zeros((0, *(shape or (0, 0, 0))), np.uint8)


def read(path: Path, layout, options) -> Iterator[tuple[str, object]]:
    """(split, Batch) pairs, one row group at a time; checks names, schema, classes, counts, shapes."""
    from . import SPLITS, Batch

    try:
        files = shards(path)
    except PrepError as err:
        raise VerificationFailed(str(err)) from None
    expected = schema(layout.classes)
    opened = {}
    for split in SPLITS:
        count = 0
        for file in files[split]:
            try:
                f = opened[file] = _open(file)
            except PrepError as err:
                raise VerificationFailed(str(err)) from None
            if not f.schema_arrow.equals(expected, check_metadata=False):
                raise VerificationFailed(f"{file.name}: columns {f.schema_arrow.to_string(show_schema_metadata=False)!r};"
                                         " expected image {bytes, path} and label int64")
            if file_classes(f) != list(layout.classes):
                raise VerificationFailed(f"{file.name}: class names {file_classes(f)}; expected {list(layout.classes)}")
            count += f.metadata.num_rows
        if count != layout.counts.get(split, 0):
            raise VerificationFailed(
                f"split {split}: {count} rows in {HUB_SPLITS[split]}-*.parquet; expected {layout.counts.get(split, 0)}"
            )
    for split in SPLITS:
        index = 0
        for file in files[split]:
            f = opened[file]
            for g in range(f.num_row_groups):
                try:
                    pngs, paths, labels = row_group(f, g, file.name)
                    images = decode(pngs, layout.shape)
                except PrepError as err:
                    raise VerificationFailed(str(err)) from None
                except BadImage as err:
                    raise VerificationFailed(f"{file.name}: split {split}, index {index + err.index}"
                                             f" ({paths[err.index]}): {err.reason}") from None
                yield split, Batch(images, labels, paths)
                index += len(labels)


def _split_arrays(path: Path, split: str):
    """(images, labels) of one split, decoded into memory."""
    import numpy as np

    images, labels = [], []
    for file in shards(path)[split]:
        f = _open(file)
        for g in range(f.num_row_groups):
            pngs, _, y = row_group(f, g, file)
            try:
                images.append(decode(pngs, images[0].shape[1:] if images else None))
            except BadImage as err:
                raise PrepError(f"{file}: row group {g}, row {err.index}: {err.reason}") from None
            labels.append(y)
    if not images:
        return None, np.zeros(0, np.int64)
    return np.concatenate(images), np.concatenate(labels)


def load(path: str | Path) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """((x_train, y_train), (x_valid, y_valid), (x_test, y_test)), images uint8 (N, H, W, C)."""
    import numpy as np

    from . import SPLITS, check_arrays

    arrays = [_split_arrays(Path(path), split) for split in SPLITS]
    shape = next((x.shape[1:] for x, _ in arrays if x is not None), (0, 0, 0))
    return check_arrays(path, [(x if x is not None else np.zeros((0, *shape), np.uint8), y) for x, y in arrays])


def load_tf(path: str | Path, split: str):
    """A tf.data.Dataset of (uint8 H x W x C image, int64 label), decoded one row group at a time."""
    from .tfrecord import import_tf

    path = Path(path)
    files = shards(path)[split]
    shape = None
    for first in (found[0] for found in shards(path).values() if found):
        f = _open(first)
        if f.metadata.num_rows:
            try:
                shape = decode(row_group(f, 0, first)[0][:1]).shape[1:]
            except BadImage as err:
                raise PrepError(f"{first}: row group 0, row 0: {err.reason}") from None
            break
    if shape is None:
        raise PrepError(f"{path}: no images in any split")

    def batches():
        for file in files:
            f = _open(file)
            for g in range(f.num_row_groups):
                pngs, _, labels = row_group(f, g, file)
                yield decode(pngs, shape), labels

    tf = import_tf()
    signature = (tf.TensorSpec((None, *shape), tf.uint8), tf.TensorSpec((None,), tf.int64))
    return tf.data.Dataset.from_generator(batches, output_signature=signature).unbatch()


def classes(path: str | Path) -> list[str] | None:
    """The class names of the label feature in the first shard's schema metadata."""
    for files in shards(Path(path)).values():
        if files:
            return file_classes(_open(files[0]))
    return None
