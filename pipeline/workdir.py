"""The work directory: file names, its lock, atomic writes, CSV/JSON I/O and up-to-date stamps.

Every stage reads its inputs from, and writes its outputs to, one folder (``processed/`` by
default). The files below are the contract between stages::

    labels.csv      index   path,label,sha256,bytes    (path relative to the RAW root)
    index.json      index   RAW root, settings, counts, skipped files
    resized/        resize  one lossless PNG per usable image, mirroring RAW's tree
    resized.csv     resize  path,sha256,resized,resized_sha256,status,reason,width,height,mode
    rejected.csv    resize  path,label,reason          (images that could not be used)
    resize.json     resize  the resize settings (size, mode, channels, ...)
    splits.csv      split   path,label,sha256,resized,resized_sha256,split
    split.json      split   ratios, seed
    classes.json    encode  {"classes": [...]}         (label id = position)
    encoded.csv     encode  splits.csv + label_id
    dataset.pkl.gz, dataset.h5, tfrecord/, manifest.json   pack
    verify/         verify-train

All writes go through :func:`atomic_write` (a temporary file in the same folder, fsynced, then
renamed over the target) or :func:`atomic_write_bytes` (on Linux, a new file made unnamed and
linked in once written), so an interrupted run never leaves a half-written file. A command
holds the work directory through :meth:`Workdir.lock` (``.lock``): one writer at a time.
Paths read back from these files are checked with :class:`Confined` before use: they stay
inside RAW, ``resized/`` or the work directory whatever a damaged or crafted file says.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import functools
import hashlib
import io
import itertools
import json
import logging
import operator
import os
import re
import stat
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Sequence

from .errors import PrepError, StageInputMissing

log = logging.getLogger(__name__)


LABELS = "labels.csv"
INDEX_META = "index.json"
RESIZED_DIR = "resized"
RESIZED = "resized.csv"
RESIZE_SETTINGS = "resize.json"
SPLIT_SETTINGS = "split.json"
REJECTED = "rejected.csv"
SPLITS = "splits.csv"
CLASSES = "classes.json"
ENCODED = "encoded.csv"
MANIFEST = "manifest.json"
VERIFY_DIR = "verify"
STAMPS_DIR = ".stamps"
CACHE_DIR = ".cache"
HASH_CACHE = f"{CACHE_DIR}/hashes.npz"  # what index saw of each RAW file it hashed (see HashCache)
FILE_HASHES = f"{CACHE_DIR}/files.json"  # the sha256 of the stage files stamps compare (see FileHashes)
# A file changed this recently may be changed again within the same clock tick, keeping its size
# and times: its hash is not trusted on its times alone until it has settled.
SETTLED_NS = 2_000_000_000
# the fixed names each writing command puts in the work directory (the card and report/ aside:
# prep writes them under other names where a project's own are in the way)
STAGE_OUTPUTS = {
    "index": (LABELS, INDEX_META),
    "resize": (RESIZED_DIR, RESIZED, REJECTED, RESIZE_SETTINGS, "resized.journal"),
    "split": (SPLITS, SPLIT_SETTINGS, "conflicts.csv", "near_copies.csv"),
    "encode": (CLASSES, ENCODED),
    "pack": (MANIFEST, "dataset.pkl.gz", "dataset.h5", "tfrecord", "data"),
    "verify-train": (VERIFY_DIR,),
}
STAGE_OUTPUTS["run"] = tuple(name for names in STAGE_OUTPUTS.values() for name in names)
SPLIT_NAMES = ("train", "valid", "test")  # the splits, in the order every output holds them


@dataclass(frozen=True)
class Workdir:
    """A work directory; ``path(name)`` resolves a stage file inside it. ``url``: the work
    directory's URL when ``root`` is its local copy (see pipeline/remote.py), else None;
    ``left``: the folders the command's copy leaves at the URL (see remote.leaves)."""

    root: Path
    url: str | None = None
    left: tuple[str, ...] = ()

    def path(self, name: str | os.PathLike) -> Path:
        return self.root / name

    def for_workers(self, name: str, executor: str) -> str:
        """Where the workers of ``executor`` find the folder ``name``: a Dask cluster's, at the
        work directory's URL when it has one (a cluster then needs no storage but the bucket;
        the next command fetches what its workers wrote), else :meth:`at`."""
        if self.url is not None and executor == "dask":
            return f"{self.url}/{name}"
        return self.at(name)

    def at(self, name: str) -> str:
        """Where this command reads the folder ``name``: at the URL if its copy leaves it there,
        else here (absolute, not resolved: a link on this machine may be another's mount)."""
        if self.url is not None and name in self.left:
            return f"{self.url}/{name}"
        return os.path.abspath(self.root / name)

    def output(self, given: str | os.PathLike | None, default: str) -> Path:
        """Where to write an output: ``default`` in the work directory, or ``given``.

        A relative ``given`` is taken inside the work directory, so that
        ``prep index raw/ --out labels.csv`` is found by the next stage.
        """
        if given is None:
            return self.root / default
        given = Path(given)
        return given if given.is_absolute() else self.root / given

    def input(self, given: str | os.PathLike | None, default: str, *, made_by: str) -> Path:
        """Where to read an input: ``given`` as typed if it exists, else inside the work directory."""
        if given is None:
            candidate = self.root / default
        else:
            given = Path(given)
            candidate = given if given.is_absolute() or given.exists() else self.root / given
        if not candidate.exists():
            raise StageInputMissing(
                f"{candidate} does not exist; run `prep {made_by}` first"
                f" (or pass the file's path)"
            )
        return candidate


    @contextlib.contextmanager
    def lock(self, *, shared: bool = False, wait: bool = True, create: bool = True,
             claims: tuple[str, ...] = STAGE_OUTPUTS["run"], held: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold the work directory for one command, in ``.lock``.

        A writer (``shared=False``) holds it alone: it fails at once if another writer holds it,
        and waits for readers to finish. A missing work directory is made first (unless
        ``create`` is false: the stage will say why it may not be made, e.g. inside RAW), so two
        first runs never share it. Readers (``shared=True``) share it, and wait for a writer,
        saying so, or with ``wait=False`` go on beside it with a warning. A reader goes on
        without the lock where the folder does not exist or gives no permission to make or open
        the lock file (a colleague's folder, a read-only mount): it writes nothing.
        ``held`` is called once the lock is held (before a writer's claim), and only then.
        """
        import fcntl

        if not shared and create:
            self.root.mkdir(parents=True, exist_ok=True)
        for name in (CACHE_DIR, STAMPS_DIR):  # prep's own folders, which readers write caches into too
            if os.path.islink(self.root / name):
                raise PrepError(f"{self.root / name} is a symbolic link; prep keeps its own files in a folder"
                                " there: remove the link")
        had_lock_file = os.path.lexists(self.root / ".lock")
        fd = self._open_lock(shared) if self.root.is_dir() else None
        if fd is None:
            yield
            return
        try:
            if shared:
                locked = self._lock_shared(fd, wait)
                if locked and held:
                    held()
            else:
                self._lock_exclusive(fd)
                os.ftruncate(fd, 0)  # only now: the lock is held, and the file is a regular one
                os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
                locked = True
                try:
                    if held:
                        held()
                    self._claim(claims)
                except PrepError:  # not prep's folder: leave no file of prep's in it
                    if not had_lock_file:
                        with contextlib.suppress(OSError):
                            os.unlink(self.root / ".lock")
                    raise
            try:
                yield
            finally:
                if locked:
                    if not shared:
                        os.ftruncate(fd, 0)
                    fcntl.lockf(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _claim(self, names: tuple[str, ...]) -> None:
        """Make sure a writer replaces nothing prep did not write: in a folder prep has not
        worked in (no ``.stamps/``, no index.json of its own), the command's own output
        ``names`` must be free (a project's ``labels.csv`` or ``data/``, with ``--workdir .``);
        then ``.stamps/`` marks the folder as prep's from its first write on. Files a stage only
        reads, as a labels.csv made by hand for `prep resize`, are welcome."""
        if (self.root / STAMPS_DIR).is_dir() or _is_index_meta(self.root / INDEX_META):
            return
        taken = sorted(name for name in names if os.path.lexists(self.root / name))
        if taken:
            raise PrepError(
                f"{self.root} already holds {', '.join(taken)}, which prep did not write, and this command"
                " would replace them: use another --workdir (an empty or new folder), or move them away"
            )
        (self.root / STAMPS_DIR).mkdir(exist_ok=True)

    def _open_lock(self, shared: bool) -> int | None:
        """``.lock`` opened without following a link and without truncating it; None for a reader
        that may not make or open it. (O_NONBLOCK: opening a FIFO put there would wait forever.)"""
        import stat

        path = self.root / ".lock"
        flags = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o666)
            except PermissionError:
                if not shared:
                    raise
                fd = os.open(path, os.O_RDONLY | flags)  # a shared lock needs only read access
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise PrepError(f"{path} is a symbolic link; prep keeps its lock in a regular file there:"
                                " remove the link") from None
            if shared and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT):
                return None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise PrepError(f"{path} is not a regular file; prep keeps its lock there: remove it")
        return fd

    @staticmethod
    def _holder(fd: int) -> str:
        """" (pid N)" of the writer holding the lock, as it wrote there; "" if not written yet."""
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        return f" ({text})" if text.startswith("pid ") else ""

    def _lock_exclusive(self, fd: int) -> None:
        """Take the lock alone: at once, or after the readers that hold it (a writer fails at once)."""
        import fcntl

        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                raise
        try:  # only readers hold it if it can be shared
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EACCES, errno.EAGAIN):
                raise PrepError(f"another prep command{self._holder(fd)} is working in {self.root}; wait for it") from None
            raise
        # waiting holds nothing (two writers upgrading shares would wait on each other); a writer
        # that comes meanwhile is then waited for too
        fcntl.lockf(fd, fcntl.LOCK_UN)
        log.warning("waiting for the prep commands reading %s to finish", self.root)
        fcntl.lockf(fd, fcntl.LOCK_EX)

    def _lock_shared(self, fd: int, wait: bool) -> bool:
        """Share the lock with other readers; whether it is held (False: a writer has it, and
        ``wait`` is false, or the file system keeps no locks)."""
        import fcntl

        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return True
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                return False  # no locks here (ENOLCK): reading goes on as it would unlocked
        if not wait:
            log.warning("prep%s is working in %s: what it has not finished shows as stale or missing",
                        self._holder(fd), self.root)
            return False
        # the kernel releases a writer's lock when it ends, even by kill -9, so this wait ends with it
        log.warning("waiting for prep%s working in %s", self._holder(fd), self.root)
        fcntl.lockf(fd, fcntl.LOCK_SH)
        return True

    def relative(self, path: str | os.PathLike) -> str:
        """``path`` relative to the work directory when inside it (so a copied work directory
        still points at its own files), else absolute."""
        path = Path(path).resolve()
        with contextlib.suppress(ValueError):
            return path.relative_to(self.root.resolve()).as_posix()
        return str(path)

    def labels(self, given: str | os.PathLike | None = None) -> Path:
        """The labels CSV: ``given``, else the one the last `prep index` wrote (its --out)."""
        if given is None and self.path(INDEX_META).exists():
            recorded = read_json(self.path(INDEX_META)).get("labels")
            if recorded and (self.root / recorded).exists():
                return self.root / recorded  # an absolute recorded path stays as it is
        return self.input(given, LABELS, made_by="index RAW")


def _is_index_meta(path: Path) -> bool:
    """Whether ``path`` is an index.json that `prep index` wrote (an earlier prep's work directory
    may have no .stamps/ yet)."""
    try:
        data = json_loads(read_file(path)[0])
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"raw", "labels", "classes"} <= data.keys()


@functools.lru_cache(maxsize=1 << 16)  # class names repeat on every row
def natural_key(text: str):
    """Natural order (``img2`` before ``img10``) of a name or a ``/``-separated path, compared
    folder by folder, then stem, then last extension, each by natsort's key, with the plain
    string as tie-break, so names natsort holds equal (``img1``, ``img01``) still sort the same
    way every time. Recorded as :data:`NATURAL_ORDER` wherever a file is trusted to be in it."""
    *folders, name = text.split("/")
    stem, ext = os.path.splitext(name)
    return (tuple(map(_part_key, folders)) + (_natsort_key()(stem), _part_key(ext)), text)


# Like natsort's ns.PATH, which splits paths through pathlib at three times the cost (this key
# is computed for every image in index and split), except that it splits off every suffix
# (``a.b.jpg``, ``x.tar.gz``), so a few names with several dots sort otherwise.
NATURAL_ORDER = "natsort-parts-1"  # the version of the order: change it with natural_key


@functools.cache
def _natsort_key():
    from natsort import natsort_keygen  # on first use: its import (regular expressions) costs 20-50 ms

    return natsort_keygen()


@functools.lru_cache(maxsize=1 << 12)  # folder names and extensions repeat
def _part_key(part: str):
    return _natsort_key()(part)


# -- atomic writes ---------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, fsync: bool = True, **open_kwargs) -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success (fsync it and) rename it over ``path``.

    Without fsync the rename is still atomic for any reader and survives the process being
    killed; only a power cut can lose the data, which is why per-image files skip it. The
    temporary name carries the process and thread, so concurrent writers never share one, and
    the file gets the usual permissions (0666 less the umask).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        try:
            handle = open(tmp, mode, **open_kwargs)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(tmp, mode, **open_kwargs)
        with handle:
            yield handle
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise _named(err, path) from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
NOT_REGULAR = "not a regular file"  # the reason a FIFO, socket or device is not read
# O_NONBLOCK: opening a FIFO put where a file was expected returns at once (and is then
# refused), where a plain open would wait for a writer forever
_READ_FILE = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` so that it appears whole or not at all, as :func:`atomic_write`.

    On Linux the file is made without a name (``O_TMPFILE``) in ``path``'s folder and linked in
    once written: it costs less than creating a named temporary file and renaming it (about 50
    against 70 µs per resized image), and a process killed meanwhile leaves nothing behind. A
    file that exists is replaced the usual way: the unnamed file is linked in under a temporary
    name, then renamed over it. A new folder's first file, other systems, and file systems (or
    sandboxes) without unnamed files or /proc write a named temporary file. Plain system calls,
    as this runs once per resized image: a third cheaper than a file object.
    """
    path = os.fspath(path)
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}-{threading.get_ident()}.tmp")
    with _naming(path):
        placed = _write_unnamed(folder, path, tmp, data, fsync)
    if placed == path:
        return
    try:
        if placed is None:  # nothing written yet: a named temporary file
            try:
                fd = os.open(tmp, _NEW_FILE, 0o666)
            except FileNotFoundError:
                os.makedirs(folder, exist_ok=True)
                fd = os.open(tmp, _NEW_FILE, 0o666)
            try:
                _write_all(fd, data, fsync)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise _named(err, path) from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _naming(path: str) -> Iterator[None]:
    try:
        yield
    except OSError as err:
        raise _named(err, path) from None


def _named(err: OSError, path: str | os.PathLike) -> OSError:
    """``err`` naming ``path`` when it names no file (a write's ENOSPC or EFBIG names none), so
    the one-line error says which file could not be written."""
    if err.filename is None and err.errno is not None:
        return type(err)(err.errno, err.strerror, os.fspath(path))
    return err


def _write_unnamed(folder: str, path: str, tmp: str, data: bytes, fsync: bool) -> str | None:
    """Write ``data`` to an unnamed file and link it in at ``path``, or at ``tmp`` if ``path``
    exists (to be renamed over it): where the file now is, or None (nothing written) where no
    unnamed file can be had."""
    fd = _unnamed_file(folder)
    if fd is None:
        return None
    try:
        _write_all(fd, data, fsync)
        try:
            return path if _link(fd, path) else None
        except FileExistsError:
            pass
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # left by a killed run of this pid and thread
        return tmp if _link(fd, tmp) else None
    finally:
        os.close(fd)


def _unnamed_file(folder: str) -> int | None:
    """A new, unnamed file in ``folder`` open for writing; None where there is none to be had."""
    if _unnamed_broken or not hasattr(os, "O_TMPFILE"):
        return None
    try:
        fd = os.open(folder or ".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o666)
    except OSError:  # no such folder yet, or a file system without unnamed files
        return None
    if folder not in _umask_applied:  # once per folder
        _umask_applied[folder] = _has_usual_mode(fd)
    if not _umask_applied[folder]:
        os.close(fd)
        return None
    return fd


def _has_usual_mode(fd: int) -> bool:
    """Whether the kernel gave this unnamed file the usual permissions (0666 less the umask):
    before Linux 6.0, file systems without ACLs left the umask out for unnamed files."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            # reading the umask through os.umask would change it, for every thread
            umask = next((int(line.split()[1], 8) for line in status if line.startswith("Umask:")), None)
    except (OSError, ValueError):
        return False
    return umask is not None and os.fstat(fd).st_mode & 0o777 == 0o666 & ~umask


_umask_applied: dict[str, bool] = {}


def _link(fd: int, path: str) -> bool:
    """Name the unnamed file ``fd`` ``path`` (FileExistsError if taken): linkat with
    AT_SYMLINK_FOLLOW of its /proc/self/fd entry, which os.link asks for only when given a
    folder fd (any open one: the path is absolute). False if that fails for another reason (the
    /proc of another namespace, a sandbox): this process then makes no more unnamed files."""
    global _unnamed_broken
    try:
        os.link(f"/proc/self/fd/{fd}", path, src_dir_fd=fd, follow_symlinks=True)
    except FileExistsError:
        raise
    except OSError:
        _unnamed_broken = True
        return False
    return True


_unnamed_broken = False  # set when linking an unnamed file in failed in this process


def _write_all(fd: int, data: bytes, fsync: bool) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    if fsync:
        os.fsync(fd)


def read_file(path: str | os.PathLike, *, follow_links: bool = True) -> tuple[bytes, os.stat_result]:
    """A file's bytes, and its status after reading them. Through ``os`` rather than ``open()``:
    for the small files of a dataset, the buffered file object's own work (its status calls,
    a read in pieces) costs as much as the reading. Only a regular file is read: anything else
    (a FIFO, a socket, a device) is an OSError "not a regular file"; with ``follow_links=False``
    a symbolic link is one too (ELOOP)."""
    fd = os.open(path, _READ_FILE if follow_links else _READ_FILE | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, NOT_REGULAR, os.fspath(path))
        size = st.st_size
        parts = []
        while part := os.read(fd, size + 1 if not parts else 1 << 20):  # one call, then the end
            parts.append(part)
        return b"".join(parts) if len(parts) != 1 else parts[0], os.fstat(fd)
    finally:
        os.close(fd)


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """A regular file opened for reading (binary, buffered), as :func:`read_file` opens one: a
    FIFO, socket or device is an OSError "not a regular file", not a wait for a writer."""
    fd = os.open(path, _READ_FILE)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, NOT_REGULAR, os.fspath(path))
        return open(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a folder under a temporary name; on success swap it in place of ``path``."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run that had this pid
    tmp.mkdir()  # the usual permissions (0777 less the umask)
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# .NAME.<pid>-<thread>.tmp (atomic_write's), .NAME.<other>.tmp (another writer's), .NAME.old
_TEMP = re.compile(r"\.(?P<output>.+?)\.(?:(?:(?P<pid>\d+)-\d+|[^.]+)\.tmp|old)")


def remove_stale_temps(folder: Path, outputs: set[str] | None = None) -> None:
    """Delete the temporaries an interrupted run left in ``folder`` (not recursive), files and
    folders, of :func:`atomic_write` and :func:`atomic_dir` (``.NAME.<pid>-<thread>.tmp``,
    ``.NAME.old``; any other ``.NAME.<x>.tmp`` too), of every output or of ``outputs`` only:
    those of a process that is gone, or of this one (which writes none yet). An ``.old`` folder,
    or a temporary without a pid, goes unless a live process is writing that output."""
    import shutil

    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return
    found = [(entry, match) for entry in entries
             if (match := _TEMP.fullmatch(entry.name)) and (outputs is None or match["output"] in outputs)]
    live = {entry.name for entry, m in found if m["pid"] and int(m["pid"]) != os.getpid() and _alive(int(m["pid"]))}
    writing = {m["output"] for entry, m in found if entry.name in live}
    for entry, match in found:
        if entry.name in live or (match["pid"] is None and match["output"] in writing):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user's included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    return True


# -- paths read from files -------------------------------------------------------------------


class Confined:
    """The root that paths read from a file must stay below: labels.csv's images below RAW, the
    resized names of resized.csv, splits.csv and encoded.csv below ``resized/``, manifest.json's
    entries below the work directory, so that no crafted or damaged row reads or writes elsewhere.

    ``Confined(root, "RAW")(rel, where)`` returns ``rel`` if it is a relative ``/`` path below
    ``root``, else raises a one-line PrepError naming ``where`` (the file and line): empty, absolute,
    a drive (``C:\\``), a ``..`` component, a NUL character, or under a local ``root`` (None for
    a URL: its text alone is checked) a folder that resolves, through symbolic links, outside
    it. The folders found inside are remembered, so 20,000 paths in a few folders cost a
    realpath per folder, not per path; ``whole=True`` resolves the path itself too (where the
    file it names may be a link).
    """

    def __init__(self, root: str | os.PathLike | None, name: str):
        self.name = name
        self.real = None if root is None else os.path.realpath(root)
        self._inside: set[str] = set()

    def __call__(self, rel: Any, where: str, line: int | None = None, *, whole: bool = False) -> str:
        """``rel``, checked; ``where`` the file it comes from, ``line`` the line there, if any."""
        suspect = (  # the usual path passes these tests in a microsecond, once per image
            type(rel) is not str or not rel or "\0" in rel or rel[0] in "/\\" or ".." in rel or ":" in rel[1:2]
            or "//" in rel or "./" in rel or rel[-1] in "/."
        )
        problem = self._text_problem(rel) if suspect else None
        if problem is None and self.real is not None:
            folder = rel if whole else rel.rpartition("/")[0]
            if folder not in self._inside:
                real = os.path.realpath(os.path.join(self.real, folder))
                if not is_below(real, self.real):
                    problem = f"leaves {self.name} through a symbolic link (to {real})"
                else:
                    self._inside.add(folder)
        if problem is not None:
            raise PrepError(f"{where}{'' if line is None else f' line {line}'}: path {rel!r} {problem}")
        return rel

    def _text_problem(self, rel: Any) -> str | None:
        if not isinstance(rel, str) or not rel:
            return f"is not a file name (expected a path relative to {self.name})"
        if "\0" in rel:
            return f"holds a NUL character (expected a path relative to {self.name})"
        if (
            rel[0] in "/\\"
            or rel[1:3] in (":/", ":\\")
            or (".." in rel and ".." in rel.replace("\\", "/").split("/"))
        ):
            return f"leaves {self.name} (expected a path relative to {self.name} without '..')"
        if {"", "."} & set(rel.split("/")):  # a path another file system would read as another name
            return f"has an empty or '.' part (expected a plain path relative to {self.name})"
        return None


def is_below(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or inside it (both real, absolute paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


# -- CSV and JSON ----------------------------------------------------------------------------


def write_csv(path: str | os.PathLike, fieldnames: Sequence[str], rows: Iterable[dict]) -> None:
    """Write rows as UTF-8 CSV (RFC 4180 quoting, ``\\n`` line ends), atomically; an unchanged
    file is left as it is (and keeps its modification time)."""
    data = csv_bytes(fieldnames, rows)
    with contextlib.suppress(OSError):
        if read_file(path)[0] == data:  # a regular file only: a FIFO there would never answer
            return
    atomic_write_bytes(path, data)


def read_csv(path: str | os.PathLike, required: Sequence[str] = ()) -> list[dict[str, str]]:
    """Read a CSV written by :func:`write_csv`; check that ``required`` columns are present, on
    every row. Text that is not UTF-8, a NUL character, a malformed row or one too short for a
    required column is a one-line error naming the line."""
    path = Path(path)
    data = read_file(path)[0]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise PrepError(f"{path} line {line}: not UTF-8 text ({err.reason}); expected a CSV file") from None
    nul = text.find("\0")
    if nul >= 0:
        line = text.count("\n", 0, nul) + 1
        raise PrepError(f"{path} line {line}: a NUL character; expected CSV text")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, [])
        missing = [c for c in required if c not in header]
        if missing:
            raise PrepError(f"{path}: expected columns {', '.join(required)}; missing {', '.join(missing)}")
        width = len(header)
        needed = max((header.index(c) + 1 for c in required), default=0)  # fields a row must have

        def other(line: list[str]) -> dict:  # a line of another width than the header's
            if len(line) < needed:
                raise PrepError(f"{path} line {reader.line_num}: {len(line)} fields; expected {width}"
                                f" ({','.join(header)})")
            return _row(header, line)

        return [dict(zip(header, line)) if len(line) == width else other(line) for line in reader if line]
    except csv.Error as err:
        raise PrepError(f"{path} line {reader.line_num}: malformed CSV ({err})") from None


def _row(header: list[str], line: list[str]) -> dict:
    """A CSV line as csv.DictReader gives it (at twice its speed): a short line's missing
    fields are None, a long line's extra fields a list under None."""
    row = dict(zip(header, line))
    if len(line) < len(header):
        row.update(dict.fromkeys(header[len(line) :]))
    elif len(line) > len(header):
        row[None] = line[len(header) :]
    return row


def iter_csv(path: str | os.PathLike, columns: Sequence[str],
             required: Sequence[str] | None = None, *, offsets: bool = False) -> Iterator[tuple]:
    """The ``columns`` of each row of a CSV written by :func:`write_csv`, as a tuple, read a line
    at a time (memory does not grow with the file), with :func:`read_csv`'s checks: the
    ``required`` columns (all of ``columns`` by default) must be in the header and on every row;
    one missing from the header reads as "". Text that is not UTF-8, a NUL character or a
    malformed row is a one-line error naming the line. With ``offsets``, each row comes as
    (where it starts in the file, its tuple)."""
    path = Path(path)
    required = columns if required is None else required
    handle = open_regular(path)
    read = [0, 0]  # bytes and lines taken: a row is read no further than its end

    def lines() -> Iterator[str]:  # each line decoded alone, to name the line of a bad byte
        for number, data in enumerate(handle, start=1):
            read[0] += len(data)
            read[1] = number
            try:
                line = data.decode("utf-8")
            except UnicodeDecodeError as err:
                raise PrepError(f"{path} line {number}: not UTF-8 text ({err.reason}); expected a CSV file") from None
            if "\0" in line:
                raise PrepError(f"{path} line {number}: a NUL character; expected CSV text")
            yield line

    with handle:
        text = lines()
        try:
            header = next(csv.reader(text), [])
            missing = [c for c in required if c not in header]
            if missing:
                raise PrepError(f"{path}: expected columns {', '.join(required)}; missing {', '.join(missing)}")
            at = [header.index(c) if c in header else None for c in columns]
            needed = max((header.index(c) + 1 for c in required), default=0)  # fields a row must have
            # the usual case: the columns side by side in the header, a slice of each line
            start = at[0] if at and at == list(range(at[0] or 0, (at[0] or 0) + len(at))) else None
            end = None if start is None else start + len(at)
            began, limit = read[0], csv.field_size_limit()
            for line in text:
                if '"' in line or "\r" in line or len(line) > limit:  # quoted, another line end, too long:
                    line = next(csv.reader(itertools.chain((line,), text)))  # the csv module's to read
                else:  # as the csv module splits it, at a third of its cost
                    line = line[:-1].split(",") if line.endswith("\n") else line.split(",")
                    if line == [""]:
                        line = []
                if not line:
                    began = read[0]
                    continue
                if len(line) < needed:
                    raise PrepError(f"{path} line {read[1]}: {len(line)} fields; expected {len(header)}"
                                    f" ({','.join(header)})")
                if start is not None and len(line) >= end:
                    row = tuple(line[start:end])
                else:
                    row = tuple("" if i is None or i >= len(line) else line[i] for i in at)
                yield (began, row) if offsets else row
                began = read[0]
        except csv.Error as err:
            raise PrepError(f"{path} line {read[1]}: malformed CSV ({err})") from None


def write_csv_rows(path: str | os.PathLike, fieldnames: Sequence[str], rows: Iterable[Sequence]) -> None:
    """:func:`write_csv` of rows given as values in ``fieldnames``' order (tuples, say), streamed
    to a temporary file (memory does not grow with the rows), then renamed over ``path`` unless
    its bytes are those already there (the file then keeps its modification time)."""
    out = CsvOut(path, fieldnames)
    try:
        out.writer.writerows(rows)
    except OSError as err:
        out.discard()
        raise _named(err, out.path) from None
    except BaseException:
        out.discard()
        raise
    out.commit()


class CsvOut:
    """A CSV file being written a row at a time (``writer``, a csv writer) to a temporary file
    beside ``path``, which :meth:`commit` renames over ``path`` unless its bytes are those already
    there (:func:`write_csv_rows` for rows that come from several places), and :meth:`discard`
    removes."""

    def __init__(self, path: str | os.PathLike, fieldnames: Sequence[str]):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)  # as atomic_write does (an --out in a new folder)
        try:
            self.handle = open(self.tmp, "w", encoding="utf-8", newline="")
            self.writer = csv.writer(self.handle, lineterminator="\n")
            self.writer.writerow(fieldnames)
        except OSError as err:
            self.discard()
            raise _named(err, self.path) from None

    def commit(self) -> None:
        import filecmp

        try:
            with self.handle:
                self.handle.flush()
                os.fsync(self.handle.fileno())
            if self.path.is_file() and filecmp.cmp(self.tmp, self.path, shallow=False):
                os.unlink(self.tmp)
            else:
                os.replace(self.tmp, self.path)
        except BaseException as err:
            self.discard()
            if isinstance(err, OSError):
                raise _named(err, self.path) from None
            raise

    def discard(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            self.handle.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


def write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 2) -> None:
    """Write ``data`` as key-sorted UTF-8 JSON, atomically (not at all if unchanged); indented
    unless ``indent`` is None (compact, for large caches: the json module only uses its C
    encoder then, which is several times faster)."""
    separators = (",", ":") if indent is None else None
    text = json.dumps(data, indent=indent, separators=separators, sort_keys=True, ensure_ascii=False) + "\n"
    with contextlib.suppress(OSError):
        if read_file(path)[0] == text.encode("utf-8"):  # a regular file only: a FIFO would never answer
            return  # unchanged: keep the file (and its mtime) as it is
    with atomic_write(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def sha256_digest(text: str) -> bytes | None:
    """A sha256 as index writes it (64 lowercase hex digits) as 32 bytes; None for anything else."""
    if len(text) != 64:
        return None
    try:
        digest = bytes.fromhex(text)
    except ValueError:
        return None
    return digest if digest.hex() == text else None


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json_loads(read_file(path)[0].decode("utf-8"))
    except json.JSONDecodeError as err:
        raise PrepError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    except UnicodeDecodeError as err:
        raise PrepError(f"{path}: not UTF-8 text, so not a JSON file ({err.reason})") from None
    except ValueError as err:  # nested too deeply
        raise PrepError(f"{path}: not a JSON file prep wrote ({err})") from None


def json_loads(text: str | bytes) -> Any:
    """json.loads, where JSON nested too deeply for the parser is a ValueError as other bad JSON
    is (not a RecursionError): a file someone sent may hold ``[[[[...``."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


class HashCache:
    """What `prep index` of a RAW saw of each row of the labels CSV it wrote (:data:`HASH_CACHE`),
    in that CSV's order, in arrays: the size and version the listing gave before the file was
    read for its sha256 (the version: mtime in ns locally, see :class:`sources.Listing`), and
    whether its hash may be trusted while the file keeps both (``settled``: its mtime was not
    recent, see ``index.SETTLED_NS``). The sha256 is the CSV's own; the cache holds only for the
    CSV whose sha256 it records, as `prep index` wrote it."""

    def __init__(self, sizes, versions, settled):
        self.sizes, self.versions, self.settled = sizes, versions, settled  # versions: 64-bit ints, or text

    def __len__(self) -> int:
        return len(self.sizes)

    def listed(self, row: int) -> tuple[int, Any]:
        """(size, version) the listing gave of the row's file."""
        version = self.versions[row]
        return self.sizes[row], (version or None) if type(version) is str else version

    def seen(self, row: int) -> tuple[int, Any] | None:
        """:meth:`listed` of a row whose hash may be trusted while the file keeps both, else None."""
        return self.listed(row) if self.settled[row] else None

    @classmethod
    def read(cls, wd: Workdir, root: str, labels_sha256: str) -> "HashCache | None":
        """The cache of ``root`` beside the labels CSV of sha256 ``labels_sha256``; None if there
        is none, or it is of another RAW or CSV, or damaged."""
        import array

        import numpy as np

        def int64s(values) -> array.array:  # read a number at a time faster than numpy's
            return array.array("q", values.astype("=i8").tobytes())

        try:  # a work directory someone sent: no pickle, and no member that inflates (memory: the file's size)
            with open_regular(wd.path(HASH_CACHE)) as handle, np.load(handle, allow_pickle=False) as data:
                if not isinstance(data, np.lib.npyio.NpzFile) or any(
                        info.compress_type != zipfile.ZIP_STORED for info in data.zip.infolist()):
                    return None
                meta = json_loads(data["meta"].tobytes())
                if not isinstance(meta, dict) or meta.get("root") != root or meta.get("labels_sha256") != labels_sha256:
                    return None
                sizes, settled = int64s(data["sizes"]), data["settled"].astype(np.bool_).tobytes()
                if "mtimes" in data:
                    versions = int64s(data["mtimes"])
                else:
                    from .sources import Paths

                    versions = Paths.from_buffers(data["tag_data"], data["tag_ends"])
                    for _ in versions:  # each decodes (UnicodeDecodeError: a ValueError), once, here
                        pass
        except (OSError, ValueError, KeyError, EOFError, TypeError, MemoryError, RecursionError, zipfile.BadZipFile):
            return None  # none, damaged, or not a cache of this layout
        if not len(sizes) == len(versions) == len(settled):
            return None
        return cls(sizes, versions, settled)

    def write(self, wd: Workdir, root: str, labels_sha256: str) -> None:
        import numpy as np

        meta = json.dumps({"root": root, "labels_sha256": labels_sha256}).encode("utf-8", "surrogatepass")
        arrays = {"meta": np.frombuffer(meta, np.uint8), "sizes": np.asarray(self.sizes, np.int64),
                  "settled": np.asarray(self.settled, np.bool_)}
        if not hasattr(self.versions, "buffers"):  # not text
            arrays["mtimes"] = np.asarray(self.versions, np.int64)
        else:
            arrays["tag_data"], arrays["tag_ends"] = self.versions.buffers()
        wd.path(CACHE_DIR).mkdir(exist_ok=True)
        with atomic_write(wd.path(HASH_CACHE), "wb") as handle:
            np.savez(handle, **arrays)
        with contextlib.suppress(OSError):
            os.unlink(wd.path(f"{CACHE_DIR}/hashes.json"))  # an earlier prep's cache


# -- memory ----------------------------------------------------------------------------------


def map_large_blocks(threshold: int = 128 * 1024) -> None:
    """Have the C library's allocator give each block of ``threshold`` bytes or more a memory
    map of its own, returned to the system when freed. glibc's malloc raises that threshold to
    the size of each large block freed (up to 32 MiB); blocks below it then come from its heap,
    where freed memory stays in the process's resident set, so a stage that frees and allocates
    arrays of an entry per image in turn holds much more than it uses. A fixed threshold stops
    that. Elsewhere (another C library, another system) nothing changes."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return
    mallopt(-3, threshold)  # M_MMAP_THRESHOLD


# -- hashing and up-to-date stamps -----------------------------------------------------------


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The sha256 of a regular file (anything else, a FIFO say, is an OSError, not a hang)."""
    digest = hashlib.sha256()
    fd = os.open(path, _READ_FILE)
    with open(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, NOT_REGULAR, os.fspath(path))
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(settings: Any) -> str:
    """A short, stable hash of JSON-serialisable settings."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class FileHashes:
    """The sha256 of the work directory's own files (CSVs, JSON, packaged files: what the stamps
    compare), remembered in ``.cache/files.json`` by each file's size, mtime, ctime and inode, so
    that an up-to-date check of an unchanged file is a stat, not a read of hundreds of MB.

    Any write changes a file's mtime and ctime (a reset mtime still moves its ctime) and an atomic
    replace its inode, so a file keeping all four has kept its bytes, with one exception: a
    same-size rewrite within the clock tick of the hashed version. So a hash is remembered only
    when the file had settled (its mtime and ctime :data:`SETTLED_NS` older than the reading)
    and did not change while read. Readers save it too, where they may write; a cache that
    cannot be read or written only costs a rehash."""

    def __init__(self, wd: Workdir):
        self.wd = wd
        self.path = wd.path(FILE_HASHES)
        try:
            files = json_loads(read_file(self.path)[0]).get("files")
        except (OSError, ValueError, AttributeError):
            files = None
        self.files: dict[str, list] = files if isinstance(files, dict) else {}
        self.changed = False

    def sha256(self, path: str | os.PathLike) -> str:
        """The sha256 of the regular file ``path``: remembered, or read (and remembered if settled)."""
        key = self.wd.relative(path)
        st = os.stat(path)
        seen = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        entry = self.files.get(key)
        if isinstance(entry, list) and len(entry) == 5 and entry[:4] == seen and isinstance(entry[4], str):
            return entry[4]
        started = time.time_ns()
        digest = sha256_file(path)
        st = os.stat(path)
        if [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino] == seen and max(seen[1:3]) < started - SETTLED_NS:
            self.files[key] = [*seen, digest]
            self.changed = True
        elif self.files.pop(key, None) is not None:
            self.changed = True
        return digest

    def save(self) -> None:
        """Write the cache if it changed, leaving out files gone since; quietly not where the
        work directory may not be written (a reader's)."""
        if not self.changed:
            return
        live = {key: entry for key, entry in self.files.items() if os.path.lexists(self.wd.root / key)}
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(exist_ok=True)
            write_json(self.path, {"files": live})
        self.changed = False


class Stamp:
    """Records what a stage last produced from which inputs, to skip work that is up to date.

    A stamp holds the sha256 of each input file, the settings, and the sha256 of each output
    file. The stage is up to date when all three still match; a missing or edited output
    makes it stale. It may also keep a summary of the outputs (JSON, so dict keys come back
    sorted), for an up-to-date rerun to report without reading them. Paths inside the work
    directory are recorded relative to it, so a stamp holds wherever the command is run from.
    The files are hashed through :class:`FileHashes`: checking unchanged ones reads none of them.
    """

    def __init__(self, workdir: Workdir, name: str):
        self.root = workdir.root
        self.path = workdir.path(STAMPS_DIR) / f"{name}.json"
        self._key = workdir.relative

    def _path(self, key: str) -> Path:
        return Path(key) if os.path.isabs(key) else self.root / key

    def _state(self, inputs: Iterable[Path], settings: Any, hashes: FileHashes) -> dict:
        return {
            "inputs": {self._key(p): hashes.sha256(p) for p in inputs},
            "settings": json.loads(json.dumps(settings, sort_keys=True, default=str)),
        }

    def explain(self, inputs: Iterable[Path], settings: Any) -> list[str]:
        """Why the stage is not up to date (empty when it is): changed inputs, settings, outputs.

        ``settings=None`` leaves the settings out of the comparison.
        """
        try:
            recorded = json_loads(read_file(self.path)[0])
        except (OSError, ValueError):
            return ["never run here"]
        hashes = FileHashes(Workdir(self.root))
        try:
            return self._explain(recorded, self._state(inputs, settings, hashes), settings, hashes)
        finally:
            hashes.save()

    def _explain(self, recorded: dict, state: dict, settings: Any, hashes: FileHashes) -> list[str]:
        reasons = []
        before = recorded.get("inputs", {})
        for key, digest in state["inputs"].items():
            if before.get(key) != digest:
                reasons.append(f"{key} changed" if key in before else f"new input {key}")
        for key in before.keys() - state["inputs"].keys():
            reasons.append(f"input {key} no longer used")
        old, new = recorded.get("settings"), state["settings"]
        if settings is None:  # the caller does not know the settings: judge inputs and outputs only
            pass
        elif isinstance(old, dict) and isinstance(new, dict):
            for key in sorted(old.keys() | new.keys()):
                if old.get(key) != new.get(key):
                    reasons.append(f"setting {key}: {old.get(key)!r} -> {new.get(key)!r}")
        elif old != new:
            reasons.append("settings changed")
        for key, digest in recorded.get("outputs", {}).items():
            path = self._path(key)
            if not path.exists():
                reasons.append(f"{key} is missing")
            elif path.is_file() and hashes.sha256(path) != digest:
                reasons.append(f"{key} was modified")
        return reasons

    def is_current(self, inputs: Iterable[Path], settings: Any) -> bool:
        return not self.explain(inputs, settings)

    def changed_inputs(self) -> list[str]:
        """How the files the stage read when it last ran here have changed since ("labels.csv
        changed", "resized.csv is gone"): its outputs are older than its inputs. Empty if it
        never ran here (a work directory may come without its stamps). A file outside the work
        directory that is gone is left out: a groups file or a class list given once, or a work
        directory sent from another machine. So is a relative name that leads out of the work
        directory (``../x``, or through a link): prep records none, and reads nothing there for a
        stamp someone else wrote; a FIFO or a device is no file, and is not opened."""
        try:
            recorded = json_loads(read_file(self.path)[0]).get("inputs")
        except (OSError, ValueError, AttributeError):
            return []
        if not isinstance(recorded, dict):
            return []
        hashes = FileHashes(Workdir(self.root))
        root = os.path.realpath(self.root)
        changes = []
        try:
            for key, digest in recorded.items():
                path = self._path(key)
                if not os.path.isabs(key) and not is_below(os.path.realpath(path), root):
                    continue
                if not path.is_file():
                    if not os.path.isabs(key):
                        changes.append(f"{key} is gone")
                elif hashes.sha256(path) != digest:
                    changes.append(f"{key} changed")
        finally:
            hashes.save()
        return changes

    def record(self, inputs: Iterable[Path], settings: Any, outputs: Iterable[Path], summary: Any = None) -> None:
        """Record a run; ``summary``: what the stage reports of its outputs, for a rerun that
        finds them up to date to report without reading them."""
        hashes = FileHashes(Workdir(self.root))
        state = self._state(inputs, settings, hashes)
        state["outputs"] = {self._key(p): (hashes.sha256(p) if p.is_file() else "dir") for p in outputs}
        hashes.save()
        if summary is not None:
            state["summary"] = summary
        write_json(self.path, state)

    def summary(self) -> Any:
        """The summary the last :meth:`record` kept, or None."""
        try:
            return json_loads(read_file(self.path)[0]).get("summary")
        except (OSError, ValueError, AttributeError):
            return None

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def csv_bytes(fieldnames: Sequence[str], rows: Iterable[dict]) -> bytes:
    """The exact bytes :func:`write_csv` would write (used to compare before rewriting)."""
    if not fieldnames:
        raise ValueError("csv_bytes needs at least one column")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(fieldnames)
    get = operator.itemgetter(*fieldnames)

    def values(row: dict) -> Sequence:  # as csv.DictWriter(extrasaction="ignore"), at two thirds of its cost
        try:
            found = get(row)
        except KeyError:
            return [row.get(key, "") for key in fieldnames]
        return found if len(fieldnames) > 1 else (found,)

    writer.writerows(map(values, rows))
    return buffer.getvalue().encode("utf-8")
