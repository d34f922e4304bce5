"""h5: one HDF5 file with a group per split, written chunk by chunk as samples stream in.

Layout::

    /train/images   uint8 (N, H, W, C), chunked, gzip-compressed
    /train/labels   int64 (N,)
    /train/paths    utf-8 strings (N,), the source image paths relative to RAW
    /valid/..., /test/...
    attributes: classes, image_size [H, W], channels, prep_version

Memory stays bounded whatever the dataset size: each split buffers at most one chunk of
images. Datasets are created with ``track_times=False`` so a rerun gives the same bytes.

HDF5 cannot survive a failed write: closing the file then fails too, leaves it open with part of
its state freed, and the next close (h5py's, or HDF5's own at exit) crashes the process. So the
writer makes sure HDF5 never sees one: a full disk or a file size limit is kept by :class:`_Sink`
and raised from prep's code after HDF5 returns, and Ctrl-C, SIGTERM and SIGHUP wait until HDF5
has returned (:func:`_interrupts_held`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import threading
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


class _Sink:
    """The temporary file as HDF5 writes it, through h5py's file-object driver, with no call that
    fails: the first OSError is kept for :meth:`check`, and from then on (or once ``dropping`` is
    set, when the file is abandoned) writes are dropped. Unbuffered, so seeking and reading never
    write (and fail) either."""

    def __init__(self, raw):
        self.raw = raw
        self.error: OSError | None = None
        self.dropping = False

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def read(self, size: int = -1) -> bytes:
        try:
            return self.raw.read(size)
        except OSError as err:
            self._failed(err)
            return b""

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        size = view.nbytes
        try:
            while view and not self.dropping:
                view = view[self.raw.write(view) :]  # a write may be short (at a file size limit)
        except OSError as err:
            self._failed(err)
        return size

    def truncate(self, size: int | None = None) -> int:
        try:
            return self.raw.truncate(size) if not self.dropping else 0
        except OSError as err:
            self._failed(err)
            return 0

    def flush(self) -> None:
        pass  # unbuffered

    def _failed(self, err: OSError) -> None:
        if self.error is None:
            self.error = err
        self.dropping = True

    def check(self) -> None:
        """Raise the first error a write met, if any."""
        if self.error is not None:
            raise self.error


# the signals prep turns into exceptions (Ctrl-C, and SIGTERM and SIGHUP while a command runs)
_HELD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C, SIGTERM and SIGHUP off while HDF5 runs, and deliver each once HDF5 has
    returned: raised in :class:`_Sink`'s Python code, while HDF5 waits on it, a KeyboardInterrupt
    (or prep's Stopped) would fail HDF5's call as a failed write does. Only a handler in Python
    needs this (a signal that is ignored, or kills the process, runs no Python code meanwhile),
    and Python runs those in the main thread alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: handler for signum in _HELD if callable(handler := signal.getsignal(signum))}
    caught: list[int] = []
    for signum in previous:
        signal.signal(signum, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(caught):  # in the order they came; the first to raise ends it
            signal.raise_signal(signum)


class _Writer:
    def __init__(self, f, layout, sink: _Sink):
        import numpy as np

        from . import SPLITS

        h5py = _h5py()
        self.f = f
        self.sink = sink
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
        images, labels = np.stack([s.pixels for s in buffer]), np.array([s.label for s in buffer], dtype=np.int64)
        with _interrupts_held():
            group = self.f[split]
            group["images"][start:end] = images
            group["labels"][start:end] = labels
            group["paths"][start:end] = [s.path for s in buffer]
        self.sink.check()
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
    with workdir.atomic_write(target, "w+b", buffering=0) as handle:
        sink = _Sink(handle)
        with _interrupts_held():
            f = h5py.File(sink, "w")
        try:
            with _interrupts_held():
                w = _Writer(f, layout, sink)
            sink.check()
            yield w
            w.close()
        except BaseException:
            sink.dropping = True  # abandoned: closing it need not write anything
            raise
        finally:
            with _interrupts_held():
                f.close()
        sink.check()


def _open(path: Path):
    h5py = _h5py()
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # HDF5 would wait on a FIFO for a writer
            raise OSError(errno.EINVAL, workdir.NOT_REGULAR)
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
    path = Path(path)
    with _open(path) as f:
        pairs = datasets(path, f)
        try:
            return tuple((images[()], labels[()]) for images, labels in pairs)
        except OSError as err:  # a chunk that does not decompress, a filter this HDF5 lacks
            raise PrepError(f"{path}: not a readable HDF5 dataset ({err})") from None


def datasets(path: Path, f) -> tuple:
    """The (images, labels) h5py datasets of each split of the open file ``f``, their shapes and
    dtypes checked (not read): a PrepError naming ``path`` and the split otherwise."""
    from . import SPLITS, check_arrays

    h5py = _h5py()
    pairs = []
    for split in SPLITS:
        group = f.get(split)
        pair = tuple(group.get(name) if isinstance(group, h5py.Group) else None for name in ("images", "labels"))
        for name, found in zip(("images", "labels"), pair):
            if not isinstance(found, h5py.Dataset):
                raise PrepError(f"{path}: not a prep HDF5 dataset (no dataset {split}/{name})")
        pairs.append(pair)
    return check_arrays(path, pairs)


def load_tf(path: str | Path, split: str):
    """A tf.data.Dataset of (uint8 H x W x C image, int64 label), read one chunk at a time."""
    from . import SPLITS
    from .tfrecord import import_tf

    path = Path(path)
    with _open(path) as f:
        shape = datasets(path, f)[SPLITS.index(split)][0].shape[1:]

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
