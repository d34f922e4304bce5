"""pkl.gz: the mnist.pkl.gz layout, a gzipped pickle of ``[(x, y), (x, y), (x, y)]``.

The three pairs are train, valid and test, loadable without prep::

    train_set, valid_set, test_set = pickle.load(gzip.open(path), encoding='latin1')

x is uint8 (N, H, W, C); ``flat`` makes it (N, H*W*C) and ``as_float`` float32 in [0, 1].
y is int64 label ids. The format is one pickle, so loading it takes the whole dataset in
memory; writing does not: the pickle's opcodes are written around pixels streamed from the
samples (see :class:`_Writer`), in the very bytes ``pickle.dump`` gives of the whole arrays. The
gzip header has mtime 0 and no file name, and the pickle protocol is fixed, so the bytes depend
on the data only. The file is a series of gzip members, one per
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
import logging
import math
import os
import pickle
import struct
import tempfile
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Iterator, NamedTuple

import deflate

from .. import workdir
from ..errors import PrepError, VerificationFailed

log = logging.getLogger(__name__)

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
    """Takes the samples in order: train's pixels go straight into the pickle (it comes first),
    valid's and test's into a temporary file each until :meth:`finish` writes them after it;
    labels are kept (8 bytes an image)."""

    def __init__(self, target: Path, layout, options, out: "GzipMembers", stack: contextlib.ExitStack):
        import numpy as np

        from . import SPLITS

        self.out, self.as_float = out, options.as_float
        self.shape = layout.shape
        size = layout.height * layout.width * layout.channels
        self.dtype = np.dtype(np.float32 if options.as_float else np.uint8)
        self.x_shape = {s: (n, size) if options.flat else (n, *layout.shape)
                        for s in SPLITS for n in [layout.counts.get(s, 0)]}
        self.y = {s: np.zeros(self.x_shape[s][0], np.int64) for s in SPLITS}
        self.filled = dict.fromkeys(SPLITS, 0)
        self.batch = {s: np.zeros((min(BATCH, self.x_shape[s][0]), *layout.shape), np.uint8) for s in SPLITS}
        self.nbytes = {s: self.x_shape[s][0] * size * self.dtype.itemsize for s in SPLITS}
        # train's x is written as the samples come if pickle.dump would write it outside a frame
        self.direct = self.nbytes[SPLITS[0]] >= _FRAME_TARGET
        self.spill = {s: stack.enter_context(tempfile.TemporaryFile(dir=target.parent))
                      for s in SPLITS if self.x_shape[s][0] and not (self.direct and s == SPLITS[0])}
        self.prefix = b""
        if self.direct:  # the pickle up to train's pixels
            sink = _Sink(out, first_pass=True)
            with contextlib.suppress(_Reached):
                _Pickler(sink, protocol=PROTOCOL).dump(self._data(complete=False))
            self.prefix = bytes(sink.before)

    def write(self, sample) -> None:
        split, i = sample.split, self.filled[sample.split]
        if sample.index != i or i >= len(self.y[split]):
            raise PrepError(f"split {split}: sample {sample.index} arrived as number {i} of {len(self.y[split])}")
        self.batch[split][i % BATCH] = sample.pixels
        self.y[split][i] = sample.label
        self.filled[split] += 1
        if self.filled[split] % BATCH == 0 or self.filled[split] == len(self.y[split]):
            self._flush(split)

    def _flush(self, split: str) -> None:
        pixels = self.batch[split][: (self.filled[split] - 1) % BATCH + 1]
        if split in self.spill:
            self.spill[split].write(pixels.data)
        else:
            self.out.write(_stored(pixels, self.as_float))

    def finish(self, target: Path) -> None:
        """Check that every sample came, and write the rest of the pickle."""
        for split, n in self.filled.items():
            if n != len(self.y[split]):
                raise PrepError(f"{target.name}: split {split} received {n} of {len(self.y[split])} samples")
        _Pickler(_Sink(self.out, prefix=self.prefix if self.direct else None), protocol=PROTOCOL).dump(self._data())

    def _data(self, complete: bool = True) -> list:
        """What pickle.dump was given: ``[(x, y), (x, y), (x, y)]``, x as :class:`_Array`
        (not ``complete``: what the first pass reaches, train's x, and placeholders after it)."""
        import numpy as np

        from . import SPLITS

        data = []
        for split in SPLITS:
            spill, nbytes = self.spill.get(split), self.nbytes[split]
            if nbytes >= _FRAME_TARGET:  # as pickle writes large bytes: streamed, outside any frame
                payload = _Pixels(nbytes, spill, self.as_float)
            elif nbytes and complete:  # inside a frame: small, so read whole
                spill.seek(0)
                payload = _stored(np.frombuffer(spill.read(), np.uint8), self.as_float).tobytes()
            else:
                payload = b""
            data.append((_Array(self.x_shape[split], self.dtype, payload), self.y[split]))
        return data


def _stored(pixels, as_float: bool):
    """uint8 pixels as pkl.gz stores them: as they are, or float32 in [0, 1] as ``np.divide(x, 255,
    dtype=np.float32)`` makes them (value by value, so the same whatever the chunks)."""
    import numpy as np

    return np.divide(pixels, 255, dtype=np.float32) if as_float else pixels


@contextlib.contextmanager
def writer(target: Path, layout, options) -> Iterator[_Writer]:
    """Stream the samples into ``target``, which appears (atomically) on exit: the bytes
    ``pickle.dump`` would write of the whole dataset at protocol :data:`PROTOCOL`, without holding
    it. Warns when loading the file would take more than a quarter of this machine's memory."""
    _warn_if_large(target, layout, options)
    with contextlib.ExitStack() as stack:
        handle = stack.enter_context(workdir.atomic_write(target))
        gz = stack.enter_context(GzipMembers(handle))
        w = _Writer(target, layout, options, gz, stack)
        yield w
        w.finish(target)


def _warn_if_large(target: Path, layout, options) -> None:
    count = sum(layout.counts.values())
    loaded = count * (layout.height * layout.width * layout.channels * (4 if options.as_float else 1) + 8)
    memory = _machine_memory()
    if memory and loaded > memory / 4:
        log.warning("%s takes %.1f GB of memory to load, more than a quarter of this machine's %.1f GB;"
                    " h5, parquet and tfrecord are read in batches (prep pack --format h5, parquet or tfrecord)",
                    target.name, loaded / 1e9, memory / 1e9)


def _machine_memory() -> int | None:
    """This machine's physical memory in bytes, or None where the system does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


# -- streaming the pickle -------------------------------------------------------------------

_FRAME_TARGET = pickle._Framer._FRAME_SIZE_TARGET  # bytes from which pickle writes bytes outside frames
CHUNK = 4 << 20  # bytes of pixels read back from a temporary file at a time


class _Array:
    """A numpy array as ``ndarray.__reduce_ex__`` gives it to the pickler, its bytes given as
    ``payload``: bytes, or a :class:`_Pixels` that streams them."""

    def __init__(self, shape: tuple[int, ...], dtype, payload):
        self.shape, self.dtype, self.payload = shape, dtype, payload

    def __reduce_ex__(self, protocol):
        import numpy as np

        func, args, state = np.empty(0, self.dtype).__reduce_ex__(protocol)
        return func, args, (state[0], self.shape, state[2], state[3], self.payload)


class _Pixels:
    """One split's x bytes, too many for a pickle frame: read back from ``spill`` (uint8 pixels),
    or already written (``spill`` None: train's, written as the samples came)."""

    def __init__(self, nbytes: int, spill, as_float: bool):
        self.nbytes, self.spill, self.as_float = nbytes, spill, as_float

    def stream(self, write) -> None:
        import numpy as np

        self.spill.seek(0)
        while block := self.spill.read(CHUNK // (4 if self.as_float else 1)):
            write(_stored(np.frombuffer(block, np.uint8), self.as_float))


class _Pickler(pickle._Pickler):
    """The pure-Python pickler, whose bytes are the C pickler's (``pickle.dump``) and which takes
    new types: a :class:`_Pixels` is written as bytes too large for a frame are, its opcode and
    length after the frame so far, then its bytes, which the :class:`_Sink` streams."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_pixels(self, obj: _Pixels) -> None:
        n = obj.nbytes
        opcode = pickle.BINBYTES8 + struct.pack("<Q", n) if n > 0xFFFFFFFF else pickle.BINBYTES + struct.pack("<I", n)
        self._write_large_bytes(opcode, obj)
        self.memoize(obj)

    dispatch[_Pixels] = save_pixels


class _Reached(Exception):
    """The first pass has come to train's pixels."""


class _Sink:
    """Where the pickler writes: ``out``, and the pixels of a :class:`_Pixels`. Train's pixels
    (a _Pixels without a file) are written by the samples, so the pickle is made twice: the first
    pass writes up to them and stops; the second skips what comes before them (``prefix``, the
    same bytes: checked) and writes the rest. Without such pixels, ``prefix`` is None."""

    def __init__(self, out, *, first_pass: bool = False, prefix: bytes | None = None):
        self.out, self.first_pass, self.prefix = out, first_pass, prefix
        self.before = bytearray()
        self.skipping = first_pass or prefix is not None

    def write(self, data) -> None:
        if isinstance(data, _Pixels) and data.spill is None:
            if self.first_pass:
                raise _Reached
            if self.before != self.prefix:
                raise AssertionError("the pickle differs from its first pass before train's pixels")
            self.skipping = False
        elif isinstance(data, _Pixels):
            data.stream(self.out.write)
        elif self.skipping:
            self.before += data
            if self.first_pass:
                self.out.write(data)
        else:
            self.out.write(data)


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
        with workdir.open_regular(path) as raw, gzip.GzipFile(fileobj=raw, mode="rb") as handle:
            data = _Unpickler(handle, path).load()
    except (OSError, EOFError, zlib.error, pickle.UnpicklingError, ValueError, AttributeError, ImportError,
            IndexError, TypeError, OverflowError, MemoryError) as err:  # MemoryError: a size no memory holds
        text = " ".join(str(err).split())  # one line, whatever the file put in the message
        detail = f"{type(err).__name__}: {text}" if text else type(err).__name__
        raise PrepError(f"{path}: not a readable pkl.gz dataset ({detail})") from None
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
    of :func:`_globals`, which run no code of the file's choosing (nor make an array larger
    than the pickle's bytes). Every other global, and every dtype holding Python objects (their
    pickle would be unpickled as well), is refused.
    """

    def __init__(self, handle, path: Path):
        super().__init__(handle, encoding="latin1")  # latin1: Python 2 pickles (mnist.pkl.gz) hold str
        self.path = path
        self.allowed = _globals(self._dtype, self._refuse)

    def find_class(self, module: str, name: str):
        found = self.allowed.get((module, name))
        if found is None:
            self._refuse(f"{module}.{name}")
        return found

    def _refuse(self, what: str):
        raise PrepError(f"refusing to unpickle {what} from {self.path}: not a prep dataset")

    def _dtype(self, *args):
        import numpy as np

        dtype = np.dtype(*args)
        if dtype.hasobject:
            self._refuse("an object array")
        return dtype


def _globals(dtype, refuse) -> dict:
    """(module, name) -> what it resolves to, for the globals pickled numpy arrays refer to:
    ``numpy._core`` (numpy 2) or ``numpy.core`` (numpy 1) ``multiarray._reconstruct`` with
    ``ndarray`` and ``dtype`` (protocols 0-4), ``numeric._frombuffer`` (protocol 5), and
    ``_codecs.encode`` and ``bytes`` (bytes in protocols 0-2 as Python 3 writes them, ``bytes()``
    the empty ones). Looked up here, not imported by name, so numpy 2 does not warn that
    ``numpy.core`` is deprecated.

    ``_reconstruct`` is taken only as ``ndarray.__reduce__`` calls it, for an empty array that
    the state after it (BUILD) fills from the pickle's bytes, and ``ndarray`` only as its first
    argument (it stands for the array type, and cannot be called), so that no pickle makes an
    array larger than the bytes it holds."""
    import codecs

    import numpy as np

    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1
        from numpy.core import multiarray, numeric

    def ndarray(*args, **kwargs):
        refuse("a call of numpy.ndarray")

    def reconstruct(cls, shape, code):
        if cls is not ndarray or shape != (0,):
            refuse(f"numpy's _reconstruct of {shape!r}")
        return multiarray._reconstruct(np.ndarray, shape, code)

    found = {"_codecs": {"encode": codecs.encode}, "numpy": {"ndarray": ndarray, "dtype": dtype},
             "__builtin__": {"bytes": lambda: b""}, "builtins": {"bytes": lambda: b""}}
    for core in ("numpy._core", "numpy.core"):
        found[f"{core}.multiarray"] = {"_reconstruct": reconstruct}
        found[f"{core}.numeric"] = {"_frombuffer": numeric._frombuffer}
    return {(module, name): value for module, names in found.items() for name, value in names.items()}


def read(path: Path, layout, options) -> Iterator[tuple[str, object]]:
    """(split, Batch) pairs as uint8 (N, H, W, C); checks dtypes and shapes against ``layout``.

    A pickle of the form prep writes is read in two passes and never whole: the first walks its
    opcodes (:func:`_scan`), keeping the labels and where each split's pixels start; the second
    reads the pixels a batch at a time. Any other pickle is loaded whole, through :func:`load`."""
    import numpy as np

    from . import SPLITS, Batch, to_images

    try:
        with gzip.open(path, "rb") as handle:
            data = _scan(handle)
    except Exception:  # noqa: BLE001  (not as prep writes it, or damaged: load says which, in its words)
        data = None
    if not (isinstance(data, list) and len(data) == 3 and all(isinstance(p, tuple) and len(p) == 2 for p in data)
            and all(isinstance(a, (np.ndarray, _Lazy)) for p in data for a in p) and all(p[1].ndim == 1 for p in data)):
        data = None
    if data is None:
        try:
            data = load(path)
        except PrepError as err:
            raise VerificationFailed(str(err).removeprefix(f"{path}: ")) from None
    x_dtype = np.dtype(np.float32 if options.as_float else np.uint8)
    for split, (x, y) in zip(SPLITS, data, strict=True):
        n = x.shape[0] if x.shape else len(y)
        x_shape = (n, layout.height * layout.width * layout.channels) if options.flat else (n, *layout.shape)
        if x.dtype != x_dtype or x.shape != x_shape:
            raise VerificationFailed(f"split {split}: x is {x.dtype} {x.shape}; expected {x_dtype} {x_shape}")
        if y.dtype != np.int64 or y.shape != (n,):
            raise VerificationFailed(f"split {split}: y is {y.dtype} {y.shape}; expected int64 ({n},)")
    with contextlib.ExitStack() as stack:
        handle = None
        for split, (x, y) in zip(SPLITS, data, strict=True):
            if isinstance(x, _Lazy) and handle is None:
                handle = stack.enter_context(gzip.open(path, "rb"))
            for start in range(0, len(y), BATCH):
                chunk = x.read(handle, start, BATCH) if isinstance(x, _Lazy) else x[start : start + BATCH]
                if options.as_float:
                    bad = np.flatnonzero(~((chunk >= 0) & (chunk <= 1)).reshape(len(chunk), -1).all(axis=1))
                    if bad.size:
                        raise VerificationFailed(f"split {split}, index {start + int(bad[0])}: pixel values outside [0, 1]")
                yield split, Batch(to_images(chunk, layout.shape), y[start : start + BATCH], None)


class _Lazy(NamedTuple):
    """An array of a pickle, not read: its bytes start at ``offset`` of the uncompressed pickle."""

    offset: int
    shape: tuple[int, ...]
    dtype: object

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def read(self, handle, start: int, count: int):
        """Rows ``start`` to ``start + count`` (in order: the stream only goes forward)."""
        import numpy as np

        row = self.dtype.itemsize * math.prod(self.shape[1:])
        count = min(count, self.shape[0] - start)
        handle.seek(self.offset + start * row)
        data = handle.read(count * row)
        if len(data) != count * row:
            raise VerificationFailed(f"cut short in its pixels at row {start}")
        return np.frombuffer(data, self.dtype).reshape(count, *self.shape[1:])


class _Unusual(Exception):
    """Not a pickle as prep writes it."""


class _Skipped(NamedTuple):
    """Bytes of a pickle passed over: an array's pixels."""

    offset: int
    nbytes: int


class _Box:
    """What REDUCE made of numpy's ``_reconstruct`` (an array) or ``dtype``, completed by BUILD
    in place, as ``__setstate__`` does (the memo may hold it already)."""

    def __init__(self, kind: str, value=None):
        self.kind, self.value = kind, value


_STATE_BYTES = {pickle.SHORT_BINBYTES[0]: "<B", pickle.BINBYTES[0]: "<I", pickle.BINBYTES8[0]: "<Q"}
_STRINGS = {pickle.SHORT_BINUNICODE[0]: "<B", pickle.BINUNICODE[0]: "<I", pickle.BINUNICODE8[0]: "<Q"}
_INTS = {pickle.BININT1[0]: "<B", pickle.BININT2[0]: "<H", pickle.BININT[0]: "<i"}
_CONSTANTS = {pickle.NONE[0]: None, pickle.NEWTRUE[0]: True, pickle.NEWFALSE[0]: False}
_TUPLES = {pickle.EMPTY_TUPLE[0]: 0, pickle.TUPLE1[0]: 1, pickle.TUPLE2[0]: 2, pickle.TUPLE3[0]: 3}


def _scan(handle) -> list:
    """The object of a protocol 2-4 pickle of numpy arrays in lists and tuples, the opcodes
    ``pickle.dump`` writes of them, with each array of two dimensions or more as a :class:`_Lazy`,
    its bytes skipped. Runs nothing from the file: the only globals known are numpy's
    ``_reconstruct``, ``ndarray`` and ``dtype`` (as markers), and a dtype is made from its name
    alone; anything else (another opcode, global or form) raises :class:`_Unusual`."""
    import numpy as np

    stack: list = []
    marks: list[list] = []
    memo: dict[int, object] = {}

    def take(fmt: str):
        size = struct.calcsize(fmt)
        raw = handle.read(size)
        if len(raw) != size:
            raise _Unusual("cut short")
        return struct.unpack(fmt, raw)[0]

    def pop_mark() -> list:
        nonlocal stack
        items, stack = stack, marks.pop()
        return items

    while True:
        op = handle.read(1)
        if not op:
            raise _Unusual("no STOP")
        code = op[0]
        if code in _STATE_BYTES:
            n = take(_STATE_BYTES[code])
            if len(stack) >= 3 and _is(stack[-2], "dtype") and isinstance(stack[-3], tuple) and len(stack[-3]) > 1:
                stack.append(_Skipped(handle.tell(), n))  # an array's pixels: passed over
                handle.seek(n, 1)
            else:
                stack.append(handle.read(n))
        elif code in _STRINGS:
            stack.append(handle.read(take(_STRINGS[code])).decode("utf-8"))
        elif code in _INTS:
            stack.append(take(_INTS[code]))
        elif code in _CONSTANTS:
            stack.append(_CONSTANTS[code])
        elif code in _TUPLES:
            count = _TUPLES[code]
            items = stack[len(stack) - count :] if count else []
            del stack[len(stack) - count :]
            stack.append(tuple(items))
        elif op == pickle.PROTO:
            take("<B")
        elif op == pickle.FRAME:
            take("<Q")
        elif op == pickle.MEMOIZE:
            memo[len(memo)] = stack[-1]
        elif op in (pickle.BINPUT, pickle.LONG_BINPUT):
            memo[take("<B" if op == pickle.BINPUT else "<I")] = stack[-1]
        elif op in (pickle.BINGET, pickle.LONG_BINGET):
            stack.append(memo[take("<B" if op == pickle.BINGET else "<I")])
        elif op == pickle.MARK:
            marks.append(stack)
            stack = []
        elif op == pickle.TUPLE:
            items = pop_mark()  # before looking up stack.append: it changes the stack
            stack.append(tuple(items))
        elif op == pickle.EMPTY_LIST:
            stack.append([])
        elif op == pickle.APPENDS:
            items = pop_mark()
            stack[-1].extend(items)
        elif op == pickle.APPEND:
            item = stack.pop()
            stack[-1].append(item)
        elif op == pickle.STACK_GLOBAL:
            name, module = stack.pop(), stack.pop()
            if (module, name) in (("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct")):
                stack.append("_reconstruct")
            elif (module, name) in (("numpy", "ndarray"), ("numpy", "dtype")):
                stack.append(name)
            else:
                raise _Unusual(f"{module}.{name}")
        elif op == pickle.REDUCE:
            args, func = stack.pop(), stack.pop()
            if func == "_reconstruct" and args == ("ndarray", (0,), b"b"):
                stack.append(_Box("array"))
            elif func == "dtype" and len(args) == 3 and isinstance(args[0], str) and args[1:] == (False, True):
                dtype = np.dtype(args[0])
                if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
                    raise _Unusual("a dtype of objects or fields")
                stack.append(_Box("dtype", dtype))
            else:
                raise _Unusual("another call")
        elif op == pickle.BUILD:
            state, obj = stack[-1], stack[-2]
            del stack[-1]
            if _is(obj, "array") and obj.value is None and isinstance(state, tuple) and len(state) == 5 \
                    and state[0] == 1 and state[3] is False and _is(state[2], "dtype") and isinstance(state[1], tuple):
                shape, dtype, payload = state[1], state[2].value, state[4]
                if not all(type(d) is int and d >= 0 for d in shape):
                    raise _Unusual("an array state")
                nbytes = math.prod(shape) * dtype.itemsize
                if isinstance(payload, _Skipped):
                    if payload.nbytes != nbytes:
                        raise _Unusual("pixels of another size")
                    obj.value = _Lazy(payload.offset, shape, dtype) if nbytes else np.zeros(shape, dtype)
                elif isinstance(payload, bytes) and len(payload) == nbytes:
                    obj.value = np.frombuffer(payload, dtype).reshape(shape)
                else:
                    raise _Unusual("an array's bytes")
            elif _is(obj, "dtype") and isinstance(state, tuple) and len(state) == 8 and state[0] == 3:
                order = state[1]
                if order not in ("|", "<", ">", "=") or state[2:] != (None, None, None, -1, -1, 0):
                    raise _Unusual("a dtype state")
                if order in "<>" and (order == "<") != np.little_endian:
                    obj.value = obj.value.newbyteorder(order)
            else:
                raise _Unusual("another state")
        elif op == pickle.STOP:
            return _unbox(stack.pop())
        else:
            raise _Unusual(f"opcode {op!r}")


def _is(value, kind: str) -> bool:
    return isinstance(value, _Box) and value.kind == kind


def _unbox(value):
    """The scanned value with each array in place of its box."""
    if _is(value, "array") and value.value is not None:
        return value.value
    if isinstance(value, (list, tuple)):
        return [_unbox(v) for v in value] if isinstance(value, list) else tuple(_unbox(v) for v in value)
    raise _Unusual("not arrays in lists and tuples")


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
        image = workdir.read_json(manifest)["image"]
        return (int(image["height"]), int(image["width"]), int(image["channels"]))
    except (OSError, PrepError, ValueError, KeyError, TypeError):
        raise PrepError(
            f"{path} holds flat arrays; the image shape is in {manifest}, which is missing or unreadable"
        ) from None
