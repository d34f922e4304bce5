"""Output formats: a registry of name -> module, and the types their writers and readers share.

Every format module offers the same small interface::

    OUTPUT                 its file or folder name in the work directory
    OPTIONS                the PackOptions fields its bytes depend on
    writer(target, layout, options)
                           a context manager yielding an object with ``write(sample)``; samples
                           arrive in encoded.csv order, and the output appears at ``target``
                           (atomically) only when the block exits without an exception
    read(path, layout, options)
                           ``(split, Batch)`` pairs, train then valid then test, pixels as
                           uint8 (N, H, W, C) whatever the stored form; raises
                           VerificationFailed when the file does not match ``layout``
    load(path)             ((x_train, y_train), (x_valid, y_valid), (x_test, y_test)) as stored,
                           shapes and dtypes checked (:func:`check_arrays`)
    load_tf(path, split)   a tf.data.Dataset of (uint8 H x W x C image, int64 label)
    classes(path)          the class names the file records, or None
    NEEDS_PNG              (optional) True when the writer stores each sample's resized PNG bytes
                           (``Sample.png``); pack reads them only when a format it writes needs them

The modules import small compression libraries only; numpy, h5py, pyarrow and tensorflow are
imported inside the functions that use them, so picking a format or checking that one is up to
date loads none of them, and writing pkl.gz, tfrecord or parquet never loads h5py or tensorflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import NamedTuple

from ..errors import PrepError
from ..workdir import SPLIT_NAMES as SPLITS


@dataclass(frozen=True)
class Layout:
    """What every sample of a packaged dataset looks like, and how many there are."""

    height: int
    width: int
    channels: int
    classes: tuple[str, ...]
    counts: dict[str, int]  # samples per split
    png_bytes: dict[str, int] = field(default_factory=dict)  # resized PNG bytes per split
    version: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)


@dataclass(frozen=True)
class PackOptions:
    """Format options; each format's bytes depend only on the fields it lists in OPTIONS."""

    flat: bool = False  # pkl.gz: x as (N, H*W*C)
    as_float: bool = False  # pkl.gz: x as float32 in [0, 1]
    shard_mb: float = 100.0  # tfrecord: target shard size in MiB
    tfrecord_compression: str = "none"  # tfrecord: none or gzip

    def __post_init__(self):
        if not self.shard_mb > 0:
            raise PrepError(f"--shard-mb must be positive; received {self.shard_mb}")
        if self.tfrecord_compression not in ("none", "gzip"):
            raise PrepError(f"--tfrecord-compression must be none or gzip; received {self.tfrecord_compression!r}")


class Sample(NamedTuple):
    """One image on its way to the writers."""

    split: str
    index: int  # position within its split
    label: int
    path: str  # relative to RAW
    png: bytes | None  # the resized PNG, as written by `prep resize` (None unless a format NEEDS_PNG)
    pixels: np.ndarray  # uint8 (H, W, C)


class Batch(NamedTuple):
    """Consecutive samples of one split as read back from a packaged file."""

    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,)
    paths: list[str] | None  # None when the format does not store them


def close_all(handles) -> None:
    """Close every one of ``handles`` (a sharded writer's open shards), all of them even if one
    fails; the first error is raised."""
    import contextlib

    with contextlib.ExitStack() as stack:
        for handle in handles:
            stack.callback(handle.close)


# The format modules use the types above, so they are imported once those exist.
from . import hdf5, parquet, pickle_gz, tfrecord  # noqa: E402

FORMATS: dict[str, ModuleType] = {"pkl.gz": pickle_gz, "h5": hdf5, "tfrecord": tfrecord, "parquet": parquet}


def get(name: str) -> ModuleType:
    """The module of format ``name``."""
    try:
        return FORMATS[name]
    except KeyError:
        raise PrepError(f"unknown format {name!r}; expected one of {', '.join(FORMATS)} or all") from None


def settings(name: str, options: PackOptions) -> dict:
    """The options format ``name`` depends on, as a JSON-ready dict."""
    return {key: getattr(options, key) for key in get(name).OPTIONS}


def to_images(x: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """uint8 (N, H, W, C) from stored arrays that may be flat or float in [0, 1]."""
    import numpy as np

    if x.dtype != np.uint8:
        x = np.rint(x.astype(np.float64) * 255.0).clip(0, 255).astype(np.uint8)
    return x.reshape((len(x), *shape))


def check_arrays(path, pairs, *, stored_forms: bool = False) -> tuple:
    """``pairs`` (train, valid, test) as a tuple if each is an (x, y) pair as prep packs them, or a
    PrepError naming ``path`` and the split: x uint8 (N, H, W, C) (with ``stored_forms``, pkl.gz's
    --flat and --float too: (N, H*W*C) and float32), y int64 (N,), every split's x of one dtype
    and image shape. Shapes and dtypes only: the pixels are not read (an h5 dataset may be passed)."""
    import numpy as np

    dtypes = (np.uint8, np.float32) if stored_forms else (np.uint8,)
    dims = (4, 2) if stored_forms else (4,)
    expected = "uint8 (N, H, W, C)" + (", or as packed with --flat (N, H*W*C) or --float float32" if stored_forms else "")
    first = None
    for split, (x, y) in zip(SPLITS, pairs, strict=True):
        where = f"{path}: split {split}"
        if x.dtype not in dtypes or len(x.shape) not in dims:
            raise PrepError(f"{where}: images are {x.dtype} {x.shape}; expected {expected}")
        if y.dtype != np.int64 or len(y.shape) != 1:
            raise PrepError(f"{where}: labels are {y.dtype} {y.shape}; expected int64 (N,)")
        if len(x) != len(y):
            raise PrepError(f"{where}: {len(x)} images but {len(y)} labels")
        if first is None:
            first = (split, x.dtype, x.shape[1:])
        elif (x.dtype, x.shape[1:]) != first[1:]:
            raise PrepError(f"{where}: images are {x.dtype} {x.shape[1:]}; split {first[0]}'s are {first[1]} {first[2]}")
    return tuple((x, y) for x, y in pairs)
