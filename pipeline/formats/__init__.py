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
    load(path)             ((x_train, y_train), (x_valid, y_valid), (x_test, y_test)) as stored
    load_tf(path, split)   a tf.data.Dataset of (uint8 H x W x C image, int64 label)
    classes(path)          the class names the file records, or None

The modules import small compression libraries only; numpy, h5py and tensorflow are imported
inside the functions that use them, so picking a format or checking that one is up to date loads
none of them, and writing pkl.gz or tfrecord never loads h5py or tensorflow.
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
    png: bytes  # the resized PNG, as written by `prep resize`
    pixels: np.ndarray  # uint8 (H, W, C)


class Batch(NamedTuple):
    """Consecutive samples of one split as read back from a packaged file."""

    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,)
    paths: list[str] | None  # None when the format does not store them


# The format modules use the types above, so they are imported once those exist.
from . import hdf5, pickle_gz, tfrecord  # noqa: E402

FORMATS: dict[str, ModuleType] = {"pkl.gz": pickle_gz, "h5": hdf5, "tfrecord": tfrecord}


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
