"""h5: one HDF5 file with a group per split, written chunk by chunk as samples stream in.

Layout::

    /train/images   uint8 (N, H, W, C), chunked, gzip-compressed
    /train/labels   int64 (N,)
    /train/paths    utf-8 strings (N,), the source image paths relative to RAW
    /valid/..., /test/...
    attributes: classes, image_size [H, W], channels, prep_version

Memory stays bounded whatever the dataset size: each split buffers at most one chunk of
images. Datasets are created with ``track_times=False`` so a rerun gives the same bytes.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from .. import workdir
from ..errors import PrepError, VerificationFailed

OUTPUT = "dataset.h5"
OPTIONS: tuple[str, ...] = ()
CHUNK_BYTES = 1 << 20  # about 1 MiB of pixels per chunk
LEVEL = 4


def _h5py():
    try:
        import h5py
    except ImportError:
        raise PrepError("the h5 format needs h5py: pip install h5py") from None
    return h5py


class _Writer:
    def __init__(self, f, layout):
        import numpy as np

        from . import SPLITS

        h5py = _h5py()
        self.f = f
        self.rows: dict[str, int] = {}
        self.buffers: dict[str, list] = {s: [] for s in SPLITS}
        self.written = dict.fromkeys(SPLITS, 0)
        self.counts = {s: layout.counts.get(s, 0) for s in SPLITS}
        f.attrs["classes"] = np.array(layout.classes, dtype=h5py.string_dtype())
        f.attrs["image_size"] = np.array([layout.height, layout.width], dtype=np.int64)
        f.attrs["channels"] = np.int64(layout.channels)
        f.attrs["prep_version"] = layout.version
        pixels = layout.height * layout.width * layout.channels
        for split in SPLITS:
            n = self.counts[split]
            rows = max(1, min(n, CHUNK_BYTES // pixels))
            self.rows[split] = rows
            group = f.create_group(split)
            # HDF5 refuses chunks larger than an empty dataset, so empty splits stay contiguous.
            compressed = {"compression": "gzip", "compression_opts": LEVEL} if n else {}
            group.create_dataset("images", (n, *layout.shape), np.uint8, track_times=False,
                                 chunks=(rows, *layout.shape) if n else None, **compressed)
            group.create_dataset("labels", (n,), np.int64, track_times=False,
                                 chunks=(min(n, 1 << 16),) if n else None, **compressed)
            group.create_dataset("paths", (n,), h5py.string_dtype("utf-8"), track_times=False)

    def write(self, sample) -> None:
        buffer = self.buffers[sample.split]
        buffer.append(sample)
        if len(buffer) == self.rows[sample.split]:
            self._flush(sample.split)

    def _flush(self, split: str) -> None:
        import numpy as np

        buffer = self.buffers[split]
        if not buffer:
            return
        start = self.written[split]
        end = start + len(buffer)
        if buffer[0].index != start or end > self.counts[split]:
            raise PrepError(f"h5 writer: split {split} received sample {buffer[0].index} at position {start}")
        group = self.f[split]
        group["images"][start:end] = np.stack([s.pixels for s in buffer])
        group["labels"][start:end] = np.array([s.label for s in buffer], dtype=np.int64)
        group["paths"][start:end] = [s.path for s in buffer]
        self.written[split] = end
        buffer.clear()

    def close(self) -> None:
        for split in self.buffers:
            self._flush(split)
            if self.written[split] != self.counts[split]:
                raise PrepError(
                    f"h5 writer: split {split} received {self.written[split]} of {self.counts[split]} samples"
                )


@contextlib.contextmanager
def writer(target: Path, layout, options) -> Iterator[_Writer]:
    """Stream samples into ``target`` (through a temporary file renamed into place on success)."""
    h5py = _h5py()
    with workdir.atomic_write(target, "w+b") as handle, h5py.File(handle, "w") as f:
        w = _Writer(f, layout)
        yield w
        w.close()


def _open(path: Path):
    h5py = _h5py()
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise PrepError(f"{path}: not a readable HDF5 file ({err})") from None


def _strings(values) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def read(path: Path, layout, options) -> Iterator[tuple[str, object]]:
    """(split, Batch) pairs, one chunk at a time; checks attributes, dtypes and shapes."""
    import numpy as np

    from . import SPLITS, Batch

    try:
        f = _open(path)
    except PrepError as err:
        raise VerificationFailed(str(err).removeprefix(f"{path}: ")) from None
    with f:
        attrs = {
            "classes": _strings(f.attrs.get("classes", [])),
            "image_size": [int(v) for v in f.attrs.get("image_size", [])],
            "channels": int(f.attrs.get("channels", -1)),
        }
        expected = {"classes": list(layout.classes), "image_size": [layout.height, layout.width],
                    "channels": layout.channels}
        for key, value in expected.items():
            if attrs[key] != value:
                raise VerificationFailed(f"attribute {key} is {attrs[key]}; expected {value}")
        for split in SPLITS:
            n = layout.counts.get(split, 0)
            wanted = {"images": (np.uint8, (n, *layout.shape)), "labels": (np.int64, (n,)), "paths": (None, (n,))}
            for name, (dtype, shape) in wanted.items():
                ds = f.get(f"{split}/{name}")
                if ds is None:
                    raise VerificationFailed(f"split {split}: dataset {split}/{name} is missing")
                if (dtype is not None and ds.dtype != dtype) or ds.shape != shape:
                    raise VerificationFailed(
                        f"split {split}: {name} is {ds.dtype} {ds.shape}; expected {np.dtype(dtype or 'O')} {shape}"
                    )
            images, labels, paths = f[split]["images"], f[split]["labels"], f[split]["paths"]
            step = images.chunks[0] if images.chunks else max(n, 1)
            for start in range(0, n, step):
                end = min(n, start + step)
                yield split, Batch(images[start:end], labels[start:end], _strings(paths[start:end]))


def load(path: str | Path) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """((x_train, y_train), (x_valid, y_valid), (x_test, y_test)), images uint8 (N, H, W, C)."""
    from . import SPLITS

    path = Path(path)
    with _open(path) as f:
        try:
            return tuple((f[s]["images"][()], f[s]["labels"][()]) for s in SPLITS)
        except KeyError as err:
            raise PrepError(f"{path}: not a prep HDF5 dataset ({err})") from None


def load_tf(path: str | Path, split: str):
    """A tf.data.Dataset of (uint8 H x W x C image, int64 label), read one chunk at a time."""
    from .tfrecord import import_tf

    path = Path(path)
    with _open(path) as f:
        if f"{split}/images" not in f:
            raise PrepError(f"{path}: not a prep HDF5 dataset (no {split}/images)")
        shape = f[split]["images"].shape[1:]

    def batches():
        with _open(path) as f:
            images, labels = f[split]["images"], f[split]["labels"]
            step = images.chunks[0] if images.chunks else max(len(images), 1)
            for start in range(0, len(images), step):
                yield images[start : start + step], labels[start : start + step]

    tf = import_tf()
    signature = (tf.TensorSpec((None, *shape), tf.uint8), tf.TensorSpec((None,), tf.int64))
    return tf.data.Dataset.from_generator(batches, output_signature=signature).unbatch()


def classes(path: str | Path) -> list[str] | None:
    """The class names stored in the file's ``classes`` attribute."""
    with _open(Path(path)) as f:
        return _strings(f.attrs["classes"]) if "classes" in f.attrs else None
