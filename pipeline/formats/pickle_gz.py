"""pkl.gz: the mnist.pkl.gz layout, a gzipped pickle of ``[(x, y), (x, y), (x, y)]``.

The three pairs are train, valid and test, loadable without prep::

    train_set, valid_set, test_set = pickle.load(gzip.open(path), encoding='latin1')

x is uint8 (N, H, W, C); ``flat`` makes it (N, H*W*C) and ``as_float`` float32 in [0, 1].
y is int64 label ids. The format is one pickle, so the dataset is held in memory while
writing and loading. The gzip header has mtime 0 and no file name, and the pickle protocol
is fixed, so the bytes depend on the data only. The file is a series of gzip members, one per
4 MiB of pickle, compressed on several cores; readers that follow the gzip standard's
multi-member rule (``gzip.open``, ``gunzip``, ``zcat``, ``pigz -d``) read them as one stream,
while a bare ``zlib.decompress(data, 31)`` stops after the first member. The members are cut at
fixed offsets, so the bytes do not depend on the number of cores either.

A pickle can name any Python callable to run while it is read, so :func:`load` unpickles through
:class:`_Unpickler`, which builds numpy arrays and nothing else: a file that asks for anything
more (``os.system``, an object array) is refused, and no code in it runs.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import pickle
import struct
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Iterator

import deflate

from .. import workdir
from ..errors import PrepError, VerificationFailed

OUTPUT = "dataset.pkl.gz"
OPTIONS = ("flat", "as_float")
PROTOCOL = 4  # fixed, not pickle.DEFAULT_PROTOCOL, so the bytes do not change with Python
# libdeflate's level 2: against zlib's level 1, 2.2x as fast and 1% smaller on photos, 1.7x as
# fast and 22% smaller on digits; its level 1 is faster still but 1% larger on photos
LEVEL = 2
MEMBER = 4 << 20  # bytes of pickle per gzip member
ENCODING = f"gzip-members-{MEMBER}-libdeflate{LEVEL}-{deflate.__version__}"  # in the stamp: a change repacks
MAX_THREADS = 4  # compressing threads: more gain little, and each holds a member in memory
BATCH = 1024


class _Writer:
    def __init__(self, layout):
        import numpy as np

        from . import SPLITS

        self.x = {s: np.zeros((layout.counts.get(s, 0), *layout.shape), np.uint8) for s in SPLITS}
        self.y = {s: np.zeros(layout.counts.get(s, 0), np.int64) for s in SPLITS}
        self.filled = dict.fromkeys(SPLITS, 0)

    def write(self, sample) -> None:
        self.x[sample.split][sample.index] = sample.pixels
        self.y[sample.split][sample.index] = sample.label
        self.filled[sample.split] += 1


@contextlib.contextmanager
def writer(target: Path, layout, options) -> Iterator[_Writer]:
    """Collect the samples in memory; on exit pickle them into ``target`` atomically."""
    import numpy as np

    from . import SPLITS

    w = _Writer(layout)
    yield w
    data = []
    for split in SPLITS:
        x = w.x[split]
        if w.filled[split] != len(x):
            raise PrepError(f"{target.name}: split {split} received {w.filled[split]} of {len(x)} samples")
        if options.as_float:
            x = np.divide(x, 255, dtype=np.float32)
        if options.flat:
            x = x.reshape(len(x), -1)
        data.append((x, w.y[split]))
    with workdir.atomic_write(target) as handle, GzipMembers(handle) as gz:
        pickle.dump(data, gz, protocol=PROTOCOL)


class GzipMembers:
    """A write-only file that compresses every ``MEMBER`` bytes as a gzip member of its own, on
    several threads (libdeflate releases the GIL), and writes the members in order: a multi-member gzip
    file (RFC 1952) whose bytes depend neither on the number of threads nor on the Python version
    (each member's header is written here: mtime 0, no name, OS "unknown"). They do depend on
    the version of libdeflate (the ``deflate`` package), which is part of :data:`ENCODING`."""

    def __init__(self, out: BinaryIO, threads: int | None = None):
        self.out = out
        self.threads = threads or min(MAX_THREADS, os.cpu_count() or 1)
        self.pool = ThreadPoolExecutor(self.threads)
        self.pending: deque = deque()  # at most threads + 1 members of MEMBER bytes in flight
        self.buffer = bytearray()
        self.members = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        written = view.nbytes
        while view:
            take = MEMBER - len(self.buffer)
            self.buffer += view[:take]
            view = view[take:]
            if len(self.buffer) == MEMBER:
                self._submit()
        return written

    def _submit(self) -> None:
        chunk, self.buffer = self.buffer, bytearray()
        self.pending.append(self.pool.submit(_member, chunk))
        self.members += 1
        while len(self.pending) > self.threads:
            self.out.write(self.pending.popleft().result())

    def close(self) -> None:
        """Write what is left (an empty input is still one, empty, member) and stop the threads."""
        try:
            if self.buffer or not self.members:
                self._submit()
            while self.pending:
                self.out.write(self.pending.popleft().result())
        finally:
            self.pool.shutdown()

    def __enter__(self) -> "GzipMembers":
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.close()
        else:  # the file is being abandoned: drop what is queued
            self.pool.shutdown(cancel_futures=True)


_GZIP_HEADER = bytes([0x1F, 0x8B, 8, 0, 0, 0, 0, 0, 0, 0xFF])  # deflate, no flags, mtime 0, OS unknown


def _member(chunk: bytes) -> bytes:
    body = deflate.deflate_compress(chunk, LEVEL)
    return b"".join((_GZIP_HEADER, body, struct.pack("<II", deflate.crc32(chunk), len(chunk) & 0xFFFFFFFF)))


def load(path: str | Path) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """((x_train, y_train), (x_valid, y_valid), (x_test, y_test)) as stored (flat or float if packed so)."""
    import numpy as np

    from . import check_arrays

    path = Path(path)
    try:
        with gzip.open(path, "rb") as handle:
            data = _Unpickler(handle, path).load()
    except (OSError, EOFError, zlib.error, pickle.UnpicklingError, ValueError, AttributeError,
            ImportError, IndexError, TypeError) as err:
        raise PrepError(f"{path}: not a readable pkl.gz dataset ({type(err).__name__}: {err})") from None
    if not (
        isinstance(data, (list, tuple))
        and len(data) == 3
        and all(isinstance(pair, (list, tuple)) and len(pair) == 2 for pair in data)
        and all(isinstance(a, np.ndarray) for pair in data for a in pair)
    ):
        raise PrepError(f"{path}: expected a pickled list of three (x, y) numpy array pairs")
    return check_arrays(path, [(pair[0], pair[1]) for pair in data], stored_forms=True)


class _Unpickler(pickle.Unpickler):
    """Unpickles numpy arrays of numbers in lists and tuples, and refuses every other global.

    Lists, tuples, numbers and bytes have opcodes of their own; an array needs the few globals
    of :func:`_globals`, which run no code of the file's choosing. Every other global, and every
    dtype holding Python objects (their pickle would be unpickled as well), is refused.
    """

    def __init__(self, handle, path: Path):
        super().__init__(handle, encoding="latin1")  # latin1: Python 2 pickles (mnist.pkl.gz) hold str
        self.path = path
        self.allowed = _globals(self._dtype)

    def find_class(self, module: str, name: str):
        found = self.allowed.get((module, name))
        if found is None:
            raise PrepError(f"refusing to unpickle {module}.{name} from {self.path}: not a prep dataset")
        return found

    def _dtype(self, *args):
        import numpy as np

        dtype = np.dtype(*args)
        if dtype.hasobject:
            raise PrepError(f"refusing to unpickle an object array from {self.path}: not a prep dataset")
        return dtype


def _globals(dtype) -> dict:
    """(module, name) -> what it resolves to, for the globals pickled numpy arrays refer to:
    ``numpy._core`` (numpy 2) or ``numpy.core`` (numpy 1) ``multiarray._reconstruct`` with
    ``ndarray`` and ``dtype`` (protocols 0-4), ``numeric._frombuffer`` (protocol 5), and
    ``_codecs.encode`` (bytes in protocols 0-2, as Python 3 writes them). Looked up here,
    not imported by name, so numpy 2 does not warn that ``numpy.core`` is deprecated."""
    import codecs

    import numpy as np

    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1
        from numpy.core import multiarray, numeric
    found = {"_codecs": {"encode": codecs.encode}, "numpy": {"ndarray": np.ndarray, "dtype": dtype}}
    for core in ("numpy._core", "numpy.core"):
        found[f"{core}.multiarray"] = {"_reconstruct": multiarray._reconstruct}
        found[f"{core}.numeric"] = {"_frombuffer": numeric._frombuffer}
    return {(module, name): value for module, names in found.items() for name, value in names.items()}


def read(path: Path, layout, options) -> Iterator[tuple[str, object]]:
    """(split, Batch) pairs as uint8 (N, H, W, C); checks dtypes and shapes against ``layout``."""
    import numpy as np

    from . import SPLITS, Batch, to_images

    try:
        data = load(path)
    except PrepError as err:
        raise VerificationFailed(str(err).removeprefix(f"{path}: ")) from None
    x_dtype = np.dtype(np.float32 if options.as_float else np.uint8)
    for split, (x, y) in zip(SPLITS, data, strict=True):
        n = len(x)
        x_shape = (n, layout.height * layout.width * layout.channels) if options.flat else (n, *layout.shape)
        if x.dtype != x_dtype or x.shape != x_shape:
            raise VerificationFailed(f"split {split}: x is {x.dtype} {x.shape}; expected {x_dtype} {x_shape}")
        if y.dtype != np.int64 or y.shape != (n,):
            raise VerificationFailed(f"split {split}: y is {y.dtype} {y.shape}; expected int64 ({n},)")
        for start in range(0, n, BATCH):
            chunk = x[start : start + BATCH]
            if options.as_float:
                bad = np.flatnonzero(~((chunk >= 0) & (chunk <= 1)).reshape(len(chunk), -1).all(axis=1))
                if bad.size:
                    raise VerificationFailed(f"split {split}, index {start + int(bad[0])}: pixel values outside [0, 1]")
            yield split, Batch(to_images(chunk, layout.shape), y[start : start + BATCH], None)


def load_tf(path: str | Path, split: str):
    """A tf.data.Dataset of (uint8 H x W x C image, int64 label), from memory."""
    from . import SPLITS, to_images
    from .tfrecord import import_tf

    path = Path(path)
    x, y = load(path)[SPLITS.index(split)]
    shape = x.shape[1:] if x.ndim == 4 else _shape_beside(path)
    if x.ndim == 2 and x.shape[1] != shape[0] * shape[1] * shape[2]:
        raise PrepError(f"{path}: split {split}: flat images of {x.shape[1]} values; manifest.json says (H, W, C) {shape}")
    tf = import_tf()
    return tf.data.Dataset.from_tensor_slices((to_images(x, shape), y))


def classes(path: Path) -> list[str] | None:
    """None: the pickle holds label ids only (see classes.json or manifest.json beside it)."""
    return None


def _shape_beside(path: Path) -> tuple[int, int, int]:
    manifest = path.with_name("manifest.json")
    try:
        image = json.loads(manifest.read_text(encoding="utf-8"))["image"]
        return (int(image["height"]), int(image["width"]), int(image["channels"]))
    except (OSError, ValueError, KeyError, TypeError):
        raise PrepError(
            f"{path} holds flat arrays; the image shape is in {manifest}, which is missing or unreadable"
        ) from None
